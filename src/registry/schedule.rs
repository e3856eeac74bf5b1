//! When tasks are polled: the polling policy, the one function that picks a task's next
//! poll, and the due-time heap the pollers take tasks from.

use std::cmp::Reverse;
use std::sync::Arc;

use super::compact::UUID_LEN;
use super::table::{Inner, NEVER, Task};
use super::{DropReason, remention_interval};
use crate::config::Polling;

/// Per-task back-off factor between polls of an in-flight task.
const BACKOFF_FACTOR: f64 = 1.5;

/// A provider's polling settings in milliseconds.
#[derive(Debug, Clone, Copy)]
pub(super) struct Policy {
    pub(super) interval_ms: i64,
    pub(super) max_interval_ms: i64,
    pub(super) max_task_age_ms: i64,
    pub(super) retention_ms: i64,
    /// Re-mentions come every `remention_ms`; a tombstone lives `tombstone_ttl_ms` after one.
    pub(super) remention_ms: i64,
    pub(super) tombstone_ttl_ms: i64,
    /// The provider tells outcomes itself (callbacks, a history walk): a task is polled only
    /// once it is overdue, a safety net for a lost callback, not on the regular schedule.
    pub(super) expect_callbacks: bool,
}

/// Why a task's next poll is being planned.
#[derive(Debug, Clone, Copy)]
pub(super) enum Next {
    /// Just discovered: poll at once.
    Discovered,
    /// Restored at start-up.
    Restored,
    /// A poll or a callback brought an answer.
    Answered,
    /// A poll got no answer (error, timeout, not found).
    Failed,
}

impl Policy {
    pub(super) fn from(p: &Polling) -> Self {
        Policy {
            interval_ms: p.interval.as_millis() as i64,
            max_interval_ms: p.max_interval.as_millis() as i64,
            max_task_age_ms: p.max_task_age.as_millis() as i64,
            retention_ms: p.retention.as_millis() as i64,
            remention_ms: remention_interval(p).as_millis() as i64,
            tombstone_ttl_ms: p.forget_after.as_millis() as i64,
            expect_callbacks: false,
        }
    }

    /// When an unfinished task is polled next. This is the only place that decides it, so a
    /// schedule learnt from real latencies (per model, say) replaces this function alone.
    #[inline]
    pub(super) fn next_poll(&self, task: &Task, next: Next, now: i64) -> i64 {
        match next {
            // Overdue: no answer for `max_interval`.
            Next::Discovered | Next::Answered if self.expect_callbacks => {
                now + self.max_interval_ms
            }
            Next::Discovered => now,
            // Spread the restart's first polls over one interval instead of a burst.
            Next::Restored => now + (fastrand::f64() * self.interval_ms as f64) as i64,
            Next::Answered => now + self.delay_ms(task.polls),
            // Retry at the task's current pace; failures do not speed polling up.
            Next::Failed => now + self.delay_ms(task.polls.saturating_sub(1).max(1)),
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

/// A schedule entry: due time and slot in 12 bytes, ordered by due time, then slot. It is
/// live while the task in the slot is due at exactly that time (`Task::next_poll`); a
/// rescheduled or removed task leaves a stale entry behind, skipped when it surfaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Due {
    hi: u32,
    lo: u32,
    pub(super) slot: u32,
}

impl Due {
    /// `due` must not be negative (see `Inner::schedule_at`).
    pub(super) fn new(due: i64, slot: u32) -> Self {
        let d = due as u64;
        Due {
            hi: (d >> 32) as u32,
            lo: d as u32,
            slot,
        }
    }

    pub(super) fn due(self) -> i64 {
        (u64::from(self.hi) << 32 | u64::from(self.lo)) as i64
    }
}

impl Inner {
    /// Plans the next poll of an unfinished task (a finished one is not polled again).
    #[inline]
    pub(super) fn plan_next_poll(&mut self, slot: u32, next: Next, now: i64) {
        let t = self.task(slot);
        if !t.status.is_terminal() {
            let due = self.policy.next_poll(t, next, now);
            self.schedule_at(slot, due);
        }
    }

    /// Plans a poll at `due` unless one is planned earlier.
    pub(super) fn schedule_at(&mut self, slot: u32, due: i64) {
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

    pub(super) fn peek_due(&mut self) -> Option<i64> {
        while let Some(&Reverse(entry)) = self.schedule.peek() {
            if self.entry_is_live(entry) {
                return Some(entry.due());
            }
            self.schedule.pop();
        }
        None
    }

    /// The earliest task due at `now`, unplanned until its answer is recorded. A task past
    /// `max_task_age` is dropped instead of polled again.
    pub(super) fn take_due(&mut self, now: i64) -> Option<Arc<str>> {
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

    /// Plans a poll now for every unfinished task that has none planned.
    pub(super) fn reschedule_unscheduled(&mut self, now: i64) {
        let orphans: Vec<u32> = self
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
            self.schedule_at(slot, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::test_support::polling;

    #[test]
    fn backoff_grows_to_the_ceiling() {
        let policy = Policy::from(&polling());
        let d1 = policy.delay_ms(1);
        assert!((9_000..=11_000).contains(&d1), "{d1}");
        let d20 = policy.delay_ms(20);
        assert!((54_000..=66_000).contains(&d20), "{d20}");
    }
}
