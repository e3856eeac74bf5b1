//! Simulated provider APIs: the ground truth of the end-to-end tests and the engine of
//! `demo` / `simulate`.
//!
//! One [`Simulator`] serves both providers' paths on one listener, with the exact wire shapes
//! of providers.md: maxapi (`/api/v1/task/...`) and apimall (`/api/v1/images|videos|audio/...`,
//! `/api/v1/account/balances`). Tasks are created by a background workload, by maxapi submit,
//! or directly by tests ([`Simulator::create_task`]); each task's whole life is drawn from a
//! seeded generator at creation and then follows the wall clock. Faults (5xx, 429, slow
//! answers, malformed bodies, outages, a rate limit) are drawn per request from the same seed
//! and never change task state.
//!
//! What the simulator actually did is served under `/_sim/`:
//! - `GET /_sim/truth`: [`GroundTruth`], per provider and model (created, terminal by status,
//!   failures by the reason the exporter should derive, credits) plus faults served and
//!   requests per endpoint.
//! - `GET /_sim/polls[?provider=]`: [`PollReport`], get-task requests per task and how many
//!   distinct keys made them (keys are stored as short hashes only).
//! - `GET /_sim/tasks?provider=&after=&limit=`: [`TaskList`], created ids in creation order.
//! - `GET /_sim/outcomes?provider=`: [`OutcomeList`], each remembered task's outcome and the
//!   instant it becomes terminal (for measuring how soon a watcher learns it).
//!
//! Memory is bounded: each provider remembers at most `max_tasks` tasks (default 100000);
//! past that the oldest is forgotten and its id answers 404 like an unknown one. Forgotten
//! tasks still count in the truth (their outcome is accounted when their time comes), but
//! they no longer appear in history, polls or callbacks.
//!
//! Background work (accounting terminal tasks, callbacks, registrations) runs on a tick that
//! starts the first time the simulator is used inside a Tokio runtime and stops when the last
//! [`Simulator`] clone is dropped.

mod config;
mod delivery;
mod faults;
mod routes;
mod state;
mod truth;
mod wire;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

pub use config::{
    FailureMix, Faults, ModelKind, ModelSim, Outage, ProviderSim, Register, SimConfig,
    SimConfigError, Workload,
};
pub use truth::{
    DeliveryCounts, FaultCounts, GroundTruth, ModelTruth, OutcomeList, PollReport, PollSummary,
    ProviderTruth, ReasonCounts, TaskList, TaskOutcome, TaskPolls, TerminalCounts,
};
pub use wire::{APIMALL_FAILURE_MESSAGES, MAXAPI_FAILURE_REASONS};

use state::State;

/// Longest latency or backfill window honoured (longer values are clamped).
const MAX_SPAN: Duration = Duration::from_secs(365 * 24 * 3600);

/// Which simulated provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimProvider {
    Maxapi,
    Apimall,
}

impl SimProvider {
    pub const ALL: [SimProvider; 2] = [SimProvider::Maxapi, SimProvider::Apimall];

    /// The provider type name (`maxapi`, `apimall`), also the key in `/_sim/*` answers.
    pub fn as_str(self) -> &'static str {
        match self {
            SimProvider::Maxapi => "maxapi",
            SimProvider::Apimall => "apimall",
        }
    }

    pub fn parse(name: &str) -> Option<SimProvider> {
        SimProvider::ALL.into_iter().find(|p| p.as_str() == name)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn config(self, cfg: &SimConfig) -> &ProviderSim {
        match self {
            SimProvider::Maxapi => &cfg.maxapi,
            SimProvider::Apimall => &cfg.apimall,
        }
    }
}

/// The simulated providers. Cheap to clone: every clone shares one state.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: SimConfig,
    started: Instant,
    state: Mutex<State>,
    /// Background workload loops still creating tasks.
    workloads: AtomicUsize,
    pump_started: AtomicBool,
    /// Source of request ids (no randomness spent on them, to keep fault draws aligned).
    requests: AtomicU64,
}

/// Keeps the workload count right even when a workload future is dropped (aborted).
struct WorkloadGuard(Arc<Inner>);

impl Drop for WorkloadGuard {
    fn drop(&mut self) {
        self.0.workloads.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Simulator {
    /// Build the simulator and create the backfilled tasks. Does not validate: values out of
    /// range are clamped so that no configuration can make a request panic; use
    /// [`SimConfig::validate`] (or [`SimConfig::from_yaml`]) to report mistakes to a user.
    pub fn new(mut cfg: SimConfig) -> Self {
        cfg.max_tasks = cfg.max_tasks.max(1);
        for p in [&mut cfg.maxapi, &mut cfg.apimall] {
            p.api_keys.retain(|k| !k.is_empty());
            p.api_keys.truncate(state::MAX_KEYS);
            // Keep every instant computable (no overflow, no NaN) whatever the input.
            p.backfill_window = p.backfill_window.min(MAX_SPAN);
            for m in &mut p.workload.models {
                m.latency_min = m.latency_min.min(MAX_SPAN);
                m.latency_max = m.latency_max.min(MAX_SPAN);
                m.failure_latency_min = m.failure_latency_min.map(|d| d.min(MAX_SPAN));
                m.failure_latency_max = m.failure_latency_max.map(|d| d.min(MAX_SPAN));
                if !m.pending_share.is_finite() {
                    m.pending_share = 0.0;
                }
            }
        }
        let mut st = State::new(&cfg);
        for p in SimProvider::ALL {
            let pc = p.config(&cfg);
            let n = pc.backfill_tasks;
            let window = pc.backfill_window;
            for i in 0..n {
                // Oldest first, so creation order is chronological.
                let age = window.mul_f64((n - i) as f64 / n as f64);
                st.create(&cfg, p, None, age, None, None);
            }
        }
        st.advance(&cfg, Instant::now());
        let sim = Simulator {
            inner: Arc::new(Inner {
                cfg,
                started: Instant::now(),
                state: Mutex::new(st),
                workloads: AtomicUsize::new(0),
                pump_started: AtomicBool::new(false),
                requests: AtomicU64::new(0),
            }),
        };
        sim.ensure_pump();
        sim
    }

    /// The configuration in use (after clamping).
    pub fn config(&self) -> &SimConfig {
        &self.inner.cfg
    }

    /// Both providers' API paths and the `/_sim/*` paths.
    pub fn router(&self) -> axum::Router {
        self.ensure_pump();
        routes::router(self.clone())
    }

    /// Serve [`Simulator::router`] on `listener` until `shutdown` completes. Requests held by a
    /// timeout fault delay the shutdown by up to `timeout_delay`.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let app = self.router();
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Start the configured workloads (Poisson arrivals at `tasks_per_second`, until
    /// `total_tasks`). The handle completes when every workload has finished; aborting it
    /// stops them. Each call starts another set. Must be called inside a Tokio runtime.
    pub fn spawn_workload(&self) -> tokio::task::JoinHandle<()> {
        self.ensure_pump();
        let mut loops = Vec::new();
        for p in SimProvider::ALL {
            let w = &p.config(&self.inner.cfg).workload;
            if w.tasks_per_second > 0.0
                && w.tasks_per_second.is_finite()
                && w.total_tasks != Some(0)
            {
                self.inner.workloads.fetch_add(1, Ordering::SeqCst);
                let guard = WorkloadGuard(self.inner.clone());
                loops.push(run_workload(self.clone(), p, guard));
            }
        }
        tokio::spawn(async move {
            futures_util::future::join_all(loops).await;
        })
    }

    /// Create one task now and return its id. `model`: a configured model name, `None` to draw
    /// one by weight, or any other name (it then behaves like the first configured model; useful
    /// to test the exporter's model-label limit).
    pub fn create_task(&self, provider: SimProvider, model: Option<&str>) -> String {
        self.ensure_pump();
        let cfg = &self.inner.cfg;
        self.lock()
            .create(cfg, provider, model, Duration::ZERO, None, None)
            .to_string()
    }

    /// What happened so far (also `GET /_sim/truth`).
    pub fn truth(&self) -> GroundTruth {
        let mut st = self.advanced();
        let workload_done = self.inner.workloads.load(Ordering::SeqCst) == 0;
        let mut out = GroundTruth {
            uptime_seconds: self.inner.started.elapsed().as_secs_f64(),
            workload_done,
            drained: workload_done && st.all_terminal(),
            providers: Default::default(),
        };
        for p in SimProvider::ALL {
            let ps = st.provider(p);
            let mut pt = ProviderTruth {
                evicted: ps.evicted,
                faults: ps.faults,
                requests: ps
                    .requests
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect(),
                responses: ps
                    .responses
                    .iter()
                    .map(|(k, v)| (k.to_string(), *v))
                    .collect(),
                balance: (p == SimProvider::Apimall).then_some(ps.balance),
                callbacks: ps.callbacks,
                registrations: ps.registrations,
                ..ProviderTruth::default()
            };
            for (name, m) in &ps.models {
                pt.totals.merge(m);
                pt.models.insert(name.to_string(), m.clone());
            }
            out.providers.insert(p.as_str().to_string(), pt);
        }
        out
    }

    /// Workloads finished and every created task terminal.
    pub fn is_drained(&self) -> bool {
        let st = self.advanced();
        self.inner.workloads.load(Ordering::SeqCst) == 0 && st.all_terminal()
    }

    /// How tasks were polled (also `GET /_sim/polls`); `None` covers both providers.
    pub fn polls(&self, provider: Option<SimProvider>) -> PollReport {
        let mut st = self.lock();
        let mut report = PollReport::default();
        for p in SimProvider::ALL {
            if provider.is_some_and(|want| want != p) {
                continue;
            }
            let ps = st.provider(p);
            report.summary.not_found_polls += ps.not_found_polls;
            for (k, v) in &ps.key_polls {
                *report.keys.entry(k.clone()).or_default() += v;
            }
            for id in &ps.order {
                let Some(e) = ps.tasks.get(id) else { continue };
                if e.polls == 0 {
                    continue;
                }
                let distinct = u64::from(e.keys_mask.count_ones());
                let s = &mut report.summary;
                s.tasks_polled += 1;
                s.polls += e.polls;
                s.max_polls_per_task = s.max_polls_per_task.max(e.polls);
                s.max_distinct_keys_per_task = s.max_distinct_keys_per_task.max(distinct);
                s.polls_after_terminal += e.polls_after_terminal;
                s.max_polls_after_terminal = s.max_polls_after_terminal.max(e.polls_after_terminal);
                report.tasks.push(TaskPolls {
                    task_id: id.to_string(),
                    provider: p.as_str().to_string(),
                    polls: e.polls,
                    distinct_keys: distinct,
                    polls_after_terminal: e.polls_after_terminal,
                });
            }
        }
        report
    }

    /// Each remembered task's outcome and completion time (also `GET /_sim/outcomes`).
    pub fn outcomes(&self, provider: SimProvider) -> OutcomeList {
        let now = Instant::now();
        let mut st = self.lock();
        let ps = st.provider(provider);
        let unix = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64())
        };
        let tasks = ps
            .order
            .iter()
            .filter_map(|id| ps.tasks.get(id))
            .map(|e| {
                let plan = &e.plan;
                TaskOutcome {
                    task_id: plan.id.to_string(),
                    model: plan.model.to_string(),
                    status: plan.outcome.status().as_str().to_string(),
                    created_at: unix(plan.created_wall),
                    completed_at: unix(plan.created_wall + plan.to_terminal),
                    terminal: plan.phase_at(now) == state::Phase::Terminal,
                    polls: e.polls,
                }
            })
            .collect();
        OutcomeList {
            provider: provider.as_str().to_string(),
            tasks,
        }
    }

    /// Created ids in creation order, skipping the first `after` (also `GET /_sim/tasks`).
    /// Forgotten (evicted) ids are skipped: `next` is what to pass as `after` next time.
    pub fn task_ids(&self, provider: SimProvider, after: u64, limit: usize) -> TaskList {
        let mut st = self.lock();
        let ps = st.provider(provider);
        let start = after.max(ps.first_index);
        let skip = usize::try_from(start - ps.first_index).unwrap_or(usize::MAX);
        let task_ids: Vec<String> = ps
            .order
            .iter()
            .skip(skip)
            .take(limit)
            .map(|id| id.to_string())
            .collect();
        TaskList {
            provider: provider.as_str().to_string(),
            after: start,
            next: start + task_ids.len() as u64,
            task_ids,
        }
    }

    /// The state, with every task whose time has come accounted as terminal.
    fn advanced(&self) -> MutexGuard<'_, State> {
        let mut st = self.lock();
        st.advance(&self.inner.cfg, Instant::now());
        st
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug elsewhere; the counters stay usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    fn next_request_id(&self) -> String {
        let n = self.inner.requests.fetch_add(1, Ordering::Relaxed);
        let mixed = u128::from(splitmix(n ^ self.inner.cfg.seed)) << 16 | u128::from(n & 0xffff);
        wire::ulid_id("req_", std::time::SystemTime::now(), mixed)
    }

    /// Start the background tick if we are inside a Tokio runtime and it is not running yet.
    fn ensure_pump(&self) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        if self.inner.pump_started.swap(true, Ordering::SeqCst) {
            return;
        }
        tokio::spawn(delivery::pump(Arc::downgrade(&self.inner)));
    }

    fn from_weak(weak: &Weak<Inner>) -> Option<Simulator> {
        weak.upgrade().map(|inner| Simulator { inner })
    }
}

/// SplitMix64: spreads a counter into well-mixed bits.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

async fn run_workload(sim: Simulator, p: SimProvider, _guard: WorkloadGuard) {
    let w = p.config(&sim.inner.cfg).workload.clone();
    let rate = w.tasks_per_second;
    let mut rng = fastrand::Rng::with_seed(sim.inner.cfg.seed ^ splitmix(p.index() as u64 + 1));
    let mut next = tokio::time::Instant::now();
    let mut made: u64 = 0;
    while w.total_tasks.is_none_or(|t| made < t) {
        // Exponential gaps (Poisson arrivals), capped so a long draw does not stall a demo.
        let gap = (-(1.0 - rng.f64()).ln() / rate)
            .min(10.0 / rate)
            .min(86_400.0);
        next += Duration::from_secs_f64(gap.max(0.0));
        tokio::time::sleep_until(next).await;
        sim.create_task(p, None);
        made += 1;
    }
}
