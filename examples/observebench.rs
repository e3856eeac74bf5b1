//! Observation cost: upstream requests per finished task and detection delay, per discovery mode.
//!
//! Each mode gets its own simulator (in this process) and its own exporter (the release binary,
//! a child process with a fresh state directory), all on 127.0.0.1. The simulator creates a
//! seeded, time-based workload: Poisson arrivals at `--rate` for `--seconds`; 75 % image-like
//! tasks succeeding after 6-30 s, 20 % video-like succeeding after 60-180 s, 5 % failing after
//! 3-15 s (uniform in each range). The exporter runs with `interval: 5s`, `max_interval: 60s`,
//! history `interval: 10s`. Modes:
//! - `polling`: maxapi, every id registered (`POST /api/v1/tasks`) by the simulator as it is
//!   created; the exporter learns outcomes by polling.
//! - `callbacks`: the same, and the simulator POSTs each terminal task once to the exporter's
//!   `/webhooks/maxapi` (maxapi's `callBackUrl`).
//! - `history`: apimall, ids discovered only from the history listings (images and videos).
//!
//! Per mode: tasks finished (simulator ground truth), upstream requests (the simulator's own
//! request log, every endpoint, history pages included; the exporter's
//! `genai_upstream_requests_total` printed beside it as a cross-check), requests per finished
//! task, and detection delay p50/p95/max: the moment this process first sees the task in a
//! terminal status in the exporter's `GET /api/v1/tasks` minus its true completion time
//! (`/_sim/outcomes`). The task API is read every `--watch-ms` (150 ms by default), by
//! status, with a one-minute retention so that each answer stays small. Counts are taken the
//! moment the last finished task is seen (or at the time limit). The modes run at the same
//! time, each against its own simulator and exporter.
//!
//!   cargo build --release --bin genai-task-exporter --example observebench
//!   target/release/examples/observebench            # about 6 minutes
//!   target/release/examples/observebench --quick    # every duration / 10, 10 s of arrivals

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use genai_task_exporter::simulator::{
    ModelKind, ModelSim, Register, SimConfig, SimProvider, Simulator, TaskOutcome, Workload,
};
use serde::Deserialize;

const SIM_KEY: &str = "obsbench-provider-key";
const API_TOKEN: &str = "obsbench-api-token";
const WEBHOOK_TOKEN: &str = "obsbench-webhook-token";
const TERMINAL: [&str; 4] = ["succeeded", "failed", "timed_out", "cancelled"];

#[derive(Parser, Debug, Clone)]
#[command(about = "Upstream requests per finished task and detection delay, per discovery mode")]
struct Cli {
    /// Smoke run: every duration (workload and exporter settings) divided by 10, 10 s of
    /// arrivals.
    #[arg(long)]
    quick: bool,
    /// Task arrivals per second (Poisson), per mode.
    #[arg(long, default_value_t = 6.0)]
    rate: f64,
    /// Seconds of arrivals (default 150; 10 with --quick).
    #[arg(long)]
    seconds: Option<f64>,
    /// Longest wait for the last outcome after the arrivals end, in seconds (scaled by --quick).
    #[arg(long, default_value_t = 300.0)]
    wait: f64,
    /// Modes to run, comma-separated: polling, callbacks, history.
    #[arg(
        long,
        default_value = "polling,callbacks,history",
        value_delimiter = ','
    )]
    modes: Vec<String>,
    /// Seed of the workload (arrivals, kinds, durations, outcomes).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How often the exporter's task API is read, in milliseconds.
    #[arg(long, default_value_t = 150)]
    watch_ms: u64,
    /// The exporter binary (default: target/release/genai-task-exporter next to this example).
    #[arg(long)]
    exporter: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Polling,
    Callbacks,
    History,
}

impl Mode {
    fn parse(name: &str) -> Option<Mode> {
        match name.trim() {
            "polling" => Some(Mode::Polling),
            "callbacks" => Some(Mode::Callbacks),
            "history" => Some(Mode::History),
            _ => None,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Mode::Polling => "maxapi, ids registered, polling only",
            Mode::Callbacks => "maxapi, ids registered + callbacks",
            Mode::History => "apimall, history only",
        }
    }

    fn provider(self) -> SimProvider {
        match self {
            Mode::Polling | Mode::Callbacks => SimProvider::Maxapi,
            Mode::History => SimProvider::Apimall,
        }
    }
}

/// Settings shared by every mode of one run.
#[derive(Debug, Clone)]
struct Run {
    /// Multiplies every duration (1, or 0.1 for --quick).
    scale: f64,
    rate: f64,
    seconds: f64,
    wait: f64,
    seed: u64,
    watch: Duration,
    exporter: PathBuf,
}

impl Run {
    fn secs(&self, s: f64) -> Duration {
        Duration::from_secs_f64(s * self.scale)
    }

    fn total_tasks(&self) -> u64 {
        (self.rate * self.seconds).round().max(1.0) as u64
    }
}

/// The workload of the benchmark. Failures are spread over both kinds (4 % of all tasks are
/// failing images, 1 % failing videos) and all end after 3-15 s, so that the whole mix is
/// 75 % images succeeding after 6-30 s, 20 % videos succeeding after 60-180 s, 5 % failures.
fn models(run: &Run) -> Vec<ModelSim> {
    let model = |name: &str, kind, weight: f64, failing: f64, lo: f64, hi: f64| ModelSim {
        weight,
        latency_min: run.secs(lo),
        latency_max: run.secs(hi),
        failure_ratio: failing / weight,
        failure_latency_min: Some(run.secs(3.0)),
        failure_latency_max: Some(run.secs(15.0)),
        ..ModelSim::named(name, kind)
    };
    vec![
        model("nano-banana", ModelKind::Image, 79.0, 4.0, 6.0, 30.0),
        model("veo3-fast", ModelKind::Video, 21.0, 1.0, 60.0, 180.0),
    ]
}

fn sim_config(run: &Run, mode: Mode, exporter: &str) -> SimConfig {
    let mut cfg = SimConfig {
        seed: run.seed,
        ..SimConfig::default()
    };
    let p = match mode.provider() {
        SimProvider::Maxapi => &mut cfg.maxapi,
        SimProvider::Apimall => &mut cfg.apimall,
    };
    p.api_keys = vec![SIM_KEY.to_string()];
    p.workload = Workload {
        tasks_per_second: run.rate,
        total_tasks: Some(run.total_tasks()),
        models: models(run),
    };
    if mode != Mode::History {
        p.register = Some(Register {
            url: format!("http://{exporter}/api/v1/tasks"),
            token_env: None,
            token: Some(API_TOKEN.to_string()),
            provider_name: Some("maxapi".to_string()),
        });
    }
    if mode == Mode::Callbacks {
        p.callback_url = Some(format!(
            "http://{exporter}/webhooks/maxapi?token={WEBHOOK_TOKEN}"
        ));
    }
    cfg
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

fn exporter_config(run: &Run, mode: Mode, listen: &str, sim: &str, state: &Path) -> String {
    let provider = match mode {
        Mode::Polling => format!(
            "  - {{name: maxapi, type: maxapi, base_url: \"http://{sim}\", token_env: OBSBENCH_PROVIDER_KEY}}\n"
        ),
        Mode::Callbacks => format!(
            "  - name: maxapi\n    type: maxapi\n    base_url: \"http://{sim}\"\n    token_env: OBSBENCH_PROVIDER_KEY\n    webhook: {{enabled: true, token_env: OBSBENCH_WEBHOOK_TOKEN}}\n"
        ),
        Mode::History => format!(
            "  - name: apimall\n    type: apimall\n    base_url: \"http://{sim}\"\n    token_env: OBSBENCH_PROVIDER_KEY\n    history: {{enabled: true, interval: {}, kinds: [images, videos]}}\n",
            ms(run.secs(10.0))
        ),
    };
    format!(
        "server:\n  listen_address: \"{listen}\"\n  api_token_env: OBSBENCH_API_TOKEN\n\
         polling:\n  interval: {}\n  max_interval: {}\n  requests_per_second: 100\n  max_concurrency: 16\n  retention: {}\n\
         state:\n  path: \"{}\"\n\
         providers:\n{provider}",
        ms(run.secs(5.0)),
        ms(run.secs(60.0)),
        ms(run.secs(60.0)),
        state.display(),
    )
}

/// What one mode measured.
#[derive(Debug, Clone, PartialEq)]
struct Summary {
    finished: u64,
    detected: u64,
    /// Finished tasks the task API never showed terminal before the time limit.
    missed: u64,
    /// Detected with another terminal status than the simulator's.
    wrong_status: u64,
    requests: u64,
    requests_per_task: f64,
    p50: f64,
    p95: f64,
    max: f64,
}

/// Nearest-rank quantile of sorted values (0 for none).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// `detected`: id -> (Unix seconds first seen terminal, status shown).
fn summarize(
    outcomes: &[TaskOutcome],
    detected: &HashMap<String, (f64, String)>,
    requests: u64,
) -> Summary {
    let mut delays = Vec::new();
    let (mut finished, mut missed, mut wrong_status) = (0, 0, 0);
    for t in outcomes.iter().filter(|t| t.terminal) {
        finished += 1;
        match detected.get(&t.task_id) {
            Some((at, status)) => {
                delays.push(at - t.completed_at);
                if *status != t.status {
                    wrong_status += 1;
                }
            }
            None => missed += 1,
        }
    }
    delays.sort_by(f64::total_cmp);
    Summary {
        finished,
        detected: delays.len() as u64,
        missed,
        wrong_status,
        requests,
        requests_per_task: if finished == 0 {
            0.0
        } else {
            requests as f64 / finished as f64
        },
        p50: quantile(&delays, 0.5),
        p95: quantile(&delays, 0.95),
        max: delays.last().copied().unwrap_or(0.0),
    }
}

#[derive(Deserialize)]
struct TaskList {
    tasks: Vec<TaskRow>,
}

#[derive(Deserialize)]
struct TaskRow {
    id: String,
    status: String,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

struct Exporter {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_exporter(run: &Run, mode: Mode, listen: &str, sim: &str) -> Exporter {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = dir.path().join("config.yaml");
    let text = exporter_config(run, mode, listen, sim, &dir.path().join("state"));
    std::fs::write(&config, text).expect("write the exporter config");
    let log = std::fs::File::create(dir.path().join("exporter.log")).expect("log file");
    let child = Command::new(&run.exporter)
        .arg("--config.file")
        .arg(&config)
        .args(["--log.level", "warn"])
        .env("OBSBENCH_PROVIDER_KEY", SIM_KEY)
        .env("OBSBENCH_API_TOKEN", API_TOKEN)
        .env("OBSBENCH_WEBHOOK_TOKEN", WEBHOOK_TOKEN)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", run.exporter.display()));
    Exporter { child, _dir: dir }
}

async fn measure(run: Run, mode: Mode) -> Summary {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTP client");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("simulator listener");
    let sim_addr = listener.local_addr().expect("address").to_string();
    let exporter_addr = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{exporter_addr}");
    let sim = Simulator::new(sim_config(&run, mode, &exporter_addr));
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(sim.clone().serve(listener, async move {
        let _ = stopped.await;
    }));
    let mut exporter = start_exporter(&run, mode, &exporter_addr, &sim_addr);
    let started = Instant::now();
    loop {
        let healthy = http.get(format!("{base}/-/healthy")).send().await;
        if healthy.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        if let Ok(Some(status)) = exporter.child.try_wait() {
            panic!("{mode:?}: the exporter exited ({status}) before it was healthy");
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{mode:?}: the exporter is not healthy after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let workload = sim.spawn_workload();
    let provider = mode.provider();
    let name = provider.as_str();
    let mut detected: HashMap<String, (f64, String)> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs_f64(run.seconds + run.wait * run.scale);
    let mut ticker = tokio::time::interval(run.watch);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_check = Instant::now();
    loop {
        ticker.tick().await;
        for status in TERMINAL {
            let url = format!("{base}/api/v1/tasks?provider={name}&status={status}&limit=10000");
            let Ok(resp) = http.get(url).send().await else {
                continue;
            };
            let Ok(list) = resp.json::<TaskList>().await else {
                continue;
            };
            let seen = unix_now();
            for row in list.tasks {
                detected.entry(row.id).or_insert((seen, row.status));
            }
        }
        if last_check.elapsed() < Duration::from_secs(1) {
            continue;
        }
        last_check = Instant::now();
        let outcomes = sim.outcomes(provider);
        let all_seen = outcomes
            .tasks
            .iter()
            .all(|t| detected.contains_key(&t.task_id));
        if (workload.is_finished() && sim.is_drained() && all_seen) || Instant::now() >= deadline {
            break;
        }
    }
    let truth = sim.truth();
    let outcomes = sim.outcomes(provider);
    let counts = &truth.providers[name];
    let requests: u64 = counts.requests.values().sum();
    let exporter_requests = exporter_metric(&http, &base, name).await;
    let summary = summarize(&outcomes.tasks, &detected, requests);
    let by_endpoint: Vec<String> = counts
        .requests
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!(
        "{:<10} finished {} (created {}), detected {}, missed {}, wrong status {}; requests {} \
         ({}; exporter's genai_upstream_requests_total {}); callbacks {:?}, registrations {:?}",
        format!("{mode:?}").to_lowercase(),
        summary.finished,
        counts.totals.created,
        summary.detected,
        summary.missed,
        summary.wrong_status,
        requests,
        by_endpoint.join(", "),
        exporter_requests.map_or("unreadable".to_string(), |n| format!("{n:.0}")),
        counts.callbacks,
        counts.registrations,
    );
    drop(exporter);
    summary
}

/// Sum of `genai_upstream_requests_total{provider="..."}` on the exporter's `/metrics`.
async fn exporter_metric(http: &reqwest::Client, base: &str, provider: &str) -> Option<f64> {
    let page = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let label = format!("provider=\"{provider}\"");
    Some(
        page.lines()
            .filter(|l| l.starts_with("genai_upstream_requests_total{") && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

fn main() {
    let cli = Cli::parse();
    genai_task_exporter::upstream::install_crypto_provider();
    let modes: Vec<Mode> = cli
        .modes
        .iter()
        .map(|m| Mode::parse(m).unwrap_or_else(|| panic!("unknown mode {m:?}")))
        .collect();
    let exporter = cli.exporter.clone().unwrap_or_else(|| {
        let me = std::env::current_exe().expect("own path");
        // target/release/examples/observebench -> target/release/genai-task-exporter
        me.parent()
            .and_then(Path::parent)
            .map(|d| d.join("genai-task-exporter"))
            .expect("target directory")
    });
    assert!(
        exporter.is_file(),
        "{} not found: cargo build --release --bin genai-task-exporter",
        exporter.display()
    );
    let run = Run {
        scale: if cli.quick { 0.1 } else { 1.0 },
        rate: cli.rate,
        seconds: cli.seconds.unwrap_or(if cli.quick { 10.0 } else { 150.0 }),
        wait: cli.wait,
        seed: cli.seed,
        watch: Duration::from_millis(cli.watch_ms.max(10)),
        exporter,
    };
    println!(
        "observebench: {} tasks per mode ({}/s for {} s), time scale {}, seed {}, task API read every {} ms",
        run.total_tasks(),
        run.rate,
        run.seconds,
        run.scale,
        run.seed,
        run.watch.as_millis()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let results = rt.block_on(async {
        let jobs: Vec<_> = modes
            .iter()
            .map(|mode| tokio::spawn(measure(run.clone(), *mode)))
            .collect();
        let mut out = Vec::new();
        for (mode, job) in modes.iter().zip(jobs) {
            out.push((*mode, job.await.expect("mode run")));
        }
        out
    });
    println!();
    println!(
        "| discovery | tasks finished | upstream requests | requests per finished task | detection delay p50 / p95 (max) |"
    );
    println!("|---|---|---|---|---|");
    for (mode, s) in &results {
        println!(
            "| {} | {} | {} | {:.2} | {:.1} s / {:.1} s ({:.1} s){} |",
            mode.describe(),
            s.finished,
            s.requests,
            s.requests_per_task,
            s.p50,
            s.p95,
            s.max,
            if s.missed > 0 {
                format!(", {} never seen", s.missed)
            } else {
                String::new()
            },
        );
    }
    if run.scale != 1.0 {
        println!(
            "(durations and exporter settings scaled by {}; delays in real seconds)",
            run.scale
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(id: &str, status: &str, completed_at: f64, terminal: bool) -> TaskOutcome {
        TaskOutcome {
            task_id: id.to_string(),
            model: "m".to_string(),
            status: status.to_string(),
            created_at: completed_at - 10.0,
            completed_at,
            terminal,
            polls: 0,
        }
    }

    #[test]
    fn delays_quantiles_and_requests_per_task_on_known_answers() {
        // 20 finished tasks seen 1..=20 s after they ended, one finished never seen, one not
        // finished yet (not counted), one shown with the wrong status.
        let mut outcomes = Vec::new();
        let mut detected = HashMap::new();
        for i in 1..=20 {
            let id = format!("t{i}");
            outcomes.push(outcome(&id, "succeeded", 1000.0 + i as f64, true));
            let shown = if i == 7 { "failed" } else { "succeeded" };
            detected.insert(id, (1000.0 + 2.0 * i as f64, shown.to_string()));
        }
        outcomes.push(outcome("lost", "failed", 1000.0, true));
        outcomes.push(outcome("running", "succeeded", 5000.0, false));
        let s = summarize(&outcomes, &detected, 105);
        assert_eq!(
            s,
            Summary {
                finished: 21,
                detected: 20,
                missed: 1,
                wrong_status: 1,
                requests: 105,
                requests_per_task: 5.0,
                p50: 10.0,
                p95: 19.0,
                max: 20.0,
            }
        );
    }

    #[test]
    fn the_workload_mix_is_75_20_5() {
        let run = Run {
            scale: 1.0,
            rate: 6.0,
            seconds: 150.0,
            wait: 300.0,
            seed: 1,
            watch: Duration::from_millis(150),
            exporter: PathBuf::new(),
        };
        let m = models(&run);
        let total: f64 = m.iter().map(|m| m.weight).sum();
        let share = |i: usize, failing: bool| {
            let f = m[i].failure_ratio;
            m[i].weight / total * if failing { f } else { 1.0 - f }
        };
        assert!((share(0, false) - 0.75).abs() < 1e-12);
        assert!((share(1, false) - 0.20).abs() < 1e-12);
        assert!((share(0, true) + share(1, true) - 0.05).abs() < 1e-12);
        assert_eq!(run.total_tasks(), 900);
        SimConfig {
            maxapi: sim_config(&run, Mode::Callbacks, "127.0.0.1:1").maxapi,
            ..SimConfig::default()
        }
        .validate()
        .unwrap();
    }
}
