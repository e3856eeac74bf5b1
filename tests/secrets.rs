//! No secret ever leaves the process: the real binary at `--log.level debug`, distinctive
//! provider keys, webhook and API tokens, simulated providers with faults (401s, 500s,
//! malformed bodies, 429s), registration through the API, good and bad webhooks, bad
//! reloads; then every log line and every page and error answer is searched for every
//! secret.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Binary, Scrape};
use genai_task_exporter::simulator::{Faults, SimConfig, SimProvider, Simulator};

const MX_KEY: &str = "sk-mx-SECRET-5b8e0f2a";
const AM_KEY: &str = "sk-am-SECRET-c41d7e93";
/// Sent by a provider whose key the simulator does not accept: every answer is a 401.
const REFUSED_KEY: &str = "sk-refused-SECRET-7a2c";
const HOOK_TOKEN: &str = "whk-SECRET-90e1b3";
const API_TOKEN: &str = "api-SECRET-2f6d48";
const SECRETS: [&str; 5] = [MX_KEY, AM_KEY, REFUSED_KEY, HOOK_TOKEN, API_TOKEN];

const WAIT: Duration = Duration::from_secs(30);

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn config_yaml(dir: &Path, sim: &str) -> String {
    format!(
        "server:\n  api_token_file: {api}\n\
         state:\n  path: {state}\n\
         polling: {{interval: 200ms, max_interval: 400ms, timeout: 2s, requests_per_second: 50}}\n\
         providers:\n\
         \x20 - name: mx\n    type: maxapi\n    base_url: {sim}\n    token_file: {mx}\n    webhook: {{enabled: true, token_file: {hook}}}\n\
         \x20 - name: am\n    type: apimall\n    base_url: {sim}\n    token_file: {am}\n\
         \x20   history: {{enabled: true, interval: 1s, max_pages: 2, kinds: [images]}}\n\
         \x20   balance: {{enabled: true, interval: 1s}}\n\
         \x20 - name: refused\n    type: maxapi\n    base_url: {sim}\n    token_file: {refused}\n",
        api = write(dir, "api.token", API_TOKEN),
        state = dir.join("state").display(),
        mx = write(dir, "mx.key", MX_KEY),
        am = write(dir, "am.key", AM_KEY),
        refused = write(dir, "refused.key", REFUSED_KEY),
        hook = write(dir, "hook.token", HOOK_TOKEN),
    )
}

fn simulator() -> Simulator {
    let mut cfg = SimConfig::default();
    let faults = Faults {
        error_500_ratio: 0.15,
        error_429_ratio: 0.05,
        retry_after: Some(1),
        malformed_ratio: 0.15,
        ..Faults::default()
    };
    cfg.maxapi.api_keys = vec![MX_KEY.into()];
    cfg.maxapi.faults = faults.clone();
    cfg.apimall.api_keys = vec![AM_KEY.into()];
    cfg.apimall.faults = faults;
    cfg.apimall.backfill_tasks = 20;
    cfg.apimall.backfill_window = Duration::from_secs(600);
    for p in [&mut cfg.maxapi, &mut cfg.apimall] {
        for m in &mut p.workload.models {
            m.latency_min = Duration::from_millis(300);
            m.latency_max = Duration::from_secs(2);
            m.failure_ratio = 0.3;
        }
    }
    Simulator::new(cfg)
}

/// Everything the server said, to search for secrets.
#[derive(Default)]
struct Said(Vec<(String, String)>);

impl Said {
    fn add(&mut self, what: impl Into<String>, text: impl Into<String>) {
        self.0.push((what.into(), text.into()));
    }

    async fn response(&mut self, what: &str, response: reqwest::Response) -> u16 {
        let status = response.status().as_u16();
        let headers = format!("{:?}", response.headers());
        let body = response.text().await.unwrap_or_default();
        self.add(what, format!("{status} {headers}\n{body}"));
        status
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_pages_or_error_answers() {
    genai_task_exporter::upstream::install_crypto_provider();
    let sim = simulator();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_url = format!("http://{}", listener.local_addr().unwrap());
    let router = sim.router();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "config.yaml",
        &config_yaml(dir.path(), &sim_url),
    );
    let binary = Binary::start(&[
        "--config.file",
        &config,
        "--web.listen-address",
        "127.0.0.1:0",
        "--log.level",
        "debug",
    ])
    .await;
    let client = reqwest::Client::new();
    let mut said = Said::default();

    // Register tasks through the API (and try with a wrong token).
    let ids: Vec<String> = (0..8)
        .map(|_| sim.create_task(SimProvider::Maxapi, None))
        .collect();
    for (provider, token) in [("mx", API_TOKEN), ("refused", API_TOKEN), ("mx", "wrong")] {
        let response = client
            .post(binary.url("/api/v1/tasks"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(serde_json::json!({"provider": provider, "task_ids": ids}).to_string())
            .send()
            .await
            .unwrap();
        let status = said.response("register", response).await;
        assert_eq!(status, if token == API_TOKEN { 200 } else { 401 });
    }

    // Webhooks: the provider's own body with the right token, a wrong token, no webhook.
    let task = client
        .get(format!("{sim_url}/api/v1/task/{}", ids[0]))
        .bearer_auth(MX_KEY)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for (path, expected) in [
        (format!("/webhooks/mx?token={HOOK_TOKEN}"), [200, 400]),
        ("/webhooks/mx?token=not-the-token".to_string(), [401, 401]),
        (format!("/webhooks/am?token={HOOK_TOKEN}"), [404, 404]),
        (format!("/webhooks/mx?token={HOOK_TOKEN}"), [400, 400]),
    ] {
        let body = if expected == [400, 400] {
            "{\"not\": \"a task\"}".to_string()
        } else {
            task.clone()
        };
        let response = client
            .post(binary.url(&path))
            .body(body)
            .send()
            .await
            .unwrap();
        // The fetched body may itself be a malformed fault answer: then the webhook is 400.
        let status = said.response("webhook", response).await;
        assert!(expected.contains(&status), "{path}: {status}");
    }

    // Wait for a lively state: tasks finished, history found, faults and 401s counted.
    let m = binary
        .wait_for(WAIT, |m: &Scrape| {
            m.sum("genai_task_completions_total", &[("provider", "mx")]) >= 3.0
                && m.sum("genai_task_discovered_total", &[("source", "history")]) >= 1.0
                && m.get("genai_exporter_provider_up", &[("provider", "refused")]) == Some(0.0)
                && m.sum("genai_upstream_requests_total", &[("code", "401")]) >= 1.0
                && m.sum("genai_upstream_requests_total", &[("code", "500")]) >= 1.0
                && m.sum(
                    "genai_upstream_errors_total",
                    &[("error", "invalid_response")],
                ) >= 1.0
        })
        .await;
    said.add("metrics", m.text);

    // Bad reloads: by API (the answer is shown) and by SIGHUP; an empty key file, a typo,
    // and a key written inline by mistake.
    let good = std::fs::read_to_string(&config).unwrap();
    write(dir.path(), "empty.key", "");
    for bad in [
        good.replace(
            &format!("{}/mx.key", dir.path().display()),
            &format!("{}/empty.key", dir.path().display()),
        ),
        good.replace("polling: {interval:", "polling: {intervall:"),
        good.replace(
            "    token_file: ",
            &format!("    token: {MX_KEY}\n    token_file: "),
        ),
        format!("{good}  - name: mx\n    type: maxapi\n    token_env: {API_TOKEN}\n"),
    ] {
        write(dir.path(), "config.yaml", &bad);
        let response = client
            .post(binary.url("/-/reload"))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(said.response("reload", response).await, 400);
        binary.signal("HUP");
    }
    let response = client
        .post(binary.url("/-/reload"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(said.response("reload", response).await, 401);
    binary
        .wait_for(WAIT, |m| {
            m.get("genai_exporter_config_last_reload_successful", &[]) == Some(0.0)
        })
        .await;
    write(dir.path(), "config.yaml", &good);

    for path in [
        "/",
        "/api/v1/tasks?limit=10000",
        "/-/ready",
        "/metrics",
        "/nonexistent",
    ] {
        let response = client.get(binary.url(path)).send().await.unwrap();
        said.response(path, response).await;
    }
    let response = client
        .delete(binary.url(&format!("/api/v1/tasks/mx/{}", ids[1])))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    said.response("delete", response).await;
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_genai-task-exporter"))
        .args(["check-config", "--config.file", &config])
        .output()
        .unwrap();
    said.add("check-config", String::from_utf8_lossy(&check.stdout));

    let logs = binary.logs.clone();
    assert!(binary.stop().success());
    let logs = logs.lock().unwrap().join("\n");
    assert!(logs.contains("level=debug"), "debug logging was on");
    assert!(logs.contains("configuration reload failed"), "{logs}");
    said.add("logs", logs);

    let mut leaks = Vec::new();
    for (what, text) in &said.0 {
        for secret in SECRETS {
            if text.contains(secret) {
                leaks.push(format!("{secret} in {what}:\n{text}"));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n\n"));
}
