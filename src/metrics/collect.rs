//! Gauges read from the registry at scrape time: per-status task counts and the oldest
//! in-flight task, O(models) per provider, not O(tasks). The registry is passed in by the
//! caller of `render`; metrics hold no reference to it.

use std::collections::HashSet;

use prometheus::proto::{MetricFamily, MetricType};

use super::families::Family;
use super::render::{family_of, gauge_metric, label};
use crate::registry::Registry;
use crate::task::now_millis;

pub(crate) fn task_gauges(registry: &Registry, active: &HashSet<String>) -> Vec<MetricFamily> {
    let now = now_millis();
    let mut tasks = Vec::new();
    let mut oldest = Vec::new();
    for provider in registry.providers() {
        if !active.contains(provider.name()) {
            continue;
        }
        let g = provider.gauges();
        let name = provider.name();
        for (model, status, n) in &g.tasks {
            let labels = vec![
                label("provider", name),
                label("model", model),
                label("status", status.as_str()),
            ];
            tasks.push(gauge_metric(labels, *n as f64));
        }
        let age = g
            .oldest_in_flight_ms
            .map_or(0.0, |created| ((now - created).max(0)) as f64 / 1000.0);
        oldest.push(gauge_metric(vec![label("provider", name)], age));
    }
    let gauge = |family: Family, metrics| {
        let def = family.def();
        family_of(def.name, def.help, MetricType::GAUGE, metrics)
    };
    vec![
        gauge(Family::Tasks, tasks),
        gauge(Family::OldestInFlight, oldest),
    ]
}
