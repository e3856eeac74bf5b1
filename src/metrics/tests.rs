use super::*;
use crate::config::Shard;

fn metrics_for(provider: &str) -> (Metrics, Registry) {
    let metrics = Metrics::new(vec![1.0]);
    metrics.set_providers(&[provider.to_string()]);
    (metrics, Registry::new(10, Shard::default()))
}

/// What the persister does: stage pending counts, encode their rows, publish.
fn flush(metrics: &Metrics) -> Vec<(String, Vec<u8>)> {
    let mut staged = Staged::default();
    metrics
        .accounting
        .stage_counts(&mut staged, metrics.take_pending_counts());
    let rows = metrics.accounting.encode(&staged);
    metrics.accounting.publish(staged);
    rows
}

fn lines_of<'a>(page: &'a str, prefix: &str) -> Vec<&'a str> {
    page.lines().filter(|l| l.starts_with(prefix)).collect()
}

#[test]
fn upstream_counts_wait_for_the_commit_and_survive_it() {
    let (metrics, registry) = metrics_for("p");
    metrics.record_request("p", "task", "200", 0.02);
    metrics.record_request("p", "task", "200", 0.2);
    metrics.record_api_error("p", "task", "invalid_response");
    let page = metrics.render(&registry).unwrap();
    assert!(!page.contains("genai_upstream_requests_total{"));
    let rows = flush(&metrics);
    let page = metrics.render(&registry).unwrap();
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

    let (restored, registry) = metrics_for("p");
    restored.restore(&rows);
    assert_eq!(
        restored
            .accounting
            .value(Family::UpstreamErrors, "p", &["task", "invalid_response"]),
        1.0
    );
    let again = restored.render(&registry).unwrap();
    assert_eq!(
        lines_of(&again, "genai_upstream_re"),
        lines_of(&page, "genai_upstream_re")
    );
    assert_eq!(
        lines_of(&page, "genai_upstream_re").len(),
        16,
        "1 counter, 15 histogram lines"
    );
}

#[test]
fn new_families_render_nothing_until_recorded_then_survive_a_restart() {
    let (metrics, registry) = metrics_for("p");
    let page = metrics.render(&registry).unwrap();
    for name in [
        "genai_task_detection_delay_seconds",
        "genai_proxy_requests_total",
        "genai_proxy_request_duration_seconds",
        "genai_proxy_submit_rejections_total",
        "genai_exporter_task_panics_total",
    ] {
        assert!(!page.contains(name), "{name} before any series:\n{page}");
    }
    // The page is served once the store is open; until then the gauge says it is not.
    assert!(
        page.lines().any(|l| l == "genai_exporter_store_up 0"),
        "{page}"
    );

    metrics.restore(&[]);
    metrics.observe_detection_delay("p", "webhook", 0.3);
    metrics.observe_detection_delay("p", "poll", 700.0);
    metrics.record_proxy_request("p", "submit", "200", 0.04);
    metrics.count_proxy_rejection("p", "invalid_body");
    metrics.count_task_panic("poller");
    let rows = flush(&metrics);
    let page = metrics.render(&registry).unwrap();
    for line in [
        "# TYPE genai_task_detection_delay_seconds histogram",
        r#"genai_task_detection_delay_seconds_bucket{provider="p",via="webhook",le="0.5"} 1"#,
        r#"genai_task_detection_delay_seconds_bucket{provider="p",via="poll",le="600"} 0"#,
        r#"genai_task_detection_delay_seconds_bucket{provider="p",via="poll",le="+Inf"} 1"#,
        r#"genai_proxy_requests_total{provider="p",endpoint="submit",code="200"} 1"#,
        r#"genai_proxy_request_duration_seconds_bucket{provider="p",endpoint="submit",le="0.05"} 1"#,
        r#"genai_proxy_submit_rejections_total{provider="p",reason="invalid_body"} 1"#,
        r#"genai_exporter_task_panics_total{task="poller"} 1"#,
        "genai_exporter_store_up 1",
    ] {
        assert!(page.lines().any(|l| l == line), "missing {line}:\n{page}");
    }
    metrics.set_store_up(false);
    let page = metrics.render(&registry).unwrap();
    assert!(page.lines().any(|l| l == "genai_exporter_store_up 0"));

    // Durable families come back from their rows; the panic count is not durable.
    let (restored, registry) = metrics_for("p");
    restored.restore(&rows);
    let again = restored.render(&registry).unwrap();
    for prefix in ["genai_task_detection", "genai_proxy_"] {
        assert_eq!(
            lines_of(&again, prefix),
            lines_of(&page, prefix),
            "{prefix}"
        );
        assert!(!lines_of(&again, prefix).is_empty(), "{prefix}");
    }
    assert!(!again.contains("genai_exporter_task_panics_total{"));
}

#[test]
fn series_of_providers_no_longer_configured_are_left_off() {
    let (metrics, registry) = metrics_for("p");
    metrics.record_request("gone", "task", "200", 0.1);
    metrics.count_webhook("", "unknown_provider");
    flush(&metrics);
    let page = metrics.render(&registry).unwrap();
    assert!(!page.contains(r#"provider="gone""#), "{page}");
    assert!(
        page.contains(
            r#"genai_exporter_webhook_requests_total{provider="",outcome="unknown_provider"} 1"#
        ),
        "{page}"
    );
}

#[test]
fn a_render_fault_is_an_error_not_an_empty_page() {
    let (metrics, registry) = metrics_for("p");
    metrics.fail_renders_with(RenderFault::MalformedFamily);
    let error = metrics.render(&registry).unwrap_err();
    assert!(error.to_string().contains("no name"), "{error}");
}
