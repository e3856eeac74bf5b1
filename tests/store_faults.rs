//! Faults of the state store, made real: a tmpfs that fills up, the state directory deleted
//! under the running exporter, a 0-byte store, flipped bytes, and `kill -9` right after a
//! 200. Every run ends with counters equal to the simulator's ground truth, and a restart on
//! the same store is exact.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Exporter, Scrape, compare_with_truth, until_drained};
use genai_task_exporter::simulator::{
    GroundTruth, ModelKind, ModelSim, ProviderSim, Register, SimConfig, Simulator, Workload,
};
use genai_task_exporter::store::Store;
use tokio::net::TcpListener;

const MAXAPI_KEY: &str = "faults-maxapi-key";
const APIMALL_KEY: &str = "faults-apimall-key";
const API_TOKEN: &str = "faults-api-token";

fn model(name: &str, kind: ModelKind, credits: f64) -> ModelSim {
    ModelSim {
        latency_min: Duration::from_millis(200),
        latency_max: Duration::from_millis(1500),
        failure_ratio: 0.25,
        credits,
        ..ModelSim::named(name, kind)
    }
}

fn workload(tasks: u64, tasks_per_second: f64) -> SimConfig {
    let provider = |key: &str, models: Vec<ModelSim>| ProviderSim {
        api_keys: vec![key.to_string()],
        workload: Workload {
            tasks_per_second,
            total_tasks: Some(tasks),
            models,
        },
        ..ProviderSim::default()
    };
    SimConfig {
        seed: 23,
        maxapi: provider(
            MAXAPI_KEY,
            vec![model("nano-banana", ModelKind::Image, 0.0)],
        ),
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

fn exporter_yaml(sim: std::net::SocketAddr) -> String {
    format!(
        "server: {{api_token_env: API_TOKEN}}\n\
         polling: {{interval: 200ms, max_interval: 600ms, timeout: 500ms, requests_per_second: 200, max_concurrency: 8}}\n\
         providers:\n\
         \x20 - {{name: maxapi, type: maxapi, base_url: 'http://{sim}', token_env: MAXAPI_KEY}}\n\
         \x20 - name: apimall\n\
         \x20   type: apimall\n\
         \x20   base_url: http://{sim}\n\
         \x20   token_env: APIMALL_KEY\n\
         \x20   history: {{enabled: true, interval: 300ms, max_pages: 10, kinds: [images, videos]}}\n"
    )
}

const ENV: [(&str, &str); 3] = [
    ("MAXAPI_KEY", MAXAPI_KEY),
    ("APIMALL_KEY", APIMALL_KEY),
    ("API_TOKEN", API_TOKEN),
];

struct Run {
    sim: Simulator,
    sim_addr: std::net::SocketAddr,
    exporter: Exporter,
}

/// The simulator (maxapi ids registered through the API, apimall found in history) and an
/// exporter whose store lives in `state`.
async fn start(config: SimConfig, state: &Path) -> Run {
    let exporter_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let exporter_addr = exporter_listener.local_addr().unwrap();
    let mut config = config;
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
    let exporter =
        Exporter::start_on(exporter_listener, &exporter_yaml(sim_addr), &ENV, state).await;
    sim.spawn_workload();
    Run {
        sim,
        sim_addr,
        exporter,
    }
}

/// Waits until the simulator drained and every terminal task is counted.
async fn drain(run: &Run, timeout: Duration) -> (GroundTruth, Scrape) {
    until_drained(&run.sim, timeout, || run.exporter.scrape(), String::new).await
}

fn store_up(m: &Scrape) -> Option<f64> {
    m.get("genai_exporter_store_up", &[])
}

fn store_errors(m: &Scrape, operation: &str) -> f64 {
    m.sum(
        "genai_exporter_store_errors_total",
        &[("operation", operation)],
    )
}

/// The same store, opened by a new exporter after a clean stop: every counter as before.
async fn restart_is_exact(run: Run, truth: &GroundTruth, state: &Path) {
    run.exporter.stop().await;
    let again = Exporter::start(&exporter_yaml(run.sim_addr), &ENV, state).await;
    let m = again.scrape().await;
    let mismatches = compare_with_truth(truth, &m);
    assert!(mismatches.is_empty(), "after restart: {mismatches:?}");
    again.stop().await;
}

/// A tmpfs of `size` mounted on a new directory; unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(status.success(), "mount -t tmpfs (the tests run as root)");
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Fills the filesystem of `path` until a write fails with ENOSPC; returns the ballast.
fn fill(path: &Path) -> PathBuf {
    use std::io::Write;
    let ballast = path.join("ballast");
    let mut file = std::fs::File::create(&ballast).unwrap();
    let chunk = vec![0xA5u8; 64 * 1024];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // Byte by byte: not even a page is left.
    while file.write(&[0]).is_ok_and(|n| n == 1) {}
    let _ = file.sync_all();
    ballast
}

async fn register(exporter: &Exporter, ids: &[&str]) -> reqwest::Response {
    reqwest::Client::new()
        .post(exporter.url("/api/v1/tasks"))
        .bearer_auth(API_TOKEN)
        .json(&serde_json::json!({"provider": "maxapi", "task_ids": ids}))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_then_freed_loses_nothing() {
    let tmpfs = Tmpfs::mount("6m");
    let state = tmpfs.path().join("state");
    let run = start(workload(200, 20.0), &state).await;

    run.exporter
        .wait_for(Duration::from_secs(30), |m| {
            m.sum("genai_task_completions_total", &[]) >= 20.0
        })
        .await;
    let ballast = fill(tmpfs.path());
    let filled = Instant::now();
    // While the disk is full, commits that need new pages fail; a small one may still fit in
    // pages redb freed inside its file, so the store can come up briefly. Watch until it is
    // seen down, refusing readiness and a registration, all at once.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (down, refused_after) = loop {
        let m = run.exporter.scrape().await;
        if store_up(&m) == Some(0.0) {
            let ready = reqwest::get(run.exporter.url("/-/ready")).await.unwrap();
            let refused = register(&run.exporter, &["full-disk-registration"]).await;
            let status = refused.status();
            assert!(
                !status.is_success() || store_up(&run.exporter.scrape().await) == Some(1.0),
                "a 2xx only when a commit held it"
            );
            if ready.status() == 503 && status == 503 {
                assert!(refused.headers().contains_key("retry-after"));
                break (m, filled.elapsed());
            }
        }
        assert!(
            Instant::now() < deadline,
            "the store never went down on a full disk"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let frozen = down.sum("genai_task_completions_total", &[]);
    println!(
        "disk full: store_up 0, /-/ready 503 and a registration refused with 503 after {refused_after:?}; \
         completions {frozen}, commit errors {}",
        store_errors(&down, "commit")
    );
    assert!(store_errors(&down, "commit") >= 1.0);

    // The workload goes on for a while against a full disk.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = run.exporter.scrape().await;
    println!(
        "after 3 s more on a full disk: store_up {:?}, completions {}, commit errors {}, reopen errors {}",
        store_up(&during),
        during.sum("genai_task_completions_total", &[]),
        store_errors(&during, "commit"),
        store_errors(&during, "reopen")
    );

    std::fs::remove_file(&ballast).unwrap();
    let freed = Instant::now();
    let up = run
        .exporter
        .wait_for(Duration::from_secs(30), |m| store_up(m) == Some(1.0))
        .await;
    println!(
        "space freed: store_up 1 after {:?}, completions {} (were {frozen}), reopen errors {}",
        freed.elapsed(),
        up.sum("genai_task_completions_total", &[]),
        store_errors(&up, "reopen")
    );
    let ready = reqwest::get(run.exporter.url("/-/ready")).await.unwrap();
    assert_eq!(ready.status(), 200);

    let (truth, m) = drain(&run, Duration::from_secs(120)).await;
    for (provider, p) in &truth.providers {
        println!("{provider}: registrations {:?}", p.registrations);
    }
    let mismatches = compare_with_truth(&truth, &m);
    assert!(mismatches.is_empty(), "after the outage: {mismatches:?}");
    restart_is_exact(run, &truth, &state).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_directory_deleted_while_running_is_recreated() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let run = start(workload(150, 25.0), &state).await;
    run.exporter
        .wait_for(Duration::from_secs(30), |m| {
            m.sum("genai_task_completions_total", &[]) >= 20.0
        })
        .await;
    std::fs::remove_dir_all(&state).unwrap();
    let deleted = Instant::now();
    let m = run
        .exporter
        .wait_for(Duration::from_secs(20), |m| {
            store_errors(m, "replaced") >= 1.0
        })
        .await;
    assert!(state.join("state.redb").exists(), "store recreated");
    println!(
        "state dir deleted: recreated after {:?}, completions {}",
        deleted.elapsed(),
        m.sum("genai_task_completions_total", &[])
    );
    let (truth, m) = drain(&run, Duration::from_secs(120)).await;
    let mismatches = compare_with_truth(&truth, &m);
    assert!(mismatches.is_empty(), "after recreation: {mismatches:?}");
    restart_is_exact(run, &truth, &state).await;
}

fn config_file(dir: &Path, state: &Path) -> PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "state: {{path: '{}'}}\n\
             server: {{api_token_env: FAULTS_API_TOKEN}}\n\
             polling: {{interval: 1h, max_interval: 2h}}\n\
             providers:\n\
             \x20 - {{name: maxapi, type: maxapi, base_url: 'http://127.0.0.1:9', token_env: FAULTS_MAXAPI_KEY}}\n",
            state.display()
        ),
    )
    .unwrap();
    path
}

/// The binary with the keys in its environment; returns it and its address once listening.
fn spawn(
    config: &Path,
    extra: &[&str],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_genai-task-exporter"))
        .arg("--config.file")
        .arg(config)
        .args(["--web.listen-address", "127.0.0.1:0"])
        .args(extra)
        .env("FAULTS_API_TOKEN", API_TOKEN)
        .env("FAULTS_MAXAPI_KEY", MAXAPI_KEY)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn listening_address(lines: &std::sync::mpsc::Receiver<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(100))
            && line.contains("msg=listening")
            && let Some(rest) = line.split(" address=").nth(1)
        {
            return rest.split(' ').next().unwrap().to_string();
        }
    }
    panic!("no listening line");
}

fn exit_within(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_store_file_is_refused_unless_starting_fresh() {
    genai_task_exporter::upstream::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let db = state.join("state.redb");
    std::fs::write(&db, b"").unwrap();
    let config = config_file(dir.path(), &state);

    let (mut child, lines) = spawn(&config, &[]);
    let status = exit_within(&mut child, Duration::from_secs(20));
    let logs: Vec<String> = lines.try_iter().collect();
    assert_eq!(status.code(), Some(1), "{logs:?}");
    let logs = logs.join("\n");
    assert!(
        logs.contains(&db.display().to_string()) && logs.contains("empty"),
        "the message names the file: {logs}"
    );
    assert_eq!(std::fs::metadata(&db).unwrap().len(), 0, "left untouched");

    let (mut child, lines) = spawn(&config, &["--state.start-fresh"]);
    let addr = listening_address(&lines);
    let ready = reqwest::get(format!("http://{addr}/-/healthy"))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert!(std::fs::metadata(&db).unwrap().len() > 0, "a new store");
    let kept: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".old"))
        .collect();
    assert_eq!(kept.len(), 1, "the empty file is kept, renamed");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_from_registration_survives_kill_9() {
    genai_task_exporter::upstream::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = config_file(dir.path(), &state);
    let (mut child, lines) = spawn(&config, &[]);
    let addr = listening_address(&lines);
    let ids: Vec<String> = (0..50).map(|i| format!("durable-{i:03}")).collect();
    let client = reqwest::Client::new();
    let answer = client
        .post(format!("http://{addr}/api/v1/tasks"))
        .bearer_auth(API_TOKEN)
        .json(&serde_json::json!({"provider": "maxapi", "task_ids": ids}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    // SIGKILL the moment the answer is in: no flush, no shutdown.
    child.kill().unwrap();
    child.wait().unwrap();

    let (mut child, lines) = spawn(&config, &[]);
    let addr = listening_address(&lines);
    let listed: serde_json::Value = client
        .get(format!(
            "http://{addr}/api/v1/tasks?provider=maxapi&limit=1000"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut found: Vec<String> = listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap_or_default().to_string())
        .collect();
    found.sort();
    assert_eq!(found, ids, "every acknowledged id is there after kill -9");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A store with tasks, tombstones and counters, written by a real exporter run.
fn sample_store(dir: &Path) -> Vec<u8> {
    let store = Store::open(dir).unwrap();
    let mut batch = genai_task_exporter::store::Batch::default();
    for i in 0..200 {
        let key = genai_task_exporter::store::task_key("maxapi", &format!("task-{i}"));
        batch.put_tasks.push((key.clone(), vec![i as u8; 40]));
        batch.put_tombstones.push((key, 1_700_000_000_000 + i));
    }
    batch.put_counters.push((
        "completions\u{1f}maxapi".into(),
        1.0f64.to_le_bytes().to_vec(),
    ));
    store.commit(&batch).unwrap();
    drop(store);
    std::fs::read(dir.join("state.redb")).unwrap()
}

/// Reads everything a start-up reads; an error must name the file (and the row when a row's
/// checksum fails). Never a panic.
fn read_all(dir: &Path) -> Result<(), String> {
    let store = Store::open(dir).map_err(|e| e.to_string())?;
    store.load().map_err(|e| e.to_string())?;
    store.for_each_key(|_| {}).map_err(|e| e.to_string())?;
    Ok(())
}

#[test]
fn flipped_bytes_are_refused_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let good = sample_store(dir.path());
    let db = dir.path().join("state.redb");
    let mut refused = 0;
    let mut bad_rows = 0;
    let mut offsets = 0;
    // Every byte of the header, and a spread over the rest (the rows sit in a few pages).
    let chosen: Vec<usize> = (0..good.len())
        .filter(|&i| i < 320 || i % 509 == 0)
        .collect();
    for &offset in &chosen {
        let mut bytes = good.clone();
        bytes[offset] ^= 0x10;
        std::fs::write(&db, &bytes).unwrap();
        offsets += 1;
        let result = std::panic::catch_unwind(|| read_all(dir.path()));
        let result = result.unwrap_or_else(|_| panic!("panic at offset {offset}"));
        if let Err(message) = result {
            refused += 1;
            assert!(
                message.contains(&db.display().to_string()),
                "offset {offset}: {message}"
            );
            if message.contains("fails its checksum") {
                bad_rows += 1;
                assert!(message.contains("row ") && message.contains("table "));
            }
        }
    }
    println!("flipped {offsets} offsets: {refused} refused, {bad_rows} by row checksum");
    assert!(
        bad_rows > 0,
        "some flips land in rows and are caught by their checksum"
    );

    // A flip inside the counter value: the row is named.
    let value = 1.0f64.to_le_bytes();
    let at = good
        .windows(value.len())
        .position(|w| w == value)
        .expect("the counter value is in the file");
    let mut bytes = good.clone();
    bytes[at + 2] ^= 0x01;
    std::fs::write(&db, &bytes).unwrap();
    let message = read_all(dir.path()).unwrap_err();
    assert!(
        message.contains("counters") && message.contains("maxapi"),
        "{message}"
    );
}
