//! Hostile input on real listeners: oversized, chunked, malformed and deeply nested bodies,
//! wrong tokens and unknown providers. Each is refused with its status and counted, and
//! nothing is half-applied: no task gets tracked.

mod common;

use std::time::Duration;

use common::{Exporter, FakeUpstream, Scrape};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEBHOOK_TOKEN: &str = "hook-token-0c55";
const API_TOKEN: &str = "api-token-91ab";
const TWO_MIB: usize = 2 * 1024 * 1024;

async fn start(fake: &FakeUpstream, dir: &tempfile::TempDir) -> Exporter {
    let yaml = format!(
        "server: {{api_token_env: API}}\n\
         polling: {{interval: 100ms, max_interval: 200ms, timeout: 1s, requests_per_second: 100}}\n\
         providers:\n\
         \x20 - name: mx\n    type: maxapi\n    base_url: {url}\n    token_env: KEY\n    webhook: {{enabled: true, token_env: HOOK}}\n\
         \x20 - name: am\n    type: apimall\n    base_url: {url}\n    token_env: KEY\n",
        url = fake.url()
    );
    Exporter::start(
        &yaml,
        &[("KEY", "k"), ("HOOK", WEBHOOK_TOKEN), ("API", API_TOKEN)],
        dir.path(),
    )
    .await
}

fn webhook_count(m: &Scrape, provider: &str, outcome: &str) -> f64 {
    m.get(
        "genai_exporter_webhook_requests_total",
        &[("provider", provider), ("outcome", outcome)],
    )
    .unwrap_or(0.0)
}

/// Sends `request` bytes on a fresh connection and returns the status code of the answer.
async fn raw_status(exporter: &Exporter, request: &[u8], body_chunks: &[Vec<u8>]) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(exporter.addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    for chunk in body_chunks {
        // The server may answer and close before the whole body is sent.
        if stream.write_all(chunk).await.is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                answer.extend_from_slice(&buf[..n]);
                if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(_) => panic!("no answer within 10 s"),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"))
}

fn chunked(body: &[u8], chunk: usize) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = body
        .chunks(chunk)
        .map(|c| {
            let mut framed = format!("{:x}\r\n", c.len()).into_bytes();
            framed.extend_from_slice(c);
            framed.extend_from_slice(b"\r\n");
            framed
        })
        .collect();
    out.push(b"0\r\n\r\n".to_vec());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_webhooks_are_refused_counted_and_change_nothing() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let exporter = start(&fake, &dir).await;
    let client = reqwest::Client::new();
    let hook =
        |provider: &str, token: &str| exporter.url(&format!("/webhooks/{provider}?token={token}"));
    let valid = serde_json::json!({"code": 200, "msg": "success", "data": {
        "taskId": "hostile-1", "status": "SUCCESS",
        "input": {"model": "nano-banana"}, "created_at": "2025-01-01T00:00:00Z"
    }})
    .to_string();
    let post = |url: String, body: Vec<u8>| {
        let request = client.post(url).body(body);
        async move {
            let response = request.send().await.unwrap();
            (
                response.status().as_u16(),
                response.text().await.unwrap_or_default(),
            )
        }
    };

    // A valid body with a wrong or missing token.
    assert_eq!(post(hook("mx", "wrong"), valid.clone().into()).await.0, 401);
    let (status, _) = post(exporter.url("/webhooks/mx"), valid.clone().into()).await;
    assert_eq!(status, 401);
    // Unknown provider, and a provider without webhooks.
    assert_eq!(
        post(hook("nosuch", WEBHOOK_TOKEN), valid.clone().into())
            .await
            .0,
        404
    );
    assert_eq!(
        post(hook("am", WEBHOOK_TOKEN), valid.clone().into())
            .await
            .0,
        404
    );
    // Not JSON, JSON of another shape, an id that cannot be tracked.
    for body in [
        b"{\"code\": 200, \"data\": {\"taskId\": ".to_vec(),
        b"\xff\xfe not utf-8".to_vec(),
        b"[1, 2, 3]".to_vec(),
        br#"{"code": 200, "data": {"status": "SUCCESS"}}"#.to_vec(),
        valid.replace("hostile-1", "has space").into_bytes(),
    ] {
        let (status, text) = post(hook("mx", WEBHOOK_TOKEN), body.clone()).await;
        assert_eq!(status, 400, "{}: {text}", String::from_utf8_lossy(&body));
    }
    // Deep nesting: refused by the parser's depth limit, not by a stack overflow.
    let depth = 100_000;
    let nested = format!("{}{}", "{\"data\":".repeat(depth), "}".repeat(depth));
    assert_eq!(post(hook("mx", WEBHOOK_TOKEN), nested.into()).await.0, 400);
    let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    assert_eq!(post(hook("mx", WEBHOOK_TOKEN), arrays.into()).await.0, 400);

    // 2 MiB with a Content-Length, and 2 MiB chunked without one.
    let big = vec![b' '; TWO_MIB];
    let path = format!("/webhooks/mx?token={WEBHOOK_TOKEN}");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {TWO_MIB}\r\n\r\n"
    );
    assert_eq!(
        raw_status(&exporter, head.as_bytes(), std::slice::from_ref(&big)).await,
        413
    );
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    assert_eq!(
        raw_status(&exporter, head.as_bytes(), &chunked(&big, 64 * 1024)).await,
        413
    );

    let m = exporter.scrape().await;
    assert_eq!(webhook_count(&m, "mx", "unauthorized"), 2.0);
    assert_eq!(webhook_count(&m, "", "unknown_provider"), 1.0, "{}", m.text);
    assert_eq!(webhook_count(&m, "am", "unknown_provider"), 1.0);
    assert_eq!(webhook_count(&m, "mx", "invalid"), 7.0);
    assert_eq!(webhook_count(&m, "mx", "too_large"), 2.0);
    assert_eq!(webhook_count(&m, "mx", "accepted"), 0.0);
    // The attacker's provider name never became a label value.
    assert!(!m.text.contains("nosuch"));

    // Nothing was applied: no task tracked, discovered or polled.
    let tasks = client
        .get(exporter.url("/api/v1/tasks"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(tasks, r#"{"tasks":[]}"#);
    assert_eq!(m.sum("genai_task_discovered_total", &[]), 0.0);
    assert_eq!(m.sum("genai_tasks", &[]), 0.0);
    assert!(fake.hits("/api/v1/task/hostile-1").is_empty());

    // The same valid body with the right token is taken: the refusals above were for cause.
    assert_eq!(post(hook("mx", WEBHOOK_TOKEN), valid.into()).await.0, 200);
    let m = exporter.scrape().await;
    assert_eq!(webhook_count(&m, "mx", "accepted"), 1.0);
    assert_eq!(
        m.get(
            "genai_task_discovered_total",
            &[("provider", "mx"), ("source", "webhook")]
        ),
        Some(1.0)
    );
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_registrations_are_refused_and_change_nothing() {
    let fake = FakeUpstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let exporter = start(&fake, &dir).await;
    let client = reqwest::Client::new();
    let register = |token: Option<&str>, body: Vec<u8>| {
        let mut request = client
            .post(exporter.url("/api/v1/tasks"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    let one = br#"{"provider": "mx", "task_ids": ["reg-1"]}"#.to_vec();
    assert_eq!(register(None, one.clone()).await, 401);
    assert_eq!(register(Some("wrong"), one.clone()).await, 401);
    assert_eq!(
        register(
            Some(API_TOKEN),
            br#"{"provider": "nosuch", "task_ids": ["x"]}"#.to_vec()
        )
        .await,
        404
    );
    assert_eq!(
        register(
            Some(API_TOKEN),
            br#"{"provider": "mx", "task_ids": ["x"], "extra": 1}"#.to_vec()
        )
        .await,
        422
    );
    assert_eq!(
        register(Some(API_TOKEN), b"{\"provider\": ".to_vec()).await,
        400
    );
    let depth = 100_000;
    // Deep nesting is refused at the first value of the wrong type, before any recursion.
    let nested = format!(
        "{{\"provider\": \"mx\", \"task_ids\": {}{}}}",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    assert_eq!(register(Some(API_TOKEN), nested.into_bytes()).await, 422);
    let ids: Vec<String> = (0..10_001).map(|i| format!("id-{i}")).collect();
    let many = serde_json::json!({"provider": "mx", "task_ids": ids}).to_string();
    assert_eq!(register(Some(API_TOKEN), many.into_bytes()).await, 413);
    let head = format!(
        "POST /api/v1/tasks HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {API_TOKEN}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let big = format!(
        "{{\"provider\": \"mx\", \"task_ids\": [\"{}\"]}}",
        "a".repeat(TWO_MIB)
    );
    assert_eq!(
        raw_status(
            &exporter,
            head.as_bytes(),
            &chunked(big.as_bytes(), 64 * 1024)
        )
        .await,
        413
    );

    let m = exporter.scrape().await;
    assert_eq!(m.sum("genai_task_discovered_total", &[]), 0.0);
    assert_eq!(m.sum("genai_tasks", &[]), 0.0);
    assert!(fake.hits("/api/v1/task/reg-1").is_empty());
    // And the valid call works.
    assert_eq!(register(Some(API_TOKEN), one).await, 200);
    let m = exporter.scrape().await;
    assert_eq!(
        m.get(
            "genai_task_discovered_total",
            &[("provider", "mx"), ("source", "api")]
        ),
        Some(1.0)
    );
    exporter.stop().await;
}
