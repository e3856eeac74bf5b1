//! Transparent reverse proxy to a provider's API (`ANY /proxy/{provider}/{path}`).
//!
//! A request to `/proxy/{provider}/{path}?{query}` goes to `{base_url}/{path}?{query}` with
//! the application's method, headers (minus hop-by-hop ones and `Host`) and body, and the
//! answer comes back as the upstream gave it. Both bodies are streamed. The application's
//! own `Authorization` passes through; the exporter's key is never added.
//!
//! What the proxy learns (endpoint and answer code of every request; task ids, rejections
//! and task answers from small JSON answers) goes to a [`ProxyObserver`] once the answer has
//! been handed on, so the exporter's own trouble never changes or delays what the
//! application gets.
//!
//! The client is reqwest, the one the exporter already uses for its polls: it brings the
//! rustls TLS set-up and connection pooling, and streams both ways through `http_body`
//! (`reqwest::Body::wrap` and `reqwest::Body::from(Response)`), so no extra feature is needed.

mod body;
mod classify;
mod observe;
mod path;
mod traffic;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{OriginalUri, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use bytes::Bytes;

use crate::providers::reasons::FailureRules;

/// One settings type for the file and the proxy: `providers[].proxy` as resolved.
pub use crate::config::ProxySettings;
pub use classify::{ProviderKind, ProxyCode, ProxyEndpoint};
pub use observe::{
    ProxyObserver, Refusal, RejectReason, Submission, SubmitOutcome, TaskAnswer, parse_submit,
};
pub use path::PathError;

use body::{LimitedBody, OnFinish, TeeBody};
use path::Base;
pub(crate) use traffic::Traffic;

/// Largest answer copied for the observer; task and submit answers are a few KiB.
pub const MAX_OBSERVED_BODY_BYTES: usize = 256 * 1024;
/// Shortest interval between two log lines of the same kind of fault for one provider.
const LOG_INTERVAL_SECS: u64 = 10;

/// Settings that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProxySetupError {
    #[error(
        "base_url must be an http or https URL with a host and without credentials, query or fragment"
    )]
    BadBaseUrl,
    #[error("proxy timeout must be positive")]
    ZeroTimeout,
}

/// Logs a kind of fault at most once per [`LOG_INTERVAL_SECS`], with the number of the
/// same faults left unlogged since: an application (or an attacker) controls how often
/// these happen.
#[derive(Debug, Default)]
struct LogGate {
    next_second: AtomicU64,
    suppressed: AtomicU64,
}

impl LogGate {
    /// `Some(suppressed count)` when a line may be logged now.
    fn open(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let next = self.next_second.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_second
                .compare_exchange(
                    next,
                    now + LOG_INTERVAL_SECS,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// The proxy of one provider.
pub struct ProviderProxy {
    name: String,
    kind: ProviderKind,
    base: Base,
    max_request_body_bytes: u64,
    timeout: Duration,
    client: reqwest::Client,
    rules: FailureRules,
    observer: Arc<dyn ProxyObserver>,
    refusals_log: LogGate,
    failures_log: LogGate,
}

impl std::fmt::Debug for ProviderProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderProxy")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// non-standard `Proxy-Connection`; never forwarded either way.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Copies `headers` minus the hop-by-hop ones, those `Connection` names, and `extra`.
fn end_to_end_headers(headers: &HeaderMap, extra: &[HeaderName]) -> HeaderMap {
    let named_by_connection: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if HOP_BY_HOP.contains(name) || extra.contains(name) || named_by_connection.contains(name) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// A short JSON error of the proxy's own; it names no URL, header or key.
fn error_response(status: StatusCode, message: &'static str) -> Response {
    let body = format!(r#"{{"error":"{message}"}}"#);
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| {
            let ct = ct.to_ascii_lowercase();
            ct.starts_with("application/json") || ct.contains("+json")
        })
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl ProviderProxy {
    /// `name` is the provider's configured name (the `provider` label and the path segment
    /// after `/proxy/`); requests go to `base_url` only; `rules` classify rejection messages
    /// like task failure messages. `settings.enabled` is the caller's business.
    pub fn new(
        name: impl Into<String>,
        kind: ProviderKind,
        base_url: &str,
        settings: &ProxySettings,
        rules: FailureRules,
        observer: Arc<dyn ProxyObserver>,
    ) -> Result<Self, ProxySetupError> {
        let base = Base::parse(base_url).ok_or(ProxySetupError::BadBaseUrl)?;
        if settings.timeout.is_zero() {
            return Err(ProxySetupError::ZeroTimeout);
        }
        crate::upstream::install_crypto_provider();
        // Redirects go back to the application as they are: following one would send its
        // key to wherever the `Location` points.
        // reqwest adds `Accept: */*` to a request that has no `Accept`, which means the same.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(settings.timeout.min(Duration::from_secs(10)))
            .read_timeout(settings.timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .build()
            .map_err(|_| ProxySetupError::BadBaseUrl)?;
        Ok(ProviderProxy {
            name: name.into(),
            kind,
            base,
            max_request_body_bytes: settings.max_request_body_bytes,
            timeout: settings.timeout,
            client,
            rules,
            observer,
            refusals_log: LogGate::default(),
            failures_log: LogGate::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn refuse(&self, refusal: Refusal, detail: &'static str) -> Response {
        if let Some(suppressed) = self.refusals_log.open() {
            tracing::warn!(
                provider = %self.name,
                reason = refusal.as_str(),
                detail,
                suppressed,
                "proxy refused a request"
            );
        }
        let observer = Arc::clone(&self.observer);
        let provider = self.name.clone();
        spawn_or_run(move || observer.request_refused(&provider, refusal));
        match refusal {
            Refusal::BadPath => error_response(StatusCode::BAD_REQUEST, "bad proxy path"),
            Refusal::BodyTooLarge => {
                error_response(StatusCode::PAYLOAD_TOO_LARGE, "request body too large")
            }
        }
    }

    /// Forwards `request`; `raw_path` is what follows `/proxy/{provider}` in the request
    /// path, still percent-encoded. The provider is taken from `self`, never from the request.
    pub async fn forward(self: &Arc<Self>, raw_path: &str, request: Request) -> Response {
        // An absolute-form target (`GET http://host/...`) is what a forward-proxy client sends;
        // no application of a reverse proxy does.
        if request.version() <= Version::HTTP_11 && request.uri().authority().is_some() {
            return self.refuse(Refusal::BadPath, "absolute-form request target");
        }
        let segments = match path::check_path(raw_path) {
            Ok(segments) => segments,
            Err(error) => return self.refuse(Refusal::BadPath, error.as_str()),
        };
        let query = request.uri().query();
        if let Some(Err(error)) = query.map(path::check_query) {
            return self.refuse(Refusal::BadPath, error.as_str());
        }
        let url = match self.base.join(raw_path, query) {
            Ok(url) => url,
            Err(error) => return self.refuse(Refusal::BadPath, error.as_str()),
        };
        if content_length(request.headers()).is_some_and(|len| len > self.max_request_body_bytes) {
            return self.refuse(Refusal::BodyTooLarge, "content-length over the limit");
        }

        let (endpoint, task_id) = classify::classify(self.kind, request.method(), &segments);
        let (parts, body) = request.into_parts();
        // `Host` is set for the upstream; `X-Forwarded-Host` names us, not it; `Expect` was
        // answered by our own server already.
        let headers = end_to_end_headers(
            &parts.headers,
            &[
                header::HOST,
                HeaderName::from_static("x-forwarded-host"),
                header::EXPECT,
            ],
        );
        let over_limit = Arc::new(AtomicBool::new(false));
        let body = LimitedBody::new(body, self.max_request_body_bytes, Arc::clone(&over_limit));
        let upstream_request = self
            .client
            .request(parts.method.clone(), url)
            .headers(headers)
            .body(reqwest::Body::wrap(body));

        let started = Instant::now();
        let outcome = tokio::time::timeout(self.timeout, upstream_request.send()).await;
        let duration = started.elapsed();
        let answer = match outcome {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) if over_limit.load(Ordering::Relaxed) => {
                return self.refuse(Refusal::BodyTooLarge, "body over the limit");
            }
            Ok(Err(error)) => {
                let code = if error.is_timeout() {
                    ProxyCode::Timeout
                } else if error.is_connect() {
                    ProxyCode::ConnectError
                } else {
                    ProxyCode::IoError
                };
                return self.upstream_failed(endpoint, code, duration, Some(error));
            }
            Err(_elapsed) => {
                return self.upstream_failed(endpoint, ProxyCode::Timeout, duration, None);
            }
        };

        let status = answer.status();
        let response_headers = end_to_end_headers(answer.headers(), &[]);
        let observe = matches!(endpoint, ProxyEndpoint::Submit | ProxyEndpoint::Task)
            && parts.method != reqwest::Method::HEAD
            && is_json(&response_headers)
            && content_length(&response_headers)
                .is_none_or(|len| len <= MAX_OBSERVED_BODY_BYTES as u64);
        let on_finish = self.on_finish(endpoint, status.as_u16(), duration, task_id);
        let body = TeeBody::new(
            reqwest::Body::from(answer),
            observe.then_some(MAX_OBSERVED_BODY_BYTES),
            on_finish,
        );
        let mut response = Response::new(Body::new(body));
        *response.status_mut() = status;
        *response.headers_mut() = response_headers;
        response
    }

    fn upstream_failed(
        &self,
        endpoint: ProxyEndpoint,
        code: ProxyCode,
        duration: Duration,
        error: Option<reqwest::Error>,
    ) -> Response {
        if let Some(suppressed) = self.failures_log.open() {
            let error = error.map(describe);
            tracing::warn!(
                provider = %self.name,
                endpoint = endpoint.as_str(),
                code = %code.label(),
                error = error.as_deref().unwrap_or("no answer within the proxy timeout"),
                suppressed,
                "proxied request got no answer"
            );
        }
        let observer = Arc::clone(&self.observer);
        let provider = self.name.clone();
        spawn_or_run(move || observer.request_finished(&provider, endpoint, code, duration));
        match code {
            ProxyCode::Timeout => error_response(StatusCode::GATEWAY_TIMEOUT, "upstream timed out"),
            _ => error_response(StatusCode::BAD_GATEWAY, "upstream unreachable"),
        }
    }

    /// What happens once the answer body has been passed on (or abandoned).
    fn on_finish(
        self: &Arc<Self>,
        endpoint: ProxyEndpoint,
        status: u16,
        duration: Duration,
        task_id: Option<String>,
    ) -> OnFinish {
        let proxy = Arc::clone(self);
        Box::new(move |copy: Option<Bytes>| {
            spawn_or_run(move || proxy.observe(endpoint, status, duration, task_id, copy));
        })
    }

    fn observe(
        &self,
        endpoint: ProxyEndpoint,
        status: u16,
        duration: Duration,
        task_id: Option<String>,
        copy: Option<Bytes>,
    ) {
        let observer = &self.observer;
        observer.request_finished(&self.name, endpoint, ProxyCode::Status(status), duration);
        let Some(body) = copy else { return };
        match endpoint {
            ProxyEndpoint::Submit => match parse_submit(self.kind, status, &body, &self.rules) {
                SubmitOutcome::Submitted(submission) => {
                    observer.task_submitted(&self.name, submission)
                }
                SubmitOutcome::Rejected(reason) => observer.submit_rejected(&self.name, reason),
                SubmitOutcome::Unknown => {}
            },
            ProxyEndpoint::Task => {
                if let Some(task_id) = task_id {
                    observer.task_answer(
                        &self.name,
                        TaskAnswer {
                            task_id,
                            status,
                            body,
                        },
                    );
                }
            }
            _ => {}
        }
    }
}

/// The error and its causes, without the URL: the application's path and query (which may
/// carry a key) stay out of the log.
fn describe(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Runs observer work off the path of the answer: on a spawned task when a runtime is there
/// (always, inside the server), inline otherwise.
fn spawn_or_run(work: impl FnOnce() + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move { work() });
        }
        Err(_) => work(),
    }
}

/// The configured proxies by provider name. Clones share one table, which a reload
/// replaces whole ([`ProxyTable::replace`]); a request in flight keeps the proxy it started
/// with.
#[derive(Debug, Clone, Default)]
pub struct ProxyTable {
    providers: Arc<RwLock<Arc<ProxyMap>>>,
}

type ProxyMap = HashMap<String, Arc<ProviderProxy>>;

fn to_map(proxies: impl IntoIterator<Item = ProviderProxy>) -> Arc<ProxyMap> {
    Arc::new(
        proxies
            .into_iter()
            .map(|proxy| (proxy.name.clone(), Arc::new(proxy)))
            .collect(),
    )
}

impl ProxyTable {
    pub fn new(proxies: impl IntoIterator<Item = ProviderProxy>) -> Self {
        ProxyTable {
            providers: Arc::new(RwLock::new(to_map(proxies))),
        }
    }

    /// Swaps in a new set of proxies at once, for every clone of this table.
    pub fn replace(&self, proxies: impl IntoIterator<Item = ProviderProxy>) {
        let map = to_map(proxies);
        *self
            .providers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = map;
    }

    fn current(&self) -> Arc<ProxyMap> {
        Arc::clone(
            &self
                .providers
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    pub fn get(&self, provider: &str) -> Option<Arc<ProviderProxy>> {
        self.current().get(provider).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.current().is_empty()
    }

    /// The proxied providers' names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.current().keys().cloned().collect();
        names.sort();
        names
    }
}

/// Splits `/proxy/{provider}{rest}` of the raw request path.
fn split_proxy_path(path: &str) -> Option<(&str, &str)> {
    let after = path.strip_prefix("/proxy/")?;
    let end = after.find('/').unwrap_or(after.len());
    Some((&after[..end], &after[end..]))
}

/// The proxy routes (`ANY /proxy/{provider}` and `ANY /proxy/{provider}/{*path}`), to be
/// merged into the main router. The path is read raw from the request, never from the
/// router's percent-decoded parameters.
pub fn router(table: ProxyTable) -> Router {
    Router::new()
        .route("/proxy/{provider}", any(handle))
        .route("/proxy/{provider}/", any(handle))
        .route("/proxy/{provider}/{*path}", any(handle))
        .with_state(table)
}

async fn handle(State(table): State<ProxyTable>, request: Request) -> Response {
    let raw_path = request
        .extensions()
        .get::<OriginalUri>()
        .map_or_else(|| request.uri().path(), |original| original.path())
        .to_string();
    let Some((provider, rest)) = split_proxy_path(&raw_path) else {
        return error_response(StatusCode::NOT_FOUND, "not found");
    };
    match table.get(provider) {
        Some(proxy) => proxy.forward(rest, request).await,
        None => error_response(StatusCode::NOT_FOUND, "no proxy for this provider"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Hop"),
        );
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        headers.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        headers.insert(header::HOST, HeaderValue::from_static("evil.example"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer app"),
        );
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        let out = end_to_end_headers(&headers, &[header::HOST]);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["authorization", "x-multi"]);
        assert_eq!(out.get_all("x-multi").iter().count(), 2);
        assert_eq!(out[header::AUTHORIZATION], "Bearer app");
    }

    #[test]
    fn proxy_paths_split_raw() {
        assert_eq!(
            split_proxy_path("/proxy/maxapi/api/v1/task/x"),
            Some(("maxapi", "/api/v1/task/x"))
        );
        assert_eq!(split_proxy_path("/proxy/maxapi"), Some(("maxapi", "")));
        assert_eq!(
            split_proxy_path("/proxy/maxapi/%2e%2e/x"),
            Some(("maxapi", "/%2e%2e/x"))
        );
        assert_eq!(split_proxy_path("/metrics"), None);
    }

    #[test]
    fn log_gate_lets_one_line_through_per_interval() {
        let gate = LogGate::default();
        assert_eq!(gate.open(), Some(0));
        assert_eq!(gate.open(), None);
        assert_eq!(gate.open(), None);
        gate.next_second.store(0, Ordering::Relaxed);
        assert_eq!(gate.open(), Some(2));
    }

    #[test]
    fn settings_are_checked() {
        let observer: Arc<dyn ProxyObserver> = Arc::new(NoObserver);
        let new = |base_url: &str, settings: &ProxySettings| {
            ProviderProxy::new(
                "p",
                ProviderKind::Maxapi,
                base_url,
                settings,
                FailureRules::defaults(),
                Arc::clone(&observer),
            )
            .map(|_| ())
        };
        let defaults = ProxySettings::default();
        assert_eq!(new("https://api.maxapi.io", &defaults), Ok(()));
        assert_eq!(
            new("https://key@api.maxapi.io", &defaults),
            Err(ProxySetupError::BadBaseUrl)
        );
        let zero = ProxySettings {
            timeout: Duration::ZERO,
            ..ProxySettings::default()
        };
        assert_eq!(
            new("https://api.maxapi.io", &zero),
            Err(ProxySetupError::ZeroTimeout)
        );
        assert_eq!(defaults.max_request_body_bytes, 64 * 1024 * 1024);
    }

    #[test]
    fn a_replaced_table_is_seen_by_every_clone() {
        let observer: Arc<dyn ProxyObserver> = Arc::new(NoObserver);
        let make = |name: &str| {
            ProviderProxy::new(
                name,
                ProviderKind::Maxapi,
                "http://127.0.0.1:1",
                &ProxySettings::default(),
                FailureRules::defaults(),
                Arc::clone(&observer),
            )
            .unwrap()
        };
        let table = ProxyTable::new([make("a")]);
        let served = table.clone();
        let held = served.get("a").expect("a is proxied");
        table.replace([make("b")]);
        assert!(served.get("a").is_none());
        assert_eq!(served.names(), ["b"]);
        assert_eq!(held.name(), "a", "a request in flight keeps its proxy");
        table.replace([]);
        assert!(served.is_empty());
    }

    #[tokio::test]
    async fn logged_errors_name_no_url() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        crate::upstream::install_crypto_provider();
        let error = reqwest::Client::new()
            .get(format!("http://{addr}/api/v1/task/x?key=query-secret"))
            .send()
            .await
            .unwrap_err();
        assert!(error.to_string().contains("query-secret"), "{error}");
        let text = describe(error);
        assert!(
            !text.contains("query-secret") && !text.contains("/api/v1"),
            "{text}"
        );
        assert!(!text.is_empty());
    }

    struct NoObserver;

    impl ProxyObserver for NoObserver {
        fn request_finished(&self, _: &str, _: ProxyEndpoint, _: ProxyCode, _: Duration) {}
        fn request_refused(&self, _: &str, _: Refusal) {}
        fn task_submitted(&self, _: &str, _: Submission) {}
        fn submit_rejected(&self, _: &str, _: RejectReason) {}
        fn task_answer(&self, _: &str, _: TaskAnswer) {}
    }
}
