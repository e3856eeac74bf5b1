//! Metric families and the `/metrics` page.
//!
//! - `families`: every family in one table (name, help, labels, kind, where it lives).
//! - `accounting`: the durable totals (task counters, latency and request histograms)
//!   and their store rows; staged, committed by the persister, then published.
//! - `collect`: gauges read from the registry at scrape time.
//! - `render`: gather + encode.
//!
//! [`Metrics`] is what the rest of the exporter records into. Durable counts recorded
//! between flushes wait in [`PendingCounts`] until the persister stages and commits them;
//! live gauges are ordinary `prometheus` crate metrics. Series of providers no longer
//! configured are left off the page.

mod accounting;
mod collect;
mod families;
mod render;

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, RwLock};
use std::time::Instant;

use prometheus::{Gauge, GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts};
use prometheus::{Registry as PromRegistry, core::Collector};

pub use accounting::Accounting;
pub use accounting::PendingCounts;
pub use accounting::Staged;
pub(crate) use accounting::{HistogramState, SeriesKey};
pub(crate) use families::Family;
pub use render::RenderError;

use crate::background::{lock, read, write};
use crate::registry::Registry;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Git revision baked in by the build (`GENAI_EXPORTER_REVISION`), else `unknown`.
pub(crate) const REVISION: &str = match option_env!("GENAI_EXPORTER_REVISION") {
    Some(r) => r,
    None => "unknown",
};

/// Every metric the exporter serves.
pub struct Metrics {
    prom: PromRegistry,
    pub accounting: Accounting,
    /// Counts since the last flush; the persister stages them into `accounting`.
    pending_counts: Mutex<PendingCounts>,
    pub(crate) upstream_backoff: GaugeVec,
    pub(crate) account_credits: GaugeVec,
    pub(crate) provider_up: IntGaugeVec,
    pub(crate) last_poll_success: GaugeVec,
    pub(crate) reload_successful: IntGauge,
    pub(crate) reload_success_timestamp: Gauge,
    pub(crate) store_up: IntGauge,
    pub(crate) store_errors: IntCounterVec,
    pub(crate) task_panics: IntCounterVec,
    pub(crate) shard_info: IntGaugeVec,
    pub(crate) listener: ListenerMetrics,
    /// Providers currently configured; series of others are left off the page.
    active: RwLock<HashSet<String>>,
    /// End of each provider's current rate-limit pause (`genai_upstream_backoff_seconds`
    /// is computed from it at scrape time, so it counts down between scrapes).
    pauses: Mutex<HashMap<String, Instant>>,
    /// Test-only fault injection for the `/metrics` error path (see [`RenderFault`]).
    #[cfg(test)]
    render_fault: Mutex<Option<RenderFault>>,
}

/// A failure `render` can be made to show in tests. No real input makes rendering fail
/// (every family is built well-formed and writing to memory cannot fail), so the 500 path
/// of `/metrics` is exercised by injection. Compiled into test builds only.
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
pub(crate) enum RenderFault {
    /// Hand the encoder a family with no name: it refuses it.
    MalformedFamily,
    /// Panic while rendering.
    Panic,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Registers a live family of the table.
fn live<T: Collector + Clone + 'static>(
    prom: &PromRegistry,
    family: Family,
    make: impl FnOnce(Opts, &[&str]) -> prometheus::Result<T>,
) -> T {
    let def = family.def();
    debug_assert_eq!(def.storage, families::Storage::Live, "{}", def.name);
    let metric = make(Opts::new(def.name, def.help), def.labels).expect("valid metric");
    prom.register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

/// The HTTP listener's families, handed to `crate::web::serve`, which sets them (the
/// `reason` values of `rejected` are the listener's to name).
#[derive(Clone)]
pub(crate) struct ListenerMetrics {
    pub(crate) open: IntGauge,
    pub(crate) limit: IntGauge,
    pub(crate) rejected: IntCounterVec,
}

/// The `operation` values of `genai_exporter_store_errors_total`.
pub(crate) const STORE_OPERATIONS: [&str; 4] = ["commit", "reopen", "replaced", "expire"];

impl Metrics {
    pub fn new(latency_buckets: Vec<f64>) -> Self {
        let prom = PromRegistry::new();
        #[cfg(target_os = "linux")]
        prom.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("process collector");

        let build_info: IntGaugeVec = live(&prom, Family::BuildInfo, IntGaugeVec::new);
        build_info.with_label_values(&[VERSION, REVISION]).set(1);
        let gauge = |family| live(&prom, family, |opts, _| IntGauge::with_opts(opts));
        // Every store operation's series exists from the start, at 0, so `increase()` and
        // the dashboard's error panel read 0 rather than no data on a healthy store.
        let store_errors: IntCounterVec = live(&prom, Family::StoreErrors, IntCounterVec::new);
        for operation in STORE_OPERATIONS {
            store_errors.with_label_values(&[operation]);
        }

        Metrics {
            accounting: Accounting::new(latency_buckets),
            pending_counts: Mutex::new(PendingCounts::default()),
            upstream_backoff: live(&prom, Family::UpstreamBackoff, GaugeVec::new),
            account_credits: live(&prom, Family::AccountCredits, GaugeVec::new),
            provider_up: live(&prom, Family::ProviderUp, IntGaugeVec::new),
            last_poll_success: live(&prom, Family::LastPollSuccess, GaugeVec::new),
            reload_successful: gauge(Family::ReloadSuccessful),
            reload_success_timestamp: live(&prom, Family::ReloadSuccessTimestamp, |opts, _| {
                Gauge::with_opts(opts)
            }),
            store_up: gauge(Family::StoreUp),
            store_errors,
            task_panics: live(&prom, Family::TaskPanics, IntCounterVec::new),
            shard_info: live(&prom, Family::ShardInfo, IntGaugeVec::new),
            listener: ListenerMetrics {
                open: gauge(Family::HttpConnections),
                limit: gauge(Family::HttpConnectionsLimit),
                rejected: live(&prom, Family::HttpConnectionsRejected, IntCounterVec::new),
            },
            active: RwLock::new(HashSet::new()),
            pauses: Mutex::new(HashMap::new()),
            #[cfg(test)]
            render_fault: Mutex::new(None),
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
        *write(&self.active) = names.iter().cloned().collect();
    }

    pub(crate) fn set_shard(&self, index: u32, count: u32) {
        self.shard_info.reset();
        self.shard_info
            .with_label_values(&[&index.to_string(), &count.to_string()])
            .set(1);
    }

    /// Restores counter totals saved in the store. The store is open and readable now, so
    /// `genai_exporter_store_up` starts at 1.
    pub(crate) fn restore(&self, rows: &[(String, Vec<u8>)]) {
        for (key, value) in rows {
            self.accounting.restore_row(key, value);
        }
        self.set_store_up(true);
    }

    /// Whether the store commits (1) or cannot (0).
    pub(crate) fn set_store_up(&self, up: bool) {
        self.store_up.set(i64::from(up));
    }

    /// Counts one upstream exchange: its `code` and how long it took.
    pub fn record_request(&self, provider: &str, endpoint: &str, code: &str, seconds: f64) {
        self.count(Family::UpstreamRequests, provider, &[endpoint, code]);
        self.observe(Family::UpstreamDuration, provider, &[endpoint], seconds);
    }

    /// Counts one API-level error in an upstream answer.
    pub fn record_api_error(&self, provider: &str, endpoint: &str, error: &str) {
        self.count(Family::UpstreamErrors, provider, &[endpoint, error]);
    }

    /// Counts one provider callback by outcome. `provider` is empty when the path named no
    /// configured provider (the path is attacker-controlled: never a label value).
    pub(crate) fn count_webhook(&self, provider: &str, outcome: &str) {
        self.count(Family::WebhookRequests, provider, &[outcome]);
    }

    /// Counts one failure of a discovery source.
    pub(crate) fn count_discovery_error(&self, provider: &str, source: &str) {
        self.count(Family::DiscoveryErrors, provider, &[source]);
    }

    /// Counts one history walk of `kind` cut short by `max_pages`.
    pub fn count_history_truncated(&self, provider: &str, kind: &str) {
        self.count(Family::HistoryTruncated, provider, &[kind]);
    }

    /// Records how long after a task's completion the exporter learned of it, and `via`
    /// what: `poll`, `history`, `webhook` or `proxy`.
    pub(crate) fn observe_detection_delay(&self, provider: &str, via: &str, seconds: f64) {
        self.observe(Family::DetectionDelay, provider, &[via], seconds);
    }

    /// Records the detection delay of `obs`, an answer that just counted a task's outcome:
    /// from its completion timestamp (`completed_at`, else `updated_at`) to `now` (Unix ms).
    /// Nothing when the provider gave no timestamp; a clock ahead of ours counts as 0.
    pub(crate) fn record_detection(
        &self,
        provider: &str,
        via: &str,
        obs: &crate::task::Observation,
        now: i64,
    ) {
        if let Some(done) = obs.completed_at.or(obs.updated_at) {
            let seconds = (now - done).max(0) as f64 / 1000.0;
            self.observe_detection_delay(provider, via, seconds);
        }
    }

    /// Counts one request the application sent through the proxy: the upstream's `code`
    /// and how long the upstream took.
    pub(crate) fn record_proxy_request(
        &self,
        provider: &str,
        endpoint: &str,
        code: &str,
        seconds: f64,
    ) {
        self.count(Family::ProxyRequests, provider, &[endpoint, code]);
        self.observe(Family::ProxyDuration, provider, &[endpoint], seconds);
    }

    /// Counts one task submission the proxy refused to forward, by `reason`.
    pub(crate) fn count_proxy_rejection(&self, provider: &str, reason: &str) {
        self.count(Family::ProxySubmitRejections, provider, &[reason]);
    }

    /// The model names of `provider`'s saved counters, most completions first.
    pub(crate) fn counted_models(&self, provider: &str) -> Vec<String> {
        self.accounting.counted_models(provider)
    }

    /// Counts `ids` task ids handed to a peer replica (`outcome`: delivered, rejected,
    /// failed, dropped; see `crate::forward`).
    pub(crate) fn count_forwarded(&self, provider: &str, outcome: &str, ids: usize) {
        *lock(&self.pending_counts)
            .counters
            .entry(SeriesKey::new(Family::ProxyForwarded, provider, &[outcome]))
            .or_insert(0.0) += ids as f64;
    }

    /// Counts one panic caught in the background task named `task` (not durable).
    pub(crate) fn count_task_panic(&self, task: &str) {
        self.task_panics.with_label_values(&[task]).inc();
    }

    /// Adds one to a durable counter series (committed at the next flush).
    fn count(&self, family: Family, provider: &str, labels: &[&str]) {
        *lock(&self.pending_counts)
            .counters
            .entry(SeriesKey::new(family, provider, labels))
            .or_insert(0.0) += 1.0;
    }

    /// Observes `value` in a durable histogram series (committed at the next flush).
    fn observe(&self, family: Family, provider: &str, labels: &[&str], value: f64) {
        let bounds = self.accounting.buckets(family);
        lock(&self.pending_counts)
            .histograms
            .entry(SeriesKey::new(family, provider, labels))
            .or_insert_with(|| HistogramState::new(bounds.len()))
            .observe(bounds, value);
    }

    /// Takes the counts gathered since the last call.
    pub fn take_pending_counts(&self) -> PendingCounts {
        std::mem::take(&mut *lock(&self.pending_counts))
    }

    /// Records that `provider` is paused until `until`.
    pub fn set_pause(&self, provider: &str, until: Instant) {
        lock(&self.pauses).insert(provider.to_string(), until);
    }

    /// Renders the `/metrics` page (text format 0.0.4), reading the task gauges from
    /// `registry` now.
    pub fn render(&self, registry: &Registry) -> Result<String, RenderError> {
        let active = read(&self.active).clone();
        let now = Instant::now();
        for (provider, until) in lock(&self.pauses).iter() {
            let left = until.saturating_duration_since(now).as_secs_f64();
            self.upstream_backoff
                .with_label_values(&[provider])
                .set(left);
        }
        let mut families = self.prom.gather();
        families.extend(self.accounting.families(&active));
        families.extend(collect::task_gauges(registry, &active));
        #[cfg(test)]
        self.inject_fault(&mut families);
        render::encode(families, &active)
    }

    /// Makes every later `render` fail with `fault` (tests of the `/metrics` error path).
    #[cfg(test)]
    pub(crate) fn fail_renders_with(&self, fault: RenderFault) {
        *lock(&self.render_fault) = Some(fault);
    }

    #[cfg(test)]
    fn inject_fault(&self, families: &mut Vec<prometheus::proto::MetricFamily>) {
        let fault = *lock(&self.render_fault);
        match fault {
            None => {}
            Some(RenderFault::Panic) => panic!("injected render fault"),
            Some(RenderFault::MalformedFamily) => families.push(render::family_of(
                "",
                "A family with no name: the encoder refuses it.",
                prometheus::proto::MetricType::GAUGE,
                vec![render::gauge_metric(Vec::new(), 1.0)],
            )),
        }
    }
}

#[cfg(test)]
mod tests;
