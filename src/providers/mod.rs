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
    pub fn as_str(self) -> &'static str {
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

    /// Whether this provider has a history listing and a balance endpoint.
    pub fn supports_discovery(&self) -> bool {
        matches!(self, Adapter::Apimall(_))
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
