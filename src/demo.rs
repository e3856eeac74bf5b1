//! `demo`: the simulated providers and the exporter in one process on loopback, wired the
//! way a real deployment is: maxapi tasks are registered through the exporter's API (as a
//! submitting client would) and reported by callbacks (each confirmed by one get-task request,
//! so the demo shows maxapi up within seconds, not after the first safety poll); apimall tasks
//! are found through its history listing; apimall's balance is polled. A small client
//! application also sends its maxapi requests through the exporter's proxy.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::{self, Overrides, Settings};
use crate::simulator::{Register, SimConfig, Simulator};

/// Credentials of the demo; they protect nothing but loopback toys.
const DEMO_API_TOKEN: &str = "demo-api-token";
const DEMO_WEBHOOK_TOKEN: &str = "demo-webhook-token";
const DEMO_MAXAPI_KEY: &str = "demo-maxapi-key";

/// The proxied client submits one task per round and polls its unfinished ones.
const CLIENT_ROUND: Duration = Duration::from_secs(4);
/// Every this many submissions, one is cut short (a client bug): the provider rejects it as
/// an invalid request.
const CLIENT_REJECTED_EVERY: u64 = 8;
/// Tasks the client polls at most; it gives up on the oldest beyond (the exporter's own polls
/// then learn their outcome).
const CLIENT_MAX_TASKS: usize = 30;

/// The exporter configuration of the demo, for an exporter at `exporter` and simulated
/// providers at `simulator`.
pub(crate) fn exporter_yaml(simulator: SocketAddr, state: &Path) -> String {
    format!(
        r#"server:
  api_token_env: DEMO_API_TOKEN
polling:
  interval: 5s
  max_interval: 60s
  timeout: 5s
  requests_per_second: 15
  max_concurrency: 8
  retention: 10m
state:
  path: {state}
providers:
  - name: maxapi
    type: maxapi
    base_url: http://{simulator}
    token_env: DEMO_MAXAPI_KEY
    webhook: {{enabled: true, token_env: DEMO_WEBHOOK_TOKEN, confirm: true}}
    proxy: {{enabled: true}}
  - name: apimall
    type: apimall
    base_url: http://{simulator}
    token_env: DEMO_APIMALL_KEY
    history: {{enabled: true, interval: 10s, max_pages: 4, kinds: [images, videos, audio]}}
    balance: {{enabled: true, interval: 15s}}
"#,
        state = state.display()
    )
}

fn demo_env(name: &str) -> Option<String> {
    match name {
        "DEMO_API_TOKEN" => Some(DEMO_API_TOKEN.into()),
        "DEMO_WEBHOOK_TOKEN" => Some(DEMO_WEBHOOK_TOKEN.into()),
        "DEMO_MAXAPI_KEY" => Some(DEMO_MAXAPI_KEY.into()),
        "DEMO_APIMALL_KEY" => Some("demo-apimall-key".into()),
        _ => None,
    }
}

/// Exporter settings for the demo.
pub fn settings(simulator: SocketAddr, exporter: SocketAddr, state: &Path) -> Settings {
    let yaml = exporter_yaml(simulator, state);
    let file = config::parse(&yaml).expect("the demo configuration parses");
    let overrides = Overrides {
        listen_address: Some(exporter.to_string()),
        ..Overrides::default()
    };
    config::resolve(file, Path::new("<demo>"), &overrides, &demo_env)
        .expect("the demo configuration is valid")
}

/// The simulator configuration of the demo: lively workload, light faults, and the wiring
/// to the exporter at `exporter`.
pub fn simulator_config(exporter: SocketAddr) -> SimConfig {
    let mut sim = SimConfig::demo();
    sim.maxapi.register = Some(Register {
        url: format!("http://{exporter}/api/v1/tasks"),
        token_env: None,
        token: Some(DEMO_API_TOKEN.into()),
        provider_name: Some("maxapi".into()),
    });
    sim.maxapi.callback_url = Some(format!(
        "http://{exporter}/webhooks/maxapi?token={DEMO_WEBHOOK_TOKEN}"
    ));
    sim
}

/// Binds both listeners, returning them with a fresh state directory.
pub async fn bind(
    exporter: &str,
    simulator: &str,
) -> std::io::Result<(TcpListener, TcpListener, PathBuf)> {
    let exporter = TcpListener::bind(exporter).await?;
    let simulator = TcpListener::bind(simulator).await?;
    let state =
        std::env::temp_dir().join(format!("genai-task-exporter-demo-{}", std::process::id()));
    Ok((exporter, simulator, state))
}

/// Starts the simulator (workload included) on `listener`; serves until the process ends.
pub fn start_simulator(sim: Simulator, listener: TcpListener) {
    sim.spawn_workload();
    tokio::spawn(async move {
        if let Err(e) = sim.serve(listener, std::future::pending()).await {
            tracing::error!(error = %e, "simulator stopped");
        }
    });
}

/// Starts the demo's client application: it submits maxapi tasks through the exporter's
/// proxy at `exporter` (its `base_url` pointed at `/proxy/maxapi`, its own key in
/// `Authorization`) and polls them there until they finish, so the dashboards' "Application
/// traffic" row has data. Runs until the process ends; a failed poll is tried again next
/// round.
pub fn start_proxied_client(exporter: SocketAddr) {
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        let base = format!("http://{exporter}/proxy/maxapi/api/v1/task");
        let mut unfinished: VecDeque<String> = VecDeque::new();
        let mut round = tokio::time::interval(CLIENT_ROUND);
        for submission in 1u64.. {
            round.tick().await;
            let mut body = r#"{"model":"nano-banana","input":{"prompt":"a lighthouse at dusk"}}"#;
            if submission % CLIENT_REJECTED_EVERY == 2 {
                body = &body[..body.len() / 2];
            }
            let submit = http
                .post(format!("{base}/submit"))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
            if let Some(answer) = send(submit).await
                && let Some(id) = answer["data"]["taskId"].as_str()
            {
                unfinished.push_back(id.to_string());
            }
            for _ in 0..unfinished.len() {
                let Some(id) = unfinished.pop_front() else {
                    break;
                };
                let status = send(http.get(format!("{base}/{id}"))).await;
                let status = status.as_ref().and_then(|a| a["data"]["status"].as_str());
                if !matches!(
                    status,
                    Some("SUCCESS" | "FAILURE" | "TIMEOUT" | "CANCELLED")
                ) {
                    unfinished.push_back(id);
                }
            }
            while unfinished.len() > CLIENT_MAX_TASKS {
                unfinished.pop_front();
            }
        }
    });
}

/// Sends one request of the proxied client; its JSON answer, if any.
async fn send(request: reqwest::RequestBuilder) -> Option<serde_json::Value> {
    let answer = request.bearer_auth(DEMO_MAXAPI_KEY).send().await.ok()?;
    let body = answer.bytes().await.ok()?;
    serde_json::from_slice(&body).ok()
}

/// What `demo` prints: the URLs to open.
pub fn banner(exporter: SocketAddr, simulator: SocketAddr) -> String {
    format!(
        "genai-task-exporter demo is running (Ctrl-C to stop)\n  \
         landing page:        http://{exporter}/\n  \
         metrics:             http://{exporter}/metrics\n  \
         tracked tasks:       http://{exporter}/api/v1/tasks\n  \
         simulated providers: http://{simulator} (ground truth: http://{simulator}/_sim/truth)\n"
    )
}
