//! Metric families and the `/metrics` page.
//!
//! Three kinds of state end up on the page:
//! - [`Accounting`]: every counter that must survive restarts, and never go down across
//!   them: the task counters, the completion-latency histogram, and the upstream request,
//!   error and duration families. Changes are staged, committed to the store by the
//!   persister together with the task state that caused them, and only then published: the
//!   page shows nothing that a crash could take back. Task counts arrive as registry
//!   events; upstream counts are gathered in [`PendingCounts`] between flushes.
//! - gauges and exporter metrics: ordinary `prometheus` crate metrics set where things
//!   happen (upstream client, webhooks, reload) and the process collector.
//! - scrape-time gauges read from the registry's per-status counts (O(models), not O(tasks)).
//!
//! Series of providers no longer configured are left off the page.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    Encoder, Gauge, GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry as PromRegistry,
    TextEncoder,
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
// Accounting: counters that survive restarts
// ---------------------------------------------------------------------------------------

/// The durable counter families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    Completions,
    Failures,
    CreditsUsed,
    CreditsRefunded,
    Discovered,
    Dropped,
    UpstreamRequests,
    UpstreamErrors,
    WebhookRequests,
    DiscoveryErrors,
}

impl Family {
    const ALL: [Family; 10] = [
        Family::Completions,
        Family::Failures,
        Family::CreditsUsed,
        Family::CreditsRefunded,
        Family::Discovered,
        Family::Dropped,
        Family::UpstreamRequests,
        Family::UpstreamErrors,
        Family::WebhookRequests,
        Family::DiscoveryErrors,
    ];

    fn name(self) -> &'static str {
        match self {
            Family::Completions => "genai_task_completions_total",
            Family::Failures => "genai_task_failures_total",
            Family::CreditsUsed => "genai_task_credits_used_total",
            Family::CreditsRefunded => "genai_task_credits_refunded_total",
            Family::Discovered => "genai_task_discovered_total",
            Family::Dropped => "genai_task_dropped_total",
            Family::UpstreamRequests => "genai_upstream_requests_total",
            Family::UpstreamErrors => "genai_upstream_errors_total",
            Family::WebhookRequests => "genai_exporter_webhook_requests_total",
            Family::DiscoveryErrors => "genai_exporter_discovery_errors_total",
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
            Family::UpstreamRequests => {
                "Upstream requests by endpoint and HTTP status code (or timeout, connect_error, io_error)."
            }
            Family::UpstreamErrors => {
                "API-level errors in upstream answers (envelope error codes, invalid_response)."
            }
            Family::WebhookRequests => "Provider callbacks received, by outcome.",
            Family::DiscoveryErrors => {
                "Failures of a discovery source (unreadable task file, failed history page)."
            }
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
            Family::UpstreamRequests => &["endpoint", "code"],
            Family::UpstreamErrors => &["endpoint", "error"],
            Family::WebhookRequests => &["outcome"],
            Family::DiscoveryErrors => &["source"],
        }
    }

    /// Prefix of the family's rows in the store (stable: changing it loses saved totals).
    fn key_prefix(self) -> &'static str {
        match self {
            Family::Completions => "completions",
            Family::Failures => "failures",
            Family::CreditsUsed => "credits_used",
            Family::CreditsRefunded => "credits_refunded",
            Family::Discovered => "discovered",
            Family::Dropped => "dropped",
            Family::UpstreamRequests => "upstream_requests",
            Family::UpstreamErrors => "upstream_errors",
            Family::WebhookRequests => "webhook_requests",
            Family::DiscoveryErrors => "discovery_errors",
        }
    }
}

/// The durable histogram families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HistFamily {
    TaskLatency,
    UpstreamDuration,
}

impl HistFamily {
    const ALL: [HistFamily; 2] = [HistFamily::TaskLatency, HistFamily::UpstreamDuration];

    fn name(self) -> &'static str {
        match self {
            HistFamily::TaskLatency => "genai_task_completion_latency_seconds",
            HistFamily::UpstreamDuration => "genai_upstream_request_duration_seconds",
        }
    }

    fn help(self) -> &'static str {
        match self {
            HistFamily::TaskLatency => {
                "Time from created_at to completion (completed_at, else updated_at) of finished tasks, each once."
            }
            HistFamily::UpstreamDuration => {
                "Upstream request latency, until the whole body was read."
            }
        }
    }

    fn labels(self) -> &'static [&'static str] {
        match self {
            HistFamily::TaskLatency => &["model", "status"],
            HistFamily::UpstreamDuration => &["endpoint"],
        }
    }

    fn key_prefix(self) -> &'static str {
        match self {
            HistFamily::TaskLatency => "latency",
            HistFamily::UpstreamDuration => "upstream_duration",
        }
    }
}

/// One series: provider, then the family's other label values.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey<F> {
    pub family: F,
    pub provider: String,
    pub labels: Vec<String>,
}

impl<F> SeriesKey<F> {
    fn new(family: F, provider: &str, labels: &[&str]) -> Self {
        SeriesKey {
            family,
            provider: provider.to_string(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn store_key(&self, prefix: &str) -> String {
        let mut key = prefix.to_string();
        for part in std::iter::once(&self.provider).chain(&self.labels) {
            key.push(KEY_SEP);
            key.push_str(part);
        }
        key
    }

    fn label_pairs(&self, names: &[&str]) -> Vec<proto::LabelPair> {
        let mut labels = vec![label("provider", &self.provider)];
        for (name, value) in names.iter().zip(&self.labels) {
            labels.push(label(name, value));
        }
        labels
    }
}

const KEY_SEP: char = '\u{1f}';

/// Histogram state: non-cumulative counts per bucket (the last one is `+Inf`), sum, count.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramState {
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

    fn merge(&mut self, other: &HistogramState) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum += other.sum;
        self.count += other.count;
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

type CounterMap = BTreeMap<SeriesKey<Family>, f64>;
type HistogramMap = BTreeMap<SeriesKey<HistFamily>, HistogramState>;

/// New absolute values computed from a batch, not yet visible on `/metrics`.
#[derive(Debug, Default)]
pub struct Staged {
    counters: CounterMap,
    histograms: HistogramMap,
}

impl Staged {
    pub fn is_empty(&self) -> bool {
        self.counters.is_empty() && self.histograms.is_empty()
    }
}

/// Counts gathered between two flushes (deltas): upstream exchanges, callbacks, discovery errors.
#[derive(Debug, Default)]
pub struct PendingCounts {
    counters: HashMap<SeriesKey<Family>, f64>,
    durations: HashMap<SeriesKey<HistFamily>, HistogramState>,
}

/// The durable counters; see the module documentation.
#[derive(Debug)]
pub struct Accounting {
    counters: Mutex<CounterMap>,
    histograms: Mutex<HistogramMap>,
    latency_buckets: Vec<f64>,
}

impl Accounting {
    pub fn new(latency_buckets: Vec<f64>) -> Self {
        Accounting {
            counters: Mutex::new(BTreeMap::new()),
            histograms: Mutex::new(BTreeMap::new()),
            latency_buckets,
        }
    }

    fn buckets(&self, family: HistFamily) -> &[f64] {
        match family {
            HistFamily::TaskLatency => &self.latency_buckets,
            HistFamily::UpstreamDuration => &UPSTREAM_BUCKETS,
        }
    }

    /// Adds `amount` to a counter in `staged`, starting from its published value.
    fn stage_counter(&self, staged: &mut Staged, key: SeriesKey<Family>, amount: f64) {
        if let Some(value) = staged.counters.get_mut(&key) {
            *value += amount;
            return;
        }
        let base = self
            .counters
            .lock()
            .expect("accounting lock")
            .get(&key)
            .copied()
            .unwrap_or(0.0);
        staged.counters.insert(key, base + amount);
    }

    /// The staged histogram of `key`, starting from its published state.
    fn staged_histogram<'a>(
        &self,
        staged: &'a mut Staged,
        key: SeriesKey<HistFamily>,
    ) -> &'a mut HistogramState {
        let buckets = self.buckets(key.family).len();
        let published = || {
            self.histograms
                .lock()
                .expect("accounting lock")
                .get(&key)
                .cloned()
        };
        if !staged.histograms.contains_key(&key) {
            let base = published().unwrap_or_else(|| HistogramState::new(buckets));
            staged.histograms.insert(key.clone(), base);
        }
        staged.histograms.get_mut(&key).expect("just inserted")
    }

    /// Folds registry `events` of `provider` into `staged`.
    pub fn stage(&self, staged: &mut Staged, provider: &str, events: &[Event]) {
        for event in events {
            match event {
                Event::Discovered { source } => self.stage_counter(
                    staged,
                    SeriesKey::new(Family::Discovered, provider, &[source.as_str()]),
                    1.0,
                ),
                Event::Dropped { reason } => self.stage_counter(
                    staged,
                    SeriesKey::new(Family::Dropped, provider, &[reason.as_str()]),
                    1.0,
                ),
                Event::CreditsUsed { model, amount } => self.stage_counter(
                    staged,
                    SeriesKey::new(Family::CreditsUsed, provider, &[model]),
                    *amount,
                ),
                Event::CreditsRefunded { model, amount } => self.stage_counter(
                    staged,
                    SeriesKey::new(Family::CreditsRefunded, provider, &[model]),
                    *amount,
                ),
                Event::Completed {
                    model,
                    status,
                    reason,
                    latency_seconds,
                } => {
                    let labels = [model.as_ref(), status.as_str()];
                    self.stage_counter(
                        staged,
                        SeriesKey::new(Family::Completions, provider, &labels),
                        1.0,
                    );
                    if let Some(reason) = reason {
                        self.stage_counter(
                            staged,
                            SeriesKey::new(Family::Failures, provider, &[model, reason.as_str()]),
                            1.0,
                        );
                    }
                    if let Some(latency) = latency_seconds {
                        let key = SeriesKey::new(HistFamily::TaskLatency, provider, &labels);
                        self.staged_histogram(staged, key)
                            .observe(&self.latency_buckets, *latency);
                    }
                }
            }
        }
    }

    /// Folds counts gathered between flushes into `staged`.
    pub fn stage_counts(&self, staged: &mut Staged, pending: PendingCounts) {
        for (key, amount) in pending.counters {
            self.stage_counter(staged, key, amount);
        }
        for (key, delta) in pending.durations {
            self.staged_histogram(staged, key).merge(&delta);
        }
    }

    /// The store rows of staged values.
    pub fn encode(&self, staged: &Staged) -> Vec<(String, Vec<u8>)> {
        let counters = staged
            .counters
            .iter()
            .map(|(k, v)| (k.store_key(k.family.key_prefix()), v.to_le_bytes().to_vec()));
        let histograms = staged.histograms.iter().map(|(k, h)| {
            (
                k.store_key(k.family.key_prefix()),
                h.encode(self.buckets(k.family)),
            )
        });
        counters.chain(histograms).collect()
    }

    /// Makes staged values visible (after they were committed).
    pub fn publish(&self, staged: Staged) {
        self.counters
            .lock()
            .expect("accounting lock")
            .extend(staged.counters);
        self.histograms
            .lock()
            .expect("accounting lock")
            .extend(staged.histograms);
    }

    /// Restores one saved row (start-up). Unknown or corrupt rows are skipped.
    pub fn restore_row(&self, key: &str, value: &[u8]) {
        let mut parts = key.split(KEY_SEP);
        let prefix = parts.next().unwrap_or("");
        let Some(provider) = parts.next() else { return };
        let labels: Vec<&str> = parts.collect();
        if let Some(family) = Family::ALL.into_iter().find(|f| f.key_prefix() == prefix) {
            let (true, Ok(bytes)) = (
                labels.len() == family.labels().len(),
                <[u8; 8]>::try_from(value),
            ) else {
                return;
            };
            let value = f64::from_le_bytes(bytes);
            if value.is_finite() && value >= 0.0 {
                self.counters
                    .lock()
                    .expect("accounting lock")
                    .insert(SeriesKey::new(family, provider, &labels), value);
            }
        } else if let Some(family) = HistFamily::ALL
            .into_iter()
            .find(|f| f.key_prefix() == prefix)
        {
            if labels.len() != family.labels().len() {
                return;
            }
            match HistogramState::decode(value, self.buckets(family)) {
                Some(hist) => {
                    self.histograms
                        .lock()
                        .expect("accounting lock")
                        .insert(SeriesKey::new(family, provider, &labels), hist);
                }
                None => tracing::warn!(
                    series = key.replace(KEY_SEP, "/"),
                    "histogram buckets changed since the last run; that series starts from zero"
                ),
            }
        }
    }

    /// Current value of one counter series (tests, landing page).
    pub fn value(&self, family: Family, provider: &str, labels: &[&str]) -> f64 {
        self.counters
            .lock()
            .expect("accounting lock")
            .get(&SeriesKey::new(family, provider, labels))
            .copied()
            .unwrap_or(0.0)
    }

    fn families(&self, active: &HashSet<String>) -> Vec<MetricFamily> {
        let counters = self.counters.lock().expect("accounting lock");
        let mut families = Vec::new();
        for family in Family::ALL {
            let metrics: Vec<proto::Metric> = counters
                .iter()
                .filter(|(k, _)| {
                    k.family == family && (k.provider.is_empty() || active.contains(&k.provider))
                })
                .map(|(k, v)| counter_metric(k.label_pairs(family.labels()), *v))
                .collect();
            families.push(family_of(
                family.name(),
                family.help(),
                MetricType::COUNTER,
                metrics,
            ));
        }
        drop(counters);
        let histograms = self.histograms.lock().expect("accounting lock");
        for family in HistFamily::ALL {
            let bounds = self.buckets(family);
            let metrics = histograms
                .iter()
                .filter(|(k, _)| k.family == family && active.contains(&k.provider))
                .map(|(k, hist)| histogram_metric(k.label_pairs(family.labels()), bounds, hist))
                .collect();
            families.push(family_of(
                family.name(),
                family.help(),
                MetricType::HISTOGRAM,
                metrics,
            ));
        }
        families
    }
}

fn histogram_metric(
    labels: Vec<proto::LabelPair>,
    bounds: &[f64],
    hist: &HistogramState,
) -> proto::Metric {
    let mut m = proto::Metric::default();
    m.set_label(labels);
    let mut h = proto::Histogram::default();
    let mut cumulative = 0;
    let mut buckets = Vec::with_capacity(bounds.len());
    for (bound, count) in bounds.iter().zip(&hist.counts) {
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
    /// Counts since the last flush; the persister stages them into `accounting`.
    pending_counts: Mutex<PendingCounts>,
    pub upstream_backoff: GaugeVec,
    pub account_credits: GaugeVec,
    pub provider_up: IntGaugeVec,
    pub last_poll_success: GaugeVec,
    pub reload_successful: IntGauge,
    pub reload_success_timestamp: Gauge,
    pub store_errors: IntCounterVec,
    store_up: IntGauge,
    pub(crate) task_panics: IntCounterVec,
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
        let store_up = IntGauge::new(
            "genai_exporter_store_up",
            "1 while the embedded store commits, 0 while it cannot (disk full, I/O error).",
        )
        .expect("valid metric");
        prom.register(Box::new(store_up.clone()))
            .expect("unique metric");
        store_up.set(1);
        let reload_success_timestamp = Gauge::new(
            "genai_exporter_config_last_reload_success_timestamp_seconds",
            "Time of the last successful configuration load.",
        )
        .expect("valid metric");
        prom.register(Box::new(reload_success_timestamp.clone()))
            .expect("unique metric");

        Metrics {
            accounting: Accounting::new(latency_buckets),
            pending_counts: Mutex::new(PendingCounts::default()),
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
            store_up,
            store_errors: counter_vec(
                &prom,
                "genai_exporter_store_errors_total",
                "Failed state store operations; the batch is retried.",
                &["operation"],
            ),
            task_panics: counter_vec(
                &prom,
                "genai_exporter_task_panics_total",
                "Panics caught in background tasks; each task is restarted after a back-off.",
                &["task"],
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

    /// Whether the embedded store commits (`genai_exporter_store_up`).
    pub fn set_store_up(&self, up: bool) {
        self.store_up.set(i64::from(up));
    }

    /// Restores counter totals saved in the store.
    pub fn restore(&self, rows: &[(String, Vec<u8>)]) {
        for (key, value) in rows {
            self.accounting.restore_row(key, value);
        }
    }

    /// Counts one upstream exchange: its `code` and how long it took.
    pub fn record_request(&self, provider: &str, endpoint: &str, code: &str, seconds: f64) {
        let mut pending = self.pending_counts.lock().expect("metrics lock");
        *pending
            .counters
            .entry(SeriesKey::new(
                Family::UpstreamRequests,
                provider,
                &[endpoint, code],
            ))
            .or_insert(0.0) += 1.0;
        pending
            .durations
            .entry(SeriesKey::new(
                HistFamily::UpstreamDuration,
                provider,
                &[endpoint],
            ))
            .or_insert_with(|| HistogramState::new(UPSTREAM_BUCKETS.len()))
            .observe(&UPSTREAM_BUCKETS, seconds);
    }

    /// Counts one API-level error in an upstream answer.
    pub fn record_api_error(&self, provider: &str, endpoint: &str, error: &str) {
        let mut pending = self.pending_counts.lock().expect("metrics lock");
        *pending
            .counters
            .entry(SeriesKey::new(
                Family::UpstreamErrors,
                provider,
                &[endpoint, error],
            ))
            .or_insert(0.0) += 1.0;
    }

    /// Counts one provider callback by outcome. `provider` is empty when the path named no
    /// configured provider (the path is attacker-controlled: never a label value).
    pub fn count_webhook(&self, provider: &str, outcome: &str) {
        self.count(Family::WebhookRequests, provider, &[outcome]);
    }

    /// Counts one panic caught in the background task `task` (a fixed name, never free text).
    pub fn count_task_panic(&self, task: &str) {
        self.task_panics.with_label_values(&[task]).inc();
    }

    /// Counts one failure of a discovery source.
    pub fn count_discovery_error(&self, provider: &str, source: &str) {
        self.count(Family::DiscoveryErrors, provider, &[source]);
    }

    fn count(&self, family: Family, provider: &str, labels: &[&str]) {
        *self
            .pending_counts
            .lock()
            .expect("metrics lock")
            .counters
            .entry(SeriesKey::new(family, provider, labels))
            .or_insert(0.0) += 1.0;
    }

    /// Takes the counts gathered since the last call.
    pub fn take_pending_counts(&self) -> PendingCounts {
        std::mem::take(&mut *self.pending_counts.lock().expect("metrics lock"))
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
    fn upstream_counts_wait_for_the_commit_and_survive_it() {
        let registry = Arc::new(Registry::new(10, crate::config::Shard::default()));
        let metrics = Metrics::new(vec![1.0], registry.clone());
        metrics.set_providers(&["p".to_string()]);
        metrics.record_request("p", "task", "200", 0.02);
        metrics.record_request("p", "task", "200", 0.2);
        metrics.record_api_error("p", "task", "invalid_response");
        assert!(!metrics.render().contains("genai_upstream_requests_total{"));
        let mut staged = Staged::default();
        metrics
            .accounting
            .stage_counts(&mut staged, metrics.take_pending_counts());
        let rows = metrics.accounting.encode(&staged);
        metrics.accounting.publish(staged);
        let page = metrics.render();
        assert!(
            page.contains(
                r#"genai_upstream_requests_total{provider="p",endpoint="task",code="200"} 2"#
            ),
            "{page}"
        );
        assert!(
            page.contains(
                r#"genai_upstream_request_duration_seconds_count{provider="p",endpoint="task"} 2"#
            ),
            "{page}"
        );

        let restored = Metrics::new(vec![1.0], registry);
        restored.set_providers(&["p".to_string()]);
        restored.restore(&rows);
        assert_eq!(
            restored
                .accounting
                .value(Family::UpstreamErrors, "p", &["task", "invalid_response"]),
            1.0
        );
        let upstream_lines = |page: &str| -> Vec<String> {
            page.lines()
                .filter(|l| l.starts_with("genai_upstream_re"))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(upstream_lines(&restored.render()), upstream_lines(&page));
        assert_eq!(
            upstream_lines(&page).len(),
            16,
            "1 counter, 15 histogram lines"
        );
    }

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
            restored.restore_row(k, v);
        }
        assert_eq!(restored.value(Family::CreditsUsed, "p", &["m"]), 1.5);
        assert_eq!(
            *restored.histograms.lock().unwrap(),
            *acc.histograms.lock().unwrap()
        );
    }
}
