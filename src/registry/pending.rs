//! Dirty tracking: which task records the persister must write, and how the work is taken.
//!
//! A change that is counted (status, credits, times, model) marks the task [`DIRTY`] and is
//! taken at the next commit, together with its events. A change of poll bookkeeping only
//! marks it [`LAZY`], written every [`BOOKKEEPING_FLUSH`].

use super::Pending;
use super::compact::UUID_LEN;
use super::record::encode_task;
use super::table::{COUNTED, DIRTY, Inner, LAZY, Task};
use crate::store::{self, Batch};
use crate::task::{FailureReason, Status};

/// How often tasks whose only change is poll bookkeeping are written. A poll that brings no
/// news changes nothing that is counted; writing its record anyway would rewrite every
/// polled task every few hundred milliseconds (most polls of a long task bring no news).
/// A crash loses at most this much bookkeeping: a task is then polled a little sooner than
/// its back-off said. A clean shutdown writes it all (`take_pending_all`).
pub(super) const BOOKKEEPING_FLUSH: std::time::Duration = std::time::Duration::from_secs(60);

/// The record's values other than poll bookkeeping and text, to tell whether an answer
/// changed anything worth writing now.
#[derive(PartialEq)]
pub(super) struct RecordState {
    times: [i64; 4],
    credits: [u64; 2],
    model: u16,
    status: Status,
    failure_reason: Option<FailureReason>,
    counted: bool,
}

impl Task {
    pub(super) fn record_state(&self) -> RecordState {
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

impl Inner {
    pub(super) fn mark_dirty(&mut self, slot: u32) {
        let t = self.task_mut(slot);
        if !t.has(DIRTY) {
            t.set(DIRTY, true);
            self.dirty.push(slot);
        }
    }

    pub(super) fn mark_lazy(&mut self, slot: u32) {
        let t = self.task_mut(slot);
        if !t.has(DIRTY | LAZY) {
            t.set(LAZY, true);
            self.lazy.push(slot);
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

    /// Takes the persistence work accumulated since the last call; bookkeeping-only changes
    /// when `everything` is set or [`BOOKKEEPING_FLUSH`] has passed.
    pub(super) fn take_pending(&mut self, everything: bool) -> Pending {
        let with_lazy = everything || self.lazy_written.elapsed() >= BOOKKEEPING_FLUSH;
        let mut batch = Batch::default();
        let mut dirty = std::mem::take(&mut self.dirty);
        self.write_records(&dirty, DIRTY, &mut batch);
        // Keep a modest buffer for the next round, not one sized by a start-up burst.
        dirty.clear();
        if dirty.capacity() <= 1 << 16 {
            self.dirty = dirty;
        }
        if with_lazy {
            let lazy = std::mem::take(&mut self.lazy);
            self.write_records(&lazy, LAZY, &mut batch);
            self.lazy_written = std::time::Instant::now();
        }
        // With the events that learnt them: exactly as durable as the counters.
        batch.put_latencies = self
            .latencies
            .take_changed()
            .into_iter()
            .map(|(model, row)| {
                (
                    store::task_key(&self.provider, self.models.name(model)),
                    row,
                )
            })
            .collect();
        batch.delete_tasks = std::mem::take(&mut self.deleted);
        batch.put_tombstones = std::mem::take(&mut self.tombstones_put);
        Pending {
            batch,
            events: std::mem::take(&mut self.events),
        }
    }
}
