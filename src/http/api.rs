//! `/api/v1/tasks`: list, register and stop tracking tasks.

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::time::Duration;

use super::{AppState, authorize};
use crate::persist::NotDurable;
use crate::registry::{Source, TaskView, TrackOutcome};
use crate::task::{Status, now_millis};

/// Most ids one registration call may carry.
pub(crate) const MAX_IDS_PER_CALL: usize = 10_000;
const DEFAULT_LIST_LIMIT: usize = 100;
const MAX_LIST_LIMIT: usize = 10_000;
/// Longest a registration or callback waits for the commit holding it (commits take
/// milliseconds; a slow disk answers 503 rather than hold callers).
const DURABLE_WAIT: Duration = Duration::from_secs(5);
const RETRY_AFTER_SECS: &str = "5";

#[derive(Debug, Deserialize)]
pub(crate) struct ListQuery {
    provider: Option<String>,
    status: Option<String>,
    limit: Option<usize>,
}

#[derive(Debug, Serialize)]
struct TaskList {
    tasks: Vec<TaskView>,
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

/// Waits until the registry's changes so far are committed; a 503 with `Retry-After` when
/// the store is down or slow, so that a 2xx always means durable.
pub(super) async fn durable(app: &AppState) -> Result<(), Response> {
    match app.durability.wait(DURABLE_WAIT).await {
        Ok(()) => Ok(()),
        Err(why) => {
            let message = match why {
                NotDurable::StoreDown => "state store cannot commit; retry later",
                NotDurable::TimedOut => "state store commit is slow; retry later",
            };
            let mut response = error(StatusCode::SERVICE_UNAVAILABLE, message);
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
            Err(response)
        }
    }
}

pub(crate) async fn list(State(app): State<AppState>, Query(q): Query<ListQuery>) -> Response {
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => match Status::parse(s) {
            Some(s) => Some(s),
            None => return error(StatusCode::BAD_REQUEST, format!("unknown status {s:?}")),
        },
    };
    let limit = q.limit.unwrap_or(DEFAULT_LIST_LIMIT).min(MAX_LIST_LIMIT);
    let mut tasks = Vec::new();
    for provider in app.registry.providers() {
        if q.provider
            .as_deref()
            .is_some_and(|p| !p.is_empty() && p != provider.name())
        {
            continue;
        }
        if tasks.len() >= limit {
            break;
        }
        tasks.extend(provider.list(status, limit - tasks.len()));
    }
    Json(TaskList { tasks }).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Registration {
    provider: String,
    task_ids: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
struct RegistrationResult {
    added: usize,
    already_tracked: usize,
    already_finished: usize,
    other_shard: usize,
    invalid: usize,
}

pub(crate) async fn register(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<Registration>, JsonRejection>,
) -> Response {
    if let Err(refusal) = authorize(&app, &headers) {
        return refusal;
    }
    let Json(registration) = match body {
        Ok(body) => body,
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    if registration.task_ids.len() > MAX_IDS_PER_CALL {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("at most {MAX_IDS_PER_CALL} task ids per call"),
        );
    }
    let Some(tasks) = app.registry.provider(&registration.provider) else {
        return error(StatusCode::NOT_FOUND, "unknown provider");
    };
    // Refused before anything changes while the store is down.
    if !app.durability.is_up()
        && let Err(refusal) = durable(&app).await
    {
        return refusal;
    }
    let now = now_millis();
    let mut result = RegistrationResult::default();
    for id in &registration.task_ids {
        match tasks.track(id, Source::Api, now) {
            TrackOutcome::New => result.added += 1,
            TrackOutcome::Known => result.already_tracked += 1,
            TrackOutcome::Remembered => result.already_finished += 1,
            TrackOutcome::NotOwned => result.other_shard += 1,
            TrackOutcome::Invalid => result.invalid += 1,
        }
    }
    if result.added > 0 {
        tracing::debug!(provider = %registration.provider, added = result.added, "tasks registered");
    }
    if let Err(refusal) = durable(&app).await {
        return refusal;
    }
    (StatusCode::OK, Json(result)).into_response()
}

pub(crate) async fn remove(
    State(app): State<AppState>,
    headers: HeaderMap,
    Path((provider, task_id)): Path<(String, String)>,
) -> Response {
    if let Err(refusal) = authorize(&app, &headers) {
        return refusal;
    }
    let Some(tasks) = app.registry.provider(&provider) else {
        return error(StatusCode::NOT_FOUND, "unknown provider");
    };
    if tasks.untrack(&task_id, now_millis()) {
        if let Err(refusal) = durable(&app).await {
            return refusal;
        }
        StatusCode::NO_CONTENT.into_response()
    } else {
        error(StatusCode::NOT_FOUND, "task not tracked")
    }
}
