//! Each discovery source, end to end: task files, the registration API, both webhook shapes,
//! apimall history paging, and the balance poll.

mod common;

use std::time::Duration;

use common::{Exporter, FakeUpstream, Reply};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);
const TOKEN: &str = "api-token-7c1d";
const HOOK: &str = "hook-token-4b2a";

fn now_rfc3339(seconds_ago: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_secs(now - seconds_ago))
        .to_string()
}

fn maxapi_envelope(id: &str, status: &str) -> Value {
    json!({"code": 0, "msg": "ok", "data": {
        "taskId": id, "status": status, "input": {"model": "nano-banana"},
        "result": null, "failure_reason": null,
        "created_at": now_rfc3339(30), "updated_at": now_rfc3339(5)}})
}

fn apimall_data(id: &str, status: &str) -> Value {
    json!({"task_id": id, "model": "nano-banana", "status": status, "error_message": null,
        "credits_used": 4, "credits_refunded": 0, "created_at": now_rfc3339(30),
        "updated_at": now_rfc3339(5), "completed_at": now_rfc3339(5)})
}

fn base_yaml(maxapi: &str, apimall: &str, extra_maxapi: &str, extra_apimall: &str) -> String {
    format!(
        "server: {{api_token_env: API_TOKEN}}\n\
         polling: {{interval: 200ms, max_interval: 400ms, requests_per_second: 200}}\n\
         providers:\n\
         \x20 - name: mx\n    type: maxapi\n    base_url: {maxapi}\n    token_env: MX_KEY\n{extra_maxapi}\
         \x20 - name: am\n    type: apimall\n    base_url: {apimall}\n    token_env: AM_KEY\n{extra_apimall}"
    )
}

const ENV: &[(&str, &str)] = &[
    ("MX_KEY", "mx-key"),
    ("AM_KEY", "am-key"),
    ("API_TOKEN", TOKEN),
    ("HOOK_TOKEN", HOOK),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_files_added_and_edited_while_running() {
    let fake = FakeUpstream::start().await;
    for id in ["f1", "f2", "f3", "f4"] {
        fake.script(
            &format!("/api/v1/task/{id}"),
            vec![Reply::json(200, maxapi_envelope(id, "PENDING"))],
        );
    }
    let files = tempfile::tempdir().unwrap();
    let pattern = files.path().join("*.txt");
    let extra = format!("    task_files: ['{}']\n", pattern.display());
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::start(
        &base_yaml(&fake.url(), &fake.url(), &extra, ""),
        ENV,
        dir.path(),
    )
    .await;

    let file_count = |m: &common::Scrape| {
        m.get(
            "genai_task_discovered_total",
            &[("provider", "mx"), ("source", "file")],
        )
    };
    std::fs::write(
        files.path().join("a.txt"),
        "# batch 1\nf1\n\nf2  # second\n",
    )
    .unwrap();
    exporter
        .wait_for(WAIT, |m| file_count(m) == Some(2.0))
        .await;

    // Edit: one more id (and a repeated one); then a new file.
    std::fs::write(
        files.path().join("a.txt"),
        "# batch 1\nf1\n\nf2  # second\nf3\nf1\n",
    )
    .unwrap();
    exporter
        .wait_for(WAIT, |m| file_count(m) == Some(3.0))
        .await;
    std::fs::write(files.path().join("b.txt"), "f4\nnot a valid id\n").unwrap();
    let m = exporter
        .wait_for(WAIT, |m| file_count(m) == Some(4.0))
        .await;
    assert_eq!(
        m.get("genai_tasks", &[("provider", "mx"), ("status", "pending")]),
        Some(4.0)
    );
    // A match that is no file is skipped; one that cannot be read (a dangling link) is
    // counted; neither stops the watcher: a file written after them is still read.
    std::fs::create_dir(files.path().join("c.txt")).unwrap();
    std::os::unix::fs::symlink(files.path().join("missing"), files.path().join("d.txt")).unwrap();
    std::fs::write(files.path().join("e.txt"), "f5\n").unwrap();
    let m = exporter
        .wait_for(WAIT, |m| file_count(m) == Some(5.0))
        .await;
    assert!(
        m.get(
            "genai_exporter_discovery_errors_total",
            &[("provider", "mx"), ("source", "file")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "the dangling link is counted"
    );
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_api_requires_the_bearer_token() {
    let fake = FakeUpstream::start().await;
    fake.script(
        "/api/v1/task/a1",
        vec![Reply::json(200, maxapi_envelope("a1", "PROCESSING"))],
    );
    fake.script(
        "/api/v1/task/a2",
        vec![Reply::json(200, maxapi_envelope("a2", "SUCCESS"))],
    );
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::start(
        &base_yaml(&fake.url(), &fake.url(), "", ""),
        ENV,
        dir.path(),
    )
    .await;
    let client = reqwest::Client::new();
    let url = exporter.url("/api/v1/tasks");
    let body = json!({"provider": "mx", "task_ids": ["a1", "a2", "a1", ""]});

    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        status(client.post(&url).json(&body).send().await.unwrap()),
        401
    );
    assert_eq!(
        status(
            client
                .post(&url)
                .bearer_auth("wrong")
                .json(&body)
                .send()
                .await
                .unwrap()
        ),
        401
    );
    let ok = client
        .post(&url)
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let result: Value = ok.json().await.unwrap();
    assert_eq!(
        result,
        json!({"added": 2, "already_tracked": 1, "already_finished": 0, "other_shard": 0, "invalid": 1})
    );

    let unknown = json!({"provider": "nope", "task_ids": ["x"]});
    assert_eq!(
        status(
            client
                .post(&url)
                .bearer_auth(TOKEN)
                .json(&unknown)
                .send()
                .await
                .unwrap()
        ),
        404
    );
    let too_many = json!({"provider": "mx", "task_ids": (0..10_001).map(|i| format!("t{i}")).collect::<Vec<_>>()});
    assert_eq!(
        status(
            client
                .post(&url)
                .bearer_auth(TOKEN)
                .json(&too_many)
                .send()
                .await
                .unwrap()
        ),
        413
    );
    assert_eq!(
        status(
            client
                .post(&url)
                .bearer_auth(TOKEN)
                .body("{\"provider\":")
                .header("content-type", "application/json")
                .send()
                .await
                .unwrap()
        ),
        400
    );

    let m = exporter
        .wait_for(WAIT, |m| m.sum("genai_task_completions_total", &[]) == 1.0)
        .await;
    assert_eq!(
        m.get(
            "genai_task_discovered_total",
            &[("provider", "mx"), ("source", "api")]
        ),
        Some(2.0)
    );

    // Listing with filters.
    let list: Value = client
        .get(exporter.url("/api/v1/tasks?provider=mx&status=running"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = list["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a1"]);
    assert_eq!(list["tasks"][0]["model"], "nano-banana");
    assert_eq!(
        status(
            client
                .get(exporter.url("/api/v1/tasks?status=bogus"))
                .send()
                .await
                .unwrap()
        ),
        400
    );

    // Stop tracking.
    let del = exporter.url("/api/v1/tasks/mx/a1");
    assert_eq!(status(client.delete(&del).send().await.unwrap()), 401);
    assert_eq!(
        status(client.delete(&del).bearer_auth(TOKEN).send().await.unwrap()),
        204
    );
    assert_eq!(
        status(client.delete(&del).bearer_auth(TOKEN).send().await.unwrap()),
        404
    );
    let m = exporter.scrape().await;
    assert_eq!(
        m.get(
            "genai_task_dropped_total",
            &[("provider", "mx"), ("reason", "api")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get("genai_tasks", &[("provider", "mx"), ("status", "running")]),
        None
    );
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_is_refused_when_no_token_is_configured() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = base_yaml(&fake.url(), &fake.url(), "", "")
        .replace("server: {api_token_env: API_TOKEN}\n", "");
    let exporter = Exporter::start(&yaml, ENV, dir.path()).await;
    let response = reqwest::Client::new()
        .post(exporter.url("/api/v1/tasks"))
        .bearer_auth(TOKEN)
        .json(&json!({"provider": "mx", "task_ids": ["x"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_of_both_providers_are_applied_and_confirmed() {
    let fake = FakeUpstream::start().await;
    fake.script(
        "/api/v1/task/w1",
        vec![Reply::json(200, maxapi_envelope("w1", "SUCCESS"))],
    );
    fake.script(
        "/api/v1/images/img_w2",
        vec![Reply::json(
            200,
            json!({"success": true, "data": apimall_data("img_w2", "completed")}),
        )],
    );
    fake.script(
        "/api/v1/images/img_w3",
        vec![Reply::json(
            200,
            json!({"success": true, "data": apimall_data("img_w3", "completed")}),
        )],
    );
    let hook = "    webhook: {enabled: true, token_env: HOOK_TOKEN}\n";
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::start(
        &base_yaml(&fake.url(), &fake.url(), hook, hook),
        ENV,
        dir.path(),
    )
    .await;
    let client = reqwest::Client::new();
    let post = |provider: &str, token: &str, body: Value| {
        client
            .post(exporter.url(&format!("/webhooks/{provider}?token={token}")))
            .json(&body)
            .send()
    };
    // maxapi: the query envelope; apimall: the data object, or the whole envelope.
    assert_eq!(
        post("mx", HOOK, maxapi_envelope("w1", "SUCCESS"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        post("am", HOOK, apimall_data("img_w2", "completed"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        post(
            "am",
            HOOK,
            json!({"success": true, "data": apimall_data("img_w3", "completed"), "request_id": "r"})
        )
        .await
        .unwrap()
        .status(),
        200
    );

    let m = exporter
        .wait_for(WAIT, |m| m.sum("genai_task_completions_total", &[]) == 3.0)
        .await;
    assert_eq!(
        m.get(
            "genai_task_discovered_total",
            &[("provider", "mx"), ("source", "webhook")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "genai_task_discovered_total",
            &[("provider", "am"), ("source", "webhook")]
        ),
        Some(2.0)
    );
    assert_eq!(
        m.get("genai_task_credits_used_total", &[("provider", "am")]),
        Some(8.0)
    );
    assert_eq!(
        m.get(
            "genai_exporter_webhook_requests_total",
            &[("provider", "am"), ("outcome", "accepted")]
        ),
        Some(2.0)
    );

    // apimall confirms each callback by exactly one poll (`webhook.confirm` defaults to true
    // there), maxapi does not (false): its callback is the whole answer. Canaries, polled
    // again and again, show both pollers went round several times after the callbacks.
    fake.script(
        "/api/v1/task/canary",
        vec![Reply::json(200, maxapi_envelope("canary", "PROCESSING"))],
    );
    fake.script(
        "/api/v1/images/img_canary",
        vec![Reply::json(
            200,
            json!({"success": true, "data": apimall_data("img_canary", "processing")}),
        )],
    );
    exporter.track("mx", "canary");
    exporter.track("am", "img_canary");
    fake.wait_for_more_hits("/api/v1/task/canary", 3, WAIT)
        .await;
    fake.wait_for_more_hits("/api/v1/images/img_canary", 3, WAIT)
        .await;
    exporter.untrack("mx", "canary");
    exporter.untrack("am", "img_canary");
    assert_eq!(fake.hits("/api/v1/task/w1").len(), 0);
    assert_eq!(fake.hits("/api/v1/images/img_w2").len(), 1);
    let m = exporter.scrape().await;
    assert_eq!(
        m.get(
            "genai_task_detection_delay_seconds_count",
            &[("provider", "mx"), ("via", "webhook")]
        ),
        Some(1.0),
        "the callback told the outcome"
    );
    // The repeat changes nothing.
    assert_eq!(
        post("mx", HOOK, maxapi_envelope("w1", "SUCCESS"))
            .await
            .unwrap()
            .status(),
        200
    );

    // Hostile or wrong callbacks: refused, counted, nothing applied.
    assert_eq!(
        post("mx", "wrong", maxapi_envelope("w9", "SUCCESS"))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        post("nope", HOOK, maxapi_envelope("w9", "SUCCESS"))
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        post(
            "mx",
            HOOK,
            json!({"code": 0, "data": {"status": "SUCCESS"}})
        )
        .await
        .unwrap()
        .status(),
        400
    );
    let garbage = client
        .post(exporter.url(&format!("/webhooks/mx?token={HOOK}")))
        .body("{{{{")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep = client
        .post(exporter.url(&format!("/webhooks/mx?token={HOOK}")))
        .body(deep)
        .send()
        .await
        .unwrap();
    assert_eq!(deep.status(), 400);
    let huge = client
        .post(exporter.url(&format!("/webhooks/mx?token={HOOK}")))
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status(), 413);

    let m = exporter.scrape().await;
    assert_eq!(
        m.sum("genai_task_completions_total", &[]),
        3.0,
        "counted once"
    );
    assert_eq!(
        m.get(
            "genai_exporter_webhook_requests_total",
            &[("provider", "mx"), ("outcome", "unauthorized")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "genai_exporter_webhook_requests_total",
            &[("provider", "mx"), ("outcome", "invalid")]
        ),
        Some(3.0)
    );
    assert_eq!(
        m.get(
            "genai_exporter_webhook_requests_total",
            &[("provider", "mx"), ("outcome", "too_large")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "genai_exporter_webhook_requests_total",
            &[("provider", ""), ("outcome", "unknown_provider")]
        ),
        Some(1.0)
    );
    assert!(
        !exporter
            .app
            .registry
            .provider("mx")
            .unwrap()
            .is_tracked("w9")
    );
    exporter.stop().await;
}

fn history_page(from: usize, count: usize) -> Value {
    let items: Vec<Value> = (from..from + count)
        .map(|i| {
            json!({"task_id": format!("img_{i:04}"), "model": "nano-banana", "status": "completed",
                        "created_at": now_rfc3339(60), "completed_at": now_rfc3339(30),
                        "credits_used": 1, "credits_refunded": 0})
        })
        .collect();
    json!({"success": true, "data": {"items": items, "page": 1, "limit": 50}, "request_id": "r"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_until_a_short_page_and_balance_is_read() {
    let fake = FakeUpstream::start().await;
    fake.script(
        "/api/v1/images/history?page=1&limit=50",
        vec![Reply::json(200, history_page(0, 50))],
    );
    fake.script(
        "/api/v1/images/history?page=2&limit=50",
        vec![Reply::json(200, history_page(50, 50))],
    );
    fake.script(
        "/api/v1/images/history?page=3&limit=50",
        vec![Reply::json(200, history_page(100, 7))],
    );
    fake.script(
        "/api/v1/audio/history?page=1&limit=50",
        vec![Reply::json(
            200,
            json!({"success": true, "data": {"items": [], "page": 1, "limit": 50}}),
        )],
    );
    fake.script(
        "/api/v1/account/balances",
        vec![Reply::json(
            200,
            json!({"success": true, "data": {"credits": 120.5, "api_credits": 100}}),
        )],
    );
    for i in 0..107 {
        let id = format!("img_{i:04}");
        fake.script(
            &format!("/api/v1/images/{id}"),
            vec![Reply::json(
                200,
                json!({"success": true, "data": apimall_data(&id, "completed")}),
            )],
        );
    }
    let extra = "    history: {enabled: true, interval: 300ms, max_pages: 10, kinds: [images, audio]}\n    balance: {enabled: true, interval: 300ms}\n";
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::start(
        &base_yaml(&fake.url(), &fake.url(), "", extra),
        ENV,
        dir.path(),
    )
    .await;
    let m = exporter
        .wait_for(WAIT, |m| {
            m.sum("genai_task_completions_total", &[("provider", "am")]) == 107.0
        })
        .await;
    assert_eq!(
        m.get(
            "genai_task_discovered_total",
            &[("provider", "am"), ("source", "history")]
        ),
        Some(107.0)
    );
    assert_eq!(
        m.get(
            "genai_account_credits",
            &[("provider", "am"), ("kind", "credits")]
        ),
        Some(120.5)
    );
    assert_eq!(
        m.get(
            "genai_account_credits",
            &[("provider", "am"), ("kind", "api_credits")]
        ),
        Some(100.0)
    );
    assert_eq!(
        m.get("genai_task_credits_used_total", &[("provider", "am")]),
        Some(107.0),
        "1 credit x 107, from the history items themselves"
    );
    assert!(
        fake.hits("/api/v1/images/history?page=4&limit=50")
            .is_empty(),
        "a short page is the last"
    );
    // Listing again finds nothing new and counts nothing twice. The walks are incremental:
    // a first page with nothing new or changed ends them.
    let page_1 = "/api/v1/images/history?page=1&limit=50";
    fake.wait_for_more_hits(page_1, 2, WAIT).await;
    assert_eq!(
        fake.hits("/api/v1/images/history?page=2&limit=50").len(),
        1,
        "only the first walk went past page 1"
    );
    let m = exporter.scrape().await;
    assert_eq!(
        m.get(
            "genai_task_discovered_total",
            &[("provider", "am"), ("source", "history")]
        ),
        Some(107.0)
    );
    assert_eq!(
        m.sum("genai_task_completions_total", &[("provider", "am")]),
        107.0
    );
    assert!(
        m.get(
            "genai_upstream_requests_total",
            &[("provider", "am"), ("endpoint", "history"), ("code", "200")]
        )
        .unwrap()
            >= 6.0
    );
    // Completed history items cost no get-task request at all.
    assert_eq!(
        m.get(
            "genai_upstream_requests_total",
            &[("provider", "am"), ("endpoint", "task"), ("code", "200")]
        ),
        None
    );
    assert!((0..107).all(|i| fake.hits(&format!("/api/v1/images/img_{i:04}")).is_empty()));
    assert_eq!(
        m.get(
            "genai_task_detection_delay_seconds_count",
            &[("provider", "am"), ("via", "history")]
        ),
        Some(107.0),
        "each outcome learnt from the listing, once"
    );
    assert!(
        m.get(
            "genai_upstream_requests_total",
            &[("provider", "am"), ("endpoint", "balance"), ("code", "200")]
        )
        .unwrap()
            >= 1.0
    );
    exporter.stop().await;
}
