//! apimall.ai adapter (docs/providers.md §2): get-task per kind, history listings, the account
//! balance and account webhooks. apimall reports failures as free text, which
//! [`FailureRules`] turns into the `reason` label.

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::wire::{self, lenient, lenient_object};
use super::{Balance, FailureClass, FailureRules, HistoryKind, HistoryPage, UpstreamFailure};
use crate::task::{Observation, RefusedCredits, Status};

pub(crate) const BALANCE_PATH: &str = "/api/v1/account/balances";

/// Documented bounds of the history `limit` parameter.
const HISTORY_LIMIT: std::ops::RangeInclusive<u32> = 1..=50;

/// The apimall adapter; carries the configured failure-reason rules.
#[derive(Debug, Clone)]
pub struct Apimall {
    rules: FailureRules,
}

/// `{success, data, request_id}` or `{success: false, error: {code, message}}`.
#[derive(Deserialize)]
#[serde(bound = "T: DeserializeOwned")]
struct Envelope<T> {
    #[serde(default, deserialize_with = "lenient")]
    success: Option<bool>,
    #[serde(default, deserialize_with = "lenient_object")]
    data: Option<T>,
    #[serde(default, deserialize_with = "lenient_object")]
    error: Option<WireError>,
}

#[derive(Deserialize)]
struct WireError {
    #[serde(default, deserialize_with = "lenient")]
    code: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    message: Option<String>,
}

/// A get-task `data` object; history items are the same shape minus some fields.
/// `output.resultUrls` and the URL fields are ignored: we never use results.
#[derive(Deserialize)]
struct WireTask {
    #[serde(default, deserialize_with = "lenient")]
    task_id: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    model: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    status: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    error_message: Option<String>,
    /// Numbers, or strings holding one; judged by `wire::credit_amount`.
    #[serde(default)]
    credits_used: Option<serde_json::Value>,
    #[serde(default)]
    credits_refunded: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "lenient")]
    created_at: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    updated_at: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    completed_at: Option<String>,
}

#[derive(Deserialize)]
struct WireHistory {
    /// Kept as raw values so that one malformed item costs that item, not the page.
    #[serde(default, deserialize_with = "lenient")]
    items: Option<Vec<serde_json::Value>>,
}

#[derive(Deserialize)]
struct WireBalance {
    #[serde(default, deserialize_with = "lenient")]
    credits: Option<f64>,
    #[serde(default, deserialize_with = "lenient")]
    api_credits: Option<f64>,
}

/// Documented statuses (docs/providers.md §3), matched ignoring ASCII case; anything else is
/// `unknown`.
const STATUSES: [(&str, Status); 5] = [
    ("pending", Status::Pending),
    ("processing", Status::Running),
    ("completed", Status::Succeeded),
    ("failed", Status::Failed),
    ("unknown", Status::Unknown),
];

fn status_of(raw: &str) -> Status {
    let raw = raw.trim();
    STATUSES
        .iter()
        .find(|(word, _)| word.eq_ignore_ascii_case(raw))
        .map_or(Status::Unknown, |&(_, status)| status)
}

/// An `error.code`: its `api_error` label and class. Only the documented codes are labels; the
/// list is not documented in full, so others are opaque (`other`, class from the HTTP status).
fn api_error_of(code: Option<&str>) -> (Option<FailureClass>, &'static str) {
    match code.map(str::trim) {
        Some(c) if c.eq_ignore_ascii_case("unauthorized") => {
            (Some(FailureClass::Unauthorized), "unauthorized")
        }
        Some(c) if c.eq_ignore_ascii_case("not_found") => {
            (Some(FailureClass::NotFound), "not_found")
        }
        _ => (None, "other"),
    }
}

/// Task ids carry their kind as a prefix; unprefixed ids are assumed to be images, the
/// default kind.
fn kind_of(task_id: &str) -> HistoryKind {
    if task_id.starts_with("vid_") {
        HistoryKind::Videos
    } else if task_id.starts_with("aud_") {
        HistoryKind::Audio
    } else {
        HistoryKind::Images
    }
}

fn clamp_limit(limit: u32) -> u32 {
    limit.clamp(*HISTORY_LIMIT.start(), *HISTORY_LIMIT.end())
}

impl Apimall {
    pub fn new(rules: FailureRules) -> Self {
        Apimall { rules }
    }

    pub fn task_path(&self, task_id: &str) -> String {
        format!(
            "/api/v1/{}/{}",
            kind_of(task_id).as_str(),
            wire::encode_path_segment(task_id)
        )
    }

    pub fn parse_task(
        &self,
        http_status: u16,
        body: &[u8],
    ) -> Result<Observation, UpstreamFailure> {
        let task: WireTask = unwrap_envelope(http_status, body)?;
        self.observation(task, Source::Task)
    }

    /// apimall documents no delivery body: accept the get-task envelope or its bare `data`.
    /// The registry confirms the task with a poll in any case.
    pub fn parse_webhook(&self, body: &[u8]) -> Result<Observation, UpstreamFailure> {
        let mut value: serde_json::Value = wire::decode(body)?;
        let task = match value.get_mut("data").map(serde_json::Value::take) {
            Some(data) if data.is_object() => data,
            _ => value,
        };
        let task: WireTask = wire::from_object(task)
            .ok_or_else(|| wire::invalid_response("webhook body is not a task"))?;
        self.observation(task, Source::Task)
    }

    /// `limit` is clamped to the documented 1–50, and so is the `limit` given to
    /// [`Apimall::parse_history`], so both agree on what a short page is.
    pub(crate) fn history_path(&self, kind: HistoryKind, page: u32, limit: u32) -> String {
        format!(
            "/api/v1/{}/history?page={}&limit={}",
            kind.as_str(),
            page.max(1),
            clamp_limit(limit)
        )
    }

    /// Items without an id or a status are skipped, but still count towards the page length:
    /// a malformed item must not end the listing early.
    pub fn parse_history(
        &self,
        http_status: u16,
        body: &[u8],
        limit: u32,
    ) -> Result<HistoryPage, UpstreamFailure> {
        let history: WireHistory = unwrap_envelope(http_status, body)?;
        let raw_items = history
            .items
            .ok_or_else(|| wire::invalid_response("missing data.items"))?;
        let is_last = raw_items.len() < clamp_limit(limit) as usize;
        let items = raw_items
            .into_iter()
            .filter_map(wire::from_object::<WireTask>)
            .filter_map(|task| self.observation(task, Source::History).ok())
            .collect();
        Ok(HistoryPage { items, is_last })
    }

    pub fn parse_balance(&self, http_status: u16, body: &[u8]) -> Result<Balance, UpstreamFailure> {
        let balance: WireBalance = unwrap_envelope(http_status, body)?;
        let finite = |v: Option<f64>| v.filter(|v| v.is_finite());
        Ok(Balance {
            credits: finite(balance.credits)
                .ok_or_else(|| wire::invalid_response("missing data.credits"))?,
            api_credits: finite(balance.api_credits)
                .ok_or_else(|| wire::invalid_response("missing data.api_credits"))?,
        })
    }

    fn observation(&self, task: WireTask, source: Source) -> Result<Observation, UpstreamFailure> {
        let task_id = wire::task_id(task.task_id, "task_id")?;
        let upstream_status = wire::required(task.status, "status")?;
        let status = status_of(&upstream_status);
        let mut observation = Observation::new(task_id, status, upstream_status.trim());
        observation.model = wire::model_name(task.model);
        // History items carry no error_message: their reason is not known until the get-task
        // poll, so it is left unset rather than guessed as `unspecified`.
        if status == Status::Failed && source == Source::Task {
            observation.failure_reason = Some(self.rules.classify(task.error_message.as_deref()));
        }
        observation.error_message = task
            .error_message
            .as_deref()
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(wire::provider_text);
        let used = wire::credit_amount(task.credits_used.as_ref());
        let refunded = wire::credit_amount(task.credits_refunded.as_ref());
        observation.refused_credits = RefusedCredits {
            used: used.is_err(),
            refunded: refunded.is_err(),
        };
        observation.credits_used = used.unwrap_or(None);
        observation.credits_refunded = refunded.unwrap_or(None);
        observation.created_at = wire::timestamp(task.created_at.as_deref());
        observation.updated_at = wire::timestamp(task.updated_at.as_deref());
        observation.completed_at = wire::timestamp(task.completed_at.as_deref());
        Ok(observation)
    }
}

/// Where a task object came from: history items are discovery hints, not full answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    Task,
    History,
}

/// The `data` of a successful answer, or the classified failure.
fn unwrap_envelope<T: DeserializeOwned>(
    http_status: u16,
    body: &[u8],
) -> Result<T, UpstreamFailure> {
    if !wire::is_success(http_status) {
        return Err(http_failure(http_status, body));
    }
    let envelope: Envelope<T> = wire::decode(body)?;
    let failed = match envelope.success {
        Some(success) => !success,
        None => envelope.error.is_some() && envelope.data.is_none(),
    };
    if failed {
        let error = envelope.error.unwrap_or(WireError {
            code: None,
            message: None,
        });
        let (class, label) = api_error_of(error.code.as_deref());
        return Err(UpstreamFailure {
            class: class.unwrap_or(FailureClass::ClientError),
            api_error: Some(label),
            message: wire::message(&error_context(None, &error), error.message.as_deref()),
        });
    }
    envelope
        .data
        .ok_or_else(|| wire::invalid_response("missing data"))
}

/// A non-2xx answer. The HTTP status decides, except that a generic 4xx is refined by the
/// error code when there is one (an HTTP 400 whose code is `not_found` is `NotFound`).
fn http_failure(http_status: u16, body: &[u8]) -> UpstreamFailure {
    let class = wire::class_for_http_status(http_status);
    let error = wire::decode::<Envelope<serde::de::IgnoredAny>>(body)
        .ok()
        .and_then(|e| e.error);
    match error {
        Some(error) => {
            let (code_class, label) = api_error_of(error.code.as_deref());
            UpstreamFailure {
                class: match code_class {
                    Some(code_class) if class == FailureClass::ClientError => code_class,
                    _ => class,
                },
                api_error: Some(label),
                message: wire::message(
                    &error_context(Some(http_status), &error),
                    error.message.as_deref(),
                ),
            }
        }
        None => UpstreamFailure {
            class,
            api_error: None,
            message: format!("HTTP {http_status}"),
        },
    }
}

/// `HTTP 404, not_found` / `error other_code`: the code is shown scrubbed and short, since it is
/// provider text too.
fn error_context(http_status: Option<u16>, error: &WireError) -> String {
    let code = error
        .code
        .as_deref()
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| crate::task::truncate(&wire::scrub(c), 64))
        .unwrap_or_else(|| "no code".to_string());
    match http_status {
        Some(http) => format!("HTTP {http}, {code}"),
        None => format!("error {code}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{FailureReason, MAX_TEXT_LEN};

    const ID: &str = "img_01HQ9M7XJQ7PZ3GQ9F6C5W3N2M";

    fn adapter() -> Apimall {
        Apimall::new(FailureRules::defaults())
    }

    fn task_body(status: &str, extra: &str) -> String {
        format!(
            r#"{{"success":true,"data":{{"task_id":"{ID}","model":"nano-banana","status":"{status}"{extra}}},"request_id":"req_1"}}"#
        )
    }

    fn parse(body: &str) -> Result<Observation, UpstreamFailure> {
        adapter().parse_task(200, body.as_bytes())
    }

    fn status(word: &str) -> Status {
        parse(&task_body(word, "")).unwrap().status
    }

    fn failed_reason(error_message: &str) -> Option<FailureReason> {
        parse(&task_body(
            "failed",
            &format!(r#","error_message":{error_message}"#),
        ))
        .unwrap()
        .failure_reason
    }

    fn failure(http_status: u16, body: &str) -> UpstreamFailure {
        adapter()
            .parse_task(http_status, body.as_bytes())
            .unwrap_err()
    }

    fn assert_invalid<T: std::fmt::Debug>(result: Result<T, UpstreamFailure>) {
        let failure = result.unwrap_err();
        assert_eq!(failure.class, FailureClass::InvalidResponse, "{failure:?}");
        assert_eq!(failure.api_error, Some("invalid_response"));
    }

    // --- status mapping, one test per documented word ---

    #[test]
    fn pending_is_pending() {
        assert_eq!(status("pending"), Status::Pending);
    }

    #[test]
    fn processing_is_running() {
        assert_eq!(status("processing"), Status::Running);
    }

    #[test]
    fn completed_is_succeeded() {
        assert_eq!(status("completed"), Status::Succeeded);
    }

    #[test]
    fn failed_is_failed() {
        assert_eq!(status("failed"), Status::Failed);
    }

    #[test]
    fn unknown_is_unknown() {
        assert_eq!(status("unknown"), Status::Unknown);
    }

    #[test]
    fn anything_else_is_unknown() {
        assert_eq!(status("cancelled"), Status::Unknown);
        assert_eq!(status("queued"), Status::Unknown);
        assert_eq!(status("Completed"), Status::Succeeded);
    }

    // --- failure reasons (error_message through the rules) ---

    #[test]
    fn moderation_message() {
        assert_eq!(
            failed_reason(r#""Content violates safety policy""#),
            Some(FailureReason::ContentModeration)
        );
    }

    #[test]
    fn invalid_parameters_message() {
        assert_eq!(
            failed_reason(r#""Invalid image size""#),
            Some(FailureReason::InvalidParameters)
        );
    }

    #[test]
    fn insufficient_credits_message() {
        assert_eq!(
            failed_reason(r#""Insufficient credits""#),
            Some(FailureReason::InsufficientCredits)
        );
    }

    #[test]
    fn timeout_message() {
        assert_eq!(
            failed_reason(r#""Upstream generation timed out""#),
            Some(FailureReason::Timeout)
        );
    }

    #[test]
    fn null_empty_or_absent_message_is_unspecified() {
        assert_eq!(failed_reason("null"), Some(FailureReason::Unspecified));
        assert_eq!(failed_reason(r#""""#), Some(FailureReason::Unspecified));
        assert_eq!(failed_reason(r#"" ""#), Some(FailureReason::Unspecified));
        assert_eq!(failed_reason("17"), Some(FailureReason::Unspecified));
        assert_eq!(
            parse(&task_body("failed", "")).unwrap().failure_reason,
            Some(FailureReason::Unspecified)
        );
    }

    #[test]
    fn unmatched_message_is_other() {
        assert_eq!(
            failed_reason(r#""Worker crashed""#),
            Some(FailureReason::Other)
        );
    }

    #[test]
    fn no_reason_unless_failed() {
        for word in ["pending", "processing", "completed", "unknown"] {
            let o = parse(&task_body(word, r#","error_message":"NSFW""#)).unwrap();
            assert_eq!(o.failure_reason, None, "{word}");
            assert_eq!(o.error_message.as_deref(), Some("NSFW"));
        }
    }

    #[test]
    fn configured_rules_are_used() {
        let rules = FailureRules::new(&[("timeout".into(), "(?i)worker crashed".into())]).unwrap();
        let o = Apimall::new(rules)
            .parse_task(
                200,
                task_body("failed", r#","error_message":"Worker crashed""#).as_bytes(),
            )
            .unwrap();
        assert_eq!(o.failure_reason, Some(FailureReason::Timeout));
    }

    #[test]
    fn error_message_is_scrubbed_and_truncated() {
        let o = parse(&task_body(
            "failed",
            &format!(r#","error_message":"{}""#, "moderation ".repeat(100)),
        ))
        .unwrap();
        assert!(o.error_message.unwrap().len() <= MAX_TEXT_LEN);
        let o = parse(&task_body(
            "failed",
            r#","error_message":"bad key Bearer sk-abcdefgh12345678""#,
        ))
        .unwrap();
        assert!(!o.error_message.unwrap().contains("12345678"));
    }

    // --- credits and times ---

    #[test]
    fn fractional_credits() {
        let o = parse(&task_body(
            "failed",
            r#","credits_used":2.5,"credits_refunded":0.75"#,
        ))
        .unwrap();
        assert_eq!(o.credits_used, Some(2.5));
        assert_eq!(o.credits_refunded, Some(0.75));
    }

    #[test]
    fn bad_credits_are_absent_and_refused() {
        for value in [
            "-1",
            "-0.5",
            "\"eight\"",
            "true",
            "{}",
            "1e400",
            "1e300",
            "1e10",
        ] {
            let body = task_body(
                "completed",
                &format!(r#","credits_used":{value},"credits_refunded":0"#),
            );
            match parse(&body) {
                Ok(o) => {
                    assert_eq!(o.credits_used, None, "{value}");
                    assert_eq!(o.credits_refunded, Some(0.0), "{value}");
                    let refused = RefusedCredits {
                        used: true,
                        refunded: false,
                    };
                    assert_eq!(o.refused_credits, refused, "{value}");
                }
                // A number beyond f64 is not JSON serde can represent.
                Err(f) => assert_eq!((value, f.class), ("1e400", FailureClass::InvalidResponse)),
            }
        }
        let o = parse(&task_body("completed", r#","credits_used":null"#)).unwrap();
        assert_eq!(o.credits_used, None);
        assert_eq!(o.refused_credits, RefusedCredits::default());
    }

    #[test]
    fn numeric_string_credits_are_numbers() {
        let o = parse(&task_body(
            "failed",
            r#","credits_used":"8","credits_refunded":" 2.5""#,
        ))
        .unwrap();
        assert_eq!((o.credits_used, o.credits_refunded), (Some(8.0), Some(2.5)));
        assert_eq!(o.refused_credits, RefusedCredits::default());
    }

    #[test]
    fn completed_at_may_be_null() {
        let o = parse(&task_body(
            "processing",
            r#","created_at":"2026-03-12T09:30:00.000Z","updated_at":"2026-03-12T09:30:05.000Z","completed_at":null"#,
        ))
        .unwrap();
        assert_eq!(o.created_at, Some(1_773_307_800_000));
        assert_eq!(o.updated_at, Some(1_773_307_805_000));
        assert_eq!(o.completed_at, None);
    }

    #[test]
    fn unknown_and_wrong_typed_fields_are_ignored() {
        let o = parse(&task_body(
            "completed",
            r#","output":{"resultUrls":[1,{"x":[]}]},"model2":1,"created_at":5,"credits_used":{"a":1},"extra":[[[]]]"#,
        ))
        .unwrap();
        assert_eq!(o.status, Status::Succeeded);
        assert_eq!(o.created_at, None);
        assert_eq!(o.credits_used, None);
        let o = parse(&format!(
            r#"{{"success":true,"data":{{"task_id":"{ID}","status":"pending","model":["m"]}}}}"#
        ))
        .unwrap();
        assert_eq!(o.model, None);
    }

    // --- required fields and undecodable bodies ---

    #[test]
    fn missing_required_fields_are_invalid() {
        assert_invalid(parse(r#"{"success":true}"#));
        assert_invalid(parse(r#"{"success":true,"data":null}"#));
        assert_invalid(parse(r#"{"success":true,"data":[]}"#));
        assert_invalid(parse(r#"{"success":true,"data":{"status":"completed"}}"#));
        assert_invalid(parse(r#"{"success":true,"data":{"task_id":"img_1"}}"#));
        assert_invalid(parse(
            r#"{"success":true,"data":{"task_id":" ","status":"failed"}}"#,
        ));
    }

    #[test]
    fn undecodable_bodies_are_invalid() {
        assert_invalid(parse(""));
        assert_invalid(parse("null"));
        assert_invalid(parse("{\"success\":tru"));
        assert_invalid(adapter().parse_task(200, b"{\"success\":true,\"data\":\"\xc3\x28\"}"));
        let deep = format!(
            r#"{{"success":true,"data":{}}}"#,
            "{\"a\":".repeat(80) + "1" + &"}".repeat(80)
        );
        let f = parse(&deep).unwrap_err();
        assert!(f.message.contains("nested"), "{}", f.message);
    }

    // --- API errors ---

    #[test]
    fn error_envelope_in_http_200() {
        let f = failure(
            200,
            r#"{"success":false,"error":{"code":"not_found","message":"Task not found"},"request_id":"req_1"}"#,
        );
        assert_eq!(
            (f.class, f.api_error),
            (FailureClass::NotFound, Some("not_found"))
        );
        assert_eq!(f.message, "error not_found: Task not found");
        let f = failure(
            200,
            r#"{"success":false,"error":{"code":"unauthorized","message":"bad key"}}"#,
        );
        assert_eq!(
            (f.class, f.api_error),
            (FailureClass::Unauthorized, Some("unauthorized"))
        );
        let f = failure(
            200,
            r#"{"success":false,"error":{"code":"quota_exceeded"}}"#,
        );
        assert_eq!(
            (f.class, f.api_error),
            (FailureClass::ClientError, Some("other"))
        );
        assert_eq!(f.message, "error quota_exceeded");
        let f = failure(200, r#"{"success":false}"#);
        assert_eq!(
            (f.class, f.api_error),
            (FailureClass::ClientError, Some("other"))
        );
        let f = failure(200, r#"{"error":{"code":"not_found"}}"#);
        assert_eq!(f.class, FailureClass::NotFound);
    }

    #[test]
    fn non_2xx_without_envelope() {
        use FailureClass::*;
        for (http, class) in [
            (400, ClientError),
            (401, Unauthorized),
            (403, Unauthorized),
            (404, NotFound),
            (429, RateLimited),
            (500, ServerError),
            (504, ServerError),
        ] {
            for body in ["", "Forbidden", r#"{"success":false}"#, "{"] {
                let f = failure(http, body);
                assert_eq!((f.class, f.api_error), (class, None), "{http} {body}");
                assert_eq!(f.message, format!("HTTP {http}"));
            }
        }
    }

    #[test]
    fn non_2xx_with_envelope() {
        let f = failure(
            404,
            r#"{"success":false,"error":{"code":"not_found","message":"Task not found"},"request_id":"r"}"#,
        );
        assert_eq!(
            (f.class, f.api_error),
            (FailureClass::NotFound, Some("not_found"))
        );
        assert_eq!(f.message, "HTTP 404, not_found: Task not found");
        let f = failure(
            401,
            r#"{"success":false,"error":{"code":"unauthorized","message":"Invalid API key"}}"#,
        );
        assert_eq!(
            (f.class, f.api_error),
            (FailureClass::Unauthorized, Some("unauthorized"))
        );
        let f = failure(400, r#"{"success":false,"error":{"code":"not_found"}}"#);
        assert_eq!(
            (f.class, f.api_error),
            (FailureClass::NotFound, Some("not_found"))
        );
        let f = failure(
            400,
            r#"{"success":false,"error":{"code":"invalid_request","message":"limit"}}"#,
        );
        assert_eq!(
            (f.class, f.api_error),
            (FailureClass::ClientError, Some("other"))
        );
        let f = failure(
            429,
            r#"{"success":false,"error":{"code":"rate_limited","message":"too many concurrent jobs"}}"#,
        );
        assert_eq!(
            (f.class, f.api_error),
            (FailureClass::RateLimited, Some("other"))
        );
        let f = failure(500, r#"{"success":false,"error":{"code":"not_found"}}"#);
        assert_eq!(
            (f.class, f.api_error),
            (FailureClass::ServerError, Some("not_found"))
        );
    }

    #[test]
    fn failure_messages_carry_no_secrets() {
        let f = failure(
            401,
            r#"{"success":false,"error":{"code":"unauthorized","message":"key sk-test-abcdefghijklmnop is invalid"}}"#,
        );
        assert!(!f.message.contains("abcdefghijklmnop"), "{}", f.message);
    }

    // --- paths ---

    #[test]
    fn task_path_follows_the_id_prefix() {
        let a = adapter();
        assert_eq!(a.task_path(ID), format!("/api/v1/images/{ID}"));
        assert_eq!(a.task_path("vid_1"), "/api/v1/videos/vid_1");
        assert_eq!(a.task_path("aud_1"), "/api/v1/audio/aud_1");
        assert_eq!(a.task_path("other"), "/api/v1/images/other");
        assert_eq!(a.task_path("vid_a/b c?"), "/api/v1/videos/vid_a%2Fb%20c%3F");
    }

    #[test]
    fn history_path_clamps_to_documented_bounds() {
        let a = adapter();
        assert_eq!(
            a.history_path(HistoryKind::Images, 1, 20),
            "/api/v1/images/history?page=1&limit=20"
        );
        assert_eq!(
            a.history_path(HistoryKind::Audio, 0, 500),
            "/api/v1/audio/history?page=1&limit=50"
        );
        assert_eq!(
            a.history_path(HistoryKind::Videos, 3, 0),
            "/api/v1/videos/history?page=3&limit=1"
        );
    }

    // --- history ---

    fn history_body(items: &[String]) -> String {
        format!(
            r#"{{"success":true,"data":{{"items":[{}],"page":1,"limit":2}},"request_id":"r"}}"#,
            items.join(",")
        )
    }

    fn item(id: &str, status: &str) -> String {
        format!(r#"{{"task_id":"{id}","status":"{status}","model":"m","credits_used":1.5}}"#)
    }

    #[test]
    fn history_page_length_decides_is_last() {
        let a = adapter();
        let full = history_body(&[item("img_1", "completed"), item("img_2", "pending")]);
        let page = a.parse_history(200, full.as_bytes(), 2).unwrap();
        assert_eq!(page.items.len(), 2);
        assert!(!page.is_last);
        assert!(a.parse_history(200, full.as_bytes(), 3).unwrap().is_last);
        let empty = history_body(&[]);
        let page = a.parse_history(200, empty.as_bytes(), 20).unwrap();
        assert!(page.items.is_empty() && page.is_last);
    }

    #[test]
    fn malformed_history_items_are_skipped_but_counted() {
        let body = history_body(&[
            item("img_1", "failed"),
            "\"junk\"".to_string(),
            r#"{"task_id":"img_3"}"#.to_string(),
        ]);
        let page = adapter().parse_history(200, body.as_bytes(), 3).unwrap();
        assert_eq!(page.items.len(), 1);
        assert!(!page.is_last);
        let o = &page.items[0];
        assert_eq!(o.status, Status::Failed);
        assert_eq!(o.failure_reason, None, "history items carry no reason");
        assert_eq!(o.credits_used, Some(1.5));
    }

    #[test]
    fn history_errors() {
        let a = adapter();
        assert_invalid(a.parse_history(200, br#"{"success":true,"data":{}}"#, 20));
        assert_invalid(a.parse_history(200, br#"{"success":true,"data":{"items":{}}}"#, 20));
        assert_invalid(a.parse_history(200, b"nope", 20));
        let f = a.parse_history(429, b"", 20).unwrap_err();
        assert_eq!((f.class, f.api_error), (FailureClass::RateLimited, None));
        let f = a
            .parse_history(
                200,
                br#"{"success":false,"error":{"code":"unauthorized"}}"#,
                20,
            )
            .unwrap_err();
        assert_eq!(f.class, FailureClass::Unauthorized);
    }

    // --- balance ---

    #[test]
    fn balance_reads_both_amounts() {
        let b = adapter()
            .parse_balance(
                200,
                br#"{"success":true,"data":{"credits":120.5,"api_credits":99},"request_id":"r"}"#,
            )
            .unwrap();
        assert_eq!(
            b,
            Balance {
                credits: 120.5,
                api_credits: 99.0
            }
        );
    }

    #[test]
    fn balance_errors() {
        let a = adapter();
        assert_invalid(a.parse_balance(200, br#"{"success":true,"data":{"credits":1}}"#));
        assert_invalid(a.parse_balance(
            200,
            br#"{"success":true,"data":{"credits":"1","api_credits":1}}"#,
        ));
        let f = a.parse_balance(403, b"").unwrap_err();
        assert_eq!((f.class, f.api_error), (FailureClass::Unauthorized, None));
    }

    // --- webhooks ---

    #[test]
    fn webhook_accepts_envelope_or_data() {
        let a = adapter();
        let envelope = task_body("failed", r#","error_message":"NSFW content""#);
        let from_envelope = a.parse_webhook(envelope.as_bytes()).unwrap();
        let data = format!(
            r#"{{"task_id":"{ID}","model":"nano-banana","status":"failed","error_message":"NSFW content"}}"#
        );
        let from_data = a.parse_webhook(data.as_bytes()).unwrap();
        assert_eq!(from_envelope, from_data);
        assert_eq!(
            from_data.failure_reason,
            Some(FailureReason::ContentModeration)
        );
        let event = format!(r#"{{"event":"job.failed","data":{data}}}"#);
        assert_eq!(a.parse_webhook(event.as_bytes()).unwrap(), from_data);
    }

    #[test]
    fn webhook_without_task_is_invalid() {
        let a = adapter();
        assert_invalid(a.parse_webhook(b"[]"));
        assert_invalid(a.parse_webhook(br#"{"success":true,"data":{"status":"failed"}}"#));
        assert_invalid(a.parse_webhook(br#"{"success":false,"error":{"code":"not_found"}}"#));
        assert_invalid(a.parse_webhook(b"\xff"));
    }
}
