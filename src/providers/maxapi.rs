//! maxapi.io adapter (docs/providers.md §1): `GET /api/v1/task/{taskId}` and the `callBackUrl`
//! callback, whose body is the same envelope. maxapi has no history, balance or credits.

use serde::Deserialize;

use super::wire::{self, lenient, lenient_object};
use super::{FailureClass, UpstreamFailure};
use crate::task::{FailureReason, Observation, Status};

/// The maxapi adapter. Stateless: maxapi needs no per-provider configuration.
#[derive(Debug, Clone, Default)]
pub struct Maxapi {}

/// `{code, msg, data}`. Every field is lenient (see `wire::lenient`); what is required is
/// checked by hand so that a missing field yields a precise message.
#[derive(Deserialize)]
struct Envelope {
    /// A number in every example; a numeric string is accepted too.
    #[serde(default, deserialize_with = "lenient")]
    code: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "lenient")]
    msg: Option<String>,
    #[serde(default, deserialize_with = "lenient_object")]
    data: Option<WireTask>,
}

impl Envelope {
    /// The envelope `code`, when it is an integer (or a string holding one).
    fn code(&self) -> Option<i64> {
        let code = self.code.as_ref()?;
        code.as_i64()
            .or_else(|| code.as_str().and_then(|s| s.trim().parse().ok()))
    }
}

#[derive(Deserialize)]
struct WireTask {
    #[serde(rename = "taskId", default, deserialize_with = "lenient")]
    task_id: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    status: Option<String>,
    #[serde(default, deserialize_with = "lenient_object")]
    input: Option<WireInput>,
    #[serde(default, deserialize_with = "lenient")]
    failure_reason: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    created_at: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    updated_at: Option<String>,
}

/// The echo of the submitted input; only the model name matters to us.
#[derive(Deserialize)]
struct WireInput {
    #[serde(default, deserialize_with = "lenient")]
    model: Option<String>,
}

/// Documented statuses (docs/providers.md §3). Matched ignoring ASCII case; anything else is
/// `unknown`, which keeps the task polled until its max age.
const STATUSES: [(&str, Status); 7] = [
    ("PENDING", Status::Pending),
    ("PROCESSING", Status::Running),
    ("SUBMITTED", Status::Running),
    ("SUCCESS", Status::Succeeded),
    ("FAILURE", Status::Failed),
    ("TIMEOUT", Status::TimedOut),
    ("CANCELLED", Status::Cancelled),
];

/// Documented `failure_reason` values (docs/providers.md §4).
const REASONS: [(&str, FailureReason); 3] = [
    ("CONTENT_MODERATION", FailureReason::ContentModeration),
    ("INVALID_PARAMETERS", FailureReason::InvalidParameters),
    ("INSUFFICIENT_POINTS", FailureReason::InsufficientCredits),
];

fn status_of(raw: &str) -> Status {
    let raw = raw.trim();
    STATUSES
        .iter()
        .find(|(word, _)| word.eq_ignore_ascii_case(raw))
        .map_or(Status::Unknown, |&(_, status)| status)
}

/// The reason is set for terminal non-success statuses only. `TIMEOUT` and `CANCELLED` carry
/// their reason in the status itself; for `FAILURE`, a null, absent or blank `failure_reason`
/// means the provider gave none.
fn failure_reason_of(status: Status, raw: Option<&str>) -> Option<FailureReason> {
    match status {
        Status::Failed => Some(match raw.map(str::trim).filter(|r| !r.is_empty()) {
            None => FailureReason::Unspecified,
            Some(raw) => REASONS
                .iter()
                .find(|(word, _)| word.eq_ignore_ascii_case(raw))
                .map_or(FailureReason::Other, |&(_, reason)| reason),
        }),
        Status::TimedOut => Some(FailureReason::Timeout),
        Status::Cancelled => Some(FailureReason::Cancelled),
        _ => None,
    }
}

/// Whether an error `msg` says the task does not exist. maxapi documents no code for an unknown
/// task, and its texts may be Chinese.
fn says_not_found(msg: Option<&str>) -> bool {
    let Some(msg) = msg else { return false };
    let msg = msg.to_lowercase();
    ["not found", "not exist", "no such", "不存在", "未找到"]
        .iter()
        .any(|needle| msg.contains(needle))
}

/// A non-zero envelope `code`: its `api_error` label and what it means for the poller. Codes
/// other than the documented 400 and 401 are read like the HTTP status of the same number.
fn envelope_error(code: i64, msg: Option<&str>) -> (FailureClass, &'static str) {
    let label = match code {
        400 => "400",
        401 => "401",
        _ => "other",
    };
    let class = if code == 401 || code == 403 {
        FailureClass::Unauthorized
    } else if code == 404 || says_not_found(msg) {
        FailureClass::NotFound
    } else if code == 429 {
        FailureClass::RateLimited
    } else if (500..600).contains(&code) {
        FailureClass::ServerError
    } else {
        FailureClass::ClientError
    };
    (class, label)
}

impl Maxapi {
    pub fn new() -> Self {
        Maxapi {}
    }

    pub fn task_path(&self, task_id: &str) -> String {
        format!("/api/v1/task/{}", wire::encode_path_segment(task_id))
    }

    pub fn parse_task(
        &self,
        http_status: u16,
        body: &[u8],
    ) -> Result<Observation, UpstreamFailure> {
        if !wire::is_success(http_status) {
            return Err(http_failure(http_status, body));
        }
        let envelope: Envelope = wire::decode(body)?;
        match envelope.code() {
            Some(code) if code != 0 => {
                let (class, label) = envelope_error(code, envelope.msg.as_deref());
                Err(UpstreamFailure {
                    class,
                    api_error: Some(label),
                    message: wire::message(&format!("code {code}"), envelope.msg.as_deref()),
                })
            }
            _ => observation(envelope.data),
        }
    }

    /// The callback body is the query envelope; its outer `code` is always 0, so only `data`
    /// is read.
    pub fn parse_webhook(&self, body: &[u8]) -> Result<Observation, UpstreamFailure> {
        let envelope: Envelope = wire::decode(body)?;
        observation(envelope.data)
    }
}

/// A non-2xx answer. The HTTP status decides, except that a generic 4xx is refined by the
/// envelope when there is one (an HTTP 400 whose body says "task not found" is `NotFound`).
fn http_failure(http_status: u16, body: &[u8]) -> UpstreamFailure {
    let class = wire::class_for_http_status(http_status);
    let context = format!("HTTP {http_status}");
    let envelope = wire::decode::<Envelope>(body)
        .ok()
        .and_then(|e| Some((e.code().filter(|&c| c != 0)?, e.msg)));
    match envelope {
        Some((code, msg)) => {
            let (envelope_class, label) = envelope_error(code, msg.as_deref());
            UpstreamFailure {
                class: if class == FailureClass::ClientError {
                    envelope_class
                } else {
                    class
                },
                api_error: Some(label),
                message: wire::message(&format!("{context}, code {code}"), msg.as_deref()),
            }
        }
        None => UpstreamFailure {
            class,
            api_error: None,
            message: context,
        },
    }
}

fn observation(data: Option<WireTask>) -> Result<Observation, UpstreamFailure> {
    let data = data.ok_or_else(|| wire::invalid_response("missing data"))?;
    let task_id = wire::task_id(data.task_id, "data.taskId")?;
    let upstream_status = wire::required(data.status, "data.status")?;
    let status = status_of(&upstream_status);
    let mut observation = Observation::new(task_id, status, upstream_status.trim());
    observation.model = wire::model_name(data.input.and_then(|input| input.model));
    observation.failure_reason = failure_reason_of(status, data.failure_reason.as_deref());
    observation.created_at = wire::timestamp(data.created_at.as_deref());
    observation.updated_at = wire::timestamp(data.updated_at.as_deref());
    Ok(observation)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::MAX_TEXT_LEN;

    const ID: &str = "9db7d1ed-d1e5-4d11-9f3a-61f653b905ad";

    fn task_body(status: &str, extra: &str) -> String {
        format!(
            r#"{{"code":0,"msg":"ok","data":{{"taskId":"{ID}","status":"{status}","input":{{"model":"nano-banana"}}{extra}}}}}"#
        )
    }

    fn parse(body: &str) -> Result<Observation, UpstreamFailure> {
        Maxapi::new().parse_task(200, body.as_bytes())
    }

    fn status(word: &str) -> Status {
        parse(&task_body(word, "")).unwrap().status
    }

    fn reason(word: &str, extra: &str) -> Option<FailureReason> {
        parse(&task_body(word, extra)).unwrap().failure_reason
    }

    fn failure(http_status: u16, body: &str) -> UpstreamFailure {
        Maxapi::new()
            .parse_task(http_status, body.as_bytes())
            .unwrap_err()
    }

    // --- status mapping, one test per documented word ---

    #[test]
    fn pending_is_pending() {
        assert_eq!(status("PENDING"), Status::Pending);
    }

    #[test]
    fn processing_is_running() {
        assert_eq!(status("PROCESSING"), Status::Running);
    }

    #[test]
    fn submitted_is_running() {
        assert_eq!(status("SUBMITTED"), Status::Running);
    }

    #[test]
    fn success_is_succeeded() {
        assert_eq!(status("SUCCESS"), Status::Succeeded);
    }

    #[test]
    fn failure_is_failed() {
        assert_eq!(status("FAILURE"), Status::Failed);
    }

    #[test]
    fn timeout_is_timed_out() {
        assert_eq!(status("TIMEOUT"), Status::TimedOut);
    }

    #[test]
    fn cancelled_is_cancelled() {
        assert_eq!(status("CANCELLED"), Status::Cancelled);
    }

    #[test]
    fn anything_else_is_unknown() {
        assert_eq!(status("QUEUED"), Status::Unknown);
        assert_eq!(status("CANCELED"), Status::Unknown);
        let o = parse(&task_body("QUEUED", "")).unwrap();
        assert_eq!(o.upstream_status, "QUEUED");
        assert_eq!(o.failure_reason, None);
    }

    #[test]
    fn status_ignores_ascii_case() {
        assert_eq!(status("success"), Status::Succeeded);
    }

    // --- failure reasons ---

    #[test]
    fn content_moderation_reason() {
        assert_eq!(
            reason("FAILURE", r#","failure_reason":"CONTENT_MODERATION""#),
            Some(FailureReason::ContentModeration)
        );
    }

    #[test]
    fn invalid_parameters_reason() {
        assert_eq!(
            reason("FAILURE", r#","failure_reason":"INVALID_PARAMETERS""#),
            Some(FailureReason::InvalidParameters)
        );
    }

    #[test]
    fn insufficient_points_reason() {
        assert_eq!(
            reason("FAILURE", r#","failure_reason":"INSUFFICIENT_POINTS""#),
            Some(FailureReason::InsufficientCredits)
        );
    }

    #[test]
    fn null_reason_is_unspecified() {
        assert_eq!(
            reason("FAILURE", r#","failure_reason":null"#),
            Some(FailureReason::Unspecified)
        );
    }

    #[test]
    fn absent_reason_is_unspecified() {
        assert_eq!(reason("FAILURE", ""), Some(FailureReason::Unspecified));
    }

    #[test]
    fn wrong_typed_or_blank_reason_is_unspecified() {
        assert_eq!(
            reason("FAILURE", r#","failure_reason":42"#),
            Some(FailureReason::Unspecified)
        );
        assert_eq!(
            reason("FAILURE", r#","failure_reason":"""#),
            Some(FailureReason::Unspecified)
        );
    }

    #[test]
    fn unknown_reason_is_other() {
        assert_eq!(
            reason("FAILURE", r#","failure_reason":"GPU_ON_FIRE""#),
            Some(FailureReason::Other)
        );
    }

    #[test]
    fn timeout_status_is_timeout_reason() {
        assert_eq!(
            reason("TIMEOUT", r#","failure_reason":null"#),
            Some(FailureReason::Timeout)
        );
    }

    #[test]
    fn cancelled_status_is_cancelled_reason() {
        assert_eq!(
            reason("CANCELLED", r#","failure_reason":"CONTENT_MODERATION""#),
            Some(FailureReason::Cancelled)
        );
    }

    #[test]
    fn no_reason_unless_failed() {
        for word in ["PENDING", "PROCESSING", "SUBMITTED", "SUCCESS", "WHATEVER"] {
            assert_eq!(
                reason(word, r#","failure_reason":"CONTENT_MODERATION""#),
                None,
                "{word}"
            );
        }
    }

    // --- fields ---

    #[test]
    fn reads_every_field_and_no_credits() {
        let o = parse(&task_body(
            "SUCCESS",
            r#","created_at":"2026-02-10T21:54:46.686768Z","updated_at":"2026-02-10T21:55:04.039815Z""#,
        ))
        .unwrap();
        assert_eq!(o.task_id, ID);
        assert_eq!(o.model.as_deref(), Some("nano-banana"));
        assert_eq!(o.created_at, Some(1_770_760_486_686));
        assert_eq!(o.updated_at, Some(1_770_760_504_039));
        assert_eq!(o.completed_at, None);
        assert_eq!(o.credits_used, None);
        assert_eq!(o.credits_refunded, None);
        assert_eq!(o.error_message, None);
    }

    #[test]
    fn unknown_and_wrong_typed_optional_fields_are_ignored() {
        let o = parse(&task_body(
            "PENDING",
            r#","created_at":12345,"updated_at":"not a time","result":7,"progress":{"a":[1,2]},"newField":true"#,
        ))
        .unwrap();
        assert_eq!(o.status, Status::Pending);
        assert_eq!(o.created_at, None);
        assert_eq!(o.updated_at, None);

        let o = parse(&format!(
            r#"{{"code":0,"data":{{"taskId":"{ID}","status":"PENDING","input":"nano"}}}}"#
        ))
        .unwrap();
        assert_eq!(o.model, None);
        let o = parse(&format!(
            r#"{{"code":0,"data":{{"taskId":"{ID}","status":"PENDING","input":{{"model":5}}}}}}"#
        ))
        .unwrap();
        assert_eq!(o.model, None);
    }

    #[test]
    fn missing_code_with_a_task_is_accepted() {
        let o = parse(&format!(
            r#"{{"data":{{"taskId":"{ID}","status":"PENDING"}}}}"#
        ))
        .unwrap();
        assert_eq!(o.status, Status::Pending);
    }

    #[test]
    fn long_status_is_truncated() {
        let word = "X".repeat(MAX_TEXT_LEN * 4);
        let o = parse(&task_body(&word, "")).unwrap();
        assert_eq!(o.status, Status::Unknown);
        assert_eq!(o.upstream_status.len(), MAX_TEXT_LEN);
    }

    // --- required fields and undecodable bodies ---

    fn assert_invalid(result: Result<Observation, UpstreamFailure>) {
        let failure = result.unwrap_err();
        assert_eq!(failure.class, FailureClass::InvalidResponse, "{failure:?}");
        assert_eq!(failure.api_error, Some("invalid_response"));
    }

    #[test]
    fn missing_required_fields_are_invalid() {
        assert_invalid(parse(r#"{"code":0,"msg":"ok"}"#));
        assert_invalid(parse(r#"{"code":0,"data":null}"#));
        assert_invalid(parse(r#"{"code":0,"data":{"status":"SUCCESS"}}"#));
        assert_invalid(parse(r#"{"code":0,"data":{"taskId":"a"}}"#));
        assert_invalid(parse(
            r#"{"code":0,"data":{"taskId":"","status":"SUCCESS"}}"#,
        ));
        assert_invalid(parse(
            r#"{"code":0,"data":{"taskId":7,"status":"SUCCESS"}}"#,
        ));
        assert_invalid(parse(
            r#"{"code":0,"data":{"taskId":"a","status":["SUCCESS"]}}"#,
        ));
        let long_id = "a".repeat(MAX_TEXT_LEN + 1);
        assert_invalid(parse(&format!(
            r#"{{"code":0,"data":{{"taskId":"{long_id}","status":"SUCCESS"}}}}"#
        )));
    }

    #[test]
    fn undecodable_bodies_are_invalid() {
        assert_invalid(parse(""));
        assert_invalid(parse("<html>502</html>"));
        assert_invalid(parse(r#"{"code":0,"data":"#));
        assert_invalid(parse("[1,2,3]"));
        assert_invalid(parse("\"ok\""));
        assert_invalid(Maxapi::new().parse_task(200, b"{\"code\":0,\"msg\":\"\xff\xfe\"}"));
    }

    #[test]
    fn deep_nesting_is_rejected_before_decoding() {
        let deep = format!(
            r#"{{"code":0,"data":{{"taskId":"a","status":"SUCCESS","input":{}1{}}}}}"#,
            "[".repeat(70),
            "]".repeat(70)
        );
        let failure = parse(&deep).unwrap_err();
        assert_eq!(failure.class, FailureClass::InvalidResponse);
        assert!(failure.message.contains("nested"), "{}", failure.message);
        // Just inside the bound (64 levels in total) is fine.
        let ok = format!(
            r#"{{"code":0,"data":{{"taskId":"a","status":"SUCCESS","extra":{}1{}}}}}"#,
            "[".repeat(62),
            "]".repeat(62)
        );
        assert!(parse(&ok).is_ok());
    }

    // --- API errors in an HTTP 200 ---

    #[test]
    fn code_400_is_client_error() {
        let f = failure(200, r#"{"code":400,"msg":"参数错误: ratio"}"#);
        assert_eq!(f.class, FailureClass::ClientError);
        assert_eq!(f.api_error, Some("400"));
        assert_eq!(f.message, "code 400: 参数错误: ratio");
    }

    #[test]
    fn code_401_is_unauthorized() {
        let f = failure(200, r#"{"code":401,"msg":"unauthorized"}"#);
        assert_eq!(f.class, FailureClass::Unauthorized);
        assert_eq!(f.api_error, Some("401"));
    }

    #[test]
    fn code_404_is_not_found() {
        let f = failure(200, r#"{"code":404,"msg":"oops"}"#);
        assert_eq!(f.class, FailureClass::NotFound);
        assert_eq!(f.api_error, Some("other"));
    }

    #[test]
    fn not_found_message_is_not_found() {
        let f = failure(200, r#"{"code":400,"msg":"Task not found"}"#);
        assert_eq!(f.class, FailureClass::NotFound);
        assert_eq!(f.api_error, Some("400"));
        let f = failure(200, r#"{"code":400,"msg":"任务不存在"}"#);
        assert_eq!(f.class, FailureClass::NotFound);
    }

    #[test]
    fn other_codes_are_other() {
        let f = failure(200, r#"{"code":1001,"msg":"weird"}"#);
        assert_eq!(
            (f.class, f.api_error),
            (FailureClass::ClientError, Some("other"))
        );
        let f = failure(200, r#"{"code":500,"msg":"internal"}"#);
        assert_eq!(
            (f.class, f.api_error),
            (FailureClass::ServerError, Some("other"))
        );
        let f = failure(200, r#"{"code":429}"#);
        assert_eq!(
            (f.class, f.api_error),
            (FailureClass::RateLimited, Some("other"))
        );
        let f = failure(200, r#"{"code":"400","msg":"bad"}"#);
        assert_eq!(
            (f.class, f.api_error),
            (FailureClass::ClientError, Some("400"))
        );
    }

    // --- non-2xx answers ---

    #[test]
    fn non_2xx_without_body() {
        use FailureClass::*;
        for (http, class) in [
            (400, ClientError),
            (401, Unauthorized),
            (403, Unauthorized),
            (404, NotFound),
            (422, ClientError),
            (429, RateLimited),
            (500, ServerError),
            (502, ServerError),
            (503, ServerError),
            (301, InvalidResponse),
        ] {
            for body in ["", "<html>Bad Gateway</html>", r#"{"detail":"x"}"#, "{"] {
                let f = failure(http, body);
                assert_eq!(f.class, class, "{http} {body}");
                assert_eq!(f.api_error, None, "{http} {body}");
                assert_eq!(f.message, format!("HTTP {http}"));
            }
        }
    }

    #[test]
    fn non_2xx_with_envelope() {
        let f = failure(400, r#"{"code":400,"msg":"prompt rejected"}"#);
        assert_eq!(
            (f.class, f.api_error),
            (FailureClass::ClientError, Some("400"))
        );
        assert_eq!(f.message, "HTTP 400, code 400: prompt rejected");
        let f = failure(401, r#"{"code":401,"msg":"unauthorized"}"#);
        assert_eq!(
            (f.class, f.api_error),
            (FailureClass::Unauthorized, Some("401"))
        );
        let f = failure(404, r#"{"code":404,"msg":"task not found"}"#);
        assert_eq!(
            (f.class, f.api_error),
            (FailureClass::NotFound, Some("other"))
        );
        let f = failure(400, r#"{"code":400,"msg":"task does not exist"}"#);
        assert_eq!(
            (f.class, f.api_error),
            (FailureClass::NotFound, Some("400"))
        );
        let f = failure(503, r#"{"code":400,"msg":"task not found"}"#);
        assert_eq!(
            (f.class, f.api_error),
            (FailureClass::ServerError, Some("400"))
        );
        let f = failure(429, r#"{"code":429,"msg":"slow down"}"#);
        assert_eq!(
            (f.class, f.api_error),
            (FailureClass::RateLimited, Some("other"))
        );
    }

    #[test]
    fn failure_messages_carry_no_secrets() {
        let f = failure(
            200,
            r#"{"code":401,"msg":"invalid Authorization: Bearer sk-live-0123456789abcdefABCDEF"}"#,
        );
        assert!(!f.message.contains("0123456789"), "{}", f.message);
        assert!(f.message.starts_with("code 401: invalid Authorization: "));
        let f = failure(
            200,
            &format!(r#"{{"code":400,"msg":"{}"}}"#, "a".repeat(5000)),
        );
        assert!(f.message.len() <= MAX_TEXT_LEN);
    }

    // --- paths and webhooks ---

    #[test]
    fn task_path_encodes_the_id() {
        let a = Maxapi::new();
        assert_eq!(a.task_path(ID), format!("/api/v1/task/{ID}"));
        assert_eq!(
            a.task_path("a/../b?x=1#y"),
            "/api/v1/task/a%2F..%2Fb%3Fx%3D1%23y"
        );
    }

    #[test]
    fn webhook_reads_data_status() {
        let body = task_body(
            "FAILURE",
            r#","failure_reason":"CONTENT_MODERATION","updated_at":"2026-02-10T21:55:04.039815Z""#,
        );
        let o = Maxapi::new().parse_webhook(body.as_bytes()).unwrap();
        assert_eq!(o.status, Status::Failed);
        assert_eq!(o.failure_reason, Some(FailureReason::ContentModeration));
        assert_eq!(o, parse(&body).unwrap());
    }

    #[test]
    fn webhook_without_task_is_invalid() {
        let a = Maxapi::new();
        assert_invalid(a.parse_webhook(br#"{"code":0,"msg":"ok"}"#));
        assert_invalid(a.parse_webhook(br#"{"taskId":"a","status":"SUCCESS"}"#));
        assert_invalid(a.parse_webhook(b"not json"));
    }
}
