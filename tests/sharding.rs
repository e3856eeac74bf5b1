//! Sharding: replicas split the tasks so that each is polled by exactly one of them, and the
//! sum over replicas of every counter equals the ground truth, for 3 shards, for 1, and
//! across a re-shard from 3 to 4.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Exporter, Scrape, compare_with_truth, until_drained};
use genai_task_exporter::simulator::{
    GroundTruth, ModelKind, ModelSim, ProviderSim, SimConfig, SimProvider, Simulator, Workload,
};

const TASKS: u64 = 120;

fn key(shard: usize) -> String {
    format!("shard-key-{shard}")
}

fn simulator(shards: usize) -> SimConfig {
    let keys: Vec<String> = (0..shards).map(key).collect();
    let model = |name: &str, kind, credits| ModelSim {
        latency_min: Duration::from_millis(300),
        latency_max: Duration::from_secs(3),
        failure_ratio: 0.3,
        credits,
        ..ModelSim::named(name, kind)
    };
    let provider = |models: Vec<ModelSim>| ProviderSim {
        api_keys: keys.clone(),
        workload: Workload {
            tasks_per_second: 30.0,
            total_tasks: Some(TASKS),
            models,
        },
        ..ProviderSim::default()
    };
    SimConfig {
        seed: 3,
        maxapi: provider(vec![model("nano-banana", ModelKind::Image, 0.0)]),
        apimall: provider(vec![
            model("nano-banana", ModelKind::Image, 8.0),
            model("suno-v4", ModelKind::Audio, 1.5),
        ]),
        ..SimConfig::default()
    }
}

struct Cluster {
    sim: Simulator,
    sim_addr: std::net::SocketAddr,
    ids_file: PathBuf,
    _files: tempfile::TempDir,
}

/// Starts the simulator and a writer appending maxapi ids to the shared task file.
async fn cluster(shards: usize) -> Cluster {
    genai_task_exporter::upstream::install_crypto_provider();
    let sim = Simulator::new(simulator(shards));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim_addr = listener.local_addr().unwrap();
    tokio::spawn(sim.clone().serve(listener, std::future::pending()));
    let files = tempfile::tempdir().unwrap();
    let ids_file = files.path().join("maxapi.txt");
    std::fs::write(&ids_file, "").unwrap();
    common::spawn_task_file_writer(sim.clone(), SimProvider::Maxapi, ids_file.clone());
    Cluster {
        sim,
        sim_addr,
        ids_file,
        _files: files,
    }
}

fn shard_yaml(c: &Cluster, index: usize, count: usize) -> String {
    let yaml = format!(
        "sharding: {{index: {index}, count: {count}}}\n\
         polling: {{interval: 200ms, max_interval: 600ms, requests_per_second: 100}}\n\
         providers:\n\
         \x20 - {{name: maxapi, type: maxapi, base_url: 'http://{sim}', token_env: KEY, task_files: ['{ids}']}}\n\
         \x20 - {{name: apimall, type: apimall, base_url: 'http://{sim}', token_env: KEY,\n\
         \x20     history: {{enabled: true, interval: 300ms, max_pages: 10, kinds: [images, audio]}},\n\
         \x20     balance: {{enabled: true, interval: 300ms}}}}\n",
        sim = c.sim_addr,
        ids = c.ids_file.display()
    );
    yaml
}

/// Starts shard `index` of `count`, with its own key and state directory.
async fn shard(c: &Cluster, index: usize, count: usize, state: &Path) -> Exporter {
    let k = key(index);
    Exporter::start(&shard_yaml(c, index, count), &[("KEY", k.as_str())], state).await
}

/// All shards' samples in one scrape: `sum` over it adds the shards up.
async fn scrape_all(shards: &[Exporter]) -> Scrape {
    let mut merged = Scrape::parse("");
    for s in shards {
        let m = s.scrape().await;
        merged.samples.extend(m.samples);
        merged.types.extend(m.types);
    }
    merged
}

async fn drain(c: &Cluster, shards: &[Exporter]) -> (GroundTruth, Scrape) {
    until_drained(
        &c.sim,
        Duration::from_secs(90),
        || scrape_all(shards),
        String::new,
    )
    .await
}

async fn run(count: usize) {
    let c = cluster(count).await;
    let dirs: Vec<tempfile::TempDir> = (0..count).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut shards = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        shards.push(shard(&c, i, count, d.path()).await);
    }
    c.sim.spawn_workload();
    let (truth, m) = drain(&c, &shards).await;

    let polls = c.sim.polls(None);
    println!("{count} shard(s): {:?}", polls.summary);
    assert_eq!(
        polls.summary.max_distinct_keys_per_task, 1,
        "a task was polled by two shards"
    );
    // Every maxapi task is polled; apimall tasks are mostly learnt from the history listing
    // itself (a finished item costs no get-task request), so only some of them are polled.
    let maxapi = c.sim.polls(Some(SimProvider::Maxapi));
    assert_eq!(maxapi.summary.tasks_polled, TASKS);
    assert!(polls.summary.tasks_polled <= 2 * TASKS);
    let mismatches = compare_with_truth(&truth, &m);
    assert!(mismatches.is_empty(), "{mismatches:?}");
    // Each shard found only its own tasks; together, all of them, once.
    assert_eq!(
        m.sum("genai_task_discovered_total", &[("provider", "maxapi")]),
        TASKS as f64
    );
    assert_eq!(
        m.sum("genai_task_discovered_total", &[("provider", "apimall")]),
        TASKS as f64
    );
    // The account balance is read by shard 0 only.
    let balance_readers = m
        .matching("genai_account_credits", &[("kind", "credits")])
        .count();
    assert_eq!(balance_readers, 1);
    assert_eq!(
        m.matching(
            "genai_exporter_shard_info",
            &[("count", &count.to_string())]
        )
        .count(),
        count
    );
    for s in shards {
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_shards_poll_each_task_once_and_add_up_to_the_truth() {
    run(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shard_adds_up_to_the_truth() {
    run(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_from_three_to_four_loses_and_doubles_nothing() {
    let c = cluster(4).await;
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut shards = Vec::new();
    for (i, d) in dirs.iter().take(3).enumerate() {
        shards.push(shard(&c, i, 3, d.path()).await);
    }
    c.sim.spawn_workload();
    let total = (2 * TASKS) as f64;
    let before = loop {
        let m = scrape_all(&shards).await;
        if m.sum("genai_task_completions_total", &[]) >= total / 3.0 {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for s in shards.drain(..) {
        s.stop().await;
    }

    // Starting a shard on a store written for another count is refused...
    let k = key(0);
    let refused = Exporter::try_start(
        &shard_yaml(&c, 0, 4),
        &[("KEY", k.as_str())],
        dirs[0].path(),
    )
    .await;
    let error = refused
        .err()
        .expect("a store of 3 shards must not start as one of 4 before reshard");
    assert!(
        error
            .to_string()
            .contains("run `genai-task-exporter reshard"),
        "{error}"
    );

    // ...until `reshard` has moved the tasks to their new owners.
    let paths: Vec<PathBuf> = dirs.iter().map(|d| d.path().to_path_buf()).collect();
    let report = genai_task_exporter::reshard::reshard(&paths, 4).unwrap();
    println!("reshard: {report:?}");
    assert!(report.tasks_moved > 0);
    for (i, d) in dirs.iter().enumerate() {
        shards.push(shard(&c, i, 4, d.path()).await);
    }
    let after = scrape_all(&shards).await;
    assert!(
        after.sum("genai_task_completions_total", &[])
            >= before.sum("genai_task_completions_total", &[]),
        "totals over the shards went down"
    );
    let (truth, m) = drain(&c, &shards).await;
    let mismatches = compare_with_truth(&truth, &m);
    assert!(mismatches.is_empty(), "{mismatches:?}");
    for s in shards {
        s.stop().await;
    }
}
