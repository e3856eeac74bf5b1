//! `demo`: the simulated providers and the exporter in one process on loopback, wired the
//! way a real deployment is: maxapi tasks are registered through the exporter's API (as a
//! submitting client would) and reported by callbacks (each confirmed by one get-task request,
//! so the demo shows maxapi up within seconds, not after the first safety poll); apimall tasks are found through its
//! history listing; apimall's balance is polled.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::TcpListener;

use crate::config::{self, Overrides, Settings};
use crate::simulator::{Register, SimConfig, Simulator};

/// Credentials of the demo; they protect nothing but loopback toys.
const DEMO_API_TOKEN: &str = "demo-api-token";
const DEMO_WEBHOOK_TOKEN: &str = "demo-webhook-token";

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
        "DEMO_MAXAPI_KEY" => Some("demo-maxapi-key".into()),
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
