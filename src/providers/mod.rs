//! Provider adapters: the only code that knows a provider's wire format.
//!
//! An adapter is pure: it builds request paths and turns `(HTTP status, body bytes)` into
//! normalized values. It does no I/O, so it can be unit-, golden- and fuzz-tested directly.
//! The upstream client (`crate::upstream`) does the HTTP, the rate limiting and the metrics.
//!
//! A third provider is one new file here plus one arm in [`Adapter`] and in
//! `crate::config::ProviderType`.

pub mod apimall;
pub mod maxapi;
pub mod reasons;

pub use reasons::FailureRules;

use crate::task::Observation;

/// What an upstream answer that is not a usable result means for the poller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// The provider does not know the task (HTTP 404, maxapi/apimall "not found").
    NotFound,
    /// The key was refused (HTTP 401/403, envelope `401` / `unauthorized`): provider down.
    Unauthorized,
    /// HTTP 429 (the client pauses; honours `Retry-After`).
    RateLimited,
    /// HTTP 5xx: provider down, retried later.
    ServerError,
    /// Any other refusal of this one request (HTTP 400, envelope code 400, ...).
    ClientError,
    /// The body could not be decoded as the documented shape.
    InvalidResponse,
}

/// A failed exchange, already classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamFailure {
    pub class: FailureClass,
    /// Value of the `error` label of `genai_upstream_errors_total`, when the answer was an
    /// API-level error: maxapi envelope `code` (`"400"`, `"401"`, else `"other"`), apimall
    /// `error.code` (`"unauthorized"`, `"not_found"`, ..., else `"other"`), or
    /// `"invalid_response"` for an undecodable body. `None` for a bare HTTP error without
    /// an envelope (the request counter's `code` label already tells that story).
    pub api_error: Option<&'static str>,
    /// Short human text for logs, the landing page and the tasks API; truncated, never a label.
    pub message: String,
}

/// Account balance (apimall `GET /api/v1/account/balances`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Balance {
    pub credits: f64,
    pub api_credits: f64,
}

/// One page of a discovery listing (apimall history).
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPage {
    /// Items as observations (id, model, status, created_at, credits where given).
    pub items: Vec<Observation>,
    /// True when this page is shorter than the requested limit, i.e. the last one.
    pub is_last: bool,
}

/// Which history listing (apimall `kinds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HistoryKind {
    Images,
    Videos,
    Audio,
}

impl HistoryKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            HistoryKind::Images => "images",
            HistoryKind::Videos => "videos",
            HistoryKind::Audio => "audio",
        }
    }
}

/// The provider adapter, one arm per provider type.
#[derive(Debug, Clone)]
pub enum Adapter {
    Maxapi(maxapi::Maxapi),
    Apimall(apimall::Apimall),
}

impl Adapter {
    /// Path (and query) of the get-task request, appended to the provider's `base_url`.
    /// The id is percent-encoded: ids come from users and webhooks.
    pub fn task_path(&self, task_id: &str) -> String {
        match self {
            Adapter::Maxapi(a) => a.task_path(task_id),
            Adapter::Apimall(a) => a.task_path(task_id),
        }
    }

    /// Turns a get-task answer into an observation, or a classified failure.
    pub fn parse_task(
        &self,
        http_status: u16,
        body: &[u8],
    ) -> Result<Observation, UpstreamFailure> {
        match self {
            Adapter::Maxapi(a) => a.parse_task(http_status, body),
            Adapter::Apimall(a) => a.parse_task(http_status, body),
        }
    }

    /// Turns a callback body into an observation. Fails on anything that is not the
    /// documented shape; a callback is confirmed by a poll afterwards in any case.
    pub fn parse_webhook(&self, body: &[u8]) -> Result<Observation, UpstreamFailure> {
        match self {
            Adapter::Maxapi(a) => a.parse_webhook(body),
            Adapter::Apimall(a) => a.parse_webhook(body),
        }
    }

    /// `None` for providers without a history listing.
    pub fn history_path(&self, kind: HistoryKind, page: u32, limit: u32) -> Option<String> {
        match self {
            Adapter::Maxapi(_) => None,
            Adapter::Apimall(a) => Some(a.history_path(kind, page, limit)),
        }
    }

    pub fn parse_history(
        &self,
        http_status: u16,
        body: &[u8],
        limit: u32,
    ) -> Result<HistoryPage, UpstreamFailure> {
        match self {
            Adapter::Maxapi(_) => Err(UpstreamFailure {
                class: FailureClass::ClientError,
                api_error: None,
                message: "maxapi has no history endpoint".into(),
            }),
            Adapter::Apimall(a) => a.parse_history(http_status, body, limit),
        }
    }

    /// `None` for providers without a balance endpoint.
    pub fn balance_path(&self) -> Option<&'static str> {
        match self {
            Adapter::Maxapi(_) => None,
            Adapter::Apimall(_) => Some(apimall::BALANCE_PATH),
        }
    }

    pub fn parse_balance(&self, http_status: u16, body: &[u8]) -> Result<Balance, UpstreamFailure> {
        match self {
            Adapter::Maxapi(_) => Err(UpstreamFailure {
                class: FailureClass::ClientError,
                api_error: None,
                message: "maxapi has no balance endpoint".into(),
            }),
            Adapter::Apimall(a) => a.parse_balance(http_status, body),
        }
    }
}

/// Wire-level helpers shared by the adapters, private to the provider layer: decoding limits,
/// path encoding, lenient optional fields and scrubbing of provider text. They live here so a
/// third adapter reuses them instead of copying them.
mod wire {
    use std::sync::LazyLock;

    use regex::Regex;
    use serde::Deserialize;
    use serde::de::{DeserializeOwned, Deserializer};

    use super::{FailureClass, UpstreamFailure};
    use crate::task::{MAX_TASK_CREDITS, MAX_TEXT_LEN, UnixMillis, parse_timestamp, truncate};

    /// Deepest JSON nesting we hand to serde_json. Real answers nest 3–4 levels; the bound keeps
    /// hostile bodies (webhooks are unauthenticated input) away from deep recursion.
    pub(super) const MAX_JSON_DEPTH: usize = 64;

    /// `api_error` label for a body that is not the documented shape.
    pub(super) const INVALID_RESPONSE: &str = "invalid_response";

    /// Percent-encodes one path segment: everything outside RFC 3986 "unreserved" is escaped,
    /// because task ids come from users and webhooks and must not add segments or a query.
    pub(super) fn encode_path_segment(raw: &str) -> String {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let mut out = String::with_capacity(raw.len());
        for &b in raw.as_bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                out.push(char::from(b));
            } else {
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0x0f)]));
            }
        }
        out
    }

    /// True when `body` opens more than `max` arrays/objects at once. Counts brackets outside
    /// JSON strings only; malformed input is left for serde_json to reject.
    fn nests_deeper_than(body: &[u8], max: usize) -> bool {
        let mut depth = 0usize;
        let mut in_string = false;
        let mut escaped = false;
        for &b in body {
            if in_string {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_string = false;
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > max {
                        return true;
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        false
    }

    /// Decodes a body that must be a JSON object, after the nesting check. Every adapter wire
    /// struct is lenient (see [`lenient`]), so this fails only on non-JSON or a non-object.
    pub(super) fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, UpstreamFailure> {
        if nests_deeper_than(body, MAX_JSON_DEPTH) {
            return Err(invalid_response(&format!(
                "body nested deeper than {MAX_JSON_DEPTH} levels"
            )));
        }
        // serde would also fill a struct from a JSON array, by position; no provider sends that.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(invalid_response("body is not a JSON object"));
        }
        serde_json::from_slice(body).map_err(|e| {
            invalid_response(if e.is_data() {
                "body is JSON of an unexpected shape"
            } else {
                "body is not JSON"
            })
        })
    }

    /// `deserialize_with` for optional wire fields: missing, `null` and wrong-typed all become
    /// `None`, because both providers change fields without notice and one odd field must not
    /// cost us the whole answer.
    pub(super) fn lenient<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: DeserializeOwned,
    {
        let value = serde_json::Value::deserialize(deserializer)?;
        Ok(T::deserialize(value).ok())
    }

    /// [`lenient`] for fields holding an object: anything but a JSON object is `None` (serde
    /// would otherwise fill a struct from an array, by position).
    pub(super) fn lenient_object<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: DeserializeOwned,
    {
        let value = serde_json::Value::deserialize(deserializer)?;
        Ok(from_object(value))
    }

    /// A wire struct from a JSON value that must be an object.
    pub(super) fn from_object<T: DeserializeOwned>(value: serde_json::Value) -> Option<T> {
        if value.is_object() {
            T::deserialize(value).ok()
        } else {
            None
        }
    }

    pub(super) fn invalid_response(detail: &str) -> UpstreamFailure {
        UpstreamFailure {
            class: FailureClass::InvalidResponse,
            api_error: Some(INVALID_RESPONSE),
            message: truncate(&format!("invalid response: {detail}"), MAX_TEXT_LEN),
        }
    }

    /// 2xx answers carry a body worth decoding; anything else is classified by
    /// [`class_for_http_status`] first.
    pub(super) fn is_success(http_status: u16) -> bool {
        (200..300).contains(&http_status)
    }

    /// What a non-2xx HTTP status means for the poller. 1xx/3xx and nonsense codes are not an
    /// answer we understand, hence `InvalidResponse`.
    pub(super) fn class_for_http_status(http_status: u16) -> FailureClass {
        match http_status {
            401 | 403 => FailureClass::Unauthorized,
            404 | 410 => FailureClass::NotFound,
            429 => FailureClass::RateLimited,
            400..=499 => FailureClass::ClientError,
            500..=599 => FailureClass::ServerError,
            _ => FailureClass::InvalidResponse,
        }
    }

    /// Fixed context plus the provider's own text, scrubbed and truncated: the result is shown
    /// on the landing page and in logs.
    pub(super) fn message(context: &str, provider_text: Option<&str>) -> String {
        let text = match provider_text.map(str::trim) {
            Some(t) if !t.is_empty() => format!("{context}: {}", scrub(t)),
            _ => context.to_string(),
        };
        truncate(&text, MAX_TEXT_LEN)
    }

    /// Provider free text as we keep it: secrets scrubbed, then truncated.
    pub(super) fn provider_text(text: &str) -> String {
        truncate(&scrub(text), MAX_TEXT_LEN)
    }

    /// Bearer credentials, `sk-`-style keys and long opaque tokens (keys, signatures, signed
    /// URLs). Canonical UUIDs are kept: they are task ids, useful and not secret.
    static SECRET: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(
            r"(?i)\bbearer\s+\S+|\b(?:sk|pk|rk|key)[-_][A-Za-z0-9_\-]{8,}|[A-Za-z0-9_\-+/=.~%]{32,}",
        )
        .expect("constant pattern compiles")
    });

    static UUID: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$")
            .expect("constant pattern compiles")
    });

    /// Replaces anything that looks like a credential with `[redacted]`. Providers sometimes
    /// echo request details in error texts; this text ends up in logs and on a web page.
    pub(super) fn scrub(text: &str) -> String {
        SECRET
            .replace_all(text, |caps: &regex::Captures<'_>| {
                let found = &caps[0];
                if UUID.is_match(found) {
                    found.to_string()
                } else {
                    "[redacted]".to_string()
                }
            })
            .into_owned()
    }

    /// Timestamps are RFC 3339, which is ASCII; anything else (or absurdly long) is absent.
    pub(super) fn timestamp(text: Option<&str>) -> Option<UnixMillis> {
        let text = text?;
        if !text.is_ascii() || text.len() > 64 {
            return None;
        }
        parse_timestamp(text)
    }

    /// A credit value no real task can have; the caller counts it and leaves it absent.
    #[derive(Debug, PartialEq)]
    pub(super) struct RefusedCredit;

    /// A credit amount: a JSON number or a string holding one (`"8"`), finite, not negative
    /// and at most [`MAX_TASK_CREDITS`]. Absent or `null` is `Ok(None)`; anything else is
    /// refused (a negative charge or `1e308` is not data, and must never reach a counter).
    pub(super) fn credit_amount(
        value: Option<&serde_json::Value>,
    ) -> Result<Option<f64>, RefusedCredit> {
        let amount = match value {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::Number(n)) => n.as_f64(),
            Some(serde_json::Value::String(s)) if s.len() <= 64 => s.trim().parse::<f64>().ok(),
            Some(_) => None,
        };
        match amount {
            // `+ 0.0` folds -0.0 into 0.0.
            Some(v) if v.is_finite() && (0.0..=MAX_TASK_CREDITS).contains(&v) => Ok(Some(v + 0.0)),
            _ => Err(RefusedCredit),
        }
    }

    /// Model names become label values: keep them short and drop empty ones.
    pub(super) fn model_name(model: Option<String>) -> Option<String> {
        model
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .map(|m| truncate(&m, MAX_TEXT_LEN))
    }

    /// A required string field: present, a string, not blank.
    pub(super) fn required(value: Option<String>, field: &str) -> Result<String, UpstreamFailure> {
        value
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| invalid_response(&format!("missing {field}")))
    }

    /// The task id: required, and bounded because it becomes a store key and is shown by the
    /// API (documented ids are 30–36 bytes). It is kept exactly as sent, never trimmed.
    pub(super) fn task_id(value: Option<String>, field: &str) -> Result<String, UpstreamFailure> {
        let id = required(value, field)?;
        if id.len() > MAX_TEXT_LEN {
            return Err(invalid_response(&format!(
                "{field} longer than {MAX_TEXT_LEN} bytes"
            )));
        }
        Ok(id)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn encodes_everything_outside_unreserved() {
            assert_eq!(encode_path_segment("AZaz09-_.~"), "AZaz09-_.~");
            assert_eq!(encode_path_segment("a/b?c#d e%"), "a%2Fb%3Fc%23d%20e%25");
            assert_eq!(encode_path_segment("é"), "%C3%A9");
            assert_eq!(encode_path_segment(""), "");
        }

        #[test]
        fn nesting_counts_brackets_outside_strings_only() {
            let deep = "[".repeat(65);
            assert!(nests_deeper_than(deep.as_bytes(), 64));
            assert!(!nests_deeper_than("[".repeat(64).as_bytes(), 64));
            let in_string = format!("{{\"a\":\"{}\"}}", "[".repeat(100));
            assert!(!nests_deeper_than(in_string.as_bytes(), 64));
            let escaped_quote = format!("{{\"a\":\"\\\"{}\"}}", "{".repeat(100));
            assert!(!nests_deeper_than(escaped_quote.as_bytes(), 64));
            // Siblings do not add up.
            assert!(!nests_deeper_than("[[],[],[]]".repeat(100).as_bytes(), 2));
        }

        #[test]
        fn scrub_removes_credentials_and_keeps_uuids() {
            let text = "bad header Authorization: Bearer abc.def and key sk-1234567890abcdef";
            let out = scrub(text);
            assert!(!out.contains("abc.def"), "{out}");
            assert!(!out.contains("1234567890abcdef"), "{out}");
            let long = "token 0123456789abcdefghijABCDEFGHIJ0123456789 end";
            assert_eq!(scrub(long), "token [redacted] end");
            let id = "task 9db7d1ed-d1e5-4d11-9f3a-61f653b905ad not found";
            assert_eq!(scrub(id), id);
            assert_eq!(scrub("Task not found"), "Task not found");
        }

        #[test]
        fn message_is_truncated() {
            let long = "x ".repeat(1000);
            assert!(message("HTTP 400", Some(&long)).len() <= MAX_TEXT_LEN);
            assert_eq!(message("HTTP 400", Some("  ")), "HTTP 400");
            assert_eq!(message("HTTP 400", None), "HTTP 400");
        }

        #[test]
        fn timestamps_must_be_ascii() {
            assert_eq!(
                timestamp(Some("2026-03-12T09:30:00.000Z")),
                Some(1_773_307_800_000)
            );
            assert_eq!(timestamp(Some("2026-03-12T09:30:00.00日本")), None);
            assert_eq!(timestamp(Some("日本語x")), None);
            assert_eq!(timestamp(None), None);
        }

        #[test]
        fn credit_amounts_parse_numeric_strings_and_refuse_the_rest() {
            use serde_json::json;
            let amount = |v: serde_json::Value| credit_amount(Some(&v));
            assert_eq!(amount(json!(8.5)), Ok(Some(8.5)));
            assert_eq!(amount(json!("8")), Ok(Some(8.0)));
            assert_eq!(amount(json!(" 2.5 ")), Ok(Some(2.5)));
            assert_eq!(amount(json!(-0.0)), Ok(Some(0.0)));
            assert_eq!(amount(json!(1e9)), Ok(Some(1e9)));
            assert_eq!(amount(json!(null)), Ok(None));
            assert_eq!(credit_amount(None), Ok(None));
            for refused in [
                json!(-1.0),
                json!("-1"),
                json!("NaN"),
                json!("inf"),
                json!("eight"),
                json!(""),
                json!(1e308),
                json!(1.000_001e9),
                json!(true),
                json!({"a": 1}),
                json!([8]),
            ] {
                assert_eq!(amount(refused.clone()), Err(RefusedCredit), "{refused}");
            }
        }

        #[test]
        fn http_status_classes() {
            use FailureClass::*;
            for (status, class) in [
                (400, ClientError),
                (401, Unauthorized),
                (403, Unauthorized),
                (404, NotFound),
                (410, NotFound),
                (418, ClientError),
                (429, RateLimited),
                (500, ServerError),
                (503, ServerError),
                (302, InvalidResponse),
                (100, InvalidResponse),
                (0, InvalidResponse),
            ] {
                assert_eq!(class_for_http_status(status), class, "{status}");
            }
        }
    }
}
