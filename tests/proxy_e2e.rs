//! Proxy mode end to end: an application submits and polls tasks through the exporter's own
//! listener to the simulated providers. What the exporter counts is compared with the
//! simulator's ground truth and request log.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{Exporter, Scrape, compare_with_truth};
use genai_task_exporter::simulator::{
    FailureMix, ModelKind, ModelSim, ProviderSim, SimConfig, SimProvider, Simulator, Workload,
};
use genai_task_exporter::web::{Options as WebOptions, Web};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// The exporter's own key and the application's: the simulator accepts both.
const EXPORTER_KEY: &str = "exporter-key-3d1e";
const APP_KEY: &str = "app-key-77b0";
const WAIT: Duration = Duration::from_secs(30);

fn model(name: &str, kind: ModelKind, credits: f64, latency_ms: (u64, u64)) -> ModelSim {
    ModelSim {
        latency_min: Duration::from_millis(latency_ms.0),
        latency_max: Duration::from_millis(latency_ms.1),
        failure_ratio: 0.3,
        credits,
        failure_reasons: FailureMix {
            content_moderation: 1.0,
            invalid_parameters: 1.0,
            insufficient_credits: 0.0,
            unspecified: 1.0,
            other: 1.0,
        },
        ..ModelSim::named(name, kind)
    }
}

/// No workload and no backfill: every task is one the application submits. Videos take
/// longer than several of our polling intervals.
fn simulator() -> Simulator {
    let provider = |models: Vec<ModelSim>| ProviderSim {
        api_keys: vec![EXPORTER_KEY.into(), APP_KEY.into()],
        workload: Workload {
            tasks_per_second: 0.0,
            total_tasks: None,
            models,
        },
        ..ProviderSim::default()
    };
    Simulator::new(SimConfig {
        seed: 11,
        maxapi: provider(vec![model(
            "nano-banana",
            ModelKind::Image,
            0.0,
            (300, 1200),
        )]),
        apimall: provider(vec![
            model("nano-banana", ModelKind::Image, 8.0, (300, 1200)),
            model("veo3-fast", ModelKind::Video, 2.5, (5000, 7000)),
        ]),
        ..SimConfig::default()
    })
}

async fn serve_simulator(sim: &Simulator) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(sim.clone().serve(listener, std::future::pending()));
    addr
}

/// Both providers proxied; our own polls every 2 s (+-10 %) at first, growing to 4 s.
fn write_config(dir: &Path, sim: SocketAddr) -> std::path::PathBuf {
    write_config_with_state(dir, &dir.join("state"), sim)
}

fn write_config_with_state(dir: &Path, state: &Path, sim: SocketAddr) -> std::path::PathBuf {
    let key = dir.join("exporter.key");
    std::fs::write(&key, EXPORTER_KEY).unwrap();
    let key = key.display();
    let yaml = format!(
        "state: {{path: {state}}}\n\
         polling: {{interval: 2s, max_interval: 4s, timeout: 2s}}\n\
         providers:\n\
         \x20 - {{name: maxapi, type: maxapi, base_url: 'http://{sim}', token_file: {key}, proxy: {{enabled: true}}}}\n\
         \x20 - {{name: apimall, type: apimall, base_url: 'http://{sim}', token_file: {key}, proxy: {{enabled: true}}}}\n",
        state = state.display(),
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn client() -> reqwest::Client {
    genai_task_exporter::upstream::install_crypto_provider();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// What a provider answered: status, headers (without `date`) and body bytes.
#[derive(Debug, PartialEq)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

async fn send(request: reqwest::RequestBuilder) -> Answer {
    let response = request.send().await.unwrap();
    let mut headers: Vec<(String, String)> = response
        .headers()
        .iter()
        .filter(|(name, _)| name.as_str() != "date")
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    headers.sort();
    Answer {
        status: response.status().as_u16(),
        headers,
        body: response.bytes().await.unwrap().to_vec(),
    }
}

/// A task the application submitted, and how often it asked for it.
struct Submitted {
    provider: &'static str,
    id: String,
    path: String,
    polls: u64,
    done: bool,
}

/// Submits through the proxy and asks for the new task once, as applications do.
async fn submit(
    http: &reqwest::Client,
    proxy: &str,
    provider: &'static str,
    path: &str,
    body: Value,
) -> Submitted {
    let answer = send(
        http.post(format!("{proxy}/proxy/{provider}{path}"))
            .bearer_auth(APP_KEY)
            .json(&body),
    )
    .await;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let json: Value = serde_json::from_slice(&answer.body).unwrap();
    let (id, path) = if provider == "maxapi" {
        let id = json["data"]["taskId"].as_str().unwrap().to_string();
        let path = format!("/api/v1/task/{id}");
        (id, path)
    } else {
        let id = json["data"]["task_id"].as_str().unwrap().to_string();
        let kind = path.split('/').nth(3).unwrap();
        (id.clone(), format!("/api/v1/{kind}/{id}"))
    };
    let mut task = Submitted {
        provider,
        id,
        path,
        polls: 0,
        done: false,
    };
    poll(http, proxy, &mut task).await;
    task
}

/// One get-task request of the application.
async fn poll(http: &reqwest::Client, proxy: &str, task: &mut Submitted) {
    let url = format!("{proxy}/proxy/{}{}", task.provider, task.path);
    let answer = send(http.get(url).bearer_auth(APP_KEY)).await;
    task.polls += 1;
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let json: Value = serde_json::from_slice(&answer.body).unwrap();
    task.done = is_terminal(task.provider, &json);
}

fn is_terminal(provider: &str, answer: &Value) -> bool {
    let status = answer["data"]["status"].as_str().unwrap_or("");
    match provider {
        "maxapi" => matches!(status, "SUCCESS" | "FAILURE" | "TIMEOUT" | "CANCELLED"),
        _ => matches!(status, "completed" | "failed"),
    }
}

fn requests_of(truth: &BTreeMap<String, u64>, key: &str) -> f64 {
    truth.get(key).copied().unwrap_or(0) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_through_the_proxy_is_counted_once_and_not_polled_twice() {
    let sim = simulator();
    let sim_addr = serve_simulator(&sim).await;
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::start_from_file(&write_config(dir.path(), sim_addr)).await;
    let proxy = format!("http://{}", exporter.addr);
    let http = client();

    // Submissions: maxapi tasks, apimall images and videos, and one maxapi task the
    // application never polls (the exporter's own polls must find its outcome).
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let body = json!({"model": "nano-banana", "input": {"prompt": "a dog"}});
        tasks.push(submit(&http, &proxy, "maxapi", "/api/v1/task/submit", body).await);
        let body = json!({"model": "nano-banana", "prompt": "a cat"});
        tasks.push(submit(&http, &proxy, "apimall", "/api/v1/images/generate", body).await);
    }
    for _ in 0..4 {
        let body = json!({"model": "veo3-fast", "prompt": "a wave"});
        tasks.push(submit(&http, &proxy, "apimall", "/api/v1/videos/generate", body).await);
    }
    let body = json!({"model": "nano-banana", "input": {"prompt": "left alone"}});
    let abandoned = submit(&http, &proxy, "maxapi", "/api/v1/task/submit", body).await;

    // Rejected submissions, by reason.
    let rejected = send(
        http.post(format!("{proxy}/proxy/maxapi/api/v1/task/submit"))
            .bearer_auth(APP_KEY)
            .body("not json"),
    )
    .await;
    assert_eq!(rejected.status, 200, "maxapi rejects in its envelope");
    let rejected = send(
        http.post(format!("{proxy}/proxy/apimall/api/v1/videos/generate"))
            .bearer_auth(APP_KEY)
            .json(&json!({"model": "nano-banana"})),
    )
    .await;
    assert_eq!(rejected.status, 400);

    // The application polls every 100 ms until each of its tasks is finished.
    while tasks.iter().any(|t| !t.done) {
        for task in tasks.iter_mut().filter(|t| !t.done) {
            poll(&http, &proxy, task).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every task finished and counted once, the abandoned one through our own polls.
    let scrape = exporter
        .wait_for(WAIT, |s| {
            s.sum("genai_task_completions_total", &[]) == (tasks.len() + 1) as f64
        })
        .await;
    let truth = sim.truth();
    let mismatches = compare_with_truth(&truth, &scrape);
    assert!(mismatches.is_empty(), "{mismatches:?}");
    for (provider, created) in [("maxapi", 9.0), ("apimall", 12.0)] {
        let labels = [("provider", provider), ("source", "proxy")];
        assert_eq!(
            scrape.get("genai_task_discovered_total", &labels),
            Some(created),
            "{provider}"
        );
        assert_eq!(
            scrape.sum("genai_task_discovered_total", &[("provider", provider)]),
            created,
            "{provider}: no other source"
        );
    }
    // Every outcome but the abandoned task's was learnt from the application's answers.
    assert_eq!(
        scrape.sum(
            "genai_task_detection_delay_seconds_count",
            &[("via", "proxy")]
        ),
        tasks.len() as f64
    );
    let rejections = |provider: &str| {
        scrape.get(
            "genai_proxy_submit_rejections_total",
            &[("provider", provider), ("reason", "invalid_parameters")],
        )
    };
    assert_eq!(rejections("maxapi"), Some(1.0));
    assert_eq!(rejections("apimall"), Some(1.0));

    // Our own polls: none for the tasks the application polled (each was asked exactly as
    // often as the application asked), and the abandoned task's alone.
    let mut polls = sim.polls(Some(SimProvider::Maxapi));
    polls
        .tasks
        .extend(sim.polls(Some(SimProvider::Apimall)).tasks);
    let polls_of = |id: &str| {
        polls
            .tasks
            .iter()
            .find(|t| t.task_id == id)
            .map_or(0, |t| t.polls)
    };
    for task in &tasks {
        assert_eq!(polls_of(&task.id), task.polls, "{}", task.id);
    }
    let ours = polls_of(&abandoned.id) - abandoned.polls;
    assert!(
        (1..=2).contains(&ours),
        "abandoned task polled {ours} times"
    );
    assert_eq!(
        scrape.sum("genai_upstream_requests_total", &[("endpoint", "task")]),
        ours as f64
    );

    // Answers through the proxy are the provider's, byte for byte: a finished task, an
    // unknown one, a refused key, a rejected submission.
    let finished = tasks[0].path.clone();
    let unknown = "/api/v1/task/00000000-0000-4000-8000-00000000dead".to_string();
    let submit_path = "/api/v1/task/submit".to_string();
    // Direct calls by "endpoint:{submit,task}" and "code:{status}": the simulator logs them too.
    let mut direct_calls: BTreeMap<String, f64> = BTreeMap::new();
    for (path, key, post) in [
        (&finished, APP_KEY, false),
        (&unknown, APP_KEY, false),
        (&submit_path, "wrong-key", true),
        (&submit_path, APP_KEY, true),
    ] {
        let request = |base: String| {
            let url = format!("{base}{path}");
            match post {
                true => http.post(url).body(r#"{"model": "no-such-model"}"#),
                false => http.get(url),
            }
            .bearer_auth(key)
        };
        let direct = send(request(format!("http://{sim_addr}"))).await;
        let proxied = send(request(format!("{proxy}/proxy/maxapi"))).await;
        assert_eq!(proxied, direct, "{path} with {key}");
        let endpoint = if post { "submit" } else { "task" };
        *direct_calls
            .entry(format!("endpoint:{endpoint}"))
            .or_default() += 1.0;
        *direct_calls
            .entry(format!("code:{}", direct.status))
            .or_default() += 1.0;
    }

    // The proxy counted exactly what the upstream served it: the simulator's log is ours,
    // the application's (through the proxy) and the direct calls above.
    let scrape = exporter.scrape().await;
    let truth = sim.truth();
    for provider in ["maxapi", "apimall"] {
        let served = &truth.providers[provider];
        let by = |endpoint: &'static str| [("provider", provider), ("endpoint", endpoint)];
        for endpoint in ["submit", "task"] {
            let direct = if provider == "maxapi" {
                direct_calls
                    .get(&format!("endpoint:{endpoint}"))
                    .copied()
                    .unwrap_or(0.0)
            } else {
                0.0
            };
            assert_eq!(
                scrape.sum("genai_proxy_requests_total", &by(endpoint))
                    + scrape.sum("genai_upstream_requests_total", &by(endpoint))
                    + direct,
                requests_of(&served.requests, endpoint),
                "{provider} {endpoint}"
            );
            assert_eq!(
                scrape.sum("genai_proxy_request_duration_seconds_count", &by(endpoint)),
                scrape.sum("genai_proxy_requests_total", &by(endpoint)),
            );
        }
        for (code, count) in &served.responses {
            let labels = [("provider", provider), ("code", code.as_str())];
            let direct = if provider == "maxapi" {
                direct_calls
                    .get(&format!("code:{code}"))
                    .copied()
                    .unwrap_or(0.0)
            } else {
                0.0
            };
            assert_eq!(
                scrape.sum("genai_proxy_requests_total", &labels)
                    + scrape.sum("genai_upstream_requests_total", &labels)
                    + direct,
                *count as f64,
                "{provider} answers {code}"
            );
        }
    }
    let total_proxied = scrape.sum("genai_proxy_requests_total", &[]);
    // 21 submissions, 2 rejected ones, 4 compared with direct calls, and the polls.
    let app_requests = tasks.iter().map(|t| t.polls).sum::<u64>() + abandoned.polls + 21 + 2 + 4;
    assert_eq!(total_proxied, app_requests as f64);
    assert_scrape_has_no_secret(&scrape);
    exporter.stop().await;
}

fn assert_scrape_has_no_secret(scrape: &Scrape) {
    for secret in [APP_KEY, EXPORTER_KEY] {
        assert!(!scrape.text.contains(secret));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_guards_metrics_but_not_the_proxy() {
    let sim = simulator();
    let sim_addr = serve_simulator(&sim).await;
    let dir = tempfile::tempdir().unwrap();
    let web_path = dir.path().join("web.yml");
    let hash = bcrypt::hash("scrape", 4).unwrap();
    std::fs::write(
        &web_path,
        format!(
            "basic_auth_users:\n  prom: {hash}\nhttp_server_config:\n  headers:\n    X-Frame-Options: deny\n"
        ),
    )
    .unwrap();
    let web: Arc<Web> = Web::load(&web_path, WebOptions::default()).unwrap();
    let exporter =
        Exporter::start_from_file_with_web(&write_config(dir.path(), sim_addr), Some(web)).await;
    let http = client();

    let metrics = send(http.get(exporter.url("/metrics"))).await;
    assert_eq!(metrics.status, 401);
    let metrics = send(
        http.get(exporter.url("/metrics"))
            .basic_auth("prom", Some("scrape")),
    )
    .await;
    assert_eq!(metrics.status, 200);

    // The application's own key is the credential; the answer is the provider's, without
    // the headers the web configuration adds to the exporter's pages.
    let body = json!({"model": "nano-banana", "input": {"prompt": "a dog"}});
    let submitted = send(
        http.post(exporter.url("/proxy/maxapi/api/v1/task/submit"))
            .bearer_auth(APP_KEY)
            .json(&body),
    )
    .await;
    assert_eq!(submitted.status, 200);
    assert!(
        submitted
            .headers
            .iter()
            .all(|(name, _)| name != "x-frame-options" && name != "www-authenticate"),
        "{:?}",
        submitted.headers
    );
    let refused = send(
        http.post(exporter.url("/proxy/maxapi/api/v1/task/submit"))
            .bearer_auth("wrong-key")
            .json(&body),
    )
    .await;
    let direct = send(
        http.post(format!("http://{sim_addr}/api/v1/task/submit"))
            .bearer_auth("wrong-key")
            .json(&body),
    )
    .await;
    assert_eq!(refused, direct, "the provider's 401, not ours");
    // Basic auth credentials on a proxied request are the application's business: they go
    // upstream as they are, and the upstream refuses them.
    let basic = send(
        http.get(exporter.url("/proxy/maxapi/api/v1/task/x"))
            .basic_auth("prom", Some("scrape")),
    )
    .await;
    assert_eq!(basic.status, 401);
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_changes_and_removes_proxied_providers() {
    let sim = simulator();
    let sim_addr = serve_simulator(&sim).await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), sim_addr);
    let enabled = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        enabled.replace("proxy: {enabled: true}", "proxy: {enabled: false}"),
    )
    .unwrap();
    let exporter = Exporter::start_from_file(&path).await;
    let http = client();
    let body = json!({"model": "nano-banana", "input": {"prompt": "a dog"}});
    let submit = || {
        http.post(exporter.url("/proxy/maxapi/api/v1/task/submit"))
            .bearer_auth(APP_KEY)
            .json(&body)
    };
    assert_eq!(send(submit()).await.status, 404, "not proxied yet");

    std::fs::write(&path, &enabled).unwrap();
    exporter.app.reload().await.unwrap();
    assert_eq!(send(submit()).await.status, 200);

    // A smaller body limit takes effect at once.
    std::fs::write(
        &path,
        enabled.replace(
            "proxy: {enabled: true}",
            "proxy: {enabled: true, max_request_body_bytes: 16}",
        ),
    )
    .unwrap();
    exporter.app.reload().await.unwrap();
    assert_eq!(send(submit()).await.status, 413);

    std::fs::write(
        &path,
        enabled.replace("proxy: {enabled: true}", "proxy: {enabled: false}"),
    )
    .unwrap();
    exporter.app.reload().await.unwrap();
    assert_eq!(send(submit()).await.status, 404, "no longer proxied");
    let scrape = exporter.scrape().await;
    assert_eq!(
        scrape.get(
            "genai_proxy_requests_total",
            &[
                ("provider", "maxapi"),
                ("endpoint", "submit"),
                ("code", "200")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        scrape.get(
            "genai_proxy_submit_rejections_total",
            &[("provider", "maxapi"), ("reason", "body_too_large")]
        ),
        Some(1.0)
    );
    exporter.stop().await;
}

/// A tmpfs of `size` mounted on a new directory (the tests run as root); unmounted when
/// dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(status.success(), "mount -t tmpfs (the tests run as root)");
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// Fills the filesystem of `dir` until a write fails with ENOSPC; returns the ballast.
fn fill(dir: &Path) -> std::path::PathBuf {
    use std::io::Write;
    let ballast = dir.join("ballast");
    let mut file = std::fs::File::create(&ballast).unwrap();
    let chunk = vec![0xA5u8; 64 * 1024];
    while file.write(&chunk).is_ok_and(|n| n > 0) {}
    while file.write(&[0]).is_ok_and(|n| n == 1) {}
    let _ = file.sync_all();
    ballast
}

/// The exporter's store cannot commit (a full disk): the application's answers stay the
/// provider's, and what the proxy learnt meanwhile is counted once the disk has room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_under_the_exporter_changes_nothing_for_the_application() {
    let sim = simulator();
    let sim_addr = serve_simulator(&sim).await;
    let dir = tempfile::tempdir().unwrap();
    let tmpfs = Tmpfs::mount("6m");
    let state = tmpfs.dir.path().join("state");
    let exporter =
        Exporter::start_from_file(&write_config_with_state(dir.path(), &state, sim_addr)).await;
    let proxy = format!("http://{}", exporter.addr);
    let http = client();
    let image = || json!({"model": "nano-banana", "prompt": "a cat"});

    let mut tasks = Vec::new();
    tasks.push(submit(&http, &proxy, "apimall", "/api/v1/images/generate", image()).await);
    let ballast = fill(tmpfs.dir.path());
    // Keep submitting and polling until the store is seen down, then a few more.
    let deadline = std::time::Instant::now() + WAIT;
    let mut after_down = 0;
    while after_down < 6 || tasks.iter().any(|t| !t.done) {
        if after_down < 6 {
            tasks.push(submit(&http, &proxy, "apimall", "/api/v1/images/generate", image()).await);
        }
        for task in tasks.iter_mut().filter(|t| !t.done) {
            poll(&http, &proxy, task).await;
        }
        let down = exporter.scrape().await.get("genai_exporter_store_up", &[]) == Some(0.0);
        if down {
            after_down += 1;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the store never went down on a full disk"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let finished = tasks[0].path.clone();
    let direct = send(
        http.get(format!("http://{sim_addr}{finished}"))
            .bearer_auth(APP_KEY),
    )
    .await;
    let proxied = send(
        http.get(format!("{proxy}/proxy/apimall{finished}"))
            .bearer_auth(APP_KEY),
    )
    .await;
    // apimall stamps each answer with its own request id; the rest is the same.
    let strip = |answer: &Answer| {
        let mut json: Value = serde_json::from_slice(&answer.body).unwrap();
        json["request_id"] = Value::Null;
        (answer.status, json)
    };
    assert_eq!(strip(&proxied), strip(&direct));
    assert_eq!(
        exporter.scrape().await.get("genai_exporter_store_up", &[]),
        Some(0.0),
        "still down while the application was served"
    );

    std::fs::remove_file(ballast).unwrap();
    let total = tasks.len() as f64;
    let scrape = exporter
        .wait_for(WAIT, |s| {
            s.sum("genai_task_completions_total", &[]) == total
                && s.get("genai_exporter_store_up", &[]) == Some(1.0)
        })
        .await;
    let mismatches = compare_with_truth(&sim.truth(), &scrape);
    assert!(mismatches.is_empty(), "{mismatches:?}");
    assert_eq!(
        scrape.get(
            "genai_task_discovered_total",
            &[("provider", "apimall"), ("source", "proxy")]
        ),
        Some(total)
    );
    exporter.stop().await;
}
