//! The registry: every tracked task, its last observation, when it is next polled, and what
//! has already been counted for it.
//!
//! Exactly-once accounting lives here. A task's terminal outcome is counted the first time a
//! terminal status is seen (`counted`), credits as the increase over what was already
//! counted. The resulting [`Event`]s are not published directly: the persister
//! (`crate::persist`) commits them together with the task records, and only then moves the
//! counters. A crash before the commit loses the in-memory change *and* the count, so the
//! task is polled and counted again after the restart: never twice, never lost.
//!
//! Scrape-time gauges (`genai_tasks`, oldest in flight) are kept as counts updated on every
//! transition, so a scrape costs O(models x statuses), not O(tasks).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::Notify;

use crate::config::{Polling, Shard, is_valid_task_id};
use crate::providers::{FailureClass, UpstreamFailure};
use crate::shard;
use crate::store::{self, Batch};
use crate::task::{FailureReason, MAX_TEXT_LEN, Observation, Status, UnixMillis, truncate};

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

/// A task answering "not found" this many times in a row, over at least a minute, is dropped.
const NOT_FOUND_LIMIT: u16 = 3;
const NOT_FOUND_MIN_SPAN_MS: i64 = 60_000;
/// Per-task back-off factor between polls of an in-flight task.
const BACKOFF_FACTOR: f64 = 1.5;

/// Where an id came from (`genai_task_discovered_total{source}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Static,
    File,
    Api,
    Webhook,
    History,
}

impl Source {
    pub const ALL: [Source; 5] = [
        Source::Static,
        Source::File,
        Source::Api,
        Source::Webhook,
        Source::History,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Static => "static",
            Source::File => "file",
            Source::Api => "api",
            Source::Webhook => "webhook",
            Source::History => "history",
        }
    }

    fn to_byte(self) -> u8 {
        self as u8
    }

    fn from_byte(b: u8) -> Source {
        Source::ALL.get(b as usize).copied().unwrap_or(Source::Api)
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

/// A task as the API and landing page show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskView {
    pub id: String,
    pub provider: String,
    pub model: String,
    pub status: &'static str,
    pub upstream_status: String,
    pub failure_reason: Option<&'static str>,
    pub error_message: Option<String>,
    pub source: &'static str,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    pub completed_at: Option<String>,
    pub first_seen_at: String,
    pub last_polled_at: Option<String>,
    pub next_poll_at: Option<String>,
    pub credits_used: f64,
    pub credits_refunded: f64,
    pub last_error: Option<String>,
}

/// Gauge values of one provider, read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct GaugeSnapshot {
    /// (model, status, count), only non-zero counts.
    pub tasks: Vec<(Arc<str>, Status, u64)>,
    /// Creation time of the oldest pending/running task.
    pub oldest_in_flight_ms: Option<UnixMillis>,
    pub tracked: u64,
}

/// Pending persistence work of one provider, taken by the persister.
#[derive(Debug, Default)]
pub struct Pending {
    pub batch: Batch,
    pub events: Vec<Event>,
}

// ---------------------------------------------------------------------------------------

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

#[derive(Debug, Clone, Copy)]
struct Policy {
    interval_ms: i64,
    max_interval_ms: i64,
    max_task_age_ms: i64,
    retention_ms: i64,
    /// Re-mentions come every `remention_ms`; a tombstone lives `tombstone_ttl_ms` after one.
    remention_ms: i64,
    tombstone_ttl_ms: i64,
}

impl Policy {
    fn from(p: &Polling) -> Self {
        Policy {
            interval_ms: p.interval.as_millis() as i64,
            max_interval_ms: p.max_interval.as_millis() as i64,
            max_task_age_ms: p.max_task_age.as_millis() as i64,
            retention_ms: p.retention.as_millis() as i64,
            remention_ms: remention_interval(p).as_millis() as i64,
            tombstone_ttl_ms: p.forget_after.as_millis() as i64,
        }
    }

    /// Delay before poll number `polls + 1` of an in-flight task: `interval`, growing by
    /// [`BACKOFF_FACTOR`] per poll up to `max_interval`, with +-10 % jitter so that tasks
    /// registered together do not stay in lock-step.
    fn delay_ms(&self, polls: u32) -> i64 {
        let base =
            self.interval_ms as f64 * BACKOFF_FACTOR.powi(polls.saturating_sub(1).min(64) as i32);
        let capped = base.min(self.max_interval_ms as f64);
        let jitter = 0.9 + fastrand::f64() * 0.2;
        ((capped * jitter) as i64).max(1)
    }
}

const NEVER: i64 = i64::MAX;

#[derive(Debug)]
struct Task {
    id: Arc<str>,
    generation: u32,
    model: u16,
    status: Status,
    upstream_status: Box<str>,
    source: Source,
    created_at: Option<i64>,
    updated_at: Option<i64>,
    completed_at: Option<i64>,
    first_seen: i64,
    last_polled: Option<i64>,
    next_poll: i64,
    polls: u32,
    not_found: u16,
    not_found_since: i64,
    counted: bool,
    credits_used: f64,
    credits_refunded: f64,
    failure_reason: Option<FailureReason>,
    finished_at: Option<i64>,
    error_message: Option<Box<str>>,
    last_error: Option<Box<str>>,
    /// Key under which this task sits in `in_flight` (its creation time), if it does.
    in_flight_key: Option<i64>,
}

#[derive(Debug)]
struct Inner {
    policy: Policy,
    shard: Shard,
    provider: Arc<str>,
    slots: Vec<Option<Task>>,
    free: Vec<u32>,
    next_generation: u32,
    index: HashMap<Arc<str>, u32>,
    /// (due time, slot, generation); stale entries are skipped when popped.
    schedule: BinaryHeap<Reverse<(i64, u32, u32)>>,
    /// (retention end, slot, generation) of finished tasks.
    expiry: BinaryHeap<Reverse<(i64, u32, u32)>>,
    models: ModelTable,
    /// Tasks per model index and status.
    counts: Vec<[u64; 7]>,
    /// Creation times of pending/running tasks, with multiplicity.
    in_flight: BTreeMap<i64, u32>,
    /// Remembered ids, by [`id_hash`] (8 bytes instead of the id): last mention, ms.
    tombstones: HashMap<u64, i64>,
    // Persistence work not yet taken by the persister.
    dirty: HashSet<u32>,
    deleted: Vec<String>,
    tombstones_put: Vec<(String, i64)>,
    events: Vec<Event>,
    /// Time of the last tombstone pass; `None` until the first sweep, which only starts the
    /// clock: after a long stop, sources mention their ids again (refreshing them) within a
    /// minute, before old tombstones are judged.
    last_tombstone_sweep: Option<i64>,
}

/// Model names of one provider, bounded: index 0 is `unknown`, 1 is `other`.
#[derive(Debug)]
struct ModelTable {
    names: Vec<Arc<str>>,
    index: HashMap<Arc<str>, u16>,
    limit: usize,
}

impl ModelTable {
    fn new(limit: usize) -> Self {
        let mut t = ModelTable {
            names: Vec::new(),
            index: HashMap::new(),
            limit,
        };
        for name in [MODEL_UNKNOWN, MODEL_OTHER] {
            let arc: Arc<str> = Arc::from(name);
            t.index.insert(arc.clone(), t.names.len() as u16);
            t.names.push(arc);
        }
        t
    }

    /// Index for `name`; past the limit (or for absurd names) the `other` bucket.
    fn intern(&mut self, name: &str) -> u16 {
        if let Some(&i) = self.index.get(name) {
            return i;
        }
        let plausible =
            !name.is_empty() && name.len() <= 64 && !name.chars().any(|c| c.is_control());
        if !plausible || self.names.len() - 2 >= self.limit || self.names.len() >= u16::MAX as usize
        {
            return 1;
        }
        let arc: Arc<str> = Arc::from(name);
        let i = self.names.len() as u16;
        self.index.insert(arc.clone(), i);
        self.names.push(arc);
        i
    }

    fn name(&self, i: u16) -> &Arc<str> {
        &self.names[i as usize]
    }
}

impl ProviderTasks {
    fn new(name: &str, polling: &Polling, max_models: usize, shard: Shard) -> Self {
        let provider: Arc<str> = Arc::from(name);
        ProviderTasks {
            name: provider.clone(),
            inner: Mutex::new(Inner {
                policy: Policy::from(polling),
                shard,
                provider,
                slots: Vec::new(),
                free: Vec::new(),
                next_generation: 0,
                index: HashMap::new(),
                schedule: BinaryHeap::new(),
                expiry: BinaryHeap::new(),
                models: ModelTable::new(max_models),
                counts: vec![[0; 7]; 2],
                in_flight: BTreeMap::new(),
                tombstones: HashMap::new(),
                dirty: HashSet::new(),
                deleted: Vec::new(),
                tombstones_put: Vec::new(),
                events: Vec::new(),
                last_tombstone_sweep: None,
            }),
            wake: Notify::new(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
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
        self.lock().index.contains_key(id)
    }

    /// Stops tracking `id` on request (`DELETE /api/v1/tasks/...`). False when not tracked.
    pub fn untrack(&self, id: &str, now: i64) -> bool {
        let mut inner = self.lock();
        match inner.index.get(id).copied() {
            Some(slot) => {
                inner.remove(slot, now, Some(DropReason::Api));
                true
            }
            None => false,
        }
    }

    /// Earliest time a task is due, if any is scheduled.
    pub fn next_due(&self) -> Option<i64> {
        let mut inner = self.lock();
        inner.peek_due()
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
        let Some(slot) = inner.index.get(obs.task_id.as_str()).copied() else {
            return false;
        };
        inner.apply(slot, obs, now);
        if !inner.task(slot).status.is_terminal() {
            let delay = inner.policy.delay_ms(inner.task(slot).polls);
            inner.schedule_at(slot, now + delay);
        }
        true
    }

    /// Records the answer to a poll taken with [`take_due`](Self::take_due).
    pub fn record_poll(&self, id: &str, answer: Result<&Observation, &PollError>, now: i64) {
        let mut inner = self.lock();
        let Some(slot) = inner.index.get(id).copied() else {
            return; // deleted while the request was in flight
        };
        inner.task_mut(slot).last_polled = Some(now);
        inner.task_mut(slot).polls = inner.task(slot).polls.saturating_add(1);
        match answer {
            Ok(obs) => {
                {
                    let t = inner.task_mut(slot);
                    t.not_found = 0;
                    t.last_error = None;
                }
                inner.apply(slot, obs, now);
                if !inner.task(slot).status.is_terminal() {
                    let delay = inner.policy.delay_ms(inner.task(slot).polls);
                    inner.schedule_at(slot, now + delay);
                }
            }
            Err(err) => {
                let not_found = err.class == Some(FailureClass::NotFound);
                {
                    let t = inner.task_mut(slot);
                    t.last_error = Some(truncate(&err.message, MAX_TEXT_LEN).into_boxed_str());
                    if not_found {
                        if t.not_found == 0 {
                            t.not_found_since = now;
                        }
                        t.not_found = t.not_found.saturating_add(1);
                    }
                }
                inner.dirty.insert(slot);
                let t = inner.task(slot);
                if not_found
                    && t.not_found >= NOT_FOUND_LIMIT
                    && now - t.not_found_since >= NOT_FOUND_MIN_SPAN_MS
                {
                    inner.remove(slot, now, Some(DropReason::NotFound));
                    return;
                }
                if inner.task(slot).status.is_terminal() {
                    return; // a failed confirmation poll of a finished task: nothing to retry
                }
                // Retry at the task's current pace; failures do not speed polling up.
                let delay = inner
                    .policy
                    .delay_ms(inner.task(slot).polls.saturating_sub(1).max(1));
                inner.schedule_at(slot, now + delay);
            }
        }
    }

    /// Asks for one poll of `id` now (a callback arrived: confirm it).
    pub fn poll_soon(&self, id: &str, now: i64) {
        let mut inner = self.lock();
        if let Some(slot) = inner.index.get(id).copied() {
            inner.schedule_at(slot, now);
            drop(inner);
            self.wake.notify_one();
        }
    }

    /// Schedules every unfinished task that has no poll planned: tasks taken by a poller
    /// that was stopped (reload) before their answer came back.
    pub fn reschedule_unscheduled(&self, now: i64) {
        let mut inner = self.lock();
        let orphans: Vec<u32> = inner
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                t.as_ref()
                    .filter(|t| !t.status.is_terminal() && t.next_poll == NEVER)
                    .map(|_| i as u32)
            })
            .collect();
        for slot in orphans {
            inner.schedule_at(slot, now);
        }
    }

    /// Ends retention of finished tasks and expires old tombstones.
    pub fn sweep(&self, now: i64) {
        self.lock().sweep(now);
    }

    pub fn gauges(&self) -> GaugeSnapshot {
        let inner = self.lock();
        let mut tasks = Vec::new();
        for (model, per_status) in inner.counts.iter().enumerate() {
            for (s, &n) in per_status.iter().enumerate() {
                if n > 0 {
                    let status = Status::from_index(s).expect("status index");
                    tasks.push((inner.models.name(model as u16).clone(), status, n));
                }
            }
        }
        GaugeSnapshot {
            tasks,
            oldest_in_flight_ms: inner.in_flight.keys().next().copied(),
            tracked: inner.index.len() as u64,
        }
    }

    pub fn tracked(&self) -> usize {
        self.lock().index.len()
    }

    /// Up to `limit` tasks, optionally of one status, in no particular order.
    pub fn list(&self, status: Option<Status>, limit: usize) -> Vec<TaskView> {
        let inner = self.lock();
        inner
            .slots
            .iter()
            .flatten()
            .filter(|t| status.is_none_or(|s| t.status == s))
            .take(limit)
            .map(|t| inner.view(t))
            .collect()
    }

    /// Takes the persistence work accumulated since the last call.
    pub fn take_pending(&self) -> Pending {
        let mut inner = self.lock();
        let provider = inner.provider.clone();
        let dirty: Vec<u32> = inner.dirty.drain().collect();
        let mut batch = Batch::default();
        for slot in dirty {
            if let Some(t) = inner.slots.get(slot as usize).and_then(|s| s.as_ref()) {
                batch.put_tasks.push((
                    store::task_key(&provider, &t.id),
                    encode_task(t, inner.models.name(t.model)),
                ));
            }
        }
        batch.delete_tasks = std::mem::take(&mut inner.deleted);
        batch.put_tombstones = std::mem::take(&mut inner.tombstones_put);
        Pending {
            batch,
            events: std::mem::take(&mut inner.events),
        }
    }

    /// Restores a task record read from the store (start-up). Finished tasks come back for
    /// the rest of their retention, in-flight ones are due within one interval. The caller
    /// has checked that this shard owns it (`App::start`).
    pub fn restore_task(&self, id: &str, record: &[u8], now: i64) -> Result<(), DecodeError> {
        let mut inner = self.lock();
        let decoded = decode_task(record)?;
        let model = inner.models.intern(&decoded.model);
        let slot = inner.insert(id, decoded.source, decoded.first_seen);
        {
            let t = inner.task_mut(slot);
            t.upstream_status = decoded.upstream_status.into_boxed_str();
            t.created_at = decoded.created_at;
            t.updated_at = decoded.updated_at;
            t.completed_at = decoded.completed_at;
            t.last_polled = decoded.last_polled;
            t.polls = decoded.polls;
            t.not_found = decoded.not_found;
            t.not_found_since = decoded.not_found_since;
            t.counted = decoded.counted;
            t.credits_used = decoded.credits_used;
            t.credits_refunded = decoded.credits_refunded;
            t.failure_reason = decoded.failure_reason;
            t.finished_at = decoded.finished_at;
            t.error_message = decoded.error_message.map(String::into_boxed_str);
            t.last_error = decoded.last_error.map(String::into_boxed_str);
        }
        inner.set_state(slot, model, decoded.status);
        if decoded.status.is_terminal() {
            let end = decoded.finished_at.unwrap_or(now) + inner.policy.retention_ms;
            let generation = inner.task(slot).generation;
            inner.expiry.push(Reverse((end, slot, generation)));
        } else {
            // Spread the restart's first polls over one interval instead of a burst.
            let spread = (fastrand::f64() * inner.policy.interval_ms as f64) as i64;
            inner.schedule_at(slot, now + spread);
        }
        Ok(())
    }

    pub fn restore_tombstone(&self, id: &str, last_seen: i64) {
        self.lock().tombstones.insert(id_hash(id), last_seen);
    }
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

impl Inner {
    fn task(&self, slot: u32) -> &Task {
        self.slots[slot as usize].as_ref().expect("live slot")
    }

    fn task_mut(&mut self, slot: u32) -> &mut Task {
        self.slots[slot as usize].as_mut().expect("live slot")
    }

    fn track(&mut self, id: &str, source: Source, now: i64) -> TrackOutcome {
        if !is_valid_task_id(id) {
            return TrackOutcome::Invalid;
        }
        if self.index.contains_key(id) {
            return TrackOutcome::Known;
        }
        if let Some(last) = self.tombstones.get_mut(&id_hash(id)) {
            // Written back at most once per re-mention period.
            if now - *last >= self.policy.remention_ms / 2 {
                *last = now;
                let key = store::task_key(&self.provider, id);
                self.tombstones_put.push((key, now));
            }
            return TrackOutcome::Remembered;
        }
        if !self.shard.owns(&self.provider, id) {
            return TrackOutcome::NotOwned;
        }
        let slot = self.insert(id, source, now);
        self.set_state(slot, 0, Status::Unknown);
        self.schedule_at(slot, now);
        self.events.push(Event::Discovered { source });
        TrackOutcome::New
    }

    fn insert(&mut self, id: &str, source: Source, first_seen: i64) -> u32 {
        let id: Arc<str> = Arc::from(id);
        self.next_generation = self.next_generation.wrapping_add(1);
        let task = Task {
            id: id.clone(),
            generation: self.next_generation,
            model: 0,
            status: Status::Unknown,
            upstream_status: Box::from(""),
            source,
            created_at: None,
            updated_at: None,
            completed_at: None,
            first_seen,
            last_polled: None,
            next_poll: NEVER,
            polls: 0,
            not_found: 0,
            not_found_since: 0,
            counted: false,
            credits_used: 0.0,
            credits_refunded: 0.0,
            failure_reason: None,
            finished_at: None,
            error_message: None,
            last_error: None,
            in_flight_key: None,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(task);
                slot
            }
            None => {
                self.slots.push(Some(task));
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(id, slot);
        // Counted as unknown/unknown until `set_state` says otherwise.
        self.counts[0][Status::Unknown.index()] += 1;
        self.dirty.insert(slot);
        slot
    }

    /// Moves a task's gauge contribution to (`model`, `status`).
    fn set_state(&mut self, slot: u32, model: u16, status: Status) {
        let (old_model, old_status, old_key) = {
            let t = self.task(slot);
            (t.model, t.status, t.in_flight_key)
        };
        self.counts[old_model as usize][old_status.index()] -= 1;
        while self.counts.len() <= model as usize {
            self.counts.push([0; 7]);
        }
        self.counts[model as usize][status.index()] += 1;
        if let Some(key) = old_key {
            decrement(&mut self.in_flight, key);
        }
        let new_key = status.is_in_flight().then(|| {
            let t = self.task(slot);
            t.created_at.unwrap_or(t.first_seen)
        });
        if let Some(key) = new_key {
            *self.in_flight.entry(key).or_insert(0) += 1;
        }
        let t = self.task_mut(slot);
        t.model = model;
        t.status = status;
        t.in_flight_key = new_key;
    }

    /// The accounting rule. Terminal status: counted once. Credits: each increase once.
    fn apply(&mut self, slot: u32, obs: &Observation, now: i64) {
        self.dirty.insert(slot);
        let (current_status, current_model) = {
            let t = self.task(slot);
            (t.status, t.model)
        };
        // A terminal status never changes again: a late or replayed answer may still bring
        // credits, but not a new status.
        let status = if current_status.is_terminal() {
            current_status
        } else {
            obs.status
        };
        // The model is learnt once (it does not change during a task's life).
        let model = match &obs.model {
            Some(name) if current_model == 0 => self.models.intern(name),
            _ => current_model,
        };
        {
            let t = self.task_mut(slot);
            if !t.status.is_terminal() {
                t.upstream_status = obs.upstream_status.clone().into_boxed_str();
                t.failure_reason = obs.failure_reason;
                t.error_message = obs.error_message.clone().map(String::into_boxed_str);
            }
            t.created_at = obs.created_at.or(t.created_at);
            t.updated_at = obs.updated_at.or(t.updated_at);
            t.completed_at = obs.completed_at.or(t.completed_at);
        }
        // In-flight age keys on created_at, which may have just become known.
        self.set_state(slot, model, status);
        let model_name = self.models.name(model).clone();

        if let Some(used) = obs.credits_used.filter(|v| v.is_finite()) {
            let t = self.task_mut(slot);
            if used > t.credits_used {
                let amount = used - t.credits_used;
                t.credits_used = used;
                self.events.push(Event::CreditsUsed {
                    model: model_name.clone(),
                    amount,
                });
            }
        }
        if let Some(refunded) = obs.credits_refunded.filter(|v| v.is_finite()) {
            let t = self.task_mut(slot);
            if refunded > t.credits_refunded {
                let amount = refunded - t.credits_refunded;
                t.credits_refunded = refunded;
                self.events.push(Event::CreditsRefunded {
                    model: model_name.clone(),
                    amount,
                });
            }
        }

        if status.is_terminal() && !self.task(slot).counted {
            let reason = match status {
                Status::Succeeded => None,
                Status::TimedOut => Some(obs.failure_reason.unwrap_or(FailureReason::Timeout)),
                Status::Cancelled => Some(obs.failure_reason.unwrap_or(FailureReason::Cancelled)),
                _ => Some(obs.failure_reason.unwrap_or(FailureReason::Unspecified)),
            };
            let latency_seconds = obs.latency_seconds();
            let retention_end = now + self.policy.retention_ms;
            let generation = {
                let t = self.task_mut(slot);
                t.counted = true;
                t.finished_at = Some(now);
                t.failure_reason = reason;
                t.next_poll = NEVER;
                t.generation
            };
            self.expiry.push(Reverse((retention_end, slot, generation)));
            self.events.push(Event::Completed {
                model: model_name,
                status,
                reason,
                latency_seconds,
            });
        }
    }

    fn schedule_at(&mut self, slot: u32, due: i64) {
        let t = self.task_mut(slot);
        if t.next_poll <= due {
            return; // already due earlier: keep the earlier entry
        }
        t.next_poll = due;
        let generation = t.generation;
        self.schedule.push(Reverse((due, slot, generation)));
    }

    /// Whether a schedule entry still describes the task in `slot`.
    fn entry_is_live(&self, due: i64, slot: u32, generation: u32) -> bool {
        matches!(
            self.slots.get(slot as usize),
            Some(Some(t)) if t.generation == generation && t.next_poll == due
        )
    }

    fn peek_due(&mut self) -> Option<i64> {
        while let Some(&Reverse((due, slot, generation))) = self.schedule.peek() {
            if self.entry_is_live(due, slot, generation) {
                return Some(due);
            }
            self.schedule.pop();
        }
        None
    }

    fn take_due(&mut self, now: i64) -> Option<Arc<str>> {
        loop {
            let due = self.peek_due()?;
            if due > now {
                return None;
            }
            let Reverse((_, slot, _)) = self.schedule.pop().expect("peeked");
            let t = self.task(slot);
            let age_from = t.created_at.unwrap_or(t.first_seen);
            if !t.status.is_terminal() && now - age_from > self.policy.max_task_age_ms {
                self.remove(slot, now, Some(DropReason::MaxAge));
                continue;
            }
            let t = self.task_mut(slot);
            t.next_poll = NEVER;
            return Some(t.id.clone());
        }
    }

    /// Removes a task: gauges, schedule, store row; remembers the id in a tombstone.
    fn remove(&mut self, slot: u32, now: i64, reason: Option<DropReason>) {
        let Some(task) = self.slots[slot as usize].take() else {
            return;
        };
        self.counts[task.model as usize][task.status.index()] -= 1;
        if let Some(key) = task.in_flight_key {
            decrement(&mut self.in_flight, key);
        }
        self.index.remove(&*task.id);
        self.free.push(slot);
        self.dirty.remove(&slot);
        let key = store::task_key(&self.provider, &task.id);
        self.deleted.push(key.clone());
        self.tombstones.insert(id_hash(&task.id), now);
        self.tombstones_put.push((key, now));
        if let Some(reason) = reason {
            self.events.push(Event::Dropped { reason });
        }
    }

    fn sweep(&mut self, now: i64) {
        while let Some(&Reverse((end, slot, generation))) = self.expiry.peek() {
            if end > now {
                break;
            }
            self.expiry.pop();
            let live = matches!(
                self.slots.get(slot as usize),
                Some(Some(t)) if t.generation == generation && t.status.is_terminal()
            );
            if live {
                self.remove(slot, now, None);
            }
        }
        // Tombstones: a full pass, at most once a minute. (Their store rows are expired by
        // the persister, `Store::expire_tombstones`.)
        let last = *self.last_tombstone_sweep.get_or_insert(now);
        if now - last >= 60_000 {
            self.last_tombstone_sweep = Some(now);
            let ttl = self.policy.tombstone_ttl_ms;
            self.tombstones.retain(|_, last| now - *last <= ttl);
        }
    }

    fn view(&self, t: &Task) -> TaskView {
        let time = |ms: i64| format_millis(ms);
        TaskView {
            id: t.id.to_string(),
            provider: self.provider.to_string(),
            model: self.models.name(t.model).to_string(),
            status: t.status.as_str(),
            upstream_status: t.upstream_status.to_string(),
            failure_reason: t.failure_reason.map(FailureReason::as_str),
            error_message: t.error_message.as_deref().map(str::to_string),
            source: t.source.as_str(),
            created_at: t.created_at.map(time),
            updated_at: t.updated_at.map(time),
            completed_at: t.completed_at.map(time),
            first_seen_at: time(t.first_seen),
            last_polled_at: t.last_polled.map(time),
            next_poll_at: (t.next_poll != NEVER).then(|| time(t.next_poll)),
            credits_used: t.credits_used,
            credits_refunded: t.credits_refunded,
            last_error: t.last_error.as_deref().map(str::to_string),
        }
    }
}

/// A stable 64-bit hash of a task id, for the tombstone set (SipHash with fixed keys:
/// collisions among millions of ids are vanishingly unlikely, and harmless but for one
/// task not being tracked).
fn id_hash(id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    id.hash(&mut hasher);
    hasher.finish()
}

fn decrement(map: &mut BTreeMap<i64, u32>, key: i64) {
    if let Some(n) = map.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            map.remove(&key);
        }
    }
}

/// RFC 3339 text of a Unix-millisecond time, for the API.
pub fn format_millis(ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

impl Shard {
    /// Whether this shard owns `provider`/`id` (see `crate::shard`).
    pub fn owns(&self, provider: &str, id: &str) -> bool {
        self.count <= 1 || shard::shard_of(provider, id, self.count) == self.index
    }
}

// ---------------------------------------------------------------------------------------
// Task records in the store: a small versioned binary layout (fast to load at 1M tasks).
// ---------------------------------------------------------------------------------------

const RECORD_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
#[error("task record is corrupt or of an unknown version")]
pub struct DecodeError;

#[derive(Debug, PartialEq)]
struct DecodedTask {
    model: String,
    status: Status,
    upstream_status: String,
    source: Source,
    created_at: Option<i64>,
    updated_at: Option<i64>,
    completed_at: Option<i64>,
    first_seen: i64,
    last_polled: Option<i64>,
    polls: u32,
    not_found: u16,
    not_found_since: i64,
    counted: bool,
    credits_used: f64,
    credits_refunded: f64,
    failure_reason: Option<FailureReason>,
    finished_at: Option<i64>,
    error_message: Option<String>,
    last_error: Option<String>,
}

fn encode_task(t: &Task, model: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    out.push(RECORD_VERSION);
    out.push(t.status.index() as u8);
    out.push(t.source.to_byte());
    out.push(u8::from(t.counted));
    out.push(t.failure_reason.map_or(u8::MAX, |r| r.index() as u8));
    put_str(&mut out, model);
    put_str(&mut out, &t.upstream_status);
    for v in [
        t.created_at,
        t.updated_at,
        t.completed_at,
        t.last_polled,
        t.finished_at,
    ] {
        out.extend_from_slice(&v.unwrap_or(i64::MIN).to_le_bytes());
    }
    out.extend_from_slice(&t.first_seen.to_le_bytes());
    out.extend_from_slice(&t.polls.to_le_bytes());
    out.extend_from_slice(&t.not_found.to_le_bytes());
    out.extend_from_slice(&t.not_found_since.to_le_bytes());
    out.extend_from_slice(&t.credits_used.to_le_bytes());
    out.extend_from_slice(&t.credits_refunded.to_le_bytes());
    put_str(&mut out, t.error_message.as_deref().unwrap_or(""));
    put_str(&mut out, t.last_error.as_deref().unwrap_or(""));
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let s = &s[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().map_err(|_| DecodeError)?,
        ))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| DecodeError)?,
        ))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| DecodeError)?,
        ))
    }
    fn f64(&mut self) -> Result<f64, DecodeError> {
        Ok(f64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| DecodeError)?,
        ))
    }
    fn opt_i64(&mut self) -> Result<Option<i64>, DecodeError> {
        let v = self.i64()?;
        Ok((v != i64::MIN).then_some(v))
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| DecodeError)
    }
}

fn decode_task(bytes: &[u8]) -> Result<DecodedTask, DecodeError> {
    let mut r = Reader(bytes);
    if r.u8()? != RECORD_VERSION {
        return Err(DecodeError);
    }
    let status = Status::from_index(r.u8()? as usize).ok_or(DecodeError)?;
    let source = Source::from_byte(r.u8()?);
    let counted = r.u8()? != 0;
    let reason_byte = r.u8()?;
    let failure_reason = if reason_byte == u8::MAX {
        None
    } else {
        Some(FailureReason::from_index(reason_byte as usize).ok_or(DecodeError)?)
    };
    let model = r.string()?;
    let upstream_status = r.string()?;
    let created_at = r.opt_i64()?;
    let updated_at = r.opt_i64()?;
    let completed_at = r.opt_i64()?;
    let last_polled = r.opt_i64()?;
    let finished_at = r.opt_i64()?;
    let first_seen = r.i64()?;
    let polls = r.u32()?;
    let not_found = r.u16()?;
    let not_found_since = r.i64()?;
    let credits_used = r.f64()?;
    let credits_refunded = r.f64()?;
    let error_message = Some(r.string()?).filter(|s| !s.is_empty());
    let last_error = Some(r.string()?).filter(|s| !s.is_empty());
    Ok(DecodedTask {
        model,
        status,
        upstream_status,
        source,
        created_at,
        updated_at,
        completed_at,
        first_seen,
        last_polled,
        polls,
        not_found,
        not_found_since,
        counted,
        credits_used,
        credits_refunded,
        failure_reason,
        finished_at,
        error_message,
        last_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn polling() -> Polling {
        Polling {
            interval: Duration::from_secs(10),
            max_interval: Duration::from_secs(60),
            retention: Duration::from_secs(100),
            forget_after: Duration::from_secs(300),
            max_task_age: Duration::from_secs(1000),
            ..Polling::default()
        }
    }

    fn tasks() -> ProviderTasks {
        ProviderTasks::new("p", &polling(), 3, Shard::default())
    }

    fn obs(id: &str, status: Status) -> Observation {
        let mut o = Observation::new(id, status, "x");
        o.model = Some("m".into());
        o.created_at = Some(0);
        o.updated_at = Some(4_000);
        o
    }

    fn completed(events: &[Event]) -> usize {
        events
            .iter()
            .filter(|e| matches!(e, Event::Completed { .. }))
            .count()
    }

    #[test]
    fn terminal_outcome_counted_once_across_replays() {
        let p = tasks();
        assert_eq!(p.track("a", Source::Static, 0), TrackOutcome::New);
        assert_eq!(p.track("a", Source::Api, 0), TrackOutcome::Known);
        assert_eq!(p.take_due(0).as_deref(), Some("a"));
        p.record_poll("a", Ok(&obs("a", Status::Running)), 1);
        p.record_poll("a", Ok(&obs("a", Status::Succeeded)), 2);
        p.observe(&obs("a", Status::Succeeded), 3);
        p.observe(&obs("a", Status::Failed), 4);
        let pending = p.take_pending();
        assert_eq!(completed(&pending.events), 1);
        assert!(pending.events.contains(&Event::Completed {
            model: Arc::from("m"),
            status: Status::Succeeded,
            reason: None,
            latency_seconds: Some(4.0),
        }));
        let g = p.gauges();
        assert_eq!(g.tasks, vec![(Arc::from("m"), Status::Succeeded, 1)]);
        assert_eq!(g.oldest_in_flight_ms, None);
    }

    #[test]
    fn credits_count_increases_only() {
        let p = tasks();
        p.track("a", Source::Api, 0);
        let mut o = obs("a", Status::Running);
        o.credits_used = Some(8.0);
        p.observe(&o, 1);
        p.observe(&o, 2);
        o.credits_used = Some(5.0); // a lower value later is not a refund
        p.observe(&o, 3);
        o.status = Status::Failed;
        o.credits_used = Some(8.0);
        o.credits_refunded = Some(8.0);
        p.observe(&o, 4);
        p.observe(&o, 5);
        let events = p.take_pending().events;
        let used: f64 = events
            .iter()
            .map(|e| match e {
                Event::CreditsUsed { amount, .. } => *amount,
                _ => 0.0,
            })
            .sum();
        let refunded: f64 = events
            .iter()
            .map(|e| match e {
                Event::CreditsRefunded { amount, .. } => *amount,
                _ => 0.0,
            })
            .sum();
        assert_eq!((used, refunded), (8.0, 8.0));
    }

    #[test]
    fn retention_removes_and_tombstone_prevents_recount() {
        let p = tasks();
        p.track("a", Source::Static, 0);
        p.observe(&obs("a", Status::Succeeded), 1_000);
        p.sweep(50_000);
        assert_eq!(p.tracked(), 1, "still within retention");
        p.sweep(101_000);
        assert_eq!(p.tracked(), 0);
        assert_eq!(
            p.track("a", Source::Static, 102_000),
            TrackOutcome::Remembered
        );
        let pending = p.take_pending();
        assert_eq!(completed(&pending.events), 1);
        assert_eq!(pending.batch.delete_tasks.len(), 1);
        assert_eq!(pending.batch.put_tombstones.len(), 1);
    }

    #[test]
    fn tombstones_live_forget_after_the_last_mention() {
        let p = tasks(); // tombstones live forget_after = 300 s after a mention
        for id in ["kept", "forgotten"] {
            p.track(id, Source::Static, 0);
            p.observe(&obs(id, Status::Succeeded), 0);
        }
        p.sweep(100_000); // retention over: both leave the registry, tombstones remain
        assert_eq!(p.tracked(), 0);
        for now in [200_000, 350_000] {
            assert_eq!(
                p.track("kept", Source::Static, now),
                TrackOutcome::Remembered
            );
        }
        p.sweep(500_000);
        assert_eq!(
            p.track("kept", Source::Static, 500_000),
            TrackOutcome::Remembered
        );
        assert_eq!(
            p.track("forgotten", Source::Static, 500_000),
            TrackOutcome::New
        );
    }

    #[test]
    fn not_found_drops_after_three_answers_over_a_minute() {
        let p = tasks();
        p.track("gone", Source::Api, 0);
        let err = PollError {
            class: Some(FailureClass::NotFound),
            message: "not found".into(),
        };
        p.record_poll("gone", Err(&err), 0);
        p.record_poll("gone", Err(&err), 20_000);
        p.record_poll("gone", Err(&err), 40_000);
        assert_eq!(p.tracked(), 1, "three answers within 40 s are not enough");
        p.record_poll("gone", Err(&err), 61_000);
        assert_eq!(p.tracked(), 0);
        let events = p.take_pending().events;
        assert!(events.contains(&Event::Dropped {
            reason: DropReason::NotFound
        }));
    }

    #[test]
    fn max_age_drops_when_due() {
        let p = tasks();
        p.track("old", Source::Api, 0);
        let mut o = obs("old", Status::Running);
        o.created_at = Some(0);
        p.observe(&o, 1);
        assert_eq!(p.gauges().oldest_in_flight_ms, Some(0));
        assert_eq!(p.take_due(2_000_000), None);
        assert_eq!(p.tracked(), 0);
        assert_eq!(p.gauges().oldest_in_flight_ms, None);
    }

    #[test]
    fn models_are_bounded() {
        let p = tasks();
        for (i, model) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            let id = format!("t{i}");
            p.track(&id, Source::Api, 0);
            let mut o = obs(&id, Status::Running);
            o.model = Some(model.to_string());
            p.observe(&o, 1);
        }
        let mut models: Vec<(String, u64)> = p
            .gauges()
            .tasks
            .iter()
            .map(|(m, _, n)| (m.to_string(), *n))
            .collect();
        models.sort();
        let expected = [("a", 1), ("b", 1), ("c", 1), ("other", 2)];
        assert_eq!(models, expected.map(|(m, n)| (m.to_string(), n)));
    }

    #[test]
    fn backoff_grows_to_the_ceiling() {
        let policy = Policy::from(&polling());
        let d1 = policy.delay_ms(1);
        assert!((9_000..=11_000).contains(&d1), "{d1}");
        let d20 = policy.delay_ms(20);
        assert!((54_000..=66_000).contains(&d20), "{d20}");
    }

    #[test]
    fn records_round_trip_through_the_store_encoding() {
        let p = tasks();
        p.track("a", Source::History, 5);
        let mut o = obs("a", Status::Failed);
        o.failure_reason = Some(FailureReason::ContentModeration);
        o.error_message = Some("blocked".into());
        o.credits_used = Some(2.5);
        p.observe(&o, 10);
        let pending = p.take_pending();
        let (key, record) = &pending.batch.put_tasks[0];
        assert_eq!(store::split_task_key(key), Some(("p", "a")));
        let d = decode_task(record).unwrap();
        assert_eq!(d.status, Status::Failed);
        assert_eq!(d.failure_reason, Some(FailureReason::ContentModeration));
        assert_eq!(d.model, "m");
        assert!(d.counted);
        assert_eq!(d.credits_used, 2.5);
        assert_eq!(d.error_message.as_deref(), Some("blocked"));
        assert_eq!(d.source, Source::History);
        assert!(decode_task(&record[..record.len() - 1]).is_err());

        let q = tasks();
        q.restore_task("a", record, 20).unwrap();
        q.observe(&o, 30);
        assert_eq!(
            completed(&q.take_pending().events),
            0,
            "restored counted task is not recounted"
        );
    }
}

/// The exactly-once property: any sequence of observations for any set of tasks, in any
/// order, with replays, retention sweeps, commits and crashes (restarts from the last commit)
/// at any point, commits each task's terminal outcome once and each credit once.
#[cfg(test)]
mod exactly_once {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::time::Duration;

    /// What really happened to one task: its final state, and the answers a poller or a
    /// callback may deliver (in any order, any number of times).
    #[derive(Debug, Clone)]
    struct Life {
        terminal: Status,
        credits_used: f64,
        credits_refunded: f64,
        answers: Vec<Observation>,
    }

    #[derive(Debug, Clone)]
    enum Op {
        Track(usize),
        /// Answer `k` of a task, as a poll answer (true) or a callback (false).
        Answer(usize, usize, bool),
        Commit,
        /// Restart from the last commit, losing everything not committed.
        Crash,
        Sweep(u32),
    }

    fn life() -> impl Strategy<Value = Life> {
        let terminal = prop_oneof![
            Just(Status::Succeeded),
            Just(Status::Failed),
            Just(Status::TimedOut),
            Just(Status::Cancelled)
        ];
        (
            terminal,
            0u32..20,
            0u32..20,
            prop::collection::vec((0u8..3, 0u32..20), 0..4),
        )
            .prop_map(|(terminal, used, refunded, early)| {
                let used = f64::from(used) / 2.0;
                let refunded = f64::from(refunded.min(used as u32 * 2)) / 2.0;
                let mut answers: Vec<Observation> = early
                    .into_iter()
                    .map(|(s, c)| {
                        let status =
                            [Status::Pending, Status::Running, Status::Unknown][s as usize];
                        let mut o = Observation::new("", status, "x");
                        o.credits_used = Some((f64::from(c) / 2.0).min(used));
                        o
                    })
                    .collect();
                let mut done = Observation::new("", terminal, "x");
                done.model = Some("m".into());
                done.credits_used = Some(used);
                done.credits_refunded = Some(refunded);
                done.created_at = Some(0);
                done.completed_at = Some(1_000);
                answers.push(done);
                Life {
                    terminal,
                    credits_used: used,
                    credits_refunded: refunded,
                    answers,
                }
            })
    }

    fn ops(tasks: usize) -> impl Strategy<Value = Vec<Op>> {
        let op = prop_oneof![
            3 => (0..tasks).prop_map(Op::Track),
            6 => (0..tasks, 0usize..5, any::<bool>()).prop_map(|(t, k, p)| Op::Answer(t, k, p)),
            2 => Just(Op::Commit),
            1 => Just(Op::Crash),
            1 => (0u32..200_000).prop_map(Op::Sweep),
        ];
        prop::collection::vec(op, 0..60)
    }

    /// The committed world: the store's rows and the events committed with them.
    #[derive(Default)]
    struct Committed {
        tasks: HashMap<String, Vec<u8>>,
        tombstones: HashMap<String, i64>,
        events: Vec<Event>,
    }

    fn commit(p: &ProviderTasks, committed: &mut Committed) {
        let pending = p.take_pending();
        for (k, v) in pending.batch.put_tasks {
            committed.tasks.insert(k, v);
        }
        for k in pending.batch.delete_tasks {
            committed.tasks.remove(&k);
        }
        for (k, v) in pending.batch.put_tombstones {
            committed.tombstones.insert(k, v);
        }
        for k in pending.batch.delete_tombstones {
            committed.tombstones.remove(&k);
        }
        committed.events.extend(pending.events);
    }

    fn fresh() -> ProviderTasks {
        let polling = Polling {
            retention: Duration::from_secs(60),
            max_task_age: Duration::from_secs(1_000_000),
            ..Polling::default()
        };
        ProviderTasks::new("p", &polling, 10, Shard::default())
    }

    fn restart(committed: &Committed, now: i64) -> ProviderTasks {
        let p = fresh();
        for (key, record) in &committed.tasks {
            let (_, id) = store::split_task_key(key).unwrap();
            p.restore_task(id, record, now).unwrap();
        }
        for (key, last) in &committed.tombstones {
            let (_, id) = store::split_task_key(key).unwrap();
            p.restore_tombstone(id, *last);
        }
        p
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn outcomes_and_credits_are_committed_exactly_once(
            lives in prop::collection::vec(life(), 1..6),
            script in ops(6),
        ) {
            let id = |t: usize| format!("task-{t}");
            let mut committed = Committed::default();
            let mut p = fresh();
            let mut now: i64 = 1;
            let answer = |p: &ProviderTasks, t: usize, k: usize, poll: bool, now: i64| {
                let life: &Life = &lives[t];
                let mut obs = life.answers[k % life.answers.len()].clone();
                obs.task_id = id(t);
                if poll {
                    p.record_poll(&id(t), Ok(&obs), now);
                } else {
                    p.observe(&obs, now);
                }
            };
            for op in script {
                now += 10;
                match op {
                    Op::Track(t) if t < lives.len() => { p.track(&id(t), Source::Api, now); }
                    Op::Answer(t, k, poll) if t < lives.len() => answer(&p, t, k, poll, now),
                    Op::Commit => commit(&p, &mut committed),
                    Op::Crash => p = restart(&committed, now),
                    Op::Sweep(ms) => { now += i64::from(ms); p.sweep(now); }
                    _ => {}
                }
            }
            // Drain: every task is (re)discovered and its final answer arrives.
            for (t, life) in lives.iter().enumerate() {
                now += 10;
                p.track(&id(t), Source::Api, now);
                answer(&p, t, life.answers.len() - 1, true, now);
            }
            commit(&p, &mut committed);

            // Completions per task are not observable by id in events, so count totals by
            // status, and credits in total: each must equal the truth exactly.
            let mut completions: HashMap<Status, usize> = HashMap::new();
            let (mut used, mut refunded) = (0.0, 0.0);
            for e in &committed.events {
                match e {
                    Event::Completed { status, .. } => *completions.entry(*status).or_default() += 1,
                    Event::CreditsUsed { amount, .. } => used += amount,
                    Event::CreditsRefunded { amount, .. } => refunded += amount,
                    _ => {}
                }
            }
            let mut expected: HashMap<Status, usize> = HashMap::new();
            for l in &lives {
                *expected.entry(l.terminal).or_default() += 1;
            }
            prop_assert_eq!(completions, expected);
            let truth_used: f64 = lives.iter().map(|l| l.credits_used).sum();
            let truth_refunded: f64 = lives.iter().map(|l| l.credits_refunded).sum();
            prop_assert!((used - truth_used).abs() < 1e-9, "used {} truth {}", used, truth_used);
            prop_assert!((refunded - truth_refunded).abs() < 1e-9, "refunded {} truth {}", refunded, truth_refunded);
        }
    }
}
