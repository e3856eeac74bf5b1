//! HTTP routes: both providers' APIs and the `/_sim/*` reports.
//!
//! Every provider request goes through the same gate, in this order: count it, outage window
//! (503), rate-limit bucket (429, `Retry-After: 1`), key check (the provider's 401 shape),
//! then at most one injected fault (500, 429, a held answer, or a malformed 200). Only then
//! is the request answered from the task store. No handler can panic: every parse failure
//! becomes the provider's documented error shape.

use std::time::Instant;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::Value;

use super::config::ModelKind;
use super::faults::{HTML_ERROR_PAGE, Injected, Refusal};
use super::state::find_model;
use super::{SimProvider, Simulator, wire};

/// Largest maxapi submit `input` kept (serialized bytes); tasks echo it on every answer.
const MAX_INPUT_BYTES: usize = 8 * 1024;
/// Most ids one `/_sim/tasks` answer lists.
const MAX_TASK_LIST: usize = 10_000;

pub(super) fn router(sim: Simulator) -> Router {
    Router::new()
        .route("/api/v1/task/submit", post(maxapi_submit))
        .route("/api/v1/task/{task_id}", get(maxapi_task))
        .route("/api/v1/images/history", get(images_history))
        .route("/api/v1/videos/history", get(videos_history))
        .route("/api/v1/audio/history", get(audio_history))
        .route("/api/v1/images/{id}", get(images_task))
        .route("/api/v1/videos/{id}", get(videos_task))
        .route("/api/v1/audio/{id}", get(audio_task))
        .route("/api/v1/account/balances", get(apimall_balance))
        .route("/_sim/truth", get(sim_truth))
        .route("/_sim/polls", get(sim_polls))
        .route("/_sim/tasks", get(sim_tasks))
        .route("/_sim/outcomes", get(sim_outcomes))
        .with_state(sim)
}

/// An admitted request: which key made it and the fault to inject, if any.
struct Admitted {
    key_slot: u32,
    fingerprint: String,
    fault: Option<Injected>,
    request_id: String,
}

/// A JSON answer before fault post-processing.
struct Answer {
    status: StatusCode,
    body: Vec<u8>,
}

impl Answer {
    fn ok(body: Vec<u8>) -> Self {
        Answer {
            status: StatusCode::OK,
            body,
        }
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        Body::from(body),
    )
        .into_response()
}

fn error_body(p: SimProvider, status: StatusCode, request_id: String) -> Vec<u8> {
    match p {
        SimProvider::Maxapi => match status {
            StatusCode::UNAUTHORIZED => wire::maxapi_error(401, "unauthorized"),
            StatusCode::NOT_FOUND => wire::maxapi_error(404, "task not found"),
            StatusCode::TOO_MANY_REQUESTS => wire::maxapi_error(429, "too many requests"),
            _ => wire::maxapi_error(500, "internal server error"),
        },
        SimProvider::Apimall => {
            let (code, message) = match status {
                StatusCode::UNAUTHORIZED => ("unauthorized", "Missing or invalid API key"),
                StatusCode::NOT_FOUND => ("not_found", "Task not found"),
                StatusCode::TOO_MANY_REQUESTS => (
                    "rate_limit_exceeded",
                    "rate limit exceeded or too many concurrent jobs",
                ),
                _ => ("internal_error", "Internal server error"),
            };
            wire::apimall_error(code, message, request_id)
        }
    }
}

impl Simulator {
    /// Count the request and run the gate. `Err` is the finished refusal.
    fn admit(
        &self,
        p: SimProvider,
        endpoint: &'static str,
        headers: &HeaderMap,
    ) -> Result<Admitted, Box<Response>> {
        let pcfg = p.config(&self.inner.cfg);
        let request_id = self.next_request_id();
        let uptime = self.uptime();
        let mut st = self.lock();
        st.provider(p).count_request(endpoint);
        let refusal = st.faults[p.index()].refuse(&pcfg.faults, uptime, Instant::now());
        let refused = |st: &mut super::state::State, status: StatusCode| {
            st.provider(p).count_response(status.as_u16());
        };
        match refusal {
            Some(Refusal::Outage) => {
                st.provider(p).faults.outage_503 += 1;
                refused(&mut st, StatusCode::SERVICE_UNAVAILABLE);
                return Err(Box::new(
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [(header::CONTENT_TYPE, "text/plain")],
                        "Service Unavailable\n",
                    )
                        .into_response(),
                ));
            }
            Some(Refusal::RateLimited) => {
                st.provider(p).faults.rate_limited += 1;
                refused(&mut st, StatusCode::TOO_MANY_REQUESTS);
                drop(st);
                let body = error_body(p, StatusCode::TOO_MANY_REQUESTS, request_id);
                return Err(Box::new(with_retry_after(
                    json_response(StatusCode::TOO_MANY_REQUESTS, body),
                    Some(1),
                )));
            }
            None => {}
        }
        let Some((key_slot, fingerprint)) = authorize(headers, &pcfg.api_keys) else {
            st.provider(p).faults.unauthorized_401 += 1;
            refused(&mut st, StatusCode::UNAUTHORIZED);
            drop(st);
            let body = error_body(p, StatusCode::UNAUTHORIZED, request_id);
            return Err(Box::new(json_response(StatusCode::UNAUTHORIZED, body)));
        };
        let fault = st.faults[p.index()].inject(&pcfg.faults);
        let status = match fault {
            Some(Injected::Error500) => Some(StatusCode::INTERNAL_SERVER_ERROR),
            Some(Injected::Error429) => Some(StatusCode::TOO_MANY_REQUESTS),
            _ => None,
        };
        let counts = &mut st.provider(p).faults;
        match fault {
            Some(Injected::Error500) => counts.error_500 += 1,
            Some(Injected::Error429) => counts.error_429 += 1,
            Some(Injected::Timeout) => counts.timeouts += 1,
            Some(Injected::Malformed { .. }) => counts.malformed += 1,
            None => {}
        }
        if let Some(status) = status {
            refused(&mut st, status);
            drop(st);
            let body = error_body(p, status, request_id);
            let resp = json_response(status, body);
            return Err(Box::new(if status == StatusCode::TOO_MANY_REQUESTS {
                with_retry_after(resp, pcfg.faults.retry_after)
            } else {
                resp
            }));
        }
        Ok(Admitted {
            key_slot,
            fingerprint,
            fault,
            request_id,
        })
    }

    /// Hold the request if a timeout fault was drawn.
    async fn hold(&self, p: SimProvider, adm: &Admitted) {
        if adm.fault == Some(Injected::Timeout) {
            tokio::time::sleep(p.config(&self.inner.cfg).faults.timeout_delay).await;
        }
    }

    /// Apply a malformed-body fault and count the final status.
    fn finish(&self, p: SimProvider, adm: &Admitted, answer: Answer) -> Response {
        let resp = match adm.fault {
            Some(Injected::Malformed { html: true }) => (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/html")],
                HTML_ERROR_PAGE,
            )
                .into_response(),
            Some(Injected::Malformed { html: false }) => {
                let mut body = answer.body;
                body.truncate(body.len() / 2);
                json_response(StatusCode::OK, body)
            }
            _ => json_response(answer.status, answer.body),
        };
        self.lock()
            .provider(p)
            .count_response(resp.status().as_u16());
        resp
    }
}

fn with_retry_after(mut resp: Response, secs: Option<u64>) -> Response {
    if let Some(s) = secs {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    resp
}

/// `Authorization: Bearer <key>` checked against `keys` (any non-empty key when the list is
/// empty). Returns the key's poll-mask slot and fingerprint.
fn authorize(headers: &HeaderMap, keys: &[String]) -> Option<(u32, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.trim().split_once(' ')?;
    let key = key.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || key.is_empty() {
        return None;
    }
    let (hash, fingerprint) = wire::fingerprint(key);
    if keys.is_empty() {
        return Some((hash % 64, fingerprint));
    }
    let slot = keys.iter().position(|k| k == key)?;
    Some((slot as u32, fingerprint))
}

// ---------------------------------------------------------------- maxapi

async fn maxapi_task(
    State(sim): State<Simulator>,
    Path(task_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let p = SimProvider::Maxapi;
    let adm = match sim.admit(p, "task", &headers) {
        Ok(a) => a,
        Err(resp) => return *resp,
    };
    sim.hold(p, &adm).await;
    let answer = {
        let now = Instant::now();
        let mut st = sim.advanced();
        let ps = st.provider(p);
        ps.record_poll(&task_id, now, adm.key_slot, &adm.fingerprint);
        match ps.tasks.get(task_id.as_str()) {
            Some(e) => Answer::ok(wire::maxapi_task_body(&e.plan, now)),
            None => Answer {
                status: StatusCode::NOT_FOUND,
                body: wire::maxapi_error(404, "task not found"),
            },
        }
    };
    sim.finish(p, &adm, answer)
}

/// `POST /api/v1/task/submit`: validation problems answer HTTP 200 with envelope `code` 400
/// (the documentation does not say which HTTP status goes with them; clients must handle this
/// form, so the simulator exercises it).
async fn maxapi_submit(State(sim): State<Simulator>, headers: HeaderMap, body: Bytes) -> Response {
    let p = SimProvider::Maxapi;
    let adm = match sim.admit(p, "submit", &headers) {
        Ok(a) => a,
        Err(resp) => return *resp,
    };
    sim.hold(p, &adm).await;
    let invalid = |msg: &'static str| Answer::ok(wire::maxapi_error(400, msg));
    let answer = match parse_submit(&sim, &body) {
        Err(msg) => invalid(msg),
        // A malformed answer must not create a task: faults never change state.
        Ok(_) if matches!(adm.fault, Some(Injected::Malformed { .. })) => Answer::ok(
            wire::maxapi_submitted("00000000-0000-4000-8000-000000000000"),
        ),
        Ok((model, input, callback)) => {
            let id = sim.lock().create(
                &sim.inner.cfg,
                p,
                Some(&model),
                std::time::Duration::ZERO,
                Some(input),
                callback,
            );
            Answer::ok(wire::maxapi_submitted(&id))
        }
    };
    sim.finish(p, &adm, answer)
}

type Submit = (String, Value, Option<String>);

fn parse_submit(sim: &Simulator, body: &[u8]) -> Result<Submit, &'static str> {
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(body) else {
        return Err("invalid request body");
    };
    let Some(Value::String(model)) = req.get("model") else {
        return Err("model is required");
    };
    if find_model(&sim.inner.cfg.maxapi, model).is_none() {
        return Err("model not supported");
    }
    let mut input = match req.get("input") {
        None | Some(Value::Null) => serde_json::Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err("input must be an object"),
    };
    input.insert("model".to_string(), Value::String(model.clone()));
    let input = Value::Object(input);
    if serde_json::to_vec(&input).map_or(true, |b| b.len() > MAX_INPUT_BYTES) {
        return Err("input too large");
    }
    let callback = match req.get("callBackUrl") {
        None | Some(Value::Null) => None,
        Some(Value::String(u)) if !u.is_empty() => Some(u.clone()),
        Some(_) => return Err("callBackUrl must be a URL"),
    };
    Ok((model.clone(), input, callback))
}

// ---------------------------------------------------------------- apimall

async fn apimall_task(
    State(sim): State<Simulator>,
    Path(id): Path<String>,
    headers: HeaderMap,
    kind: ModelKind,
) -> Response {
    let p = SimProvider::Apimall;
    let adm = match sim.admit(p, "task", &headers) {
        Ok(a) => a,
        Err(resp) => return *resp,
    };
    sim.hold(p, &adm).await;
    let answer = {
        let now = Instant::now();
        let mut st = sim.advanced();
        let ps = st.provider(p);
        ps.record_poll(&id, now, adm.key_slot, &adm.fingerprint);
        // An id of another kind (or malformed) is unknown on this path.
        match ps.tasks.get(id.as_str()).filter(|e| e.plan.kind == kind) {
            Some(e) if wire::is_apimall_id(&id, kind) => Answer::ok(wire::apimall_task_body(
                &e.plan,
                now,
                adm.request_id.clone(),
            )),
            _ => Answer {
                status: StatusCode::NOT_FOUND,
                body: wire::apimall_error("not_found", "Task not found", adm.request_id.clone()),
            },
        }
    };
    sim.finish(p, &adm, answer)
}

async fn images_task(s: State<Simulator>, id: Path<String>, h: HeaderMap) -> Response {
    apimall_task(s, id, h, ModelKind::Image).await
}

async fn videos_task(s: State<Simulator>, id: Path<String>, h: HeaderMap) -> Response {
    apimall_task(s, id, h, ModelKind::Video).await
}

async fn audio_task(s: State<Simulator>, id: Path<String>, h: HeaderMap) -> Response {
    apimall_task(s, id, h, ModelKind::Audio).await
}

async fn images_history(s: State<Simulator>, q: RawQuery, h: HeaderMap) -> Response {
    apimall_history(s, q, h, ModelKind::Image).await
}

async fn videos_history(s: State<Simulator>, q: RawQuery, h: HeaderMap) -> Response {
    apimall_history(s, q, h, ModelKind::Video).await
}

async fn audio_history(s: State<Simulator>, q: RawQuery, h: HeaderMap) -> Response {
    apimall_history(s, q, h, ModelKind::Audio).await
}

async fn apimall_history(
    State(sim): State<Simulator>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    kind: ModelKind,
) -> Response {
    let p = SimProvider::Apimall;
    let adm = match sim.admit(p, "history", &headers) {
        Ok(a) => a,
        Err(resp) => return *resp,
    };
    sim.hold(p, &adm).await;
    let q = query.unwrap_or_default();
    let page = match query_u64(&q, "page") {
        Ok(v) => v.unwrap_or(1),
        Err(()) => 0,
    };
    let limit = match query_u64(&q, "limit") {
        Ok(v) => v.unwrap_or(20),
        Err(()) => 0,
    };
    let answer = if page < 1 {
        bad_request(&adm, "page must be a positive integer")
    } else if !(1..=50).contains(&limit) {
        bad_request(&adm, "limit must be between 1 and 50")
    } else {
        let now = Instant::now();
        let mut st = sim.advanced();
        let ps = st.provider(p);
        let ids = &ps.by_kind[kind.index()];
        // Newest first: item i of the listing is ids[len - 1 - i].
        let skip = (page - 1).saturating_mul(limit);
        let plans = (0..limit)
            .filter_map(|i| {
                let back = usize::try_from(skip.checked_add(i)?).ok()?;
                let idx = ids.len().checked_sub(back + 1)?;
                ids.get(idx)
            })
            .filter_map(|id| ps.tasks.get(id).map(|e| &*e.plan));
        Answer::ok(wire::apimall_history_body(
            plans,
            now,
            page,
            limit,
            adm.request_id.clone(),
        ))
    };
    sim.finish(p, &adm, answer)
}

fn bad_request(adm: &Admitted, message: &str) -> Answer {
    Answer {
        status: StatusCode::BAD_REQUEST,
        body: wire::apimall_error("invalid_request", message, adm.request_id.clone()),
    }
}

async fn apimall_balance(State(sim): State<Simulator>, headers: HeaderMap) -> Response {
    let p = SimProvider::Apimall;
    let adm = match sim.admit(p, "balance", &headers) {
        Ok(a) => a,
        Err(resp) => return *resp,
    };
    sim.hold(p, &adm).await;
    let balance = sim.advanced().provider(p).balance;
    let answer = Answer::ok(wire::apimall_balance_body(balance, adm.request_id.clone()));
    sim.finish(p, &adm, answer)
}

// ---------------------------------------------------------------- /_sim

/// `Ok(None)` when absent, `Err` when present but not an unsigned integer.
fn query_u64(query: &str, key: &str) -> Result<Option<u64>, ()> {
    match query_str(query, key) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| ()),
    }
}

fn query_str<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn sim_json<T: serde::Serialize>(v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn sim_bad_request(message: &'static str) -> Response {
    (StatusCode::BAD_REQUEST, message).into_response()
}

async fn sim_truth(State(sim): State<Simulator>) -> Response {
    sim_json(&sim.truth())
}

async fn sim_polls(State(sim): State<Simulator>, RawQuery(query): RawQuery) -> Response {
    let q = query.unwrap_or_default();
    let provider = match query_str(&q, "provider") {
        None => None,
        Some(name) => match SimProvider::parse(name) {
            Some(p) => Some(p),
            None => return sim_bad_request("provider must be maxapi or apimall\n"),
        },
    };
    sim_json(&sim.polls(provider))
}

async fn sim_tasks(State(sim): State<Simulator>, RawQuery(query): RawQuery) -> Response {
    let q = query.unwrap_or_default();
    let Some(provider) = query_str(&q, "provider").and_then(SimProvider::parse) else {
        return sim_bad_request("provider=maxapi or provider=apimall is required\n");
    };
    let (Ok(after), Ok(limit)) = (query_u64(&q, "after"), query_u64(&q, "limit")) else {
        return sim_bad_request("after and limit must be unsigned integers\n");
    };
    let limit = limit
        .map_or(MAX_TASK_LIST, |l| {
            usize::try_from(l).unwrap_or(MAX_TASK_LIST)
        })
        .min(MAX_TASK_LIST);
    sim_json(&sim.task_ids(provider, after.unwrap_or(0), limit))
}

async fn sim_outcomes(State(sim): State<Simulator>, RawQuery(query): RawQuery) -> Response {
    let q = query.unwrap_or_default();
    let Some(provider) = query_str(&q, "provider").and_then(SimProvider::parse) else {
        return sim_bad_request("provider=maxapi or provider=apimall is required\n");
    };
    sim_json(&sim.outcomes(provider))
}
