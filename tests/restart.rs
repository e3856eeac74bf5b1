//! `kill -9` mid-way: the real binary is killed while tasks are in flight, restarted on the
//! same store, and left to drain. Every counter ends equal to the simulator's ground truth
//! (nothing lost, nothing counted twice), and no counter is ever lower after the restart
//! than it was before.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Binary, Scrape, compare_with_truth, until_drained};
use genai_task_exporter::simulator::{
    Faults, ModelKind, ModelSim, ProviderSim, SimConfig, SimProvider, Simulator, Workload,
};

const MAXAPI_KEY: &str = "restart-maxapi-key";
const APIMALL_KEY: &str = "restart-apimall-key";
const TASKS: u64 = 200;

fn model(name: &str, kind: ModelKind, credits: f64) -> ModelSim {
    ModelSim {
        latency_min: Duration::from_millis(500),
        latency_max: Duration::from_secs(4),
        failure_ratio: 0.25,
        credits,
        ..ModelSim::named(name, kind)
    }
}

fn simulator() -> SimConfig {
    let faults = Faults {
        error_500_ratio: 0.05,
        malformed_ratio: 0.02,
        ..Faults::default()
    };
    let provider = |key: &str, models: Vec<ModelSim>| ProviderSim {
        api_keys: vec![key.to_string()],
        workload: Workload {
            tasks_per_second: 25.0,
            total_tasks: Some(TASKS),
            models,
        },
        faults: faults.clone(),
        ..ProviderSim::default()
    };
    let mut maxapi = vec![model("nano-banana", ModelKind::Image, 0.0)];
    maxapi[0].timeout_ratio = 0.05;
    maxapi[0].cancel_ratio = 0.05;
    SimConfig {
        seed: 11,
        maxapi: provider(MAXAPI_KEY, maxapi),
        apimall: provider(
            APIMALL_KEY,
            vec![
                model("nano-banana", ModelKind::Image, 8.0),
                model("veo3-fast", ModelKind::Video, 2.5),
            ],
        ),
        ..SimConfig::default()
    }
}

/// The exporter binary on `config`, once listening.
async fn start_binary(config: &Path) -> Binary {
    let args = [
        "--config.file",
        config.to_str().unwrap(),
        "--web.listen-address",
        "127.0.0.1:0",
        "--log.level",
        "info",
    ];
    Binary::start_with_env(
        &args,
        &[("MAXAPI_KEY", MAXAPI_KEY), ("APIMALL_KEY", APIMALL_KEY)],
    )
    .await
}

/// Every counter sample of `before` (counters and histogram parts) is at least as large in `after`.
fn never_lower(before: &Scrape, after: &Scrape) -> Vec<String> {
    let mut lower = Vec::new();
    for s in &before.samples {
        let family = s
            .name
            .trim_end_matches("_bucket")
            .trim_end_matches("_count")
            .trim_end_matches("_sum");
        let kind = before
            .types
            .get(&s.name)
            .or_else(|| before.types.get(family));
        if !matches!(kind.map(String::as_str), Some("counter" | "histogram"))
            || s.name.starts_with("process_")
        {
            continue;
        }
        let now = after
            .samples
            .iter()
            .find(|a| a.name == s.name && a.labels == s.labels)
            .map_or(0.0, |a| a.value);
        if now < s.value {
            lower.push(format!(
                "{} {:?}: {} before, {} after",
                s.name, s.labels, s.value, now
            ));
        }
    }
    lower
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_way_loses_nothing_and_counts_nothing_twice() {
    genai_task_exporter::upstream::install_crypto_provider();
    let sim = Simulator::new(simulator());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_addr = listener.local_addr().unwrap();
    tokio::spawn(sim.clone().serve(listener, std::future::pending()));

    let dir = tempfile::tempdir().unwrap();
    let ids_file = dir.path().join("maxapi-tasks.txt");
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "polling: {{interval: 300ms, max_interval: 1s, timeout: 2s, requests_per_second: 100}}\n\
             state: {{path: '{state}'}}\n\
             providers:\n\
             \x20 - {{name: maxapi, type: maxapi, base_url: 'http://{sim_addr}', token_env: MAXAPI_KEY, task_files: ['{ids}']}}\n\
             \x20 - name: apimall\n\
             \x20   type: apimall\n\
             \x20   base_url: http://{sim_addr}\n\
             \x20   token_env: APIMALL_KEY\n\
             \x20   history: {{enabled: true, interval: 500ms, max_pages: 10, kinds: [images, videos]}}\n",
            state = dir.path().join("state").display(),
            ids = ids_file.display(),
        ),
    )
    .unwrap();
    std::fs::write(&ids_file, "").unwrap();

    // maxapi tasks reach the exporter through a task file, as a submitting job would write it.
    common::spawn_task_file_writer(sim.clone(), SimProvider::Maxapi, ids_file.clone());

    let mut first = start_binary(&config).await;
    sim.spawn_workload();

    // Run until about a third of the work is counted, then kill -9.
    let total = (2 * TASKS) as f64;
    let before = loop {
        let m = first.scrape().await;
        let counted = m.sum("genai_task_completions_total", &[]);
        if counted >= total / 3.0 {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    first.child.kill().unwrap(); // SIGKILL
    first.child.wait().unwrap();
    let counted_before = before.sum("genai_task_completions_total", &[]);
    println!("killed with {counted_before} of {total} tasks counted");
    assert!(counted_before < total, "the kill must happen mid-way");

    let second = start_binary(&config).await;
    let after_restart = second.scrape().await;
    let lower = never_lower(&before, &after_restart);
    assert!(
        lower.is_empty(),
        "counters went down across the restart:\n{}",
        lower.join("\n")
    );

    let (truth, m) = until_drained(
        &sim,
        Duration::from_secs(120),
        || second.scrape(),
        String::new,
    )
    .await;
    let mismatches = compare_with_truth(&truth, &m);
    assert!(
        mismatches.is_empty(),
        "counters differ from the ground truth after kill -9: {mismatches:?}"
    );
    let lower = never_lower(&before, &m);
    assert!(lower.is_empty(), "{}", lower.join("\n"));
    assert_eq!(
        m.sum("genai_task_discovered_total", &[("provider", "maxapi")]),
        TASKS as f64,
        "each id discovered once"
    );
    assert_eq!(
        m.sum("genai_task_discovered_total", &[("provider", "apimall")]),
        TASKS as f64
    );
}
