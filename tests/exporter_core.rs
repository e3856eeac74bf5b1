//! End-to-end behaviour of the exporter core: a real listener on 127.0.0.1, a scripted fake
//! upstream, and assertions on parsed `/metrics` values.

mod common;

use std::time::{Duration, Instant};

use common::{Exporter, FakeUpstream, Reply, Scrape, ago, maxapi_task, promtool_check_metrics};
use serde_json::{Value, json};

const MX_KEY: &str = "mx-test-key-5f0c";
const AM_KEY: &str = "am-test-key-9a1e";

fn apimall_task(id: &str, status: &str, error: Option<&str>, used: f64, refunded: f64) -> Value {
    json!({
        "success": true,
        "data": {
            "task_id": id,
            "model": "nano-banana",
            "status": status,
            "output": {"resultUrls": []},
            "error_message": error,
            "credits_used": used,
            "credits_refunded": refunded,
            "created_at": ago(70),
            "updated_at": ago(1),
            "completed_at": if status == "completed" || status == "failed" { json!(ago(4)) } else { Value::Null }
        },
        "request_id": "req_test"
    })
}

fn maxapi_config(base_url: &str, tasks: &[&str], extra_polling: &str) -> String {
    format!(
        "polling: {{interval: 100ms, max_interval: 200ms, timeout: 1s, requests_per_second: 500, max_concurrency: 8{extra_polling}}}\n\
         providers:\n  - name: mx\n    type: maxapi\n    base_url: {base_url}\n    token_env: MX_KEY\n    tasks: {tasks:?}\n"
    )
}

async fn start_maxapi(fake: &FakeUpstream, tasks: &[&str], dir: &tempfile::TempDir) -> Exporter {
    Exporter::start(
        &maxapi_config(&fake.url(), tasks, ""),
        &[("MX_KEY", MX_KEY)],
        dir.path(),
    )
    .await
}

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_maxapi_status_and_failure_reason_is_counted() {
    let fake = FakeUpstream::start().await;
    let cases: Vec<(&str, &str, Value)> = vec![
        ("t-success", "SUCCESS", Value::Null),
        ("t-moderation", "FAILURE", json!("CONTENT_MODERATION")),
        ("t-invalid", "FAILURE", json!("INVALID_PARAMETERS")),
        ("t-points", "FAILURE", json!("INSUFFICIENT_POINTS")),
        ("t-null", "FAILURE", Value::Null),
        ("t-new-reason", "FAILURE", json!("GPU_ON_FIRE")),
        ("t-timeout", "TIMEOUT", Value::Null),
        ("t-cancelled", "CANCELLED", Value::Null),
        ("t-pending", "PENDING", Value::Null),
        ("t-processing", "PROCESSING", Value::Null),
        ("t-submitted", "SUBMITTED", Value::Null),
        ("t-paused", "PAUSED", Value::Null),
    ];
    for (id, status, reason) in &cases {
        fake.script(
            &format!("/api/v1/task/{id}"),
            vec![Reply::json(200, maxapi_task(id, status, reason.clone()))],
        );
    }
    // failure_reason absent altogether (the docs' success examples omit it).
    let mut absent = maxapi_task("t-absent", "FAILURE", Value::Null);
    absent["data"]
        .as_object_mut()
        .unwrap()
        .remove("failure_reason");
    fake.script("/api/v1/task/t-absent", vec![Reply::json(200, absent)]);

    let ids: Vec<&str> = cases.iter().map(|c| c.0).chain(["t-absent"]).collect();
    let dir = tempfile::tempdir().unwrap();
    let exporter = start_maxapi(&fake, &ids, &dir).await;
    let m = exporter
        .wait_for(WAIT, |m| m.sum("genai_task_completions_total", &[]) >= 9.0)
        .await;

    let c = |status| {
        m.get(
            "genai_task_completions_total",
            &[
                ("provider", "mx"),
                ("model", "nano-banana"),
                ("status", status),
            ],
        )
    };
    assert_eq!(c("succeeded"), Some(1.0));
    assert_eq!(c("failed"), Some(6.0));
    assert_eq!(c("timed_out"), Some(1.0));
    assert_eq!(c("cancelled"), Some(1.0));
    let f = |reason| {
        m.get(
            "genai_task_failures_total",
            &[("provider", "mx"), ("reason", reason)],
        )
    };
    assert_eq!(f("content_moderation"), Some(1.0));
    assert_eq!(f("invalid_parameters"), Some(1.0));
    assert_eq!(f("insufficient_credits"), Some(1.0));
    assert_eq!(
        f("unspecified"),
        Some(2.0),
        "null and absent failure_reason"
    );
    assert_eq!(f("other"), Some(1.0));
    assert_eq!(f("timeout"), Some(1.0));
    assert_eq!(f("cancelled"), Some(1.0));
    assert_eq!(
        m.sum("genai_task_failures_total", &[]),
        8.0,
        "failed, timed out and cancelled; nothing for successes"
    );

    let g = |status| m.get("genai_tasks", &[("provider", "mx"), ("status", status)]);
    assert_eq!(g("pending"), Some(1.0));
    assert_eq!(g("running"), Some(2.0), "PROCESSING and SUBMITTED");
    assert_eq!(g("unknown"), Some(1.0), "an undocumented status");
    assert_eq!(g("succeeded"), Some(1.0));
    assert_eq!(g("failed"), Some(6.0));

    // Latency of every terminal task: updated_at - created_at = 18 s.
    let latency = &[("provider", "mx"), ("status", "succeeded")];
    assert_eq!(
        m.get("genai_task_completion_latency_seconds_count", latency),
        Some(1.0)
    );
    assert_eq!(
        m.get("genai_task_completion_latency_seconds_sum", latency),
        Some(18.0)
    );
    assert_eq!(
        m.get(
            "genai_task_completion_latency_seconds_bucket",
            &[("provider", "mx"), ("status", "succeeded"), ("le", "20")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "genai_task_completion_latency_seconds_bucket",
            &[("provider", "mx"), ("status", "succeeded"), ("le", "10")]
        ),
        Some(0.0)
    );
    assert_eq!(
        m.get(
            "genai_task_discovered_total",
            &[("provider", "mx"), ("source", "static")]
        ),
        Some(13.0)
    );
    assert_eq!(
        m.get("genai_exporter_provider_up", &[("provider", "mx")]),
        Some(1.0)
    );
    assert!(
        m.get(
            "genai_exporter_last_poll_success_timestamp_seconds",
            &[("provider", "mx")]
        )
        .unwrap()
            > 1.7e9
    );
    assert_eq!(
        m.types
            .get("genai_task_completion_latency_seconds")
            .map(String::as_str),
        Some("histogram")
    );

    assert_eq!(
        promtool_check_metrics(&m.text),
        "",
        "promtool check metrics on a live scrape"
    );
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apimall_credits_and_refunds_are_counted_once() {
    let fake = FakeUpstream::start().await;
    fake.script(
        "/api/v1/images/img_done",
        vec![
            Reply::json(200, apimall_task("img_done", "processing", None, 8.0, 0.0)),
            Reply::json(200, apimall_task("img_done", "completed", None, 8.0, 0.0)),
        ],
    );
    fake.script(
        "/api/v1/images/img_blocked",
        vec![
            Reply::json(200, apimall_task("img_blocked", "pending", None, 8.0, 0.0)),
            Reply::json(
                200,
                apimall_task(
                    "img_blocked",
                    "failed",
                    Some("Content blocked by safety policy"),
                    8.0,
                    8.0,
                ),
            ),
        ],
    );
    fake.script(
        "/api/v1/images/img_half",
        vec![Reply::json(
            200,
            apimall_task(
                "img_half",
                "failed",
                Some("upstream model crashed"),
                2.5,
                1.25,
            ),
        )],
    );
    let yaml = format!(
        "polling: {{interval: 100ms, max_interval: 100ms, requests_per_second: 500}}\n\
         providers:\n  - name: am\n    type: apimall\n    base_url: {}\n    token_env: AM_KEY\n    tasks: [img_done, img_blocked, img_half]\n",
        fake.url()
    );
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::start(&yaml, &[("AM_KEY", AM_KEY)], dir.path()).await;
    exporter
        .wait_for(WAIT, |m| m.sum("genai_task_completions_total", &[]) >= 3.0)
        .await;
    // Terminal tasks are not polled again (img_half, failed with credits not all refunded,
    // only for late refunds, and its same answer adds nothing): a canary polled three more
    // times shows the poller went round while they would have been due.
    fake.script(
        "/api/v1/images/img_canary",
        vec![Reply::json(
            200,
            apimall_task("img_canary", "processing", None, 0.0, 0.0),
        )],
    );
    exporter.track("am", "img_canary");
    fake.wait_for_more_hits("/api/v1/images/img_canary", 3, WAIT)
        .await;
    exporter.untrack("am", "img_canary");
    let m = exporter.scrape().await;
    let labels = &[("provider", "am"), ("model", "nano-banana")];
    assert_eq!(m.get("genai_task_credits_used_total", labels), Some(18.5));
    assert_eq!(
        m.get("genai_task_credits_refunded_total", labels),
        Some(9.25)
    );
    assert_eq!(
        m.get(
            "genai_task_completions_total",
            &[("provider", "am"), ("status", "succeeded")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "genai_task_completions_total",
            &[("provider", "am"), ("status", "failed")]
        ),
        Some(2.0)
    );
    assert_eq!(
        m.get(
            "genai_task_failures_total",
            &[("provider", "am"), ("reason", "content_moderation")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "genai_task_failures_total",
            &[("provider", "am"), ("reason", "other")]
        ),
        Some(1.0)
    );
    // completed_at - created_at = 66 s.
    assert_eq!(
        m.get(
            "genai_task_completion_latency_seconds_sum",
            &[("provider", "am"), ("status", "succeeded")]
        ),
        Some(66.0)
    );
    assert_eq!(
        fake.hits("/api/v1/images/img_done").len(),
        2,
        "not polled after completion"
    );
    // Failed with credits not all refunded: checked for a late refund, at most three times.
    let half = fake.hits("/api/v1/images/img_half").len();
    assert!((1..=4).contains(&half), "img_half polled {half} times");
    assert!(
        fake.authorizations()
            .iter()
            .all(|a| a.as_deref() == Some(&format!("Bearer {AM_KEY}")))
    );
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_moving_to_success_is_counted_once_and_then_left_alone() {
    let fake = FakeUpstream::start().await;
    let id = "9db7d1ed-d1e5-4d11-9f3a-61f653b905ad";
    let path = format!("/api/v1/task/{id}");
    fake.script(
        &path,
        vec![
            Reply::json(200, maxapi_task(id, "PENDING", Value::Null)),
            Reply::json(200, maxapi_task(id, "PROCESSING", Value::Null)),
            Reply::json(200, maxapi_task(id, "SUBMITTED", Value::Null)),
            Reply::json(200, maxapi_task(id, "SUCCESS", Value::Null)),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let exporter = start_maxapi(&fake, &[id], &dir).await;
    let first = exporter
        .wait_for(WAIT, |m| {
            m.get("genai_tasks", &[("status", "pending")]) == Some(1.0)
        })
        .await;
    assert_eq!(first.sum("genai_task_completions_total", &[]), 0.0);
    assert!(
        first
            .get("genai_task_oldest_in_flight_seconds", &[("provider", "mx")])
            .unwrap()
            > 0.0
    );
    exporter
        .wait_for(WAIT, |m| m.sum("genai_task_completions_total", &[]) == 1.0)
        .await;
    // A canary polled three more times shows the poller went round after SUCCESS.
    fake.script_maxapi_task("canary", "PROCESSING");
    exporter.track("mx", "canary");
    fake.wait_for_more_hits("/api/v1/task/canary", 3, WAIT)
        .await;
    exporter.untrack("mx", "canary");
    let m = exporter.scrape().await;
    assert_eq!(
        m.get("genai_task_completions_total", &[("status", "succeeded")]),
        Some(1.0)
    );
    assert_eq!(
        m.get("genai_task_completion_latency_seconds_count", &[]),
        Some(1.0)
    );
    assert_eq!(m.get("genai_tasks", &[("status", "succeeded")]), Some(1.0));
    assert_eq!(m.get("genai_tasks", &[("status", "pending")]), None);
    assert_eq!(
        m.get("genai_task_oldest_in_flight_seconds", &[("provider", "mx")]),
        Some(0.0)
    );
    assert_eq!(fake.hits(&path).len(), 4, "four polls, none after SUCCESS");
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_are_counted_by_code_and_kind() {
    let fake = FakeUpstream::start().await;
    // 404 without a body, 500 then success, a malformed body, a 10 MiB body, a timeout.
    fake.script("/api/v1/task/gone", vec![Reply::raw(404, "")]);
    fake.script(
        "/api/v1/task/flaky",
        vec![
            Reply::raw(500, "<html>oops</html>"),
            Reply::json(200, maxapi_task("flaky", "SUCCESS", Value::Null)),
        ],
    );
    fake.script(
        "/api/v1/task/garbled",
        vec![Reply::raw(200, "{\"code\": 0, \"data\": {")],
    );
    fake.script(
        "/api/v1/task/huge",
        vec![Reply::raw(200, vec![b' '; 10 * 1024 * 1024])],
    );
    fake.script(
        "/api/v1/task/slow",
        vec![
            Reply::json(200, maxapi_task("slow", "SUCCESS", Value::Null))
                .delayed(Duration::from_secs(3)),
        ],
    );
    fake.script(
        "/api/v1/task/refused",
        vec![Reply::json(
            200,
            json!({"code": 400, "msg": "内容审核失败"}),
        )],
    );
    let dir = tempfile::tempdir().unwrap();
    let yaml = maxapi_config(
        &fake.url(),
        &["gone", "flaky", "garbled", "huge", "slow", "refused"],
        "",
    )
    .replace("timeout: 1s", "timeout: 300ms");
    let exporter = Exporter::start(&yaml, &[("MX_KEY", MX_KEY)], dir.path()).await;
    let req = |code: &'static str| [("provider", "mx"), ("endpoint", "task"), ("code", code)];
    let m = exporter
        .wait_for(WAIT, |m| {
            m.get("genai_upstream_requests_total", &req("timeout"))
                .unwrap_or(0.0)
                >= 1.0
                && m.get("genai_upstream_requests_total", &req("404"))
                    .unwrap_or(0.0)
                    >= 1.0
                && m.get("genai_upstream_requests_total", &req("500"))
                    .unwrap_or(0.0)
                    >= 1.0
                && m.sum(
                    "genai_upstream_errors_total",
                    &[("error", "invalid_response")],
                ) >= 2.0
                && m.sum("genai_task_completions_total", &[]) >= 1.0
        })
        .await;
    assert_eq!(
        m.get(
            "genai_upstream_errors_total",
            &[("provider", "mx"), ("endpoint", "task"), ("error", "400")]
        )
        .map(|v| v >= 1.0),
        Some(true)
    );
    assert_eq!(
        m.get("genai_task_completions_total", &[("status", "succeeded")]),
        Some(1.0),
        "flaky succeeded after its 500"
    );
    assert!(
        m.get(
            "genai_upstream_request_duration_seconds_count",
            &[("provider", "mx"), ("endpoint", "task")]
        )
        .unwrap()
            >= 6.0
    );
    // Failing tasks are retried, not dropped or counted.
    assert_eq!(m.get("genai_tasks", &[("status", "unknown")]), Some(5.0));
    // The exporter keeps serving.
    let health = reqwest::get(exporter.url("/-/healthy")).await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(promtool_check_metrics(&m.text), "");
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_broken_task_does_not_mark_the_provider_down() {
    let fake = FakeUpstream::start().await;
    fake.script_maxapi_task("fine", "SUCCESS");
    fake.script(
        "/api/v1/task/garbled",
        vec![Reply::raw(200, "{\"code\": 0, \"data\": {")],
    );
    let dir = tempfile::tempdir().unwrap();
    let exporter = start_maxapi(&fake, &["fine", "garbled"], &dir).await;
    // "fine" answers once and is done; from then on only the broken task is asked.
    exporter
        .wait_for(WAIT, |m| {
            m.sum("genai_task_completions_total", &[]) == 1.0
                && m.get("genai_exporter_provider_up", &[("provider", "mx")]) == Some(1.0)
        })
        .await;
    // Far more undecodable answers in a row than it takes 5xx answers to mark it down.
    fake.wait_for_more_hits("/api/v1/task/garbled", 5, WAIT)
        .await;
    let m = exporter.scrape().await;
    assert!(
        m.get(
            "genai_upstream_errors_total",
            &[
                ("provider", "mx"),
                ("endpoint", "task"),
                ("error", "invalid_response")
            ]
        )
        .unwrap()
            >= 5.0
    );
    assert_eq!(
        m.get("genai_exporter_provider_up", &[("provider", "mx")]),
        Some(1.0)
    );
    // Provider-level failures still count: the same task answers 500 now.
    fake.script(
        "/api/v1/task/garbled",
        vec![Reply::raw(500, "<html>down</html>")],
    );
    exporter
        .wait_for(WAIT, |m| {
            m.get("genai_exporter_provider_up", &[("provider", "mx")]) == Some(0.0)
        })
        .await;
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_marks_the_provider_down() {
    let fake = FakeUpstream::start().await;
    fake.script(
        "/api/v1/task/t1",
        vec![Reply::json(
            401,
            json!({"code": 401, "msg": "unauthorized"}),
        )],
    );
    let dir = tempfile::tempdir().unwrap();
    let exporter = start_maxapi(&fake, &["t1"], &dir).await;
    let m = exporter
        .wait_for(WAIT, |m| {
            // provider_up is also 0 before the first answer: wait for the 401 itself.
            m.get("genai_exporter_provider_up", &[("provider", "mx")]) == Some(0.0)
                && m.get("genai_upstream_requests_total", &[("code", "401")])
                    .is_some()
        })
        .await;
    assert!(
        m.get("genai_upstream_requests_total", &[("code", "401")])
            .unwrap()
            >= 1.0
    );
    assert!(
        m.get("genai_upstream_errors_total", &[("error", "401")])
            .unwrap()
            >= 1.0
    );
    let landing = reqwest::get(exporter.url("/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(landing.contains("data-provider=\"mx\""), "{landing}");
    assert!(landing.contains("down"), "{landing}");
    assert!(!landing.contains(MX_KEY) && !m.text.contains(MX_KEY));
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_answers_pause_the_provider_for_retry_after() {
    let fake = FakeUpstream::start().await;
    let path = "/api/v1/task/t1";
    fake.script(
        path,
        vec![
            Reply::json(429, json!({"code": 429, "msg": "slow down"})).header("retry-after", "2"),
            Reply::json(200, maxapi_task("t1", "SUCCESS", Value::Null)),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let exporter = start_maxapi(&fake, &["t1"], &dir).await;
    let paused = exporter
        .wait_for(WAIT, |m| {
            m.get("genai_upstream_requests_total", &[("code", "429")]) == Some(1.0)
        })
        .await;
    let backoff = paused
        .get("genai_upstream_backoff_seconds", &[("provider", "mx")])
        .unwrap();
    assert!(backoff > 0.5 && backoff <= 2.0, "backoff gauge {backoff}");
    exporter
        .wait_for(WAIT, |m| m.sum("genai_task_completions_total", &[]) == 1.0)
        .await;
    let hits = fake.hits(path);
    assert_eq!(hits.len(), 2);
    let gap = hits[1] - hits[0];
    assert!(
        gap >= Duration::from_millis(1900),
        "second request only {gap:?} after the 429"
    );
    let m = exporter.scrape().await;
    assert_eq!(
        m.get("genai_upstream_backoff_seconds", &[("provider", "mx")]),
        Some(0.0)
    );
    assert_eq!(
        m.get("genai_exporter_provider_up", &[("provider", "mx")]),
        Some(1.0),
        "429 is not down"
    );
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_stay_within_requests_per_second() {
    let fake = FakeUpstream::start().await;
    let ids: Vec<String> = (0..30).map(|i| format!("t{i}")).collect();
    for id in &ids {
        fake.script(
            &format!("/api/v1/task/{id}"),
            vec![Reply::json(200, maxapi_task(id, "SUCCESS", Value::Null))],
        );
    }
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let yaml = maxapi_config(&fake.url(), &id_refs, "")
        .replace("requests_per_second: 500", "requests_per_second: 20");
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let exporter = Exporter::start(&yaml, &[("MX_KEY", MX_KEY)], dir.path()).await;
    exporter
        .wait_for(WAIT, |m| m.sum("genai_task_completions_total", &[]) == 30.0)
        .await;
    // 30 requests evenly spaced at 20/s take at least 29 x 50 ms.
    let mut times: Vec<Instant> = ids
        .iter()
        .flat_map(|id| fake.hits(&format!("/api/v1/task/{id}")))
        .collect();
    times.sort();
    assert_eq!(times.len(), 30);
    let span = times[29] - times[0];
    assert!(
        span >= Duration::from_millis(1400),
        "30 requests in {span:?}"
    );
    for window in times.windows(21) {
        assert!(
            window[20] - window[0] >= Duration::from_millis(950),
            "more than 20 requests within one second"
        );
    }
    assert!(started.elapsed() < WAIT);
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_landing_page() {
    let fake = FakeUpstream::start().await;
    fake.script_maxapi_task("t1", "PENDING");
    let dir = tempfile::tempdir().unwrap();
    let exporter = start_maxapi(&fake, &["t1"], &dir).await;
    let ready = async {
        for _ in 0..100 {
            if reqwest::get(exporter.url("/-/ready"))
                .await
                .unwrap()
                .status()
                == 200
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    assert!(ready.await, "ready once the provider has been polled");
    let page = reqwest::get(exporter.url("/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("<table id=\"providers\">"));
    assert!(page.contains("pending: 1"), "{page}");
    let metrics = reqwest::get(exporter.url("/metrics")).await.unwrap();
    assert_eq!(
        metrics.headers()["content-type"].to_str().unwrap(),
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let m = Scrape::parse(&metrics.text().await.unwrap());
    assert_eq!(
        m.get(
            "genai_exporter_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert!(m.get("process_resident_memory_bytes", &[]).unwrap() > 0.0);
    exporter.stop().await;
}
