//! Load benchmark of the exporter on one machine, loopback only (`scripts/bench` runs it).
//!
//! `loadbench all` runs every measurement in a fresh child process of its own and prints
//! one table. Each measurement can also be run alone (`loadbench <phase> --help`); it then
//! prints one `RESULT key=value ...` line, which `all` reads.
//!
//! The upstream is a minimal local responder (a child process: `loadbench responder`) that
//! answers one fixed maxapi task JSON (status `PROCESSING`) for any path, so that the
//! exporter and `wrk` talk to the very same server.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use genai_task_exporter::app::App;
use genai_task_exporter::config::{
    DEFAULT_LATENCY_BUCKETS, Overrides, Polling, ProviderSettings, ProviderType, Settings, Shard,
};
use genai_task_exporter::providers::FailureRules;
use genai_task_exporter::registry::{ProviderTasks, Source};
use genai_task_exporter::secret::Secret;
use genai_task_exporter::task::{Observation, Status, now_millis};

const PROVIDER: &str = "maxapi";
const MODELS: [&str; 8] = [
    "nano-banana",
    "nano-banana-pro",
    "seedream-4",
    "flux-kontext-pro",
    "veo3-fast",
    "kling-2.1",
    "sora-2",
    "midjourney-v7",
];

#[derive(Parser)]
#[command(about = "genai-task-exporter load benchmark (loopback only)")]
struct Cli {
    #[command(subcommand)]
    phase: Phase,
}

#[derive(Subcommand)]
enum Phase {
    /// Every measurement, each in a fresh process; prints the table.
    All(AllArgs),
    /// The local upstream: prints `listening ADDR`, serves until stdin closes.
    Responder,
    /// Poll throughput of the real poller against the responder at ADDR.
    Poll {
        #[arg(long)]
        upstream: SocketAddr,
        #[arg(long, default_value_t = 64)]
        connections: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// For comparison: throughput of a bare reqwest client (no exporter), CONNECTIONS
    /// requests in flight.
    PollBare {
        #[arg(long)]
        upstream: SocketAddr,
        #[arg(long, default_value_t = 64)]
        connections: u32,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// /metrics latency over HTTP with TASKS tracked tasks.
    Scrape {
        #[arg(long)]
        tasks: usize,
        #[arg(long, default_value_t = 1000)]
        scrapes: usize,
    },
    /// Resident memory per tracked task.
    Memory {
        #[arg(long, default_value_t = 1_000_000)]
        tasks: usize,
        /// Registry only (no store, no runtime) instead of the whole exporter.
        #[arg(long)]
        registry_only: bool,
    },
    /// Writes the state of a first run with TASKS tasks into DIR.
    RestartWrite {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 1_000_000)]
        tasks: usize,
    },
    /// Time from App::start on DIR until ready (first poll answered).
    Restart {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        upstream: SocketAddr,
        /// Exit at once when ready, like `kill -9` (the store is not closed cleanly).
        #[arg(long)]
        crash: bool,
    },
    /// For comparison: CPU of a bare reqwest loop (no exporter) at RATE requests/s.
    CpuBare {
        #[arg(long)]
        upstream: SocketAddr,
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// CPU of the exporter process polling at a fixed RATE requests/s.
    Cpu {
        #[arg(long)]
        upstream: SocketAddr,
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

#[derive(clap::Args, Clone)]
struct AllArgs {
    /// Connections of both the exporter (max_concurrency) and wrk.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// Seconds of each throughput and CPU run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Runs of each measurement; the table shows the median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Largest task count (memory, restart, last scrape size).
    #[arg(long, default_value_t = 1_000_000)]
    max_tasks: usize,
}

fn main() {
    let cli = Cli::parse();
    genai_task_exporter::upstream::install_crypto_provider();
    match cli.phase {
        Phase::All(args) => all(args),
        Phase::Responder => runtime().block_on(responder()),
        Phase::Poll {
            upstream,
            connections,
            seconds,
        } => runtime().block_on(poll(upstream, connections, seconds)),
        Phase::PollBare {
            upstream,
            connections,
            seconds,
        } => runtime().block_on(poll_bare(upstream, connections, seconds)),
        Phase::Scrape { tasks, scrapes } => runtime().block_on(scrape(tasks, scrapes)),
        Phase::Memory {
            tasks,
            registry_only,
        } => {
            if registry_only {
                memory_registry(tasks)
            } else {
                runtime().block_on(memory_exporter(tasks))
            }
        }
        Phase::RestartWrite { dir, tasks } => runtime().block_on(restart_write(&dir, tasks)),
        Phase::Restart {
            dir,
            upstream,
            crash,
        } => runtime().block_on(restart(&dir, upstream, crash)),
        Phase::Cpu {
            upstream,
            rate,
            seconds,
        } => runtime().block_on(cpu(upstream, rate, seconds)),
        Phase::CpuBare {
            upstream,
            rate,
            seconds,
        } => runtime().block_on(cpu_bare(upstream, rate, seconds)),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    // The product's runtime: multi-threaded, one worker per core.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn result(pairs: &[(&str, String)]) {
    let line: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("RESULT {}", line.join(" "));
}

// ---------------------------------------------------------------------------------------
// Ids and the exporter set-up
// ---------------------------------------------------------------------------------------

/// A random version-4 UUID, 36 characters.
fn uuid() -> String {
    let a = fastrand::u128(..);
    let a = (a & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let h = format!("{a:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn polling(rate: f64, concurrency: u32, interval: Duration) -> Polling {
    Polling {
        interval,
        max_interval: interval,
        timeout: Duration::from_secs(10),
        requests_per_second: rate,
        max_concurrency: concurrency,
        max_task_age: Duration::from_secs(6 * 3600),
        retention: Duration::from_secs(3600),
        ..Polling::default()
    }
}

fn settings(state: &Path, upstream: SocketAddr, polling: Polling) -> Settings {
    Settings {
        source: state.join("bench.yaml"),
        listen_address: "127.0.0.1:0".parse().expect("address"),
        api_token: None,
        state_path: state.to_path_buf(),
        max_models_per_provider: 50,
        latency_buckets: DEFAULT_LATENCY_BUCKETS.to_vec(),
        shard: Shard::default(),
        peer_url_template: None,
        providers: vec![ProviderSettings {
            name: PROVIDER.into(),
            kind: ProviderType::Maxapi,
            base_url: format!("http://{upstream}"),
            token: Secret::new("bench-token"),
            polling,
            tasks: vec![],
            task_files: vec![],
            webhook_token: None,
            history: None,
            balance_interval: None,
            failure_rules: FailureRules::default(),
            failure_rules_source: vec![],
            webhook_confirm: false,
            proxy: Default::default(),
        }],
    }
}

fn tasks_of(app: &App) -> Arc<ProviderTasks> {
    app.registry.provider(PROVIDER).expect("provider exists")
}

/// Tracks `n` tasks and gives each a model and a status, like answers would. Pending work
/// is handed to `drain` every 10,000 tasks, as the persister takes it every 200 ms.
fn populate(tasks: &ProviderTasks, n: usize, mut drain: impl FnMut(&ProviderTasks)) {
    let now = now_millis();
    let statuses = [
        Status::Running,
        Status::Running,
        Status::Running,
        Status::Pending,
        Status::Succeeded,
        Status::Failed,
    ];
    for i in 0..n {
        let id = uuid();
        tasks.track(&id, Source::Api, now);
        let status = statuses[i % statuses.len()];
        let mut obs = Observation::new(
            id,
            status,
            match status {
                Status::Running => "PROCESSING",
                Status::Pending => "PENDING",
                Status::Succeeded => "SUCCESS",
                _ => "FAILURE",
            },
        );
        obs.model = Some(MODELS[i % MODELS.len()].to_string());
        obs.created_at = Some(now - 60_000 + (i % 60_000) as i64);
        obs.updated_at = Some(now);
        tasks.observe(&obs, now);
        if i % 10_000 == 9_999 {
            drain(tasks);
        }
    }
    drain(tasks);
}

fn state_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(name)
        .tempdir()
        .expect("temporary directory")
}

// ---------------------------------------------------------------------------------------
// The responder
// ---------------------------------------------------------------------------------------

fn task_body() -> bytes::Bytes {
    let created = humantime::format_rfc3339_micros(std::time::SystemTime::now());
    bytes::Bytes::from(format!(
        r#"{{"code":0,"msg":"ok","data":{{"taskId":"9db7d1ed-d1e5-4d11-9f3a-61f653b905ad","status":"PROCESSING","input":{{"model":"nano-banana","prompt":"a lighthouse at dusk","ratio":"16:9","resolution":"2k"}},"result":null,"failure_reason":null,"created_at":"{created}","updated_at":"{created}"}}}}"#
    ))
}

async fn responder() {
    use hyper::body::Incoming;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    println!("listening {}", listener.local_addr().expect("bound"));
    std::io::stdout().flush().expect("stdout");
    let body = task_body();
    // Serve until the parent closes our stdin.
    std::thread::spawn(|| {
        let mut sink = String::new();
        let _ = std::io::stdin().read_line(&mut sink);
        std::process::exit(0);
    });
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_req: Request<Incoming>| {
                let body = body.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(
                        Response::builder()
                            .header("content-type", "application/json")
                            .body(http_body_util_full(body))
                            .expect("response"),
                    )
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A complete body (axum's `Body` is a ready-made `http_body::Body`).
fn http_body_util_full(bytes: bytes::Bytes) -> axum::body::Body {
    axum::body::Body::from(bytes)
}

/// The responder as a child process, and its address.
struct ResponderProcess {
    child: Child,
    addr: SocketAddr,
}

impl ResponderProcess {
    fn start() -> Self {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .arg("responder")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start responder");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("piped"))
            .read_line(&mut line)
            .expect("responder address");
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("responder said {line:?}"));
        ResponderProcess { child, addr }
    }
}

impl Drop for ResponderProcess {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// 1. Poll throughput
// ---------------------------------------------------------------------------------------

/// Upstream requests sent so far (live; the durable counter moves at each commit).
fn requests_ok(app: &App) -> u64 {
    app.with_runtime(PROVIDER, |rt| rt.upstream.status().requests)
        .expect("provider runs")
}

async fn poll(upstream: SocketAddr, connections: u32, seconds: u64) {
    let dir = state_dir("loadbench-poll");
    // Rate limit effectively off; every task due again 1 ms after its answer.
    let app = App::start(
        settings(
            dir.path(),
            upstream,
            polling(1e9, connections, Duration::from_millis(1)),
        ),
        None,
        Overrides::default(),
    )
    .await
    .expect("start");
    let tasks = tasks_of(&app);
    let now = now_millis();
    for _ in 0..20_000 {
        tasks.track(&uuid(), Source::Api, now);
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // warm-up: connections, first commits
    let (r0, t0, c0) = (requests_ok(&app), Instant::now(), cpu_seconds());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (r1, elapsed, c1) = (requests_ok(&app), t0.elapsed(), cpu_seconds());
    let polls = (r1 - r0) as f64 / elapsed.as_secs_f64();
    result(&[
        ("polls_per_s", format!("{polls:.0}")),
        (
            "cpu_cores",
            format!("{:.2}", (c1 - c0) / elapsed.as_secs_f64()),
        ),
    ]);
    app.shutdown().await;
}

/// The ceiling of figure 1 for this HTTP client: CONNECTIONS loops sending the same request
/// back to back through a plain reqwest client, doing nothing with the answers.
async fn poll_bare(upstream: SocketAddr, connections: u32, seconds: u64) {
    let client = genai_task_exporter::upstream::build_client();
    let url = format!("http://{upstream}/api/v1/task/9db7d1ed-d1e5-4d11-9f3a-61f653b905ad");
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for _ in 0..connections {
        let (client, url, done) = (client.clone(), url.clone(), done.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(r) = client.get(&url).bearer_auth("bench-token").send().await
                    && r.bytes().await.is_ok()
                {
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let load = || done.load(std::sync::atomic::Ordering::Relaxed);
    let (r0, t0, c0) = (load(), Instant::now(), cpu_seconds());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (r1, elapsed, c1) = (load(), t0.elapsed(), cpu_seconds());
    result(&[
        (
            "requests_per_s",
            format!("{:.0}", (r1 - r0) as f64 / elapsed.as_secs_f64()),
        ),
        (
            "cpu_cores",
            format!("{:.2}", (c1 - c0) / elapsed.as_secs_f64()),
        ),
    ]);
    std::process::exit(0);
}

fn wrk(upstream: SocketAddr, connections: u32, seconds: u64) -> f64 {
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{seconds}s"),
            "-H",
            "Authorization: Bearer bench-token",
            "-H",
            "Accept: application/json",
            &format!("http://{upstream}/api/v1/task/9db7d1ed-d1e5-4d11-9f3a-61f653b905ad"),
        ])
        .output()
        .expect("wrk is installed (scripts/bench installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk output:\n{text}"))
}

// ---------------------------------------------------------------------------------------
// 2. Scrape latency
// ---------------------------------------------------------------------------------------

async fn scrape(n: usize, scrapes: usize) {
    let dir = state_dir("loadbench-scrape");
    // The upstream is never reached: the first polls are an hour away.
    let app = App::start(
        settings(
            dir.path(),
            "127.0.0.1:9".parse().expect("address"),
            polling(5.0, 8, Duration::from_secs(3600)),
        ),
        None,
        Overrides::default(),
    )
    .await
    .expect("start");
    let tasks = tasks_of(&app);
    populate(&tasks, n, |_| {});
    // Tracked tasks are due now; take them all (as if polled) so nothing polls meanwhile.
    while tasks.take_due(now_millis()).is_some() {}
    app.flush().await;
    assert_eq!(tasks.tracked(), n);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("bound");
    let router = genai_task_exporter::http::router(app.clone());
    tokio::spawn(async move { axum::serve(listener, router.into_make_service()).await });
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/metrics");
    let mut bytes = 0;
    for _ in 0..50 {
        bytes = client
            .get(&url)
            .send()
            .await
            .expect("scrape")
            .bytes()
            .await
            .expect("body")
            .len();
    }
    let mut latencies = Vec::with_capacity(scrapes);
    for _ in 0..scrapes {
        let t = Instant::now();
        let body = client
            .get(&url)
            .send()
            .await
            .expect("scrape")
            .bytes()
            .await
            .expect("body");
        latencies.push(t.elapsed());
        assert!(!body.is_empty());
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p).ceil() as usize).max(1) - 1];
    result(&[
        ("tasks", n.to_string()),
        ("p50_ms", format!("{:.3}", pct(0.50).as_secs_f64() * 1e3)),
        ("p99_ms", format!("{:.3}", pct(0.99).as_secs_f64() * 1e3)),
        ("page_bytes", bytes.to_string()),
    ]);
}

// ---------------------------------------------------------------------------------------
// 3. Memory per task
// ---------------------------------------------------------------------------------------

/// Resident set size of this process, bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// RSS after asking glibc to hand free heap memory back (diagnostic: what of the RSS is
/// live data rather than memory the allocator keeps for later).
fn trimmed_rss_bytes() -> u64 {
    // The same foreign call as the exporter's `persist::release_freed_memory`.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> i32;
        }
        // SAFETY: malloc_trim only releases free memory; it is safe to call at any time.
        unsafe {
            malloc_trim(0);
        }
    }
    rss_bytes()
}

fn memory_registry(n: usize) {
    use genai_task_exporter::registry::Registry;
    let registry = Registry::new(50, Shard::default());
    let tasks = registry.provider_or_insert(PROVIDER, &Polling::default());
    let before = rss_bytes();
    populate(&tasks, n, |t| drop(t.take_pending()));
    let after = rss_bytes();
    assert_eq!(tasks.tracked(), n);
    result(&[
        ("tasks", n.to_string()),
        ("rss_before_mb", format!("{:.1}", before as f64 / 1e6)),
        ("rss_after_mb", format!("{:.1}", after as f64 / 1e6)),
        (
            "bytes_per_task",
            format!("{:.0}", (after - before) as f64 / n as f64),
        ),
    ]);
}

async fn memory_exporter(n: usize) {
    let dir = state_dir("loadbench-memory");
    let app = App::start(
        settings(
            dir.path(),
            "127.0.0.1:9".parse().expect("address"),
            polling(5.0, 8, Duration::from_secs(3600)),
        ),
        None,
        Overrides::default(),
    )
    .await
    .expect("start");
    let tasks = tasks_of(&app);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_bytes();
    // Tasks arrive as fast as the registry takes them (tens of thousands a second) while
    // the persister commits on its own schedule, every 200 ms, as in the product.
    let started = Instant::now();
    let chunk = 1_000;
    for done in (0..n).step_by(chunk) {
        populate(&tasks, chunk.min(n - done), |_| {});
        tokio::task::yield_now().await;
    }
    while tasks.take_due(now_millis()).is_some() {}
    app.flush().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_bytes();
    assert_eq!(tasks.tracked(), n);
    let trimmed = trimmed_rss_bytes();
    result(&[
        ("tasks", n.to_string()),
        ("rss_before_mb", format!("{:.1}", before as f64 / 1e6)),
        ("rss_after_mb", format!("{:.1}", after as f64 / 1e6)),
        (
            "bytes_per_task",
            format!("{:.0}", (after - before) as f64 / n as f64),
        ),
        (
            "trimmed_bytes_per_task",
            format!("{:.0}", (trimmed - before) as f64 / n as f64),
        ),
        ("fill_s", format!("{:.1}", started.elapsed().as_secs_f64())),
    ]);
    app.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 4. Restart
// ---------------------------------------------------------------------------------------

async fn restart_write(dir: &Path, n: usize) {
    let app = App::start(
        settings(
            dir,
            "127.0.0.1:9".parse().expect("address"),
            polling(5.0, 8, Duration::from_secs(15)),
        ),
        None,
        Overrides::default(),
    )
    .await
    .expect("start");
    let tasks = tasks_of(&app);
    let chunk = 50_000;
    for done in (0..n).step_by(chunk) {
        populate(&tasks, chunk.min(n - done), |_| {});
        app.flush().await;
    }
    app.shutdown().await;
    let size = std::fs::read_dir(dir)
        .expect("state dir")
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum::<u64>();
    result(&[
        ("tasks", n.to_string()),
        ("store_mb", format!("{:.0}", size as f64 / 1e6)),
    ]);
}

async fn restart(dir: &Path, upstream: SocketAddr, crash: bool) {
    let started = Instant::now();
    let app = App::start(
        settings(dir, upstream, polling(5.0, 8, Duration::from_secs(15))),
        None,
        Overrides::default(),
    )
    .await
    .expect("start");
    let loaded = started.elapsed();
    while !app.is_ready() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let ready = started.elapsed();
    result(&[
        ("tasks", tasks_of(&app).tracked().to_string()),
        ("loaded_s", format!("{:.3}", loaded.as_secs_f64())),
        ("ready_s", format!("{:.3}", ready.as_secs_f64())),
        ("rss_mb", format!("{:.0}", rss_bytes() as f64 / 1e6)),
    ]);
    if crash {
        std::process::exit(0);
    }
    // A clean stop, so that the next run starts from a cleanly closed store as well.
    app.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// 5. CPU at a fixed poll rate
// ---------------------------------------------------------------------------------------

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / clock_ticks_per_second()
}

fn clock_ticks_per_second() -> f64 {
    // sysconf(_SC_CLK_TCK) is 100 on every Linux the exporter runs on.
    100.0
}

async fn cpu(upstream: SocketAddr, rate: f64, seconds: u64) {
    let dir = state_dir("loadbench-cpu");
    // 5,000 in-flight tasks each due every 2 s: more due work than the rate lets through,
    // so the limiter (not the schedule) sets the pace, as in a busy deployment.
    let app = App::start(
        settings(
            dir.path(),
            upstream,
            polling(rate, 64, Duration::from_secs(2)),
        ),
        None,
        Overrides::default(),
    )
    .await
    .expect("start");
    let tasks = tasks_of(&app);
    let now = now_millis();
    for _ in 0..5_000 {
        tasks.track(&uuid(), Source::Api, now);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (r0, t0, c0) = (requests_ok(&app), Instant::now(), cpu_seconds());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (r1, elapsed, c1) = (requests_ok(&app), t0.elapsed(), cpu_seconds());
    let polls = (r1 - r0) as f64 / elapsed.as_secs_f64();
    let core_pct = (c1 - c0) / elapsed.as_secs_f64() * 100.0;
    result(&[
        ("polls_per_s", format!("{polls:.0}")),
        ("cpu_pct", format!("{core_pct:.1}")),
        (
            "cpu_pct_per_1000",
            format!("{:.1}", core_pct / (polls / 1000.0)),
        ),
    ]);
    app.shutdown().await;
}

/// The floor under figure 5: the same requests, evenly spaced, through a plain reqwest
/// client (same HTTP client settings as the exporter), with nothing done with the answers.
async fn cpu_bare(upstream: SocketAddr, rate: f64, seconds: u64) {
    let client = genai_task_exporter::upstream::build_client();
    let url = format!("http://{upstream}/api/v1/task/9db7d1ed-d1e5-4d11-9f3a-61f653b905ad");
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let run = async {
        loop {
            tick.tick().await;
            let (client, url, done) = (client.clone(), url.clone(), done.clone());
            tokio::spawn(async move {
                if let Ok(r) = client.get(&url).bearer_auth("bench-token").send().await
                    && r.bytes().await.is_ok()
                {
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    };
    let measure = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let load = || done.load(std::sync::atomic::Ordering::Relaxed);
        let (r0, t0, c0) = (load(), Instant::now(), cpu_seconds());
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let (r1, elapsed, c1) = (load(), t0.elapsed(), cpu_seconds());
        let polls = (r1 - r0) as f64 / elapsed.as_secs_f64();
        let core_pct = (c1 - c0) / elapsed.as_secs_f64() * 100.0;
        result(&[
            ("requests_per_s", format!("{polls:.0}")),
            ("cpu_pct", format!("{core_pct:.1}")),
            (
                "cpu_pct_per_1000",
                format!("{:.1}", core_pct / (polls / 1000.0)),
            ),
        ]);
    };
    tokio::select! {
        _ = run => {}
        _ = measure => {}
    }
}

// ---------------------------------------------------------------------------------------
// Driver
// ---------------------------------------------------------------------------------------

/// Runs `loadbench ARGS` in a fresh process and returns its RESULT fields.
fn child(args: &[String]) -> BTreeMap<String, String> {
    let out = Command::new(std::env::current_exe().expect("own path"))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run phase");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "loadbench {args:?} failed:\n{text}");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("loadbench {args:?} printed no RESULT:\n{text}"));
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn num(fields: &BTreeMap<String, String>, key: &str) -> f64 {
    fields[key].parse().expect("numeric result")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn show(v: &[f64], digits: usize) -> String {
    let list: Vec<String> = v.iter().map(|x| format!("{x:.digits$}")).collect();
    list.join(", ")
}

fn all(args: AllArgs) {
    let s = |v: &dyn ToString| v.to_string();
    let runs = args.runs.max(1);
    let mut rows: Vec<[String; 4]> = Vec::new();
    let say = |what: &str| eprintln!("loadbench: {what}");
    let responder = ResponderProcess::start();
    let upstream = responder.addr.to_string();

    // 1. Poll throughput: the exporter, a bare reqwest client and wrk, in turn, against the
    //    same responder with the same number of connections.
    say("poll throughput (exporter, bare reqwest client, wrk)");
    let (mut exporter, mut bare, mut plain, mut ratios) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let conn = [
            s(&"--upstream"),
            upstream.clone(),
            s(&"--connections"),
            s(&args.connections),
            s(&"--seconds"),
            s(&args.seconds),
        ];
        let e = num(&child(&[&[s(&"poll")], &conn[..]].concat()), "polls_per_s");
        let b = num(
            &child(&[&[s(&"poll-bare")], &conn[..]].concat()),
            "requests_per_s",
        );
        let w = wrk(responder.addr, args.connections, args.seconds);
        exporter.push(e);
        bare.push(b);
        plain.push(w);
        ratios.push(e / w);
    }
    let ratio = median(ratios.clone());
    rows.push([
        format!(
            "1. poll throughput, exporter ({} in flight)",
            args.connections
        ),
        format!("{:.0} polls/s", median(exporter.clone())),
        String::new(),
        format!("runs: {}", show(&exporter, 0)),
    ]);
    rows.push([
        "   bare reqwest client, same requests".into(),
        format!("{:.0} req/s", median(bare.clone())),
        String::new(),
        format!("runs: {}", show(&bare, 0)),
    ]);
    rows.push([
        format!("   wrk -t2 -c{}", args.connections),
        format!("{:.0} req/s", median(plain.clone())),
        String::new(),
        format!("runs: {}", show(&plain, 0)),
    ]);
    rows.push([
        "   ratio exporter / wrk".into(),
        format!("{ratio:.2}"),
        verdict(ratio >= 0.5, ">= 0.5"),
        format!(
            "runs: {}; exporter / bare reqwest: {:.2}",
            show(&ratios, 2),
            median(exporter.clone()) / median(bare.clone())
        ),
    ]);

    // 2. Scrape latency. The sizes take turns (1k, 100k, 1M, 1k, ...) so that a noisy
    //    moment on the machine does not land on one size only; five runs each.
    let sizes = [1_000, 100_000, args.max_tasks];
    let scrape_runs = runs.max(5);
    let (mut p50, mut p99) = (vec![vec![]; sizes.len()], vec![vec![]; sizes.len()]);
    for run in 0..scrape_runs {
        for (i, n) in sizes.iter().enumerate() {
            say(&format!("/metrics latency, {n} tasks, run {}", run + 1));
            let r = child(&[s(&"scrape"), s(&"--tasks"), s(n)]);
            p50[i].push(num(&r, "p50_ms"));
            p99[i].push(num(&r, "p99_ms"));
        }
    }
    let p99_1k = median(p99[0].clone());
    for (i, n) in sizes.iter().enumerate() {
        let (m50, m99) = (median(p50[i].clone()), median(p99[i].clone()));
        let target = if i == sizes.len() - 1 {
            verdict(
                m99 < 5.0 && m99 <= 2.0 * p99_1k,
                "p99 < 5 ms and <= 2x p99 at 1k",
            )
        } else {
            String::new()
        };
        rows.push([
            format!("2. /metrics p50 / p99, {n} tasks"),
            format!("{m50:.2} / {m99:.2} ms"),
            target,
            format!(
                "1,000 scrapes a run, median of {scrape_runs}; p99 runs: {}",
                show(&p99[i], 2)
            ),
        ]);
    }

    // 3. Memory.
    say("memory per task");
    let (mut whole, mut registry) = (vec![], vec![]);
    for _ in 0..runs {
        whole.push(num(
            &child(&[s(&"memory"), s(&"--tasks"), s(&args.max_tasks)]),
            "bytes_per_task",
        ));
        registry.push(num(
            &child(&[
                s(&"memory"),
                s(&"--tasks"),
                s(&args.max_tasks),
                s(&"--registry-only"),
            ]),
            "bytes_per_task",
        ));
    }
    let m = median(whole.clone());
    rows.push([
        format!("3. RSS per task, {} tasks, exporter", args.max_tasks),
        format!("{m:.0} B"),
        verdict(m <= 256.0, "<= 256 B"),
        format!("runs: {}", show(&whole, 0)),
    ]);
    rows.push([
        "   of which the registry alone".into(),
        format!("{:.0} B", median(registry.clone())),
        String::new(),
        format!("runs: {}", show(&registry, 0)),
    ]);

    // 4. Restart.
    say("restart");
    let dir = state_dir("loadbench-restart");
    let dir_arg = dir.path().display().to_string();
    let written = child(&[
        s(&"restart-write"),
        s(&"--dir"),
        dir_arg.clone(),
        s(&"--tasks"),
        s(&args.max_tasks),
    ]);
    let restart = |crash: bool| {
        let mut a = vec![
            s(&"restart"),
            s(&"--dir"),
            dir_arg.clone(),
            s(&"--upstream"),
            upstream.clone(),
        ];
        if crash {
            a.push(s(&"--crash"));
        }
        child(&a)
    };
    let (mut ready, mut loaded) = (vec![], vec![]);
    for _ in 0..runs {
        let r = restart(false);
        ready.push(num(&r, "ready_s"));
        loaded.push(num(&r, "loaded_s"));
    }
    // Then once more after a run that ended like kill -9: redb checks the file first.
    restart(true);
    let after_crash = num(&restart(false), "ready_s");
    let m = median(ready.clone());
    rows.push([
        format!(
            "4. restart to ready, {} tasks ({} MB store)",
            args.max_tasks, written["store_mb"]
        ),
        format!("{m:.2} s"),
        verdict(m < 3.0, "< 3 s"),
        format!(
            "runs: {}; state loaded at {} s; after kill -9: {after_crash:.2} s",
            show(&ready, 2),
            show(&loaded, 2)
        ),
    ]);

    // 5. CPU at 1,000 polls/s, and a bare reqwest loop at the same rate.
    say("CPU at 1,000 polls/s");
    let (mut cpu, mut rates, mut floor) = (vec![], vec![], vec![]);
    for _ in 0..runs {
        let rate = [
            s(&"--upstream"),
            upstream.clone(),
            s(&"--seconds"),
            s(&args.seconds),
        ];
        let r = child(&[&[s(&"cpu")], &rate[..]].concat());
        cpu.push(num(&r, "cpu_pct_per_1000"));
        rates.push(num(&r, "polls_per_s"));
        floor.push(num(
            &child(&[&[s(&"cpu-bare")], &rate[..]].concat()),
            "cpu_pct_per_1000",
        ));
    }
    let m = median(cpu.clone());
    rows.push([
        "5. CPU per 1,000 polls/s, exporter".into(),
        format!("{m:.1} % of a core"),
        verdict(m < 10.0, "< 10 %"),
        format!("runs: {}; at {} polls/s", show(&cpu, 1), show(&rates, 0)),
    ]);
    rows.push([
        "   bare reqwest loop, 1,000 req/s".into(),
        format!("{:.1} % of a core", median(floor.clone())),
        String::new(),
        format!("runs: {}", show(&floor, 1)),
    ]);
    drop(responder);

    print_table(&rows, runs);
}

fn verdict(ok: bool, target: &str) -> String {
    format!("{} {target}", if ok { "met" } else { "MISSED" })
}

fn print_table(rows: &[[String; 4]], runs: usize) {
    let headers = [
        "measurement",
        &format!("median of {runs}"),
        "target",
        "detail",
    ];
    let mut widths = headers.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 4]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("| {} |", padded.join(" | "));
    };
    line(headers);
    let dashes = widths.map(|w| "-".repeat(w));
    line([&dashes[0], &dashes[1], &dashes[2], &dashes[3]]);
    for row in rows {
        line([&row[0], &row[1], &row[2], &row[3]]);
    }
}
