//! The simulated providers over real HTTP: wire shapes (providers.md), auth, task life,
//! history paging, balances, faults, rate limit, outages, deliveries and the ground truth.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use genai_task_exporter::simulator::{
    APIMALL_FAILURE_MESSAGES, FailureMix, Faults, GroundTruth, MAXAPI_FAILURE_REASONS, ModelKind,
    ModelSim, Outage, OutcomeList, PollReport, Register, SimConfig, SimProvider, Simulator,
    TaskList,
};
use genai_task_exporter::task::FailureReason;
use serde_json::{Value, json};

const MAX_KEY: &str = "maxapi-sim-key";
const MALL_KEY: &str = "apimall-sim-key";

struct Running {
    sim: Simulator,
    base: String,
    http: reqwest::Client,
    _stop: tokio::sync::oneshot::Sender<()>,
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn start(cfg: SimConfig) -> Running {
    let sim = Simulator::new(cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(sim.clone().serve(listener, async move {
        let _ = stopped.await;
    }));
    Running {
        sim,
        base,
        http: http_client(),
        _stop: stop,
    }
}

impl Running {
    async fn get(&self, path: &str, key: Option<&str>) -> Reply {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        reply(req.send().await.unwrap()).await
    }

    async fn post(&self, path: &str, key: &str, body: Value) -> Reply {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body.to_string());
        reply(req.send().await.unwrap()).await
    }

    async fn truth(&self) -> GroundTruth {
        let r = self.get("/_sim/truth", None).await;
        assert_eq!(r.status, 200);
        serde_json::from_slice(&r.body).unwrap()
    }

    /// Poll a task until `done(data)` holds, returning the last answer's data.
    async fn wait_for(&self, path: &str, key: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self.get(path, Some(key)).await;
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            let data = r.json()["data"].clone();
            if done(&data) {
                return data;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting on {path}: {data}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

async fn reply(resp: reqwest::Response) -> Reply {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.unwrap().to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

fn model(name: &str, kind: ModelKind, latency_ms: (u64, u64)) -> ModelSim {
    ModelSim {
        name: name.to_string(),
        kind,
        latency_min: Duration::from_millis(latency_ms.0),
        latency_max: Duration::from_millis(latency_ms.1),
        ..ModelSim::default()
    }
}

fn only_reason(r: &str) -> FailureMix {
    let mut mix = FailureMix {
        content_moderation: 0.0,
        invalid_parameters: 0.0,
        insufficient_credits: 0.0,
        unspecified: 0.0,
        other: 0.0,
    };
    match r {
        "content_moderation" => mix.content_moderation = 1.0,
        "invalid_parameters" => mix.invalid_parameters = 1.0,
        "insufficient_credits" => mix.insufficient_credits = 1.0,
        "unspecified" => mix.unspecified = 1.0,
        _ => mix.other = 1.0,
    }
    mix
}

fn is_micros_ts(v: &Value) -> bool {
    let s = v.as_str().unwrap_or("");
    s.len() == 27 && s.ends_with('Z') && s.as_bytes()[19] == b'.' && parse_ts(v).is_some()
}

fn is_millis_ts(v: &Value) -> bool {
    let s = v.as_str().unwrap_or("");
    s.len() == 24 && s.ends_with('Z') && s.as_bytes()[19] == b'.' && parse_ts(v).is_some()
}

fn parse_ts(v: &Value) -> Option<SystemTime> {
    humantime::parse_rfc3339(v.as_str()?).ok()
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

fn sorted(list: &[&str]) -> Vec<String> {
    let mut k: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    k.sort();
    k
}

// ------------------------------------------------------------------ maxapi

#[tokio::test]
async fn maxapi_task_goes_through_its_states_with_the_documented_shape() {
    let mut cfg = SimConfig::default();
    cfg.maxapi.workload.models = vec![ModelSim {
        pending_share: 0.4,
        ..model("nano-banana", ModelKind::Image, (1200, 1200))
    }];
    let s = start(cfg).await;
    let id = s.sim.create_task(SimProvider::Maxapi, None);
    let path = format!("/api/v1/task/{id}");

    let first = s.get(&path, Some(MAX_KEY)).await;
    assert_eq!(first.status, 200);
    assert_eq!(
        first.headers["content-type"].to_str().unwrap(),
        "application/json"
    );
    let v = first.json();
    assert_eq!(v["code"], 0);
    assert_eq!(v["msg"], "ok");
    let d = &v["data"];
    assert_eq!(
        keys(d),
        sorted(&[
            "taskId",
            "status",
            "input",
            "result",
            "failure_reason",
            "created_at",
            "updated_at"
        ])
    );
    assert_eq!(d["taskId"], id.as_str());
    assert_eq!(id.len(), 36);
    assert_eq!(d["status"], "PENDING");
    assert_eq!(d["input"]["model"], "nano-banana");
    assert!(d["input"]["prompt"].is_string());
    assert!(d["result"].is_null());
    assert!(d["failure_reason"].is_null());
    assert!(is_micros_ts(&d["created_at"]), "{}", d["created_at"]);
    assert_eq!(d["created_at"], d["updated_at"]);

    let mut seen = vec!["PENDING".to_string()];
    let done = loop {
        let d = s.get(&path, Some(MAX_KEY)).await.json()["data"].clone();
        let st = d["status"].as_str().unwrap().to_string();
        if seen.last() != Some(&st) {
            seen.push(st.clone());
        }
        if st == "SUCCESS" {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(seen, ["PENDING", "PROCESSING", "SUBMITTED", "SUCCESS"]);
    assert_eq!(done["result"]["type"], "image");
    assert!(
        done["result"]["urls"][0]
            .as_str()
            .unwrap()
            .starts_with("https://")
    );
    assert!(
        done.get("failure_reason").is_none(),
        "success answers omit failure_reason"
    );
    let latency = parse_ts(&done["updated_at"])
        .unwrap()
        .duration_since(parse_ts(&done["created_at"]).unwrap())
        .unwrap();
    assert!((latency.as_secs_f64() - 1.2).abs() < 0.002, "{latency:?}");
}

#[tokio::test]
async fn maxapi_refuses_bad_keys_and_unknown_ids() {
    let s = start(SimConfig::default()).await;
    let id = s.sim.create_task(SimProvider::Maxapi, None);
    let path = format!("/api/v1/task/{id}");
    for key in [None, Some("wrong-key")] {
        let r = s.get(&path, key).await;
        assert_eq!(r.status, 401);
        assert_eq!(
            r.json(),
            json!({"code": 401, "msg": "unauthorized", "data": null})
        );
    }
    let r = s
        .get(
            "/api/v1/task/00000000-0000-4000-8000-000000000000",
            Some(MAX_KEY),
        )
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], 404);
    assert!(r.json()["data"].is_null());
    let t = s.truth().await;
    assert_eq!(t.providers["maxapi"].faults.unauthorized_401, 2);
    assert_eq!(t.providers["maxapi"].requests["task"], 3);
    assert_eq!(t.providers["maxapi"].responses["401"], 2);
    assert_eq!(t.providers["maxapi"].responses["404"], 1);
}

#[tokio::test]
async fn maxapi_terminal_states_and_failure_reasons() {
    let mut cfg = SimConfig::default();
    let fails = |name: &str, reason: &str| ModelSim {
        failure_ratio: 1.0,
        failure_reasons: only_reason(reason),
        ..model(name, ModelKind::Image, (50, 50))
    };
    cfg.maxapi.workload.models = vec![
        fails("moderated", "content_moderation"),
        fails("bad-params", "invalid_parameters"),
        fails("broke", "insufficient_credits"),
        fails("weird", "other"),
        ModelSim {
            timeout_ratio: 1.0,
            ..model("slow", ModelKind::Video, (50, 50))
        },
        ModelSim {
            cancel_ratio: 1.0,
            ..model("cancelled", ModelKind::Video, (50, 50))
        },
    ];
    let s = start(cfg).await;
    let cases = [
        ("moderated", "FAILURE", Some("CONTENT_MODERATION")),
        ("bad-params", "FAILURE", Some("INVALID_PARAMETERS")),
        ("broke", "FAILURE", Some("INSUFFICIENT_POINTS")),
        ("weird", "FAILURE", Some("MODEL_ERROR")),
        ("slow", "TIMEOUT", None),
        ("cancelled", "CANCELLED", None),
    ];
    let ids: Vec<String> = cases
        .iter()
        .map(|(m, _, _)| s.sim.create_task(SimProvider::Maxapi, Some(m)))
        .collect();
    tokio::time::sleep(Duration::from_millis(80)).await;
    for ((m, status, reason), id) in cases.iter().zip(&ids) {
        let d = s
            .get(&format!("/api/v1/task/{id}"), Some(MAX_KEY))
            .await
            .json()["data"]
            .clone();
        assert_eq!(d["status"], *status, "{m}");
        assert_eq!(d["input"]["model"], *m);
        assert!(d["result"].is_null(), "{m}");
        match reason {
            Some(r) => assert_eq!(d["failure_reason"], *r, "{m}"),
            None => assert!(d["failure_reason"].is_null(), "{m}"),
        }
    }
    let t = s.truth().await;
    let mx = &t.providers["maxapi"];
    assert_eq!(mx.totals.terminal.failed, 4);
    assert_eq!(mx.totals.terminal.timed_out, 1);
    assert_eq!(mx.totals.terminal.cancelled, 1);
    assert_eq!(mx.models["weird"].failures.other, 1);
    assert_eq!(mx.models["slow"].failures.timeout, 1);
    assert_eq!(mx.models["cancelled"].failures.cancelled, 1);
    assert_eq!(mx.totals.failures.total(), 6);
}

#[tokio::test]
async fn maxapi_submit_creates_a_task_and_calls_back_once() {
    let (hook_url, received) = receiver().await;
    let mut cfg = SimConfig::default();
    cfg.maxapi.workload.models = vec![model("nano-banana", ModelKind::Image, (100, 100))];
    let s = start(cfg).await;

    let r = s
        .post(
            "/api/v1/task/submit",
            MAX_KEY,
            json!({"model": "nano-banana", "input": {"prompt": "a cat", "ratio": "1:1"},
                   "callBackUrl": hook_url}),
        )
        .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["code"], 0);
    assert_eq!(v["msg"], "ok");
    let id = v["data"]["taskId"].as_str().unwrap().to_string();

    let path = format!("/api/v1/task/{id}");
    let d = s.get(&path, Some(MAX_KEY)).await.json()["data"].clone();
    assert_eq!(
        d["input"],
        json!({"model": "nano-banana", "prompt": "a cat", "ratio": "1:1"})
    );
    let done = s
        .wait_for(&path, MAX_KEY, |d| d["status"] == "SUCCESS")
        .await;

    let got = wait_deliveries(&received, 1).await;
    assert_eq!(got[0].body["code"], 0);
    assert_eq!(
        got[0].body["data"], done,
        "callback body is the query envelope"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(received.lock().unwrap().len(), 1, "delivered once");
    assert_eq!(s.truth().await.providers["maxapi"].callbacks.delivered, 1);

    // Validation problems: HTTP 200 with a non-zero envelope code.
    for body in [
        json!({"model": "no-such-model"}),
        json!({"input": {}}),
        json!({"model": "nano-banana", "input": "text"}),
    ] {
        let r = s.post("/api/v1/task/submit", MAX_KEY, body).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["code"], 400);
    }
    assert_eq!(s.truth().await.providers["maxapi"].totals.created, 1);
}

// ------------------------------------------------------------------ apimall

/// Pending long enough for the first look to see it pending even on a loaded machine.
fn slow_start(name: &str, kind: ModelKind) -> ModelSim {
    ModelSim {
        pending_share: 0.8,
        ..model(name, kind, (400, 400))
    }
}

#[tokio::test]
async fn apimall_tasks_have_the_documented_shape_and_kinds() {
    let mut cfg = SimConfig::default();
    cfg.apimall.workload.models = vec![
        slow_start("nano-banana", ModelKind::Image),
        slow_start("veo3-fast", ModelKind::Video),
        slow_start("suno-v4", ModelKind::Audio),
    ];
    let s = start(cfg).await;
    for (m, seg, prefix, url_key) in [
        ("nano-banana", "images", "img_", "image_url"),
        ("veo3-fast", "videos", "vid_", "video_url"),
        ("suno-v4", "audio", "aud_", "audio_url"),
    ] {
        let id = s.sim.create_task(SimProvider::Apimall, Some(m));
        assert!(id.starts_with(prefix) && id.len() == 30, "{id}");
        assert!(
            id[4..]
                .chars()
                .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
        );
        let path = format!("/api/v1/{seg}/{id}");
        let v = s.get(&path, Some(MALL_KEY)).await.json();
        assert_eq!(keys(&v), sorted(&["success", "data", "request_id"]));
        assert_eq!(v["success"], true);
        assert!(v["request_id"].as_str().unwrap().starts_with("req_"));
        let d = &v["data"];
        assert_eq!(
            keys(d),
            sorted(&[
                "task_id",
                "model",
                "status",
                "output",
                "primary_url",
                url_key,
                "error_message",
                "credits_used",
                "credits_refunded",
                "created_at",
                "updated_at",
                "completed_at"
            ])
        );
        assert_eq!(d["task_id"], id.as_str());
        assert_eq!(d["model"], m);
        assert_eq!(d["status"], "pending");
        assert!(d["completed_at"].is_null() && d["output"].is_null() && d[url_key].is_null());
        assert_eq!(d["credits_used"], json!(8));
        assert_eq!(d["credits_refunded"], json!(0));
        assert!(is_millis_ts(&d["created_at"]), "{}", d["created_at"]);

        let done = s
            .wait_for(&path, MALL_KEY, |d| d["status"] == "completed")
            .await;
        let url = done[url_key].as_str().unwrap();
        assert_eq!(done["output"]["resultUrls"], json!([url]));
        assert_eq!(done["primary_url"], url);
        assert!(done["error_message"].is_null());
        assert!(is_millis_ts(&done["completed_at"]));
        assert_eq!(done["completed_at"], done["updated_at"]);

        // The same id on another kind's path is unknown there.
        let other = if seg == "images" { "videos" } else { "images" };
        let r = s
            .get(&format!("/api/v1/{other}/{id}"), Some(MALL_KEY))
            .await;
        assert_eq!(r.status, 404);
    }
    let r = s.get("/api/v1/images/img_nope", Some(MALL_KEY)).await;
    assert_eq!(r.status, 404);
    let v = r.json();
    assert_eq!(v["success"], false);
    assert_eq!(v["error"]["code"], "not_found");
    assert!(v["error"]["message"].is_string());
    assert!(v["request_id"].is_string());

    let r = s.get("/api/v1/account/balances", Some("bad")).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["success"], false);
    assert_eq!(r.json()["error"]["code"], "unauthorized");
}

#[tokio::test]
async fn apimall_history_pages_newest_first_with_a_short_last_page() {
    let mut cfg = SimConfig::default();
    cfg.apimall.workload.models = vec![
        model("nano-banana", ModelKind::Image, (50, 50)),
        model("veo3-fast", ModelKind::Video, (50, 50)),
    ];
    let s = start(cfg).await;
    let images: Vec<String> = (0..120)
        .map(|_| s.sim.create_task(SimProvider::Apimall, Some("nano-banana")))
        .collect();
    let videos: Vec<String> = (0..3)
        .map(|_| s.sim.create_task(SimProvider::Apimall, Some("veo3-fast")))
        .collect();

    let mut listed = Vec::new();
    let mut sizes = Vec::new();
    for page in 1.. {
        let v = s
            .get(
                &format!("/api/v1/images/history?page={page}&limit=50"),
                Some(MALL_KEY),
            )
            .await
            .json();
        assert_eq!(v["success"], true);
        assert_eq!(v["data"]["page"], page);
        assert_eq!(v["data"]["limit"], 50);
        let items = v["data"]["items"].as_array().unwrap();
        sizes.push(items.len());
        for it in items {
            assert_eq!(
                keys(it),
                sorted(&[
                    "task_id",
                    "model",
                    "source",
                    "created_at",
                    "status",
                    "image_url",
                    "credits_used",
                    "credits_refunded",
                    "completed_at"
                ])
            );
            listed.push(it["task_id"].as_str().unwrap().to_string());
        }
        if items.len() < 50 {
            break;
        }
    }
    assert_eq!(sizes, [50, 50, 20]);
    let newest_first: Vec<String> = images.iter().rev().cloned().collect();
    assert_eq!(listed, newest_first);

    let v = s.get("/api/v1/images/history", Some(MALL_KEY)).await.json();
    assert_eq!(v["data"]["limit"], 20);
    assert_eq!(v["data"]["items"].as_array().unwrap().len(), 20);
    let v = s
        .get("/api/v1/images/history?page=9&limit=50", Some(MALL_KEY))
        .await
        .json();
    assert_eq!(v["data"]["items"], json!([]));

    let v = s.get("/api/v1/videos/history", Some(MALL_KEY)).await.json();
    let vids: Vec<&str> = v["data"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["task_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        vids,
        videos.iter().rev().map(|s| s.as_str()).collect::<Vec<_>>()
    );
    assert!(v["data"]["items"][0].get("video_url").is_some());
    let v = s.get("/api/v1/audio/history", Some(MALL_KEY)).await.json();
    assert_eq!(v["data"]["items"], json!([]));

    for q in ["limit=0", "limit=51", "limit=abc", "page=0", "page=-1"] {
        let r = s
            .get(&format!("/api/v1/images/history?{q}"), Some(MALL_KEY))
            .await;
        assert_eq!(r.status, 400, "{q}");
        assert_eq!(r.json()["success"], false, "{q}");
        assert!(r.json()["error"]["code"].is_string(), "{q}");
    }
}

#[tokio::test]
async fn apimall_balance_moves_with_charges_and_refunds() {
    let mut cfg = SimConfig::default();
    cfg.apimall.initial_credits = 1000.0;
    cfg.apimall.workload.models = vec![
        ModelSim {
            credits: 8.0,
            ..model("ok", ModelKind::Image, (150, 150))
        },
        ModelSim {
            credits: 10.5,
            failure_ratio: 1.0,
            failure_reasons: only_reason("content_moderation"),
            ..model("blocked", ModelKind::Image, (800, 800))
        },
    ];
    let s = start(cfg).await;
    let balance = |v: Value| {
        assert_eq!(v["data"]["credits"], v["data"]["api_credits"]);
        v["data"]["credits"].as_f64().unwrap()
    };
    assert_eq!(
        balance(
            s.get("/api/v1/account/balances", Some(MALL_KEY))
                .await
                .json()
        ),
        1000.0
    );
    s.sim.create_task(SimProvider::Apimall, Some("ok"));
    s.sim.create_task(SimProvider::Apimall, Some("ok"));
    let failing = s.sim.create_task(SimProvider::Apimall, Some("blocked"));
    assert_eq!(
        balance(
            s.get("/api/v1/account/balances", Some(MALL_KEY))
                .await
                .json()
        ),
        1000.0 - 16.0 - 10.5
    );
    let d = s
        .wait_for(&format!("/api/v1/images/{failing}"), MALL_KEY, |d| {
            d["status"] == "failed"
        })
        .await;
    assert_eq!(d["error_message"], "Content blocked by safety policy");
    assert_eq!(d["credits_used"], json!(10.5));
    assert_eq!(d["credits_refunded"], json!(10.5));
    assert!(d["output"].is_null() && d["image_url"].is_null());
    assert_eq!(
        balance(
            s.get("/api/v1/account/balances", Some(MALL_KEY))
                .await
                .json()
        ),
        1000.0 - 16.0
    );
    let t = s.truth().await;
    let mall = &t.providers["apimall"];
    assert_eq!(mall.balance, Some(984.0));
    assert_eq!(mall.totals.credits_used, 26.5);
    assert_eq!(mall.totals.credits_refunded, 10.5);
    assert_eq!(mall.models["blocked"].failures.content_moderation, 1);
}

#[tokio::test]
async fn apimall_failure_messages_cover_every_reason() {
    let mut cfg = SimConfig::default();
    cfg.apimall.workload.models = vec![ModelSim {
        failure_ratio: 0.9,
        timeout_ratio: 0.1,
        ..model("flaky", ModelKind::Image, (0, 0))
    }];
    let s = start(cfg).await;
    let ids: Vec<String> = (0..200)
        .map(|_| s.sim.create_task(SimProvider::Apimall, None))
        .collect();
    let mut by_reason: BTreeMap<&str, u64> = BTreeMap::new();
    let mut messages = std::collections::BTreeSet::new();
    for id in &ids {
        let d = s
            .get(&format!("/api/v1/images/{id}"), Some(MALL_KEY))
            .await
            .json()["data"]
            .clone();
        assert_eq!(d["status"], "failed");
        let msg = d["error_message"].as_str();
        messages.insert(format!("{:?}", msg));
        let reason = APIMALL_FAILURE_MESSAGES
            .iter()
            .find(|(m, _)| *m == msg)
            .map(|(_, r)| *r)
            .unwrap_or_else(|| panic!("unlisted message {msg:?}"));
        *by_reason.entry(reason.as_str()).or_default() += 1;
    }
    assert_eq!(
        messages.len(),
        APIMALL_FAILURE_MESSAGES.len(),
        "{messages:?}"
    );
    let t = s.truth().await;
    let f = t.providers["apimall"].models["flaky"].failures;
    for r in FailureReason::ALL {
        assert_eq!(
            f.get(r),
            by_reason.get(r.as_str()).copied().unwrap_or(0),
            "{r}"
        );
    }
    assert_eq!(f.cancelled, 0);
    assert!(f.timeout > 0 && f.other > 0 && f.unspecified > 0);
}

// ------------------------------------------------------------------ faults

fn faulty(seed: u64) -> SimConfig {
    let mut cfg = SimConfig {
        seed,
        ..SimConfig::default()
    };
    cfg.apimall.faults = Faults {
        error_500_ratio: 0.2,
        error_429_ratio: 0.1,
        retry_after: Some(3),
        malformed_ratio: 0.1,
        ..Faults::default()
    };
    cfg
}

/// Status and kind of each answer: "ok", "500", "429", "bad".
async fn fault_run(s: &Running, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = s.get("/api/v1/account/balances", Some(MALL_KEY)).await;
        out.push(match r.status {
            200 => match serde_json::from_slice::<Value>(&r.body) {
                Ok(v) if v["success"] == true => "ok".to_string(),
                _ => "bad".to_string(),
            },
            429 => {
                assert_eq!(r.headers["retry-after"], "3");
                assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
                "429".to_string()
            }
            500 => {
                assert_eq!(r.json()["success"], false);
                "500".to_string()
            }
            other => panic!("unexpected status {other}"),
        });
    }
    out
}

#[tokio::test]
async fn fault_ratios_are_honoured_and_repeatable() {
    let n = 600;
    let a = start(faulty(11)).await;
    let run_a = fault_run(&a, n).await;
    let count = |k: &str| run_a.iter().filter(|x| *x == k).count();
    assert!((80..=160).contains(&count("500")), "{}", count("500"));
    assert!((30..=90).contains(&count("429")), "{}", count("429"));
    assert!((30..=90).contains(&count("bad")), "{}", count("bad"));
    let t = a.truth().await;
    let f = t.providers["apimall"].faults;
    assert_eq!(f.error_500 as usize, count("500"));
    assert_eq!(f.error_429 as usize, count("429"));
    assert_eq!(f.malformed as usize, count("bad"));
    assert_eq!(t.providers["apimall"].requests["balance"] as usize, n);
    assert_eq!(t.providers["maxapi"].faults, Default::default());

    let b = start(faulty(11)).await;
    assert_eq!(fault_run(&b, n).await, run_a, "same seed, same faults");
    let c = start(faulty(12)).await;
    assert_ne!(fault_run(&c, n).await, run_a);
}

#[tokio::test]
async fn malformed_answers_are_truncated_json_or_html_and_never_change_state() {
    let mut cfg = SimConfig::default();
    cfg.maxapi.faults.malformed_ratio = 1.0;
    let s = start(cfg).await;
    let mut html = 0;
    let mut truncated = 0;
    for _ in 0..20 {
        let r = s
            .post(
                "/api/v1/task/submit",
                MAX_KEY,
                json!({"model": "nano-banana"}),
            )
            .await;
        assert_eq!(r.status, 200);
        assert!(serde_json::from_slice::<Value>(&r.body).is_err());
        if r.headers["content-type"] == "text/html" {
            html += 1;
        } else {
            truncated += 1;
        }
    }
    assert!(html > 0 && truncated > 0, "{html} {truncated}");
    assert_eq!(s.truth().await.providers["maxapi"].totals.created, 0);
}

#[tokio::test]
async fn timeout_faults_hold_the_answer() {
    let mut cfg = SimConfig::default();
    cfg.maxapi.faults.timeout_ratio = 1.0;
    cfg.maxapi.faults.timeout_delay = Duration::from_millis(400);
    let s = start(cfg).await;
    let id = s.sim.create_task(SimProvider::Maxapi, None);
    let url = format!("{}/api/v1/task/{id}", s.base);
    let impatient = s
        .http
        .get(&url)
        .bearer_auth(MAX_KEY)
        .timeout(Duration::from_millis(100))
        .send()
        .await;
    assert!(impatient.unwrap_err().is_timeout());
    let t0 = Instant::now();
    let r = reply(s.http.get(&url).bearer_auth(MAX_KEY).send().await.unwrap()).await;
    assert!(t0.elapsed() >= Duration::from_millis(400));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"]["taskId"], id.as_str());
    assert_eq!(s.truth().await.providers["maxapi"].faults.timeouts, 2);
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after_past_the_budget() {
    let mut cfg = SimConfig::default();
    cfg.maxapi.faults.rate_limit_rps = Some(5.0);
    let s = start(cfg).await;
    let id = s.sim.create_task(SimProvider::Maxapi, None);
    let path = format!("/api/v1/task/{id}");
    let mut statuses = Vec::new();
    let t0 = Instant::now();
    for _ in 0..20 {
        let r = s.get(&path, Some(MAX_KEY)).await;
        if r.status == 429 {
            assert_eq!(r.headers["retry-after"], "1");
            assert_eq!(r.json()["code"], 429);
        }
        statuses.push(r.status);
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    // A burst of 5, plus what refilled meanwhile.
    let refilled = (t0.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!(ok >= 5 && ok <= 5 + refilled, "{statuses:?}");
    assert!(limited >= 5, "{statuses:?}");
    assert_eq!(ok + limited, 20);
    assert_eq!(
        s.truth().await.providers["maxapi"].faults.rate_limited as usize,
        limited
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(s.get(&path, Some(MAX_KEY)).await.status, 200);
    // The other provider has its own budget (none here).
    for _ in 0..20 {
        assert_eq!(
            s.get("/api/v1/account/balances", Some(MALL_KEY))
                .await
                .status,
            200
        );
    }
}

#[tokio::test]
async fn outage_windows_answer_503() {
    let mut cfg = SimConfig::default();
    cfg.apimall.faults.outages = vec![Outage {
        start: Duration::ZERO,
        duration: Duration::from_millis(1000),
    }];
    let s = start(cfg).await;
    let r = s.get("/api/v1/account/balances", Some(MALL_KEY)).await;
    assert_eq!(r.status, 503);
    assert!(serde_json::from_slice::<Value>(&r.body).is_err());
    // Even without a key: the gateway is down before it looks at keys.
    assert_eq!(s.get("/api/v1/images/history", None).await.status, 503);
    // The other provider is up.
    assert_eq!(s.get("/api/v1/task/x", Some(MAX_KEY)).await.status, 404);
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert_eq!(
        s.get("/api/v1/account/balances", Some(MALL_KEY))
            .await
            .status,
        200
    );
    let t = s.truth().await;
    assert_eq!(t.providers["apimall"].faults.outage_503, 2);
    assert_eq!(t.providers["apimall"].responses["503"], 2);
}

// ------------------------------------------------------------------ truth

/// Normalized (status, reason) of a task as the exporter should read it.
fn normalize(provider: SimProvider, d: &Value) -> (String, Option<FailureReason>) {
    match provider {
        SimProvider::Maxapi => {
            let status = match d["status"].as_str().unwrap() {
                "SUCCESS" => "succeeded",
                "FAILURE" => "failed",
                "TIMEOUT" => "timed_out",
                "CANCELLED" => "cancelled",
                other => panic!("not terminal: {other}"),
            };
            let reason = match status {
                "succeeded" => None,
                "timed_out" => Some(FailureReason::Timeout),
                "cancelled" => Some(FailureReason::Cancelled),
                _ => {
                    let word = d.get("failure_reason").and_then(|v| v.as_str());
                    Some(
                        MAXAPI_FAILURE_REASONS
                            .iter()
                            .find(|(w, _)| *w == word)
                            .map(|(_, r)| *r)
                            .unwrap(),
                    )
                }
            };
            (status.to_string(), reason)
        }
        SimProvider::Apimall => match d["status"].as_str().unwrap() {
            "completed" => ("succeeded".to_string(), None),
            "failed" => {
                let msg = d["error_message"].as_str();
                let r = APIMALL_FAILURE_MESSAGES
                    .iter()
                    .find(|(m, _)| *m == msg)
                    .map(|(_, r)| *r)
                    .unwrap();
                ("failed".to_string(), Some(r))
            }
            other => panic!("not terminal: {other}"),
        },
    }
}

/// Per model, from the API: statuses, reasons, credits used, credits refunded.
type Tally = (BTreeMap<String, u64>, BTreeMap<String, u64>, f64, f64);

#[tokio::test]
async fn truth_matches_the_tasks_final_states_once_drained() {
    let mut cfg = SimConfig {
        seed: 5,
        ..SimConfig::default()
    };
    let mixed = |name: &str, kind, cancel| ModelSim {
        failure_ratio: 0.25,
        timeout_ratio: 0.1,
        cancel_ratio: cancel,
        credits: 3.0,
        ..model(name, kind, (30, 300))
    };
    cfg.maxapi.workload.tasks_per_second = 200.0;
    cfg.maxapi.workload.total_tasks = Some(60);
    cfg.maxapi.workload.models = vec![
        mixed("nano-banana", ModelKind::Image, 0.1),
        mixed("seedance", ModelKind::Video, 0.1),
    ];
    cfg.maxapi.backfill_tasks = 10;
    cfg.apimall.workload.tasks_per_second = 200.0;
    cfg.apimall.workload.total_tasks = Some(60);
    cfg.apimall.initial_credits = 500.0;
    cfg.apimall.workload.models = vec![
        mixed("nano-banana", ModelKind::Image, 0.0),
        mixed("veo3", ModelKind::Video, 0.0),
        mixed("suno", ModelKind::Audio, 0.0),
    ];
    let s = start(cfg).await;
    let workload = s.sim.spawn_workload();
    assert!(!s.sim.is_drained());
    let deadline = Instant::now() + Duration::from_secs(15);
    while !s.sim.is_drained() {
        assert!(Instant::now() < deadline, "not drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    workload.await.unwrap();
    let t = s.truth().await;
    assert!(t.drained && t.workload_done);

    for (p, created) in [(SimProvider::Maxapi, 70), (SimProvider::Apimall, 60)] {
        let pt = &t.providers[p.as_str()];
        assert_eq!(pt.totals.created, created, "{p:?}");
        assert_eq!(pt.totals.in_flight, 0);
        assert_eq!(pt.totals.terminal.total(), created);
        assert_eq!(pt.models.values().map(|m| m.created).sum::<u64>(), created);
        assert_eq!(
            pt.totals.failures.total(),
            pt.totals.terminal.failed + pt.totals.terminal.timed_out + pt.totals.terminal.cancelled
        );

        let list: TaskList = serde_json::from_slice(
            &s.get(
                &format!("/_sim/tasks?provider={}&after=0", p.as_str()),
                None,
            )
            .await
            .body,
        )
        .unwrap();
        assert_eq!(list.task_ids.len() as u64, created);
        assert_eq!(list.next, created);

        // Tally what the API shows and compare with the truth, per model.
        let mut seen: BTreeMap<String, Tally> = BTreeMap::new();
        for id in &list.task_ids {
            let (path, key) = match p {
                SimProvider::Maxapi => (format!("/api/v1/task/{id}"), MAX_KEY),
                SimProvider::Apimall => {
                    let seg = match &id[..4] {
                        "img_" => "images",
                        "vid_" => "videos",
                        _ => "audio",
                    };
                    (format!("/api/v1/{seg}/{id}"), MALL_KEY)
                }
            };
            let d = s.get(&path, Some(key)).await.json()["data"].clone();
            let m = match p {
                SimProvider::Maxapi => d["input"]["model"].as_str().unwrap().to_string(),
                SimProvider::Apimall => d["model"].as_str().unwrap().to_string(),
            };
            let (status, reason) = normalize(p, &d);
            let e = seen.entry(m).or_default();
            *e.0.entry(status).or_default() += 1;
            if let Some(r) = reason {
                *e.1.entry(r.as_str().to_string()).or_default() += 1;
            }
            if p == SimProvider::Apimall {
                e.2 += d["credits_used"].as_f64().unwrap();
                e.3 += d["credits_refunded"].as_f64().unwrap();
            }
        }
        assert_eq!(seen.len(), pt.models.len());
        for (m, (statuses, reasons, used, refunded)) in &seen {
            let mt = &pt.models[m];
            for st in ["succeeded", "failed", "timed_out", "cancelled"] {
                let want = genai_task_exporter::task::Status::parse(st).unwrap();
                assert_eq!(
                    statuses.get(st).copied().unwrap_or(0),
                    mt.terminal.get(want),
                    "{p:?} {m} {st}"
                );
            }
            for r in FailureReason::ALL {
                assert_eq!(
                    reasons.get(r.as_str()).copied().unwrap_or(0),
                    mt.failures.get(r),
                    "{p:?} {m} {r}"
                );
            }
            assert_eq!(*used, mt.credits_used);
            assert_eq!(*refunded, mt.credits_refunded);
            assert_eq!(mt.terminal_credits_used, mt.credits_used);
        }
        if p == SimProvider::Apimall {
            assert_eq!(pt.totals.credits_used, 180.0);
            assert_eq!(
                pt.balance,
                Some(500.0 - pt.totals.credits_used + pt.totals.credits_refunded)
            );
        }
    }
}

#[tokio::test]
async fn polls_count_requests_and_distinct_keys_without_storing_keys() {
    let mut cfg = SimConfig::default();
    cfg.maxapi.api_keys = vec!["key-one-secret".into(), "key-two-secret".into()];
    let s = start(cfg).await;
    let a = s.sim.create_task(SimProvider::Maxapi, None);
    let b = s.sim.create_task(SimProvider::Maxapi, None);
    for key in ["key-one-secret", "key-two-secret", "key-one-secret"] {
        assert_eq!(
            s.get(&format!("/api/v1/task/{a}"), Some(key)).await.status,
            200
        );
    }
    assert_eq!(
        s.get(&format!("/api/v1/task/{b}"), Some("key-two-secret"))
            .await
            .status,
        200
    );
    s.get("/api/v1/task/unknown", Some("key-one-secret")).await;
    let r = s.get("/_sim/polls?provider=maxapi", None).await;
    assert!(!String::from_utf8_lossy(&r.body).contains("secret"));
    let report: PollReport = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(report.summary.tasks_polled, 2);
    assert_eq!(report.summary.polls, 4);
    assert_eq!(report.summary.max_polls_per_task, 3);
    assert_eq!(report.summary.max_distinct_keys_per_task, 2);
    assert_eq!(report.summary.not_found_polls, 1);
    assert_eq!(report.tasks[0].task_id, a);
    assert_eq!(report.tasks[0].distinct_keys, 2);
    assert_eq!(report.tasks[1].distinct_keys, 1);
    assert_eq!(report.keys.len(), 2);
    assert_eq!(report.keys.values().sum::<u64>(), 5);
    assert_eq!(s.get("/_sim/polls?provider=nope", None).await.status, 400);
}

#[tokio::test]
async fn task_list_pages_by_creation_index_and_evicted_ids_answer_404() {
    let cfg = SimConfig {
        max_tasks: 5,
        ..SimConfig::default()
    };
    let s = start(cfg).await;
    let ids: Vec<String> = (0..8)
        .map(|_| s.sim.create_task(SimProvider::Apimall, None))
        .collect();
    let list: TaskList = serde_json::from_slice(
        &s.get("/_sim/tasks?provider=apimall&after=0&limit=2", None)
            .await
            .body,
    )
    .unwrap();
    assert_eq!(list.after, 3, "the first three were forgotten");
    assert_eq!(list.task_ids, ids[3..5]);
    assert_eq!(list.next, 5);
    let list: TaskList = serde_json::from_slice(
        &s.get("/_sim/tasks?provider=apimall&after=5", None)
            .await
            .body,
    )
    .unwrap();
    assert_eq!(list.task_ids, ids[5..]);
    assert_eq!(
        s.get(&format!("/api/v1/images/{}", ids[0]), Some(MALL_KEY))
            .await
            .status,
        404
    );
    assert_eq!(
        s.get(&format!("/api/v1/images/{}", ids[7]), Some(MALL_KEY))
            .await
            .status,
        200
    );
    let t = s.truth().await;
    assert_eq!(t.providers["apimall"].evicted, 3);
    assert_eq!(t.providers["apimall"].totals.created, 8);
    assert_eq!(s.get("/_sim/tasks", None).await.status, 400);
    assert_eq!(
        s.get("/_sim/tasks?provider=maxapi&after=x", None)
            .await
            .status,
        400
    );
}

#[tokio::test]
async fn failures_take_their_own_time_and_outcomes_report_each_completion() {
    let mut cfg = SimConfig::default();
    cfg.maxapi.workload.models = vec![ModelSim {
        failure_ratio: 0.5,
        failure_latency_min: Some(Duration::from_millis(100)),
        failure_latency_max: Some(Duration::from_millis(200)),
        failure_reasons: only_reason("content_moderation"),
        ..model("nano-banana", ModelKind::Image, (20_000, 30_000))
    }];
    let s = start(cfg).await;
    let ids: Vec<String> = (0..40)
        .map(|_| s.sim.create_task(SimProvider::Maxapi, None))
        .collect();
    let r = s.get("/_sim/outcomes?provider=maxapi", None).await;
    assert_eq!(r.status, 200);
    let list: OutcomeList = serde_json::from_slice(&r.body).unwrap();
    let listed: Vec<&str> = list.tasks.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(listed, ids, "every task, in creation order");
    let mut failing = Vec::new();
    for t in &list.tasks {
        let took = t.completed_at - t.created_at;
        match t.status.as_str() {
            "failed" => {
                assert!((0.1..=0.2 + 1e-6).contains(&took), "{took}");
                failing.push(t.clone());
            }
            "succeeded" => assert!((20.0..=30.0 + 1e-6).contains(&took), "{took}"),
            other => panic!("unexpected status {other}"),
        }
        assert!(!t.terminal && t.polls == 0, "{t:?}");
    }
    assert!(
        (10..=30).contains(&failing.len()),
        "about half fail: {}",
        failing.len()
    );
    // The API shows each failure once its completion time has passed, with that time.
    let t = &failing[0];
    let data = s
        .wait_for(&format!("/api/v1/task/{}", t.task_id), MAX_KEY, |d| {
            d["status"] == "FAILURE"
        })
        .await;
    let updated = parse_ts(&data["updated_at"])
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (updated - t.completed_at).abs() < 1e-3,
        "{updated} vs {t:?}"
    );
    let after: OutcomeList =
        serde_json::from_slice(&s.get("/_sim/outcomes?provider=maxapi", None).await.body).unwrap();
    let again = after.tasks.iter().find(|o| o.task_id == t.task_id).unwrap();
    assert!(again.terminal);
    assert!(again.polls >= 1);
    assert_eq!(s.get("/_sim/outcomes", None).await.status, 400);
}

// ------------------------------------------------------------------ deliveries

struct Delivered {
    auth: Option<String>,
    body: Value,
}

type Inbox = Arc<Mutex<Vec<Delivered>>>;

/// A local HTTP receiver recording every POST.
async fn receiver() -> (String, Inbox) {
    use axum::http::HeaderMap;
    let inbox: Inbox = Arc::default();
    let sink = inbox.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(Delivered {
                    auth: headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(String::from),
                    body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                });
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, inbox)
}

async fn wait_deliveries(inbox: &Inbox, n: usize) -> Vec<Delivered> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        {
            let got = inbox.lock().unwrap();
            if got.len() >= n {
                return got
                    .iter()
                    .map(|d| Delivered {
                        auth: d.auth.clone(),
                        body: d.body.clone(),
                    })
                    .collect();
            }
        }
        assert!(Instant::now() < deadline, "no delivery");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn new_ids_are_registered_in_batches_with_the_token() {
    let (url, inbox) = receiver().await;
    let mut cfg = SimConfig::default();
    cfg.maxapi.register = Some(Register {
        url,
        token_env: None,
        token: Some("reg-token".into()),
        provider_name: Some("mx-prod".into()),
    });
    cfg.maxapi.backfill_tasks = 2;
    let s = start(cfg).await;
    let made: Vec<String> = (0..3)
        .map(|_| s.sim.create_task(SimProvider::Maxapi, None))
        .collect();
    s.sim.create_task(SimProvider::Apimall, None);
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ids.len() < 5 {
        assert!(Instant::now() < deadline, "registered {ids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        ids = inbox
            .lock()
            .unwrap()
            .iter()
            .flat_map(|d| {
                assert_eq!(d.auth.as_deref(), Some("Bearer reg-token"));
                assert_eq!(d.body["provider"], "mx-prod");
                d.body["task_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect::<Vec<_>>()
            })
            .collect();
    }
    assert_eq!(ids[2..], made[..]);
    let t = s.truth().await;
    assert_eq!(t.providers["maxapi"].registrations.delivered, 5);
    assert_eq!(t.providers["apimall"].registrations.delivered, 0);
}

#[tokio::test]
async fn apimall_callbacks_send_the_task_data_once_terminal() {
    let (url, inbox) = receiver().await;
    let mut cfg = SimConfig::default();
    cfg.apimall.callback_url = Some(url);
    cfg.apimall.workload.models = vec![model("nano-banana", ModelKind::Image, (100, 100))];
    let s = start(cfg).await;
    let id = s.sim.create_task(SimProvider::Apimall, None);
    let got = wait_deliveries(&inbox, 1).await;
    assert_eq!(got[0].body["task_id"], id.as_str());
    assert_eq!(got[0].body["status"], "completed");
    assert!(got[0].auth.is_none());
}

#[tokio::test]
async fn odd_requests_get_error_answers_not_crashes() {
    let s = start(SimConfig::default()).await;
    let url = |p: &str| format!("{}{p}", s.base);
    for auth in ["Bearer", "Basic abc", "bearer  ", "Bearer \u{7f}"] {
        let r = s
            .http
            .get(url("/api/v1/account/balances"))
            .header("authorization", auth)
            .send()
            .await;
        if let Ok(r) = r {
            assert_eq!(r.status().as_u16(), 401, "{auth:?}");
        }
    }
    let r = s
        .http
        .post(url("/api/v1/task/submit"))
        .bearer_auth(MAX_KEY)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(v["code"], 400);
    for path in [
        "/api/v1/task/%FF%FE",
        "/api/v1/images/..%2F..",
        "/api/v1/images/history?page=99999999999999999999",
        "/api/v1/images/history?page=184467440737095516&limit=50",
        "/nope",
    ] {
        let r = s.get(path, Some(MALL_KEY)).await;
        assert!(r.status >= 400 || r.status == 200, "{path}: {}", r.status);
    }
    // Still serving.
    assert_eq!(s.get("/_sim/truth", None).await.status, 200);
}

#[test]
fn simulator_without_a_runtime_still_answers_truth() {
    let sim = Simulator::new(SimConfig::demo());
    let t = sim.truth();
    assert_eq!(t.providers["maxapi"].totals.created, 30);
    assert_eq!(t.providers["apimall"].totals.created, 60);
    assert!(t.workload_done);
}
