//! The domain: what a task is once a provider's answer has been normalized.
//!
//! Nothing here does I/O or knows a provider's wire format. Provider adapters produce
//! [`Observation`]s; the registry consumes them.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch. Providers send RFC 3339 with `Z`; we keep integers so
/// that the state store and the latency arithmetic stay exact and cheap.
pub(crate) type UnixMillis = i64;

/// Longest upstream status or error message we keep (API and landing page only, never a label).
pub const MAX_TEXT_LEN: usize = 256;

/// Longest task id we accept from any source; providers use UUIDs and 30-character ids.
pub(crate) const MAX_TASK_ID_LEN: usize = 128;

/// Whether `id` may be tracked: non-empty, bounded, printable ASCII without spaces, and
/// not made of dots only (`..` would walk up the request path even when percent-encoded).
pub(crate) fn is_valid_task_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_TASK_ID_LEN
        && id.bytes().all(|b| b.is_ascii_graphic())
        && !id.bytes().all(|b| b == b'.')
}

/// Normalized task status: the value of the `status` label (docs/providers.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    Pending,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
    Unknown,
}

impl Status {
    pub(crate) const ALL: [Status; 7] = [
        Status::Pending,
        Status::Running,
        Status::Succeeded,
        Status::Failed,
        Status::TimedOut,
        Status::Cancelled,
        Status::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::TimedOut => "timed_out",
            Status::Cancelled => "cancelled",
            Status::Unknown => "unknown",
        }
    }

    pub fn parse(label: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.as_str() == label)
    }

    /// A terminal status never changes again: the task is counted and no longer polled.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Succeeded | Status::Failed | Status::TimedOut | Status::Cancelled
        )
    }

    /// Pending and running tasks are "in flight" (`genai_task_oldest_in_flight_seconds`).
    /// `unknown` is polled until max age but is not counted as in flight: we do not know.
    pub(crate) fn is_in_flight(self) -> bool {
        matches!(self, Status::Pending | Status::Running)
    }

    /// Dense index, for per-status arrays.
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn from_index(i: usize) -> Option<Status> {
        Status::ALL.get(i).copied()
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Normalized failure reason: the value of the `reason` label (docs/providers.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureReason {
    ContentModeration,
    InvalidParameters,
    InsufficientCredits,
    Timeout,
    Cancelled,
    Unspecified,
    Other,
}

impl FailureReason {
    pub const ALL: [FailureReason; 7] = [
        FailureReason::ContentModeration,
        FailureReason::InvalidParameters,
        FailureReason::InsufficientCredits,
        FailureReason::Timeout,
        FailureReason::Cancelled,
        FailureReason::Unspecified,
        FailureReason::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::ContentModeration => "content_moderation",
            FailureReason::InvalidParameters => "invalid_parameters",
            FailureReason::InsufficientCredits => "insufficient_credits",
            FailureReason::Timeout => "timeout",
            FailureReason::Cancelled => "cancelled",
            FailureReason::Unspecified => "unspecified",
            FailureReason::Other => "other",
        }
    }

    pub(crate) fn parse(label: &str) -> Option<FailureReason> {
        FailureReason::ALL.into_iter().find(|r| r.as_str() == label)
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn from_index(i: usize) -> Option<FailureReason> {
        FailureReason::ALL.get(i).copied()
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One normalized look at a task, from a poll answer, a callback or a history page.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub task_id: String,
    /// Model name as the provider reports it; `None` when the answer does not say.
    pub model: Option<String>,
    pub status: Status,
    /// The provider's own status word (`PROCESSING`, `completed`, ...), truncated.
    pub upstream_status: String,
    /// Set for `failed`, `timed_out` and `cancelled`; `None` otherwise.
    pub failure_reason: Option<FailureReason>,
    /// Free text from the provider (apimall `error_message`), truncated. Never a label.
    pub error_message: Option<String>,
    /// Credits charged so far for this task (apimall only); cumulative, not a delta.
    pub credits_used: Option<f64>,
    /// Credits given back so far (apimall only); cumulative, not a delta.
    pub credits_refunded: Option<f64>,
    pub created_at: Option<UnixMillis>,
    pub updated_at: Option<UnixMillis>,
    pub completed_at: Option<UnixMillis>,
    /// Credit values the answer carried but no real task can have (see
    /// [`MAX_TASK_CREDITS`]): left absent above, and counted as implausible values.
    pub refused_credits: RefusedCredits,
}

/// Credit amounts above this, for one task, are refused: no generation costs a billion
/// credits, and a value like `1e308` would otherwise stay in a counter for ever.
pub const MAX_TASK_CREDITS: f64 = 1e9;

/// Which credit fields of an answer were refused (negative, not finite, not a number, or
/// above [`MAX_TASK_CREDITS`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefusedCredits {
    pub used: bool,
    pub refunded: bool,
}

impl Observation {
    /// A bare observation with only an id and a status; adapters fill in the rest.
    pub fn new(task_id: impl Into<String>, status: Status, upstream_status: &str) -> Self {
        Observation {
            task_id: task_id.into(),
            model: None,
            status,
            upstream_status: truncate(upstream_status, MAX_TEXT_LEN),
            failure_reason: None,
            error_message: None,
            credits_used: None,
            credits_refunded: None,
            created_at: None,
            updated_at: None,
            completed_at: None,
            refused_credits: RefusedCredits::default(),
        }
    }

    /// Completion latency in seconds: `(completed_at or updated_at) - created_at`.
    /// `None` when a timestamp is missing or the result would be negative (clock skew).
    pub fn latency_seconds(&self) -> Option<f64> {
        let end = self.completed_at.or(self.updated_at)?;
        let start = self.created_at?;
        let ms = end.checked_sub(start)?;
        (ms >= 0).then_some(ms as f64 / 1000.0)
    }
}

/// Parses an RFC 3339 timestamp (`2026-02-10T21:54:46.686768Z`) into Unix milliseconds.
/// Accepts a numeric offset too, because "`Z` always" is a documentation promise, not a schema.
pub(crate) fn parse_timestamp(text: &str) -> Option<UnixMillis> {
    let text = text.trim();
    // humantime only knows `Z`; fold a `+hh:mm` / `-hh:mm` offset in ourselves.
    let time = match split_offset(text) {
        Some((base, sign, offset)) => {
            let local = humantime::parse_rfc3339_weak(base).ok()?;
            if sign > 0 {
                local.checked_sub(offset)?
            } else {
                local.checked_add(offset)?
            }
        }
        None => humantime::parse_rfc3339_weak(text).ok()?,
    };
    Some(system_time_to_millis(time))
}

fn split_offset(text: &str) -> Option<(&str, i32, Duration)> {
    let cut = text.len().checked_sub(6)?;
    if !text.is_char_boundary(cut) {
        return None;
    }
    let (base, offset) = text.split_at(cut);
    let bytes = offset.as_bytes();
    let sign = match bytes[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    if bytes[3] != b':' {
        return None;
    }
    let hours: u64 = offset.get(1..3)?.parse().ok()?;
    let minutes: u64 = offset.get(4..6)?.parse().ok()?;
    Some((base, sign, Duration::from_secs(hours * 3600 + minutes * 60)))
}

pub(crate) fn system_time_to_millis(time: SystemTime) -> UnixMillis {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as UnixMillis,
        Err(e) => -(e.duration().as_millis() as UnixMillis),
    }
}

pub fn now_millis() -> UnixMillis {
    system_time_to_millis(SystemTime::now())
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_labels_round_trip() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
            assert_eq!(Status::from_index(s.index()), Some(s));
        }
        for r in FailureReason::ALL {
            assert_eq!(FailureReason::parse(r.as_str()), Some(r));
            assert_eq!(FailureReason::from_index(r.index()), Some(r));
        }
    }

    #[test]
    fn terminal_and_in_flight_sets() {
        let terminal: Vec<_> = Status::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [
                Status::Succeeded,
                Status::Failed,
                Status::TimedOut,
                Status::Cancelled
            ]
        );
        let in_flight: Vec<_> = Status::ALL
            .into_iter()
            .filter(|s| s.is_in_flight())
            .collect();
        assert_eq!(in_flight, [Status::Pending, Status::Running]);
    }

    #[test]
    fn parses_both_providers_timestamps() {
        // maxapi: microseconds.
        assert_eq!(
            parse_timestamp("2026-02-10T21:54:46.686768Z"),
            Some(1_770_760_486_686)
        );
        // apimall: milliseconds.
        assert_eq!(
            parse_timestamp("2026-03-12T09:30:00.000Z"),
            Some(1_773_307_800_000)
        );
        assert_eq!(
            parse_timestamp("2026-03-12T10:30:00.000+01:00"),
            Some(1_773_307_800_000)
        );
        assert_eq!(parse_timestamp("yesterday"), None);
        assert_eq!(parse_timestamp("日本語x"), None);
        assert_eq!(parse_timestamp(""), None);
    }

    #[test]
    fn latency_uses_completed_at_then_updated_at() {
        let mut o = Observation::new("t", Status::Succeeded, "completed");
        o.created_at = Some(1_000);
        o.updated_at = Some(5_000);
        assert_eq!(o.latency_seconds(), Some(4.0));
        o.completed_at = Some(3_500);
        assert_eq!(o.latency_seconds(), Some(2.5));
        o.created_at = Some(10_000);
        assert_eq!(
            o.latency_seconds(),
            None,
            "negative latency is skew, not data"
        );
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("内容审核失败", 4), "内");
    }
}
