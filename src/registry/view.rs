//! The tasks as the API and the landing page show them.

use super::table::{Inner, NEVER, Task, some_time};
use crate::task::{FailureReason, Status};

/// A task as the API and landing page show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskView {
    pub id: String,
    pub provider: String,
    pub model: String,
    pub status: &'static str,
    pub upstream_status: String,
    pub failure_reason: Option<&'static str>,
    pub error_message: Option<String>,
    pub source: &'static str,
    pub created_at: Option<String>,
    pub updated_at: Option<String>,
    pub completed_at: Option<String>,
    pub first_seen_at: String,
    pub last_polled_at: Option<String>,
    pub next_poll_at: Option<String>,
    pub credits_used: f64,
    pub credits_refunded: f64,
    pub last_error: Option<String>,
}

impl Inner {
    /// Up to `limit` tasks, optionally of one status, in no particular order.
    pub(super) fn list(&self, status: Option<Status>, limit: usize) -> Vec<TaskView> {
        self.slots
            .iter()
            .flatten()
            .filter(|t| status.is_none_or(|s| t.status == s))
            .take(limit)
            .map(|t| self.view(t))
            .collect()
    }

    fn view(&self, t: &Task) -> TaskView {
        let time = |ms: i64| format_millis(ms);
        TaskView {
            id: t.id.to_string(),
            provider: self.provider.to_string(),
            model: self.models.name(t.model).to_string(),
            status: t.status.as_str(),
            upstream_status: t.upstream_status(&self.words).to_string(),
            failure_reason: t.failure_reason.map(FailureReason::as_str),
            error_message: t.error_message().map(str::to_string),
            source: t.source.as_str(),
            created_at: some_time(t.created_at).map(time),
            updated_at: some_time(t.updated_at).map(time),
            completed_at: some_time(t.completed_at).map(time),
            first_seen_at: time(t.first_seen),
            last_polled_at: some_time(t.last_polled).map(time),
            next_poll_at: (t.next_poll != NEVER).then(|| time(t.next_poll)),
            credits_used: t.credits_used,
            credits_refunded: t.credits_refunded,
            last_error: t.last_error().map(str::to_string),
        }
    }
}

/// RFC 3339 text of a Unix-millisecond time, for the API.
pub fn format_millis(ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}
