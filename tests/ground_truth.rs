//! The exporter against the simulated providers: once a fixed workload has drained, every
//! counter equals what the simulator really did, despite 5xx, 429 bursts, timeouts, malformed
//! bodies and an outage window.

mod common;

use std::time::Duration;

use common::{Exporter, Scrape, compare_with_truth as compare, until_drained};
use genai_task_exporter::simulator::{
    FailureMix, Faults, GroundTruth, ModelKind, ModelSim, Outage, ProviderSim, Register, SimConfig,
    Simulator, Workload,
};
use genai_task_exporter::task::Status;
use tokio::net::TcpListener;

const MAXAPI_KEY: &str = "sim-maxapi-key";
const APIMALL_KEY: &str = "sim-apimall-key";
const API_TOKEN: &str = "sim-api-token";

fn model(name: &str, kind: ModelKind, failure_ratio: f64, credits: f64) -> ModelSim {
    ModelSim {
        latency_min: Duration::from_millis(200),
        latency_max: Duration::from_millis(1500),
        failure_ratio,
        credits,
        failure_reasons: FailureMix {
            content_moderation: 1.0,
            invalid_parameters: 1.0,
            insufficient_credits: 1.0,
            unspecified: 1.0,
            other: 1.0,
        },
        ..ModelSim::named(name, kind)
    }
}

/// A fixed workload on both providers; `faults` on both.
fn workload(faults: Faults, tasks: u64) -> SimConfig {
    let mut maxapi_models = vec![
        model("nano-banana", ModelKind::Image, 0.25, 0.0),
        model("seedance-1-pro", ModelKind::Video, 0.2, 0.0),
    ];
    maxapi_models[0].timeout_ratio = 0.05;
    maxapi_models[0].cancel_ratio = 0.05;
    let apimall_models = vec![
        model("nano-banana", ModelKind::Image, 0.3, 8.0),
        model("veo3-fast", ModelKind::Video, 0.2, 2.5),
        model("suno-v4", ModelKind::Audio, 0.2, 1.0),
    ];
    let provider = |key: &str, models: Vec<ModelSim>| ProviderSim {
        api_keys: vec![key.to_string()],
        workload: Workload {
            tasks_per_second: 25.0,
            total_tasks: Some(tasks),
            models,
        },
        faults: faults.clone(),
        ..ProviderSim::default()
    };
    SimConfig {
        seed: 7,
        maxapi: provider(MAXAPI_KEY, maxapi_models),
        apimall: provider(APIMALL_KEY, apimall_models),
        ..SimConfig::default()
    }
}

fn exporter_yaml(sim: std::net::SocketAddr, requests_per_second: u32) -> String {
    format!(
        "server: {{api_token_env: API_TOKEN}}\n\
         polling: {{interval: 200ms, max_interval: 600ms, timeout: 500ms, requests_per_second: {requests_per_second}, max_concurrency: 8}}\n\
         providers:\n\
         \x20 - {{name: maxapi, type: maxapi, base_url: 'http://{sim}', token_env: MAXAPI_KEY}}\n\
         \x20 - name: apimall\n\
         \x20   type: apimall\n\
         \x20   base_url: http://{sim}\n\
         \x20   token_env: APIMALL_KEY\n\
         \x20   history: {{enabled: true, interval: 300ms, max_pages: 10, kinds: [images, videos, audio]}}\n"
    )
}

struct Run {
    sim: Simulator,
    exporter: Exporter,
    _dir: tempfile::TempDir,
}

async fn start(config: SimConfig, requests_per_second: u32) -> Run {
    let exporter_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let exporter_addr = exporter_listener.local_addr().unwrap();
    let mut config = config;
    // maxapi has no history: its tasks are registered as they are created.
    config.maxapi.register = Some(Register {
        url: format!("http://{exporter_addr}/api/v1/tasks"),
        token_env: None,
        token: Some(API_TOKEN.into()),
        provider_name: Some("maxapi".into()),
    });
    let sim = Simulator::new(config);
    let sim_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_addr = sim_listener.local_addr().unwrap();
    tokio::spawn(sim.clone().serve(sim_listener, std::future::pending()));
    let dir = tempfile::tempdir().unwrap();
    let exporter = Exporter::start_on(
        exporter_listener,
        &exporter_yaml(sim_addr, requests_per_second),
        &[
            ("MAXAPI_KEY", MAXAPI_KEY),
            ("APIMALL_KEY", APIMALL_KEY),
            ("API_TOKEN", API_TOKEN),
        ],
        dir.path(),
    )
    .await;
    sim.spawn_workload();
    Run {
        sim,
        exporter,
        _dir: dir,
    }
}

/// Waits until the simulator has drained and the exporter has counted every terminal task;
/// on a timeout, lists the tasks the exporter still has in flight.
async fn drain(run: &Run, timeout: Duration) -> (GroundTruth, Scrape) {
    let unfinished = || {
        let tasks: Vec<String> = run
            .exporter
            .app
            .registry
            .providers()
            .iter()
            .flat_map(|p| p.list(None, 10_000))
            .filter(|t| !Status::parse(t.status).unwrap().is_terminal())
            .map(|t| format!("{t:?}"))
            .collect();
        format!("; unfinished tasks:\n{}", tasks.join("\n"))
    };
    until_drained(&run.sim, timeout, || run.exporter.scrape(), unfinished).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_equal_ground_truth_despite_faults() {
    let faults = Faults {
        error_500_ratio: 0.10,
        // The exporter asks apimall little (history items are observations), so the ratios
        // are high enough that each fault still shows up in a run of a hundred-odd requests.
        error_429_ratio: 0.06,
        retry_after: Some(1),
        timeout_ratio: 0.02,
        timeout_delay: Duration::from_millis(900),
        malformed_ratio: 0.05,
        outages: vec![Outage {
            start: Duration::from_secs(2),
            duration: Duration::from_secs(2),
        }],
        rate_limit_rps: None,
    };
    let run = start(workload(faults, 150), 200).await;
    let (truth, m) = drain(&run, Duration::from_secs(120)).await;

    // The faults really happened.
    for (provider, p) in &truth.providers {
        println!("{provider} faults served: {:?}", p.faults);
        assert!(
            p.faults.error_500 > 0
                && p.faults.malformed > 0
                && p.faults.error_429 > 0
                && p.faults.outage_503 > 0
        );
        assert_eq!(p.totals.created, 150);
    }
    assert!(
        m.get(
            "genai_upstream_requests_total",
            &[
                ("provider", "apimall"),
                ("endpoint", "task"),
                ("code", "500")
            ]
        )
        .unwrap_or(0.0)
            > 0.0
    );
    assert!(
        m.sum(
            "genai_upstream_errors_total",
            &[("error", "invalid_response")]
        ) > 0.0
    );

    let mismatches = compare(&truth, &m);
    assert!(
        mismatches.is_empty(),
        "counters differ from the ground truth: {mismatches:?}"
    );
    assert_eq!(
        m.sum(
            "genai_task_discovered_total",
            &[("provider", "maxapi"), ("source", "api")]
        ),
        150.0
    );
    assert_eq!(
        m.sum(
            "genai_task_discovered_total",
            &[("provider", "apimall"), ("source", "history")]
        ),
        150.0
    );
    assert_eq!(m.sum("genai_task_dropped_total", &[]), 0.0);
    run.exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_below_the_providers_rate_limit_is_never_refused() {
    let faults = Faults {
        rate_limit_rps: Some(20.0),
        ..Faults::default()
    };
    // 15 requests per second against a gateway that refuses past 20.
    let run = start(workload(faults, 60), 15).await;
    let (truth, m) = drain(&run, Duration::from_secs(120)).await;
    for (provider, p) in &truth.providers {
        println!(
            "{provider}: requests {:?}, rate-limited answers {}",
            p.requests, p.faults.rate_limited
        );
        assert_eq!(
            p.faults.rate_limited, 0,
            "{provider} was refused by the rate limit"
        );
        assert!(p.requests.values().sum::<u64>() > 60);
    }
    assert_eq!(
        m.sum("genai_upstream_requests_total", &[("code", "429")]),
        0.0
    );
    assert!(compare(&truth, &m).is_empty());
    run.exporter.stop().await;
}
