//! When tasks are polled: the polling policy, the one function that picks a task's next
//! poll, and the due-time heap the pollers take tasks from.
//!
//! The rule (`Policy::next_poll`). Once the task's model has a trusted completion-time
//! distribution (`latency`: at least `MIN_SAMPLES` completions learnt; before its first
//! answer a task has no model and goes by its provider's pooled distribution), polls are
//! placed at successive quantiles of it, measured from the task's creation: the first at
//! [`FIRST_QUANTILE`], then every [`QUANTILE_STEP`] of the mass, skipping the quantiles the
//! task's age has already passed (a task first seen late starts further up). Where
//! completions are dense, polls are dense. A gap is never shorter than `interval` (but the
//! first poll, which also learns the model) nor longer than `max_interval`; a task older
//! than every sample is polled every `max_interval`. Without a trusted distribution, the
//! back-off: `interval`, growing by [`BACKOFF_FACTOR`] up to `max_interval`.
//!
//! A provider whose tasks report through callbacks (`Policy::expect_callbacks`) is not
//! polled on that schedule: a task gets one safety poll when it is overdue (its
//! distribution's p99 × [`OVERDUE_FACTOR`] after creation, or `max_interval` without one),
//! then one every `max_interval` while it is still unfinished. Restored tasks are polled
//! within one interval either way: callbacks sent while the exporter was down are lost.

use std::cmp::Reverse;
use std::sync::Arc;

use super::compact::UUID_LEN;
use super::latency::{Histogram, Latencies};
use super::table::{Inner, NEVER, Task};
use super::{DropReason, remention_interval};
use crate::config::Polling;

/// Per-task back-off factor between polls of an in-flight task.
const BACKOFF_FACTOR: f64 = 1.5;
/// Learned schedule: the quantile of the completion times the first poll aims at.
const FIRST_QUANTILE: f64 = 0.2;
/// Learned schedule: the share of the completions between two polls.
const QUANTILE_STEP: f64 = 0.2;
/// A task of a provider with callbacks is overdue this far past its model's p99.
const OVERDUE_FACTOR: f64 = 1.5;
const OVERDUE_QUANTILE: f64 = 0.99;

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
    /// The provider's tasks report through callbacks: no regular polls, only a safety poll
    /// when a task is overdue (see the module documentation).
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

    /// The same policy, for a provider whose tasks do (or do not) report through callbacks.
    pub(super) fn with_callbacks(self, expect_callbacks: bool) -> Self {
        Policy {
            expect_callbacks,
            ..self
        }
    }

    /// When an unfinished task is polled next, given what its provider's tasks took so far
    /// (`learned`). This is the only place that decides it; the rule is in the module
    /// documentation.
    #[inline]
    pub(super) fn next_poll(&self, task: &Task, next: Next, now: i64, learned: &Latencies) -> i64 {
        // Spread the restart's first polls over one interval instead of a burst.
        let restored = || now + (fastrand::f64() * self.interval_ms as f64) as i64;
        let trusted = learned.for_model(task.model);
        if self.expect_callbacks {
            return match next {
                Next::Discovered => match trusted {
                    Some(d) => {
                        let overdue = d.quantile_ms(OVERDUE_QUANTILE) * OVERDUE_FACTOR;
                        (task.in_flight_key() + overdue as i64).max(now)
                    }
                    None => now + self.max_interval_ms,
                },
                Next::Restored => restored(),
                Next::Answered | Next::Failed => now + self.max_interval_ms,
            };
        }
        match (next, trusted) {
            (Next::Discovered, Some(d)) => self.learned_poll(d, task, now, 0),
            (Next::Discovered, None) => now,
            (Next::Restored, _) => restored(),
            (Next::Answered, Some(d)) => self.learned_poll(d, task, now, self.interval_ms),
            (Next::Answered, None) => now + self.delay_ms(task.polls),
            // Retry at the task's current pace; failures do not speed polling up.
            (Next::Failed, _) => now + self.delay_ms(task.polls.saturating_sub(1).max(1)),
        }
    }

    /// The next poll at the next quantile of `d` above the task's age, at least `min_gap`
    /// and at most `max_interval` from now.
    fn learned_poll(&self, d: &Histogram, task: &Task, now: i64, min_gap: i64) -> i64 {
        let created = task.in_flight_key();
        let age = (now - created) as f64;
        if age >= d.longest_ms() {
            return now + self.max_interval_ms; // older than every sample
        }
        let level = next_quantile(d.cdf(age));
        let target = created + d.quantile_ms(level).ceil() as i64;
        target.clamp(now + min_gap, now + self.max_interval_ms.max(min_gap))
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

/// The first quantile level of the ladder `FIRST_QUANTILE`, `FIRST_QUANTILE + QUANTILE_STEP`,
/// ..., 1 above `reached` (the share of completions the task's age has passed).
fn next_quantile(reached: f64) -> f64 {
    // A poll planned at a quantile lands on it: not the same level again.
    let reached = reached + 1e-6;
    if reached < FIRST_QUANTILE {
        return FIRST_QUANTILE;
    }
    let steps = ((reached - FIRST_QUANTILE) / QUANTILE_STEP).floor() + 1.0;
    (FIRST_QUANTILE + steps * QUANTILE_STEP).min(1.0)
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
            let due = self.policy.next_poll(t, next, now, &self.latencies);
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
    use crate::registry::test_support::{obs, polling, tasks};
    use crate::registry::{ProviderTasks, Source};
    use crate::task::Status;

    /// Tasks of model `m` (interval 10 s, max_interval 60 s) that finished after `durations`
    /// ms, learnt from their terminal answers.
    fn learnt(durations: impl IntoIterator<Item = i64>) -> ProviderTasks {
        let p = tasks();
        for (k, took) in durations.into_iter().enumerate() {
            let id = format!("done{k}");
            p.track(&id, Source::Api, 0);
            let mut o = obs(&id, Status::Succeeded);
            o.updated_at = Some(took);
            p.observe(&o, took);
        }
        p
    }

    /// 40 completions spread evenly over 20-60 s.
    fn twenty_to_sixty() -> ProviderTasks {
        learnt((0..40).map(|k| 20_000 + k * 1_000))
    }

    fn due(p: &ProviderTasks, id: &str) -> i64 {
        let inner = p.lock();
        inner.task(inner.slot_of(id).unwrap()).next_poll
    }

    /// Takes `id` for its poll and answers "running", created at `created`.
    fn answer_running(p: &ProviderTasks, id: &str, created: i64, now: i64) {
        assert_eq!(p.take_due(now).as_deref(), Some(id));
        let mut o = obs(id, Status::Running);
        o.created_at = Some(created);
        p.record_poll(id, Ok(&o), now);
    }

    #[test]
    fn without_enough_samples_the_backoff_is_unchanged() {
        let p = learnt((0..19).map(|k| 20_000 + k * 1_000));
        p.track("n", Source::Api, 100_000);
        assert_eq!(due(&p, "n"), 100_000, "polled at once");
        answer_running(&p, "n", 100_000, 100_000);
        let gap = due(&p, "n") - 100_000;
        assert!((9_000..=11_000).contains(&gap), "interval ±10 %: {gap}");
    }

    #[test]
    fn the_first_poll_goes_near_the_early_quantile() {
        let p = twenty_to_sixty();
        p.track("n", Source::Api, 100_000);
        // p20 of 20-60 s is 28 s.
        let first = due(&p, "n") - 100_000;
        assert!((27_000..=30_000).contains(&first), "{first}");
    }

    #[test]
    fn polls_follow_the_quantiles_within_interval_and_max_interval() {
        let p = twenty_to_sixty();
        let created = 100_000;
        p.track("n", Source::Api, created);
        let mut polls = vec![due(&p, "n")];
        while polls.len() < 8 {
            let now = *polls.last().unwrap();
            answer_running(&p, "n", created, now);
            polls.push(due(&p, "n"));
        }
        let ages: Vec<i64> = polls.iter().map(|t| t - created).collect();
        let gaps: Vec<i64> = polls.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps.iter().all(|g| (10_000..=60_000).contains(g)),
            "{gaps:?}"
        );
        // Quantiles 20, 40, 60, 80 % (28, 36, 44, 52 s): 8 s apart, so `interval` apart.
        assert!((27_000..=30_000).contains(&ages[0]), "{ages:?}");
        assert_eq!(&gaps[..3], &[10_000; 3], "{ages:?}");
        // Past the longest sample (about 60 s), every max_interval.
        let past = ages.iter().position(|&a| a > 66_000).expect("{ages:?}");
        assert!(past <= 5, "{ages:?}");
        assert!(gaps[past..].iter().all(|&g| g == 60_000), "{gaps:?}");
    }

    #[test]
    fn a_task_older_than_every_sample_is_polled_every_max_interval() {
        let p = twenty_to_sixty();
        p.track("late", Source::Api, 500_000);
        // First seen now: by the pooled distribution, its first poll is early...
        assert!(due(&p, "late") < 500_000 + 30_000);
        // ...but its answer says it was created two minutes ago.
        let now = due(&p, "late");
        answer_running(&p, "late", now - 120_000, now);
        assert_eq!(due(&p, "late"), now + 60_000);
    }

    #[test]
    fn a_task_seen_late_starts_further_up_the_quantiles() {
        // 40 completions over 20-120 s: p20 40 s, p40 60 s, p60 80 s.
        let p = learnt((0..40).map(|k| 20_000 + k * 2_564));
        p.track("mid", Source::Api, 200_000);
        // Created 65 s before its first answer: past p40, so next at p60.
        let created = due(&p, "mid") - 65_000;
        answer_running(&p, "mid", created, due(&p, "mid"));
        let age = due(&p, "mid") - created;
        assert!((78_000..=83_000).contains(&age), "{age}");
    }

    #[test]
    fn with_callbacks_only_an_overdue_safety_poll() {
        let p = tasks();
        p.set_expect_callbacks(true);
        p.track("a", Source::Api, 0);
        assert_eq!(due(&p, "a"), 60_000, "no samples: after max_interval");

        let p = twenty_to_sixty();
        p.set_expect_callbacks(true);
        p.set_polling(&polling()); // a reload keeps the setting
        p.track("b", Source::Api, 100_000);
        // p99 (about 60 s) × 1.5 after creation.
        let first = due(&p, "b") - 100_000;
        assert!((88_000..=100_000).contains(&first), "{first}");
        assert_eq!(p.take_due(100_000 + first - 1), None, "nothing before");
        answer_running(&p, "b", 100_000, 100_000 + first);
        assert_eq!(
            due(&p, "b"),
            100_000 + first + 60_000,
            "then every max_interval"
        );
    }

    #[test]
    fn learnt_times_are_stored_with_the_counts_and_restored() {
        let p = twenty_to_sixty();
        let pending = p.take_pending();
        let mut keys: Vec<&str> = pending
            .batch
            .put_latencies
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        keys.sort();
        assert_eq!(keys, ["p\0m", "p\0unknown"]);

        let restarted = tasks();
        {
            let mut restorer = restarted.restorer();
            for (key, row) in &pending.batch.put_latencies {
                let (_, model) = crate::store::split_task_key(key).unwrap();
                assert!(restorer.latencies(model, row));
            }
            assert!(!restorer.latencies("m", b"garbage"));
        }
        restarted.track("n", Source::Api, 100_000);
        p.track("n", Source::Api, 100_000);
        assert_eq!(due(&restarted, "n"), due(&p, "n"));
        assert!(
            due(&p, "n") > 100_000,
            "the learnt schedule, not an immediate poll"
        );
    }

    #[test]
    fn backoff_grows_to_the_ceiling() {
        let policy = Policy::from(&polling());
        let d1 = policy.delay_ms(1);
        assert!((9_000..=11_000).contains(&d1), "{d1}");
        let d20 = policy.delay_ms(20);
        assert!((54_000..=66_000).contains(&d20), "{d20}");
    }
}
