//! The registry: every tracked task, its last observation, when it is next polled, and what
//! has already been counted for it.
//!
//! Exactly-once accounting lives here (the rules are in `rules`). A task's terminal outcome
//! is counted the first time a terminal status is seen, credits as the increase over what
//! was already counted. The resulting [`Event`]s are not published directly: the persister
//! (`crate::persist`) commits them together with the task records, and only then moves the
//! counters. A crash before the commit loses the in-memory change *and* the count, so the
//! task is polled and counted again after the restart: never twice, never lost.
//!
//! The modules, one concern each:
//! - `table`: the slot table, the compact task, its flags and the model table;
//! - `rules`: track, apply an answer, a failed poll, remove, sweep, tombstones;
//! - `schedule`: the polling policy, when a task is polled next, the due-time heap;
//! - `gauges`: the counts behind the scrape-time gauges;
//! - `pending`: dirty tracking, the persistence work the persister takes;
//! - `record` and `restore`: the store's task record and start-up;
//! - `view`: tasks as the API shows them.
//!
//! `ProviderTasks` takes the provider's lock and delegates; it never awaits.

mod compact;
mod gauges;
mod pending;
mod record;
mod restore;
mod rules;
mod schedule;
mod table;
mod view;

#[cfg(test)]
mod exactly_once;
#[cfg(test)]
mod property;
#[cfg(test)]
mod test_support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tokio::sync::Notify;

pub use gauges::GaugeSnapshot;
pub use record::DecodeError;
pub use restore::Restorer;
pub use view::{TaskView, format_millis};

use crate::config::{Polling, Shard};
use crate::providers::{FailureClass, UpstreamFailure};
use crate::store::Batch;
use crate::task::{FailureReason, Observation, Status};
use schedule::Policy;
use table::Inner;

/// Model label before the provider has told us the model.
pub const MODEL_UNKNOWN: &str = "unknown";
/// Model label for names past `max_models_per_provider`.
pub const MODEL_OTHER: &str = "other";

/// How often static ids and unchanged task files are mentioned again: three times per
/// `forget_after`. An id stays remembered (a tombstone) for `forget_after` after the last time
/// any source mentioned it; history pages mention their ids at every listing, and the
/// exporter mentions static ids and task files itself at this pace. So an id that a source
/// keeps listing is never counted twice, and ids that no source mentions any more are
/// forgotten: memory stays bounded.
pub fn remention_interval(polling: &Polling) -> std::time::Duration {
    (polling.forget_after / 3).max(std::time::Duration::from_secs(1))
}

/// Where an id came from (`genai_task_discovered_total{source}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Static,
    File,
    Api,
    Webhook,
    History,
    /// A submit or get-task answer the application received through the proxy.
    Proxy,
}

impl Source {
    pub const ALL: [Source; 6] = [
        Source::Static,
        Source::File,
        Source::Api,
        Source::Webhook,
        Source::History,
        Source::Proxy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Static => "static",
            Source::File => "file",
            Source::Api => "api",
            Source::Webhook => "webhook",
            Source::History => "history",
            Source::Proxy => "proxy",
        }
    }
}

/// Why a task was given up (`genai_task_dropped_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    MaxAge,
    NotFound,
    Api,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::MaxAge => "max_age",
            DropReason::NotFound => "not_found",
            DropReason::Api => "api",
        }
    }
}

/// Something to count, produced by the registry and committed before it is published.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Discovered {
        source: Source,
    },
    Completed {
        model: Arc<str>,
        status: Status,
        reason: Option<FailureReason>,
        latency_seconds: Option<f64>,
    },
    CreditsUsed {
        model: Arc<str>,
        amount: f64,
    },
    CreditsRefunded {
        model: Arc<str>,
        amount: f64,
    },
    Dropped {
        reason: DropReason,
    },
}

/// What `track` did with an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackOutcome {
    /// Newly tracked, first poll scheduled now.
    New,
    /// Already tracked.
    Known,
    /// Finished or dropped earlier; not tracked (nor counted) again.
    Remembered,
    /// Another shard owns it.
    NotOwned,
    /// Not a plausible task id.
    Invalid,
}

/// Pending persistence work of one provider, taken by the persister.
#[derive(Debug, Default)]
pub struct Pending {
    pub batch: Batch,
    pub events: Vec<Event>,
}

/// A poll that got no observation.
#[derive(Debug, Clone)]
pub struct PollError {
    /// `None` for transport failures (timeout, connection refused, ...).
    pub class: Option<FailureClass>,
    pub message: String,
}

impl From<&UpstreamFailure> for PollError {
    fn from(f: &UpstreamFailure) -> Self {
        PollError {
            class: Some(f.class),
            message: f.message.clone(),
        }
    }
}

/// All providers' tasks.
#[derive(Debug)]
pub struct Registry {
    providers: RwLock<HashMap<String, Arc<ProviderTasks>>>,
    retired: Mutex<Vec<Arc<ProviderTasks>>>,
    max_models: usize,
    shard: RwLock<Shard>,
}

impl Registry {
    pub fn new(max_models: usize, shard: Shard) -> Self {
        Registry {
            providers: RwLock::new(HashMap::new()),
            retired: Mutex::new(Vec::new()),
            max_models,
            shard: RwLock::new(shard),
        }
    }

    /// The tasks of `name`, created (empty) on first use.
    pub fn provider_or_insert(&self, name: &str, polling: &Polling) -> Arc<ProviderTasks> {
        if let Some(p) = self.provider(name) {
            p.set_polling(polling);
            return p;
        }
        let mut map = self.providers.write().expect("registry lock");
        map.entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(ProviderTasks::new(
                    name,
                    polling,
                    self.max_models,
                    *self.shard.read().expect("registry lock"),
                ))
            })
            .clone()
    }

    pub fn provider(&self, name: &str) -> Option<Arc<ProviderTasks>> {
        self.providers
            .read()
            .expect("registry lock")
            .get(name)
            .cloned()
    }

    /// Forgets a provider removed from the configuration (its store rows stay, so it
    /// continues where it was if it comes back). What it had not committed yet is handed to
    /// the persister once more (see [`Registry::take_retired`]).
    pub fn remove_provider(&self, name: &str) {
        if let Some(tasks) = self.providers.write().expect("registry lock").remove(name) {
            self.retired.lock().expect("registry lock").push(tasks);
        }
    }

    /// Providers removed since the last call, for a last commit of their pending work.
    pub fn take_retired(&self) -> Vec<Arc<ProviderTasks>> {
        std::mem::take(&mut *self.retired.lock().expect("registry lock"))
    }

    pub fn providers(&self) -> Vec<Arc<ProviderTasks>> {
        let map = self.providers.read().expect("registry lock");
        let mut list: Vec<_> = map.values().cloned().collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    pub fn shard(&self) -> Shard {
        *self.shard.read().expect("registry lock")
    }

    /// The longest tombstone lifetime of any provider (store rows older than it can go).
    pub fn max_tombstone_ttl_ms(&self) -> i64 {
        self.providers()
            .iter()
            .map(|p| p.lock().policy.tombstone_ttl_ms)
            .max()
            .unwrap_or(0)
    }
}

/// One provider's tasks. Every method takes the lock briefly and never awaits.
#[derive(Debug)]
pub struct ProviderTasks {
    name: Arc<str>,
    inner: Mutex<Inner>,
    /// Wakes the poller when a task becomes due earlier than it planned.
    pub wake: Notify,
}

impl ProviderTasks {
    fn new(name: &str, polling: &Polling, max_models: usize, shard: Shard) -> Self {
        let provider: Arc<str> = Arc::from(name);
        ProviderTasks {
            name: provider.clone(),
            inner: Mutex::new(Inner::new(provider, polling, max_models, shard)),
            wake: Notify::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("provider tasks lock")
    }

    /// Applies new polling settings (reload). Schedules already set are kept.
    pub fn set_polling(&self, polling: &Polling) {
        self.lock().policy = Policy::from(polling);
    }

    /// Starts tracking `id`, first poll now. See [`TrackOutcome`].
    pub fn track(&self, id: &str, source: Source, now: i64) -> TrackOutcome {
        let outcome = self.lock().track(id, source, now);
        if outcome == TrackOutcome::New {
            self.wake.notify_one();
        }
        outcome
    }

    pub fn is_tracked(&self, id: &str) -> bool {
        self.lock().slot_of(id).is_some()
    }

    /// Stops tracking `id` on request (`DELETE /api/v1/tasks/...`). False when not tracked.
    pub fn untrack(&self, id: &str, now: i64) -> bool {
        let mut inner = self.lock();
        match inner.slot_of(id) {
            Some(slot) => {
                inner.remove(slot, now, Some(DropReason::Api));
                true
            }
            None => false,
        }
    }

    /// Earliest time a task is due, if any is scheduled.
    pub fn next_due(&self) -> Option<i64> {
        self.lock().peek_due()
    }

    /// Takes the earliest task due at `now` for polling; it is not handed out again until
    /// its answer is recorded. Tasks past `max_task_age` are dropped on the way.
    pub fn take_due(&self, now: i64) -> Option<Arc<str>> {
        self.lock().take_due(now)
    }

    /// Applies an observation (poll answer or callback) to a tracked task.
    /// Returns false when the task is not tracked.
    pub fn observe(&self, obs: &Observation, now: i64) -> bool {
        let mut inner = self.lock();
        let Some(slot) = inner.slot_of(&obs.task_id) else {
            return false;
        };
        inner.observe(slot, obs, now);
        true
    }

    /// Records the answer to a poll taken with [`take_due`](Self::take_due).
    pub fn record_poll(&self, id: &str, answer: Result<&Observation, &PollError>, now: i64) {
        let mut inner = self.lock();
        if let Some(slot) = inner.slot_of(id) {
            inner.record_poll(slot, answer, now);
        } // else deleted while the request was in flight
    }

    /// Tracks `id`, learnt from the application's traffic through the proxy, as
    /// [`track`](Self::track) does with [`Source::Proxy`], but plans our first poll one
    /// interval away instead of now: the application is expected to poll it, and its answers
    /// postpone ours (see [`record_application_poll`](Self::record_application_poll)).
    pub fn track_from_proxy(&self, id: &str, now: i64) -> TrackOutcome {
        let mut inner = self.lock();
        let outcome = inner.track(id, Source::Proxy, now);
        if outcome == TrackOutcome::New
            && let Some(slot) = inner.slot_of(id)
        {
            inner.task_mut(slot).next_poll = table::NEVER;
            inner.plan_next_poll(slot, schedule::Next::Answered, now);
        }
        outcome
    }

    /// A get-task answer the application received through the proxy: applied like the
    /// answer to one of our polls (same accounting), and our next poll is planned from it,
    /// later as well as earlier, so a task the application keeps polling is not polled by
    /// us while its answers keep coming. `None` when `obs.task_id` is not tracked; otherwise
    /// whether this answer is the one that counted the task's terminal outcome.
    pub fn record_application_poll(&self, obs: &Observation, now: i64) -> Option<bool> {
        let mut inner = self.lock();
        let slot = inner.slot_of(&obs.task_id)?;
        let counted_before = inner.task(slot).has(table::COUNTED);
        // Drop the planned poll; its heap entry goes stale and is skipped when it surfaces.
        inner.task_mut(slot).next_poll = table::NEVER;
        inner.record_poll(slot, Ok(obs), now);
        let counted_now = inner
            .slot_of(&obs.task_id)
            .is_some_and(|slot| inner.task(slot).has(table::COUNTED));
        Some(counted_now && !counted_before)
    }

    /// Asks for one poll of `id` now (a callback arrived: confirm it).
    pub fn poll_soon(&self, id: &str, now: i64) {
        let mut inner = self.lock();
        if let Some(slot) = inner.slot_of(id) {
            inner.schedule_at(slot, now);
            drop(inner);
            self.wake.notify_one();
        }
    }

    /// Schedules every unfinished task that has no poll planned: tasks taken by a poller
    /// that was stopped (reload) before their answer came back.
    pub fn reschedule_unscheduled(&self, now: i64) {
        self.lock().reschedule_unscheduled(now);
    }

    /// Ends retention of finished tasks and expires old tombstones.
    pub fn sweep(&self, now: i64) {
        self.lock().sweep(now);
    }

    pub fn gauges(&self) -> GaugeSnapshot {
        self.lock().gauges()
    }

    pub fn tracked(&self) -> usize {
        self.lock().index.len()
    }

    /// Up to `limit` tasks, optionally of one status, in no particular order.
    pub fn list(&self, status: Option<Status>, limit: usize) -> Vec<TaskView> {
        self.lock().list(status, limit)
    }

    /// Takes the persistence work accumulated since the last call. Tasks whose only change
    /// is poll bookkeeping are included every minute (`pending::BOOKKEEPING_FLUSH`).
    pub fn take_pending(&self) -> Pending {
        self.lock().take_pending(false)
    }

    /// Like [`take_pending`](Self::take_pending), bookkeeping included (shutdown).
    pub fn take_pending_all(&self) -> Pending {
        self.lock().take_pending(true)
    }

    /// Restores a task record read from the store (start-up). Finished tasks come back for
    /// the rest of their retention, in-flight ones are due within one interval. The caller
    /// has checked that this shard owns it (`App::start`).
    pub fn restore_task(&self, id: &str, record: &[u8], now: i64) -> Result<(), DecodeError> {
        self.restorer().task(id, record, now)
    }

    pub fn restore_tombstone(&self, id: &str, last_seen: i64) {
        self.restorer().tombstone(id, last_seen);
    }

    /// Restores many records under one lock (start-up: a million records take a second,
    /// not a million lock round trips). Polling waits until the restorer is dropped.
    pub fn restorer(&self) -> Restorer<'_> {
        Restorer { inner: self.lock() }
    }
}
