//! Task store and ground-truth bookkeeping.
//!
//! A task's whole life is drawn when it is created (a [`Plan`]): latency, phase boundaries,
//! outcome, reason. Its status at any moment is then a pure function of the wall clock, so
//! answers need no timers and a run is repeatable for a given seed and call sequence.
//! Terminal outcomes are accounted (truth counters, refunds, callbacks) by [`State::advance`],
//! which pops a deadline heap; every request, `truth()` and a background tick call it, so the
//! truth always agrees with what the API shows.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::task::{FailureReason, Status};

use super::SimProvider;
use super::config::{ModelKind, ModelSim, ProviderSim, SimConfig};
use super::faults::FaultState;
use super::truth::{DeliveryCounts, FaultCounts, ModelTruth};

/// Most API keys per provider: each key is one bit of a task's poll mask.
pub(crate) const MAX_KEYS: usize = 64;

/// Most ids waiting for registration per provider (oldest dropped past it).
const MAX_REGISTER_QUEUE: usize = 100_000;

/// Most callback bodies waiting for delivery (newest dropped past it).
const MAX_OUTBOX: usize = 10_000;

/// A task's outcome, fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Succeeded,
    /// `FAILURE` / `failed`, with the reason the exporter should derive. apimall timeouts are
    /// `Failed(Timeout)` (apimall has no timeout status, only a message).
    Failed(FailureReason),
    /// maxapi `TIMEOUT`.
    TimedOut,
    /// maxapi `CANCELLED`.
    Cancelled,
}

impl Outcome {
    pub(crate) fn status(self) -> Status {
        match self {
            Outcome::Succeeded => Status::Succeeded,
            Outcome::Failed(_) => Status::Failed,
            Outcome::TimedOut => Status::TimedOut,
            Outcome::Cancelled => Status::Cancelled,
        }
    }

    pub(crate) fn reason(self) -> Option<FailureReason> {
        match self {
            Outcome::Succeeded => None,
            Outcome::Failed(r) => Some(r),
            Outcome::TimedOut => Some(FailureReason::Timeout),
            Outcome::Cancelled => Some(FailureReason::Cancelled),
        }
    }
}

/// Where a task is in its life at some instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Pending,
    /// maxapi `PROCESSING`, apimall `processing`.
    Processing,
    /// maxapi `SUBMITTED` (apimall goes from processing straight to terminal).
    Submitted,
    Terminal,
}

/// Everything about a task, drawn at creation. Immutable.
#[derive(Debug)]
pub(crate) struct Plan {
    pub id: Arc<str>,
    pub provider: SimProvider,
    pub model: Arc<str>,
    pub kind: ModelKind,
    pub created_wall: SystemTime,
    pub created_at: Instant,
    /// Offsets from creation of each status change.
    pub to_processing: Duration,
    pub to_submitted: Duration,
    pub to_terminal: Duration,
    pub outcome: Outcome,
    /// apimall charge (0 for maxapi).
    pub credits: f64,
    /// maxapi: the submitted `input` (workload tasks get a generated one at render time).
    pub input: Option<serde_json::Value>,
    /// maxapi: `callBackUrl` of this task.
    pub callback: Option<String>,
    /// Random bits for rendering choices (prompt, null vs absent, null vs empty).
    pub variant: u32,
}

impl Plan {
    pub(crate) fn phase_at(&self, now: Instant) -> Phase {
        let age = now.saturating_duration_since(self.created_at);
        if age >= self.to_terminal {
            Phase::Terminal
        } else if age >= self.to_submitted {
            Phase::Submitted
        } else if age >= self.to_processing {
            Phase::Processing
        } else {
            Phase::Pending
        }
    }

    /// Offset of the last status change at or before this phase.
    pub(crate) fn changed_at(&self, phase: Phase) -> Duration {
        match phase {
            Phase::Pending => Duration::ZERO,
            Phase::Processing => self.to_processing,
            Phase::Submitted => self.to_submitted,
            Phase::Terminal => self.to_terminal,
        }
    }

    fn deadline(&self) -> Instant {
        self.created_at + self.to_terminal
    }
}

/// A remembered task and how it was polled.
pub(crate) struct Entry {
    pub plan: Arc<Plan>,
    pub polls: u64,
    pub keys_mask: u64,
    pub polls_after_terminal: u64,
}

/// Heap item: a task whose terminal outcome has not been accounted yet.
struct Due(Arc<Plan>, u64);

impl PartialEq for Due {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Due {
    fn cmp(&self, o: &Self) -> Ordering {
        (self.0.deadline(), self.1).cmp(&(o.0.deadline(), o.1))
    }
}

/// A callback body waiting for the background pump.
pub(crate) struct Delivery {
    pub provider: SimProvider,
    pub url: String,
    pub body: Vec<u8>,
}

/// Per-provider store and counters.
#[derive(Default)]
pub(crate) struct ProviderState {
    pub tasks: HashMap<Arc<str>, Entry>,
    /// Remembered ids in creation order; `first_index` is the creation index of the front.
    pub order: VecDeque<Arc<str>>,
    pub first_index: u64,
    /// Remembered ids per kind, creation order (apimall history).
    pub by_kind: [VecDeque<Arc<str>>; 3],
    pub models: BTreeMap<Arc<str>, ModelTruth>,
    pub evicted: u64,
    pub balance: f64,
    pub faults: FaultCounts,
    pub requests: BTreeMap<&'static str, u64>,
    pub responses: BTreeMap<u16, u64>,
    pub not_found_polls: u64,
    /// Authorized get-task requests per key fingerprint (bounded, see `record_poll`).
    pub key_polls: BTreeMap<String, u64>,
    pub register_queue: VecDeque<Arc<str>>,
    pub callbacks: DeliveryCounts,
    pub registrations: DeliveryCounts,
}

/// Everything behind the simulator's lock.
pub(crate) struct State {
    pub providers: [ProviderState; 2],
    due: BinaryHeap<Reverse<Due>>,
    seq: u64,
    pub outbox: VecDeque<Delivery>,
    rng: fastrand::Rng,
    /// Fault generators and token buckets, per provider.
    pub faults: [FaultState; 2],
}

/// Maps a model name a caller asked for to its behaviour.
pub(crate) fn find_model<'a>(p: &'a ProviderSim, name: &str) -> Option<&'a ModelSim> {
    p.workload.models.iter().find(|m| m.name == name)
}

impl State {
    pub(crate) fn new(cfg: &SimConfig) -> Self {
        let mut providers: [ProviderState; 2] = Default::default();
        providers[SimProvider::Apimall.index()].balance = cfg.apimall.initial_credits;
        State {
            providers,
            due: BinaryHeap::new(),
            seq: 0,
            outbox: VecDeque::new(),
            rng: fastrand::Rng::with_seed(cfg.seed),
            faults: [
                FaultState::new(cfg.seed ^ 0x6d61_7861_7069_0001),
                FaultState::new(cfg.seed ^ 0x6170_696d_616c_6c00),
            ],
        }
    }

    pub(crate) fn provider(&mut self, p: SimProvider) -> &mut ProviderState {
        &mut self.providers[p.index()]
    }

    /// Create one task. `model`: a configured name, or any other name (which then behaves like
    /// the first configured model: handy to test the exporter's model-label limit); `None`
    /// draws a model by weight. `age` backdates the creation (backfill).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn create(
        &mut self,
        cfg: &SimConfig,
        p: SimProvider,
        model: Option<&str>,
        age: Duration,
        input: Option<serde_json::Value>,
        callback: Option<String>,
    ) -> Arc<str> {
        let pcfg = p.config(cfg);
        let models = &pcfg.workload.models;
        let fallback = ModelSim::default();
        let (name, m): (Arc<str>, &ModelSim) = match model {
            Some(name) => (
                Arc::from(name),
                find_model(pcfg, name)
                    .or(models.first())
                    .unwrap_or(&fallback),
            ),
            None => {
                let m = pick_weighted(&mut self.rng, models, |m| m.weight).unwrap_or(&fallback);
                (Arc::from(m.name.as_str()), m)
            }
        };
        let now_wall = SystemTime::now();
        let now = Instant::now();
        let created_wall = now_wall.checked_sub(age).unwrap_or(now_wall);
        let created_at = now.checked_sub(age).unwrap_or(now);

        // One uniform draw placed in the outcome's range: a failure range set or not, the
        // same seed draws the same sequence.
        let spread = self.rng.f64();
        let outcome = draw_outcome(&mut self.rng, p, m);
        let (lo, hi) = match outcome {
            Outcome::Failed(_) | Outcome::TimedOut => {
                let (lo, hi) = m.failure_range();
                ordered(lo, hi)
            }
            _ => ordered(m.latency_min, m.latency_max),
        };
        let latency = lo + (hi - lo).mul_f64(spread);
        let pending = latency.mul_f64(m.pending_share.clamp(0.0, 1.0));
        let (to_processing, to_submitted, to_terminal) = match outcome {
            Outcome::Cancelled => {
                // Cancelled somewhere in the task's life, possibly while still pending.
                let at = latency.mul_f64(0.1 + 0.9 * self.rng.f64());
                (pending, pending + (latency - pending) / 2, at)
            }
            _ if p == SimProvider::Maxapi => (pending, pending + (latency - pending) / 2, latency),
            _ => (pending, latency, latency),
        };
        let id: Arc<str> = Arc::from(match p {
            SimProvider::Maxapi => super::wire::uuid_v4(self.rng.u128(..)),
            SimProvider::Apimall => {
                super::wire::ulid_id(m.kind.apimall_prefix(), created_wall, self.rng.u128(..))
            }
        });
        let credits = match p {
            SimProvider::Apimall if m.credits.is_finite() => m.credits.max(0.0),
            _ => 0.0,
        };
        let callback = callback.or_else(|| match p {
            SimProvider::Maxapi => pcfg.callback_url.clone(),
            SimProvider::Apimall => None,
        });
        let plan = Arc::new(Plan {
            id: id.clone(),
            provider: p,
            model: name.clone(),
            kind: m.kind,
            created_wall,
            created_at,
            to_processing,
            to_submitted,
            to_terminal,
            outcome,
            credits,
            input,
            callback,
            variant: self.rng.u32(..),
        });

        self.seq += 1;
        self.due.push(Reverse(Due(plan.clone(), self.seq)));
        let wants_registration = pcfg.register.is_some();
        let ps = self.provider(p);
        let truth = ps.models.entry(name).or_default();
        truth.created += 1;
        truth.in_flight += 1;
        truth.credits_used += credits;
        ps.balance -= credits;
        ps.order.push_back(id.clone());
        ps.by_kind[plan.kind.index()].push_back(id.clone());
        ps.tasks.insert(
            id.clone(),
            Entry {
                plan,
                polls: 0,
                keys_mask: 0,
                polls_after_terminal: 0,
            },
        );
        if wants_registration {
            if ps.register_queue.len() >= MAX_REGISTER_QUEUE {
                ps.register_queue.pop_front();
                ps.registrations.dropped += 1;
            }
            ps.register_queue.push_back(id.clone());
        }
        while ps.order.len() > cfg.max_tasks.max(1) {
            ps.evict_oldest();
        }
        id
    }

    /// Account every task whose terminal instant has passed: truth counters, refunds, and the
    /// callback body (rendered now, as the API shows it at this moment).
    pub(crate) fn advance(&mut self, cfg: &SimConfig, now: Instant) {
        while let Some(Reverse(Due(plan, _))) = self.due.peek() {
            if plan.deadline() > now {
                break;
            }
            let Some(Reverse(Due(plan, _))) = self.due.pop() else {
                break;
            };
            let refund = match plan.outcome {
                Outcome::Failed(_) => plan.credits,
                _ => 0.0,
            };
            let ps = self.provider(plan.provider);
            ps.balance += refund;
            let truth = ps.models.entry(plan.model.clone()).or_default();
            truth.in_flight = truth.in_flight.saturating_sub(1);
            truth.terminal.add(plan.outcome.status());
            if let Some(r) = plan.outcome.reason() {
                truth.failures.add(r);
            }
            truth.credits_refunded += refund;
            truth.terminal_credits_used += plan.credits;
            truth.terminal_credits_refunded += refund;
            let remembered = ps.tasks.contains_key(&plan.id);
            if remembered && let Some(d) = super::wire::callback_for(cfg, &plan, now) {
                if self.outbox.len() < MAX_OUTBOX {
                    self.outbox.push_back(d);
                } else {
                    self.provider(plan.provider).callbacks.dropped += 1;
                }
            }
        }
    }

    /// No task is waiting to become terminal.
    pub(crate) fn all_terminal(&self) -> bool {
        self.due.is_empty()
    }
}

impl ProviderState {
    fn evict_oldest(&mut self) {
        let Some(id) = self.order.pop_front() else {
            return;
        };
        self.first_index += 1;
        self.evicted += 1;
        if let Some(e) = self.tasks.remove(&id) {
            let q = &mut self.by_kind[e.plan.kind.index()];
            if q.front() == Some(&id) {
                q.pop_front();
            } else {
                q.retain(|x| x != &id);
            }
        }
    }

    pub(crate) fn count_request(&mut self, endpoint: &'static str) {
        *self.requests.entry(endpoint).or_default() += 1;
    }

    pub(crate) fn count_response(&mut self, code: u16) {
        *self.responses.entry(code).or_default() += 1;
    }

    /// Record an authorized get-task request. `key_slot` is the key's bit (its index in
    /// `api_keys`, or a hash when any key is accepted); `fingerprint` its short hash.
    pub(crate) fn record_poll(&mut self, id: &str, now: Instant, key_slot: u32, fingerprint: &str) {
        if self.key_polls.len() < MAX_KEYS || self.key_polls.contains_key(fingerprint) {
            *self.key_polls.entry(fingerprint.to_string()).or_default() += 1;
        } else {
            *self.key_polls.entry("other".to_string()).or_default() += 1;
        }
        match self.tasks.get_mut(id) {
            Some(e) => {
                e.polls += 1;
                e.keys_mask |= 1u64 << (key_slot % 64);
                if e.plan.phase_at(now) == Phase::Terminal {
                    e.polls_after_terminal += 1;
                }
            }
            None => self.not_found_polls += 1,
        }
    }
}

impl ModelKind {
    pub(crate) fn apimall_prefix(self) -> &'static str {
        match self {
            ModelKind::Image => "img_",
            ModelKind::Video => "vid_",
            ModelKind::Audio => "aud_",
        }
    }
}

fn ordered(a: Duration, b: Duration) -> (Duration, Duration) {
    if a <= b { (a, b) } else { (b, a) }
}

/// Draw an item by weight; negative and non-finite weights count as 0. `None` when no item
/// has a positive weight.
pub(crate) fn pick_weighted<'a, T>(
    rng: &mut fastrand::Rng,
    items: &'a [T],
    weight: impl Fn(&T) -> f64,
) -> Option<&'a T> {
    let w = |t: &T| {
        let v = weight(t);
        if v.is_finite() && v > 0.0 { v } else { 0.0 }
    };
    let total: f64 = items.iter().map(w).sum();
    if total <= 0.0 {
        return items.first();
    }
    let mut x = rng.f64() * total;
    for t in items {
        let v = w(t);
        if x < v {
            return Some(t);
        }
        x -= v;
    }
    items.iter().rev().find(|t| w(t) > 0.0)
}

fn draw_outcome(rng: &mut fastrand::Rng, p: SimProvider, m: &ModelSim) -> Outcome {
    let clamp = |v: f64| {
        if v.is_finite() {
            v.clamp(0.0, 1.0)
        } else {
            0.0
        }
    };
    let fail = clamp(m.failure_ratio);
    let timeout = clamp(m.timeout_ratio);
    let cancel = if p == SimProvider::Maxapi {
        clamp(m.cancel_ratio)
    } else {
        0.0
    };
    let x = rng.f64();
    if x < fail {
        const REASONS: [FailureReason; 5] = [
            FailureReason::ContentModeration,
            FailureReason::InvalidParameters,
            FailureReason::InsufficientCredits,
            FailureReason::Unspecified,
            FailureReason::Other,
        ];
        let weights = m.failure_reasons.weights();
        let idx: Vec<usize> = (0..REASONS.len()).collect();
        let i = pick_weighted(rng, &idx, |i| weights[*i])
            .copied()
            .unwrap_or(3);
        Outcome::Failed(REASONS[i])
    } else if x < fail + timeout {
        match p {
            SimProvider::Maxapi => Outcome::TimedOut,
            SimProvider::Apimall => Outcome::Failed(FailureReason::Timeout),
        }
    } else if x < fail + timeout + cancel {
        Outcome::Cancelled
    } else {
        Outcome::Succeeded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_pick_respects_zero_weights() {
        let mut rng = fastrand::Rng::with_seed(3);
        let items = [0.0, 1.0, 0.0];
        for _ in 0..100 {
            assert_eq!(pick_weighted(&mut rng, &items, |w| *w), Some(&1.0));
        }
        let none: [f64; 0] = [];
        assert_eq!(pick_weighted(&mut rng, &none, |w| *w), None);
    }

    #[test]
    fn outcomes_follow_ratios() {
        let mut rng = fastrand::Rng::with_seed(9);
        let m = ModelSim {
            failure_ratio: 0.2,
            timeout_ratio: 0.1,
            cancel_ratio: 0.1,
            ..ModelSim::default()
        };
        let n = 20_000;
        let mut counts = [0u32; 4];
        for _ in 0..n {
            let i = match draw_outcome(&mut rng, SimProvider::Maxapi, &m) {
                Outcome::Succeeded => 0,
                Outcome::Failed(_) => 1,
                Outcome::TimedOut => 2,
                Outcome::Cancelled => 3,
            };
            counts[i] += 1;
        }
        let share = |c: u32| f64::from(c) / f64::from(n);
        assert!((share(counts[0]) - 0.6).abs() < 0.02, "{counts:?}");
        assert!((share(counts[1]) - 0.2).abs() < 0.02, "{counts:?}");
        assert!((share(counts[2]) - 0.1).abs() < 0.02, "{counts:?}");
        assert!((share(counts[3]) - 0.1).abs() < 0.02, "{counts:?}");
        // apimall never cancels and reports timeouts as failures.
        for _ in 0..1000 {
            let o = draw_outcome(&mut rng, SimProvider::Apimall, &m);
            assert!(!matches!(o, Outcome::Cancelled | Outcome::TimedOut));
        }
    }

    #[test]
    fn eviction_forgets_oldest_but_keeps_accounting() {
        let mut cfg = SimConfig {
            max_tasks: 3,
            ..SimConfig::default()
        };
        cfg.apimall.workload.models[0].latency_min = Duration::ZERO;
        cfg.apimall.workload.models[0].latency_max = Duration::ZERO;
        let mut st = State::new(&cfg);
        let ids: Vec<_> = (0..5)
            .map(|_| st.create(&cfg, SimProvider::Apimall, None, Duration::ZERO, None, None))
            .collect();
        let ps = st.provider(SimProvider::Apimall);
        assert_eq!(ps.order.len(), 3);
        assert_eq!(ps.first_index, 2);
        assert!(!ps.tasks.contains_key(&ids[0]));
        assert!(ps.tasks.contains_key(&ids[4]));
        assert_eq!(ps.by_kind[0].len(), 3);
        st.advance(&cfg, Instant::now() + Duration::from_millis(1));
        let t = &st.provider(SimProvider::Apimall).models["nano-banana"];
        assert_eq!(t.created, 5);
        assert_eq!(t.terminal.total(), 5);
        assert!(st.all_terminal());
    }
}
