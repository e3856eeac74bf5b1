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
//! - `latency`: completion times learnt per model, which the schedule follows;
//! - `gauges`: the counts behind the scrape-time gauges;
//! - `pending`: dirty tracking, the persistence work the persister takes;
//! - `record` and `restore`: the store's task record and start-up;
//! - `view`: tasks as the API shows them.
//!
//! `ProviderTasks` takes the provider's lock and delegates; it never awaits.

mod compact;
mod gauges;
mod latency;
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

pub(crate) use gauges::GaugeSnapshot;
pub(crate) use restore::Restorer;
pub use view::TaskView;

use crate::background::{lock, read, write};
use crate::config::{Polling, Shard};
use crate::providers::{FailureClass, UpstreamFailure};
use crate::store::Batch;
use crate::task::{FailureReason, Observation, Status};
use schedule::Policy;
use table::Inner;

/// Model label before the provider has told us the model.
pub(crate) const MODEL_UNKNOWN: &str = "unknown";
/// Model label for names past `max_models_per_provider`.
pub(crate) const MODEL_OTHER: &str = "other";

/// How often static ids, unchanged task files and every history page are mentioned again:
/// three times per `forget_after`. An id stays remembered (a tombstone) for `forget_after`
/// after the last time any source mentioned it; incremental history walks mention the first
/// pages, and a full walk, static ids and task files the rest at this pace. So an id that a source
/// keeps listing is never counted twice, and ids that no source mentions any more are
/// forgotten: memory stays bounded.
pub(crate) fn remention_interval(polling: &Polling) -> std::time::Duration {
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

    pub(crate) fn as_str(self) -> &'static str {
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
    pub(crate) fn as_str(self) -> &'static str {
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
    /// An answer carried a value no real task can have; counted once per task and field.
    Implausible {
        field: ImplausibleField,
    },
}

/// The answer fields judged for plausibility (see `rules`); the `field` label of
/// `genai_upstream_implausible_values_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImplausibleField {
    CreatedAt,
    CreditsUsed,
    CreditsRefunded,
}

impl ImplausibleField {
    pub fn as_str(self) -> &'static str {
        match self {
            ImplausibleField::CreatedAt => "created_at",
            ImplausibleField::CreditsUsed => "credits_used",
            ImplausibleField::CreditsRefunded => "credits_refunded",
        }
    }
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

/// What applying one observation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    /// Something the store keeps changed (status, credits, timestamps, texts).
    pub changed: bool,
    /// The task's terminal outcome was counted by this observation.
    pub counted: bool,
}

/// Pending persistence work of one provider, taken by the persister.
#[derive(Debug, Default)]
pub struct Pending {
    pub(crate) batch: Batch,
    pub events: Vec<Event>,
}

/// A poll that got no observation.
#[derive(Debug, Clone)]
pub struct PollError {
    /// `None` for transport failures (timeout, connection refused, ...).
    pub(crate) class: Option<FailureClass>,
    pub(crate) message: String,
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
        let mut map = write(&self.providers);
        map.entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(ProviderTasks::new(
                    name,
                    polling,
                    self.max_models,
                    *read(&self.shard),
                ))
            })
            .clone()
    }

    pub fn provider(&self, name: &str) -> Option<Arc<ProviderTasks>> {
        read(&self.providers).get(name).cloned()
    }

    /// Forgets a provider removed from the configuration (its store rows stay, so it
    /// continues where it was if it comes back). What it had not committed yet is handed to
    /// the persister once more (see [`Registry::take_retired`]).
    pub fn remove_provider(&self, name: &str) {
        if let Some(tasks) = write(&self.providers).remove(name) {
            lock(&self.retired).push(tasks);
        }
    }

    /// Providers removed since the last call, for a last commit of their pending work.
    pub fn take_retired(&self) -> Vec<Arc<ProviderTasks>> {
        std::mem::take(&mut *lock(&self.retired))
    }

    pub fn providers(&self) -> Vec<Arc<ProviderTasks>> {
        let map = read(&self.providers);
        let mut list: Vec<_> = map.values().cloned().collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    pub fn shard(&self) -> Shard {
        *read(&self.shard)
    }

    /// The longest tombstone lifetime of any provider (store rows older than it can go).
    pub(crate) fn max_tombstone_ttl_ms(&self) -> i64 {
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
    pub(crate) wake: Notify,
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

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Recovered when poisoned: a panic between two updates of one task can leave at most
    /// that task's gauges off, while a poisoned lock would stop the provider for good.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Applies new polling settings (reload). Schedules already set are kept, and so is
    /// [`set_expect_callbacks`](Self::set_expect_callbacks).
    pub(crate) fn set_polling(&self, polling: &Polling) {
        let mut inner = self.lock();
        inner.policy = Policy::from(polling).with_callbacks(inner.policy.expect_callbacks);
    }

    /// Whether this provider's tasks report their outcome through callbacks: then they are
    /// not polled on the regular schedule, only once overdue (a lost callback is still
    /// caught). Applies to polls planned from now on.
    pub(crate) fn set_expect_callbacks(&self, expect_callbacks: bool) {
        let mut inner = self.lock();
        inner.policy = inner.policy.with_callbacks(expect_callbacks);
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
    pub(crate) fn next_due(&self) -> Option<i64> {
        self.lock().peek_due()
    }

    /// Takes the earliest task due at `now` for polling; it is not handed out again until
    /// its answer is recorded. Tasks past `max_task_age` are dropped on the way.
    pub fn take_due(&self, now: i64) -> Option<Arc<str>> {
        self.lock().take_due(now)
    }

    /// Applies an observation nobody polled for (a callback, a history item) to a tracked
    /// task, through the same exactly-once rules as a poll answer. `None` when the task is
    /// not tracked.
    pub fn observe(&self, obs: &Observation, now: i64) -> Option<Applied> {
        let mut inner = self.lock();
        let slot = inner.slot_of(&obs.task_id)?;
        Some(inner.observe_unasked(slot, obs, now))
    }

    /// Records the answer to a poll taken with [`take_due`](Self::take_due). `None` when
    /// the poll got no answer, or the task was deleted while the request was in flight.
    pub fn record_poll(
        &self,
        id: &str,
        answer: Result<&Observation, &PollError>,
        now: i64,
    ) -> Option<Applied> {
        let mut inner = self.lock();
        let slot = inner.slot_of(id)?;
        inner.record_poll(slot, answer, now)
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

    /// How often sources mention their ids again (see [`remention_interval`]).
    pub fn remention_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.lock().policy.remention_ms as u64)
    }

    /// Whether `id` is tracked and not finished.
    pub fn is_in_flight(&self, id: &str) -> bool {
        let inner = self.lock();
        inner
            .slot_of(id)
            .is_some_and(|slot| !inner.task(slot).status.is_terminal())
    }

    /// Asks for one poll of `id` now (a callback arrived: confirm it; a history item
    /// failed: learn its reason). Nothing when a poll of the unfinished task is in flight:
    /// its answer comes soon enough.
    pub fn poll_soon(&self, id: &str, now: i64) {
        let mut inner = self.lock();
        if let Some(slot) = inner.slot_of(id) {
            let t = inner.task(slot);
            if !t.status.is_terminal() && t.next_poll == table::NEVER {
                return;
            }
            inner.schedule_at(slot, now);
            drop(inner);
            self.wake.notify_one();
        }
    }

    /// Schedules every unfinished task that has no poll planned: tasks taken by a poller
    /// that was stopped (reload) before their answer came back.
    pub(crate) fn reschedule_unscheduled(&self, now: i64) {
        self.lock().reschedule_unscheduled(now);
    }

    /// Ends retention of finished tasks and expires old tombstones.
    pub(crate) fn sweep(&self, now: i64) {
        self.lock().sweep(now);
    }

    pub(crate) fn gauges(&self) -> GaugeSnapshot {
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

    /// Restores many records under one lock (start-up: a million records take a second,
    /// not a million lock round trips). Polling waits until the restorer is dropped.
    pub(crate) fn restorer(&self) -> Restorer<'_> {
        Restorer::new(self.lock())
    }
}

#[cfg(test)]
mod proxy_tests {
    use super::test_support::{completed, obs, tasks};
    use super::*;

    /// Interval 10 s, +-10 % jitter: the first poll of a proxied task is 9-11 s away.
    #[test]
    fn a_task_from_the_proxy_is_first_polled_one_interval_later() {
        let p = tasks();
        assert_eq!(p.track_from_proxy("a", 1_000), TrackOutcome::New);
        let due = p.next_due().expect("planned");
        assert!((10_000..=12_000).contains(&due), "{due}");
        assert_eq!(p.take_due(9_999), None);
        assert_eq!(p.track_from_proxy("a", 2_000), TrackOutcome::Known);
        let events = p.take_pending().events;
        assert_eq!(
            events,
            [Event::Discovered {
                source: Source::Proxy
            }]
        );
    }

    #[test]
    fn application_answers_postpone_our_polls_and_count_once() {
        let p = tasks();
        p.track("a", Source::Static, 0);
        assert_eq!(p.take_due(0).as_deref(), Some("a"));
        p.record_poll("a", Ok(&obs("a", Status::Running)), 0);
        let planned = p.next_due().expect("planned");
        // The application polls every 2 s: our poll keeps moving away.
        let mut now = 0;
        for _ in 0..20 {
            now += 2_000;
            assert_eq!(p.take_due(now), None, "polled by us at {now}");
            assert_eq!(
                p.record_application_poll(&obs("a", Status::Running), now),
                Some(false)
            );
            assert!(p.next_due().unwrap() > now);
        }
        assert!(now > planned);
        assert_eq!(
            p.record_application_poll(&obs("a", Status::Succeeded), now + 1),
            Some(true)
        );
        assert_eq!(
            p.record_application_poll(&obs("a", Status::Succeeded), now + 2),
            Some(false),
            "a replay counts nothing"
        );
        assert_eq!(p.next_due(), None, "a finished task is not polled");
        assert_eq!(completed(&p.take_pending().events), 1);
        assert_eq!(
            p.record_application_poll(&obs("b", Status::Running), now),
            None
        );
    }

    #[test]
    fn our_polls_resume_when_the_application_stops() {
        let p = tasks();
        p.track_from_proxy("a", 0);
        p.record_application_poll(&obs("a", Status::Running), 5_000);
        let due = p.next_due().expect("planned");
        assert!(due > 5_000 && due <= 5_000 + 60_000, "{due}");
        assert_eq!(p.take_due(due).as_deref(), Some("a"));
    }
}
