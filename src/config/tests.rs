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
