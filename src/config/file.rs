//! The configuration file, key for key (serde). Unknown keys are refused: they are typos.
//! Nothing here checks values; [`super::resolve`] does, with defaults applied.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::yaml::HumanDuration;

pub(crate) const DEFAULT_LISTEN_ADDRESS: &str = "0.0.0.0:9850";
pub(crate) const DEFAULT_MAXAPI_BASE_URL: &str = "https://api.maxapi.io";
pub(crate) const DEFAULT_APIMALL_BASE_URL: &str = "https://gateway.apimall.ai";

/// Default histogram buckets for completion latency: seconds (images) to 4 h (video).
pub const DEFAULT_LATENCY_BUCKETS: [f64; 18] = [
    1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0, 1200.0, 1800.0,
    3600.0, 7200.0, 14400.0,
];

/// The configuration file, key for key.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub(crate) server: ServerFile,
    pub(crate) polling: PollingFile,
    pub(crate) state: StateFile,
    pub(crate) metrics: MetricsFile,
    pub(crate) sharding: ShardingFile,
    pub(crate) providers: Vec<ProviderFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ServerFile {
    /// Listener for every endpoint. `--web.listen-address` overrides it.
    pub(crate) listen_address: String,
    /// Environment variable holding the bearer token for `POST /api/v1/tasks`,
    /// `DELETE /api/v1/tasks/...` and `POST /-/reload`. Unset: those endpoints answer 403.
    pub(crate) api_token_env: Option<String>,
    /// Same, read from a file (re-read on reload).
    pub(crate) api_token_file: Option<PathBuf>,
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
pub(crate) struct PollingFile {
    pub(crate) interval: Option<HumanDuration>,
    pub(crate) max_interval: Option<HumanDuration>,
    pub(crate) timeout: Option<HumanDuration>,
    pub(crate) requests_per_second: Option<f64>,
    pub(crate) max_concurrency: Option<u32>,
    pub(crate) max_task_age: Option<HumanDuration>,
    pub(crate) retention: Option<HumanDuration>,
    pub(crate) forget_after: Option<HumanDuration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct StateFile {
    pub(crate) path: PathBuf,
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
pub(crate) struct MetricsFile {
    pub(crate) max_models_per_provider: usize,
    pub(crate) latency_buckets: Vec<f64>,
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
pub(crate) struct ShardingFile {
    pub(crate) index: u32,
    pub(crate) count: u32,
    /// Registration API address of shard `{index}`: where ids seen through the proxy are
    /// sent when this replica does not own them, or when HA copies must learn them too.
    pub(crate) peer_url_template: Option<String>,
}

impl Default for ShardingFile {
    fn default() -> Self {
        ShardingFile {
            index: 0,
            count: 1,
            peer_url_template: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderType {
    Maxapi,
    Apimall,
}

impl ProviderType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ProviderType::Maxapi => "maxapi",
            ProviderType::Apimall => "apimall",
        }
    }

    /// Whether a webhook callback is confirmed by one get-task request unless
    /// `webhook.confirm` says otherwise. A maxapi callback body is the complete get-task
    /// envelope, so it is used as is; the body of an apimall delivery is not documented, so
    /// it only names the task to ask about.
    pub(crate) fn confirms_webhooks_by_default(self) -> bool {
        match self {
            ProviderType::Maxapi => false,
            ProviderType::Apimall => true,
        }
    }

    pub(super) fn default_base_url(self) -> &'static str {
        match self {
            ProviderType::Maxapi => DEFAULT_MAXAPI_BASE_URL,
            ProviderType::Apimall => DEFAULT_APIMALL_BASE_URL,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProviderFile {
    pub(crate) name: String,
    #[serde(rename = "type")]
    pub(crate) kind: ProviderType,
    #[serde(default)]
    pub(crate) base_url: Option<String>,
    #[serde(default)]
    pub(crate) token_env: Option<String>,
    #[serde(default)]
    pub(crate) token_file: Option<PathBuf>,
    #[serde(default)]
    pub(crate) polling: PollingFile,
    #[serde(default)]
    pub(crate) tasks: Vec<String>,
    #[serde(default)]
    pub(crate) task_files: Vec<String>,
    #[serde(default)]
    pub(crate) webhook: Option<WebhookFile>,
    #[serde(default)]
    pub(crate) history: Option<HistoryFile>,
    #[serde(default)]
    pub(crate) balance: Option<BalanceFile>,
    #[serde(default)]
    pub(crate) failure_reasons: Vec<FailureRuleFile>,
    #[serde(default)]
    pub(crate) proxy: ProxyFile,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WebhookFile {
    #[serde(default)]
    pub(crate) enabled: bool,
    #[serde(default)]
    pub(crate) token_env: Option<String>,
    #[serde(default)]
    pub(crate) token_file: Option<PathBuf>,
    /// Whether a callback is confirmed by one get-task request; default per provider type
    /// ([`ProviderType::confirms_webhooks_by_default`]).
    #[serde(default)]
    pub(crate) confirm: Option<bool>,
}

/// The optional reverse proxy to the provider's `base_url` (`ANY /proxy/{provider}/...`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ProxyFile {
    pub(crate) enabled: bool,
    /// Largest request body passed upstream (a submit request carries its input images).
    pub(crate) max_request_body_bytes: u64,
    /// One proxied upstream request, body included.
    pub(crate) timeout: HumanDuration,
}

impl Default for ProxyFile {
    fn default() -> Self {
        let settings = super::ProxySettings::default();
        ProxyFile {
            enabled: settings.enabled,
            max_request_body_bytes: settings.max_request_body_bytes,
            timeout: HumanDuration(settings.timeout),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct HistoryFile {
    pub(crate) enabled: bool,
    pub(crate) interval: HumanDuration,
    pub(crate) max_pages: u32,
    pub(crate) kinds: Vec<String>,
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
pub(crate) struct BalanceFile {
    pub(crate) enabled: bool,
    pub(crate) interval: HumanDuration,
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
pub(crate) struct FailureRuleFile {
    pub(crate) reason: String,
    pub(crate) pattern: String,
}
