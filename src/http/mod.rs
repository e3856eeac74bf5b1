//! The HTTP side: one router for `/metrics`, the landing page, health, the tasks API,
//! reload, provider callbacks and the proxy. Handlers only read the registry and the
//! metrics, or hand requests to them.

mod api;
mod landing;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use tower_http::timeout::TimeoutLayer;

use crate::app::App;
use crate::proxy;

/// Largest request body we accept anywhere (webhooks, task registration).
pub const MAX_REQUEST_BODY: usize = 1024 * 1024;
/// Every request is answered within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub type AppState = Arc<App>;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(landing::page))
        .route("/metrics", get(metrics))
        .route("/-/healthy", get(healthy))
        .route("/-/ready", get(ready))
        .route("/-/reload", post(reload))
        .route("/api/v1/tasks", get(api::list).post(api::register))
        .route("/api/v1/tasks/{provider}/{task_id}", delete(api::remove))
        .route("/webhooks/{provider}", post(webhooks::receive))
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ))
        .with_state(app.clone())
        // Merged after the layers: proxied bodies are streamed under the proxy's own limit
        // and timeout (`providers[].proxy`), not the 1 MiB / 30 s of the exporter's routes.
        .merge(proxy::router(app.proxies()))
}

/// Renders on the blocking pool. A failed render (an encoder error, or a panic) is a 500
/// and an error log line: an empty 200 would look to Prometheus like a healthy target
/// exporting nothing.
async fn metrics(State(app): State<AppState>) -> Response {
    let rendered = tokio::task::spawn_blocking(move || app.metrics.render(&app.registry)).await;
    let failure = match rendered {
        Ok(Ok(body)) => {
            return (
                [(
                    header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                body,
            )
                .into_response();
        }
        Ok(Err(error)) => error.to_string(),
        Err(join_error) if join_error.is_panic() => {
            let panic = join_error.into_panic();
            let message = (panic.downcast_ref::<&str>().copied())
                .or(panic.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("no message");
            format!("rendering panicked: {message}")
        }
        Err(join_error) => join_error.to_string(),
    };
    tracing::error!(error = %failure, "cannot render /metrics");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "cannot render metrics; see the exporter's log\n",
    )
        .into_response()
}

async fn healthy() -> &'static str {
    "Healthy\n"
}

async fn ready(State(app): State<AppState>) -> Response {
    if app.is_ready() {
        (StatusCode::OK, "Ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "Not ready: state loading or a provider not polled yet\n",
        )
            .into_response()
    }
}

async fn reload(State(app): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(refusal) = authorize(&app, &headers) {
        return refusal;
    }
    match app.reload().await {
        Ok(()) => (StatusCode::OK, "configuration reloaded\n").into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            format!("configuration reload failed; the running configuration is kept:\n{e}\n"),
        )
            .into_response(),
    }
}

/// Checks the bearer token of a mutating request: 403 when no token is configured (the
/// endpoint is disabled), 401 when it is missing or wrong (compared in constant time).
#[allow(clippy::result_large_err)] // the refusal is returned as is; boxing buys nothing
pub(crate) fn authorize(app: &App, headers: &HeaderMap) -> Result<(), Response> {
    let settings = app.settings();
    let Some(token) = settings.api_token.as_ref() else {
        return Err((
            StatusCode::FORBIDDEN,
            "disabled: no API token is configured (server.api_token_env)\n",
        )
            .into_response());
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if token.matches(presented) {
        Ok(())
    } else {
        Err((
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "missing or wrong bearer token\n",
        )
            .into_response())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, Overrides};
    use crate::metrics::RenderFault;

    /// The exporter with one provider (its upstream refuses connections), served on
    /// 127.0.0.1; returns the app and the `/metrics` URL.
    async fn serve_exporter(dir: &std::path::Path) -> (Arc<App>, String) {
        let path = dir.join("config.yaml");
        let yaml = format!(
            "state: {{path: {}}}\nproviders:\n  - {{name: mx, type: maxapi, base_url: \"http://127.0.0.1:1\", token_env: MX_KEY}}\n",
            dir.join("state").display()
        );
        std::fs::write(&path, yaml).unwrap();
        let env = |name: &str| (name == "MX_KEY").then(|| "key".to_string());
        let settings = config::load(&path, &Overrides::default(), &env).unwrap();
        let app = App::start(settings, None, Overrides::default())
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/metrics", listener.local_addr().unwrap());
        let router = router(app.clone());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        (app, url)
    }

    #[tokio::test]
    async fn metrics_answers_500_when_rendering_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (app, url) = serve_exporter(dir.path()).await;
        let client = reqwest::Client::new();

        let ok = client.get(&url).send().await.unwrap();
        assert_eq!(ok.status(), 200);
        assert!(
            ok.text()
                .await
                .unwrap()
                .contains("genai_exporter_build_info{")
        );

        for fault in [RenderFault::MalformedFamily, RenderFault::Panic] {
            app.metrics.fail_renders_with(fault);
            let failed = client.get(&url).send().await.unwrap();
            assert_eq!(failed.status(), 500, "{fault:?}");
            let body = failed.text().await.unwrap();
            assert!(
                body.starts_with("cannot render metrics"),
                "{fault:?}: {body}"
            );
        }
    }

    /// `promtool check metrics` on a live page where every family has a series.
    #[tokio::test]
    async fn a_live_page_with_every_family_passes_promtool() {
        let dir = tempfile::tempdir().unwrap();
        let (app, url) = serve_exporter(dir.path()).await;
        let m = &app.metrics;
        m.observe_detection_delay("mx", "webhook", 0.3);
        m.record_proxy_request("mx", "submit", "200", 0.04);
        m.count_proxy_rejection("mx", "invalid_body");
        m.count_task_panic("poller");
        m.count_webhook("mx", "accepted");
        m.count_discovery_error("mx", "file");
        // Durable counts appear once the persister has committed them.
        let client = reqwest::Client::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let page = loop {
            let page = client.get(&url).send().await.unwrap().text().await.unwrap();
            if page.contains("genai_proxy_submit_rejections_total{") {
                break page;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never committed:\n{page}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        for name in [
            "genai_exporter_store_up 1",
            "genai_task_detection_delay_seconds_count{provider=\"mx\",via=\"webhook\"} 1",
            "genai_proxy_requests_total{provider=\"mx\",endpoint=\"submit\",code=\"200\"} 1",
            "genai_proxy_request_duration_seconds_count{provider=\"mx\",endpoint=\"submit\"} 1",
            "genai_exporter_task_panics_total{task=\"poller\"} 1",
        ] {
            assert!(page.lines().any(|l| l == name), "missing {name}:\n{page}");
        }
        let mut promtool = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool is installed");
        use std::io::Write;
        promtool
            .stdin
            .take()
            .unwrap()
            .write_all(page.as_bytes())
            .unwrap();
        let out = promtool.wait_with_output().unwrap();
        let complaints = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && complaints.is_empty(),
            "{complaints}"
        );
    }
}
