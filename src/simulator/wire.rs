//! The providers' wire formats (docs/providers.md §1, §2): bodies, ids, timestamps.
//!
//! Bodies are serialized from structs so that keys come out in the documented order, which
//! makes captured answers easy to compare with the documentation by eye.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};
use serde_json::{Value, json};

use crate::task::FailureReason;

use super::SimProvider;
use super::config::{ModelKind, SimConfig};
use super::state::{Delivery, Outcome, Phase, Plan};

/// apimall `error_message` wordings and the reason the exporter's default rules should
/// derive from each (docs/providers.md §4). `None` messages are sent as JSON `null`.
pub const APIMALL_FAILURE_MESSAGES: &[(Option<&str>, FailureReason)] = &[
    (
        Some("Content blocked by safety policy"),
        FailureReason::ContentModeration,
    ),
    (
        Some("Invalid parameter: ratio"),
        FailureReason::InvalidParameters,
    ),
    (
        Some("Insufficient credits"),
        FailureReason::InsufficientCredits,
    ),
    (Some("Generation timed out"), FailureReason::Timeout),
    (Some("upstream model crashed"), FailureReason::Other),
    (Some(""), FailureReason::Unspecified),
    (None, FailureReason::Unspecified),
];

/// maxapi `failure_reason` for a reason; `None` = JSON null (or the key left out).
/// `MODEL_ERROR` is not a documented value: it exercises the `other` mapping.
pub const MAXAPI_FAILURE_REASONS: &[(Option<&str>, FailureReason)] = &[
    (Some("CONTENT_MODERATION"), FailureReason::ContentModeration),
    (Some("INVALID_PARAMETERS"), FailureReason::InvalidParameters),
    (
        Some("INSUFFICIENT_POINTS"),
        FailureReason::InsufficientCredits,
    ),
    (Some("MODEL_ERROR"), FailureReason::Other),
    (None, FailureReason::Unspecified),
];

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// `9db7d1ed-d1e5-4d11-9f3a-61f653b905ad`: a version-4 UUID from 128 random bits.
pub(crate) fn uuid_v4(bits: u128) -> String {
    let b = (bits & !(0xF000u128 << 64) & !(0xC000u128 << 48))
        | (0x4000u128 << 64)
        | (0x8000u128 << 48);
    let h = format!("{b:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// `img_01HQ9M7XJQ7PZ3GQ9F6C5W3N2M`: prefix + ULID (48-bit millisecond time, 80 random bits,
/// 26 Crockford base32 characters), like apimall's ids.
pub(crate) fn ulid_id(prefix: &str, t: SystemTime, random: u128) -> String {
    let ms = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
        & ((1u128 << 48) - 1);
    let v = (ms << 80) | (random & ((1u128 << 80) - 1));
    let mut s = String::with_capacity(prefix.len() + 26);
    s.push_str(prefix);
    for i in (0..26).rev() {
        s.push(CROCKFORD[((v >> (i * 5)) & 31) as usize] as char);
    }
    s
}

/// Is this a well-formed apimall id of this kind?
pub(crate) fn is_apimall_id(id: &str, kind: ModelKind) -> bool {
    id.strip_prefix(kind.apimall_prefix())
        .is_some_and(|rest| rest.len() == 26 && rest.bytes().all(|c| CROCKFORD.contains(&c)))
}

/// Short, stable, non-reversible tag of an API key (FNV-1a, 32 bits), so reports can tell
/// keys apart without storing them.
pub(crate) fn fingerprint(key: &str) -> (u32, String) {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h, format!("{h:08x}"))
}

fn micros(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

fn millis(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Whole credits as JSON integers (as in every documented example), others as floats.
fn credits<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

// ---------------------------------------------------------------- maxapi

#[derive(Serialize)]
struct MaxEnvelope<T: Serialize> {
    code: i64,
    msg: &'static str,
    data: T,
}

#[derive(Serialize)]
struct MaxTask<'a> {
    #[serde(rename = "taskId")]
    task_id: &'a str,
    status: &'static str,
    input: Value,
    result: Option<MaxResult>,
    /// `None` leaves the key out (success answers, and some unspecified failures);
    /// `Some(None)` sends null.
    #[serde(skip_serializing_if = "Option::is_none")]
    failure_reason: Option<Option<&'static str>>,
    created_at: String,
    updated_at: String,
}

#[derive(Serialize)]
struct MaxResult {
    #[serde(rename = "type")]
    kind: &'static str,
    urls: Vec<String>,
}

const PROMPTS: [&str; 4] = [
    "a lighthouse at dusk, watercolor",
    "a red fox in fresh snow, 35mm photo",
    "isometric city block at night, neon",
    "a bowl of ramen, studio lighting",
];

fn maxapi_status(plan: &Plan, phase: Phase) -> &'static str {
    match phase {
        Phase::Pending => "PENDING",
        Phase::Processing => "PROCESSING",
        Phase::Submitted => "SUBMITTED",
        Phase::Terminal => match plan.outcome {
            Outcome::Succeeded => "SUCCESS",
            Outcome::Failed(_) => "FAILURE",
            Outcome::TimedOut => "TIMEOUT",
            Outcome::Cancelled => "CANCELLED",
        },
    }
}

fn maxapi_input(plan: &Plan) -> Value {
    if let Some(input) = &plan.input {
        return input.clone();
    }
    let prompt = PROMPTS[plan.variant as usize % PROMPTS.len()];
    match plan.kind {
        ModelKind::Video | ModelKind::Audio => json!({
            "model": &*plan.model, "prompt": prompt, "duration": 5, "resolution": "720p"
        }),
        ModelKind::Image => json!({
            "model": &*plan.model, "prompt": prompt, "ratio": "16:9", "resolution": "2k"
        }),
    }
}

/// `data` of `GET /api/v1/task/{taskId}` at instant `now`.
fn maxapi_task(plan: &Plan, now: Instant) -> MaxTask<'_> {
    let phase = plan.phase_at(now);
    let terminal = phase == Phase::Terminal;
    let result = (terminal && plan.outcome == Outcome::Succeeded).then(|| {
        let (kind, ext) = match plan.kind {
            ModelKind::Image => ("image", "png"),
            ModelKind::Video | ModelKind::Audio => ("video", "mp4"),
        };
        MaxResult {
            kind,
            urls: vec![format!("https://example.com/output/{}-1.{ext}", plan.id)],
        }
    });
    let failure_reason = match (terminal, plan.outcome) {
        (true, Outcome::Succeeded) => None,
        (true, Outcome::Failed(r)) => {
            let word = MAXAPI_FAILURE_REASONS
                .iter()
                .find(|(_, reason)| *reason == r)
                .and_then(|(w, _)| *w);
            // Unspecified failures alternate between null and a missing key: both are
            // "no actionable reason".
            if word.is_none() && plan.variant & 0x100 != 0 {
                None
            } else {
                Some(word)
            }
        }
        _ => Some(None),
    };
    MaxTask {
        task_id: &plan.id,
        status: maxapi_status(plan, phase),
        input: maxapi_input(plan),
        result,
        failure_reason,
        created_at: micros(plan.created_wall),
        updated_at: micros(plan.created_wall + plan.changed_at(phase)),
    }
}

/// The maxapi query envelope (also the callback body).
pub(crate) fn maxapi_task_body(plan: &Plan, now: Instant) -> Vec<u8> {
    to_vec(&MaxEnvelope {
        code: 0,
        msg: "ok",
        data: maxapi_task(plan, now),
    })
}

/// `{"code":0,"msg":"ok","data":{"taskId":...}}` for submit.
pub(crate) fn maxapi_submitted(id: &str) -> Vec<u8> {
    to_vec(&MaxEnvelope {
        code: 0,
        msg: "ok",
        data: json!({ "taskId": id }),
    })
}

/// maxapi error envelope (`data` null).
pub(crate) fn maxapi_error(code: i64, msg: &'static str) -> Vec<u8> {
    to_vec(&MaxEnvelope {
        code,
        msg,
        data: Value::Null,
    })
}

// ---------------------------------------------------------------- apimall

#[derive(Serialize)]
struct MallEnvelope<T: Serialize> {
    success: bool,
    data: T,
    request_id: String,
}

#[derive(Serialize)]
struct MallErrorEnvelope<'a> {
    success: bool,
    error: MallError<'a>,
    request_id: String,
}

#[derive(Serialize)]
struct MallError<'a> {
    code: &'a str,
    message: &'a str,
}

#[derive(Serialize)]
struct MallOutput {
    #[serde(rename = "resultUrls")]
    result_urls: Vec<String>,
}

/// The kind-specific url key (`image_url`, `video_url`, `audio_url`): only the task's own
/// kind is sent, `Some(None)` as null.
#[derive(Serialize, Default)]
struct KindUrls {
    #[serde(skip_serializing_if = "Option::is_none")]
    image_url: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    video_url: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    audio_url: Option<Option<String>>,
}

impl KindUrls {
    fn new(kind: ModelKind, url: Option<String>) -> Self {
        let mut k = KindUrls::default();
        match kind {
            ModelKind::Image => k.image_url = Some(url),
            ModelKind::Video => k.video_url = Some(url),
            ModelKind::Audio => k.audio_url = Some(url),
        }
        k
    }
}

#[derive(Serialize)]
struct MallTask<'a> {
    task_id: &'a str,
    model: &'a str,
    status: &'static str,
    output: Option<MallOutput>,
    primary_url: Option<String>,
    #[serde(flatten)]
    url: KindUrls,
    error_message: Option<&'static str>,
    #[serde(serialize_with = "credits")]
    credits_used: f64,
    #[serde(serialize_with = "credits")]
    credits_refunded: f64,
    created_at: String,
    updated_at: String,
    completed_at: Option<String>,
}

#[derive(Serialize)]
struct MallHistoryItem<'a> {
    task_id: &'a str,
    model: &'a str,
    source: &'static str,
    created_at: String,
    status: &'static str,
    #[serde(flatten)]
    url: KindUrls,
    #[serde(serialize_with = "credits")]
    credits_used: f64,
    #[serde(serialize_with = "credits")]
    credits_refunded: f64,
    completed_at: Option<String>,
}

#[derive(Serialize)]
struct MallHistory<'a> {
    items: Vec<MallHistoryItem<'a>>,
    page: u64,
    limit: u64,
}

/// The facts shared by a get-task answer and a history item.
struct MallView {
    status: &'static str,
    url: Option<String>,
    refunded: f64,
    completed_at: Option<String>,
    updated_at: String,
}

fn mall_view(plan: &Plan, now: Instant) -> MallView {
    let phase = plan.phase_at(now);
    let status = match phase {
        Phase::Pending => "pending",
        Phase::Processing | Phase::Submitted => "processing",
        Phase::Terminal => match plan.outcome {
            Outcome::Succeeded => "completed",
            _ => "failed",
        },
    };
    let terminal = phase == Phase::Terminal;
    let ext = match plan.kind {
        ModelKind::Image => "webp",
        ModelKind::Video => "mp4",
        ModelKind::Audio => "mp3",
    };
    let url = (terminal && plan.outcome == Outcome::Succeeded)
        .then(|| format!("https://example.com/generated/{}.{ext}", plan.id));
    let refunded = match (terminal, plan.outcome) {
        (true, Outcome::Failed(_)) => plan.credits,
        _ => 0.0,
    };
    let changed = plan.created_wall + plan.changed_at(phase);
    MallView {
        status,
        url,
        refunded,
        completed_at: terminal.then(|| millis(changed)),
        updated_at: millis(changed),
    }
}

fn mall_error_message(plan: &Plan, now: Instant) -> Option<&'static str> {
    if plan.phase_at(now) != Phase::Terminal {
        return None;
    }
    let Outcome::Failed(reason) = plan.outcome else {
        return None;
    };
    // Unspecified failures alternate between null and an empty string.
    let candidates = APIMALL_FAILURE_MESSAGES
        .iter()
        .filter(|(_, r)| *r == reason);
    let n = candidates.clone().count().max(1);
    candidates
        .clone()
        .nth((plan.variant >> 9) as usize % n)
        .and_then(|(m, _)| *m)
}

/// `data` of `GET /api/v1/{images|videos|audio}/{id}`.
fn mall_task(plan: &Plan, now: Instant) -> MallTask<'_> {
    let v = mall_view(plan, now);
    MallTask {
        task_id: &plan.id,
        model: &plan.model,
        status: v.status,
        output: v.url.clone().map(|u| MallOutput {
            result_urls: vec![u],
        }),
        primary_url: v.url.clone(),
        url: KindUrls::new(plan.kind, v.url),
        error_message: mall_error_message(plan, now),
        credits_used: plan.credits,
        credits_refunded: v.refunded,
        created_at: millis(plan.created_wall),
        updated_at: v.updated_at,
        completed_at: v.completed_at,
    }
}

pub(crate) fn apimall_task_body(plan: &Plan, now: Instant, request_id: String) -> Vec<u8> {
    to_vec(&MallEnvelope {
        success: true,
        data: mall_task(plan, now),
        request_id,
    })
}

pub(crate) fn apimall_history_body<'a>(
    plans: impl Iterator<Item = &'a Plan>,
    now: Instant,
    page: u64,
    limit: u64,
    request_id: String,
) -> Vec<u8> {
    let items = plans
        .map(|plan| {
            let v = mall_view(plan, now);
            MallHistoryItem {
                task_id: &plan.id,
                model: &plan.model,
                source: "api",
                created_at: millis(plan.created_wall),
                status: v.status,
                url: KindUrls::new(plan.kind, v.url),
                credits_used: plan.credits,
                credits_refunded: v.refunded,
                completed_at: v.completed_at,
            }
        })
        .collect();
    to_vec(&MallEnvelope {
        success: true,
        data: MallHistory { items, page, limit },
        request_id,
    })
}

/// The answer to `POST /api/v1/{kind}/generate`: the new task, charged at creation.
pub(crate) fn apimall_created(plan: &Plan, remaining_credits: f64, request_id: String) -> Vec<u8> {
    #[derive(Serialize)]
    struct Created<'a> {
        task_id: &'a str,
        status: &'static str,
        #[serde(serialize_with = "credits")]
        credits_used: f64,
        #[serde(serialize_with = "credits")]
        remaining_credits: f64,
    }
    to_vec(&MallEnvelope {
        success: true,
        data: Created {
            task_id: &plan.id,
            status: "pending",
            credits_used: plan.credits,
            remaining_credits,
        },
        request_id,
    })
}

pub(crate) fn apimall_balance_body(balance: f64, request_id: String) -> Vec<u8> {
    #[derive(Serialize)]
    struct Balances {
        #[serde(serialize_with = "credits")]
        credits: f64,
        #[serde(serialize_with = "credits")]
        api_credits: f64,
    }
    to_vec(&MallEnvelope {
        success: true,
        data: Balances {
            credits: balance,
            api_credits: balance,
        },
        request_id,
    })
}

pub(crate) fn apimall_error(code: &str, message: &str, request_id: String) -> Vec<u8> {
    to_vec(&MallErrorEnvelope {
        success: false,
        error: MallError { code, message },
        request_id,
    })
}

/// The outbound callback for a task that just became terminal, if one is configured.
pub(crate) fn callback_for(cfg: &SimConfig, plan: &Plan, now: Instant) -> Option<Delivery> {
    match plan.provider {
        SimProvider::Maxapi => plan.callback.as_ref().map(|url| Delivery {
            provider: SimProvider::Maxapi,
            url: url.clone(),
            body: maxapi_task_body(plan, now),
        }),
        SimProvider::Apimall => cfg.apimall.callback_url.as_ref().map(|url| Delivery {
            provider: SimProvider::Apimall,
            url: url.clone(),
            body: if cfg.apimall.callback_envelope {
                apimall_task_body(
                    plan,
                    now,
                    format!("req_cb_{}", plan.id.get(4..).unwrap_or("")),
                )
            } else {
                to_vec(&mall_task(plan, now))
            },
        }),
    }
}

fn to_vec<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail; an empty body would be caught by tests.
    serde_json::to_vec(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_documented_shapes() {
        let u = uuid_v4(u128::MAX);
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"), "{u}");
        let id = ulid_id("img_", SystemTime::now(), 12345);
        assert!(is_apimall_id(&id, ModelKind::Image), "{id}");
        assert!(!is_apimall_id(&id, ModelKind::Video));
        assert!(id[4..].starts_with("01"), "{id}");
        assert!(!is_apimall_id(
            "img_01HQ9M7XJQ7PZ3GQ9F6C5W3N2I",
            ModelKind::Image
        ));
    }

    #[test]
    fn credits_render_as_integers_when_whole() {
        let body = apimall_balance_body(120.0, "req_x".into());
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["data"]["credits"], json!(120));
        let body = apimall_balance_body(0.5, "req_x".into());
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["data"]["api_credits"], json!(0.5));
    }
}
