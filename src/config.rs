//! Configuration: the YAML file as typed structs, its defaults, its validation, and the
//! secrets it points at (`token_env` / `token_file`, never inline).
//!
//! Loading is two steps. [`FileConfig`] is exactly the file (serde, unknown keys refused).
//! [`Settings`] is what the exporter runs on: defaults applied, per-provider polling
//! overrides folded in, secrets read. Every problem is collected with its key path, so one
//! run of `check-config` shows them all.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::providers::{FailureRules, HistoryKind};
use crate::secret::Secret;

pub const DEFAULT_LISTEN_ADDRESS: &str = "0.0.0.0:9850";
pub const DEFAULT_MAXAPI_BASE_URL: &str = "https://api.maxapi.io";
pub const DEFAULT_APIMALL_BASE_URL: &str = "https://gateway.apimall.ai";

/// Default histogram buckets for completion latency: seconds (images) to 4 h (video).
pub const DEFAULT_LATENCY_BUCKETS: [f64; 18] = [
    1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 1200.0, 1800.0,
    3600.0, 7200.0, 14400.0,
];

// ---------------------------------------------------------------------------------------
// The file
// ---------------------------------------------------------------------------------------

/// The configuration file, key for key.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub server: ServerFile,
    pub polling: PollingFile,
    pub state: StateFile,
    pub metrics: MetricsFile,
    pub sharding: ShardingFile,
    pub providers: Vec<ProviderFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerFile {
    /// Listener for every endpoint. `--web.listen-address` overrides it.
    pub listen_address: String,
    /// Environment variable holding the bearer token for `POST /api/v1/tasks`,
    /// `DELETE /api/v1/tasks/...` and `POST /-/reload`. Unset: those endpoints answer 403.
    pub api_token_env: Option<String>,
    /// Same, read from a file (re-read on reload).
    pub api_token_file: Option<PathBuf>,
}

impl Default for ServerFile {
    fn default() -> Self {
        ServerFile {
            listen_address: DEFAULT_LISTEN_ADDRESS.to_string(),
            api_token_env: None,
            api_token_file: None,
        }
    }
}

/// Polling defaults (top level) or overrides (under a provider: every key optional).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PollingFile {
    pub interval: Option<HumanDuration>,
    pub max_interval: Option<HumanDuration>,
    pub timeout: Option<HumanDuration>,
    pub requests_per_second: Option<f64>,
    pub max_concurrency: Option<u32>,
    pub max_task_age: Option<HumanDuration>,
    pub retention: Option<HumanDuration>,
    pub forget_after: Option<HumanDuration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateFile {
    pub path: PathBuf,
}

impl Default for StateFile {
    fn default() -> Self {
        StateFile {
            path: PathBuf::from("data/state"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsFile {
    pub max_models_per_provider: usize,
    pub latency_buckets: Vec<f64>,
}

impl Default for MetricsFile {
    fn default() -> Self {
        MetricsFile {
            max_models_per_provider: 50,
            latency_buckets: DEFAULT_LATENCY_BUCKETS.to_vec(),
        }
    }
}

/// Which share of the tasks this replica owns (`--shard.index` / `--shard.count` override).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShardingFile {
    pub index: u32,
    pub count: u32,
}

impl Default for ShardingFile {
    fn default() -> Self {
        ShardingFile { index: 0, count: 1 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderType {
    Maxapi,
    Apimall,
}

impl ProviderType {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderType::Maxapi => "maxapi",
            ProviderType::Apimall => "apimall",
        }
    }

    fn default_base_url(self) -> &'static str {
        match self {
            ProviderType::Maxapi => DEFAULT_MAXAPI_BASE_URL,
            ProviderType::Apimall => DEFAULT_APIMALL_BASE_URL,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderFile {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ProviderType,
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default)]
    pub token_env: Option<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub polling: PollingFile,
    #[serde(default)]
    pub tasks: Vec<String>,
    #[serde(default)]
    pub task_files: Vec<String>,
    #[serde(default)]
    pub webhook: Option<WebhookFile>,
    #[serde(default)]
    pub history: Option<HistoryFile>,
    #[serde(default)]
    pub balance: Option<BalanceFile>,
    #[serde(default)]
    pub failure_reasons: Vec<FailureRuleFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookFile {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub token_env: Option<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryFile {
    pub enabled: bool,
    pub interval: HumanDuration,
    pub max_pages: u32,
    pub kinds: Vec<String>,
}

impl Default for HistoryFile {
    fn default() -> Self {
        HistoryFile {
            enabled: false,
            interval: HumanDuration(Duration::from_secs(60)),
            max_pages: 10,
            kinds: vec!["images".into()],
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalanceFile {
    pub enabled: bool,
    pub interval: HumanDuration,
}

impl Default for BalanceFile {
    fn default() -> Self {
        BalanceFile {
            enabled: false,
            interval: HumanDuration(Duration::from_secs(300)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureRuleFile {
    pub reason: String,
    pub pattern: String,
}

/// A humantime duration in the file (`15s`, `5m`, `6h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {text:?} ({e}); use e.g. 15s, 5m, 6h"
                ))
            })
    }
}

// ---------------------------------------------------------------------------------------
// What the exporter runs on
// ---------------------------------------------------------------------------------------

/// The validated configuration, secrets loaded.
#[derive(Debug, Clone)]
pub struct Settings {
    pub source: PathBuf,
    pub listen_address: SocketAddr,
    pub api_token: Option<Secret>,
    pub state_path: PathBuf,
    pub max_models_per_provider: usize,
    pub latency_buckets: Vec<f64>,
    pub shard: Shard,
    pub providers: Vec<ProviderSettings>,
}

/// This replica's share of the tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Polling {
    pub interval: Duration,
    pub max_interval: Duration,
    pub timeout: Duration,
    pub requests_per_second: f64,
    pub max_concurrency: u32,
    pub max_task_age: Duration,
    pub retention: Duration,
    /// How long the id of a finished task is remembered after the last time a source
    /// mentioned it, so that it is not tracked and counted again.
    pub forget_after: Duration,
}

impl Default for Polling {
    fn default() -> Self {
        Polling {
            interval: Duration::from_secs(15),
            max_interval: Duration::from_secs(300),
            timeout: Duration::from_secs(10),
            requests_per_second: 5.0,
            max_concurrency: 8,
            max_task_age: Duration::from_secs(6 * 3600),
            retention: Duration::from_secs(3600),
            forget_after: Duration::from_secs(24 * 3600),
        }
    }
}

impl Polling {
    /// `overrides` win over `self`, key by key.
    fn merged(&self, overrides: &PollingFile) -> Polling {
        let d = |o: Option<HumanDuration>, base: Duration| o.map_or(base, |h| h.0);
        Polling {
            interval: d(overrides.interval, self.interval),
            max_interval: d(overrides.max_interval, self.max_interval),
            timeout: d(overrides.timeout, self.timeout),
            requests_per_second: overrides
                .requests_per_second
                .unwrap_or(self.requests_per_second),
            max_concurrency: overrides.max_concurrency.unwrap_or(self.max_concurrency),
            max_task_age: d(overrides.max_task_age, self.max_task_age),
            retention: d(overrides.retention, self.retention),
            forget_after: d(overrides.forget_after, self.forget_after),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProviderSettings {
    pub name: String,
    pub kind: ProviderType,
    /// Without a trailing slash.
    pub base_url: String,
    pub token: Secret,
    pub polling: Polling,
    pub tasks: Vec<String>,
    pub task_files: Vec<String>,
    pub webhook_token: Option<Secret>,
    pub history: Option<HistorySettings>,
    pub balance_interval: Option<Duration>,
    pub failure_rules: FailureRules,
    /// The `failure_reasons` as written, to tell whether a reload changed them.
    pub failure_rules_source: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HistorySettings {
    pub interval: Duration,
    pub max_pages: u32,
    pub kinds: Vec<HistoryKind>,
}

/// Longest task id we accept from any source; providers use UUIDs and 30-character ids.
pub const MAX_TASK_ID_LEN: usize = 128;

/// Whether `id` may be tracked: non-empty, bounded, printable ASCII without spaces, and
/// not made of dots only (`..` would walk up the request path even when percent-encoded).
pub fn is_valid_task_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_TASK_ID_LEN
        && id.bytes().all(|b| b.is_ascii_graphic())
        && !id.bytes().all(|b| b == b'.')
}

// ---------------------------------------------------------------------------------------
// Loading and validation
// ---------------------------------------------------------------------------------------

/// One thing wrong with the configuration, at a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// YAML syntax or a type/unknown-key error; the message carries line and column.
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {} problem(s):\n  {}", problems.len(), join_problems(problems))]
    Invalid {
        file: String,
        problems: Vec<Problem>,
    },
}

fn join_problems(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("\n  ")
}

/// Where secrets and environment come from; a trait so tests need not touch the real
/// process environment.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Environment for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<F: Fn(&str) -> Option<String>> Environment for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
}

/// Command-line values that override the file.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen_address: Option<String>,
    pub shard_index: Option<u32>,
    pub shard_count: Option<u32>,
}

/// Reads, parses and validates the file at `path`.
pub fn load(
    path: &Path,
    overrides: &Overrides,
    env: &dyn Environment,
) -> Result<Settings, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    let parsed = parse(&text).map_err(|message| ConfigError::Parse {
        file: file.clone(),
        message,
    })?;
    resolve(parsed, path, overrides, env)
        .map_err(|problems| ConfigError::Invalid { file, problems })
}

/// Parser options for files that may hold secrets by mistake: errors name the line and
/// column but do not quote the file (a `token: sk-...` typo must not reach logs or the
/// reload answer).
pub fn no_snippet() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    options
}

/// Parses YAML text into the file structure. The error text names line and column.
pub fn parse(text: &str) -> Result<FileConfig, String> {
    parse_yaml(text)
}

/// Parses a YAML document into `T` (an empty one gives `T::default()`). The error names the
/// key path ("providers[1].polling.interval", from serde_path_to_error) and the line and
/// column (from saphyr), without quoting the file (see [`no_snippet`]).
pub fn parse_yaml<T: serde::de::DeserializeOwned + Default>(text: &str) -> Result<T, String> {
    if text.trim().is_empty() {
        // An empty file is an empty mapping: every default applies.
        return Ok(T::default());
    }
    let mut key_path = String::new();
    let parsed = serde_saphyr::with_deserializer_from_str_with_options(text, no_snippet(), |de| {
        serde_path_to_error::deserialize::<_, T>(de).map_err(|e| {
            key_path = e.path().to_string();
            e.into_inner()
        })
    });
    parsed.map_err(|e| {
        let mut message = e.to_string();
        if let Some(loc) = e.location().filter(|_| !message.contains("line")) {
            message = format!("line {} column {}: {message}", loc.line(), loc.column());
        }
        if key_path.is_empty() || key_path == "." {
            message
        } else {
            format!("{key_path}: {message}")
        }
    })
}

/// Applies defaults and overrides, validates every key, and loads the secrets.
pub fn resolve(
    file: FileConfig,
    source: &Path,
    overrides: &Overrides,
    env: &dyn Environment,
) -> Result<Settings, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut problem = |path: &str, message: String| {
        problems.push(Problem {
            path: path.to_string(),
            message,
        })
    };

    let listen_text = overrides
        .listen_address
        .clone()
        .unwrap_or_else(|| file.server.listen_address.clone());
    let listen_address = match listen_text.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => {
            problem(
                "server.listen_address",
                format!("{listen_text:?} is not a host:port address (e.g. 0.0.0.0:9850)"),
            );
            SocketAddr::from(([0, 0, 0, 0], 9850))
        }
    };

    let api_token = match load_secret(
        "server",
        "api_token",
        file.server.api_token_env.as_deref(),
        file.server.api_token_file.as_deref(),
        false,
        env,
    ) {
        Ok(token) => token,
        Err(p) => {
            problems.extend(p);
            None
        }
    };
    let mut problem = |path: &str, message: String| {
        problems.push(Problem {
            path: path.to_string(),
            message,
        })
    };

    let defaults = Polling::default().merged(&file.polling);
    check_polling("polling", &defaults, &mut problem);

    if file.metrics.max_models_per_provider == 0 {
        problem(
            "metrics.max_models_per_provider",
            "must be at least 1".into(),
        );
    }
    let buckets = &file.metrics.latency_buckets;
    if buckets.is_empty() {
        problem("metrics.latency_buckets", "must not be empty".into());
    } else if !buckets.iter().all(|b| b.is_finite() && *b > 0.0)
        || buckets.windows(2).any(|w| w[0] >= w[1])
    {
        problem(
            "metrics.latency_buckets",
            "must be positive numbers in strictly increasing order".into(),
        );
    }

    let shard = Shard {
        index: overrides.shard_index.unwrap_or(file.sharding.index),
        count: overrides.shard_count.unwrap_or(file.sharding.count),
    };
    if shard.count == 0 {
        problem("sharding.count", "must be at least 1".into());
    } else if shard.index >= shard.count {
        problem(
            "sharding.index",
            format!(
                "{} is out of range for {} shard(s) (0..{})",
                shard.index, shard.count, shard.count
            ),
        );
    }

    if file.providers.is_empty() {
        problem("providers", "at least one provider is required".into());
    }

    let mut providers = Vec::new();
    let mut names = HashSet::new();
    for (i, p) in file.providers.iter().enumerate() {
        let at = format!("providers[{i}]");
        if !names.insert(p.name.as_str()) {
            problems.push(Problem {
                path: format!("{at}.name"),
                message: format!("duplicate provider name {:?}", p.name),
            });
        }
        match resolve_provider(&at, p, &defaults, env) {
            Ok(settings) => providers.push(settings),
            Err(p) => problems.extend(p),
        }
    }

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Settings {
        source: source.to_path_buf(),
        listen_address,
        api_token,
        state_path: file.state.path,
        max_models_per_provider: file.metrics.max_models_per_provider,
        latency_buckets: file.metrics.latency_buckets,
        shard,
        providers,
    })
}

fn check_polling(at: &str, p: &Polling, problem: &mut impl FnMut(&str, String)) {
    if p.interval.is_zero() {
        problem(&format!("{at}.interval"), "must be greater than 0".into());
    }
    if p.max_interval < p.interval {
        problem(
            &format!("{at}.max_interval"),
            format!(
                "{} is shorter than interval {}",
                humantime::format_duration(p.max_interval),
                humantime::format_duration(p.interval)
            ),
        );
    }
    if p.timeout.is_zero() {
        problem(&format!("{at}.timeout"), "must be greater than 0".into());
    }
    if !(p.requests_per_second.is_finite() && p.requests_per_second > 0.0) {
        problem(
            &format!("{at}.requests_per_second"),
            "must be a number greater than 0".into(),
        );
    }
    if p.max_concurrency == 0 {
        problem(
            &format!("{at}.max_concurrency"),
            "must be at least 1".into(),
        );
    }
    if p.max_task_age.is_zero() {
        problem(
            &format!("{at}.max_task_age"),
            "must be greater than 0".into(),
        );
    }
    if p.forget_after < p.retention {
        problem(
            &format!("{at}.forget_after"),
            format!(
                "{} is shorter than retention {}",
                humantime::format_duration(p.forget_after),
                humantime::format_duration(p.retention)
            ),
        );
    }
}

fn resolve_provider(
    at: &str,
    p: &ProviderFile,
    defaults: &Polling,
    env: &dyn Environment,
) -> Result<ProviderSettings, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut problem = |path: String, message: String| problems.push(Problem { path, message });

    // The name is a label value and a URL path segment (`/webhooks/{name}`): keep it tame.
    let name_ok = !p.name.is_empty()
        && p.name.len() <= 64
        && p.name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !name_ok {
        problem(
            format!("{at}.name"),
            format!(
                "{:?} must be 1-64 characters of a-z, 0-9, '_' or '-'",
                p.name
            ),
        );
    }

    let base_url = p
        .base_url
        .clone()
        .unwrap_or_else(|| p.kind.default_base_url().to_string());
    let base_url = base_url.trim_end_matches('/').to_string();
    match reqwest::Url::parse(&base_url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
            if !url.username().is_empty() || url.password().is_some() {
                problem(
                    format!("{at}.base_url"),
                    "must not contain credentials; use token_env or token_file".into(),
                );
            }
        }
        _ => problem(
            format!("{at}.base_url"),
            "must be an http:// or https:// URL".into(),
        ),
    }

    let token = match load_secret(
        at,
        "token",
        p.token_env.as_deref(),
        p.token_file.as_deref(),
        true,
        env,
    ) {
        Ok(t) => t,
        Err(ps) => {
            problems.extend(ps);
            None
        }
    };
    let mut problem = |path: String, message: String| problems.push(Problem { path, message });

    let polling = defaults.merged(&p.polling);
    // Problems of the shared defaults are reported once, under `polling`.
    if polling != *defaults {
        check_polling(&format!("{at}.polling"), &polling, &mut |path, m| {
            problem(path.to_string(), m)
        });
    }

    for (j, id) in p.tasks.iter().enumerate() {
        if !is_valid_task_id(id) {
            problem(
                format!("{at}.tasks[{j}]"),
                format!("not a task id (1-{MAX_TASK_ID_LEN} printable characters, no spaces)"),
            );
        }
    }
    for (j, pattern) in p.task_files.iter().enumerate() {
        if let Err(e) = glob::Pattern::new(pattern) {
            problem(format!("{at}.task_files[{j}]"), format!("bad glob: {e}"));
        }
    }

    let mut webhook_token = None;
    if let Some(w) = p.webhook.as_ref().filter(|w| w.enabled) {
        let wat = format!("{at}.webhook");
        match load_secret(
            &wat,
            "token",
            w.token_env.as_deref(),
            w.token_file.as_deref(),
            true,
            env,
        ) {
            Ok(t) => webhook_token = t,
            Err(ps) => problems.extend(ps),
        }
    }
    let mut problem = |path: String, message: String| problems.push(Problem { path, message });

    let mut history = None;
    if let Some(h) = p.history.as_ref().filter(|h| h.enabled) {
        if p.kind != ProviderType::Apimall {
            problem(
                format!("{at}.history"),
                format!("{} has no history endpoint", p.kind.as_str()),
            );
        }
        if h.interval.0.is_zero() {
            problem(
                format!("{at}.history.interval"),
                "must be greater than 0".into(),
            );
        }
        if h.max_pages == 0 {
            problem(
                format!("{at}.history.max_pages"),
                "must be at least 1".into(),
            );
        }
        let mut kinds = Vec::new();
        for (j, k) in h.kinds.iter().enumerate() {
            match k.as_str() {
                "images" => kinds.push(HistoryKind::Images),
                "videos" => kinds.push(HistoryKind::Videos),
                "audio" => kinds.push(HistoryKind::Audio),
                other => problem(
                    format!("{at}.history.kinds[{j}]"),
                    format!("{other:?} is not one of images, videos, audio"),
                ),
            }
        }
        history = Some(HistorySettings {
            interval: h.interval.0,
            max_pages: h.max_pages,
            kinds,
        });
    }

    let mut balance_interval = None;
    if let Some(b) = p.balance.as_ref().filter(|b| b.enabled) {
        if p.kind != ProviderType::Apimall {
            problem(
                format!("{at}.balance"),
                format!("{} has no balance endpoint", p.kind.as_str()),
            );
        }
        if b.interval.0.is_zero() {
            problem(
                format!("{at}.balance.interval"),
                "must be greater than 0".into(),
            );
        }
        balance_interval = Some(b.interval.0);
    }

    let rule_pairs: Vec<(String, String)> = p
        .failure_reasons
        .iter()
        .map(|r| (r.reason.clone(), r.pattern.clone()))
        .collect();
    let failure_rules = match FailureRules::new(&rule_pairs) {
        Ok(rules) => rules,
        Err(e) => {
            problem(format!("{at}.failure_reasons"), e.to_string());
            FailureRules::defaults()
        }
    };

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(ProviderSettings {
        name: p.name.clone(),
        kind: p.kind,
        base_url,
        token: token.expect("a required secret is present when no problem was reported"),
        polling,
        tasks: p.tasks.clone(),
        task_files: p.task_files.clone(),
        webhook_token,
        history,
        balance_interval,
        failure_rules,
        failure_rules_source: rule_pairs,
    })
}

/// Reads a secret named by `<prefix>.<key>_env` or `<prefix>.<key>_file` (exactly one).
fn load_secret(
    prefix: &str,
    key: &str,
    env_name: Option<&str>,
    file: Option<&Path>,
    required: bool,
    env: &dyn Environment,
) -> Result<Option<Secret>, Vec<Problem>> {
    let at = |suffix: &str| format!("{prefix}.{key}_{suffix}");
    match (env_name, file) {
        (Some(_), Some(_)) => Err(vec![Problem {
            path: at("env"),
            message: format!("set either {key}_env or {key}_file, not both"),
        }]),
        (None, None) if required => Err(vec![Problem {
            path: at("env"),
            message: format!("one of {key}_env or {key}_file is required"),
        }]),
        (None, None) => Ok(None),
        // Not a variable name: most likely the key itself, written here by mistake. Say so
        // without repeating it.
        (Some(var), None) if !is_env_name(var) => Err(vec![Problem {
            path: at("env"),
            message: "is not an environment variable name (letters, digits and '_'); \
                      name the variable that holds the secret, not the secret"
                .into(),
        }]),
        (Some(var), None) => match env.var(var).map(|v| v.trim().to_string()) {
            Some(value) if !value.is_empty() => Ok(Some(Secret::new(value))),
            Some(_) => Err(vec![Problem {
                path: at("env"),
                message: format!("variable {var} is empty"),
            }]),
            None => Err(vec![Problem {
                path: at("env"),
                message: format!("variable {var} is not set"),
            }]),
        },
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(value) if !value.trim().is_empty() => {
                Ok(Some(Secret::new(value.trim().to_string())))
            }
            Ok(_) => Err(vec![Problem {
                path: at("file"),
                message: format!("{} is empty", path.display()),
            }]),
            Err(e) => Err(vec![Problem {
                path: at("file"),
                message: format!("cannot read {}: {}", path.display(), e.kind()),
            }]),
        },
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`, at most 128 characters.
fn is_env_name(name: &str) -> bool {
    name.len() <= 128
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl Settings {
    /// A human summary for `check-config`; secrets never appear.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "configuration {} is valid\n  listen address: {}\n  state path: {}\n  api token: {}\n  shard: {}/{}\n",
            self.source.display(),
            self.listen_address,
            self.state_path.display(),
            if self.api_token.is_some() {
                "configured"
            } else {
                "none (registration API disabled)"
            },
            self.shard.index,
            self.shard.count,
        );
        for p in &self.providers {
            out.push_str(&format!(
                "  provider {} ({}): {}, {} static task(s), {} task file pattern(s), webhook {}, history {}, balance {}, poll every {} up to {}, {} req/s, {} concurrent\n",
                p.name,
                p.kind.as_str(),
                p.base_url,
                p.tasks.len(),
                p.task_files.len(),
                if p.webhook_token.is_some() { "on" } else { "off" },
                if p.history.is_some() { "on" } else { "off" },
                if p.balance_interval.is_some() { "on" } else { "off" },
                humantime::format_duration(p.polling.interval),
                humantime::format_duration(p.polling.max_interval),
                p.polling.requests_per_second,
                p.polling.max_concurrency,
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name: &str| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    fn resolve_text(
        text: &str,
        vars: &'static [(&'static str, &'static str)],
    ) -> Result<Settings, Vec<Problem>> {
        let file = parse(text).map_err(|m| {
            vec![Problem {
                path: String::new(),
                message: m,
            }]
        })?;
        resolve(
            file,
            Path::new("test.yaml"),
            &Overrides::default(),
            &env(vars),
        )
    }

    #[test]
    fn defaults_apply_and_provider_overrides_win() {
        let s = resolve_text(
            "polling: {interval: 30s}\nproviders:\n  - name: mx\n    type: maxapi\n    token_env: K\n    polling: {max_concurrency: 2}\n",
            &[("K", "secret-value")],
        )
        .unwrap();
        let p = &s.providers[0];
        assert_eq!(p.polling.interval, Duration::from_secs(30));
        assert_eq!(p.polling.max_concurrency, 2);
        assert_eq!(p.polling.max_interval, Duration::from_secs(300));
        assert_eq!(p.base_url, DEFAULT_MAXAPI_BASE_URL);
        assert_eq!(p.token.expose(), "secret-value");
        assert_eq!(s.listen_address.to_string(), "0.0.0.0:9850");
        assert_eq!(s.latency_buckets, DEFAULT_LATENCY_BUCKETS.to_vec());
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let err = resolve_text(
            "polling: {interval: 10m, max_interval: 1m}\nproviders:\n  - name: a\n    type: maxapi\n    token_env: MISSING\n  - name: a\n    type: maxapi\n    token_env: K\n    history: {enabled: true}\n",
            &[("K", "x")],
        )
        .unwrap_err();
        let text: Vec<String> = err.iter().map(|p| p.to_string()).collect();
        assert!(
            text.contains(&"polling.max_interval: 1m is shorter than interval 10m".to_string()),
            "{text:?}"
        );
        assert!(
            text.contains(&"providers[0].token_env: variable MISSING is not set".to_string()),
            "{text:?}"
        );
        assert!(
            text.contains(&"providers[1].name: duplicate provider name \"a\"".to_string()),
            "{text:?}"
        );
        assert!(
            text.contains(&"providers[1].history: maxapi has no history endpoint".to_string()),
            "{text:?}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_durations_name_the_line() {
        let err = parse("server:\n  listen_adress: 1.2.3.4:5\n").unwrap_err();
        assert!(err.contains("listen_adress"), "{err}");
        let err = parse("providers:\n  - name: a\n    type: maxapi\n    polling: {interval: 5 minutes please}\n").unwrap_err();
        assert!(err.starts_with("providers[0].polling.interval: "), "{err}");
        assert!(err.contains('2'), "line number expected: {err}");
        let err = parse("polling:\n  interval: soon\n").unwrap_err();
        assert!(err.contains("invalid duration"), "{err}");
    }

    #[test]
    fn parse_errors_do_not_quote_the_file() {
        // A key written inline by mistake must not be echoed into logs or the reload answer.
        for text in [
            "providers:\n  - name: a\n    type: maxapi\n    token: sk-inline-7f3e\n",
            "providers:\n  - name: a\n    type: maxapi\n    token_env: [sk-inline-7f3e\n",
            "server: sk-inline-7f3e\n",
        ] {
            let err = parse(text).unwrap_err();
            assert!(!err.contains("sk-inline-7f3e"), "{err}");
            assert!(err.contains("line"), "{err}");
        }
        let err = resolve_text(
            "providers:\n  - {name: a, type: apimall, token_env: sk-inline-7f3e}\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(err[0].path, "providers[0].token_env");
        assert!(!err[0].message.contains("sk-inline-7f3e"), "{err:?}");
    }

    #[test]
    fn secrets_need_exactly_one_source() {
        let err = resolve_text("providers:\n  - {name: a, type: apimall}\n", &[]).unwrap_err();
        assert_eq!(
            err[0].to_string(),
            "providers[0].token_env: one of token_env or token_file is required"
        );
        let err = resolve_text(
            "providers:\n  - {name: a, type: apimall, token_env: K, token_file: /nonexistent}\n",
            &[("K", "x")],
        )
        .unwrap_err();
        assert!(err[0].message.contains("not both"));
    }

    #[test]
    fn secret_values_never_reach_problems_or_summary() {
        let s = resolve_text(
            "server: {api_token_env: T}\nproviders:\n  - {name: a, type: apimall, token_env: K}\n",
            &[("K", "sk-live-123"), ("T", "tok-456")],
        )
        .unwrap();
        let summary = s.summary();
        assert!(!summary.contains("sk-live-123") && !summary.contains("tok-456"));
        assert!(!format!("{s:?}").contains("sk-live-123"));
    }
}
