//! One poller per provider: takes due tasks from the registry, asks the provider through
//! the upstream client, and records the answers.

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;

use crate::background::{self, Worker};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::providers::{Adapter, FailureClass};
use crate::registry::{PollError, ProviderTasks};
use crate::upstream::{CallError, Endpoint, Reserved, Upstream};

/// Longest sleep between looks at the schedule (a safety net; wake-ups are notified).
const MAX_IDLE: Duration = Duration::from_secs(1);

/// Runs until the task is aborted. Aborting is safe: a task taken but not answered is
/// rescheduled by `ProviderTasks::reschedule_unscheduled` when a poller starts again.
pub(crate) async fn run(
    tasks: Arc<ProviderTasks>,
    upstream: Arc<Upstream>,
    adapter: Adapter,
    metrics: Arc<Metrics>,
    clock: Clock,
) {
    loop {
        // A permit first: a task is taken from the schedule only when it can be asked now.
        let reserved = upstream.reserve().await;
        let id = next_due(&tasks, clock).await;
        let tasks = tasks.clone();
        let adapter = adapter.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let poll = poll_one(&tasks, reserved, &adapter, &metrics, &id, clock);
            if let Err(panic) = std::panic::AssertUnwindSafe(poll).catch_unwind().await {
                background::report_panic(
                    Worker::Poller,
                    tasks.name(),
                    &metrics,
                    panic.as_ref(),
                    Duration::ZERO,
                );
                // The task was taken from the schedule and never answered: put it back.
                tasks.reschedule_unscheduled(clock.now_millis());
            }
        });
    }
}

/// Waits until a task is due and takes it.
async fn next_due(tasks: &ProviderTasks, clock: Clock) -> Arc<str> {
    loop {
        let now = clock.now_millis();
        if let Some(id) = tasks.take_due(now) {
            return id;
        }
        let wait = tasks
            .next_due()
            .map_or(MAX_IDLE, |due| {
                Duration::from_millis((due - now).max(1) as u64)
            })
            .min(MAX_IDLE);
        tokio::select! {
            _ = tasks.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Polls one task under `reserved` and records the answer.
async fn poll_one(
    tasks: &ProviderTasks,
    reserved: Reserved,
    adapter: &Adapter,
    metrics: &Metrics,
    id: &str,
    clock: Clock,
) {
    let answer = reserved
        .call(Endpoint::Task, &adapter.task_path(id), |status, body| {
            adapter.parse_task(status, body)
        })
        .await;
    let now = clock.now_millis();
    match answer {
        Ok(mut obs) => {
            // Trust the id we asked for, not the one in the body.
            obs.task_id = id.to_string();
            let applied = tasks.record_poll(id, Ok(&obs), now);
            if applied.is_some_and(|a| a.counted) {
                metrics.record_detection(tasks.name(), "poll", &obs, now);
            }
        }
        Err(CallError::Transport(e)) => {
            let err = PollError {
                class: None,
                message: e.to_string(),
            };
            tasks.record_poll(id, Err(&err), now);
        }
        Err(CallError::Refused(failure)) => {
            if failure.class != FailureClass::RateLimited {
                tracing::debug!(provider = tasks.name(), task = id, error = %failure.message, "poll answer was not a task");
            }
            tasks.record_poll(id, Err(&PollError::from(&failure)), now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Polling;
    use crate::registry::{Registry, Source};

    #[tokio::test(start_paused = true)]
    async fn a_task_is_taken_when_due_on_the_clock_and_not_before() {
        let clock = Clock::tokio();
        let registry = Registry::new(50, Default::default());
        let tasks = registry.provider_or_insert("p", &Polling::default());
        tasks.track("t1", Source::Static, clock.now_millis());
        assert_eq!(&*next_due(&tasks, clock).await, "t1");

        let err = PollError {
            class: None,
            message: "request timed out".into(),
        };
        tasks.record_poll("t1", Err(&err), clock.now_millis());
        let due = tasks.next_due().expect("rescheduled");
        let wait = Duration::from_millis((due - clock.now_millis()) as u64);
        assert!(wait > Duration::from_millis(2), "{wait:?}");
        let taken = tokio::spawn(async move { next_due(&tasks, clock).await });
        tokio::time::sleep(wait - Duration::from_millis(1)).await;
        assert!(!taken.is_finished(), "taken before it was due");
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(&*taken.await.unwrap(), "t1");
    }
}
