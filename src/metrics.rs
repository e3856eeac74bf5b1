//! Metric families and the `/metrics` page.
//!
//! Three kinds of state end up on the page:
//! - [`Accounting`]: the task counters and the completion-latency histogram. Only the
//!   persister moves them, after the store commit that recorded why (see `registry`), and
//!   their totals are restored from the store at start-up, so they continue across restarts.
//! - upstream and exporter metrics: ordinary `prometheus` crate metrics moved where things
//!   happen (upstream client, webhooks, reload). Upstream request and error counters are
//!   also saved with each store commit and restored.
//! - scrape-time gauges read from the registry's per-status counts (O(models), not O(tasks)).
//!
//! Series of providers no longer configured are left off the page.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use prometheus::core::Collector;
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry as PromRegistry, TextEncoder,
};

use crate::registry::{Event, Registry};
use crate::task::now_millis;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Git revision baked in by the build (`GENAI_EXPORTER_REVISION`), else `unknown`.
pub const REVISION: &str = match option_env!("GENAI_EXPORTER_REVISION") {
    Some(r) => r,
    None => "unknown",
};

/// Upstream request latency buckets (seconds).
const UPSTREAM_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

// ---------------------------------------------------------------------------------------
// Accounting: task counters that survive restarts
// ---------------------------------------------------------------------------------------

/// The task counter families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Completions,
    Failures,
    CreditsUsed,
    CreditsRefunded,
    Discovered,
    Dropped,
}

impl Family {
    const ALL: [Family; 6] = [
        Family::Completions,
        Family::Failures,
        Family::CreditsUsed,
        Family::CreditsRefunded,
        Family::Discovered,
        Family::Dropped,
    ];

    fn name(self) -> &'static str {
        match self {
            Family::Completions => "genai_task_completions_total",
            Family::Failures => "genai_task_failures_total",
            Family::CreditsUsed => "genai_task_credits_used_total",
            Family::CreditsRefunded => "genai_task_credits_refunded_total",
            Family::Discovered => "genai_task_discovered_total",
            Family::Dropped => "genai_task_dropped_total",
        }
    }

    fn help(self) -> &'static str {
        match self {
            Family::Completions => "Tasks seen reaching a terminal status, each task once.",
            Family::Failures => "Failed, timed-out and cancelled tasks by normalized reason.",
            Family::CreditsUsed => "Credits charged for tasks, each credit once.",
            Family::CreditsRefunded => "Credits refunded for tasks, each credit once.",
            Family::Discovered => "New task ids by discovery source.",
            Family::Dropped => "Tasks given up, by reason.",
        }
    }

    /// Label names after `provider`.
    fn labels(self) -> &'static [&'static str] {
        match self {
            Family::Completions => &["model", "status"],
            Family::Failures => &["model", "reason"],
            Family::CreditsUsed | Family::CreditsRefunded => &["model"],
            Family::Discovered => &["source"],
            Family::Dropped => &["reason"],
        }
    }

    fn key_prefix(self) -> &'static str {
        match self {
            Family::Completions => "completions",
            Family::Failures => "failures",
            Family::CreditsUsed => "credits_used",
            Family::CreditsRefunded => "credits_refunded",
            Family::Discovered => "discovered",
            Family::Dropped => "dropped",
        }
    }

    fn from_key_prefix(prefix: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.key_prefix() == prefix)
    }
}

/// One series: family, provider, then the family's other label values.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub family: Family,
    pub provider: String,
    pub labels: Vec<String>,
}

const KEY_SEP: char = '\u{1f}';
const LATENCY_KEY_PREFIX: &str = "latency";
const UPSTREAM_REQUESTS_KEY_PREFIX: &str = "upstream_requests";
const UPSTREAM_ERRORS_KEY_PREFIX: &str = "upstream_errors";

fn join_key(prefix: &str, parts: &[&str]) -> String {
    let mut key = prefix.to_string();
    for p in parts {
        key.push(KEY_SEP);
        key.push_str(p);
    }
    key
}

impl SeriesKey {
    fn store_key(&self) -> String {
        let mut parts = vec![self.provider.as_str()];
        parts.extend(self.labels.iter().map(String::as_str));
        join_key(self.family.key_prefix(), &parts)
    }
}

/// Latency histogram state of one (provider, model, status).
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramState {
    /// Non-cumulative counts per bucket; the last one is `+Inf`.
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl HistogramState {
    fn new(buckets: usize) -> Self {
        HistogramState {
            counts: vec![0; buckets + 1],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, bounds: &[f64], value: f64) {
        let i = bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(bounds.len());
        self.counts[i] += 1;
        self.sum += value;
        self.count += 1;
    }

    fn encode(&self, bounds: &[f64]) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + bounds.len() * 16 + 16);
        out.extend_from_slice(&(bounds.len() as u32).to_le_bytes());
        for b in bounds {
            out.extend_from_slice(&b.to_le_bytes());
        }
        for c in &self.counts {
            out.extend_from_slice(&c.to_le_bytes());
        }
        out.extend_from_slice(&self.sum.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out
    }

    /// Decodes a saved histogram; `None` when it is corrupt or its buckets differ from
    /// `bounds` (the buckets were reconfigured: old counts cannot be re-bucketed).
    fn decode(bytes: &[u8], bounds: &[f64]) -> Option<Self> {
        let n = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?) as usize;
        if n != bounds.len() || bytes.len() != 4 + n * 8 + (n + 1) * 8 + 16 {
            return None;
        }
        let word =
            |i: usize| -> [u8; 8] { bytes[4 + i * 8..12 + i * 8].try_into().expect("8 bytes") };
        for (i, b) in bounds.iter().enumerate() {
            if f64::from_le_bytes(word(i)) != *b {
                return None;
            }
        }
        let counts = (0..=n).map(|i| u64::from_le_bytes(word(n + i))).collect();
        let sum = f64::from_le_bytes(word(2 * n + 1));
        let count = u64::from_le_bytes(word(2 * n + 2));
        Some(HistogramState { counts, sum, count })
    }
}

#[derive(Debug, Default, Clone)]
struct AccountingState {
    counters: BTreeMap<SeriesKey, f64>,
    /// (provider, model, status) -> histogram.
    latency: BTreeMap<(String, String, String), HistogramState>,
}

/// Changes computed from a batch of events, not yet visible on `/metrics`.
#[derive(Debug, Default)]
pub struct Staged {
    counters: BTreeMap<SeriesKey, f64>,
    latency: BTreeMap<(String, String, String), HistogramState>,
}

impl Staged {
    pub fn is_empty(&self) -> bool {
        self.counters.is_empty() && self.latency.is_empty()
    }
}

/// Task counters and the latency histogram; see the module documentation.
#[derive(Debug)]
pub struct Accounting {
    state: Mutex<AccountingState>,
    buckets: Vec<f64>,
}

impl Accounting {
    pub fn new(buckets: Vec<f64>) -> Self {
        Accounting {
            state: Mutex::new(AccountingState::default()),
            buckets,
        }
    }

    /// Folds `events` of `provider` into `staged`, starting from the published values.
    pub fn stage(&self, staged: &mut Staged, provider: &str, events: &[Event]) {
        let state = self.state.lock().expect("accounting lock");
        let mut add = |family: Family, labels: Vec<String>, amount: f64| {
            let key = SeriesKey {
                family,
                provider: provider.to_string(),
                labels,
            };
            let base = state.counters.get(&key).copied().unwrap_or(0.0);
            *staged.counters.entry(key).or_insert(base) += amount;
        };
        for event in events {
            match event {
                Event::Discovered { source } => {
                    add(Family::Discovered, vec![source.as_str().into()], 1.0)
                }
                Event::Dropped { reason } => {
                    add(Family::Dropped, vec![reason.as_str().into()], 1.0)
                }
                Event::CreditsUsed { model, amount } => {
                    add(Family::CreditsUsed, vec![model.to_string()], *amount)
                }
                Event::CreditsRefunded { model, amount } => {
                    add(Family::CreditsRefunded, vec![model.to_string()], *amount)
                }
                Event::Completed {
                    model,
                    status,
                    reason,
                    latency_seconds,
                } => {
                    add(
                        Family::Completions,
                        vec![model.to_string(), status.as_str().into()],
                        1.0,
                    );
                    if let Some(reason) = reason {
                        add(
                            Family::Failures,
                            vec![model.to_string(), reason.as_str().into()],
                            1.0,
                        );
                    }
                    if let Some(latency) = latency_seconds {
                        let key = (
                            provider.to_string(),
                            model.to_string(),
                            status.as_str().to_string(),
                        );
                        let hist = staged.latency.entry(key.clone()).or_insert_with(|| {
                            state
                                .latency
                                .get(&key)
                                .cloned()
                                .unwrap_or_else(|| HistogramState::new(self.buckets.len()))
                        });
                        hist.observe(&self.buckets, *latency);
                    }
                }
            }
        }
    }

    /// The store rows of staged values.
    pub fn encode(&self, staged: &Staged) -> Vec<(String, Vec<u8>)> {
        let mut rows: Vec<(String, Vec<u8>)> = staged
            .counters
            .iter()
            .map(|(k, v)| (k.store_key(), v.to_le_bytes().to_vec()))
            .collect();
        for ((provider, model, status), hist) in &staged.latency {
            rows.push((
                join_key(LATENCY_KEY_PREFIX, &[provider, model, status]),
                hist.encode(&self.buckets),
            ));
        }
        rows
    }

    /// Makes staged values visible (after they were committed).
    pub fn publish(&self, staged: Staged) {
        let mut state = self.state.lock().expect("accounting lock");
        state.counters.extend(staged.counters);
        state.latency.extend(staged.latency);
    }

    /// Restores one saved row; false when the row is not an accounting row.
    fn restore_row(&self, key: &str, value: &[u8]) -> bool {
        let parts: Vec<&str> = key.split(KEY_SEP).collect();
        let mut state = self.state.lock().expect("accounting lock");
        if parts[0] == LATENCY_KEY_PREFIX && parts.len() == 4 {
            match HistogramState::decode(value, &self.buckets) {
                Some(hist) => {
                    state
                        .latency
                        .insert((parts[1].into(), parts[2].into(), parts[3].into()), hist);
                }
                None => tracing::warn!(
                    series = key.replace(KEY_SEP, "/"),
                    "latency buckets changed since the last run; that histogram starts from zero"
                ),
            }
            return true;
        }
        let Some(family) = Family::from_key_prefix(parts[0]) else {
            return false;
        };
        let (Some(provider), Ok(bytes)) = (parts.get(1), <[u8; 8]>::try_from(value)) else {
            return true;
        };
        if parts.len() != 2 + family.labels().len() {
            return true;
        }
        let value = f64::from_le_bytes(bytes);
        if value.is_finite() && value >= 0.0 {
            state.counters.insert(
                SeriesKey {
                    family,
                    provider: provider.to_string(),
                    labels: parts[2..].iter().map(|s| s.to_string()).collect(),
                },
                value,
            );
        }
        true
    }

    /// Current value of one counter series (tests, landing page).
    pub fn value(&self, family: Family, provider: &str, labels: &[&str]) -> f64 {
        let state = self.state.lock().expect("accounting lock");
        let key = SeriesKey {
            family,
            provider: provider.to_string(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
        };
        state.counters.get(&key).copied().unwrap_or(0.0)
    }

    fn families(&self, active: &HashSet<String>) -> Vec<MetricFamily> {
        let state = self.state.lock().expect("accounting lock");
        let mut families = Vec::new();
        for family in Family::ALL {
            let metrics: Vec<proto::Metric> = state
                .counters
                .iter()
                .filter(|(k, _)| k.family == family && active.contains(&k.provider))
                .map(|(k, v)| {
                    let mut labels = vec![label("provider", &k.provider)];
                    for (name, value) in family.labels().iter().zip(&k.labels) {
                        labels.push(label(name, value));
                    }
                    counter_metric(labels, *v)
                })
                .collect();
            families.push(family_of(
                family.name(),
                family.help(),
                MetricType::COUNTER,
                metrics,
            ));
        }
        let metrics = state
            .latency
            .iter()
            .filter(|((provider, _, _), _)| active.contains(provider))
            .map(|((provider, model, status), hist)| {
                let mut m = proto::Metric::default();
                m.set_label(vec![
                    label("provider", provider),
                    label("model", model),
                    label("status", status),
                ]);
                let mut h = proto::Histogram::default();
                let mut cumulative = 0;
                let mut buckets = Vec::with_capacity(self.buckets.len());
                for (bound, count) in self.buckets.iter().zip(&hist.counts) {
                    cumulative += count;
                    let mut b = proto::Bucket::default();
                    b.set_upper_bound(*bound);
                    b.set_cumulative_count(cumulative);
                    buckets.push(b);
                }
                h.set_bucket(buckets);
                h.set_sample_count(hist.count);
                h.set_sample_sum(hist.sum);
                m.set_histogram(h);
                m
            })
            .collect();
        families.push(family_of(
            "genai_task_completion_latency_seconds",
            "Time from created_at to completion (completed_at, else updated_at) of finished tasks, each once.",
            MetricType::HISTOGRAM,
            metrics,
        ));
        families
    }
}

fn label(name: &str, value: &str) -> proto::LabelPair {
    let mut l = proto::LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

fn counter_metric(labels: Vec<proto::LabelPair>, value: f64) -> proto::Metric {
    let mut m = proto::Metric::default();
    m.set_label(labels);
    let mut c = proto::Counter::default();
    c.set_value(value);
    m.set_counter(c);
    m
}

fn gauge_metric(labels: Vec<proto::LabelPair>, value: f64) -> proto::Metric {
    let mut m = proto::Metric::default();
    m.set_label(labels);
    let mut g = proto::Gauge::default();
    g.set_value(value);
    m.set_gauge(g);
    m
}

fn family_of(
    name: &str,
    help: &str,
    kind: MetricType,
    metrics: Vec<proto::Metric>,
) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

// ---------------------------------------------------------------------------------------
// All metrics
// ---------------------------------------------------------------------------------------

/// Every metric the exporter serves.
pub struct Metrics {
    prom: PromRegistry,
    pub accounting: Accounting,
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub upstream_errors: IntCounterVec,
    pub upstream_backoff: GaugeVec,
    pub account_credits: GaugeVec,
    pub provider_up: IntGaugeVec,
    pub last_poll_success: GaugeVec,
    pub reload_successful: IntGauge,
    pub reload_success_timestamp: Gauge,
    pub webhooks: IntCounterVec,
    pub discovery_errors: IntCounterVec,
    pub store_errors: IntCounterVec,
    pub shard_info: IntGaugeVec,
    /// Providers currently configured; series of others are left off the page.
    active: RwLock<HashSet<String>>,
    /// End of each provider's current rate-limit pause (`genai_upstream_backoff_seconds`
    /// is computed from it at scrape time, so it counts down between scrapes).
    pauses: Mutex<HashMap<String, Instant>>,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn counter_vec(prom: &PromRegistry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let v = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    prom.register(Box::new(v.clone())).expect("unique metric");
    v
}

fn gauge_vec(prom: &PromRegistry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let v = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    prom.register(Box::new(v.clone())).expect("unique metric");
    v
}

fn int_gauge_vec(prom: &PromRegistry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let v = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    prom.register(Box::new(v.clone())).expect("unique metric");
    v
}

impl Metrics {
    pub fn new(latency_buckets: Vec<f64>, registry: Arc<Registry>) -> Self {
        let prom = PromRegistry::new();
        #[cfg(target_os = "linux")]
        prom.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("process collector");

        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "genai_upstream_request_duration_seconds",
                "Upstream request latency, until the whole body was read.",
            )
            .buckets(UPSTREAM_BUCKETS.to_vec()),
            &["provider", "endpoint"],
        )
        .expect("valid metric");
        prom.register(Box::new(upstream_duration.clone()))
            .expect("unique metric");

        let build_info = int_gauge_vec(
            &prom,
            "genai_exporter_build_info",
            "Build information; constant 1.",
            &["version", "revision"],
        );
        build_info.with_label_values(&[VERSION, REVISION]).set(1);

        let reload_successful = IntGauge::new(
            "genai_exporter_config_last_reload_successful",
            "Whether the last configuration reload succeeded (1) or failed (0).",
        )
        .expect("valid metric");
        prom.register(Box::new(reload_successful.clone()))
            .expect("unique metric");
        let reload_success_timestamp = Gauge::new(
            "genai_exporter_config_last_reload_success_timestamp_seconds",
            "Time of the last successful configuration load.",
        )
        .expect("valid metric");
        prom.register(Box::new(reload_success_timestamp.clone()))
            .expect("unique metric");

        Metrics {
            accounting: Accounting::new(latency_buckets),
            upstream_requests: counter_vec(
                &prom,
                "genai_upstream_requests_total",
                "Upstream requests by endpoint and HTTP status code (or timeout, connect_error, io_error).",
                &["provider", "endpoint", "code"],
            ),
            upstream_duration,
            upstream_errors: counter_vec(
                &prom,
                "genai_upstream_errors_total",
                "API-level errors in upstream answers (envelope error codes, invalid_response).",
                &["provider", "endpoint", "error"],
            ),
            upstream_backoff: gauge_vec(
                &prom,
                "genai_upstream_backoff_seconds",
                "Seconds left in a rate-limit pause (Retry-After or back-off), 0 when none.",
                &["provider"],
            ),
            account_credits: gauge_vec(
                &prom,
                "genai_account_credits",
                "Account balance reported by the provider.",
                &["provider", "kind"],
            ),
            provider_up: int_gauge_vec(
                &prom,
                "genai_exporter_provider_up",
                "1 when the provider's last requests got valid answers, 0 on auth errors, 5xx or transport failures.",
                &["provider"],
            ),
            last_poll_success: gauge_vec(
                &prom,
                "genai_exporter_last_poll_success_timestamp_seconds",
                "Time of the last successful upstream answer.",
                &["provider"],
            ),
            reload_successful,
            reload_success_timestamp,
            webhooks: counter_vec(
                &prom,
                "genai_exporter_webhook_requests_total",
                "Provider callbacks received, by outcome.",
                &["provider", "outcome"],
            ),
            discovery_errors: counter_vec(
                &prom,
                "genai_exporter_discovery_errors_total",
                "Failures of a discovery source (unreadable task file, failed history page).",
                &["provider", "source"],
            ),
            store_errors: counter_vec(
                &prom,
                "genai_exporter_store_errors_total",
                "Failed state store operations; the batch is retried.",
                &["operation"],
            ),
            shard_info: int_gauge_vec(
                &prom,
                "genai_exporter_shard_info",
                "This replica's shard; constant 1.",
                &["index", "count"],
            ),
            active: RwLock::new(HashSet::new()),
            pauses: Mutex::new(HashMap::new()),
            registry,
            prom,
        }
    }

    /// Sets the configured providers and initializes their always-present series.
    pub fn set_providers(&self, names: &[String]) {
        for name in names {
            self.provider_up.with_label_values(&[name]);
            self.upstream_backoff.with_label_values(&[name]);
            self.last_poll_success.with_label_values(&[name]);
        }
        *self.active.write().expect("metrics lock") = names.iter().cloned().collect();
    }

    pub fn set_shard(&self, index: u32, count: u32) {
        self.shard_info.reset();
        self.shard_info
            .with_label_values(&[&index.to_string(), &count.to_string()])
            .set(1);
    }

    /// Restores counter totals saved in the store.
    pub fn restore(&self, rows: &[(String, Vec<u8>)]) {
        for (key, value) in rows {
            if self.accounting.restore_row(key, value) {
                continue;
            }
            let parts: Vec<&str> = key.split(KEY_SEP).collect();
            let Ok(bytes) = <[u8; 8]>::try_from(value.as_slice()) else {
                continue;
            };
            let n = u64::from_le_bytes(bytes);
            match (parts[0], parts.len()) {
                (UPSTREAM_REQUESTS_KEY_PREFIX, 4) => self
                    .upstream_requests
                    .with_label_values(&parts[1..])
                    .inc_by(n),
                (UPSTREAM_ERRORS_KEY_PREFIX, 4) => self
                    .upstream_errors
                    .with_label_values(&parts[1..])
                    .inc_by(n),
                _ => {}
            }
        }
    }

    /// Store rows of the upstream counters (saved with every commit).
    pub fn upstream_rows(&self) -> Vec<(String, Vec<u8>)> {
        let mut rows = Vec::new();
        for (prefix, vec) in [
            (UPSTREAM_REQUESTS_KEY_PREFIX, &self.upstream_requests),
            (UPSTREAM_ERRORS_KEY_PREFIX, &self.upstream_errors),
        ] {
            for family in vec.collect() {
                for m in family.get_metric() {
                    let values: Vec<&str> = m.get_label().iter().map(|l| l.value()).collect();
                    let n = m.get_counter().get_value() as u64;
                    rows.push((join_key(prefix, &values), n.to_le_bytes().to_vec()));
                }
            }
        }
        rows
    }

    /// Records that `provider` is paused until `until`.
    pub fn set_pause(&self, provider: &str, until: Instant) {
        self.pauses
            .lock()
            .expect("metrics lock")
            .insert(provider.to_string(), until);
    }

    /// Renders the `/metrics` page (text format 0.0.4).
    pub fn render(&self) -> String {
        let active = self.active.read().expect("metrics lock").clone();
        let now = Instant::now();
        for (provider, until) in self.pauses.lock().expect("metrics lock").iter() {
            let left = until.saturating_duration_since(now).as_secs_f64();
            self.upstream_backoff
                .with_label_values(&[provider])
                .set(left);
        }
        let mut families = self.prom.gather();
        families.extend(self.accounting.families(&active));
        families.extend(self.task_gauges(&active));
        // Drop series of providers that are no longer configured, and empty families.
        for family in &mut families {
            let metrics = family.take_metric();
            let kept: Vec<proto::Metric> = metrics
                .into_iter()
                .filter(|m| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == "provider")
                        // An empty provider counts requests naming no configured one.
                        .is_none_or(|l| l.value().is_empty() || active.contains(l.value()))
                })
                .collect();
            family.set_metric(kept);
        }
        families.retain(|f| !f.get_metric().is_empty());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&families, &mut out)
            .expect("text encoding of valid families");
        String::from_utf8(out).expect("text format is UTF-8")
    }

    fn task_gauges(&self, active: &HashSet<String>) -> Vec<MetricFamily> {
        let now = now_millis();
        let mut tasks = Vec::new();
        let mut oldest = Vec::new();
        for provider in self.registry.providers() {
            if !active.contains(provider.name()) {
                continue;
            }
            let g = provider.gauges();
            let name = provider.name();
            for (model, status, n) in &g.tasks {
                tasks.push(gauge_metric(
                    vec![
                        label("provider", name),
                        label("model", model),
                        label("status", status.as_str()),
                    ],
                    *n as f64,
                ));
            }
            let age = g
                .oldest_in_flight_ms
                .map_or(0.0, |created| ((now - created).max(0)) as f64 / 1000.0);
            oldest.push(gauge_metric(vec![label("provider", name)], age));
        }
        vec![
            family_of(
                "genai_tasks",
                "Tasks tracked now, by status (finished ones until their retention ends).",
                MetricType::GAUGE,
                tasks,
            ),
            family_of(
                "genai_task_oldest_in_flight_seconds",
                "Age of the oldest pending or running task, 0 when none.",
                MetricType::GAUGE,
                oldest,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{FailureReason, Status};

    #[test]
    fn histogram_encoding_round_trips_and_rejects_other_buckets() {
        let bounds = [1.0, 5.0];
        let mut h = HistogramState::new(2);
        h.observe(&bounds, 0.5);
        h.observe(&bounds, 3.0);
        h.observe(&bounds, 99.0);
        assert_eq!(h.counts, vec![1, 1, 1]);
        let bytes = h.encode(&bounds);
        assert_eq!(HistogramState::decode(&bytes, &bounds), Some(h));
        assert_eq!(HistogramState::decode(&bytes, &[1.0, 6.0]), None);
        assert_eq!(HistogramState::decode(&bytes[..10], &bounds), None);
    }

    #[test]
    fn staged_values_are_invisible_until_published_and_restore_exactly() {
        let acc = Accounting::new(vec![1.0, 10.0]);
        let events = vec![
            Event::Completed {
                model: Arc::from("m"),
                status: Status::Failed,
                reason: Some(FailureReason::Other),
                latency_seconds: Some(2.0),
            },
            Event::CreditsUsed {
                model: Arc::from("m"),
                amount: 1.5,
            },
        ];
        let mut staged = Staged::default();
        acc.stage(&mut staged, "p", &events);
        assert_eq!(acc.value(Family::Completions, "p", &["m", "failed"]), 0.0);
        let rows = acc.encode(&staged);
        acc.publish(staged);
        assert_eq!(acc.value(Family::Completions, "p", &["m", "failed"]), 1.0);
        assert_eq!(acc.value(Family::Failures, "p", &["m", "other"]), 1.0);
        assert_eq!(acc.value(Family::CreditsUsed, "p", &["m"]), 1.5);

        let restored = Accounting::new(vec![1.0, 10.0]);
        for (k, v) in &rows {
            assert!(restored.restore_row(k, v));
        }
        assert_eq!(restored.value(Family::CreditsUsed, "p", &["m"]), 1.5);
        assert_eq!(
            restored.state.lock().unwrap().latency,
            acc.state.lock().unwrap().latency
        );
    }
}
