use super::file::DEFAULT_MAXAPI_BASE_URL;
use super::*;
use std::path::Path;
use std::time::Duration;

fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |name: &str| {
        vars.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

fn resolve_text(
    text: &str,
    vars: &'static [(&'static str, &'static str)],
) -> Result<Settings, Vec<Problem>> {
    let file = parse(text).map_err(|m| {
        vec![Problem {
            path: String::new(),
            message: m,
        }]
    })?;
    resolve(
        file,
        Path::new("test.yaml"),
        &Overrides::default(),
        &env(vars),
    )
}

#[test]
fn defaults_apply_and_provider_overrides_win() {
    let s = resolve_text(
            "polling: {interval: 30s}\nproviders:\n  - name: mx\n    type: maxapi\n    token_env: K\n    polling: {max_concurrency: 2}\n",
            &[("K", "secret-value")],
        )
        .unwrap();
    let p = &s.providers[0];
    assert_eq!(p.polling.interval, Duration::from_secs(30));
    assert_eq!(p.polling.max_concurrency, 2);
    assert_eq!(p.polling.max_interval, Duration::from_secs(300));
    assert_eq!(p.base_url, DEFAULT_MAXAPI_BASE_URL);
    assert_eq!(p.token.expose(), "secret-value");
    assert_eq!(s.listen_address.to_string(), "0.0.0.0:9850");
    assert_eq!(s.latency_buckets, DEFAULT_LATENCY_BUCKETS.to_vec());
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let err = resolve_text(
            "polling: {interval: 10m, max_interval: 1m}\nproviders:\n  - name: a\n    type: maxapi\n    token_env: MISSING\n  - name: a\n    type: maxapi\n    token_env: K\n    history: {enabled: true}\n",
            &[("K", "x")],
        )
        .unwrap_err();
    let text: Vec<String> = err.iter().map(|p| p.to_string()).collect();
    assert!(
        text.contains(&"polling.max_interval: 1m is shorter than interval 10m".to_string()),
        "{text:?}"
    );
    assert!(
        text.contains(&"providers[0].token_env: variable MISSING is not set".to_string()),
        "{text:?}"
    );
    assert!(
        text.contains(&"providers[1].name: duplicate provider name \"a\"".to_string()),
        "{text:?}"
    );
    assert!(
        text.contains(&"providers[1].history: maxapi has no history endpoint".to_string()),
        "{text:?}"
    );
}

#[test]
fn unknown_keys_and_bad_durations_name_the_line() {
    let err = parse("server:\n  listen_adress: 1.2.3.4:5\n").unwrap_err();
    assert!(err.contains("listen_adress"), "{err}");
    let err = parse(
        "providers:\n  - name: a\n    type: maxapi\n    polling: {interval: 5 minutes please}\n",
    )
    .unwrap_err();
    assert!(err.starts_with("providers[0].polling.interval: "), "{err}");
    assert!(err.contains('2'), "line number expected: {err}");
    let err = parse("polling:\n  interval: soon\n").unwrap_err();
    assert!(err.contains("invalid duration"), "{err}");
}

#[test]
fn parse_errors_do_not_quote_the_file() {
    // A key written inline by mistake must not be echoed into logs or the reload answer.
    for text in [
        "providers:\n  - name: a\n    type: maxapi\n    token: sk-inline-7f3e\n",
        "providers:\n  - name: a\n    type: maxapi\n    token_env: [sk-inline-7f3e\n",
        "server: sk-inline-7f3e\n",
    ] {
        let err = parse(text).unwrap_err();
        assert!(!err.contains("sk-inline-7f3e"), "{err}");
        assert!(err.contains("line"), "{err}");
    }
    let err = resolve_text(
        "providers:\n  - {name: a, type: apimall, token_env: sk-inline-7f3e}\n",
        &[],
    )
    .unwrap_err();
    assert_eq!(err[0].path, "providers[0].token_env");
    assert!(!err[0].message.contains("sk-inline-7f3e"), "{err:?}");
}

#[test]
fn secrets_need_exactly_one_source() {
    let err = resolve_text("providers:\n  - {name: a, type: apimall}\n", &[]).unwrap_err();
    assert_eq!(
        err[0].to_string(),
        "providers[0].token_env: one of token_env or token_file is required"
    );
    let err = resolve_text(
        "providers:\n  - {name: a, type: apimall, token_env: K, token_file: /nonexistent}\n",
        &[("K", "x")],
    )
    .unwrap_err();
    assert!(err[0].message.contains("not both"));
}

#[test]
fn secret_values_never_reach_problems_or_summary() {
    let s = resolve_text(
        "server: {api_token_env: T}\nproviders:\n  - {name: a, type: apimall, token_env: K}\n",
        &[("K", "sk-live-123"), ("T", "tok-456")],
    )
    .unwrap();
    let summary = s.summary();
    assert!(!summary.contains("sk-live-123") && !summary.contains("tok-456"));
    assert!(!format!("{s:?}").contains("sk-live-123"));
}

/// A valid one-provider file with `polling`, `metrics` and provider keys added.
fn with(top: &str, provider: &str) -> String {
    format!("{top}\nproviders:\n  - name: am\n    type: apimall\n    token_env: K\n{provider}\n")
}

fn problems_of(text: &str) -> Vec<Problem> {
    match resolve_text(text, &[("K", "key")]) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(problems) => problems,
    }
}

#[test]
fn every_unusable_value_is_refused_with_its_key_path() {
    let top = |t: &str| with(t, "");
    let provider = |p: &str| with("", p);
    let cases: Vec<(String, &str, &str)> = vec![
        // The rate: every value whose request interval is not a usable duration.
        (
            top("polling: {requests_per_second: 1e-20}"),
            "polling.requests_per_second",
            "at least one request per 100y",
        ),
        (
            top("polling: {requests_per_second: 0}"),
            "polling.requests_per_second",
            "greater than 0",
        ),
        (
            top("polling: {requests_per_second: -5}"),
            "polling.requests_per_second",
            "greater than 0",
        ),
        (
            top("polling: {requests_per_second: .nan}"),
            "polling.requests_per_second",
            "finite",
        ),
        (
            top("polling: {requests_per_second: .inf}"),
            "polling.requests_per_second",
            "finite",
        ),
        (
            top("polling: {requests_per_second: -.inf}"),
            "polling.requests_per_second",
            "finite",
        ),
        (
            top("polling: {requests_per_second: 5e-324}"),
            "polling.requests_per_second",
            "100y",
        ),
        // Durations: zero or below a millisecond where a positive one is needed, too long.
        (
            top("polling: {interval: 0s}"),
            "polling.interval",
            "must be greater than 0",
        ),
        (
            top("polling: {interval: 500us}"),
            "polling.interval",
            "must be at least 1ms",
        ),
        (
            top("polling: {max_interval: 0s, interval: 0s}"),
            "polling.max_interval",
            "greater than 0",
        ),
        (
            top("polling: {interval: 10m, max_interval: 1m}"),
            "polling.max_interval",
            "shorter than interval",
        ),
        (
            top("polling: {max_interval: 101y}"),
            "polling.max_interval",
            "at most 100y",
        ),
        (
            top("polling: {timeout: 0s}"),
            "polling.timeout",
            "greater than 0",
        ),
        (
            top("polling: {timeout: 500000000y}"),
            "polling.timeout",
            "at most 100y",
        ),
        (
            top("polling: {max_task_age: 0s}"),
            "polling.max_task_age",
            "greater than 0",
        ),
        (
            top("polling: {max_task_age: 500000000y}"),
            "polling.max_task_age",
            "at most 100y",
        ),
        (
            top("polling: {retention: 500000000y, forget_after: 600000000y}"),
            "polling.retention",
            "at most 100y",
        ),
        (
            top("polling: {retention: 0s, forget_after: 0s}"),
            "polling.forget_after",
            "greater than 0",
        ),
        (
            top("polling: {retention: 0s, forget_after: 500ms}"),
            "polling.forget_after",
            "at least 1s",
        ),
        (
            top("polling: {retention: 2h, forget_after: 1h}"),
            "polling.forget_after",
            "shorter than retention",
        ),
        (
            top("polling: {max_concurrency: 0}"),
            "polling.max_concurrency",
            "at least 1",
        ),
        // A provider's own override is checked under its own path.
        (
            provider("    polling: {requests_per_second: 1e-20}"),
            "providers[0].polling.requests_per_second",
            "100y",
        ),
        (
            provider("    polling: {max_task_age: 500000000y}"),
            "providers[0].polling.max_task_age",
            "100y",
        ),
        // Histogram buckets.
        (
            top("metrics: {latency_buckets: []}"),
            "metrics.latency_buckets",
            "must not be empty",
        ),
        (
            top("metrics: {latency_buckets: [1, .nan]}"),
            "metrics.latency_buckets",
            "finite",
        ),
        (
            top("metrics: {latency_buckets: [1, .inf]}"),
            "metrics.latency_buckets",
            "finite",
        ),
        (
            top("metrics: {latency_buckets: [2, 1]}"),
            "metrics.latency_buckets",
            "increasing",
        ),
        (
            top("metrics: {latency_buckets: [1, 1]}"),
            "metrics.latency_buckets",
            "increasing",
        ),
        (
            top("metrics: {latency_buckets: [0, 1]}"),
            "metrics.latency_buckets",
            "positive",
        ),
        (
            top("metrics: {max_models_per_provider: 0}"),
            "metrics.max_models_per_provider",
            "at least 1",
        ),
        // History, balance, proxy.
        (
            provider("    history: {enabled: true, max_pages: 0}"),
            "providers[0].history.max_pages",
            "at least 1",
        ),
        (
            provider("    history: {enabled: true, interval: 0s}"),
            "providers[0].history.interval",
            "greater than 0",
        ),
        (
            provider("    history: {enabled: true, interval: 500000000y}"),
            "providers[0].history.interval",
            "100y",
        ),
        (
            provider("    history: {enabled: true, kinds: []}"),
            "providers[0].history.kinds",
            "at least one",
        ),
        (
            provider("    history: {enabled: true, kinds: [audio, audio]}"),
            "providers[0].history.kinds[1]",
            "listed twice",
        ),
        (
            provider("    balance: {enabled: true, interval: 0s}"),
            "providers[0].balance.interval",
            "greater than 0",
        ),
        (
            provider("    balance: {enabled: true, interval: 500000000y}"),
            "providers[0].balance.interval",
            "100y",
        ),
        (
            provider("    proxy: {timeout: 0s}"),
            "providers[0].proxy.timeout",
            "greater than 0",
        ),
        (
            provider("    proxy: {max_request_body_bytes: 0}"),
            "providers[0].proxy.max_request_body_bytes",
            "at least 1",
        ),
    ];
    for (text, path, fragment) in cases {
        let problems = problems_of(&text);
        assert!(
            problems
                .iter()
                .any(|p| p.path == path && p.message.contains(fragment)),
            "expected {path}: ...{fragment}... for\n{text}\ngot {problems:?}"
        );
    }
}

#[test]
fn the_extremes_that_pass_convert_without_overflow() {
    // The smallest rate and the longest durations accepted, converted the way the rate
    // limiter, the registry and the timers convert them.
    let s = resolve_text(
        &with(
            "polling: {requests_per_second: 3.2e-10, interval: 1ms, max_interval: 100y, \
             timeout: 100y, max_task_age: 100y, retention: 100y, forget_after: 100y}",
            "    history: {enabled: true, interval: 100y}\n    balance: {enabled: true, interval: 100y}",
        ),
        &[("K", "key")],
    )
    .unwrap();
    let p = &s.providers[0];
    let period = Duration::from_secs_f64(1.0 / p.polling.requests_per_second);
    assert!(std::time::Instant::now().checked_add(period).is_some());
    let now_ms = 1_800_000_000_000_i64; // 2027
    for d in [
        p.polling.interval,
        p.polling.max_interval,
        p.polling.timeout,
        p.polling.max_task_age,
        p.polling.retention,
        p.polling.forget_after,
        p.history.as_ref().unwrap().interval,
        p.balance_interval.unwrap(),
    ] {
        let ms = i64::try_from(d.as_millis()).unwrap();
        assert!(now_ms.checked_add(ms).is_some());
        assert!(std::time::Instant::now().checked_add(d).is_some());
        assert!(ms >= 1);
    }
}

#[test]
fn a_misindented_key_is_a_syntax_error_at_its_line() {
    let err = parse("providers:\n  - name: x\n   type: maxapi\n").unwrap_err();
    assert!(err.contains("line 3"), "{err}");
    assert!(!err.contains("missing field"), "{err}");
    // Same shape with a secret-looking value: the message names the place, not the text.
    let err = parse("providers:\n  - name: x\n   token_env: sk-live-9f2c\n").unwrap_err();
    assert!(err.contains("line 3"), "{err}");
    assert!(!err.contains("sk-live-9f2c"), "{err}");
}

#[test]
fn a_bad_duration_is_not_repeated_in_the_message() {
    let err = parse("polling:\n  interval: sk-live-9f2c\n").unwrap_err();
    assert!(err.contains("invalid duration"), "{err}");
    assert!(!err.contains("sk-live-9f2c"), "{err}");
}

#[test]
fn proxy_and_webhook_confirm_resolve_with_per_type_defaults() {
    let s = resolve_text(
        "providers:\n  - {name: mx, type: maxapi, token_env: K}\n  - {name: am, type: apimall, token_env: K}\n",
        &[("K", "key")],
    )
    .unwrap();
    assert!(
        !s.providers[0].webhook_confirm,
        "maxapi callbacks carry the envelope"
    );
    assert!(
        s.providers[1].webhook_confirm,
        "apimall deliveries are confirmed"
    );
    for p in &s.providers {
        assert_eq!(
            p.proxy,
            ProxySettings {
                enabled: false,
                max_request_body_bytes: 67_108_864,
                timeout: Duration::from_secs(120),
            }
        );
    }
    let s = resolve_text(
        "providers:\n  - name: am\n    type: apimall\n    token_env: K\n    webhook: {enabled: true, token_env: W, confirm: false}\n    proxy: {enabled: true, max_request_body_bytes: 1024, timeout: 5s}\n",
        &[("K", "key"), ("W", "hook")],
    )
    .unwrap();
    let p = &s.providers[0];
    assert!(!p.webhook_confirm);
    assert_eq!(
        p.proxy,
        ProxySettings {
            enabled: true,
            max_request_body_bytes: 1024,
            timeout: Duration::from_secs(5),
        }
    );
}

#[test]
fn secret_files_that_are_not_regular_files_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("token-fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let cases = [
        (Path::new("/dev/zero").to_path_buf(), "character device"),
        (fifo, "FIFO"),
        (dir.path().to_path_buf(), "directory"),
    ];
    for (file, kind) in cases {
        let shown = file.display().to_string();
        // The provider key, a webhook token and the API token: each names its own key.
        let text = format!(
            "server: {{api_token_file: {shown}}}\nproviders:\n  - name: am\n    type: apimall\n    token_file: {shown}\n    webhook: {{enabled: true, token_file: {shown}}}\n"
        );
        let problems = problems_of(&text);
        for path in [
            "server.api_token_file",
            "providers[0].token_file",
            "providers[0].webhook.token_file",
        ] {
            let p = problems
                .iter()
                .find(|p| p.path == path)
                .unwrap_or_else(|| panic!("{path} not reported: {problems:?}"));
            assert_eq!(
                p.message,
                format!("{shown} is a {kind}, not a regular file")
            );
        }
    }
}

#[test]
fn peer_url_template_needs_the_api_token_and_an_index_per_shard() {
    let provider = "providers:\n  - name: mx\n    type: maxapi\n    token_env: K\n";
    let with_token = "server: {api_token_env: T}\n";
    let vars: &[(&str, &str)] = &[("K", "provider-key"), ("T", "api-token")];
    let resolved = |top: String| resolve_text(&format!("{top}{provider}"), vars);

    let ok = resolved(format!(
        "{with_token}sharding:\n  index: 1\n  count: 2\n  peer_url_template: \"http://exporter-{{index}}.exporters:9850\"\n"
    ))
    .unwrap();
    assert_eq!(
        ok.peer_url_template.as_deref(),
        Some("http://exporter-{index}.exporters:9850")
    );
    // Without sharding one name may cover every HA copy.
    assert!(
        resolved(format!(
            "{with_token}sharding: {{peer_url_template: \"http://peers:9850\"}}\n"
        ))
        .is_ok()
    );

    let paths = |top: String| -> Vec<String> {
        resolved(top)
            .unwrap_err()
            .into_iter()
            .map(|p| p.path)
            .collect()
    };
    assert_eq!(
        paths("sharding: {peer_url_template: \"http://peers:9850\"}\n".into()),
        ["sharding.peer_url_template"],
        "no API token"
    );
    assert_eq!(
        paths(format!(
            "{with_token}sharding: {{count: 2, peer_url_template: \"http://peers:9850\"}}\n"
        )),
        ["sharding.peer_url_template"],
        "no {{index}} with two shards"
    );
    assert_eq!(
        paths(format!(
            "{with_token}sharding: {{peer_url_template: \"exporter-{{index}}\"}}\n"
        )),
        ["sharding.peer_url_template"],
        "not a URL"
    );
}
