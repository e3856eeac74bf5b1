//! What the exporter learns from proxied traffic: the [`ProxyObserver`] callbacks, and the
//! pure parsing of submit answers (docs/providers.md §1, §2) behind them.

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use super::classify::{ProviderKind, ProxyCode, ProxyEndpoint};
use crate::providers::reasons::FailureRules;
use crate::task::FailureReason;

/// Receives what the proxy saw. Called after the answer has been handed to the application
/// (never before, never changing it), from a spawned task: implementations must not block for
/// long (hand heavy work to a channel) and must not panic.
///
/// For each request the proxy accepted, `request_finished` is called exactly once; for
/// submit and get-task requests with a small JSON answer that arrived whole, one of the other
/// callbacks may follow. A request refused before it was forwarded gets `request_refused`
/// instead.
pub trait ProxyObserver: Send + Sync + 'static {
    /// `duration` is from sending the request upstream to its answer's headers (or to the
    /// failure).
    fn request_finished(
        &self,
        provider: &str,
        endpoint: ProxyEndpoint,
        code: ProxyCode,
        duration: Duration,
    );

    /// A request refused by the proxy itself, never forwarded (or cut off mid-body).
    fn request_refused(&self, provider: &str, refusal: Refusal);

    /// A submit answer that names the new task.
    fn task_submitted(&self, provider: &str, submission: Submission);

    /// A submit answer that refuses the task for a reason the answer gives.
    fn submit_rejected(&self, provider: &str, reason: RejectReason);

    /// A get-task answer the application received, whole, for the integration to read like
    /// one of its own polls.
    fn task_answer(&self, provider: &str, answer: TaskAnswer);
}

/// Why the proxy answered a request itself (bounded, for a counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400: the path or query could reach somewhere other than `base_url`.
    BadPath,
    /// 413: the request body is over `max_request_body_bytes`.
    BodyTooLarge,
}

impl Refusal {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Refusal::BadPath => "bad_path",
            Refusal::BodyTooLarge => "body_too_large",
        }
    }
}

/// A task created through the proxy. Credits are apimall's; maxapi reports none.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    pub task_id: String,
    pub credits_used: Option<f64>,
    pub remaining_credits: Option<f64>,
}

/// The normalized reason of a rejected submission (the `reason` label, bounded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    ContentModeration,
    InvalidParameters,
    InsufficientCredits,
    Other,
}

impl RejectReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RejectReason::ContentModeration => "content_moderation",
            RejectReason::InvalidParameters => "invalid_parameters",
            RejectReason::InsufficientCredits => "insufficient_credits",
            RejectReason::Other => "other",
        }
    }

    fn from_failure(reason: FailureReason) -> RejectReason {
        match reason {
            FailureReason::ContentModeration => RejectReason::ContentModeration,
            FailureReason::InvalidParameters => RejectReason::InvalidParameters,
            FailureReason::InsufficientCredits => RejectReason::InsufficientCredits,
            _ => RejectReason::Other,
        }
    }
}

/// A get-task answer: the task id from the request path, the HTTP status and the whole body.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskAnswer {
    pub task_id: String,
    pub status: u16,
    pub body: Bytes,
}

/// What a submit answer says.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SubmitOutcome {
    Submitted(Submission),
    Rejected(RejectReason),
    /// Anything else: authentication, throttling, server errors, unreadable bodies.
    Unknown,
}

/// Longest task id accepted from an answer (as for ids from any other source).
const MAX_TASK_ID_LEN: usize = 128;

fn plausible_task_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_TASK_ID_LEN
        && id.bytes().all(|b| b.is_ascii_graphic())
        && !id.bytes().all(|b| b == b'.')
}

/// Statuses (HTTP or maxapi envelope `code`) under which an error answer is the provider
/// refusing this submission for what it contains; 401/403/404/429 and 5xx are about the
/// caller, the limits or the server and are counted by `code` alone.
fn is_rejection_status(status: i64) -> bool {
    matches!(status, 400 | 402 | 422)
}

fn number(value: Option<&Value>) -> Option<f64> {
    match value? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|n: &f64| n.is_finite())
}

fn integer(value: Option<&Value>) -> Option<i64> {
    match value? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn text(value: Option<&Value>) -> Option<&str> {
    value?.as_str()
}

/// Reads a submit answer. `rules` classifies the provider's free-text message (the same
/// rules as task failure messages, docs/providers.md §4).
pub(crate) fn parse_submit(
    kind: ProviderKind,
    status: u16,
    body: &[u8],
    rules: &FailureRules,
) -> SubmitOutcome {
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return SubmitOutcome::Unknown;
    };
    match kind {
        ProviderKind::Maxapi => parse_maxapi_submit(status, &json, rules),
        ProviderKind::Apimall => parse_apimall_submit(status, &json, rules),
    }
}

/// `{"code": 0, "msg": "ok", "data": {"taskId": "..."}}`; a rejection is envelope code 400
/// (validation or moderation, `msg` free text), whatever the HTTP status.
fn parse_maxapi_submit(status: u16, json: &Value, rules: &FailureRules) -> SubmitOutcome {
    let code = integer(json.get("code"));
    let msg = text(json.get("msg"));
    if (200..300).contains(&status) && code == Some(0) {
        return match text(json.pointer("/data/taskId")).filter(|id| plausible_task_id(id)) {
            Some(id) => SubmitOutcome::Submitted(Submission {
                task_id: id.to_string(),
                credits_used: None,
                remaining_credits: None,
            }),
            None => SubmitOutcome::Unknown,
        };
    }
    let rejected = match code {
        Some(code) if code != 0 => is_rejection_status(code),
        _ => is_rejection_status(i64::from(status)) && msg.is_some(),
    };
    if rejected {
        SubmitOutcome::Rejected(RejectReason::from_failure(rules.classify(msg)))
    } else {
        SubmitOutcome::Unknown
    }
}

/// Success `{"success": true, "data": {"task_id", "credits_used", "remaining_credits"}}`;
/// error `{"success": false, "error": {"code", "message"}}`, classified by its message, then
/// by its code when the message says nothing recognizable.
fn parse_apimall_submit(status: u16, json: &Value, rules: &FailureRules) -> SubmitOutcome {
    let success = json.get("success").and_then(Value::as_bool);
    if (200..300).contains(&status) && success != Some(false) {
        let data = json.get("data");
        let id = data
            .and_then(|d| text(d.get("task_id")))
            .filter(|id| plausible_task_id(id));
        return match id {
            Some(id) => SubmitOutcome::Submitted(Submission {
                task_id: id.to_string(),
                credits_used: data.and_then(|d| number(d.get("credits_used"))),
                remaining_credits: data.and_then(|d| number(d.get("remaining_credits"))),
            }),
            None => SubmitOutcome::Unknown,
        };
    }
    if !is_rejection_status(i64::from(status)) {
        return SubmitOutcome::Unknown;
    }
    let error = json.get("error");
    let message = error.and_then(|e| text(e.get("message")));
    let code = error.and_then(|e| text(e.get("code")));
    let reason = match RejectReason::from_failure(rules.classify(message)) {
        RejectReason::Other => RejectReason::from_failure(rules.classify(code)),
        known => known,
    };
    SubmitOutcome::Rejected(reason)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ProviderKind::*;
    use RejectReason::*;

    fn parse(kind: ProviderKind, status: u16, body: &str) -> SubmitOutcome {
        parse_submit(kind, status, body.as_bytes(), &FailureRules::defaults())
    }

    fn submitted(id: &str, used: Option<f64>, left: Option<f64>) -> SubmitOutcome {
        SubmitOutcome::Submitted(Submission {
            task_id: id.into(),
            credits_used: used,
            remaining_credits: left,
        })
    }

    #[test]
    fn maxapi_submission() {
        let body =
            r#"{"code":0,"msg":"ok","data":{"taskId":"9db7d1ed-d1e5-4d11-9f3a-61f653b905ad"}}"#;
        assert_eq!(
            parse(Maxapi, 200, body),
            submitted("9db7d1ed-d1e5-4d11-9f3a-61f653b905ad", None, None)
        );
        // A numeric string code is still 0.
        let body = r#"{"code":"0","data":{"taskId":"t1","extra":1},"new":true}"#;
        assert_eq!(parse(Maxapi, 200, body), submitted("t1", None, None));
    }

    #[test]
    fn maxapi_answers_without_a_usable_id() {
        for body in [
            r#"{"code":0,"msg":"ok","data":{}}"#,
            r#"{"code":0,"data":{"taskId":""}}"#,
            r#"{"code":0,"data":{"taskId":"a b"}}"#,
            r#"{"code":0,"data":{"taskId":".."}}"#,
            r#"{"code":0,"data":{"taskId":42}}"#,
            r#"{"code":0,"data":null}"#,
            "not json",
            "",
        ] {
            assert_eq!(parse(Maxapi, 200, body), SubmitOutcome::Unknown, "{body}");
        }
        let long = format!(r#"{{"code":0,"data":{{"taskId":"{}"}}}}"#, "x".repeat(129));
        assert_eq!(parse(Maxapi, 200, &long), SubmitOutcome::Unknown);
    }

    #[test]
    fn maxapi_rejections_by_msg() {
        let cases = [
            (
                200,
                r#"{"code":400,"msg":"content rejected by moderation"}"#,
                ContentModeration,
            ),
            (
                400,
                r#"{"code":400,"msg":"内容审核未通过"}"#,
                ContentModeration,
            ),
            (
                400,
                r#"{"code":400,"msg":"invalid parameter: ratio"}"#,
                InvalidParameters,
            ),
            (
                200,
                r#"{"code":400,"msg":"insufficient points"}"#,
                InsufficientCredits,
            ),
            (400, r#"{"code":400,"msg":"something odd"}"#, Other),
            (400, r#"{"code":400}"#, Other),
            (400, r#"{"msg":"Invalid model"}"#, InvalidParameters),
        ];
        for (status, body, reason) in cases {
            assert_eq!(
                parse(Maxapi, status, body),
                SubmitOutcome::Rejected(reason),
                "{body}"
            );
        }
    }

    #[test]
    fn maxapi_non_rejections() {
        for (status, body) in [
            (401, r#"{"code":401,"msg":"unauthorized"}"#),
            (200, r#"{"code":401,"msg":"unauthorized"}"#),
            (429, r#"{"code":429,"msg":"too many requests"}"#),
            (500, r#"{"code":500,"msg":"invalid state"}"#),
            (400, "{}"),
            (400, "<html>bad request</html>"),
        ] {
            assert_eq!(
                parse(Maxapi, status, body),
                SubmitOutcome::Unknown,
                "{body}"
            );
        }
    }

    #[test]
    fn apimall_submission_with_credits() {
        let body = r#"{"success":true,"data":{"task_id":"img_01HQ","status":"pending","credits_used":8,"remaining_credits":112.5},"request_id":"req_1"}"#;
        assert_eq!(
            parse(Apimall, 200, body),
            submitted("img_01HQ", Some(8.0), Some(112.5))
        );
        let body = r#"{"success":true,"data":{"task_id":"vid_1","credits_used":"3"}}"#;
        assert_eq!(
            parse(Apimall, 201, body),
            submitted("vid_1", Some(3.0), None)
        );
        let body = r#"{"success":true,"data":{"task_id":"aud_1","credits_used":null}}"#;
        assert_eq!(parse(Apimall, 200, body), submitted("aud_1", None, None));
    }

    #[test]
    fn apimall_rejections_by_message_then_code() {
        let cases = [
            (
                400,
                r#"{"success":false,"error":{"code":"invalid_request","message":"NSFW content detected"}}"#,
                ContentModeration,
            ),
            (
                400,
                r#"{"success":false,"error":{"code":"bad_request","message":"Invalid aspect ratio"}}"#,
                InvalidParameters,
            ),
            (
                402,
                r#"{"success":false,"error":{"code":"payment_required","message":"Insufficient credits"}}"#,
                InsufficientCredits,
            ),
            (
                400,
                r#"{"success":false,"error":{"code":"content_policy_violation","message":"Request refused"}}"#,
                ContentModeration,
            ),
            (
                422,
                r#"{"success":false,"error":{"code":"insufficient_credits"}}"#,
                InsufficientCredits,
            ),
            (
                400,
                r#"{"success":false,"error":{"code":"oops","message":"Request refused"}}"#,
                Other,
            ),
            (400, r#"{"success":false}"#, Other),
        ];
        for (status, body, reason) in cases {
            assert_eq!(
                parse(Apimall, status, body),
                SubmitOutcome::Rejected(reason),
                "{body}"
            );
        }
    }

    #[test]
    fn apimall_non_rejections() {
        for (status, body) in [
            (
                401,
                r#"{"success":false,"error":{"code":"unauthorized","message":"Invalid API key"}}"#,
            ),
            (
                403,
                r#"{"success":false,"error":{"code":"forbidden","message":"Invalid host"}}"#,
            ),
            (
                429,
                r#"{"success":false,"error":{"code":"rate_limited","message":"too many concurrent jobs"}}"#,
            ),
            (
                500,
                r#"{"success":false,"error":{"code":"internal","message":"invalid state"}}"#,
            ),
            (
                200,
                r#"{"success":false,"error":{"code":"x","message":"Invalid"}}"#,
            ),
            (200, r#"{"success":true,"data":{}}"#),
            (400, "plain text"),
        ] {
            assert_eq!(
                parse(Apimall, status, body),
                SubmitOutcome::Unknown,
                "{status} {body}"
            );
        }
    }
}
