//! Accounting against a scripted upstream that sends what a real one sometimes does: a refund
//! posted after the failure, creation times in the year 9999 or 1970, credits as strings or
//! absurd numbers, and more models than the cap across a restart. Every assertion is on parsed
//! `/metrics` of a real listener.

mod common;

use std::time::{Duration, Instant};

use common::{Exporter, FakeUpstream, Reply, Scrape, ago};
use serde_json::{Value, json};

const AM_KEY: &str = "am-test-key-3c7d";
const WAIT: Duration = Duration::from_secs(15);

/// An apimall get-task answer; `fields` overrides or adds `data` fields.
fn task(id: &str, status: &str, fields: Value) -> Reply {
    let mut data = json!({
        "task_id": id,
        "model": "nano-banana",
        "status": status,
        "error_message": if status == "failed" { json!("upstream model crashed") } else { Value::Null },
        "created_at": ago(30),
        "updated_at": ago(1),
        "completed_at": if status == "completed" || status == "failed" { json!(ago(2)) } else { Value::Null },
    });
    for (key, value) in fields.as_object().unwrap() {
        data[key] = value.clone();
    }
    Reply::json(
        200,
        json!({"success": true, "data": data, "request_id": "req_test"}),
    )
}

fn path(id: &str) -> String {
    format!("/api/v1/images/{id}")
}

fn config(fake: &FakeUpstream, tasks: &[&str], extra: &str) -> String {
    format!(
        "polling: {{interval: 100ms, max_interval: 200ms, timeout: 1s, requests_per_second: 500{extra}}}\n\
         providers:\n  - name: am\n    type: apimall\n    base_url: {}\n    token_env: AM_KEY\n    tasks: {tasks:?}\n",
        fake.url()
    )
}

fn implausible(m: &Scrape, field: &str) -> f64 {
    m.sum(
        "genai_upstream_implausible_values_total",
        &[("provider", "am"), ("field", field)],
    )
}

/// Polls a canary task until it was polled after `after`: proof that the poller went round
/// while anything else due by then would have been polled too.
async fn poller_went_round_after(fake: &FakeUpstream, exporter: &Exporter, after: Instant) {
    fake.script(
        &path("img_canary"),
        vec![task("img_canary", "processing", json!({}))],
    );
    exporter.track("am", "img_canary");
    let deadline = Instant::now() + WAIT + (after - Instant::now().min(after));
    while !fake.hits(&path("img_canary")).iter().any(|&t| t > after) {
        assert!(Instant::now() < deadline, "the canary was not polled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    exporter.untrack("am", "img_canary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_posted_after_the_failure_is_counted_once() {
    let fake = FakeUpstream::start().await;
    let charged = json!({"credits_used": 8, "credits_refunded": 0});
    fake.script(
        &path("img_late"),
        vec![
            task("img_late", "processing", charged.clone()),
            task("img_late", "failed", charged.clone()),
            // The first late check (2 intervals after the failure) still sees no refund,
            task("img_late", "failed", charged),
            // the second one sees it: nothing is owed any more, so no third check.
            task(
                "img_late",
                "failed",
                json!({"credits_used": 8, "credits_refunded": 8}),
            ),
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::start(
        &config(&fake, &["img_late"], ""),
        &[("AM_KEY", AM_KEY)],
        dir.path(),
    )
    .await;
    let labels = [("provider", "am"), ("model", "nano-banana")];
    exporter
        .wait_for(WAIT, |m| {
            m.sum("genai_task_credits_refunded_total", &labels) > 0.0
        })
        .await;
    // Two polls to the failure, then two late checks (2 and 8 intervals after it); the
    // check at 40 intervals (4 s) is not made: nothing is owed any more.
    let failed_at = fake.hits(&path("img_late"))[1];
    poller_went_round_after(&fake, &exporter, failed_at + Duration::from_secs(5)).await;
    assert_eq!(fake.hits(&path("img_late")).len(), 4);
    let m = exporter.scrape().await;
    assert_eq!(m.get("genai_task_credits_used_total", &labels), Some(8.0));
    assert_eq!(
        m.get("genai_task_credits_refunded_total", &labels),
        Some(8.0)
    );
    assert_eq!(
        m.get(
            "genai_task_completions_total",
            &[("provider", "am"), ("status", "failed")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implausible_creation_times_count_age_from_first_sight() {
    let fake = FakeUpstream::start().await;
    fake.script(
        &path("img_future"),
        vec![task(
            "img_future",
            "processing",
            json!({"created_at": "9999-12-31T23:59:59Z"}),
        )],
    );
    fake.script(
        &path("img_ancient"),
        vec![task(
            "img_ancient",
            "processing",
            json!({"created_at": "1970-01-01T00:00:01Z"}),
        )],
    );
    fake.script(
        &path("img_future_done"),
        vec![task(
            "img_future_done",
            "completed",
            json!({"created_at": "9999-01-01T00:00:00Z"}),
        )],
    );
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::start(
        &config(
            &fake,
            &["img_future", "img_ancient", "img_future_done"],
            ", max_task_age: 6s",
        ),
        &[("AM_KEY", AM_KEY)],
        dir.path(),
    )
    .await;
    // Both in-flight tasks are polled many times; each is counted once.
    let m = exporter
        .wait_for(WAIT, |m| {
            fake.hits(&path("img_future")).len() >= 3
                && fake.hits(&path("img_ancient")).len() >= 3
                && implausible(m, "created_at") >= 3.0
        })
        .await;
    assert_eq!(implausible(&m, "created_at"), 3.0);
    // Age from first sight: neither hidden (0) nor 56 years.
    let oldest = m
        .get("genai_task_oldest_in_flight_seconds", &[("provider", "am")])
        .unwrap();
    assert!(oldest > 0.0 && oldest < 6.0, "oldest in flight {oldest}");
    // A finished one is counted, without a latency it cannot know.
    assert_eq!(
        m.get(
            "genai_task_completions_total",
            &[("provider", "am"), ("status", "succeeded")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.sum(
            "genai_task_completion_latency_seconds_count",
            &[("provider", "am")]
        ),
        0.0
    );
    // max_task_age (6 s) applies to both, from first sight.
    let m = exporter
        .wait_for(WAIT, |m| {
            m.sum(
                "genai_task_dropped_total",
                &[("provider", "am"), ("reason", "max_age")],
            ) >= 2.0
        })
        .await;
    assert_eq!(
        m.get(
            "genai_task_dropped_total",
            &[("provider", "am"), ("reason", "max_age")]
        ),
        Some(2.0)
    );
    assert_eq!(
        m.get("genai_task_oldest_in_flight_seconds", &[("provider", "am")]),
        Some(0.0)
    );
    assert_eq!(implausible(&m, "created_at"), 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_as_strings_count_and_absurd_credits_are_refused() {
    let fake = FakeUpstream::start().await;
    let cases = [
        (
            "img_strings",
            "failed",
            json!({"credits_used": "8", "credits_refunded": " 2.5"}),
        ),
        (
            "img_huge",
            "completed",
            json!({"credits_used": 1e308, "credits_refunded": 0}),
        ),
        (
            "img_negative",
            "failed",
            json!({"credits_used": -5, "credits_refunded": "NaN"}),
        ),
        (
            "img_words",
            "completed",
            json!({"credits_used": "eight", "credits_refunded": "1e10"}),
        ),
        (
            "img_plain",
            "completed",
            json!({"credits_used": 1.5, "credits_refunded": 0}),
        ),
    ];
    for (id, status, credits) in &cases {
        fake.script(
            &path(id),
            vec![
                task(id, "processing", credits.clone()),
                task(id, status, credits.clone()),
            ],
        );
    }
    let ids: Vec<&str> = cases.iter().map(|c| c.0).collect();
    let dir = tempfile::tempdir().unwrap();
    let exporter =
        Exporter::start(&config(&fake, &ids, ""), &[("AM_KEY", AM_KEY)], dir.path()).await;
    let m = exporter
        .wait_for(WAIT, |m| {
            m.sum("genai_task_completions_total", &[("provider", "am")]) >= 5.0
        })
        .await;
    let labels = [("provider", "am"), ("model", "nano-banana")];
    assert_eq!(m.get("genai_task_credits_used_total", &labels), Some(9.5));
    assert_eq!(
        m.get("genai_task_credits_refunded_total", &labels),
        Some(2.5)
    );
    // Each refused field once per task, though each task answered twice.
    assert_eq!(implausible(&m, "credits_used"), 3.0);
    assert_eq!(implausible(&m, "credits_refunded"), 2.0);
    assert_eq!(implausible(&m, "created_at"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_cap_survives_a_restart() {
    let fake = FakeUpstream::start().await;
    for (id, model) in [
        ("img_a", "model-a"),
        ("img_b", "model-b"),
        ("img_c", "model-c"),
        ("img_d", "model-d"),
        ("img_e", "model-e"),
    ] {
        fake.script(
            &path(id),
            vec![task(id, "completed", json!({"model": model}))],
        );
    }
    let cap = "}\nmetrics: {max_models_per_provider: 3";
    let dir = tempfile::tempdir().unwrap();
    let first = Exporter::start(
        &config(&fake, &["img_a", "img_b", "img_c"], cap),
        &[("AM_KEY", AM_KEY)],
        dir.path(),
    )
    .await;
    first
        .wait_for(WAIT, |m| {
            m.sum("genai_task_completions_total", &[("provider", "am")]) >= 3.0
        })
        .await;
    first.stop().await;

    let second = Exporter::start(
        &config(&fake, &["img_a", "img_b", "img_c", "img_d", "img_e"], cap),
        &[("AM_KEY", AM_KEY)],
        dir.path(),
    )
    .await;
    let m = second
        .wait_for(WAIT, |m| {
            m.sum("genai_task_completions_total", &[("provider", "am")]) >= 5.0
        })
        .await;
    let mut models: Vec<&str> = m
        .matching("genai_task_completions_total", &[("provider", "am")])
        .map(|s| s.labels["model"].as_str())
        .collect();
    models.sort();
    models.dedup();
    assert_eq!(models, ["model-a", "model-b", "model-c", "other"]);
    let completed = |model| {
        m.get(
            "genai_task_completions_total",
            &[
                ("provider", "am"),
                ("model", model),
                ("status", "succeeded"),
            ],
        )
    };
    assert_eq!(completed("model-a"), Some(1.0));
    assert_eq!(completed("other"), Some(2.0));
}
