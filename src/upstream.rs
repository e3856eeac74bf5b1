//! The HTTP client side of one provider: rate limit, concurrency limit, rate-limit pauses,
//! bounded bodies, and the upstream metrics. It knows nothing of wire formats: the `parse`
//! function a caller hands to [`Upstream::call`] (an adapter's) interprets `(status, body)`.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::background::lock;
use crate::config::ProviderSettings;
use crate::metrics::Metrics;
use crate::providers::{FailureClass, UpstreamFailure};
use crate::secret::Secret;
use crate::task::{MAX_TEXT_LEN, truncate};

/// Largest upstream body we read. Task answers are a few KiB and a history page of 50 items
/// some 30 KiB; anything larger is refused without being buffered whole.
pub(crate) const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
/// Longest pause a `Retry-After` may impose; a hostile or broken value must not stop us for days.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Back-off after a 429/503 without `Retry-After`: 1 s doubling to 60 s, with jitter.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Consecutive provider-level failures (5xx, 429, transport) before `provider_up` goes to 0.
const DOWN_AFTER_FAILURES: u32 = 3;

/// Which upstream endpoint (`endpoint` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Task,
    History,
    Balance,
}

impl Endpoint {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Endpoint::Task => "task",
            Endpoint::History => "history",
            Endpoint::Balance => "balance",
        }
    }
}

/// An exchange that produced no HTTP answer we could read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TransportError {
    #[error("request timed out")]
    Timeout,
    #[error("could not connect")]
    Connect,
    #[error("connection failed while reading or writing")]
    Io,
}

impl TransportError {
    /// The `code` label value.
    pub(crate) fn code(self) -> &'static str {
        match self {
            TransportError::Timeout => "timeout",
            TransportError::Connect => "connect_error",
            TransportError::Io => "io_error",
        }
    }
}

/// An HTTP answer. `body` is `None` when it was larger than [`MAX_BODY_BYTES`].
#[derive(Debug, Clone)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) body: Option<Bytes>,
}

/// Why [`Upstream::call`] returned no value. Both kinds are already counted and reflected in
/// the provider's health when the caller sees them.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum CallError {
    /// No HTTP answer.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// An answer that `parse` refused (API error, HTTP error, undecodable body).
    #[error("{}", .0.message)]
    Refused(UpstreamFailure),
}

/// A concurrency permit of one provider's upstream, taken before the caller commits to a
/// request (the poller takes one before it takes a due task from the schedule).
#[derive(Debug)]
pub(crate) struct Reserved {
    upstream: Arc<Upstream>,
    _permit: OwnedSemaphorePermit,
}

impl Reserved {
    /// [`Upstream::call`] under this permit, which is released when the call returns.
    pub(crate) async fn call<T>(
        self,
        endpoint: Endpoint,
        path: &str,
        parse: impl FnOnce(u16, &[u8]) -> Result<T, UpstreamFailure>,
    ) -> Result<T, CallError> {
        self.upstream
            .exchange_and_record(endpoint, path, parse)
            .await
    }
}

/// What the landing page shows of a provider's upstream.
#[derive(Debug, Clone, Default)]
pub struct UpstreamStatus {
    pub(crate) up: bool,
    pub(crate) last_success: Option<SystemTime>,
    pub(crate) last_error: Option<String>,
    pub requests: u64,
}

/// Spaces requests evenly at `requests_per_second` (a token bucket of depth one: no bursts
/// above the configured rate, which is what a provider's own limiter measures).
#[derive(Debug)]
struct RateLimiter {
    period: Duration,
    next: Mutex<Instant>,
}

impl RateLimiter {
    fn new(requests_per_second: f64) -> Self {
        RateLimiter {
            period: Duration::from_secs_f64(1.0 / requests_per_second),
            next: Mutex::new(Instant::now()),
        }
    }

    async fn acquire(&self) {
        let slot = {
            let mut next = lock(&self.next);
            let now = Instant::now();
            let slot = (*next).max(now);
            *next = slot + self.period;
            (slot > now).then_some(slot)
        };
        // A slot that is already here needs no timer: tokio's timer rounds a deadline up to
        // its next millisecond tick, which would delay every request under the limit by up
        // to a millisecond.
        if let Some(slot) = slot {
            tokio::time::sleep_until(slot.into()).await;
        }
    }
}

/// Installs the process-wide rustls crypto provider (ring) once.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Err only means another provider was installed first, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The shared HTTP client. Redirects are followed only within the same origin, so the
/// bearer token is never sent to another host.
pub fn build_client() -> reqwest::Client {
    install_crypto_provider();
    let policy = reqwest::redirect::Policy::custom(|attempt| {
        let same_origin = attempt
            .previous()
            .first()
            .is_some_and(|first| first.origin() == attempt.url().origin());
        if attempt.previous().len() > 3 || !same_origin {
            attempt.stop()
        } else {
            attempt.follow()
        }
    });
    reqwest::Client::builder()
        .user_agent(concat!("genai-task-exporter/", env!("CARGO_PKG_VERSION")))
        .redirect(policy)
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
        .expect("HTTP client configuration is static and valid")
}

/// One provider's upstream.
#[derive(Debug)]
pub struct Upstream {
    provider: String,
    base_url: String,
    /// `base_url` parsed once, when it has no query or fragment (request URLs are then built
    /// by setting the path, not by parsing the whole URL again for every request).
    base: Option<reqwest::Url>,
    token: Secret,
    /// `Bearer <token>`, built once (when the token is a valid header value).
    authorization: Option<reqwest::header::HeaderValue>,
    timeout: Duration,
    http: reqwest::Client,
    limiter: RateLimiter,
    /// Requests in flight at once (`max_concurrency`); taken only through [`Upstream::reserve`].
    permits: Arc<Semaphore>,
    pause_until: Mutex<Option<Instant>>,
    throttles_in_a_row: AtomicU32,
    failures_in_a_row: AtomicU32,
    metrics: Arc<Metrics>,
    status: Mutex<UpstreamStatus>,
}

impl Upstream {
    pub(crate) fn new(
        settings: &ProviderSettings,
        http: reqwest::Client,
        metrics: Arc<Metrics>,
    ) -> Self {
        let base = reqwest::Url::parse(&settings.base_url)
            .ok()
            .filter(|u| u.query().is_none() && u.fragment().is_none() && !u.cannot_be_a_base());
        let authorization =
            reqwest::header::HeaderValue::try_from(format!("Bearer {}", settings.token.expose()))
                .ok()
                .map(|mut v| {
                    v.set_sensitive(true);
                    v
                });
        Upstream {
            provider: settings.name.clone(),
            base_url: settings.base_url.clone(),
            base,
            token: settings.token.clone(),
            authorization,
            timeout: settings.polling.timeout,
            http,
            limiter: RateLimiter::new(settings.polling.requests_per_second),
            permits: Arc::new(Semaphore::new(settings.polling.max_concurrency as usize)),
            pause_until: Mutex::new(None),
            throttles_in_a_row: AtomicU32::new(0),
            failures_in_a_row: AtomicU32::new(0),
            metrics,
            // Down until the first valid answer, like `genai_exporter_provider_up`.
            status: Mutex::new(UpstreamStatus::default()),
        }
    }

    pub fn status(&self) -> UpstreamStatus {
        lock(&self.status).clone()
    }

    /// Waits for a concurrency permit (one of `max_concurrency`).
    pub(crate) async fn reserve(self: &Arc<Self>) -> Reserved {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        Reserved {
            upstream: self.clone(),
            _permit: permit,
        }
    }

    /// One request, whole: waits for a concurrency permit, sends `GET base_url + path`, hands
    /// the answer to `parse`, and records the outcome (request and error metrics, provider
    /// health). The only way requests reach the provider.
    pub(crate) async fn call<T>(
        self: &Arc<Self>,
        endpoint: Endpoint,
        path: &str,
        parse: impl FnOnce(u16, &[u8]) -> Result<T, UpstreamFailure>,
    ) -> Result<T, CallError> {
        self.reserve().await.call(endpoint, path, parse).await
    }

    /// The body of [`Upstream::call`], once a permit is held.
    async fn exchange_and_record<T>(
        &self,
        endpoint: Endpoint,
        path: &str,
        parse: impl FnOnce(u16, &[u8]) -> Result<T, UpstreamFailure>,
    ) -> Result<T, CallError> {
        let answer = self.get(endpoint, path).await?;
        match interpret(&answer, parse) {
            Ok(value) => {
                self.record_outcome(endpoint, Ok(()));
                Ok(value)
            }
            Err(failure) => {
                self.record_outcome(endpoint, Err(&failure));
                Err(CallError::Refused(failure))
            }
        }
    }

    /// Sends `GET base_url + path`, waiting for a rate-limit slot and any pause first.
    /// The caller holds a concurrency permit.
    async fn get(&self, endpoint: Endpoint, path: &str) -> Result<Answer, TransportError> {
        self.wait_for_pause().await;
        self.limiter.acquire().await;
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, self.exchange(path)).await;
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(TransportError::Timeout),
        };
        let code = match &result {
            Ok(answer) => status_label(answer.status),
            Err(e) => Cow::Borrowed(e.code()),
        };
        self.metrics.record_request(
            &self.provider,
            endpoint.as_str(),
            &code,
            started.elapsed().as_secs_f64(),
        );
        lock(&self.status).requests += 1;
        match &result {
            Ok(answer) if answer.status == 429 || answer.status == 503 => {
                self.throttled(answer);
            }
            Ok(_) => self.throttles_in_a_row.store(0, Ordering::Relaxed),
            Err(e) => {
                tracing::debug!(provider = %self.provider, endpoint = endpoint.as_str(), error = %e, "upstream request failed");
                self.record_failure(format!("{} request: {e}", endpoint.as_str()));
            }
        }
        result
    }

    /// `base_url` + `path` (path and query, as adapters build them).
    fn url(&self, path: &str) -> Result<reqwest::Url, TransportError> {
        match &self.base {
            Some(base) => Ok(join_url(base, path)),
            // What reqwest reports for a URL it cannot parse.
            None => reqwest::Url::parse(&format!("{}{}", self.base_url, path))
                .map_err(|_| TransportError::Io),
        }
    }

    async fn exchange(&self, path: &str) -> Result<Answer, TransportError> {
        let request = self
            .http
            .get(self.url(path)?)
            .header(reqwest::header::ACCEPT, "application/json");
        let request = match &self.authorization {
            Some(value) => request.header(reqwest::header::AUTHORIZATION, value.clone()),
            None => request.bearer_auth(self.token.expose()),
        };
        let response = request.send().await.map_err(classify_reqwest_error)?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        if let Some(pause) = retry_after.filter(|_| status == 429 || status == 503) {
            self.pause_for(pause);
        }
        let body = read_capped(response, MAX_BODY_BYTES).await?;
        Ok(Answer { status, body })
    }

    /// Pauses the provider after a 429/503: `Retry-After` when it came (already applied in
    /// `exchange`), else exponential back-off with jitter.
    fn throttled(&self, answer: &Answer) {
        let n = self.throttles_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        let has_pause = lock(&self.pause_until).is_some_and(|until| until > Instant::now());
        if !has_pause {
            let exp = BACKOFF_BASE.saturating_mul(1u32 << (n - 1).min(10));
            let capped = exp.min(BACKOFF_MAX);
            let jittered = capped.mul_f64(0.5 + fastrand::f64() * 0.5);
            self.pause_for(jittered);
        }
        tracing::info!(
            provider = %self.provider,
            status = answer.status,
            in_a_row = n,
            "provider throttled us; pausing"
        );
    }

    fn pause_for(&self, pause: Duration) {
        let until = Instant::now() + pause.min(MAX_RETRY_AFTER);
        let mut guard = lock(&self.pause_until);
        let until = guard.map_or(until, |current| current.max(until));
        *guard = Some(until);
        self.metrics.set_pause(&self.provider, until);
    }

    async fn wait_for_pause(&self) {
        loop {
            let until = *lock(&self.pause_until);
            match until {
                Some(until) if until > Instant::now() => {
                    tokio::time::sleep_until(until.into()).await
                }
                _ => return,
            }
        }
    }

    /// Records how an answer was understood: API error metrics and provider health.
    fn record_outcome(&self, endpoint: Endpoint, outcome: Result<(), &UpstreamFailure>) {
        match outcome {
            Ok(()) => self.record_success(),
            Err(failure) => {
                if let Some(error) = failure.api_error {
                    self.metrics
                        .record_api_error(&self.provider, endpoint.as_str(), error);
                }
                let message = format!(
                    "{} request: {}",
                    endpoint.as_str(),
                    self.token.redact(&failure.message)
                );
                match failure.class {
                    FailureClass::Unauthorized => {
                        self.failures_in_a_row
                            .store(DOWN_AFTER_FAILURES, Ordering::Relaxed);
                        self.set_down(message);
                    }
                    // The provider as a whole is in trouble (or throttling us hard).
                    FailureClass::ServerError | FailureClass::RateLimited => {
                        self.record_failure(message)
                    }
                    // The provider answered sensibly about this one request.
                    FailureClass::NotFound | FailureClass::ClientError => {
                        self.record_success();
                        lock(&self.status).last_error = Some(message);
                    }
                    // One answer we could not read (one broken task, say): it says nothing
                    // about the provider's health either way.
                    FailureClass::InvalidResponse => {
                        lock(&self.status).last_error = Some(message);
                    }
                }
            }
        }
    }

    fn record_success(&self) {
        self.failures_in_a_row.store(0, Ordering::Relaxed);
        let now = SystemTime::now();
        let mut status = lock(&self.status);
        if !status.up && status.last_error.is_some() {
            tracing::info!(provider = %self.provider, "provider answers again");
        }
        status.up = true;
        status.last_success = Some(now);
        self.metrics
            .provider_up
            .with_label_values(&[&self.provider])
            .set(1);
        self.metrics
            .last_poll_success
            .with_label_values(&[&self.provider])
            .set(
                now.duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64(),
            );
    }

    fn record_failure(&self, message: String) {
        let n = self.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= DOWN_AFTER_FAILURES {
            self.set_down(message);
        } else {
            lock(&self.status).last_error = Some(message);
        }
    }

    fn set_down(&self, message: String) {
        let mut status = lock(&self.status);
        if status.up {
            tracing::warn!(provider = %self.provider, error = %message, "provider is down");
        }
        status.up = false;
        status.last_error = Some(truncate(&message, MAX_TEXT_LEN));
        self.metrics
            .provider_up
            .with_label_values(&[&self.provider])
            .set(0);
    }
}

/// Hands an answer's body to `parse`, or reports an oversized body as undecodable.
fn interpret<T>(
    answer: &Answer,
    parse: impl FnOnce(u16, &[u8]) -> Result<T, UpstreamFailure>,
) -> Result<T, UpstreamFailure> {
    match &answer.body {
        Some(body) => parse(answer.status, body),
        None => Err(UpstreamFailure {
            class: FailureClass::InvalidResponse,
            api_error: Some("invalid_response"),
            message: format!(
                "HTTP {}: body larger than {MAX_BODY_BYTES} bytes, not read",
                answer.status
            ),
        }),
    }
}

/// `base` (no query, no fragment) followed by `path` (an absolute path, maybe with a query):
/// the URL `Url::parse(base + path)` gives, without parsing scheme and host again.
fn join_url(base: &reqwest::Url, path: &str) -> reqwest::Url {
    let (path, query) = match path.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path, None),
    };
    let mut url = base.clone();
    if base.path() == "/" {
        url.set_path(path);
    } else {
        url.set_path(&format!("{}{path}", base.path()));
    }
    url.set_query(query);
    url
}

/// The `code` label of an HTTP status, without an allocation for the usual ones.
fn status_label(status: u16) -> Cow<'static, str> {
    Cow::Borrowed(match status {
        200 => "200",
        201 => "201",
        202 => "202",
        204 => "204",
        301 => "301",
        302 => "302",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        408 => "408",
        409 => "409",
        410 => "410",
        422 => "422",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        other => return Cow::Owned(other.to_string()),
    })
}

fn classify_reqwest_error(e: reqwest::Error) -> TransportError {
    if e.is_timeout() {
        TransportError::Timeout
    } else if e.is_connect() {
        TransportError::Connect
    } else {
        TransportError::Io
    }
}

/// Reads at most `cap` bytes of body; `None` when the body is larger (checked against
/// `Content-Length` first, then while streaming, so a huge body is never buffered whole).
async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Option<Bytes>, TransportError> {
    if response.content_length().is_some_and(|n| n > cap as u64) {
        return Ok(None);
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(classify_reqwest_error)? {
        if body.len() + chunk.len() > cap {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body.freeze()))
}

/// `Retry-After`: delay-seconds or an HTTP date (RFC 9110 §10.2.3).
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_urls_are_what_parsing_the_whole_url_gives() {
        for base in [
            "http://127.0.0.1:8080",
            "https://api.maxapi.io",
            "https://gateway.example/prefix",
            "https://gateway.example/a/b",
        ] {
            let parsed = reqwest::Url::parse(base).unwrap();
            for path in [
                "/api/v1/task/9db7d1ed-d1e5-4d11-9f3a-61f653b905ad",
                "/api/v1/images/img_01HQ9M7XJQ7PZ3GQ9F6C5W3N2M",
                "/api/v1/task/a%2Fb%3Fc%23d%20e%25",
                "/api/v1/history/images?page=2&limit=50",
                "/api/v1/account/balances",
            ] {
                let expected = reqwest::Url::parse(&format!("{base}{path}")).unwrap();
                assert_eq!(join_url(&parsed, path), expected, "{base} {path}");
            }
        }
        assert_eq!(status_label(200), "200");
        assert_eq!(status_label(418), "418");
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        let future = SystemTime::now() + Duration::from_secs(30);
        let d = parse_retry_after(&httpdate::fmt_http_date(future)).unwrap();
        assert!(
            d <= Duration::from_secs(30) && d >= Duration::from_secs(28),
            "{d:?}"
        );
        let past = SystemTime::now() - Duration::from_secs(30);
        assert_eq!(
            parse_retry_after(&httpdate::fmt_http_date(past)),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("-5"), None);
    }

    #[tokio::test]
    async fn rate_limiter_spaces_requests() {
        let limiter = RateLimiter::new(50.0);
        let start = Instant::now();
        for _ in 0..6 {
            limiter.acquire().await;
        }
        // Six slots at 20 ms spacing: the last starts 100 ms after the first.
        assert!(
            start.elapsed() >= Duration::from_millis(95),
            "{:?}",
            start.elapsed()
        );
    }
}
