//! Durable totals: every counter and histogram that must survive restarts and never go
//! down across them. Changes are staged, committed to the store by the persister together
//! with the task state that caused them, and only then published: the page shows nothing a
//! crash could take back. Task counts arrive as registry events; other counts are gathered
//! in [`PendingCounts`] between flushes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use prometheus::proto::{self, MetricFamily, MetricType};

use super::families::{Buckets, Family, Kind};
use super::render::{counter_metric, family_of, histogram_metric, label};
use crate::background::lock;
use crate::registry::Event;

/// One series: provider, then the family's other label values.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SeriesKey {
    pub(crate) family: Family,
    pub(crate) provider: String,
    pub(crate) labels: Vec<String>,
}

/// Separates the parts of a store row key.
const KEY_SEP: char = '\u{1f}';

impl SeriesKey {
    pub(crate) fn new(family: Family, provider: &str, labels: &[&str]) -> Self {
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

    fn label_pairs(&self) -> Vec<proto::LabelPair> {
        let mut labels = vec![label("provider", &self.provider)];
        for (name, value) in self.family.labels_after_provider().iter().zip(&self.labels) {
            labels.push(label(name, value));
        }
        labels
    }
}

/// Histogram state: non-cumulative counts per bucket (the last one is `+Inf`), sum, count.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HistogramState {
    pub(crate) counts: Vec<u64>,
    pub(crate) sum: f64,
    pub(crate) count: u64,
}

impl HistogramState {
    pub(crate) fn new(buckets: usize) -> Self {
        HistogramState {
            counts: vec![0; buckets + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub(crate) fn observe(&mut self, bounds: &[f64], value: f64) {
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

type CounterMap = BTreeMap<SeriesKey, f64>;
type HistogramMap = BTreeMap<SeriesKey, HistogramState>;

/// New absolute values computed from a batch, not yet visible on `/metrics`.
#[derive(Debug, Default)]
pub struct Staged {
    counters: CounterMap,
    histograms: HistogramMap,
}

/// Counts gathered between two flushes (deltas): upstream and proxied exchanges,
/// callbacks, discovery errors, detection delays.
#[derive(Debug, Default)]
pub struct PendingCounts {
    pub(crate) counters: HashMap<SeriesKey, f64>,
    pub(crate) histograms: HashMap<SeriesKey, HistogramState>,
}

/// The durable totals; see the module documentation.
#[derive(Debug)]
pub struct Accounting {
    counters: Mutex<CounterMap>,
    histograms: Mutex<HistogramMap>,
    latency_buckets: Vec<f64>,
}

impl Accounting {
    pub(crate) fn new(latency_buckets: Vec<f64>) -> Self {
        Accounting {
            counters: Mutex::new(BTreeMap::new()),
            histograms: Mutex::new(BTreeMap::new()),
            latency_buckets,
        }
    }

    /// Bucket bounds of a histogram family (empty for other kinds).
    pub(crate) fn buckets(&self, family: Family) -> &[f64] {
        match family.def().kind {
            Kind::Histogram(Buckets::Configured) => &self.latency_buckets,
            Kind::Histogram(Buckets::Fixed(bounds)) => bounds,
            Kind::Counter | Kind::Gauge => &[],
        }
    }

    /// Adds `amount` to a counter in `staged`, starting from its published value.
    fn stage_counter(&self, staged: &mut Staged, key: SeriesKey, amount: f64) {
        if let Some(value) = staged.counters.get_mut(&key) {
            *value += amount;
            return;
        }
        let base = lock(&self.counters).get(&key).copied().unwrap_or(0.0);
        staged.counters.insert(key, base + amount);
    }

    /// The staged histogram of `key`, starting from its published state.
    fn staged_histogram<'a>(
        &self,
        staged: &'a mut Staged,
        key: SeriesKey,
    ) -> &'a mut HistogramState {
        let buckets = self.buckets(key.family).len();
        let published = || lock(&self.histograms).get(&key).cloned();
        if !staged.histograms.contains_key(&key) {
            let base = published().unwrap_or_else(|| HistogramState::new(buckets));
            staged.histograms.insert(key.clone(), base);
        }
        staged.histograms.get_mut(&key).expect("just inserted")
    }

    /// Folds registry `events` of `provider` into `staged`.
    pub fn stage(&self, staged: &mut Staged, provider: &str, events: &[Event]) {
        let one = |family, labels: &[&str]| SeriesKey::new(family, provider, labels);
        for event in events {
            match event {
                Event::Discovered { source } => {
                    self.stage_counter(staged, one(Family::Discovered, &[source.as_str()]), 1.0)
                }
                Event::Dropped { reason } => {
                    self.stage_counter(staged, one(Family::Dropped, &[reason.as_str()]), 1.0)
                }
                Event::Implausible { field } => {
                    let key = one(Family::ImplausibleValues, &[field.as_str()]);
                    self.stage_counter(staged, key, 1.0)
                }
                Event::CreditsUsed { model, amount } => {
                    self.stage_counter(staged, one(Family::CreditsUsed, &[model]), *amount)
                }
                Event::CreditsRefunded { model, amount } => {
                    self.stage_counter(staged, one(Family::CreditsRefunded, &[model]), *amount)
                }
                Event::Completed {
                    model,
                    status,
                    reason,
                    latency_seconds,
                } => {
                    let labels = [model.as_ref(), status.as_str()];
                    self.stage_counter(staged, one(Family::Completions, &labels), 1.0);
                    if let Some(reason) = reason {
                        let key = one(Family::Failures, &[model, reason.as_str()]);
                        self.stage_counter(staged, key, 1.0);
                    }
                    if let Some(latency) = latency_seconds {
                        self.staged_histogram(staged, one(Family::TaskLatency, &labels))
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
        for (key, delta) in pending.histograms {
            self.staged_histogram(staged, key).merge(&delta);
        }
    }

    /// The store rows of staged values.
    pub(crate) fn encode(&self, staged: &Staged) -> Vec<(String, Vec<u8>)> {
        let row = |k: &SeriesKey| k.store_key(k.family.row_prefix().expect("durable family"));
        let counters = staged
            .counters
            .iter()
            .map(|(k, v)| (row(k), v.to_le_bytes().to_vec()));
        let histograms = staged
            .histograms
            .iter()
            .map(|(k, h)| (row(k), h.encode(self.buckets(k.family))));
        counters.chain(histograms).collect()
    }

    /// Makes staged values visible (after they were committed).
    pub fn publish(&self, staged: Staged) {
        lock(&self.counters).extend(staged.counters);
        lock(&self.histograms).extend(staged.histograms);
    }

    /// Restores one saved row (start-up). Unknown or corrupt rows are skipped.
    pub(crate) fn restore_row(&self, key: &str, value: &[u8]) {
        let mut parts = key.split(KEY_SEP);
        let prefix = parts.next().unwrap_or("");
        let Some(provider) = parts.next() else { return };
        let labels: Vec<&str> = parts.collect();
        let Some(family) = Family::ALL
            .iter()
            .copied()
            .find(|f| f.row_prefix() == Some(prefix))
        else {
            return;
        };
        if labels.len() != family.labels_after_provider().len() {
            return;
        }
        let series = SeriesKey::new(family, provider, &labels);
        match family.def().kind {
            Kind::Counter => {
                let Ok(bytes) = <[u8; 8]>::try_from(value) else {
                    return;
                };
                let value = f64::from_le_bytes(bytes);
                if value.is_finite() && value >= 0.0 {
                    let mut counters = lock(&self.counters);
                    counters.insert(series, value);
                }
            }
            Kind::Histogram(_) => match HistogramState::decode(value, self.buckets(family)) {
                Some(hist) => {
                    let mut histograms = lock(&self.histograms);
                    histograms.insert(series, hist);
                }
                None => tracing::warn!(
                    series = key.replace(KEY_SEP, "/"),
                    "histogram buckets changed since the last run; that series starts from zero"
                ),
            },
            Kind::Gauge => {}
        }
    }

    /// Current value of one counter series.
    #[cfg(test)]
    pub(crate) fn value(&self, family: Family, provider: &str, labels: &[&str]) -> f64 {
        lock(&self.counters)
            .get(&SeriesKey::new(family, provider, labels))
            .copied()
            .unwrap_or(0.0)
    }

    /// The model names of `provider`'s counters, most completions first: start-up interns
    /// them before restoring tasks, so the `max_models_per_provider` cap survives restarts.
    pub(crate) fn counted_models(&self, provider: &str) -> Vec<String> {
        let mut completions: HashMap<&str, f64> = HashMap::new();
        let counters = lock(&self.counters);
        for (key, value) in counters.iter() {
            if key.provider == provider
                && key.family.labels_after_provider().first() == Some(&"model")
            {
                let weight = if key.family == Family::Completions {
                    *value
                } else {
                    0.0
                };
                *completions.entry(key.labels[0].as_str()).or_default() += weight;
            }
        }
        let mut models: Vec<(&str, f64)> = completions.into_iter().collect();
        models.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
        models
            .into_iter()
            .map(|(name, _)| name.to_string())
            .collect()
    }

    /// The published families, series of providers not in `active` left out (an empty
    /// provider counts callbacks naming no configured one). Families with no series yet
    /// are returned empty; rendering leaves them off the page.
    pub(crate) fn families(&self, active: &HashSet<String>) -> Vec<MetricFamily> {
        let shown = |k: &SeriesKey| k.provider.is_empty() || active.contains(&k.provider);
        let mut by_family: BTreeMap<Family, Vec<proto::Metric>> = BTreeMap::new();
        for (k, v) in lock(&self.counters).iter() {
            if shown(k) {
                let metric = counter_metric(k.label_pairs(), *v);
                by_family.entry(k.family).or_default().push(metric);
            }
        }
        for (k, hist) in lock(&self.histograms).iter() {
            if shown(k) {
                let metric = histogram_metric(k.label_pairs(), self.buckets(k.family), hist);
                by_family.entry(k.family).or_default().push(metric);
            }
        }
        by_family
            .into_iter()
            .map(|(family, metrics)| {
                let def = family.def();
                let kind = match def.kind {
                    Kind::Histogram(_) => MetricType::HISTOGRAM,
                    Kind::Counter | Kind::Gauge => MetricType::COUNTER,
                };
                family_of(def.name, def.help, kind, metrics)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

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
            restored.restore_row(k, v);
        }
        assert_eq!(restored.value(Family::CreditsUsed, "p", &["m"]), 1.5);
        assert_eq!(
            *restored.histograms.lock().unwrap(),
            *acc.histograms.lock().unwrap()
        );
    }

    #[test]
    fn store_rows_keep_their_format() {
        // Rows written by earlier versions must still restore: the key is the row prefix,
        // the provider and the label values, separated by U+001F.
        let acc = Accounting::new(vec![1.0]);
        acc.restore_row(
            "completions\u{1f}p\u{1f}m\u{1f}succeeded",
            &3.0f64.to_le_bytes(),
        );
        acc.restore_row("discovered\u{1f}p", &1.0f64.to_le_bytes()); // too few labels
        acc.restore_row("nonsense\u{1f}p\u{1f}x", &1.0f64.to_le_bytes());
        assert_eq!(
            acc.value(Family::Completions, "p", &["m", "succeeded"]),
            3.0
        );
        assert_eq!(acc.counters.lock().unwrap().len(), 1);
        let mut staged = Staged::default();
        acc.stage_counter(
            &mut staged,
            SeriesKey::new(Family::Dropped, "p", &["api"]),
            1.0,
        );
        assert_eq!(
            acc.encode(&staged),
            vec![(
                "dropped\u{1f}p\u{1f}api".to_string(),
                1.0f64.to_le_bytes().to_vec()
            )]
        );
    }
}
