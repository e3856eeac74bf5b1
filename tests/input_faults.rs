//! Input an attacker or an accident controls: a binary file where a task file is expected,
//! and a flood of webhooks with a wrong token. Each is counted; neither reaches the provider
//! nor floods the log.

mod common;

use std::time::Duration;

use common::{Binary, Exporter, FakeUpstream, Reply};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);
const VALID_ID: &str = "9db7d1ed-d1e5-4d11-9f3a-61f653b905ad";

fn maxapi_success(id: &str) -> Reply {
    Reply::json(
        200,
        json!({"code": 0, "msg": "ok", "data": {
            "taskId": id, "status": "SUCCESS", "input": {"model": "nano-banana"},
        }}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_task_file_is_refused_and_nothing_of_it_is_polled() {
    let fake = FakeUpstream::start().await;
    fake.script(
        &format!("/api/v1/task/{VALID_ID}"),
        vec![maxapi_success(VALID_ID)],
    );
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("tasks");
    std::fs::create_dir(&files).unwrap();
    // A real executable: printable runs between NUL bytes would pass for ids.
    std::fs::copy("/bin/true", files.join("a-binary.txt")).unwrap();
    std::fs::write(files.join("b-text.txt"), format!("{VALID_ID}\n")).unwrap();
    let yaml = format!(
        "polling: {{interval: 100ms, max_interval: 200ms, requests_per_second: 500}}\n\
         providers:\n  - name: mx\n    type: maxapi\n    base_url: {}\n    token_env: MX_KEY\n    task_files: ['{}/*.txt']\n",
        fake.url(),
        files.display()
    );
    let exporter = Exporter::start(&yaml, &[("MX_KEY", "mx-key-7f2a")], dir.path()).await;
    // Both files were read in the same pass: the text file's task is counted, the binary
    // file is one discovery error.
    let m = exporter
        .wait_for(WAIT, |m| {
            m.sum("genai_task_completions_total", &[("provider", "mx")]) == 1.0
                && m.sum(
                    "genai_exporter_discovery_errors_total",
                    &[("provider", "mx"), ("source", "file")],
                ) >= 1.0
        })
        .await;
    assert_eq!(
        m.get(
            "genai_task_discovered_total",
            &[("provider", "mx"), ("source", "file")]
        ),
        Some(1.0)
    );
    // The only upstream requests are for the one real id.
    assert_eq!(
        fake.authorizations().len(),
        fake.hits(&format!("/api/v1/task/{VALID_ID}")).len()
    );
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_webhooks_are_all_counted_and_logged_at_a_bounded_rate() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "state: {{path: {}}}\nproviders:\n  - name: mx\n    type: maxapi\n    base_url: http://127.0.0.1:9\n    token_env: INPUT_FAULTS_MX_KEY\n    webhook: {{enabled: true, token_env: INPUT_FAULTS_HOOK}}\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let binary = Binary::start_with_env(
        &[
            "--config.file",
            config.to_str().unwrap(),
            "--web.listen-address",
            "127.0.0.1:0",
        ],
        &[
            ("INPUT_FAULTS_MX_KEY", "mx-key-1b9c"),
            ("INPUT_FAULTS_HOOK", "the-right-hook-token"),
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let attempts = 500;
    for i in 0..attempts {
        let response = client
            .post(binary.url(&format!("/webhooks/mx?token=wrong-{i}")))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
    }
    let m = binary
        .wait_for(WAIT, |m| {
            m.sum(
                "genai_exporter_webhook_requests_total",
                &[("provider", "mx"), ("outcome", "unauthorized")],
            ) == attempts as f64
        })
        .await;
    assert!(m.text.contains("genai_exporter_webhook_requests_total"));
    let lines = binary
        .logs()
        .lines()
        .filter(|l| l.contains("webhook with a missing or wrong token"))
        .count();
    // One line per 10 s (the requests took far less than 20 s).
    assert!(
        (1..=2).contains(&lines),
        "{lines} log lines for {attempts} wrong tokens"
    );
    assert!(
        !binary.logs().contains("wrong-"),
        "a sent token reached the log"
    );
    binary.stop();
}
