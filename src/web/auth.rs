//! What every request passes before a route: the rate limit, basic auth, and the extra
//! response headers of the web configuration.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use tokio::sync::Semaphore;

use super::Web;
use super::config::RateLimit;
use crate::secret::Secret;

/// Successful checks remembered; past this the cache starts over.
const MAX_CACHED: usize = 1024;

/// Checks user and password against bcrypt hashes, remembering successful checks.
///
/// bcrypt takes 50-100 ms by design; a scraper that sends the same credentials every
/// 15 s should not pay that each time. The cache key is a SHA-256 of user, password and
/// hash, so the cache holds no password and a changed hash (reload) misses.
pub struct Verifier {
    cache: Mutex<HashSet<[u8; 32]>>,
    /// bcrypt checks running at once: a flood of wrong passwords queues here instead of
    /// taking every blocking thread.
    permits: Semaphore,
}

impl Default for Verifier {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Verifier {
            cache: Mutex::new(HashSet::new()),
            permits: Semaphore::new(cores),
        }
    }
}

fn cache_key(user: &str, password: &str, hash: &str) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [user, password, hash] {
        ctx.update(&(part.len() as u64).to_le_bytes());
        ctx.update(part.as_bytes());
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

/// A hash to check unknown users against, so that they take as long as known ones.
fn decoy_hash() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| bcrypt::hash("decoy", 10).unwrap_or_default())
}

impl Verifier {
    /// Whether `password` matches `hash` (`None`: unknown user, always false).
    pub async fn verify(&self, user: &str, password: &str, hash: Option<&Secret>) -> bool {
        let key = hash.map(|h| cache_key(user, password, h.expose()));
        if let Some(key) = &key
            && self.cache.lock().expect("auth cache lock").contains(key)
        {
            return true;
        }
        let Ok(_permit) = self.permits.acquire().await else {
            return false;
        };
        let password = password.to_string();
        let target = hash.map_or_else(|| decoy_hash().to_string(), |h| h.expose().to_string());
        let matched =
            tokio::task::spawn_blocking(move || bcrypt::verify(password, &target).unwrap_or(false))
                .await
                .unwrap_or(false);
        match key {
            Some(key) if matched => {
                let mut cache = self.cache.lock().expect("auth cache lock");
                if cache.len() >= MAX_CACHED {
                    cache.clear();
                }
                cache.insert(key);
                true
            }
            _ => false,
        }
    }
}

/// `Authorization: Basic base64(user:password)`.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

fn has_bearer(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer "))
}

/// Requests that skip basic auth: the health check when `--web.health-without-auth` is
/// given, and the routes that carry their own credential, checked by the route itself
/// (webhooks: `?token=`; the tasks API and reload: the bearer token, since one
/// `Authorization` header cannot carry both).
fn exempt(web: &Web, request: &Request) -> bool {
    let path = request.uri().path();
    let method = request.method();
    if web.health_without_auth
        && path == "/-/healthy"
        && (method == Method::GET || method == Method::HEAD)
    {
        return true;
    }
    if method == Method::POST && path.starts_with("/webhooks/") {
        return true;
    }
    has_bearer(request.headers())
        && ((method == Method::POST && (path == "/api/v1/tasks" || path == "/-/reload"))
            || (method == Method::DELETE && path.starts_with("/api/v1/tasks/")))
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Basic")],
        "Unauthorized\n",
    )
        .into_response()
}

/// The proxy route (`/proxy/{provider}/...`) authenticates with the provider key the
/// application sends, which the upstream checks; its answers go back unchanged.
fn is_proxied(request: &Request) -> bool {
    request.uri().path().starts_with("/proxy/")
}

/// The middleware: rate limit, basic auth, headers. Proxied requests pass untouched (TLS
/// still applies): one `Authorization` header cannot carry both basic auth and the
/// application's provider key, and a 401 or 429 of ours, or an added header, would change
/// what the application gets from its provider.
pub async fn guard(State(web): State<Arc<Web>>, request: Request, next: Next) -> Response {
    if is_proxied(&request) {
        return next.run(request).await;
    }
    let config = web.config();
    let mut response = if !web.limiter.allow(config.rate_limit) {
        (StatusCode::TOO_MANY_REQUESTS, "Too Many Requests\n").into_response()
    } else if config.users.is_empty() || exempt(&web, &request) {
        next.run(request).await
    } else {
        match basic_credentials(request.headers()) {
            Some((user, password))
                if web
                    .verifier
                    .verify(&user, &password, config.users.get(&user))
                    .await =>
            {
                next.run(request).await
            }
            _ => unauthorized(),
        }
    };
    for (name, value) in &config.headers {
        response.headers_mut().insert(name.clone(), value.clone());
    }
    response
}

/// `rate_limit`: a token bucket over every request (as in the toolkit).
#[derive(Default)]
pub struct Limiter {
    state: Mutex<Option<(RateLimit, f64, Instant)>>,
}

impl Limiter {
    fn allow(&self, limit: Option<RateLimit>) -> bool {
        let Some(limit) = limit else {
            return true;
        };
        let now = Instant::now();
        let mut state = self.state.lock().expect("limiter lock");
        let (current, tokens, last) = state.get_or_insert((limit, f64::from(limit.burst), now));
        if *current != limit {
            // Reloaded with other numbers: start full.
            *current = limit;
            *tokens = f64::from(limit.burst);
        }
        let refill = now.duration_since(*last).as_secs_f64() / limit.interval.as_secs_f64();
        *tokens = (*tokens + refill).min(f64::from(limit.burst));
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_parsed_strictly() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            "Basic YWxpY2U6czNjcjN0OmV4dHJh".parse().unwrap(),
        );
        assert_eq!(
            basic_credentials(&h),
            Some(("alice".into(), "s3cr3t:extra".into()))
        );
        h.insert(header::AUTHORIZATION, "basic YWxpY2U6".parse().unwrap());
        assert_eq!(basic_credentials(&h), Some(("alice".into(), String::new())));
        for bad in [
            "Bearer YWxpY2U6eA==",
            "Basic !!!",
            "Basic YWxpY2U=",
            "Basic",
        ] {
            h.insert(header::AUTHORIZATION, bad.parse().unwrap());
            assert_eq!(basic_credentials(&h), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn successful_checks_are_cached_and_unknown_users_fail() {
        let hash = Secret::new(bcrypt::hash("right", 4).unwrap());
        let v = Verifier::default();
        assert!(!v.verify("alice", "wrong", Some(&hash)).await);
        assert!(
            v.cache.lock().unwrap().is_empty(),
            "failures are not cached"
        );
        assert!(v.verify("alice", "right", Some(&hash)).await);
        assert_eq!(v.cache.lock().unwrap().len(), 1);
        assert!(v.verify("alice", "right", Some(&hash)).await);
        assert!(!v.verify("bob", "right", None).await);
        let other = Secret::new(bcrypt::hash("other", 4).unwrap());
        assert!(
            !v.verify("alice", "right", Some(&other)).await,
            "a new hash misses"
        );
    }

    #[test]
    fn limiter_allows_a_burst_then_refills() {
        let l = Limiter::default();
        let limit = Some(RateLimit {
            burst: 2,
            interval: std::time::Duration::from_secs(3600),
        });
        assert!(l.allow(limit) && l.allow(limit));
        assert!(!l.allow(limit));
        assert!(l.allow(None));
    }
}
