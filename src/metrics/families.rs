//! Every metric family the exporter serves, in one table: name, help, labels, kind, and
//! where its values live. Adding a durable counter is one row here plus the recording call
//! that moves it (`Metrics::count` or `Metrics::observe`); staging, the store codec,
//! restore and rendering all follow the row.

/// Upstream and proxied request latency buckets (seconds).
const REQUEST_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Completion → detection buckets (seconds): a webhook or proxy sees an outcome within a
/// fraction of a second, a backed-off poll of a long video task within minutes.
const DETECTION_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// What a family is, and for histograms where its bucket bounds come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Counter,
    Gauge,
    Histogram(Buckets),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Buckets {
    /// `metrics.latency_buckets` of the configuration.
    Configured,
    Fixed(&'static [f64]),
}

/// Where a family's values live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Storage {
    /// Committed to the store before it is shown, restored at start-up: never goes down
    /// across restarts. `row` prefixes the family's store rows (stable: changing it loses
    /// the saved totals). The first label is always `provider`.
    Durable { row: &'static str },
    /// A `prometheus` crate metric set where things happen (its labels render sorted).
    Live,
    /// Read from the registry at scrape time.
    Scraped,
}

/// One row of the table.
#[derive(Debug)]
pub(crate) struct FamilyDef {
    pub(crate) name: &'static str,
    pub(crate) help: &'static str,
    pub(crate) kind: Kind,
    pub(crate) storage: Storage,
    /// Label names, in the order they are rendered.
    pub(crate) labels: &'static [&'static str],
}

macro_rules! families {
    ($($family:ident => $def:expr,)*) => {
        /// A metric family; [`Family::def`] is its row of the table.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub(crate) enum Family { $($family),* }

        impl Family {
            pub(crate) const ALL: &[Family] = &[$(Family::$family),*];

            pub(crate) fn def(self) -> &'static FamilyDef {
                match self { $(Family::$family => const { &$def }),* }
            }
        }
    };
}

use Kind::{Counter, Gauge, Histogram};
use Storage::{Live, Scraped};

const fn durable(row: &'static str) -> Storage {
    Storage::Durable { row }
}

families! {
    // Task accounting (registry events, each task once).
    Completions => FamilyDef {
        name: "genai_task_completions_total",
        help: "Tasks seen reaching a terminal status, each task once.",
        kind: Counter, storage: durable("completions"),
        labels: &["provider", "model", "status"],
    },
    Failures => FamilyDef {
        name: "genai_task_failures_total",
        help: "Failed, timed-out and cancelled tasks by normalized reason.",
        kind: Counter, storage: durable("failures"),
        labels: &["provider", "model", "reason"],
    },
    CreditsUsed => FamilyDef {
        name: "genai_task_credits_used_total",
        help: "Credits charged for tasks, each credit once.",
        kind: Counter, storage: durable("credits_used"),
        labels: &["provider", "model"],
    },
    CreditsRefunded => FamilyDef {
        name: "genai_task_credits_refunded_total",
        help: "Credits refunded for tasks, each credit once.",
        kind: Counter, storage: durable("credits_refunded"),
        labels: &["provider", "model"],
    },
    Discovered => FamilyDef {
        name: "genai_task_discovered_total",
        help: "New task ids by discovery source.",
        kind: Counter, storage: durable("discovered"),
        labels: &["provider", "source"],
    },
    Dropped => FamilyDef {
        name: "genai_task_dropped_total",
        help: "Tasks given up, by reason.",
        kind: Counter, storage: durable("dropped"),
        labels: &["provider", "reason"],
    },
    TaskLatency => FamilyDef {
        name: "genai_task_completion_latency_seconds",
        help: "Time from created_at to completion (completed_at, else updated_at) of finished tasks, each once.",
        kind: Histogram(Buckets::Configured), storage: durable("latency"),
        labels: &["provider", "model", "status"],
    },
    DetectionDelay => FamilyDef {
        name: "genai_task_detection_delay_seconds",
        help: "Time from a task's completion to the moment the exporter learned its outcome, by how it learned it.",
        kind: Histogram(Buckets::Fixed(DETECTION_BUCKETS)), storage: durable("detection_delay"),
        labels: &["provider", "via"],
    },
    // Upstream exchanges and other counts gathered between flushes.
    UpstreamRequests => FamilyDef {
        name: "genai_upstream_requests_total",
        help: "Upstream requests by endpoint and HTTP status code (or timeout, connect_error, io_error).",
        kind: Counter, storage: durable("upstream_requests"),
        labels: &["provider", "endpoint", "code"],
    },
    UpstreamDuration => FamilyDef {
        name: "genai_upstream_request_duration_seconds",
        help: "Upstream request latency, until the whole body was read.",
        kind: Histogram(Buckets::Fixed(REQUEST_BUCKETS)), storage: durable("upstream_duration"),
        labels: &["provider", "endpoint"],
    },
    UpstreamErrors => FamilyDef {
        name: "genai_upstream_errors_total",
        help: "API-level errors in upstream answers (envelope error codes, invalid_response).",
        kind: Counter, storage: durable("upstream_errors"),
        labels: &["provider", "endpoint", "error"],
    },
    ImplausibleValues => FamilyDef {
        name: "genai_upstream_implausible_values_total",
        help: "Answer values no real task can have (created_at in the future or over a year old, credits not a number, negative or above 1e9), by field; refused, counted once per task and field.",
        kind: Counter, storage: durable("implausible_values"),
        labels: &["provider", "field"],
    },
    WebhookRequests => FamilyDef {
        name: "genai_exporter_webhook_requests_total",
        help: "Provider callbacks received, by outcome.",
        kind: Counter, storage: durable("webhook_requests"),
        labels: &["provider", "outcome"],
    },
    DiscoveryErrors => FamilyDef {
        name: "genai_exporter_discovery_errors_total",
        help: "Failures of a discovery source (unreadable task file, failed history page).",
        kind: Counter, storage: durable("discovery_errors"),
        labels: &["provider", "source"],
    },
    HistoryTruncated => FamilyDef {
        name: "genai_exporter_history_truncated_total",
        help: "History walks stopped by max_pages while pages still held new, changed or in-flight tasks: discovery may be missing tasks.",
        kind: Counter, storage: durable("history_truncated"),
        labels: &["provider", "kind"],
    },
    ProxyRequests => FamilyDef {
        name: "genai_proxy_requests_total",
        help: "Requests the application sent through the proxy, by endpoint and upstream answer.",
        kind: Counter, storage: durable("proxy_requests"),
        labels: &["provider", "endpoint", "code"],
    },
    ProxyDuration => FamilyDef {
        name: "genai_proxy_request_duration_seconds",
        help: "Upstream latency of proxied requests.",
        kind: Histogram(Buckets::Fixed(REQUEST_BUCKETS)), storage: durable("proxy_duration"),
        labels: &["provider", "endpoint"],
    },
    ProxySubmitRejections => FamilyDef {
        name: "genai_proxy_submit_rejections_total",
        help: "Task submissions the proxy refused to forward, by reason.",
        kind: Counter, storage: durable("proxy_submit_rejections"),
        labels: &["provider", "reason"],
    },
    ProxyForwarded => FamilyDef {
        name: "genai_proxy_forwarded_total",
        help: "Task ids seen through the proxy and sent to the replicas that track them, per receiving replica, by outcome.",
        kind: Counter, storage: durable("proxy_forwarded"),
        labels: &["provider", "outcome"],
    },
    // Gauges read from the registry at scrape time.
    Tasks => FamilyDef {
        name: "genai_tasks",
        help: "Tasks tracked now, by status (finished ones until their retention ends).",
        kind: Gauge, storage: Scraped,
        labels: &["provider", "model", "status"],
    },
    OldestInFlight => FamilyDef {
        name: "genai_task_oldest_in_flight_seconds",
        help: "Age of the oldest pending or running task, 0 when none.",
        kind: Gauge, storage: Scraped,
        labels: &["provider"],
    },
    // Live metrics, set where things happen.
    UpstreamBackoff => FamilyDef {
        name: "genai_upstream_backoff_seconds",
        help: "Seconds left in a rate-limit pause (Retry-After or back-off), 0 when none.",
        kind: Gauge, storage: Live,
        labels: &["provider"],
    },
    AccountCredits => FamilyDef {
        name: "genai_account_credits",
        help: "Account balance reported by the provider.",
        kind: Gauge, storage: Live,
        labels: &["provider", "kind"],
    },
    ProviderUp => FamilyDef {
        name: "genai_exporter_provider_up",
        help: "1 when the provider's last requests got valid answers, 0 on auth errors, 5xx or transport failures.",
        kind: Gauge, storage: Live,
        labels: &["provider"],
    },
    LastPollSuccess => FamilyDef {
        name: "genai_exporter_last_poll_success_timestamp_seconds",
        help: "Time of the last successful upstream answer.",
        kind: Gauge, storage: Live,
        labels: &["provider"],
    },
    BuildInfo => FamilyDef {
        name: "genai_exporter_build_info",
        help: "Build information; constant 1.",
        kind: Gauge, storage: Live,
        labels: &["version", "revision"],
    },
    ReloadSuccessful => FamilyDef {
        name: "genai_exporter_config_last_reload_successful",
        help: "Whether the last configuration reload succeeded (1) or failed (0).",
        kind: Gauge, storage: Live,
        labels: &[],
    },
    ReloadSuccessTimestamp => FamilyDef {
        name: "genai_exporter_config_last_reload_success_timestamp_seconds",
        help: "Time of the last successful configuration load.",
        kind: Gauge, storage: Live,
        labels: &[],
    },
    StoreUp => FamilyDef {
        name: "genai_exporter_store_up",
        help: "1 while the embedded store commits, 0 while it cannot (disk full, I/O error); pending work is kept and committed when it recovers.",
        kind: Gauge, storage: Live,
        labels: &[],
    },
    StoreErrors => FamilyDef {
        name: "genai_exporter_store_errors_total",
        help: "Failed state store operations; the batch is retried.",
        kind: Counter, storage: Live,
        labels: &["operation"],
    },
    TaskPanics => FamilyDef {
        name: "genai_exporter_task_panics_total",
        help: "Panics caught in background tasks, by task.",
        kind: Counter, storage: Live,
        labels: &["task"],
    },
    ShardInfo => FamilyDef {
        name: "genai_exporter_shard_info",
        help: "This replica's shard; constant 1.",
        kind: Gauge, storage: Live,
        labels: &["index", "count"],
    },
    // The HTTP listener (see `crate::web`), set by its accept loop and connections.
    HttpConnections => FamilyDef {
        name: "genai_exporter_http_connections",
        help: "Open connections on the HTTP listener.",
        kind: Gauge, storage: Live,
        labels: &[],
    },
    HttpConnectionsLimit => FamilyDef {
        name: "genai_exporter_http_connections_limit",
        help: "Connection cap of the HTTP listener (from the open file limit, minus a reserve).",
        kind: Gauge, storage: Live,
        labels: &[],
    },
    HttpConnectionsRejected => FamilyDef {
        name: "genai_exporter_http_connections_rejected_total",
        help: "Connections the listener closed or could not accept, by reason.",
        kind: Counter, storage: Live,
        labels: &["reason"],
    },
}

impl Family {
    /// The store row prefix of a durable family.
    pub(crate) fn row_prefix(self) -> Option<&'static str> {
        match self.def().storage {
            Storage::Durable { row } => Some(row),
            _ => None,
        }
    }

    /// A durable family's labels after `provider` (the part a series key stores).
    pub(crate) fn labels_after_provider(self) -> &'static [&'static str] {
        &self.def().labels[1..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn the_table_is_consistent() {
        let mut names = HashSet::new();
        let mut rows = HashSet::new();
        for family in Family::ALL {
            let def = family.def();
            assert!(names.insert(def.name), "{} twice", def.name);
            match def.kind {
                Kind::Counter => assert!(def.name.ends_with("_total"), "{}", def.name),
                Kind::Histogram(_) => assert!(def.name.ends_with("_seconds"), "{}", def.name),
                Kind::Gauge => assert!(!def.name.ends_with("_total"), "{}", def.name),
            }
            if let Storage::Durable { row } = def.storage {
                assert!(rows.insert(row), "row prefix {row} twice");
                assert_eq!(def.labels.first(), Some(&"provider"), "{}", def.name);
                assert_ne!(def.kind, Kind::Gauge, "a durable gauge: {}", def.name);
            }
            if let Kind::Histogram(Buckets::Fixed(bounds)) = def.kind {
                assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{}", def.name);
            }
        }
    }
}
