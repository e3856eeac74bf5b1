//! `POST /webhooks/{provider}?token=...`: provider callbacks.
//!
//! A callback is parsed completely before anything changes; a valid one is applied at once,
//! through the same exactly-once rules as a poll answer. With `webhook.confirm` it is then
//! confirmed by one get-task request (callbacks carry no signature, only the token); without,
//! the callback itself is the answer and costs no request.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AppState;
use super::api::durable;
use crate::logging::LogGate;
use crate::registry::{Source, TrackOutcome};
use crate::task::now_millis;

/// Wrong tokens come as often as a client likes: one log line per interval, every one counted.
static UNAUTHORIZED_LOG: LogGate = LogGate::new();

#[derive(Debug, Deserialize)]
pub(crate) struct WebhookQuery {
    token: Option<String>,
}

pub(crate) async fn receive(
    State(app): State<AppState>,
    Path(provider): Path<String>,
    Query(query): Query<WebhookQuery>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let count = |provider: &str, outcome: &str| app.metrics.count_webhook(provider, outcome);
    // Only configured names become label values: the path is attacker-controlled.
    let runtime = app.with_runtime(&provider, |rt| {
        (
            rt.settings.webhook_token.clone(),
            rt.settings.webhook_confirm,
            rt.adapter.clone(),
            rt.tasks.clone(),
        )
    });
    let Some((Some(token), confirm, adapter, tasks)) = runtime else {
        let label = if runtime.is_some() {
            provider.as_str()
        } else {
            ""
        };
        count(label, "unknown_provider");
        return (StatusCode::NOT_FOUND, "no webhook for this provider\n").into_response();
    };
    if !token.matches(query.token.as_deref().unwrap_or("")) {
        count(&provider, "unauthorized");
        if let Some(suppressed) = UNAUTHORIZED_LOG.open() {
            tracing::warn!(
                provider,
                suppressed,
                "webhook with a missing or wrong token"
            );
        }
        return (StatusCode::UNAUTHORIZED, "missing or wrong token\n").into_response();
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            count(&provider, "too_large");
            tracing::warn!(provider, error = %rejection.body_text(), "webhook body refused");
            return (StatusCode::PAYLOAD_TOO_LARGE, "body too large\n").into_response();
        }
    };
    let observation = match adapter.parse_webhook(&body) {
        Ok(obs) => obs,
        Err(failure) => {
            count(&provider, "invalid");
            tracing::warn!(provider, error = %failure.message, "webhook body is not a task");
            return (StatusCode::BAD_REQUEST, "body is not a task callback\n").into_response();
        }
    };
    let now = now_millis();
    match tasks.track(&observation.task_id, Source::Webhook, now) {
        TrackOutcome::Invalid => {
            count(&provider, "invalid");
            return (StatusCode::BAD_REQUEST, "invalid task id\n").into_response();
        }
        TrackOutcome::NotOwned => {
            count(&provider, "other_shard");
            return (StatusCode::ACCEPTED, "task belongs to another shard\n").into_response();
        }
        TrackOutcome::Remembered => {
            count(&provider, "already_finished");
            if let Err(refusal) = durable(&app).await {
                return refusal;
            }
            return (StatusCode::OK, "task already finished\n").into_response();
        }
        TrackOutcome::New | TrackOutcome::Known => {}
    }
    let applied = tasks.observe(&observation, now);
    if applied.is_some_and(|a| a.counted) {
        app.metrics
            .record_detection(&provider, "webhook", &observation, now);
    }
    if confirm {
        tasks.poll_soon(&observation.task_id, now);
    }
    count(&provider, "accepted");
    if let Err(refusal) = durable(&app).await {
        return refusal;
    }
    (StatusCode::OK, "accepted\n").into_response()
}
