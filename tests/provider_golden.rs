//! Golden tests of every example in the provider documentation (kept verbatim under
//! `tests/fixtures/providers/`), and a no-panic property over every parse function.

use std::path::PathBuf;

use genai_task_exporter::providers::apimall::Apimall;
use genai_task_exporter::providers::maxapi::Maxapi;
use genai_task_exporter::providers::{
    Adapter, Balance, FailureClass, FailureRules, HistoryKind, UpstreamFailure,
};
use genai_task_exporter::task::{MAX_TEXT_LEN, Observation, RefusedCredits, Status};
use proptest::prelude::*;

fn fixture(name: &str) -> Vec<u8> {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests/fixtures/providers", name]
        .iter()
        .collect();
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn maxapi() -> Adapter {
    Adapter::Maxapi(Maxapi::new())
}

fn apimall() -> Adapter {
    Adapter::Apimall(Apimall::new(FailureRules::defaults()))
}

// --- maxapi ---

fn maxapi_query_observation() -> Observation {
    Observation {
        task_id: "9db7d1ed-d1e5-4d11-9f3a-61f653b905ad".into(),
        model: Some("nano-banana".into()),
        status: Status::Succeeded,
        upstream_status: "SUCCESS".into(),
        failure_reason: None,
        error_message: None,
        credits_used: None,
        credits_refunded: None,
        created_at: Some(1_770_760_486_686),
        updated_at: Some(1_770_760_504_039),
        completed_at: None,
        refused_credits: RefusedCredits::default(),
    }
}

#[test]
fn maxapi_query_example() {
    let o = maxapi()
        .parse_task(200, &fixture("maxapi_query_task.json"))
        .unwrap();
    assert_eq!(o, maxapi_query_observation());
    assert_eq!(o.latency_seconds(), Some(17.353));
}

#[test]
fn maxapi_callback_is_the_query_envelope() {
    let o = maxapi()
        .parse_webhook(&fixture("maxapi_query_task.json"))
        .unwrap();
    assert_eq!(o, maxapi_query_observation());
}

#[test]
fn maxapi_unauthorized_example() {
    let body = fixture("maxapi_error_401.json");
    let expected = |message: &str| UpstreamFailure {
        class: FailureClass::Unauthorized,
        api_error: Some("401"),
        message: message.into(),
    };
    assert_eq!(
        maxapi().parse_task(200, &body).unwrap_err(),
        expected("code 401: unauthorized")
    );
    assert_eq!(
        maxapi().parse_task(401, &body).unwrap_err(),
        expected("HTTP 401, code 401: unauthorized")
    );
}

#[test]
fn maxapi_submit_answer_is_not_a_task() {
    let f = maxapi()
        .parse_task(200, &fixture("maxapi_submit.json"))
        .unwrap_err();
    assert_eq!(f.class, FailureClass::InvalidResponse);
    assert_eq!(f.api_error, Some("invalid_response"));
}

#[test]
fn maxapi_paths() {
    let a = maxapi();
    assert_eq!(
        a.task_path("9db7d1ed-d1e5-4d11-9f3a-61f653b905ad"),
        "/api/v1/task/9db7d1ed-d1e5-4d11-9f3a-61f653b905ad"
    );
    assert_eq!(a.history_path(HistoryKind::Images, 1, 20), None);
    assert_eq!(a.balance_path(), None);
}

// --- apimall ---

fn apimall_image_observation() -> Observation {
    Observation {
        task_id: "img_01HQ9M7XJQ7PZ3GQ9F6C5W3N2M".into(),
        model: Some("nano-banana".into()),
        status: Status::Succeeded,
        upstream_status: "completed".into(),
        failure_reason: None,
        error_message: None,
        credits_used: Some(8.0),
        credits_refunded: Some(0.0),
        created_at: Some(1_773_307_800_000),
        updated_at: Some(1_773_307_866_000),
        completed_at: Some(1_773_307_866_000),
        refused_credits: RefusedCredits::default(),
    }
}

#[test]
fn apimall_image_task_example() {
    let o = apimall()
        .parse_task(200, &fixture("apimall_image_task.json"))
        .unwrap();
    assert_eq!(o, apimall_image_observation());
    assert_eq!(o.latency_seconds(), Some(66.0));
}

#[test]
fn apimall_webhook_accepts_envelope_and_data() {
    let envelope = fixture("apimall_image_task.json");
    assert_eq!(
        apimall().parse_webhook(&envelope).unwrap(),
        apimall_image_observation()
    );
    let value: serde_json::Value = serde_json::from_slice(&envelope).unwrap();
    let data = serde_json::to_vec(&value["data"]).unwrap();
    assert_eq!(
        apimall().parse_webhook(&data).unwrap(),
        apimall_image_observation()
    );
}

#[test]
fn apimall_not_found_example() {
    let body = fixture("apimall_error_not_found.json");
    assert_eq!(
        apimall().parse_task(404, &body).unwrap_err(),
        UpstreamFailure {
            class: FailureClass::NotFound,
            api_error: Some("not_found"),
            message: "HTTP 404, not_found: Task not found".into(),
        }
    );
    assert_eq!(
        apimall().parse_task(200, &body).unwrap_err(),
        UpstreamFailure {
            class: FailureClass::NotFound,
            api_error: Some("not_found"),
            message: "error not_found: Task not found".into(),
        }
    );
}

fn history_observation(task_id: &str) -> Observation {
    Observation {
        task_id: task_id.into(),
        model: Some("nano-banana".into()),
        status: Status::Succeeded,
        upstream_status: "completed".into(),
        failure_reason: None,
        error_message: None,
        credits_used: Some(8.0),
        credits_refunded: Some(0.0),
        created_at: Some(1_773_307_800_000),
        updated_at: None,
        completed_at: Some(1_773_307_866_000),
        refused_credits: RefusedCredits::default(),
    }
}

#[test]
fn apimall_images_history_example() {
    let page = apimall()
        .parse_history(200, &fixture("apimall_images_history.json"), 20)
        .unwrap();
    assert_eq!(
        page.items,
        [history_observation("img_01HQ9M7XJQ7PZ3GQ9F6C5W3N2M")]
    );
    assert!(page.is_last);
    let page = apimall()
        .parse_history(200, &fixture("apimall_images_history.json"), 1)
        .unwrap();
    assert!(!page.is_last, "a full page is not the last");
}

/// Same shape as the images listing; items carry `audio_url` (docs/providers.md §2).
#[test]
fn apimall_audio_history_example() {
    let page = apimall()
        .parse_history(200, &fixture("apimall_audio_history.json"), 20)
        .unwrap();
    assert_eq!(
        page.items,
        [history_observation("aud_01HQ9M7XJQ7PZ3GQ9F6C5W3N2M")]
    );
    assert!(page.is_last);
}

#[test]
fn apimall_balance_example() {
    assert_eq!(
        apimall()
            .parse_balance(200, &fixture("apimall_balance.json"))
            .unwrap(),
        Balance {
            credits: 120.0,
            api_credits: 120.0
        }
    );
}

#[test]
fn apimall_paths() {
    let a = apimall();
    assert_eq!(
        a.task_path("img_01HQ9M7XJQ7PZ3GQ9F6C5W3N2M"),
        "/api/v1/images/img_01HQ9M7XJQ7PZ3GQ9F6C5W3N2M"
    );
    assert_eq!(
        a.history_path(HistoryKind::Images, 1, 20).as_deref(),
        Some("/api/v1/images/history?page=1&limit=20")
    );
    assert_eq!(a.balance_path(), Some("/api/v1/account/balances"));
}

// --- no input makes a parser panic, and every output stays within its bounds ---

const API_ERRORS: [&str; 6] = [
    "400",
    "401",
    "other",
    "unauthorized",
    "not_found",
    "invalid_response",
];

fn check_failure(f: &UpstreamFailure) {
    assert!(f.message.len() <= MAX_TEXT_LEN, "{f:?}");
    if let Some(label) = f.api_error {
        assert!(API_ERRORS.contains(&label), "{f:?}");
    }
}

fn check_observation(o: &Observation) {
    assert!(!o.task_id.trim().is_empty());
    assert!(o.upstream_status.len() <= MAX_TEXT_LEN);
    assert!(
        o.error_message
            .as_ref()
            .is_none_or(|m| m.len() <= MAX_TEXT_LEN)
    );
    assert!(o.model.as_ref().is_none_or(|m| m.len() <= MAX_TEXT_LEN));
    for credits in [o.credits_used, o.credits_refunded].into_iter().flatten() {
        assert!(credits.is_finite() && credits >= 0.0, "{o:?}");
    }
    if o.failure_reason.is_some() {
        assert!(matches!(
            o.status,
            Status::Failed | Status::TimedOut | Status::Cancelled
        ));
    }
}

fn check<T>(result: Result<T, UpstreamFailure>, ok: impl FnOnce(&T)) {
    match result {
        Ok(value) => ok(&value),
        Err(f) => check_failure(&f),
    }
}

/// Feeds one body to every parse function of both adapters.
fn parse_everything(http_status: u16, body: &[u8]) {
    for adapter in [maxapi(), apimall()] {
        check(adapter.parse_task(http_status, body), check_observation);
        check(adapter.parse_webhook(body), check_observation);
        for limit in [0, 1, 20, 100] {
            check(adapter.parse_history(http_status, body, limit), |page| {
                page.items.iter().for_each(check_observation)
            });
        }
        check(adapter.parse_balance(http_status, body), |b| {
            assert!(b.credits.is_finite() && b.api_credits.is_finite())
        });
    }
}

const KEYS: &[&str] = &[
    "code",
    "msg",
    "data",
    "taskId",
    "task_id",
    "status",
    "input",
    "model",
    "failure_reason",
    "error_message",
    "created_at",
    "updated_at",
    "completed_at",
    "credits_used",
    "credits_refunded",
    "success",
    "error",
    "message",
    "items",
    "credits",
    "api_credits",
    "output",
];

const WORDS: &[&str] = &[
    "SUCCESS",
    "FAILURE",
    "TIMEOUT",
    "CANCELLED",
    "PENDING",
    "completed",
    "failed",
    "processing",
    "not_found",
    "unauthorized",
    "CONTENT_MODERATION",
    "INSUFFICIENT_POINTS",
    "Insufficient credits",
    "2026-03-12T09:30:00.000Z",
    "2026-02-10T21:54:46.686768Z",
    "2026-03-12T10:30:00.000+01:00",
    "9999-12-31T23:59:60.999999999Z",
    "img_1",
    "vid_1",
    "内容审核",
    "",
];

/// JSON values built from the keys and words the adapters look for, so that generated bodies
/// reach past the envelope checks.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop::sample::select(WORDS).prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..8).prop_map(|pairs| {
                serde_json::Value::Object(
                    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
                )
            }),
        ]
    })
}

const FIXTURES: [&str; 8] = [
    "maxapi_query_task.json",
    "maxapi_error_401.json",
    "maxapi_submit.json",
    "apimall_image_task.json",
    "apimall_error_not_found.json",
    "apimall_images_history.json",
    "apimall_audio_history.json",
    "apimall_balance.json",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(
        http_status in prop_oneof![Just(200u16), Just(404u16), any::<u16>()],
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        parse_everything(http_status, &body);
    }

    #[test]
    fn json_ish_text_never_panics(
        http_status in prop_oneof![Just(200u16), Just(400u16), Just(500u16)],
        body in r#"[\[\]{}":,0-9a-zA-Z_ .eE+\-\\]{0,300}"#,
    ) {
        parse_everything(http_status, body.as_bytes());
    }

    #[test]
    fn generated_json_never_panics(
        http_status in prop_oneof![Just(200u16), Just(401u16), Just(429u16), Just(503u16)],
        value in json_value(),
        wrap in 0..4usize,
    ) {
        use serde_json::json;
        let value = match wrap {
            0 => value,
            1 => json!({"code": 0, "msg": "ok", "data": value}),
            2 => json!({"success": true, "data": value, "request_id": "req_1"}),
            _ => json!({"success": true, "data": {"items": [value], "page": 1, "limit": 20}}),
        };
        parse_everything(http_status, &serde_json::to_vec(&value).unwrap());
    }

    #[test]
    fn mutated_fixtures_never_panic(
        index in 0..FIXTURES.len(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut body = fixture(FIXTURES[index]);
        for (at, byte) in edits {
            let i = at.index(body.len());
            body[i] = byte;
        }
        body.truncate(cut.index(body.len() + 1));
        parse_everything(200, &body);
    }

    #[test]
    fn nesting_beyond_the_bound_is_rejected(depth in 0usize..300, object in any::<bool>()) {
        let (open, close) = if object { ("{\"a\":", "}") } else { ("[", "]") };
        let inner = format!("{}1{}", open.repeat(depth), close.repeat(depth));
        let body = format!(r#"{{"code":0,"data":{{"taskId":"t","status":"SUCCESS","x":{inner}}}}}"#);
        let result = maxapi().parse_task(200, body.as_bytes());
        // The envelope and `data` take two levels.
        prop_assert_eq!(result.is_ok(), depth + 2 <= 64);
        parse_everything(200, body.as_bytes());
    }
}
