//! Start-up: tasks and tombstones read back from the store.

use std::hash::BuildHasher;
use std::sync::MutexGuard;

use super::MODEL_OTHER;
use super::compact::TaskId;
use super::latency::Histogram;
use super::record::{DecodeError, decode_task};
use super::schedule::Next;
use super::table::{COUNTED, Inner, NO_TIME, id_hash, slot_hasher};

/// Restores many records under one lock; see [`ProviderTasks::restorer`](super::ProviderTasks::restorer).
pub(crate) struct Restorer<'a> {
    inner: MutexGuard<'a, Inner>,
    /// `in_flight` keys of the tasks restored so far, added to the map when the restorer is
    /// dropped: a million sorted keys build the map in one pass, where inserting them in the
    /// store's (id) order costs a few hundred milliseconds more at start-up.
    in_flight: Vec<i64>,
}

impl<'a> Restorer<'a> {
    pub(super) fn new(inner: MutexGuard<'a, Inner>) -> Restorer<'a> {
        Restorer {
            inner,
            in_flight: Vec::new(),
        }
    }
}

impl Drop for Restorer<'_> {
    fn drop(&mut self) {
        let inner = &mut *self.inner;
        if inner.in_flight.is_empty() {
            self.in_flight.sort_unstable();
            inner.in_flight = (self.in_flight.chunk_by(|a, b| a == b))
                .map(|same| (same[0], same.len() as u32))
                .collect();
        } else {
            for key in self.in_flight.drain(..) {
                *inner.in_flight.entry(key).or_insert(0) += 1;
            }
        }
    }
}

impl Restorer<'_> {
    /// Makes room for `additional` more tasks (start-up knows how many rows there are).
    pub(crate) fn reserve(&mut self, additional: usize) {
        let inner = &mut *self.inner;
        inner.slots.reserve(additional);
        inner
            .index
            .reserve(additional, slot_hasher(&inner.slots, &inner.hasher));
    }

    /// Restores a task record read from the store (start-up). Finished tasks come back for
    /// the rest of their retention, in-flight ones are due within one interval. The caller
    /// has checked that this shard owns it (`App::start`).
    pub(crate) fn task(&mut self, id: &str, record: &[u8], now: i64) -> Result<(), DecodeError> {
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
        // A task just inserted is in no `in_flight` entry yet.
        let change = inner.set_counted_state(slot, model, d.status);
        if change.in_flight {
            self.in_flight.push(change.key);
        }
        if d.status.is_terminal() {
            // Finished tasks come back for the rest of their retention.
            inner.retain_until(
                slot,
                d.finished_at.unwrap_or(now) + inner.policy.retention_ms,
            );
            inner.plan_late_refund_check(slot, now);
        } else {
            inner.plan_next_poll(slot, Next::Restored, now);
        }
        Ok(())
    }

    /// Gives the models of the saved counters (most completions first) their places in the
    /// model table before any task is restored: the same models keep their series after a
    /// restart, and `max_models_per_provider` still bounds the series (new ones are `other`).
    pub(crate) fn models(&mut self, names: &[String]) {
        for name in names {
            self.inner.models.intern(name);
        }
    }

    /// Puts back the stored completion times of `model` (its provider's pooled ones under
    /// `unknown`). Returns false, restoring nothing, when the row cannot be read or the model
    /// table is full.
    pub(crate) fn latencies(&mut self, model: &str, row: &[u8]) -> bool {
        let Some(histogram) = Histogram::decode(row) else {
            return false;
        };
        let inner = &mut *self.inner;
        let index = inner.models.intern(model);
        if index == 1 && model != MODEL_OTHER {
            return false;
        }
        inner.latencies.restore(index, histogram);
        true
    }

    /// Restores a tombstone read from the store (start-up).
    pub(crate) fn tombstone(&mut self, id: &str, last_seen: i64) {
        self.inner.tombstones.insert(id_hash(id), last_seen);
    }
}

fn or_no_time(t: Option<i64>) -> i64 {
    t.unwrap_or(NO_TIME)
}
