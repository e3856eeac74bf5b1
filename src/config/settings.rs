//! What the exporter runs on: the configuration with defaults applied, overrides folded in,
//! every value checked and the secrets read (see [`super::resolve`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::file::{PollingFile, ProviderType};
use super::yaml::HumanDuration;
use crate::providers::{FailureRules, HistoryKind};
use crate::secret::Secret;

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
    /// `sharding.peer_url_template`, checked (see `crate::forward::PeerTemplate`).
    pub peer_url_template: Option<String>,
    pub providers: Vec<ProviderSettings>,
}

/// This replica's share of the tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub(crate) index: u32,
    pub(crate) count: u32,
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
    pub(super) fn merged(&self, overrides: &PollingFile) -> Polling {
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
    /// Whether a callback is confirmed by one get-task request (`webhook.confirm`).
    pub webhook_confirm: bool,
    pub history: Option<HistorySettings>,
    pub balance_interval: Option<Duration>,
    pub failure_rules: FailureRules,
    /// The `failure_reasons` as written, to tell whether a reload changed them.
    pub failure_rules_source: Vec<(String, String)>,
    pub proxy: ProxySettings,
}

/// The reverse proxy to the provider's `base_url` (`providers[].proxy`); also what
/// `crate::proxy::ProviderProxy` is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    pub enabled: bool,
    /// Largest request body passed upstream (a submit request carries its input images).
    pub max_request_body_bytes: u64,
    /// Time for the upstream to answer with headers (the request body's upload included);
    /// also the longest pause between two reads of the answer body.
    pub timeout: Duration,
}

impl Default for ProxySettings {
    /// Off, 64 MiB bodies, 120 s per request: the file's defaults.
    fn default() -> Self {
        ProxySettings {
            enabled: false,
            max_request_body_bytes: 64 << 20,
            timeout: Duration::from_secs(120),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HistorySettings {
    pub(crate) interval: Duration,
    pub(crate) max_pages: u32,
    pub(crate) kinds: Vec<HistoryKind>,
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
