//! The tasks as the API and the landing page show them.

use super::table::{Inner, NEVER, Task, some_time};
use crate::task::{FailureReason, Status};

/// A task as the API and landing page show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskView {
    pub(crate) id: String,
    pub(crate) provider: String,
    pub(crate) model: String,
    pub status: &'static str,
    pub(crate) upstream_status: String,
    pub(crate) failure_reason: Option<&'static str>,
    pub(crate) error_message: Option<String>,
    pub(crate) source: &'static str,
    pub(crate) created_at: Option<String>,
    pub(crate) updated_at: Option<String>,
    pub(crate) completed_at: Option<String>,
    pub(crate) first_seen_at: String,
    pub(crate) last_polled_at: Option<String>,
    pub(crate) next_poll_at: Option<String>,
    pub(crate) credits_used: f64,
    pub(crate) credits_refunded: f64,
    pub(crate) last_error: Option<String>,
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
pub(crate) fn format_millis(ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}
