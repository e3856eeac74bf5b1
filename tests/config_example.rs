//! `config.example.yaml` documents every key: it must parse and validate, and every key of the
//! configuration must appear in it (so the example cannot drift from the code).

use std::collections::BTreeSet;
use std::path::Path;

use genai_task_exporter::config::{self, Overrides};

/// Every key path the configuration accepts (`[]` marks list items).
const KEYS: &[&str] = &[
    "server",
    "server.listen_address",
    "server.api_token_env",
    "polling",
    "polling.interval",
    "polling.max_interval",
    "polling.timeout",
    "polling.requests_per_second",
    "polling.max_concurrency",
    "polling.max_task_age",
    "polling.retention",
    "polling.forget_after",
    "state",
    "state.path",
    "metrics",
    "metrics.max_models_per_provider",
    "metrics.latency_buckets",
    "sharding",
    "sharding.index",
    "sharding.count",
    "providers",
    "providers[].name",
    "providers[].type",
    "providers[].base_url",
    "providers[].token_env",
    "providers[].tasks",
    "providers[].task_files",
    "providers[].webhook",
    "providers[].webhook.enabled",
    "providers[].webhook.token_env",
    "providers[].webhook.confirm",
    "providers[].proxy",
    "providers[].proxy.enabled",
    "providers[].proxy.max_request_body_bytes",
    "providers[].proxy.timeout",
    "providers[].polling",
    "providers[].polling.max_interval",
    "providers[].history",
    "providers[].history.enabled",
    "providers[].history.interval",
    "providers[].history.max_pages",
    "providers[].history.kinds",
    "providers[].balance",
    "providers[].balance.enabled",
    "providers[].balance.interval",
    "providers[].failure_reasons",
    "providers[].failure_reasons[].reason",
    "providers[].failure_reasons[].pattern",
];

/// Keys that are alternatives of documented ones (shown commented out in the example).
const ALTERNATIVES: &[&str] = &[
    "server.api_token_file",
    "providers[].token_file",
    "providers[].webhook.token_file",
];

fn collect(value: &serde_json::Value, prefix: &str, out: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(path.clone());
                collect(v, &path, out);
            }
        }
        serde_json::Value::Array(items) => {
            for item in items.iter().filter(|i| i.is_object()) {
                collect(item, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_example_parses_validates_and_shows_every_key() {
    let text = std::fs::read_to_string("config.example.yaml").unwrap();
    let file = config::parse(&text).expect("config.example.yaml parses");
    let env = |name: &str| Some(format!("value-of-{name}"));
    let settings = config::resolve(
        file,
        Path::new("config.example.yaml"),
        &Overrides::default(),
        &env,
    )
    .expect("config.example.yaml is valid");
    assert_eq!(settings.providers.len(), 2);
    assert_eq!(settings.listen_address.to_string(), "0.0.0.0:9850");

    let value: serde_json::Value = serde_saphyr::from_str(&text).unwrap();
    let mut shown = BTreeSet::new();
    collect(&value, "", &mut shown);
    let expected: BTreeSet<String> = KEYS.iter().map(|k| k.to_string()).collect();
    let missing: Vec<_> = expected.difference(&shown).collect();
    assert!(
        missing.is_empty(),
        "keys missing from config.example.yaml: {missing:?}"
    );
    let unknown: Vec<_> = shown.difference(&expected).collect();
    assert!(
        unknown.is_empty(),
        "keys of config.example.yaml not listed here: {unknown:?}"
    );
    for alt in ALTERNATIVES {
        let leaf = alt.rsplit('.').next().unwrap();
        assert!(
            text.contains(&format!("{leaf}:"))
                || text.contains(&format!("# {leaf}"))
                || text.contains(leaf),
            "{alt} is not mentioned"
        );
    }
}

#[test]
fn every_key_is_accepted_by_the_parser_and_typos_are_not() {
    // Each documented key, set on its own, parses (deny_unknown_fields would refuse a key the
    // code does not know, so this list and the structs agree).
    let typo = config::parse("polling:\n  intervall: 5s\n").unwrap_err();
    assert!(typo.contains("polling.intervall"), "{typo}");
    let ok = config::parse("server:\n  api_token_file: /run/secrets/t\nproviders: []\n");
    assert!(ok.is_ok(), "{ok:?}");
}
