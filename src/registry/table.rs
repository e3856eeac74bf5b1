//! The slot table: every tracked task in compact form, the index from id to slot, the
//! model table, and the state one provider's tasks share (`Inner`). The rules that change a
//! task live in `rules`, the schedule in `schedule`, the gauges in `gauges`.

use std::cmp::Reverse;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;

use super::compact::{TaskId, WORD_OVERFLOW, Words};
use super::latency::Latencies;
use super::schedule::{Due, Policy};
use super::{Event, MODEL_OTHER, MODEL_UNKNOWN, Source};
use crate::config::{Polling, Shard};
use crate::task::{FailureReason, Status};

pub(super) const NEVER: i64 = i64::MAX;
/// An absent time (the store records use the same sentinel).
pub(super) const NO_TIME: i64 = i64::MIN;

pub(super) fn some_time(t: i64) -> Option<i64> {
    (t != NO_TIME).then_some(t)
}

/// [`Task::flags`]: the terminal outcome has been counted.
pub(super) const COUNTED: u8 = 1;
/// Changed since the persister last took it; the slot is listed in `Inner::dirty`.
pub(super) const DIRTY: u8 = 2;
/// Counted in `Inner::in_flight` under [`Task::in_flight_key`].
pub(super) const IN_FLIGHT: u8 = 4;
/// Only poll bookkeeping changed (`last_polled`, `polls`, `not_found`, `last_error`); the
/// slot is listed in `Inner::lazy`, written at most every `pending::BOOKKEEPING_FLUSH`.
pub(super) const LAZY: u8 = 8;
/// An implausible value of this field was counted for the task (once per task and field).
pub(super) const IMPLAUSIBLE_CREATED_AT: u8 = 16;
pub(super) const IMPLAUSIBLE_CREDITS_USED: u8 = 32;
pub(super) const IMPLAUSIBLE_CREDITS_REFUNDED: u8 = 64;

/// One tracked task, 128 bytes. Times are Unix milliseconds with [`NO_TIME`] for "absent",
/// the id is stored inline (see [`TaskId`]), the upstream status word is an index into the
/// provider's [`Words`], and values most tasks never have live in `extra`.
#[derive(Debug)]
pub(super) struct Task {
    pub(super) created_at: i64,
    pub(super) updated_at: i64,
    pub(super) completed_at: i64,
    pub(super) first_seen: i64,
    pub(super) last_polled: i64,
    /// Due time of the next poll; [`NEVER`] when none is planned.
    pub(super) next_poll: i64,
    pub(super) finished_at: i64,
    pub(super) credits_used: f64,
    pub(super) credits_refunded: f64,
    pub(super) id: TaskId,
    pub(super) extra: Option<Box<Extra>>,
    pub(super) generation: u32,
    pub(super) polls: u32,
    pub(super) model: u16,
    /// Index in `Inner::words`, or [`WORD_OVERFLOW`] with the word in `extra`.
    pub(super) upstream_status: u16,
    pub(super) not_found: u16,
    pub(super) status: Status,
    pub(super) source: Source,
    pub(super) failure_reason: Option<FailureReason>,
    pub(super) flags: u8,
}

/// The rarely set values of a task, allocated only while one of them is set.
#[derive(Debug, Default)]
pub(super) struct Extra {
    /// Start of the current run of "not found" answers (meaningful while `not_found > 0`).
    not_found_since: i64,
    upstream_status: Option<Box<str>>,
    error_message: Option<Box<str>>,
    last_error: Option<Box<str>>,
}

impl Extra {
    pub(super) fn is_empty(&self) -> bool {
        self.not_found_since == 0
            && self.upstream_status.is_none()
            && self.error_message.is_none()
            && self.last_error.is_none()
    }
}

impl Task {
    pub(super) fn new(id: TaskId, source: Source, first_seen: i64, generation: u32) -> Self {
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

    #[inline]
    pub(super) fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    #[inline]
    pub(super) fn set(&mut self, flag: u8, on: bool) {
        if on {
            self.flags |= flag;
        } else {
            self.flags &= !flag;
        }
    }

    /// Key of this task in `Inner::in_flight`: its creation time, else when we first saw it.
    #[inline]
    pub(super) fn in_flight_key(&self) -> i64 {
        if self.created_at != NO_TIME {
            self.created_at
        } else {
            self.first_seen
        }
    }

    #[inline]
    pub(super) fn extra(&self) -> Option<&Extra> {
        self.extra.as_deref()
    }

    pub(super) fn update_extra(&mut self, f: impl FnOnce(&mut Extra)) {
        let extra = self.extra.get_or_insert_with(Box::default);
        f(extra);
        if extra.is_empty() {
            self.extra = None;
        }
    }

    pub(super) fn not_found_since(&self) -> i64 {
        self.extra().map_or(0, |e| e.not_found_since)
    }

    pub(super) fn set_not_found_since(&mut self, at: i64) {
        if at != self.not_found_since() {
            self.update_extra(|e| e.not_found_since = at);
        }
    }

    pub(super) fn error_message(&self) -> Option<&str> {
        self.extra().and_then(|e| e.error_message.as_deref())
    }

    /// Returns whether the message changed.
    pub(super) fn set_error_message(&mut self, message: Option<&str>) -> bool {
        let changed = message != self.error_message();
        if changed {
            self.update_extra(|e| e.error_message = message.map(Box::from));
        }
        changed
    }

    pub(super) fn last_error(&self) -> Option<&str> {
        self.extra().and_then(|e| e.last_error.as_deref())
    }

    pub(super) fn set_last_error(&mut self, error: Option<&str>) {
        if error != self.last_error() {
            self.update_extra(|e| e.last_error = error.map(Box::from));
        }
    }

    pub(super) fn upstream_status<'a>(&'a self, words: &'a Words) -> &'a str {
        if self.upstream_status == WORD_OVERFLOW {
            self.extra()
                .and_then(|e| e.upstream_status.as_deref())
                .unwrap_or("")
        } else {
            words.get(self.upstream_status)
        }
    }

    /// Returns whether the word changed.
    pub(super) fn set_upstream_status(&mut self, words: &mut Words, word: &str) -> bool {
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
}

/// One provider's tasks and everything derived from them, behind `ProviderTasks`' lock.
#[derive(Debug)]
pub(super) struct Inner {
    pub(super) policy: Policy,
    pub(super) shard: Shard,
    pub(super) provider: Arc<str>,
    pub(super) slots: Vec<Option<Task>>,
    pub(super) free: Vec<u32>,
    pub(super) next_generation: u32,
    /// Slots of live tasks, hashed by the id stored in the slot (the id is kept once).
    pub(super) index: HashTable<u32>,
    pub(super) hasher: RandomState,
    pub(super) schedule: BinaryHeap<Reverse<Due>>,
    /// (retention end, slot, generation) of finished tasks.
    pub(super) expiry: BinaryHeap<Reverse<(i64, u32, u32)>>,
    pub(super) models: ModelTable,
    /// Completion times learnt per model, for the schedule.
    pub(super) latencies: Latencies,
    pub(super) words: Words,
    /// Tasks per model index and status.
    pub(super) counts: Vec<[u64; 7]>,
    /// Creation times of pending/running tasks, with multiplicity.
    pub(super) in_flight: BTreeMap<i64, u32>,
    /// Remembered ids, by [`id_hash`] (8 bytes instead of the id): last mention, ms.
    pub(super) tombstones: HashMap<u64, i64>,
    // Persistence work not yet taken by the persister.
    /// Slots whose task has the [`DIRTY`] flag (a slot may be listed more than once).
    pub(super) dirty: Vec<u32>,
    /// Slots whose task has the [`LAZY`] flag, and when they were last written.
    pub(super) lazy: Vec<u32>,
    pub(super) lazy_written: std::time::Instant,
    pub(super) deleted: Vec<String>,
    pub(super) tombstones_put: Vec<(String, i64)>,
    pub(super) events: Vec<Event>,
    /// Time of the last tombstone pass; `None` until the first sweep, which only starts the
    /// clock: after a long stop, sources mention their ids again (refreshing them) within a
    /// minute, before old tombstones are judged.
    pub(super) last_tombstone_sweep: Option<i64>,
}
/// Model names of one provider, bounded: index 0 is `unknown`, 1 is `other`.
#[derive(Debug)]
pub(super) struct ModelTable {
    names: Vec<Arc<str>>,
    index: HashMap<Arc<str>, u16>,
    limit: usize,
}

impl ModelTable {
    pub(super) fn new(limit: usize) -> Self {
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
    pub(super) fn intern(&mut self, name: &str) -> u16 {
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

    pub(super) fn name(&self, i: u16) -> &Arc<str> {
        &self.names[i as usize]
    }
}

impl Inner {
    pub(super) fn new(
        provider: Arc<str>,
        polling: &Polling,
        max_models: usize,
        shard: Shard,
    ) -> Self {
        Inner {
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
            latencies: Latencies::default(),
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
        }
    }

    #[inline]
    pub(super) fn task(&self, slot: u32) -> &Task {
        self.slots[slot as usize].as_ref().expect("live slot")
    }

    #[inline]
    pub(super) fn task_mut(&mut self, slot: u32) -> &mut Task {
        self.slots[slot as usize].as_mut().expect("live slot")
    }

    pub(super) fn find(&self, id: &TaskId) -> Option<u32> {
        self.find_hashed(self.hasher.hash_one(id), id)
    }

    #[inline]
    pub(super) fn find_hashed(&self, hash: u64, id: &TaskId) -> Option<u32> {
        let slots = &self.slots;
        self.index
            .find(hash, |&s| {
                slots[s as usize].as_ref().is_some_and(|t| t.id == *id)
            })
            .copied()
    }

    #[inline]
    pub(super) fn slot_of(&self, id: &str) -> Option<u32> {
        self.find(&TaskId::new(id))
    }

    /// Adds a task (unknown model and status) and indexes it; `hash` is the id's.
    pub(super) fn insert(
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
        self.index
            .insert_unique(hash, slot, slot_hasher(&self.slots, &self.hasher));
        // Counted as unknown/unknown until `set_state` says otherwise.
        self.counts[0][Status::Unknown.index()] += 1;
        if dirty {
            self.mark_dirty(slot);
        }
        slot
    }
}

/// Hashes the id in an indexed slot: what `index` needs to move its entries when it grows.
pub(super) fn slot_hasher<'a>(
    slots: &'a [Option<Task>],
    hasher: &'a RandomState,
) -> impl Fn(&u32) -> u64 + 'a {
    move |&s| hasher.hash_one(&slots[s as usize].as_ref().expect("indexed slot is live").id)
}

/// A stable 64-bit hash of a task id, for the tombstone set (SipHash with fixed keys:
/// collisions among millions of ids are vanishingly unlikely, and harmless but for one
/// task not being tracked).
pub(super) fn id_hash(id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    id.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn a_task_stays_small() {
        // Resident memory at a million tasks is mostly this struct (BENCHMARKS.md).
        assert!(std::mem::size_of::<Option<Task>>() <= 128);
        assert_eq!(std::mem::size_of::<Due>(), 12);
    }
}
