//! The `/metrics` page: gather every family, leave out series of providers no longer
//! configured and families with no series, sort by name, encode as text format 0.0.4.

use std::collections::HashSet;

use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};

/// Why the page could not be rendered (answered with a 500, never with an empty 200).
#[derive(Debug)]
pub enum RenderError {
    Encode(prometheus::Error),
    NotUtf8,
}

impl std::fmt::Display for RenderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RenderError::Encode(e) => write!(f, "cannot encode metric families: {e}"),
            RenderError::NotUtf8 => f.write_str("encoded metrics are not UTF-8"),
        }
    }
}

impl std::error::Error for RenderError {}

/// Encodes `families` after dropping series whose `provider` label is not in `active`
/// (an empty provider counts callbacks naming no configured one) and empty families.
pub(crate) fn encode(
    mut families: Vec<MetricFamily>,
    active: &HashSet<String>,
) -> Result<String, RenderError> {
    for family in &mut families {
        let metrics = family.take_metric();
        let kept: Vec<proto::Metric> = metrics
            .into_iter()
            .filter(|m| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == "provider")
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
        .map_err(RenderError::Encode)?;
    String::from_utf8(out).map_err(|_| RenderError::NotUtf8)
}

pub(crate) fn label(name: &str, value: &str) -> proto::LabelPair {
    let mut l = proto::LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

pub(crate) fn counter_metric(labels: Vec<proto::LabelPair>, value: f64) -> proto::Metric {
    let mut m = proto::Metric::default();
    m.set_label(labels);
    let mut c = proto::Counter::default();
    c.set_value(value);
    m.set_counter(c);
    m
}

pub(crate) fn gauge_metric(labels: Vec<proto::LabelPair>, value: f64) -> proto::Metric {
    let mut m = proto::Metric::default();
    m.set_label(labels);
    let mut g = proto::Gauge::default();
    g.set_value(value);
    m.set_gauge(g);
    m
}

/// A histogram series from non-cumulative bucket `counts` (the last one is `+Inf`).
pub(crate) fn histogram_metric(
    labels: Vec<proto::LabelPair>,
    bounds: &[f64],
    hist: &super::accounting::HistogramState,
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

pub(crate) fn family_of(
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
