//! Property test: any sequence of registrations, answers, errors, removals, clean restarts
//! and crashes keeps the registry's derived structures consistent with its tasks, and counts
//! each terminal outcome and each credit once.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;

use super::table::{COUNTED, DIRTY, IN_FLIGHT, Inner, LAZY, NEVER};
use super::test_support::{completed, tasks};
use super::{Event, PollError, Source};
use crate::providers::FailureClass;
use crate::store::{self, Batch};
use crate::task::{Observation, Status};

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

impl Inner {
    /// Asserts that the derived structures (index, counts, in-flight keys, dirty list,
    /// schedule) agree with the tasks.
    fn check(&self) {
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
