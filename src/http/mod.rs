//! The HTTP side: one router for `/metrics`, the landing page, health, the tasks API,
//! reload and provider callbacks. Handlers only read the registry and the metrics, or hand
//! requests to them.

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
        .with_state(app)
}

async fn metrics(State(app): State<AppState>) -> Response {
    let body = tokio::task::spawn_blocking(move || app.metrics.render())
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
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
