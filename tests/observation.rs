//! Learning outcomes cheaply: history items counted from the listing itself, a failed item's
//! one request for its reason, incremental history walks and their `max_pages` cap, and the
//! safety poll that catches a lost callback.

mod common;

use std::time::{Duration, Instant};

use common::{Exporter, FakeUpstream, Reply, Scrape};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(15);

fn rfc3339(seconds_ago: u64) -> String {
    let now = std::time::SystemTime::now() - Duration::from_secs(seconds_ago);
    humantime::format_rfc3339_millis(now).to_string()
}

fn item(id: &str, status: &str) -> Value {
    let mut item = json!({"task_id": id, "model": "nano-banana", "status": status,
        "created_at": rfc3339(60), "credits_used": 2, "credits_refunded": 0});
    if status == "completed" || status == "failed" {
        item["completed_at"] = json!(rfc3339(10));
    }
    item
}

fn page(items: Vec<Value>) -> Reply {
    Reply::json(
        200,
        json!({"success": true, "data": {"items": items, "page": 1, "limit": 50}}),
    )
}

fn completed_items(prefix: &str, count: usize) -> Vec<Value> {
    (0..count)
        .map(|i| item(&format!("img_{prefix}{i:03}"), "completed"))
        .collect()
}

fn apimall_yaml(url: &str, max_pages: u32) -> String {
    format!(
        "polling: {{interval: 100ms, max_interval: 60s, requests_per_second: 200}}\n\
         providers:\n\
         \x20 - name: am\n    type: apimall\n    base_url: {url}\n    token_env: AM_KEY\n\
         \x20   history: {{enabled: true, interval: 200ms, max_pages: {max_pages}, kinds: [images]}}\n"
    )
}

fn requests(m: &Scrape, endpoint: &str) -> f64 {
    m.sum(
        "genai_upstream_requests_total",
        &[("provider", "am"), ("endpoint", endpoint)],
    )
}

const PAGE_1: &str = "/api/v1/images/history?page=1&limit=50";
const PAGE_2: &str = "/api/v1/images/history?page=2&limit=50";
const PAGE_3: &str = "/api/v1/images/history?page=3&limit=50";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_items_are_observations_and_walks_page_down_to_in_flight_tasks() {
    let fake = FakeUpstream::start().await;
    // Page 1: fifty finished tasks, the same in every walk. Page 2 (the last): a running
    // task and a failed one; the running one finishes from the third walk on.
    fake.script(PAGE_1, vec![page(completed_items("a", 50))]);
    let running = page(vec![
        item("img_run", "processing"),
        item("img_fail", "failed"),
    ]);
    let finished = page(vec![
        item("img_run", "completed"),
        item("img_fail", "failed"),
    ]);
    fake.script(PAGE_2, vec![running.clone(), running, finished]);
    fake.script(
        "/api/v1/images/img_fail",
        vec![Reply::json(
            200,
            json!({"success": true, "data": {"task_id": "img_fail", "model": "nano-banana",
                "status": "failed", "error_message": "NSFW content detected",
                "credits_used": 2, "credits_refunded": 2,
                "created_at": rfc3339(60), "completed_at": rfc3339(10)}}),
        )],
    );
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::start(
        &apimall_yaml(&fake.url(), 10),
        &[("AM_KEY", "k")],
        dir.path(),
    )
    .await;

    let m = exporter
        .wait_for(WAIT, |m| {
            m.sum("genai_task_completions_total", &[("provider", "am")]) == 52.0
        })
        .await;
    assert_eq!(
        m.get(
            "genai_task_completions_total",
            &[
                ("provider", "am"),
                ("model", "nano-banana"),
                ("status", "succeeded")
            ]
        ),
        Some(51.0)
    );
    assert_eq!(
        m.get(
            "genai_task_failures_total",
            &[
                ("provider", "am"),
                ("model", "nano-banana"),
                ("reason", "content_moderation")
            ]
        ),
        Some(1.0),
        "the failed item's reason came from its one get-task answer"
    );
    // Walks go on: page 1 only, now that nothing is new, changed or in flight.
    fake.wait_for_more_hits(PAGE_1, 3, WAIT).await;
    let m = exporter.scrape().await;
    assert_eq!(fake.hits(PAGE_2).len(), 3, "paged down while img_run ran");
    assert_eq!(fake.hits("/api/v1/images/img_fail").len(), 1);
    assert_eq!(fake.hits("/api/v1/images/img_run").len(), 0);
    assert_eq!(requests(&m, "task"), 1.0, "one get-task request in all");
    assert_eq!(
        m.sum("genai_task_completions_total", &[("provider", "am")]),
        52.0,
        "counted once"
    );
    assert_eq!(
        m.get("genai_task_credits_used_total", &[("provider", "am")]),
        Some(104.0)
    );
    assert_eq!(
        m.get("genai_task_credits_refunded_total", &[("provider", "am")]),
        Some(2.0)
    );
    assert_eq!(
        m.get(
            "genai_task_detection_delay_seconds_count",
            &[("provider", "am"), ("via", "history")]
        ),
        Some(51.0)
    );
    assert_eq!(
        m.get(
            "genai_task_detection_delay_seconds_count",
            &[("provider", "am"), ("via", "poll")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "genai_exporter_history_truncated_total",
            &[("provider", "am")]
        ),
        None,
        "every walk ended on its own"
    );
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_walk_stopped_by_max_pages_is_counted() {
    let fake = FakeUpstream::start().await;
    // Three full pages of new tasks, more than max_pages = 2 lets a walk read.
    fake.script(PAGE_1, vec![page(completed_items("a", 50))]);
    fake.script(PAGE_2, vec![page(completed_items("b", 50))]);
    fake.script(PAGE_3, vec![page(completed_items("c", 50))]);
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::start(
        &apimall_yaml(&fake.url(), 2),
        &[("AM_KEY", "k")],
        dir.path(),
    )
    .await;
    let truncated = |m: &Scrape| {
        m.get(
            "genai_exporter_history_truncated_total",
            &[("provider", "am"), ("kind", "images")],
        )
    };
    exporter.wait_for(WAIT, |m| truncated(m) == Some(1.0)).await;
    // Later walks find page 1 unchanged and stop there: no further truncation.
    fake.wait_for_more_hits(PAGE_1, 2, WAIT).await;
    let m = exporter.scrape().await;
    assert_eq!(truncated(&m), Some(1.0));
    assert!(fake.hits(PAGE_3).is_empty(), "max_pages is a hard cap");
    assert_eq!(
        m.sum("genai_task_completions_total", &[("provider", "am")]),
        100.0
    );
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_callback_is_caught_by_the_safety_poll() {
    let fake = FakeUpstream::start().await;
    let path = "/api/v1/task/lost";
    fake.script(
        path,
        vec![Reply::json(
            200,
            json!({"code": 0, "msg": "ok", "data": {
                "taskId": "lost", "status": "SUCCESS", "input": {"model": "nano-banana"},
                "result": null, "failure_reason": null,
                "created_at": rfc3339(30), "updated_at": rfc3339(5)}}),
        )],
    );
    let max_interval = Duration::from_secs(1);
    let yaml = format!(
        "server: {{api_token_env: API_TOKEN}}\n\
         polling: {{interval: 50ms, max_interval: 1s, requests_per_second: 200}}\n\
         providers:\n\
         \x20 - name: mx\n    type: maxapi\n    base_url: {}\n    token_env: MX_KEY\n\
         \x20   webhook: {{enabled: true, token_env: HOOK_TOKEN}}\n",
        fake.url()
    );
    let env = [("MX_KEY", "k"), ("API_TOKEN", "t"), ("HOOK_TOKEN", "h")];
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::start(&yaml, &env, dir.path()).await;

    // Registered, and its callback never comes.
    let registered = Instant::now();
    exporter.track("mx", "lost");
    // Ready without a request: a provider whose tasks wait for callbacks has nothing to ask
    // yet, and callbacks reach only ready replicas. (No request before the answer, so the
    // answer was not earned by the safety poll.)
    let ready = reqwest::get(exporter.url("/-/ready"))
        .await
        .unwrap()
        .status();
    assert!(
        fake.hits(path).is_empty(),
        "no request before the readiness answer"
    );
    assert_eq!(
        ready, 200,
        "a tracked task waiting for its callback keeps the exporter ready"
    );
    let m = exporter
        .wait_for(WAIT, |m| m.sum("genai_task_completions_total", &[]) == 1.0)
        .await;
    let hits = fake.hits(path);
    assert_eq!(hits.len(), 1, "one safety poll, no regular schedule");
    assert!(
        hits[0] - registered >= max_interval - Duration::from_millis(50),
        "polled {:?} after registration: only an overdue task is polled",
        hits[0] - registered
    );
    assert_eq!(
        m.get(
            "genai_task_detection_delay_seconds_count",
            &[("provider", "mx"), ("via", "poll")]
        ),
        Some(1.0)
    );
    exporter.stop().await;
}
