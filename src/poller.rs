//! One poller per provider: takes due tasks from the registry, asks the provider through
//! the upstream client, and records the answers.

use std::sync::Arc;
use std::time::Duration;

use crate::providers::{Adapter, FailureClass, UpstreamFailure};
use crate::registry::{PollError, ProviderTasks};
use crate::task::now_millis;
use crate::upstream::{Answer, Endpoint, Upstream};

/// Longest sleep between looks at the schedule (a safety net; wake-ups are notified).
const MAX_IDLE: Duration = Duration::from_secs(1);

/// Runs until the task is aborted. Aborting is safe: a task taken but not answered is
/// rescheduled by `ProviderTasks::reschedule_unscheduled` when a poller starts again.
pub async fn run(tasks: Arc<ProviderTasks>, upstream: Arc<Upstream>, adapter: Adapter) {
    loop {
        let permit = upstream
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let id = next_due(&tasks).await;
        let tasks = tasks.clone();
        let upstream = upstream.clone();
        let adapter = adapter.clone();
        tokio::spawn(async move {
            poll_one(&tasks, &upstream, &adapter, &id).await;
            drop(permit);
        });
    }
}

/// Waits until a task is due and takes it.
async fn next_due(tasks: &ProviderTasks) -> Arc<str> {
    loop {
        let now = now_millis();
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

/// Polls one task and records the answer.
pub async fn poll_one(tasks: &ProviderTasks, upstream: &Upstream, adapter: &Adapter, id: &str) {
    let answer = upstream.get(Endpoint::Task, &adapter.task_path(id)).await;
    let now = now_millis();
    let answer = match answer {
        Ok(answer) => answer,
        Err(e) => {
            let err = PollError {
                class: None,
                message: e.to_string(),
            };
            tasks.record_poll(id, Err(&err), now);
            return;
        }
    };
    match interpret(&answer, |status, body| adapter.parse_task(status, body)) {
        Ok(mut obs) => {
            upstream.record_outcome(Endpoint::Task, Ok(()));
            // Trust the id we asked for, not the one in the body.
            obs.task_id = id.to_string();
            tasks.record_poll(id, Ok(&obs), now);
        }
        Err(failure) => {
            upstream.record_outcome(Endpoint::Task, Err(&failure));
            if failure.class != FailureClass::RateLimited {
                tracing::debug!(provider = upstream.provider(), task = id, error = %failure.message, "poll answer was not a task");
            }
            tasks.record_poll(id, Err(&PollError::from(&failure)), now);
        }
    }
}

/// Hands an answer's body to `parse`, or reports an oversized body as undecodable.
pub fn interpret<T>(
    answer: &Answer,
    parse: impl FnOnce(u16, &[u8]) -> Result<T, UpstreamFailure>,
) -> Result<T, UpstreamFailure> {
    match &answer.body {
        Some(body) => parse(answer.status, body),
        None => Err(UpstreamFailure {
            class: FailureClass::InvalidResponse,
            api_error: Some("invalid_response"),
            message: format!(
                "HTTP {}: body larger than {} bytes, not read",
                answer.status,
                crate::upstream::MAX_BODY_BYTES
            ),
        }),
    }
}
