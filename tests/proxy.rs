//! The reverse proxy over real listeners on 127.0.0.1: a local upstream that speaks enough of
//! both provider APIs, a "victim" listener that no request may reach, and the proxy on its
//! own router. Applications are reqwest clients, or raw TCP where a client library would
//! normalize the trick away before sending it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use genai_task_exporter::providers::reasons::FailureRules;
use genai_task_exporter::proxy::{
    ProviderKind, ProviderProxy, ProxyCode, ProxyEndpoint, ProxyObserver, ProxySettings,
    ProxyTable, Refusal, RejectReason, Submission, TaskAnswer, router,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const APP_KEY: &str = "Bearer app-key-5f1c";
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// The upstream responder
// ---------------------------------------------------------------------------------------

/// One request as the upstream received it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    uri: String,
    headers: HeaderMap,
    body_len: usize,
}

#[derive(Default)]
struct UpstreamState {
    seen: Mutex<Vec<Seen>>,
    /// Lets `/stream` send its second half, and `/slow` answer.
    release: Notify,
}

fn json(status: u16, body: String) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [("content-type", "application/json"), ("x-upstream", "1")],
        body,
    )
        .into_response()
}

/// maxapi at `/api/v1/...`, apimall at `/gw/api/v1/...`, and a few test routes.
async fn upstream(State(state): State<Arc<UpstreamState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    state.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body_len: body.len(),
    });
    let authorized = parts
        .headers
        .get("authorization")
        .is_some_and(|v| v == APP_KEY);
    let path = parts.uri.path();
    match (parts.method.as_str(), path) {
        ("POST", "/api/v1/task/submit") => {
            let prompt = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.pointer("/input/prompt")?.as_str().map(str::to_string))
                .unwrap_or_default();
            if !authorized {
                return json(401, r#"{"code":401,"msg":"unauthorized"}"#.into());
            }
            match prompt.as_str() {
                "nsfw" => json(400, r#"{"code":400,"msg":"content rejected by moderation"}"#.into()),
                "busy" => {
                    let mut response = json(429, r#"{"code":429,"msg":"too many requests"}"#.into());
                    response.headers_mut().insert("retry-after", "7".parse().unwrap());
                    response
                }
                "boom" => (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response(),
                _ => json(200, format!(r#"{{"code":0,"msg":"ok","data":{{"taskId":"task-{prompt}"}}}}"#)),
            }
        }
        ("GET", _) if path.starts_with("/api/v1/task/task-") => {
            let id = path.trim_start_matches("/api/v1/task/");
            json(
                200,
                format!(r#"{{"code":0,"msg":"ok","data":{{"taskId":"{id}","status":"PENDING"}}}}"#),
            )
        }
        ("GET", _) if path.starts_with("/api/v1/task/") => {
            json(404, r#"{"code":404,"msg":"task not found"}"#.into())
        }
        ("POST", "/gw/api/v1/images/generate") => json(
            200,
            r#"{"success":true,"data":{"task_id":"img_01HQ","credits_used":8,"remaining_credits":112},"request_id":"req_1"}"#.into(),
        ),
        ("POST", "/echo") => (
            [("content-type", "application/octet-stream"), ("x-upstream", "1")],
            body,
        )
            .into_response(),
        ("GET", "/hop") => Response::builder()
            .header("connection", "x-drop")
            .header("x-drop", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-authenticate", "Basic")
            .header("x-kept", "1")
            .body(Body::from("hop"))
            .unwrap(),
        ("GET", "/stream") => {
            let state = Arc::clone(&state);
            let chunks = futures_util::stream::unfold(0, move |step| {
                let state = Arc::clone(&state);
                async move {
                    match step {
                        0 => Some((Ok::<_, std::io::Error>(Bytes::from("first\n")), 1)),
                        1 => {
                            state.release.notified().await;
                            Some((Ok(Bytes::from("second\n")), 2))
                        }
                        _ => None,
                    }
                }
            });
            Response::new(Body::from_stream(chunks))
        }
        ("GET", "/slow") => {
            state.release.notified().await;
            "late".into_response()
        }
        _ => json(404, r#"{"code":404,"msg":"no route"}"#.into()),
    }
}

async fn serve(app: axum::Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

async fn start_upstream() -> (SocketAddr, Arc<UpstreamState>) {
    let state = Arc::new(UpstreamState::default());
    let app = axum::Router::new()
        .fallback(upstream)
        .with_state(Arc::clone(&state));
    (serve(app).await, state)
}

/// A listener that only counts what reaches it.
async fn start_victim() -> (SocketAddr, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    let app = axum::Router::new().fallback(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        async { "victim" }
    });
    (serve(app).await, hits)
}

// ---------------------------------------------------------------------------------------
// The observer and the proxy
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Event {
    Finished(String, ProxyEndpoint, ProxyCode),
    Refused(String, Refusal),
    Submitted(String, Submission),
    Rejected(String, RejectReason),
    Answer(String, TaskAnswer),
}

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    fn finished(&self) -> Vec<(ProxyEndpoint, ProxyCode)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Finished(_, endpoint, code) => Some((endpoint, code)),
                _ => None,
            })
            .collect()
    }

    /// Waits until `count` requests have been reported finished or refused.
    async fn wait_for_requests(&self, count: usize) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let events = self.events();
            let done = events
                .iter()
                .filter(|e| matches!(e, Event::Finished(..) | Event::Refused(..)))
                .count();
            if done >= count {
                return events;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{count} requests: {events:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl ProxyObserver for Recorder {
    fn request_finished(
        &self,
        provider: &str,
        endpoint: ProxyEndpoint,
        code: ProxyCode,
        _: Duration,
    ) {
        self.events
            .lock()
            .unwrap()
            .push(Event::Finished(provider.into(), endpoint, code));
    }
    fn request_refused(&self, provider: &str, refusal: Refusal) {
        self.events
            .lock()
            .unwrap()
            .push(Event::Refused(provider.into(), refusal));
    }
    fn task_submitted(&self, provider: &str, submission: Submission) {
        self.events
            .lock()
            .unwrap()
            .push(Event::Submitted(provider.into(), submission));
    }
    fn submit_rejected(&self, provider: &str, reason: RejectReason) {
        self.events
            .lock()
            .unwrap()
            .push(Event::Rejected(provider.into(), reason));
    }
    fn task_answer(&self, provider: &str, answer: TaskAnswer) {
        self.events
            .lock()
            .unwrap()
            .push(Event::Answer(provider.into(), answer));
    }
}

struct Setup {
    proxy: SocketAddr,
    upstream: SocketAddr,
    upstream_state: Arc<UpstreamState>,
    recorder: Arc<Recorder>,
}

impl Setup {
    /// maxapi at the upstream's root, apimall under `/gw`.
    async fn start(adjust: impl Fn(&mut ProxySettings)) -> Setup {
        let (upstream, upstream_state) = start_upstream().await;
        let recorder = Arc::new(Recorder::default());
        let mut maxapi = ProxySettings::default();
        adjust(&mut maxapi);
        let apimall = ProxySettings::default();
        let table = ProxyTable::new([
            proxy(
                "maxapi",
                ProviderKind::Maxapi,
                &format!("http://{upstream}"),
                &maxapi,
                &recorder,
            ),
            proxy(
                "apimall",
                ProviderKind::Apimall,
                &format!("http://{upstream}/gw/"),
                &apimall,
                &recorder,
            ),
        ]);
        let proxy = serve(router(table)).await;
        Setup {
            proxy,
            upstream,
            upstream_state,
            recorder,
        }
    }

    fn direct(&self, path: &str) -> String {
        format!("http://{}{path}", self.upstream)
    }

    fn proxied(&self, path: &str) -> String {
        format!("http://{}/proxy/maxapi{path}", self.proxy)
    }

    fn seen(&self) -> Vec<Seen> {
        self.upstream_state.seen.lock().unwrap().clone()
    }
}

fn proxy(
    name: &str,
    kind: ProviderKind,
    base_url: &str,
    settings: &ProxySettings,
    recorder: &Arc<Recorder>,
) -> ProviderProxy {
    let observer: Arc<dyn ProxyObserver> = Arc::clone(recorder) as Arc<dyn ProxyObserver>;
    ProviderProxy::new(
        name,
        kind,
        base_url,
        settings,
        FailureRules::defaults(),
        observer,
    )
    .unwrap()
}

fn client() -> reqwest::Client {
    genai_task_exporter::upstream::install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Status, headers (without `date`, which moves with the clock) and body.
async fn exchange(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    body: Vec<u8>,
) -> (u16, Vec<(String, String)>, Bytes) {
    let response = client
        .request(method, url)
        .header("authorization", APP_KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let mut headers: Vec<(String, String)> = response
        .headers()
        .iter()
        .filter(|(name, _)| *name != "date")
        .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
        .collect();
    headers.sort();
    (status, headers, response.bytes().await.unwrap())
}

/// Sends `request` as written and returns the status and the whole answer text.
async fn raw(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, text)
}

fn submit_body(prompt: &str) -> Vec<u8> {
    format!(r#"{{"model":"nano-banana","input":{{"prompt":"{prompt}"}}}}"#).into_bytes()
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_identical_to_direct_calls_and_observed_once() {
    let setup = Setup::start(|_| {}).await;
    let client = client();
    let five_mib: Vec<u8> = (0..5 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let cases: Vec<(reqwest::Method, &str, Vec<u8>, u16)> = vec![
        (
            reqwest::Method::POST,
            "/api/v1/task/submit",
            submit_body("cat"),
            200,
        ),
        (
            reqwest::Method::POST,
            "/api/v1/task/submit",
            submit_body("nsfw"),
            400,
        ),
        (
            reqwest::Method::POST,
            "/api/v1/task/submit",
            submit_body("busy"),
            429,
        ),
        (
            reqwest::Method::POST,
            "/api/v1/task/submit",
            submit_body("boom"),
            500,
        ),
        (
            reqwest::Method::GET,
            "/api/v1/task/task-cat",
            Vec::new(),
            200,
        ),
        (
            reqwest::Method::GET,
            "/api/v1/task/unknown-id",
            Vec::new(),
            404,
        ),
        (reqwest::Method::POST, "/echo", five_mib.clone(), 200),
    ];
    for (index, (method, path, body, status)) in cases.iter().enumerate() {
        let direct = exchange(&client, method.clone(), &setup.direct(path), body.clone()).await;
        let proxied = exchange(&client, method.clone(), &setup.proxied(path), body.clone()).await;
        assert_eq!(direct.0, *status, "{path}");
        assert_eq!(proxied.0, direct.0, "{path}");
        assert_eq!(proxied.1, direct.1, "{path}");
        assert_eq!(proxied.2, direct.2, "{path}");
        // Exactly one report per request, and it arrives after each answer.
        let events = setup.recorder.wait_for_requests(index + 1).await;
        assert_eq!(setup.recorder.finished().len(), index + 1, "{events:?}");
    }
    let (_, headers, _) = exchange(
        &client,
        reqwest::Method::POST,
        &setup.proxied("/api/v1/task/submit"),
        submit_body("busy"),
    )
    .await;
    assert!(
        headers.contains(&("retry-after".into(), "7".into())),
        "{headers:?}"
    );
    // Reports are spawned: wait for this one so that the next comes after it.
    setup.recorder.wait_for_requests(cases.len() + 1).await;

    // 401: the application's own key decides, whatever the exporter holds.
    let unauthorized = client
        .post(setup.proxied("/api/v1/task/submit"))
        .header("authorization", "Bearer wrong")
        .body(submit_body("cat"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    assert_eq!(
        unauthorized.text().await.unwrap(),
        r#"{"code":401,"msg":"unauthorized"}"#
    );

    // The 5 MiB body arrived whole, twice (direct and proxied).
    let echoes: Vec<usize> = setup
        .seen()
        .iter()
        .filter(|s| s.uri == "/echo")
        .map(|s| s.body_len)
        .collect();
    assert_eq!(echoes, [five_mib.len(), five_mib.len()]);

    let events = setup.recorder.wait_for_requests(cases.len() + 2).await;
    use ProxyEndpoint::*;
    assert_eq!(
        setup.recorder.finished(),
        [
            (Submit, ProxyCode::Status(200)),
            (Submit, ProxyCode::Status(400)),
            (Submit, ProxyCode::Status(429)),
            (Submit, ProxyCode::Status(500)),
            (Task, ProxyCode::Status(200)),
            (Task, ProxyCode::Status(404)),
            (Other, ProxyCode::Status(200)),
            (Submit, ProxyCode::Status(429)),
            (Submit, ProxyCode::Status(401)),
        ]
    );
    let submitted: Vec<&Submission> = events
        .iter()
        .filter_map(|e| match e {
            Event::Submitted(p, s) if p == "maxapi" => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(
        submitted,
        [&Submission {
            task_id: "task-cat".into(),
            credits_used: None,
            remaining_credits: None
        }]
    );
    let rejected: Vec<&RejectReason> = events
        .iter()
        .filter_map(|e| match e {
            Event::Rejected(_, r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(rejected, [&RejectReason::ContentModeration]);
    let mut answers: Vec<(String, u16)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Answer(_, a) => Some((a.task_id.clone(), a.status)),
            _ => None,
        })
        .collect();
    answers.sort();
    assert_eq!(
        answers,
        [("task-cat".into(), 200), ("unknown-id".into(), 404)]
    );
    let body = events.iter().find_map(|e| match e {
        Event::Answer(_, a) if a.status == 200 => Some(a.body.clone()),
        _ => None,
    });
    assert_eq!(
        body.unwrap(),
        r#"{"code":0,"msg":"ok","data":{"taskId":"task-cat","status":"PENDING"}}"#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apimall_submissions_carry_credits_through_a_base_path() {
    let setup = Setup::start(|_| {}).await;
    let response = client()
        .post(format!(
            "http://{}/proxy/apimall/api/v1/images/generate",
            setup.proxy
        ))
        .header("authorization", APP_KEY)
        .body(r#"{"model":"nano-banana","prompt":"a cat"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = setup.recorder.wait_for_requests(1).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut events = events;
    while !events.iter().any(|e| matches!(e, Event::Submitted(..))) {
        assert!(tokio::time::Instant::now() < deadline, "{events:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
        events = setup.recorder.events();
    }
    assert!(events.contains(&Event::Submitted(
        "apimall".into(),
        Submission {
            task_id: "img_01HQ".into(),
            credits_used: Some(8.0),
            remaining_credits: Some(112.0)
        }
    )));
    assert_eq!(setup.seen()[0].uri, "/gw/api/v1/images/generate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_stripped_and_authorization_passes_unchanged() {
    let setup = Setup::start(|_| {}).await;
    let request = format!(
        "GET /proxy/maxapi/api/v1/task/task-a?x=1 HTTP/1.1\r\nHost: {}\r\n\
         Connection: close, X-Hop-Named\r\nX-Hop-Named: 1\r\nKeep-Alive: timeout=5\r\n\
         TE: trailers\r\nTrailer: X-T\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n\
         Proxy-Connection: keep-alive\r\nX-Forwarded-Host: evil.example\r\n\
         Authorization: {APP_KEY}\r\nX-App: kept\r\n\r\n",
        setup.proxy
    );
    let (status, _) = raw(setup.proxy, &request).await;
    assert_eq!(status, 200);
    let seen = setup.seen();
    assert_eq!(seen.len(), 1);
    let headers = &seen[0].headers;
    assert_eq!(seen[0].uri, "/api/v1/task/task-a?x=1");
    assert_eq!(headers["authorization"], APP_KEY);
    assert_eq!(headers["x-app"], "kept");
    assert_eq!(headers["host"], setup.upstream.to_string());
    for name in [
        "x-hop-named",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        "x-forwarded-host",
        "transfer-encoding",
    ] {
        assert!(!headers.contains_key(name), "{name} reached the upstream");
    }

    // Without the application's key, no key at all goes upstream.
    let response = client()
        .get(setup.proxied("/api/v1/task/task-b"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(!setup.seen()[1].headers.contains_key("authorization"));

    // And the upstream's hop-by-hop headers do not come back.
    let response = client().get(setup.proxied("/hop")).send().await.unwrap();
    let headers = response.headers();
    assert_eq!(headers["x-kept"], "1");
    for name in ["x-drop", "keep-alive", "proxy-authenticate"] {
        assert!(!headers.contains_key(name), "{name} came back");
    }
    assert_eq!(response.text().await.unwrap(), "hop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_reach_no_other_host() {
    let setup = Setup::start(|_| {}).await;
    let (victim, victim_hits) = start_victim().await;
    let tricks = [
        "/proxy/maxapi/..".to_string(),
        "/proxy/maxapi/api/../../x".into(),
        "/proxy/maxapi/api/%2e%2e/%2E%2E/x".into(),
        "/proxy/maxapi/api/.%2e/x".into(),
        "/proxy/maxapi/api%2F..%2F..%2Fx".into(),
        "/proxy/maxapi/..%2f..%2fx".into(),
        "/proxy/maxapi/api/..;/x".into(),
        "/proxy/maxapi/%5c%5c127.0.0.1/x".into(),
        format!("/proxy/maxapi//{victim}/x"),
        format!("/proxy/maxapi/http://{victim}/x"),
        format!("/proxy/maxapi/@{victim}/x"),
        format!("/proxy/maxapi/user%40{victim}/x"),
        format!("/proxy/maxapi/api/x%0d%0aHost:%20{victim}"),
        format!("/proxy/maxapi/api/x?a=%0d%0aHost:%20{victim}"),
        "/proxy/maxapi/api/%252e%252e/x".into(),
        "/proxy/maxapi/api/%00".into(),
    ];
    for trick in &tricks {
        let request =
            format!("GET {trick} HTTP/1.1\r\nHost: {victim}\r\nConnection: close\r\n\r\n");
        let (status, answer) = raw(setup.proxy, &request).await;
        assert_eq!(status, 400, "{trick}: {answer}");
        assert!(
            answer.ends_with(r#"{"error":"bad proxy path"}"#),
            "{trick}: {answer}"
        );
    }
    // A raw backslash or CR never gets past the HTTP parser or the path check.
    for request in [
        "GET /proxy/maxapi/api\\..\\x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".to_string(),
        format!(
            "GET /proxy/maxapi/a\rHost: {victim} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        ),
        // Absolute-form target naming the victim.
        format!(
            "GET http://{victim}/proxy/maxapi/api/v1/task/task-a HTTP/1.1\r\nHost: {victim}\r\nConnection: close\r\n\r\n"
        ),
    ] {
        let (status, answer) = raw(setup.proxy, &request).await;
        assert_eq!(status, 400, "{request:?}: {answer}");
    }
    assert!(setup.seen().is_empty(), "{:?}", setup.seen());
    let refused = setup.recorder.wait_for_requests(tricks.len() + 1).await;
    assert!(
        refused
            .iter()
            .all(|e| matches!(e, Event::Refused(_, Refusal::BadPath))),
        "{refused:?}"
    );

    // Host and X-Forwarded-Host name the victim: ignored, the answer comes from base_url.
    let request = format!(
        "GET /proxy/maxapi/api/v1/task/task-h HTTP/1.1\r\nHost: {victim}\r\n\
         X-Forwarded-Host: {victim}\r\nX-Forwarded-Proto: http\r\nConnection: close\r\n\r\n"
    );
    let (status, answer) = raw(setup.proxy, &request).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("task-h"));

    assert_eq!(victim_hits.load(Ordering::SeqCst), 0);
    let seen = setup.seen();
    assert_eq!(seen.len(), 1);
    for request in &seen {
        assert_eq!(request.headers["host"], setup.upstream.to_string());
        assert!(request.uri.starts_with("/api/v1/task/"), "{}", request.uri);
        assert_eq!(request.method, "GET");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_upstream_port_is_a_502_without_secrets() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let recorder = Arc::new(Recorder::default());
    let table = ProxyTable::new([proxy(
        "maxapi",
        ProviderKind::Maxapi,
        &format!("http://{closed_addr}"),
        &ProxySettings::default(),
        &recorder,
    )]);
    let proxy_addr = serve(router(table)).await;
    let response = client()
        .post(format!(
            "http://{proxy_addr}/proxy/maxapi/api/v1/task/submit?key=query-secret"
        ))
        .header("authorization", APP_KEY)
        .body(submit_body("cat"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers()["content-type"], "application/json");
    let text = response.text().await.unwrap();
    assert_eq!(text, r#"{"error":"upstream unreachable"}"#);
    recorder.wait_for_requests(1).await;
    assert_eq!(
        recorder.finished(),
        [(ProxyEndpoint::Submit, ProxyCode::ConnectError)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_is_a_504() {
    let setup = Setup::start(|s| s.timeout = Duration::from_millis(300)).await;
    let response = client().get(setup.proxied("/slow")).send().await.unwrap();
    assert_eq!(response.status(), 504);
    assert_eq!(
        response.text().await.unwrap(),
        r#"{"error":"upstream timed out"}"#
    );
    setup.recorder.wait_for_requests(1).await;
    assert_eq!(
        setup.recorder.finished(),
        [(ProxyEndpoint::Other, ProxyCode::Timeout)]
    );
    setup.upstream_state.release.notify_one();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_over_the_limit_are_413() {
    let setup = Setup::start(|s| s.max_request_body_bytes = 1024).await;
    // Declared too large: refused before anything is read or forwarded.
    let request = "POST /proxy/maxapi/echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2048\r\nConnection: close\r\n\r\n";
    let (status, answer) = raw(setup.proxy, request).await;
    assert_eq!(status, 413, "{answer}");
    assert!(
        answer.ends_with(r#"{"error":"request body too large"}"#),
        "{answer}"
    );

    // Chunked, no length: cut off once the limit is passed.
    let chunk = "x".repeat(512);
    let mut request = "POST /proxy/maxapi/echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_string();
    for _ in 0..4 {
        request.push_str(&format!("200\r\n{chunk}\r\n"));
    }
    request.push_str("0\r\n\r\n");
    let (status, answer) = raw(setup.proxy, &request).await;
    assert_eq!(status, 413, "{answer}");

    // Exactly at the limit passes.
    let request = format!(
        "POST /proxy/maxapi/echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1024\r\nConnection: close\r\n\r\n{}",
        "y".repeat(1024)
    );
    let (status, answer) = raw(setup.proxy, &request).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.ends_with(&"y".repeat(1024)));
    let events = setup.recorder.wait_for_requests(3).await;
    let refusals = events
        .iter()
        .filter(|e| matches!(e, Event::Refused(_, Refusal::BodyTooLarge)))
        .count();
    assert_eq!(refusals, 2, "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_stream_before_the_upstream_has_finished() {
    let setup = Setup::start(|_| {}).await;
    let mut response = client().get(setup.proxied("/stream")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    // The upstream holds its second half until released, so this chunk can only come
    // through a proxy that passes data on as it arrives.
    let first = tokio::time::timeout(WAIT, response.chunk())
        .await
        .expect("first chunk before the upstream finished")
        .unwrap();
    assert_eq!(first.as_deref(), Some(&b"first\n"[..]));
    setup.upstream_state.release.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = response.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"second\n");
    setup.recorder.wait_for_requests(1).await;
    assert_eq!(
        setup.recorder.finished(),
        [(ProxyEndpoint::Other, ProxyCode::Status(200))]
    );
}

/// A request body that `reqwest` must send chunked (no length).
struct Chunks(VecDeque<Bytes>);

impl hyper::body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_request_bodies_stream_through() {
    let setup = Setup::start(|_| {}).await;
    let chunks: VecDeque<Bytes> = (0..64)
        .map(|i| Bytes::from(vec![i as u8; 16 * 1024]))
        .collect();
    let expected: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
    let response = client()
        .post(setup.proxied("/echo"))
        .body(reqwest::Body::wrap(Chunks(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap(), expected);
    assert_eq!(setup.seen()[0].body_len, expected.len());
}

/// Blocks in every callback until the test lets it go, then panics.
struct Stuck {
    release: Mutex<std::sync::mpsc::Receiver<()>>,
    calls: AtomicUsize,
}

impl Stuck {
    fn wait_then_panic(&self) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let _ = self.release.lock().unwrap().recv_timeout(WAIT);
        panic!("observer failure");
    }
}

impl ProxyObserver for Stuck {
    fn request_finished(&self, _: &str, _: ProxyEndpoint, _: ProxyCode, _: Duration) {
        self.wait_then_panic()
    }
    fn request_refused(&self, _: &str, _: Refusal) {
        self.wait_then_panic()
    }
    fn task_submitted(&self, _: &str, _: Submission) {
        self.wait_then_panic()
    }
    fn submit_rejected(&self, _: &str, _: RejectReason) {
        self.wait_then_panic()
    }
    fn task_answer(&self, _: &str, _: TaskAnswer) {
        self.wait_then_panic()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_or_failing_observer_changes_no_answer() {
    let (upstream, _state) = start_upstream().await;
    let (release, released) = std::sync::mpsc::channel();
    let stuck = Arc::new(Stuck {
        release: Mutex::new(released),
        calls: AtomicUsize::new(0),
    });
    let observer: Arc<dyn ProxyObserver> = Arc::clone(&stuck) as Arc<dyn ProxyObserver>;
    let table = ProxyTable::new([ProviderProxy::new(
        "maxapi",
        ProviderKind::Maxapi,
        &format!("http://{upstream}"),
        &ProxySettings::default(),
        FailureRules::defaults(),
        observer,
    )
    .unwrap()]);
    let proxy_addr = serve(router(table)).await;
    let client = client();
    let direct = exchange(
        &client,
        reqwest::Method::POST,
        &format!("http://{upstream}/api/v1/task/submit"),
        submit_body("dog"),
    )
    .await;
    // The observer holds every callback until both answers are in: an answer that waited
    // for it would never arrive.
    for _ in 0..2 {
        let proxied = exchange(
            &client,
            reqwest::Method::POST,
            &format!("http://{proxy_addr}/proxy/maxapi/api/v1/task/submit"),
            submit_body("dog"),
        )
        .await;
        assert_eq!(proxied, direct);
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while stuck.calls.load(Ordering::SeqCst) < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(release);
}
