//! Simulator configuration: what the fake providers create, how tasks behave, which faults
//! are injected.
//!
//! Every struct denies unknown keys (a typo in a scenario file should fail loudly, not run a
//! different scenario) and every field has a default, so a scenario file only names what it
//! changes. Durations are humantime strings (`"500ms"`, `"2m"`).

use std::time::Duration;

use serde::Deserialize;

/// Whole simulator: both providers, the random seed and the memory bound.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// The maxapi.io-shaped API (`/api/v1/task/...`).
    pub maxapi: ProviderSim,
    /// The apimall.ai-shaped API (`/api/v1/images|videos|audio/...`, balances).
    pub apimall: ProviderSim,
    /// Seed of every random draw (task plans, ids, fault decisions, arrivals): the same seed and
    /// the same sequence of calls give the same tasks and the same faults. Default 1.
    pub seed: u64,
    /// Tasks remembered per provider. Past it the oldest task is forgotten and its id then
    /// answers 404 (its outcome is still counted in the ground truth). Keeps long demos in
    /// bounded memory. Default 100000.
    pub max_tasks: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            maxapi: ProviderSim::quiet("maxapi-sim-key", "nano-banana", ModelKind::Image),
            apimall: ProviderSim::quiet("apimall-sim-key", "nano-banana", ModelKind::Image),
            seed: 1,
            max_tasks: 100_000,
        }
    }
}

/// One simulated provider.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProviderSim {
    /// Accepted bearer keys. An empty list accepts any non-empty bearer token (handy for
    /// `simulate` sessions); a missing header is always refused.
    pub api_keys: Vec<String>,
    /// Tasks created in the background by [`crate::simulator::Simulator::spawn_workload`].
    pub workload: Workload,
    /// Faults injected into this provider's answers.
    pub faults: Faults,
    /// Tasks created at start-up with creation times spread over the past `backfill_window`,
    /// so that history listings and dashboards have something to show at once. Default 0.
    pub backfill_tasks: usize,
    /// How far back backfilled tasks are created. Default 1h.
    #[serde(with = "duration")]
    pub backfill_window: Duration,
    /// apimall only: starting account balance (`credits` and `api_credits`). Default 100000.
    pub initial_credits: f64,
    /// Terminal tasks are POSTed here once. maxapi: the query envelope, used as the
    /// `callBackUrl` of every task created without one (submit requests may name their own).
    /// apimall: the account webhook, body is the get-task `data` object (or the whole envelope,
    /// see `callback_envelope`). `http://` targets only. Default none.
    pub callback_url: Option<String>,
    /// apimall only: send the whole get-task envelope instead of its `data` object. Default false.
    pub callback_envelope: bool,
    /// Register every new task id with an exporter (`POST /api/v1/tasks`). Default none.
    pub register: Option<Register>,
}

impl ProviderSim {
    /// One key, one image model, no workload, no faults: the quiet default.
    fn quiet(key: &str, model: &str, kind: ModelKind) -> Self {
        ProviderSim {
            api_keys: vec![key.to_string()],
            workload: Workload {
                tasks_per_second: 0.0,
                total_tasks: None,
                models: vec![ModelSim::named(model, kind)],
            },
            faults: Faults::default(),
            backfill_tasks: 0,
            backfill_window: Duration::from_secs(3600),
            initial_credits: 100_000.0,
            callback_url: None,
            callback_envelope: false,
            register: None,
        }
    }
}

impl Default for ProviderSim {
    fn default() -> Self {
        ProviderSim::quiet("sim-key", "nano-banana", ModelKind::Image)
    }
}

/// Background task creation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Workload {
    /// Mean creation rate (Poisson arrivals). 0 disables the workload. Default 0.
    pub tasks_per_second: f64,
    /// Stop after this many workload tasks; none runs until the process ends. Default none.
    pub total_tasks: Option<u64>,
    /// Models to draw from, by `weight`. Also the models `create_task` and maxapi submit know.
    pub models: Vec<ModelSim>,
}

impl Default for Workload {
    fn default() -> Self {
        Workload {
            tasks_per_second: 0.0,
            total_tasks: None,
            models: vec![ModelSim::default()],
        }
    }
}

/// What a task id prefix and result type a model produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// maxapi result type `image`; apimall `img_` ids, `/images/`, `image_url`.
    Image,
    /// maxapi result type `video`; apimall `vid_` ids, `/videos/`, `video_url`.
    Video,
    /// apimall only: `aud_` ids, `/audio/`, `audio_url`.
    Audio,
}

impl ModelKind {
    pub const ALL: [ModelKind; 3] = [ModelKind::Image, ModelKind::Video, ModelKind::Audio];

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Image => "image",
            ModelKind::Video => "video",
            ModelKind::Audio => "audio",
        }
    }
}

/// One model's behaviour. Outcome ratios are drawn once per task, at creation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSim {
    /// Model name as the provider reports it (`input.model`, `model`).
    pub name: String,
    /// Relative share of the workload. Default 1.
    pub weight: f64,
    /// Output kind. Default image.
    pub kind: ModelKind,
    /// Shortest creation-to-terminal time. Default 1s.
    #[serde(with = "duration")]
    pub latency_min: Duration,
    /// Longest creation-to-terminal time (drawn uniformly in between). Default 5s.
    #[serde(with = "duration")]
    pub latency_max: Duration,
    /// Shortest creation-to-terminal time of a task that fails or times out, when failures
    /// end sooner (or later) than successes. Default `latency_min`.
    #[serde(with = "opt_duration")]
    pub failure_latency_min: Option<Duration>,
    /// Longest creation-to-terminal time of a failing task. Default `latency_max`.
    #[serde(with = "opt_duration")]
    pub failure_latency_max: Option<Duration>,
    /// Fraction of the latency spent pending before a worker takes the task. Default 0.2.
    pub pending_share: f64,
    /// Share of tasks that fail (`FAILURE` / `failed`), reason drawn from `failure_reasons`.
    /// Default 0.
    pub failure_ratio: f64,
    /// Share of tasks that time out: maxapi status `TIMEOUT`; apimall `failed` with a
    /// timeout error message. Default 0.
    pub timeout_ratio: f64,
    /// maxapi only: share of tasks cancelled part-way. Default 0.
    pub cancel_ratio: f64,
    /// apimall only: credits charged at creation (refunded in full on failure). Default 8.
    pub credits: f64,
    /// Mix of failure reasons among failed tasks.
    pub failure_reasons: FailureMix,
}

impl ModelSim {
    /// A model with default behaviour under another name.
    pub fn named(name: &str, kind: ModelKind) -> Self {
        ModelSim {
            name: name.to_string(),
            kind,
            ..ModelSim::default()
        }
    }
}

impl ModelSim {
    /// Creation-to-terminal range of a failing or timed-out task.
    pub(crate) fn failure_range(&self) -> (Duration, Duration) {
        (
            self.failure_latency_min.unwrap_or(self.latency_min),
            self.failure_latency_max.unwrap_or(self.latency_max),
        )
    }
}

impl Default for ModelSim {
    fn default() -> Self {
        ModelSim {
            name: "nano-banana".to_string(),
            weight: 1.0,
            kind: ModelKind::Image,
            latency_min: Duration::from_secs(1),
            latency_max: Duration::from_secs(5),
            failure_latency_min: None,
            failure_latency_max: None,
            pending_share: 0.2,
            failure_ratio: 0.0,
            timeout_ratio: 0.0,
            cancel_ratio: 0.0,
            credits: 8.0,
            failure_reasons: FailureMix::default(),
        }
    }
}

/// Relative weights of the reasons a failed task carries. Each reason is rendered in the
/// provider's own words (see [`crate::simulator::APIMALL_FAILURE_MESSAGES`]); the ground
/// truth records the normalized reason the exporter should derive. All default to 1.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailureMix {
    pub content_moderation: f64,
    pub invalid_parameters: f64,
    pub insufficient_credits: f64,
    /// maxapi `failure_reason` null or absent; apimall `error_message` null or empty.
    pub unspecified: f64,
    /// maxapi an undocumented `failure_reason` value; apimall a message no default rule matches.
    pub other: f64,
}

impl Default for FailureMix {
    fn default() -> Self {
        FailureMix {
            content_moderation: 1.0,
            invalid_parameters: 1.0,
            insufficient_credits: 1.0,
            unspecified: 1.0,
            other: 1.0,
        }
    }
}

impl FailureMix {
    pub(crate) fn weights(&self) -> [f64; 5] {
        [
            self.content_moderation,
            self.invalid_parameters,
            self.insufficient_credits,
            self.unspecified,
            self.other,
        ]
    }
}

/// Faults, decided per request with the seeded generator. They never change task state: a
/// client that retries sees the same task.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Share of requests answered HTTP 500 with the provider's error body. Default 0.
    pub error_500_ratio: f64,
    /// Share of requests answered HTTP 429 with the provider's error body. Default 0.
    pub error_429_ratio: f64,
    /// `Retry-After` seconds sent with injected 429s; none sends no header (the client must
    /// back off on its own). Default 1.
    pub retry_after: Option<u64>,
    /// Share of requests held for `timeout_delay` before being answered normally. Default 0.
    pub timeout_ratio: f64,
    /// How long a "timeout" request is held. Pick more than the client's timeout. Default 15s.
    #[serde(with = "duration")]
    pub timeout_delay: Duration,
    /// Share of requests answered HTTP 200 with a truncated JSON body or an HTML error page.
    /// Default 0.
    pub malformed_ratio: f64,
    /// Windows, relative to simulator start, in which every request answers 503.
    pub outages: Vec<Outage>,
    /// Token bucket (burst = one second's worth): past it requests answer 429 with
    /// `Retry-After: 1`, like a real gateway. Default none (unlimited).
    pub rate_limit_rps: Option<f64>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            error_500_ratio: 0.0,
            error_429_ratio: 0.0,
            retry_after: Some(1),
            timeout_ratio: 0.0,
            timeout_delay: Duration::from_secs(15),
            malformed_ratio: 0.0,
            outages: Vec::new(),
            rate_limit_rps: None,
        }
    }
}

/// A window of total unavailability.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    /// Offset from simulator start.
    #[serde(with = "duration")]
    pub start: Duration,
    #[serde(with = "duration")]
    pub duration: Duration,
}

/// Where to register new task ids (the exporter's `POST /api/v1/tasks`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    /// Full URL, e.g. `http://127.0.0.1:9850/api/v1/tasks` (`http://` only).
    pub url: String,
    /// Bearer token, read from this environment variable at each delivery.
    #[serde(default)]
    pub token_env: Option<String>,
    /// Bearer token given inline (for in-process demos; scenario files should use `token_env`).
    #[serde(default)]
    pub token: Option<String>,
    /// Value of `provider` in the body: the exporter's provider name. Default the provider type.
    #[serde(default)]
    pub provider_name: Option<String>,
}

/// A scenario that cannot run, with the key path at fault.
#[derive(Debug, thiserror::Error)]
pub enum SimConfigError {
    #[error("simulator config: {0}")]
    Parse(String),
    #[error("simulator config: {path}: {message}")]
    Invalid { path: String, message: String },
}

impl SimConfig {
    /// Parse and validate a YAML scenario.
    pub fn from_yaml(text: &str) -> Result<SimConfig, SimConfigError> {
        let cfg: SimConfig = crate::config::parse_yaml(text).map_err(SimConfigError::Parse)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check every value; the first problem is returned with its key path.
    /// [`crate::simulator::Simulator::new`] does not call this: it clamps instead, so that a
    /// test's hand-built config can never make it panic.
    pub fn validate(&self) -> Result<(), SimConfigError> {
        if self.max_tasks == 0 {
            return Err(invalid("max_tasks", "must be at least 1"));
        }
        self.maxapi.validate("maxapi", false)?;
        self.apimall.validate("apimall", true)
    }

    /// Lively defaults for `demo` and dashboard work: a few tasks per second per provider,
    /// image models finishing in seconds, a video model in minutes, about 10% failures
    /// covering every reason, light faults and one short apimall outage after ten minutes.
    pub fn demo() -> Self {
        let image = |name: &str, weight: f64, min: u64, max: u64, credits: f64| ModelSim {
            name: name.to_string(),
            weight,
            kind: ModelKind::Image,
            latency_min: Duration::from_secs(min),
            latency_max: Duration::from_secs(max),
            failure_latency_min: None,
            failure_latency_max: None,
            pending_share: 0.25,
            failure_ratio: 0.08,
            timeout_ratio: 0.01,
            cancel_ratio: 0.0,
            credits,
            failure_reasons: FailureMix::default(),
        };
        let video = |name: &str, weight: f64, credits: f64| ModelSim {
            name: name.to_string(),
            weight,
            kind: ModelKind::Video,
            latency_min: Duration::from_secs(120),
            latency_max: Duration::from_secs(480),
            failure_latency_min: None,
            failure_latency_max: None,
            pending_share: 0.3,
            failure_ratio: 0.06,
            timeout_ratio: 0.03,
            cancel_ratio: 0.0,
            credits,
            failure_reasons: FailureMix::default(),
        };
        let light_faults = Faults {
            error_500_ratio: 0.01,
            error_429_ratio: 0.005,
            retry_after: Some(2),
            timeout_ratio: 0.002,
            timeout_delay: Duration::from_secs(12),
            malformed_ratio: 0.003,
            outages: Vec::new(),
            rate_limit_rps: None,
        };
        let mut maxapi_models = vec![
            image("nano-banana", 6.0, 8, 40, 0.0),
            image("nano-banana-pro", 3.0, 15, 60, 0.0),
            video("seedance-1-pro", 1.0, 0.0),
        ];
        for m in &mut maxapi_models {
            m.failure_ratio -= 0.01;
            m.cancel_ratio = 0.01;
        }
        SimConfig {
            maxapi: ProviderSim {
                api_keys: vec!["demo-maxapi-key".to_string()],
                workload: Workload {
                    tasks_per_second: 2.0,
                    total_tasks: None,
                    models: maxapi_models,
                },
                faults: light_faults.clone(),
                backfill_tasks: 30,
                ..ProviderSim::default()
            },
            apimall: ProviderSim {
                api_keys: vec!["demo-apimall-key".to_string()],
                workload: Workload {
                    tasks_per_second: 3.0,
                    total_tasks: None,
                    models: vec![
                        image("nano-banana", 5.0, 6, 30, 8.0),
                        image("gpt-image-1", 2.0, 10, 50, 12.0),
                        video("veo3-fast", 1.0, 60.0),
                        ModelSim {
                            kind: ModelKind::Audio,
                            ..image("suno-v4", 1.0, 20, 90, 10.0)
                        },
                    ],
                },
                faults: Faults {
                    outages: vec![Outage {
                        start: Duration::from_secs(600),
                        duration: Duration::from_secs(45),
                    }],
                    rate_limit_rps: Some(20.0),
                    ..light_faults
                },
                backfill_tasks: 60,
                initial_credits: 5_000_000.0,
                ..ProviderSim::default()
            },
            seed: 42,
            max_tasks: 100_000,
        }
    }
}

impl ProviderSim {
    fn validate(&self, p: &str, is_apimall: bool) -> Result<(), SimConfigError> {
        let w = &self.workload;
        if !(w.tasks_per_second.is_finite() && w.tasks_per_second >= 0.0) {
            return Err(invalid(
                format!("{p}.workload.tasks_per_second"),
                "must be a number >= 0",
            ));
        }
        if w.models.is_empty() {
            return Err(invalid(
                format!("{p}.workload.models"),
                "at least one model is needed",
            ));
        }
        let total_weight: f64 = w.models.iter().map(|m| m.weight.max(0.0)).sum();
        if !(total_weight > 0.0 && total_weight.is_finite()) {
            return Err(invalid(
                format!("{p}.workload.models"),
                "weights must add up to more than 0",
            ));
        }
        for (i, m) in w.models.iter().enumerate() {
            let path = format!("{p}.workload.models[{i}]");
            if m.name.trim().is_empty() {
                return Err(invalid(format!("{path}.name"), "must not be empty"));
            }
            if w.models[..i].iter().any(|o| o.name == m.name) {
                return Err(invalid(format!("{path}.name"), "duplicate model name"));
            }
            if !(m.weight.is_finite() && m.weight >= 0.0) {
                return Err(invalid(format!("{path}.weight"), "must be a number >= 0"));
            }
            if m.latency_min > m.latency_max {
                return Err(invalid(
                    format!("{path}.latency_min"),
                    "must not exceed latency_max",
                ));
            }
            if m.failure_range().0 > m.failure_range().1 {
                return Err(invalid(
                    format!("{path}.failure_latency_min"),
                    "must not exceed failure_latency_max (or latency_max)",
                ));
            }
            for (key, v) in [
                ("pending_share", m.pending_share),
                ("failure_ratio", m.failure_ratio),
                ("timeout_ratio", m.timeout_ratio),
                ("cancel_ratio", m.cancel_ratio),
            ] {
                check_ratio(&format!("{path}.{key}"), v)?;
            }
            if m.failure_ratio + m.timeout_ratio + m.cancel_ratio > 1.0 + 1e-9 {
                return Err(invalid(
                    format!("{path}.failure_ratio"),
                    "failure_ratio + timeout_ratio + cancel_ratio must not exceed 1",
                ));
            }
            if is_apimall && m.cancel_ratio > 0.0 {
                return Err(invalid(
                    format!("{path}.cancel_ratio"),
                    "apimall has no cancelled status",
                ));
            }
            if !is_apimall && m.kind == ModelKind::Audio {
                return Err(invalid(
                    format!("{path}.kind"),
                    "maxapi models are image or video",
                ));
            }
            if !(m.credits.is_finite() && m.credits >= 0.0) {
                return Err(invalid(format!("{path}.credits"), "must be a number >= 0"));
            }
            let mix = m.failure_reasons.weights();
            if mix.iter().any(|v| !(v.is_finite() && *v >= 0.0)) {
                return Err(invalid(
                    format!("{path}.failure_reasons"),
                    "weights must be numbers >= 0",
                ));
            }
            if m.failure_ratio > 0.0 && mix.iter().sum::<f64>() <= 0.0 {
                return Err(invalid(
                    format!("{path}.failure_reasons"),
                    "failure_ratio > 0 needs at least one reason with a weight",
                ));
            }
        }
        let f = &self.faults;
        for (key, v) in [
            ("error_500_ratio", f.error_500_ratio),
            ("error_429_ratio", f.error_429_ratio),
            ("timeout_ratio", f.timeout_ratio),
            ("malformed_ratio", f.malformed_ratio),
        ] {
            check_ratio(&format!("{p}.faults.{key}"), v)?;
        }
        if f.error_500_ratio + f.error_429_ratio + f.timeout_ratio + f.malformed_ratio > 1.0 + 1e-9
        {
            return Err(invalid(
                format!("{p}.faults"),
                "the fault ratios must not add up to more than 1",
            ));
        }
        if let Some(rps) = f.rate_limit_rps
            && !(rps.is_finite() && rps > 0.0)
        {
            return Err(invalid(
                format!("{p}.faults.rate_limit_rps"),
                "must be a number > 0",
            ));
        }
        if !(self.initial_credits.is_finite()) {
            return Err(invalid(format!("{p}.initial_credits"), "must be a number"));
        }
        if self.api_keys.len() > super::state::MAX_KEYS {
            return Err(invalid(
                format!("{p}.api_keys"),
                format!("at most {} keys", super::state::MAX_KEYS),
            ));
        }
        if self.api_keys.iter().any(|k| k.is_empty()) {
            return Err(invalid(format!("{p}.api_keys"), "keys must not be empty"));
        }
        if let Some(url) = &self.callback_url {
            check_http_url(&format!("{p}.callback_url"), url)?;
        }
        if let Some(r) = &self.register {
            check_http_url(&format!("{p}.register.url"), &r.url)?;
            if r.token.is_some() == r.token_env.is_some() {
                return Err(invalid(
                    format!("{p}.register"),
                    "set exactly one of token and token_env",
                ));
            }
        }
        Ok(())
    }
}

fn invalid(path: impl Into<String>, message: impl Into<String>) -> SimConfigError {
    SimConfigError::Invalid {
        path: path.into(),
        message: message.into(),
    }
}

fn check_ratio(path: &str, v: f64) -> Result<(), SimConfigError> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(invalid(path, "must be between 0 and 1"))
    }
}

fn check_http_url(path: &str, url: &str) -> Result<(), SimConfigError> {
    if url.starts_with("http://") && url.len() > "http://".len() {
        Ok(())
    } else {
        Err(invalid(path, "must be an http:// URL"))
    }
}

/// humantime strings for `Duration` fields.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        crate::config::HumanDuration::deserialize(d).map(|d| d.0)
    }
}

/// Optional humantime strings (`null` or absent: none).
mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) => humantime::parse_duration(&text).map(Some).map_err(|e| {
                serde::de::Error::custom(format!("invalid duration {text:?}: {e} (e.g. \"500ms\")"))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_and_default_validate() {
        SimConfig::demo().validate().unwrap();
        SimConfig::default().validate().unwrap();
    }

    #[test]
    fn yaml_scenario_parses_with_durations() {
        let cfg = SimConfig::from_yaml(
            r#"
seed: 7
maxapi:
  api_keys: [k1, k2]
  workload:
    tasks_per_second: 5
    total_tasks: 100
    models:
      - {name: nano-banana, latency_min: 100ms, latency_max: 2s, failure_ratio: 0.1, failure_latency_max: 150ms}
      - {name: seedance, kind: video, latency_min: 1s, latency_max: 3s, cancel_ratio: 0.2}
  faults:
    error_500_ratio: 0.05
    outages: [{start: 10s, duration: 5s}]
    rate_limit_rps: 20
apimall:
  faults: {timeout_ratio: 0.01, timeout_delay: 2s, retry_after: null}
  callback_url: http://127.0.0.1:9850/webhooks/apimall?token=t
"#,
        )
        .unwrap();
        assert_eq!(cfg.seed, 7);
        assert_eq!(cfg.maxapi.workload.models.len(), 2);
        assert_eq!(
            cfg.maxapi.workload.models[0].latency_min,
            Duration::from_millis(100)
        );
        assert_eq!(cfg.maxapi.workload.models[1].kind, ModelKind::Video);
        assert_eq!(
            cfg.maxapi.workload.models[0].failure_range(),
            (Duration::from_millis(100), Duration::from_millis(150)),
            "failure_latency_min defaults to latency_min"
        );
        assert_eq!(cfg.maxapi.workload.models[1].failure_latency_max, None);
        assert_eq!(cfg.maxapi.faults.outages[0].start, Duration::from_secs(10));
        assert_eq!(cfg.apimall.faults.retry_after, None);
        assert_eq!(cfg.apimall.faults.timeout_delay, Duration::from_secs(2));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(SimConfig::from_yaml("maxapi: {api_kyes: [a]}").is_err());
        let err =
            SimConfig::from_yaml("apimall: {workload: {models: [{name: m, cancel_ratio: 0.5}]}}")
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("apimall.workload.models[0].cancel_ratio"),
            "{err}"
        );
        let err = SimConfig::from_yaml(
            "maxapi: {workload: {models: [{name: m, latency_min: 5s, failure_latency_max: 1s}]}}",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("maxapi.workload.models[0].failure_latency_min"),
            "{err}"
        );
        let err = SimConfig::from_yaml("maxapi: {faults: {timeout_delay: soon}}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid duration"), "{err}");
    }
}
