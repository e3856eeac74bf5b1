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

mod compact;

use std::cmp::Reverse;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, RwLock};

use hashbrown::HashTable;
use tokio::sync::Notify;

use compact::{TaskId, UUID_LEN, WORD_OVERFLOW, Words};

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
/// An absent time (the store records use the same sentinel).
const NO_TIME: i64 = i64::MIN;

fn some_time(t: i64) -> Option<i64> {
    (t != NO_TIME).then_some(t)
}

/// [`Task::flags`]: the terminal outcome has been counted.
const COUNTED: u8 = 1;
/// Changed since the persister last took it; the slot is listed in `Inner::dirty`.
const DIRTY: u8 = 2;
/// Counted in `Inner::in_flight` under [`Task::in_flight_key`].
const IN_FLIGHT: u8 = 4;
/// Only poll bookkeeping changed (`last_polled`, `polls`, `not_found`, `last_error`); the
/// slot is listed in `Inner::lazy`, written at most every [`BOOKKEEPING_FLUSH`].
const LAZY: u8 = 8;

/// How often tasks whose only change is poll bookkeeping are written. A poll that brings no
/// news changes nothing that is counted; writing its record anyway would rewrite every
/// polled task every few hundred milliseconds (most polls of a long task bring no news).
/// A crash loses at most this much bookkeeping: a task is then polled a little sooner than
/// its back-off said. A clean shutdown writes it all (`take_pending_all`).
const BOOKKEEPING_FLUSH: std::time::Duration = std::time::Duration::from_secs(60);

/// One tracked task, 128 bytes. Times are Unix milliseconds with [`NO_TIME`] for "absent",
/// the id is stored inline (see [`TaskId`]), the upstream status word is an index into the
/// provider's [`Words`], and values most tasks never have live in `extra`.
#[derive(Debug)]
struct Task {
    created_at: i64,
    updated_at: i64,
    completed_at: i64,
    first_seen: i64,
    last_polled: i64,
    /// Due time of the next poll; [`NEVER`] when none is planned.
    next_poll: i64,
    finished_at: i64,
    credits_used: f64,
    credits_refunded: f64,
    id: TaskId,
    extra: Option<Box<Extra>>,
    generation: u32,
    polls: u32,
    model: u16,
    /// Index in `Inner::words`, or [`WORD_OVERFLOW`] with the word in `extra`.
    upstream_status: u16,
    not_found: u16,
    status: Status,
    source: Source,
    failure_reason: Option<FailureReason>,
    flags: u8,
}

/// The rarely set values of a task, allocated only while one of them is set.
#[derive(Debug, Default)]
struct Extra {
    /// Start of the current run of "not found" answers (meaningful while `not_found > 0`).
    not_found_since: i64,
    upstream_status: Option<Box<str>>,
    error_message: Option<Box<str>>,
    last_error: Option<Box<str>>,
}

impl Extra {
    fn is_empty(&self) -> bool {
        self.not_found_since == 0
            && self.upstream_status.is_none()
            && self.error_message.is_none()
            && self.last_error.is_none()
    }
}

impl Task {
    fn new(id: TaskId, source: Source, first_seen: i64, generation: u32) -> Self {
        Task {
            created_at: NO_TIME,
            updated_at: NO_TIME,
            completed_at: NO_TIME,
            first_seen,
            last_polled: NO_TIME,
            next_poll: NEVER,
            finished_at: NO_TIME,
            credits_used: 0.0,
            credits_refunded: 0.0,
            id,
            extra: None,
            generation,
            polls: 0,
            model: 0,
            upstream_status: 0,
            not_found: 0,
            status: Status::Unknown,
            source,
            failure_reason: None,
            flags: 0,
        }
    }

    fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    fn set(&mut self, flag: u8, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    /// Key of this task in `Inner::in_flight`: its creation time, else when we first saw it.
    fn in_flight_key(&self) -> i64 {
        if self.created_at != NO_TIME {
            self.created_at
        } else {
            self.first_seen
        }
    }

    fn extra(&self) -> Option<&Extra> {
        self.extra.as_deref()
    }

    fn update_extra(&mut self, f: impl FnOnce(&mut Extra)) {
        let extra = self.extra.get_or_insert_with(Box::default);
        f(extra);
        if extra.is_empty() {
            self.extra = None;
        }
    }

    fn not_found_since(&self) -> i64 {
        self.extra().map_or(0, |e| e.not_found_since)
    }

    fn set_not_found_since(&mut self, at: i64) {
        if at != self.not_found_since() {
            self.update_extra(|e| e.not_found_since = at);
        }
    }

    fn error_message(&self) -> Option<&str> {
        self.extra().and_then(|e| e.error_message.as_deref())
    }

    /// Returns whether the message changed.
    fn set_error_message(&mut self, message: Option<&str>) -> bool {
        let changed = message != self.error_message();
        if changed {
            self.update_extra(|e| e.error_message = message.map(Box::from));
        }
        changed
    }

    fn last_error(&self) -> Option<&str> {
        self.extra().and_then(|e| e.last_error.as_deref())
    }

    fn set_last_error(&mut self, error: Option<&str>) {
        if error != self.last_error() {
            self.update_extra(|e| e.last_error = error.map(Box::from));
        }
    }

    fn upstream_status<'a>(&'a self, words: &'a Words) -> &'a str {
        if self.upstream_status == WORD_OVERFLOW {
            self.extra()
                .and_then(|e| e.upstream_status.as_deref())
                .unwrap_or("")
        } else {
            words.get(self.upstream_status)
        }
    }

    /// Returns whether the word changed.
    fn set_upstream_status(&mut self, words: &mut Words, word: &str) -> bool {
        let i = words.intern(word);
        let mut changed = i != self.upstream_status;
        self.upstream_status = i;
        if i == WORD_OVERFLOW {
            if self.extra().and_then(|e| e.upstream_status.as_deref()) != Some(word) {
                self.update_extra(|e| e.upstream_status = Some(word.into()));
                changed = true;
            }
        } else if self.extra().is_some_and(|e| e.upstream_status.is_some()) {
            self.update_extra(|e| e.upstream_status = None);
        }
        changed
    }

    /// The record's values other than poll bookkeeping and text, to tell whether an answer
    /// changed anything worth writing now.
    fn record_state(&self) -> RecordState {
        RecordState {
            times: [
                self.created_at,
                self.updated_at,
                self.completed_at,
                self.finished_at,
            ],
            credits: [self.credits_used.to_bits(), self.credits_refunded.to_bits()],
            model: self.model,
            status: self.status,
            failure_reason: self.failure_reason,
            counted: self.has(COUNTED),
        }
    }
}

#[derive(PartialEq)]
struct RecordState {
    times: [i64; 4],
    credits: [u64; 2],
    model: u16,
    status: Status,
    failure_reason: Option<FailureReason>,
    counted: bool,
}

/// A schedule entry: due time and slot in 12 bytes, ordered by due time, then slot. It is
/// live while the task in the slot is due at exactly that time (`Task::next_poll`); a
/// rescheduled or removed task leaves a stale entry behind, skipped when it surfaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Due {
    hi: u32,
    lo: u32,
    slot: u32,
}

impl Due {
    /// `due` must not be negative (see `Inner::schedule_at`).
    fn new(due: i64, slot: u32) -> Self {
        let d = due as u64;
        Due {
            hi: (d >> 32) as u32,
            lo: d as u32,
            slot,
        }
    }

    fn due(self) -> i64 {
        (u64::from(self.hi) << 32 | u64::from(self.lo)) as i64
    }
}

#[derive(Debug)]
struct Inner {
    policy: Policy,
    shard: Shard,
    provider: Arc<str>,
    slots: Vec<Option<Task>>,
    free: Vec<u32>,
    next_generation: u32,
    /// Slots of live tasks, hashed by the id stored in the slot (the id is kept once).
    index: HashTable<u32>,
    hasher: RandomState,
    schedule: BinaryHeap<Reverse<Due>>,
    /// (retention end, slot, generation) of finished tasks.
    expiry: BinaryHeap<Reverse<(i64, u32, u32)>>,
    models: ModelTable,
    words: Words,
    /// Tasks per model index and status.
    counts: Vec<[u64; 7]>,
    /// Creation times of pending/running tasks, with multiplicity.
    in_flight: BTreeMap<i64, u32>,
    /// Remembered ids, by [`id_hash`] (8 bytes instead of the id): last mention, ms.
    tombstones: HashMap<u64, i64>,
    // Persistence work not yet taken by the persister.
    /// Slots whose task has the [`DIRTY`] flag (a slot may be listed more than once).
    dirty: Vec<u32>,
    /// Slots whose task has the [`LAZY`] flag, and when they were last written.
    lazy: Vec<u32>,
    lazy_written: std::time::Instant,
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
                index: HashTable::new(),
                hasher: RandomState::new(),
                schedule: BinaryHeap::new(),
                expiry: BinaryHeap::new(),
                models: ModelTable::new(max_models),
                words: Words::new(),
                counts: vec![[0; 7]; 2],
                in_flight: BTreeMap::new(),
                tombstones: HashMap::new(),
                dirty: Vec::new(),
                lazy: Vec::new(),
                lazy_written: std::time::Instant::now(),
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
        let Some(slot) = inner.slot_of(&obs.task_id) else {
            return false;
        };
        inner.apply(slot, obs, now);
        let t = inner.task(slot);
        if !t.status.is_terminal() {
            let delay = inner.policy.delay_ms(t.polls);
            inner.schedule_at(slot, now + delay);
        }
        true
    }

    /// Records the answer to a poll taken with [`take_due`](Self::take_due).
    pub fn record_poll(&self, id: &str, answer: Result<&Observation, &PollError>, now: i64) {
        let mut inner = self.lock();
        let Some(slot) = inner.slot_of(id) else {
            return; // deleted while the request was in flight
        };
        {
            let t = inner.task_mut(slot);
            t.last_polled = now;
            t.polls = t.polls.saturating_add(1);
        }
        match answer {
            Ok(obs) => {
                {
                    let t = inner.task_mut(slot);
                    t.not_found = 0;
                    t.set_not_found_since(0);
                    t.set_last_error(None);
                }
                inner.apply(slot, obs, now);
                let t = inner.task(slot);
                if !t.status.is_terminal() {
                    let delay = inner.policy.delay_ms(t.polls);
                    inner.schedule_at(slot, now + delay);
                }
            }
            Err(err) => {
                let not_found = err.class == Some(FailureClass::NotFound);
                {
                    let t = inner.task_mut(slot);
                    t.set_last_error(Some(&truncate(&err.message, MAX_TEXT_LEN)));
                    if not_found {
                        if t.not_found == 0 {
                            t.set_not_found_since(now);
                        }
                        t.not_found = t.not_found.saturating_add(1);
                    }
                }
                inner.mark_lazy(slot);
                let t = inner.task(slot);
                if not_found
                    && t.not_found >= NOT_FOUND_LIMIT
                    && now - t.not_found_since() >= NOT_FOUND_MIN_SPAN_MS
                {
                    inner.remove(slot, now, Some(DropReason::NotFound));
                    return;
                }
                if t.status.is_terminal() {
                    return; // a failed confirmation poll of a finished task: nothing to retry
                }
                // Retry at the task's current pace; failures do not speed polling up.
                let delay = inner.policy.delay_ms(t.polls.saturating_sub(1).max(1));
                inner.schedule_at(slot, now + delay);
            }
        }
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

    /// Takes the persistence work accumulated since the last call. Tasks whose only change
    /// is poll bookkeeping are included every [`BOOKKEEPING_FLUSH`].
    pub fn take_pending(&self) -> Pending {
        self.take(false)
    }

    /// Like [`take_pending`](Self::take_pending), bookkeeping included (shutdown).
    pub fn take_pending_all(&self) -> Pending {
        self.take(true)
    }

    fn take(&self, everything: bool) -> Pending {
        let mut inner = self.lock();
        let with_lazy = everything || inner.lazy_written.elapsed() >= BOOKKEEPING_FLUSH;
        let mut batch = Batch::default();
        let mut dirty = std::mem::take(&mut inner.dirty);
        inner.write_records(&dirty, DIRTY, &mut batch);
        // Keep a modest buffer for the next round, not one sized by a start-up burst.
        dirty.clear();
        if dirty.capacity() <= 1 << 16 {
            inner.dirty = dirty;
        }
        if with_lazy {
            let lazy = std::mem::take(&mut inner.lazy);
            inner.write_records(&lazy, LAZY, &mut batch);
            inner.lazy_written = std::time::Instant::now();
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

/// See [`ProviderTasks::restorer`].
pub struct Restorer<'a> {
    inner: std::sync::MutexGuard<'a, Inner>,
}

impl Restorer<'_> {
    /// Makes room for `additional` more tasks (start-up knows how many rows there are).
    pub fn reserve(&mut self, additional: usize) {
        let inner = &mut *self.inner;
        inner.slots.reserve(additional);
        let (slots, hasher) = (&inner.slots, &inner.hasher);
        inner.index.reserve(additional, |&s| {
            hasher.hash_one(&slots[s as usize].as_ref().expect("indexed slot is live").id)
        });
    }

    /// Like [`ProviderTasks::restore_task`].
    pub fn task(&mut self, id: &str, record: &[u8], now: i64) -> Result<(), DecodeError> {
        let inner = &mut *self.inner;
        let d = decode_task(record)?;
        let task_id = TaskId::new(id);
        let hash = inner.hasher.hash_one(&task_id);
        if inner.find_hashed(hash, &task_id).is_some() {
            return Ok(()); // restored already
        }
        let model = inner.models.intern(d.model);
        // Restored tasks match their record: not dirty.
        let slot = inner.insert(task_id, hash, d.source, d.first_seen, false);
        {
            let Inner { slots, words, .. } = &mut *inner;
            let t = slots[slot as usize].as_mut().expect("just inserted");
            t.set_upstream_status(words, d.upstream_status);
            t.created_at = or_no_time(d.created_at);
            t.updated_at = or_no_time(d.updated_at);
            t.completed_at = or_no_time(d.completed_at);
            t.last_polled = or_no_time(d.last_polled);
            t.polls = d.polls;
            t.not_found = d.not_found;
            if d.not_found > 0 {
                t.set_not_found_since(d.not_found_since);
            }
            t.set(COUNTED, d.counted);
            t.credits_used = d.credits_used;
            t.credits_refunded = d.credits_refunded;
            t.failure_reason = d.failure_reason;
            t.finished_at = or_no_time(d.finished_at);
            t.set_error_message(d.error_message);
            t.set_last_error(d.last_error);
        }
        inner.set_state(slot, model, d.status, None);
        if d.status.is_terminal() {
            let end = d.finished_at.unwrap_or(now) + inner.policy.retention_ms;
            let generation = inner.task(slot).generation;
            inner.expiry.push(Reverse((end, slot, generation)));
        } else {
            // Spread the restart's first polls over one interval instead of a burst.
            let spread = (fastrand::f64() * inner.policy.interval_ms as f64) as i64;
            inner.schedule_at(slot, now + spread);
        }
        Ok(())
    }

    /// Like [`ProviderTasks::restore_tombstone`].
    pub fn tombstone(&mut self, id: &str, last_seen: i64) {
        self.inner.tombstones.insert(id_hash(id), last_seen);
    }
}

fn or_no_time(t: Option<i64>) -> i64 {
    t.unwrap_or(NO_TIME)
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

    fn find(&self, id: &TaskId) -> Option<u32> {
        self.find_hashed(self.hasher.hash_one(id), id)
    }

    fn find_hashed(&self, hash: u64, id: &TaskId) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(hash, |&s| {
                slots[s as usize].as_ref().is_some_and(|t| t.id == *id)
            })
            .copied()
    }

    fn slot_of(&self, id: &str) -> Option<u32> {
        self.find(&TaskId::new(id))
    }

    fn mark_dirty(&mut self, slot: u32) {
        let t = self.task_mut(slot);
        if !t.has(DIRTY) {
            t.set(DIRTY, true);
            self.dirty.push(slot);
        }
    }

    /// Encodes the records of the tasks in `slots` that carry `flag` (others were written
    /// already, or are new tasks in reused slots).
    fn write_records(&mut self, listed: &[u32], flag: u8, batch: &mut Batch) {
        let Inner {
            slots,
            models,
            words,
            provider,
            ..
        } = self;
        batch.put_tasks.reserve(listed.len());
        let mut buf = [0; UUID_LEN];
        for &slot in listed {
            let Some(t) = slots.get_mut(slot as usize).and_then(Option::as_mut) else {
                continue;
            };
            if !t.has(flag) {
                continue;
            }
            t.set(DIRTY | LAZY, false);
            batch.put_tasks.push((
                store::task_key(provider, t.id.as_str(&mut buf)),
                encode_task(t, models.name(t.model), t.upstream_status(words)),
            ));
        }
    }

    fn mark_lazy(&mut self, slot: u32) {
        let t = self.task_mut(slot);
        if !t.has(DIRTY | LAZY) {
            t.set(LAZY, true);
            self.lazy.push(slot);
        }
    }

    fn track(&mut self, id: &str, source: Source, now: i64) -> TrackOutcome {
        if !is_valid_task_id(id) {
            return TrackOutcome::Invalid;
        }
        let task_id = TaskId::new(id);
        let hash = self.hasher.hash_one(&task_id);
        if self.find_hashed(hash, &task_id).is_some() {
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
        let slot = self.insert(task_id, hash, source, now, true);
        self.set_state(slot, 0, Status::Unknown, None);
        self.schedule_at(slot, now);
        self.events.push(Event::Discovered { source });
        TrackOutcome::New
    }

    /// Adds a task (unknown model and status) and indexes it; `hash` is the id's.
    fn insert(
        &mut self,
        id: TaskId,
        hash: u64,
        source: Source,
        first_seen: i64,
        dirty: bool,
    ) -> u32 {
        self.next_generation = self.next_generation.wrapping_add(1);
        let task = Task::new(id, source, first_seen, self.next_generation);
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
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.index.insert_unique(hash, slot, |&s| {
            hasher.hash_one(&slots[s as usize].as_ref().expect("indexed slot is live").id)
        });
        // Counted as unknown/unknown until `set_state` says otherwise.
        self.counts[0][Status::Unknown.index()] += 1;
        if dirty {
            self.mark_dirty(slot);
        }
        slot
    }

    /// Moves a task's gauge contribution to (`model`, `status`). `old_key` is where the task
    /// sits in `in_flight` when that differs from its current key (its creation time has
    /// just been learnt).
    fn set_state(&mut self, slot: u32, model: u16, status: Status, old_key: Option<i64>) {
        let (old_model, old_status, was_in_flight, current_key) = {
            let t = self.task(slot);
            (t.model, t.status, t.has(IN_FLIGHT), t.in_flight_key())
        };
        self.counts[old_model as usize][old_status.index()] -= 1;
        while self.counts.len() <= model as usize {
            self.counts.push([0; 7]);
        }
        self.counts[model as usize][status.index()] += 1;
        if was_in_flight {
            decrement(&mut self.in_flight, old_key.unwrap_or(current_key));
        }
        let in_flight = status.is_in_flight();
        if in_flight {
            *self.in_flight.entry(current_key).or_insert(0) += 1;
        }
        let t = self.task_mut(slot);
        t.model = model;
        t.status = status;
        t.set(IN_FLIGHT, in_flight);
    }

    /// The accounting rule. Terminal status: counted once. Credits: each increase once.
    fn apply(&mut self, slot: u32, obs: &Observation, now: i64) {
        let (current_status, current_model, old_key, before) = {
            let t = self.task(slot);
            (t.status, t.model, t.in_flight_key(), t.record_state())
        };
        let mut text_changed = false;
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
            let Inner { slots, words, .. } = self;
            let t = slots[slot as usize].as_mut().expect("live slot");
            if !t.status.is_terminal() {
                text_changed |= t.set_upstream_status(words, &obs.upstream_status);
                t.failure_reason = obs.failure_reason;
                text_changed |= t.set_error_message(obs.error_message.as_deref());
            }
            if let Some(v) = obs.created_at {
                t.created_at = v;
            }
            if let Some(v) = obs.updated_at {
                t.updated_at = v;
            }
            if let Some(v) = obs.completed_at {
                t.completed_at = v;
            }
        }
        // In-flight age keys on created_at, which may have just become known.
        self.set_state(slot, model, status, Some(old_key));

        let used = obs.credits_used.filter(|v| v.is_finite());
        let refunded = obs.credits_refunded.filter(|v| v.is_finite());
        let (mut used_by, mut refunded_by) = (None, None);
        {
            let t = self.task_mut(slot);
            if let Some(used) = used.filter(|&v| v > t.credits_used) {
                used_by = Some(used - t.credits_used);
                t.credits_used = used;
            }
            if let Some(refunded) = refunded.filter(|&v| v > t.credits_refunded) {
                refunded_by = Some(refunded - t.credits_refunded);
                t.credits_refunded = refunded;
            }
        }
        if let Some(amount) = used_by {
            self.events.push(Event::CreditsUsed {
                model: self.models.name(model).clone(),
                amount,
            });
        }
        if let Some(amount) = refunded_by {
            self.events.push(Event::CreditsRefunded {
                model: self.models.name(model).clone(),
                amount,
            });
        }

        if status.is_terminal() && !self.task(slot).has(COUNTED) {
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
                t.set(COUNTED, true);
                t.finished_at = now;
                t.failure_reason = reason;
                t.next_poll = NEVER;
                t.generation
            };
            self.expiry.push(Reverse((retention_end, slot, generation)));
            self.events.push(Event::Completed {
                model: self.models.name(model).clone(),
                status,
                reason,
                latency_seconds,
            });
        }
        if text_changed || self.task(slot).record_state() != before {
            self.mark_dirty(slot);
        } else {
            self.mark_lazy(slot);
        }
    }

    fn schedule_at(&mut self, slot: u32, due: i64) {
        let due = due.max(0);
        let t = self.task_mut(slot);
        if t.next_poll <= due {
            return; // already due earlier: keep the earlier entry
        }
        t.next_poll = due;
        self.schedule.push(Reverse(Due::new(due, slot)));
    }

    /// Whether a schedule entry still describes the task in its slot.
    fn entry_is_live(&self, entry: Due) -> bool {
        matches!(
            self.slots.get(entry.slot as usize),
            Some(Some(t)) if t.next_poll == entry.due()
        )
    }

    fn peek_due(&mut self) -> Option<i64> {
        while let Some(&Reverse(entry)) = self.schedule.peek() {
            if self.entry_is_live(entry) {
                return Some(entry.due());
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
            let Reverse(entry) = self.schedule.pop().expect("peeked");
            let slot = entry.slot;
            let t = self.task(slot);
            if !t.status.is_terminal() && now - t.in_flight_key() > self.policy.max_task_age_ms {
                self.remove(slot, now, Some(DropReason::MaxAge));
                continue;
            }
            let t = self.task_mut(slot);
            t.next_poll = NEVER;
            return Some(Arc::from(t.id.as_str(&mut [0; UUID_LEN])));
        }
    }

    /// Removes a task: gauges, schedule, store row; remembers the id in a tombstone.
    fn remove(&mut self, slot: u32, now: i64, reason: Option<DropReason>) {
        let Some(task) = self.slots[slot as usize].take() else {
            return;
        };
        self.counts[task.model as usize][task.status.index()] -= 1;
        if task.has(IN_FLIGHT) {
            decrement(&mut self.in_flight, task.in_flight_key());
        }
        let hash = self.hasher.hash_one(&task.id);
        if let Ok(entry) = self.index.find_entry(hash, |&s| s == slot) {
            entry.remove();
        }
        self.free.push(slot);
        let mut buf = [0; UUID_LEN];
        let id = task.id.as_str(&mut buf);
        let key = store::task_key(&self.provider, id);
        self.deleted.push(key.clone());
        self.tombstones.insert(id_hash(id), now);
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
            upstream_status: t.upstream_status(&self.words).to_string(),
            failure_reason: t.failure_reason.map(FailureReason::as_str),
            error_message: t.error_message().map(str::to_string),
            source: t.source.as_str(),
            created_at: some_time(t.created_at).map(time),
            updated_at: some_time(t.updated_at).map(time),
            completed_at: some_time(t.completed_at).map(time),
            first_seen_at: time(t.first_seen),
            last_polled_at: some_time(t.last_polled).map(time),
            next_poll_at: (t.next_poll != NEVER).then(|| time(t.next_poll)),
            credits_used: t.credits_used,
            credits_refunded: t.credits_refunded,
            last_error: t.last_error().map(str::to_string),
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

/// A record as read, borrowing its text from the record bytes.
#[derive(Debug, PartialEq)]
struct DecodedTask<'a> {
    model: &'a str,
    status: Status,
    upstream_status: &'a str,
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
    error_message: Option<&'a str>,
    last_error: Option<&'a str>,
}

fn encode_task(t: &Task, model: &str, upstream_status: &str) -> Vec<u8> {
    let error_message = t.error_message().unwrap_or("");
    let last_error = t.last_error().unwrap_or("");
    let mut out = Vec::with_capacity(
        71 + model.len() + upstream_status.len() + error_message.len() + last_error.len(),
    );
    out.push(RECORD_VERSION);
    out.push(t.status.index() as u8);
    out.push(t.source.to_byte());
    out.push(u8::from(t.has(COUNTED)));
    out.push(t.failure_reason.map_or(u8::MAX, |r| r.index() as u8));
    put_str(&mut out, model);
    put_str(&mut out, upstream_status);
    for v in [
        t.created_at,
        t.updated_at,
        t.completed_at,
        t.last_polled,
        t.finished_at,
    ] {
        // NO_TIME is the record's "absent" too.
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&t.first_seen.to_le_bytes());
    out.extend_from_slice(&t.polls.to_le_bytes());
    out.extend_from_slice(&t.not_found.to_le_bytes());
    out.extend_from_slice(&t.not_found_since().to_le_bytes());
    out.extend_from_slice(&t.credits_used.to_le_bytes());
    out.extend_from_slice(&t.credits_refunded.to_le_bytes());
    put_str(&mut out, error_message);
    put_str(&mut out, last_error);
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let s = &s[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, tail) = self.0.split_first_chunk::<N>().ok_or(DecodeError)?;
        self.0 = tail;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.take()?))
    }
    fn f64(&mut self) -> Result<f64, DecodeError> {
        Ok(f64::from_le_bytes(self.take()?))
    }
    fn opt_i64(&mut self) -> Result<Option<i64>, DecodeError> {
        Ok(some_time(self.i64()?))
    }
    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let n = self.u16()? as usize;
        if self.0.len() < n {
            return Err(DecodeError);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        std::str::from_utf8(head).map_err(|_| DecodeError)
    }
}

fn decode_task(bytes: &[u8]) -> Result<DecodedTask<'_>, DecodeError> {
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
    let model = r.str()?;
    let upstream_status = r.str()?;
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
    let error_message = Some(r.str()?).filter(|s| !s.is_empty());
    let last_error = Some(r.str()?).filter(|s| !s.is_empty());
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
impl Inner {
    /// Asserts that the derived structures (index, counts, in-flight keys, dirty list,
    /// schedule) agree with the tasks.
    fn check(&self) {
        use std::collections::HashSet;
        let mut live = 0;
        let mut counts = vec![[0u64; 7]; self.counts.len()];
        let mut in_flight: BTreeMap<i64, u32> = BTreeMap::new();
        let dirty: HashSet<u32> = self.dirty.iter().copied().collect();
        let scheduled: HashSet<(i64, u32)> = self
            .schedule
            .iter()
            .map(|Reverse(e)| (e.due(), e.slot))
            .collect();
        for (i, t) in self.slots.iter().enumerate() {
            let slot = i as u32;
            let Some(t) = t else {
                assert!(self.free.contains(&slot), "empty slot {i} not free");
                continue;
            };
            live += 1;
            assert_eq!(self.find(&t.id), Some(slot), "{:?} not indexed", t.id);
            counts[t.model as usize][t.status.index()] += 1;
            assert_eq!(t.has(IN_FLIGHT), t.status.is_in_flight());
            if t.has(IN_FLIGHT) {
                *in_flight.entry(t.in_flight_key()).or_default() += 1;
            }
            assert!(
                !t.has(DIRTY) || dirty.contains(&slot),
                "dirty task not listed"
            );
            assert!(
                !t.has(LAZY) || self.lazy.contains(&slot),
                "lazy task not listed"
            );
            assert!(
                t.next_poll == NEVER || scheduled.contains(&(t.next_poll, slot)),
                "planned poll without a schedule entry"
            );
            assert!(!t.status.is_terminal() || t.has(COUNTED));
            assert!(t.extra.as_ref().is_none_or(|e| !e.is_empty()));
        }
        assert_eq!(live, self.index.len());
        assert_eq!(counts, self.counts);
        assert_eq!(in_flight, self.in_flight);
    }
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
    fn a_task_stays_small() {
        // Resident memory at a million tasks is mostly this struct (BENCHMARKS.md).
        assert!(std::mem::size_of::<Option<Task>>() <= 128);
        assert_eq!(std::mem::size_of::<Due>(), 12);
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
        assert_eq!(d.error_message, Some("blocked"));
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

    mod property {
        use super::*;
        use proptest::prelude::*;
        use std::collections::{BTreeMap, HashSet};

        #[derive(Debug, Clone)]
        enum Op {
            Track(usize),
            TakeDue,
            Answer(usize, usize, usize, u8),
            NotFound(usize),
            TransportError(usize),
            Observe(usize, usize, usize, u8),
            Untrack(usize),
            PollSoon(usize),
            Advance(i64),
            Sweep,
            TakePending,
            Restart,
            Crash,
        }

        fn id(i: usize) -> String {
            match i % 4 {
                0 => format!("9db7d1ed-d1e5-4d11-9f3a-61f653b905a{i}"),
                1 => format!("img_01HQ9M7XJQ7PZ3GQ9F6C5W3N{i:02}"),
                2 => format!("t{i}"),
                _ => format!("a-rather-long-task-id-that-is-stored-on-the-heap-{i}"),
            }
        }

        fn op() -> impl Strategy<Value = Op> {
            let i = 0..8usize;
            prop_oneof![
                3 => i.clone().prop_map(Op::Track),
                2 => Just(Op::TakeDue),
                4 => (i.clone(), 0..7usize, 0..6usize, 0..5u8)
                    .prop_map(|(i, s, m, c)| Op::Answer(i, s, m, c)),
                1 => i.clone().prop_map(Op::NotFound),
                1 => i.clone().prop_map(Op::TransportError),
                2 => (i.clone(), 0..7usize, 0..6usize, 0..5u8)
                    .prop_map(|(i, s, m, c)| Op::Observe(i, s, m, c)),
                1 => i.clone().prop_map(Op::Untrack),
                1 => i.prop_map(Op::PollSoon),
                2 => (0..120_000i64).prop_map(Op::Advance),
                1 => Just(Op::Sweep),
                1 => Just(Op::TakePending),
                1 => Just(Op::Restart),
                1 => Just(Op::Crash),
            ]
        }

        fn answer(i: usize, s: usize, m: usize, credits: u8, now: i64) -> Observation {
            let mut o = Observation::new(id(i), Status::ALL[s], "WORD");
            if m > 0 {
                o.model = Some(format!("model-{m}"));
            }
            if m % 2 == 1 {
                o.created_at = Some(now - 1_000 * m as i64);
            }
            o.credits_used = Some(f64::from(credits));
            if Status::ALL[s] == Status::Failed {
                o.error_message = Some("it broke".into());
            }
            o
        }

        /// The store as the persister leaves it after committing `pending`.
        #[derive(Default)]
        struct FakeStore {
            tasks: BTreeMap<String, Vec<u8>>,
            tombstones: BTreeMap<String, i64>,
        }

        impl FakeStore {
            fn commit(&mut self, batch: Batch) {
                self.tasks.extend(batch.put_tasks);
                for k in batch.delete_tasks {
                    self.tasks.remove(&k);
                }
                self.tombstones.extend(batch.put_tombstones);
                for k in batch.delete_tombstones {
                    self.tombstones.remove(&k);
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(300))]

            /// Any sequence of registrations, answers, errors, removals and clean restarts
            /// keeps the registry's structures consistent, counts each terminal outcome
            /// once and each credit once.
            #[test]
            fn registry_stays_consistent_and_counts_once(ops in prop::collection::vec(op(), 1..80)) {
                let mut p = tasks();
                let mut store = FakeStore::default();
                let mut now = 1_000_000i64;
                let mut events = Vec::new();
                let mut counted: HashSet<usize> = HashSet::new();
                let mut credits: BTreeMap<usize, u8> = BTreeMap::new();
                for op in ops {
                    match op {
                        Op::Track(i) => {
                            p.track(&id(i), Source::Api, now);
                        }
                        Op::TakeDue => {
                            p.take_due(now);
                        }
                        Op::Answer(i, s, m, c) | Op::Observe(i, s, m, c) => {
                            let o = answer(i, s, m, c, now);
                            if p.is_tracked(&id(i)) {
                                if Status::ALL[s].is_terminal() {
                                    counted.insert(i);
                                }
                                let max = credits.entry(i).or_default();
                                *max = (*max).max(c);
                            }
                            if matches!(op, Op::Answer(..)) {
                                p.record_poll(&id(i), Ok(&o), now);
                            } else {
                                p.observe(&o, now);
                            }
                        }
                        Op::NotFound(i) | Op::TransportError(i) => {
                            let err = PollError {
                                class: matches!(op, Op::NotFound(_)).then_some(FailureClass::NotFound),
                                message: "nope".into(),
                            };
                            p.record_poll(&id(i), Err(&err), now);
                        }
                        Op::Untrack(i) => {
                            p.untrack(&id(i), now);
                        }
                        Op::PollSoon(i) => p.poll_soon(&id(i), now),
                        Op::Advance(ms) => now += ms,
                        Op::Sweep => p.sweep(now),
                        Op::TakePending => {
                            let pending = p.take_pending();
                            store.commit(pending.batch);
                            events.extend(pending.events);
                        }
                        Op::Restart | Op::Crash => {
                            // A clean restart writes everything; a crash loses what was
                            // not committed, bookkeeping included (nothing counted is lost:
                            // it is taken with the records that make it count).
                            let pending = if matches!(op, Op::Restart) {
                                p.take_pending_all()
                            } else {
                                p.take_pending()
                            };
                            store.commit(pending.batch);
                            events.extend(pending.events);
                            p = tasks();
                            let mut r = p.restorer();
                            for (key, record) in &store.tasks {
                                let (_, id) = store::split_task_key(key).unwrap();
                                r.task(id, record, now).unwrap();
                            }
                            for (key, last) in &store.tombstones {
                                let (_, id) = store::split_task_key(key).unwrap();
                                r.tombstone(id, *last);
                            }
                            drop(r);
                            p.reschedule_unscheduled(now);
                        }
                    }
                    p.lock().check();
                }
                events.extend(p.take_pending().events);
                prop_assert_eq!(completed(&events), counted.len());
                let used: f64 = events
                    .iter()
                    .map(|e| match e {
                        Event::CreditsUsed { amount, .. } => *amount,
                        _ => 0.0,
                    })
                    .sum();
                let expected: f64 = credits.values().map(|&c| f64::from(c)).sum();
                prop_assert_eq!(used, expected);
            }
        }
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
