//! The exactly-once property: any sequence of observations for any set of tasks, in any
//! order, with replays, retention sweeps, commits and crashes (restarts from the last commit)
//! at any point, commits each task's terminal outcome once and each credit once.

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;

use super::{Event, ProviderTasks, Source};
use crate::config::{Polling, Shard};
use crate::store;
use crate::task::{Observation, Status};

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
                    let status = [Status::Pending, Status::Running, Status::Unknown][s as usize];
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
        p.restorer().task(id, record, now).unwrap();
    }
    for (key, last) in &committed.tombstones {
        let (_, id) = store::split_task_key(key).unwrap();
        p.restorer().tombstone(id, *last);
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
