//! The exactly-once rules: what tracking, an answer, a failed poll and a removal do to a
//! task, and what each of them counts.
//!
//! - An id is tracked once: a known id is not tracked again, a remembered one (tombstone)
//!   not at all, so a source listing it again never recounts it.
//! - A terminal status is counted once (`COUNTED`) and never changes afterwards: replays and
//!   late answers may still bring credits, not a second outcome.
//! - Credits count by increase only: each amount is counted the first time it is exceeded.
//! - A removed task leaves a tombstone, kept while sources keep mentioning the id.
//! - A task is dropped after three "not found" answers over a minute, past `max_task_age`,
//!   or on request; each drop is counted with its reason.
//! - Implausible values are refused and counted once per task and field: a `created_at`
//!   more than a year old or more than five minutes ahead of our clock is ignored (age counts from
//!   first sight, no latency is observed); credits the adapter refused never reach a total.
//! - A task that failed with credits charged and not all refunded is polled again 2, 8 and
//!   40 polling intervals after it finished (while retained), so a late refund is counted.
//!
//! The events are not published here: the persister commits them with the task records
//! (`pending`), so a crash loses both and the task is counted again after the restart.

use std::cmp::Reverse;
use std::hash::BuildHasher;

use super::compact::{TaskId, UUID_LEN};
use super::schedule::{Due, Next};
use super::table::{
    COUNTED, IMPLAUSIBLE_CREATED_AT, IMPLAUSIBLE_CREDITS_REFUNDED, IMPLAUSIBLE_CREDITS_USED, Inner,
    NEVER, NO_TIME, id_hash,
};
use super::{Applied, DropReason, Event, ImplausibleField, PollError, Source, TrackOutcome};
use crate::config::is_valid_task_id;
use crate::providers::FailureClass;
use crate::store;
use crate::task::{FailureReason, MAX_TEXT_LEN, Observation, Status, truncate};

/// A task answering "not found" this many times in a row, over at least a minute, is dropped.
const NOT_FOUND_LIMIT: u16 = 3;
const NOT_FOUND_MIN_SPAN_MS: i64 = 60_000;
/// Tombstones are judged at most this often (a full pass over them).
const TOMBSTONE_SWEEP_MS: i64 = 60_000;
/// A `created_at` more than this before our clock is implausible (`1970-…`, `0001-…`): no
/// generation task runs for a year.
const CREATED_AT_MAX_AGE_MS: i64 = 365 * 24 * 3600 * 1000;
/// A `created_at` further ahead of our clock than this is implausible (clock skew aside).
const CREATED_AT_FUTURE_SLACK_MS: i64 = 5 * 60_000;
/// When a failed task with credits not all refunded is polled again, in polling intervals
/// after it finished (with the default 15 s: 30 s, 2 min, 10 min): a refund posted later is
/// counted if it comes within 40 intervals (and within `retention`). At most three requests
/// per such task; tasks without credits (maxapi) cost nothing.
pub(super) const LATE_REFUND_CHECKS: [i64; 3] = [2, 8, 40];

fn plausible_created_at(created_at: i64, now: i64) -> bool {
    let earliest = now.saturating_sub(CREATED_AT_MAX_AGE_MS);
    (earliest..=now.saturating_add(CREATED_AT_FUTURE_SLACK_MS)).contains(&created_at)
}

impl Inner {
    /// Starts tracking `id`, counting its discovery once. An id already tracked, or
    /// remembered by a tombstone, is not tracked again: counting follows tracking.
    pub(super) fn track(&mut self, id: &str, source: Source, now: i64) -> TrackOutcome {
        if !is_valid_task_id(id) {
            return TrackOutcome::Invalid;
        }
        let task_id = TaskId::new(id);
        let hash = self.hasher.hash_one(&task_id);
        if self.find_hashed(hash, &task_id).is_some() {
            return TrackOutcome::Known;
        }
        if let Some(last) = self.tombstones.get_mut(&id_hash(id)) {
            // A mention keeps the tombstone alive; written back at most once per re-mention
            // period.
            if now - *last >= self.policy.remention_ms / 2 {
                *last = now;
                let key = store::task_key(&self.provider, id);
                self.tombstones_put.push((key, now));
            }
            return TrackOutcome::Remembered;
        }
        if !self.shard.owns(&self.provider, id) {
            return TrackOutcome::NotOwned; // another replica counts it
        }
        let slot = self.insert(task_id, hash, source, now, true);
        self.set_state(slot, 0, Status::Unknown, None);
        self.plan_next_poll(slot, Next::Discovered, now);
        self.events.push(Event::Discovered { source });
        TrackOutcome::New
    }

    /// An answer: applied, then the next poll planned (unless one is planned earlier).
    #[inline]
    pub(super) fn observe(&mut self, slot: u32, obs: &Observation, now: i64) -> Applied {
        let applied = self.apply(slot, obs, now);
        self.plan_next_poll(slot, Next::Answered, now);
        self.plan_late_refund_check(slot, now);
        applied
    }

    /// A callback or a history item: an answer nobody asked for. When the provider is
    /// expected to tell outcomes itself, seeing the task still in flight pushes its safety
    /// poll back: it is overdue only `max_interval` after the last sighting.
    pub(super) fn observe_unasked(&mut self, slot: u32, obs: &Observation, now: i64) -> Applied {
        let planned = self.task(slot).next_poll;
        // NEVER: a poll of it is in flight (or it is finished); that poll plans the next one.
        if !self.policy.expect_callbacks || planned == NEVER {
            return self.observe(slot, obs, now);
        }
        let applied = self.apply(slot, obs, now);
        let t = self.task(slot);
        if t.status.is_terminal() {
            self.plan_late_refund_check(slot, now);
        } else {
            let due = self
                .policy
                .next_poll(t, Next::Answered, now, &self.latencies)
                .max(0);
            if due != planned {
                // The old heap entry goes stale (it no longer matches `next_poll`).
                self.task_mut(slot).next_poll = due;
                self.schedule.push(Reverse(Due::new(due, slot)));
            }
        }
        applied
    }

    /// Plans the next late-refund check of a failed task (see [`LATE_REFUND_CHECKS`]).
    pub(super) fn plan_late_refund_check(&mut self, slot: u32, now: i64) {
        let t = self.task(slot);
        let owed = t.credits_used > t.credits_refunded;
        if !owed || !t.status.is_terminal() || t.status == Status::Succeeded {
            return;
        }
        if t.finished_at == NO_TIME {
            return;
        }
        let finished = t.finished_at;
        let interval = self.policy.interval_ms;
        if let Some(due) = LATE_REFUND_CHECKS
            .iter()
            .map(|intervals| finished + intervals * interval)
            .find(|&due| due > now)
        {
            self.schedule_at(slot, due);
        }
    }

    /// Counts an implausible value of `field` once per task.
    fn count_implausible(&mut self, slot: u32, field: ImplausibleField) {
        let flag = match field {
            ImplausibleField::CreatedAt => IMPLAUSIBLE_CREATED_AT,
            ImplausibleField::CreditsUsed => IMPLAUSIBLE_CREDITS_USED,
            ImplausibleField::CreditsRefunded => IMPLAUSIBLE_CREDITS_REFUNDED,
        };
        let t = self.task_mut(slot);
        if !t.has(flag) {
            t.set(flag, true);
            self.events.push(Event::Implausible { field });
        }
    }

    /// The answer to a poll taken with `take_due`.
    #[inline]
    pub(super) fn record_poll(
        &mut self,
        slot: u32,
        answer: Result<&Observation, &PollError>,
        now: i64,
    ) -> Option<Applied> {
        let t = self.task_mut(slot);
        t.last_polled = now;
        t.polls = t.polls.saturating_add(1);
        match answer {
            Ok(obs) => {
                // An answer ends a run of "not found" and clears the last error.
                let t = self.task_mut(slot);
                t.not_found = 0;
                t.set_not_found_since(0);
                t.set_last_error(None);
                Some(self.observe(slot, obs, now))
            }
            Err(err) => {
                self.record_failure(slot, err, now);
                None
            }
        }
    }

    /// A poll without an answer: kept as the task's last error; "not found" long enough
    /// drops the task (it was deleted upstream, or never existed).
    fn record_failure(&mut self, slot: u32, err: &PollError, now: i64) {
        let not_found = err.class == Some(FailureClass::NotFound);
        let t = self.task_mut(slot);
        t.set_last_error(Some(&truncate(&err.message, MAX_TEXT_LEN)));
        if not_found {
            if t.not_found == 0 {
                t.set_not_found_since(now);
            }
            t.not_found = t.not_found.saturating_add(1);
        }
        self.mark_lazy(slot);
        let t = self.task(slot);
        if not_found
            && t.not_found >= NOT_FOUND_LIMIT
            && now - t.not_found_since() >= NOT_FOUND_MIN_SPAN_MS
        {
            self.remove(slot, now, Some(DropReason::NotFound));
            return;
        }
        // A failed confirmation poll of a finished task plans nothing: nothing to retry
        // (a late-refund check tries again at its next time).
        self.plan_next_poll(slot, Next::Failed, now);
        self.plan_late_refund_check(slot, now);
    }

    /// The accounting rule. Terminal status: counted once. Credits: each increase once.
    fn apply(&mut self, slot: u32, obs: &Observation, now: i64) -> Applied {
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
        // An implausible created_at is ignored: age counts from first sight.
        let created_at = obs.created_at.filter(|&v| plausible_created_at(v, now));
        let implausible_created_at = obs.created_at.is_some() && created_at.is_none();
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
            if let Some(v) = created_at {
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
        if implausible_created_at {
            self.count_implausible(slot, ImplausibleField::CreatedAt);
        }
        if obs.refused_credits.used {
            self.count_implausible(slot, ImplausibleField::CreditsUsed);
        }
        if obs.refused_credits.refunded {
            self.count_implausible(slot, ImplausibleField::CreditsRefunded);
        }

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

        let counted = status.is_terminal() && !self.task(slot).has(COUNTED);
        if counted {
            let reason = match status {
                Status::Succeeded => None,
                Status::TimedOut => Some(obs.failure_reason.unwrap_or(FailureReason::Timeout)),
                Status::Cancelled => Some(obs.failure_reason.unwrap_or(FailureReason::Cancelled)),
                _ => Some(obs.failure_reason.unwrap_or(FailureReason::Unspecified)),
            };
            // From an implausible created_at there is no latency to observe, nor to learn.
            let latency_seconds = obs.latency_seconds().filter(|_| !implausible_created_at);
            // Whatever told us, the task's completion time is learnt once, with its count
            // (the end as for the latency: `completed_at`, else `updated_at`; maxapi has
            // no completion time, docs/providers.md).
            let t = self.task(slot);
            let end = if t.completed_at != NO_TIME {
                t.completed_at
            } else {
                t.updated_at
            };
            if !implausible_created_at
                && t.created_at != NO_TIME
                && end != NO_TIME
                && end >= t.created_at
            {
                self.latencies.learn(model, end - t.created_at);
            }
            let t = self.task_mut(slot);
            t.set(COUNTED, true);
            t.finished_at = now;
            t.failure_reason = reason;
            t.next_poll = NEVER;
            self.retain_until(slot, now + self.policy.retention_ms);
            self.events.push(Event::Completed {
                model: self.models.name(model).clone(),
                status,
                reason,
                latency_seconds,
            });
        }
        let changed = text_changed || self.task(slot).record_state() != before;
        if changed {
            self.mark_dirty(slot);
        } else {
            self.mark_lazy(slot);
        }
        Applied { changed, counted }
    }

    /// Finished tasks stay visible for `retention`, then go (see `sweep`).
    pub(super) fn retain_until(&mut self, slot: u32, end: i64) {
        let generation = self.task(slot).generation;
        self.expiry.push(Reverse((end, slot, generation)));
    }

    /// Removes a task: gauges, schedule, store row; remembers the id in a tombstone so that
    /// no source gets it tracked (and counted) again.
    pub(super) fn remove(&mut self, slot: u32, now: i64, reason: Option<DropReason>) {
        let Some(task) = self.slots[slot as usize].take() else {
            return;
        };
        self.forget_state(&task);
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

    /// Ends the retention of finished tasks, and forgets ids no source mentioned for
    /// `forget_after` (memory stays bounded; see `remention_interval`).
    pub(super) fn sweep(&mut self, now: i64) {
        while let Some(&Reverse((end, slot, generation))) = self.expiry.peek() {
            if end > now {
                break;
            }
            self.expiry.pop();
            // The slot may hold another task by now: the generation tells.
            let live = matches!(
                self.slots.get(slot as usize),
                Some(Some(t)) if t.generation == generation && t.status.is_terminal()
            );
            if live {
                self.remove(slot, now, None);
            }
        }
        // Tombstones: a full pass, at most once a minute. The first sweep only starts the
        // clock: after a long stop, sources mention their ids again (refreshing them) before
        // old tombstones are judged. (Their store rows are expired by the persister,
        // `Store::expire_tombstones`.)
        let last = *self.last_tombstone_sweep.get_or_insert(now);
        if now - last >= TOMBSTONE_SWEEP_MS {
            self.last_tombstone_sweep = Some(now);
            let ttl = self.policy.tombstone_ttl_ms;
            self.tombstones.retain(|_, last| now - *last <= ttl);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::registry::test_support::{completed, obs, tasks};

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
    fn with_callbacks_expected_a_task_is_polled_only_when_overdue() {
        let p = tasks(); // max_interval 60 s
        p.set_expect_callbacks(true);
        p.track("a", Source::Api, 0);
        assert_eq!(
            p.next_due(),
            Some(60_000),
            "no poll on the regular schedule"
        );
        // Seen in flight (a history item): the safety poll moves to 60 s after it.
        p.observe(&obs("a", Status::Running), 30_000);
        assert_eq!(p.take_due(60_000), None);
        assert_eq!(p.next_due(), Some(90_000));
        let applied = p.observe(&obs("a", Status::Succeeded), 40_000);
        assert_eq!(
            applied,
            Some(Applied {
                changed: true,
                counted: true
            })
        );
        assert_eq!(p.take_due(1_000_000), None, "finished: never polled");
        assert_eq!(completed(&p.take_pending().events), 1);
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
}
