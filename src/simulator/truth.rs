//! Ground truth: what the simulator actually did, for tests to compare with the exporter's
//! metrics. Served as JSON on `/_sim/truth` and `/_sim/polls`; the same types deserialize, so a
//! test against a separately running simulator can read them back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::task::{FailureReason, Status};

/// `GET /_sim/truth`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroundTruth {
    /// Seconds since the simulator was created (outage windows count from there).
    pub uptime_seconds: f64,
    /// No background workload is still creating tasks.
    pub workload_done: bool,
    /// `workload_done` and every created task terminal.
    pub drained: bool,
    /// Keyed by provider type: `maxapi`, `apimall`.
    pub providers: BTreeMap<String, ProviderTruth>,
}

/// One provider's tasks, faults and traffic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProviderTruth {
    /// Sum over `models`.
    pub totals: ModelTruth,
    /// Keyed by model name.
    pub models: BTreeMap<String, ModelTruth>,
    /// Tasks forgotten to bound memory (they answer 404 now; still counted above).
    pub evicted: u64,
    /// Faults served.
    pub faults: FaultCounts,
    /// Requests by endpoint: `task`, `submit`, `history`, `balance`.
    pub requests: BTreeMap<String, u64>,
    /// Answers by HTTP status code (`"200"`, `"404"`, `"429"`, ...).
    pub responses: BTreeMap<String, u64>,
    /// apimall account balance now (`credits` = `api_credits`); none for maxapi.
    pub balance: Option<f64>,
    /// Terminal-task callbacks.
    pub callbacks: DeliveryCounts,
    /// Task ids registered with the exporter (counted per id).
    pub registrations: DeliveryCounts,
}

/// Tasks of one model (or all models of a provider).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelTruth {
    pub created: u64,
    /// Created and not yet terminal.
    pub in_flight: u64,
    /// Terminal tasks by normalized status.
    pub terminal: TerminalCounts,
    /// Failed, timed-out and cancelled tasks by the normalized reason the exporter should
    /// derive with its default rules (providers.md §4).
    pub failures: ReasonCounts,
    /// Credits charged for every created task (apimall charges at creation).
    pub credits_used: f64,
    /// Credits given back so far (every refund is on a terminal task).
    pub credits_refunded: f64,
    /// Credits charged for terminal tasks only.
    pub terminal_credits_used: f64,
    /// Credits refunded for terminal tasks (equals `credits_refunded`).
    pub terminal_credits_refunded: f64,
}

/// Terminal tasks by normalized status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalCounts {
    pub succeeded: u64,
    pub failed: u64,
    pub timed_out: u64,
    pub cancelled: u64,
}

impl TerminalCounts {
    pub fn total(&self) -> u64 {
        self.succeeded + self.failed + self.timed_out + self.cancelled
    }

    /// Count for a normalized status (0 for non-terminal ones).
    pub fn get(&self, status: Status) -> u64 {
        match status {
            Status::Succeeded => self.succeeded,
            Status::Failed => self.failed,
            Status::TimedOut => self.timed_out,
            Status::Cancelled => self.cancelled,
            _ => 0,
        }
    }

    pub(crate) fn add(&mut self, status: Status) {
        match status {
            Status::Succeeded => self.succeeded += 1,
            Status::Failed => self.failed += 1,
            Status::TimedOut => self.timed_out += 1,
            Status::Cancelled => self.cancelled += 1,
            _ => {}
        }
    }

    fn merge(&mut self, o: &TerminalCounts) {
        self.succeeded += o.succeeded;
        self.failed += o.failed;
        self.timed_out += o.timed_out;
        self.cancelled += o.cancelled;
    }
}

/// Failures by normalized reason (the `reason` label values).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonCounts {
    pub content_moderation: u64,
    pub invalid_parameters: u64,
    pub insufficient_credits: u64,
    pub timeout: u64,
    pub cancelled: u64,
    pub unspecified: u64,
    pub other: u64,
}

impl ReasonCounts {
    pub fn total(&self) -> u64 {
        FailureReason::ALL.iter().map(|r| self.get(*r)).sum()
    }

    pub fn get(&self, reason: FailureReason) -> u64 {
        *self.slot(reason)
    }

    pub(crate) fn add(&mut self, reason: FailureReason) {
        *self.slot_mut(reason) += 1;
    }

    fn slot(&self, reason: FailureReason) -> &u64 {
        match reason {
            FailureReason::ContentModeration => &self.content_moderation,
            FailureReason::InvalidParameters => &self.invalid_parameters,
            FailureReason::InsufficientCredits => &self.insufficient_credits,
            FailureReason::Timeout => &self.timeout,
            FailureReason::Cancelled => &self.cancelled,
            FailureReason::Unspecified => &self.unspecified,
            FailureReason::Other => &self.other,
        }
    }

    fn slot_mut(&mut self, reason: FailureReason) -> &mut u64 {
        match reason {
            FailureReason::ContentModeration => &mut self.content_moderation,
            FailureReason::InvalidParameters => &mut self.invalid_parameters,
            FailureReason::InsufficientCredits => &mut self.insufficient_credits,
            FailureReason::Timeout => &mut self.timeout,
            FailureReason::Cancelled => &mut self.cancelled,
            FailureReason::Unspecified => &mut self.unspecified,
            FailureReason::Other => &mut self.other,
        }
    }
}

impl ModelTruth {
    pub(crate) fn merge(&mut self, o: &ModelTruth) {
        self.created += o.created;
        self.in_flight += o.in_flight;
        self.terminal.merge(&o.terminal);
        for r in FailureReason::ALL {
            *self.failures.slot_mut(r) += o.failures.get(r);
        }
        self.credits_used += o.credits_used;
        self.credits_refunded += o.credits_refunded;
        self.terminal_credits_used += o.terminal_credits_used;
        self.terminal_credits_refunded += o.terminal_credits_refunded;
    }
}

/// Faults served, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultCounts {
    /// Injected HTTP 500s.
    pub error_500: u64,
    /// Injected HTTP 429s (`Retry-After` from the config).
    pub error_429: u64,
    /// HTTP 429s from the token bucket (`Retry-After: 1`).
    pub rate_limited: u64,
    /// Requests held for `timeout_delay` (then answered normally).
    pub timeouts: u64,
    /// HTTP 200 answers with a truncated or HTML body.
    pub malformed: u64,
    /// HTTP 503s inside an outage window.
    pub outage_503: u64,
    /// HTTP 401s for a missing or unknown key.
    pub unauthorized_401: u64,
}

/// Outbound deliveries (callbacks, registrations).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryCounts {
    /// Answered 2xx.
    pub delivered: u64,
    /// Failed attempts (transport error, timeout or non-2xx). Callbacks are not retried;
    /// a failed registration batch is retried at the next flush, so its ids may count here
    /// more than once before they count as delivered.
    pub failed: u64,
    /// Dropped without an attempt because the outbound queue was full.
    pub dropped: u64,
}

/// `GET /_sim/polls[?provider=]`: how the tasks were polled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PollReport {
    pub summary: PollSummary,
    /// Per remembered task that was polled at least once, in creation order.
    pub tasks: Vec<TaskPolls>,
    /// Authorized get-task requests per key, by key fingerprint (a short hash, never the key).
    pub keys: BTreeMap<String, u64>,
}

/// Totals over [`PollReport::tasks`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollSummary {
    pub tasks_polled: u64,
    pub polls: u64,
    pub max_polls_per_task: u64,
    /// Most distinct keys that polled one task (1 when every task is polled with one key).
    pub max_distinct_keys_per_task: u64,
    /// Polls of tasks that were already terminal at the time.
    pub polls_after_terminal: u64,
    pub max_polls_after_terminal: u64,
    /// Authorized get-task requests for ids the simulator does not know (or has forgotten).
    pub not_found_polls: u64,
}

/// One task's polls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskPolls {
    pub task_id: String,
    pub provider: String,
    pub polls: u64,
    pub distinct_keys: u64,
    pub polls_after_terminal: u64,
}

/// `GET /_sim/tasks?provider=&after=&limit=`: created ids in creation order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskList {
    pub provider: String,
    /// Index (0-based, in creation order) of the first id returned.
    pub after: u64,
    /// Pass this as `after` to get the next ids.
    pub next: u64,
    pub task_ids: Vec<String>,
}

/// `GET /_sim/outcomes?provider=`: every remembered task's outcome and when it happens, so a
/// watcher can measure how soon it learned each one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutcomeList {
    pub provider: String,
    /// In creation order.
    pub tasks: Vec<TaskOutcome>,
}

/// One task's planned life. Times are Unix seconds with microsecond precision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskOutcome {
    pub task_id: String,
    pub model: String,
    /// The normalized terminal status it ends in (`succeeded`, `failed`, ...).
    pub status: String,
    pub created_at: f64,
    /// When it becomes terminal (in the past or the future).
    pub completed_at: f64,
    /// `completed_at` has passed.
    pub terminal: bool,
    /// Get-task requests for it so far.
    pub polls: u64,
}
