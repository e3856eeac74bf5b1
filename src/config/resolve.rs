//! Resolution: the file becomes [`Settings`]. Defaults apply, command-line overrides win,
//! every value is checked and each problem is collected with its key path, so one run of
//! `check-config` shows them all.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::Environment;
use super::Overrides;
use super::file::{FileConfig, ProviderFile, ProviderType};
use super::secrets::load_secret;
use super::settings::{HistorySettings, Polling, ProviderSettings, ProxySettings, Settings, Shard};
use super::yaml::Problem;
use crate::providers::{FailureRules, HistoryKind};
use crate::task::{MAX_TASK_ID_LEN, is_valid_task_id};

/// Applies defaults and overrides, validates every key, and loads the secrets.
pub fn resolve(
    file: FileConfig,
    source: &Path,
    overrides: &Overrides,
    env: &dyn Environment,
) -> Result<Settings, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut problem = |path: &str, message: String| {
        problems.push(Problem {
            path: path.to_string(),
            message,
        })
    };

    let listen_text = overrides
        .listen_address
        .clone()
        .unwrap_or_else(|| file.server.listen_address.clone());
    let listen_address = match listen_text.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => {
            problem(
                "server.listen_address",
                format!("{listen_text:?} is not a host:port address (e.g. 0.0.0.0:9850)"),
            );
            SocketAddr::from(([0, 0, 0, 0], 9850))
        }
    };

    let api_token = match load_secret(
        "server",
        "api_token",
        file.server.api_token_env.as_deref(),
        file.server.api_token_file.as_deref(),
        false,
        env,
    ) {
        Ok(token) => token,
        Err(p) => {
            problems.extend(p);
            None
        }
    };
    let mut problem = |path: &str, message: String| {
        problems.push(Problem {
            path: path.to_string(),
            message,
        })
    };

    let defaults = Polling::default().merged(&file.polling);
    check_polling("polling", &defaults, &mut problem);

    if file.metrics.max_models_per_provider == 0 {
        problem(
            "metrics.max_models_per_provider",
            "must be at least 1".into(),
        );
    }
    check_buckets(
        "metrics.latency_buckets",
        &file.metrics.latency_buckets,
        &mut problem,
    );

    let shard = Shard {
        index: overrides.shard_index.unwrap_or(file.sharding.index),
        count: overrides.shard_count.unwrap_or(file.sharding.count),
    };
    if shard.count == 0 {
        problem("sharding.count", "must be at least 1".into());
    } else if shard.index >= shard.count {
        problem(
            "sharding.index",
            format!(
                "{} is out of range for {} shard(s) (0..{})",
                shard.index, shard.count, shard.count
            ),
        );
    }

    if let Some(template) = &file.sharding.peer_url_template {
        let at = "sharding.peer_url_template";
        if let Err(message) = crate::forward::PeerTemplate::parse(template, shard.count.max(1)) {
            problem(at, message);
        }
        if api_token.is_none() {
            problem(
                at,
                "needs server.api_token_env or api_token_file: peers register ids through their registration API".into(),
            );
        }
    }

    if file.providers.is_empty() {
        problem("providers", "at least one provider is required".into());
    }

    let mut providers = Vec::new();
    let mut names = HashSet::new();
    for (i, p) in file.providers.iter().enumerate() {
        let at = format!("providers[{i}]");
        if !names.insert(p.name.as_str()) {
            problems.push(Problem {
                path: format!("{at}.name"),
                message: format!("duplicate provider name {:?}", p.name),
            });
        }
        match resolve_provider(&at, p, &defaults, env) {
            Ok(settings) => providers.push(settings),
            Err(p) => problems.extend(p),
        }
    }

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Settings {
        source: source.to_path_buf(),
        listen_address,
        api_token,
        state_path: file.state.path,
        max_models_per_provider: file.metrics.max_models_per_provider,
        latency_buckets: file.metrics.latency_buckets,
        shard,
        peer_url_template: file.sharding.peer_url_template,
        providers,
    })
}

/// Longest duration accepted anywhere. Durations become whole milliseconds added to clock
/// readings (the registry) and deadlines of timers; within this bound neither can overflow.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);
/// Shortest positive duration: the registry keeps durations as whole milliseconds, so a
/// shorter one would become 0.
const MIN_POSITIVE: Duration = Duration::from_millis(1);
/// Shortest `forget_after`: static ids and task files are mentioned again at least this
/// often (`registry::remention_interval`), and a tombstone must outlive the gap.
const MIN_FORGET_AFTER: Duration = Duration::from_secs(1);

/// Checks that `d` is at most [`MAX_DURATION`] and, when it must be positive, at least
/// `min`.
fn check_duration(
    at: &str,
    d: Duration,
    min: Option<Duration>,
    problem: &mut impl FnMut(&str, String),
) {
    if d > MAX_DURATION {
        problem(at, "must be at most 100y".into());
    } else if d.is_zero() && min.is_some() {
        problem(at, "must be greater than 0".into());
    } else if let Some(min) = min.filter(|min| d < *min) {
        problem(
            at,
            format!("must be at least {}", humantime::format_duration(min)),
        );
    }
}

/// The time between two requests at `requests_per_second`, when that is a usable duration
/// (the rate limiter computes it the same way and must not panic).
pub(crate) fn request_period(requests_per_second: f64) -> Option<Duration> {
    if !(requests_per_second.is_finite() && requests_per_second > 0.0) {
        return None;
    }
    Duration::try_from_secs_f64(1.0 / requests_per_second)
        .ok()
        .filter(|period| *period <= MAX_DURATION)
}

fn check_polling(at: &str, p: &Polling, problem: &mut impl FnMut(&str, String)) {
    let key = |name: &str| format!("{at}.{name}");
    check_duration(&key("interval"), p.interval, Some(MIN_POSITIVE), problem);
    check_duration(
        &key("max_interval"),
        p.max_interval,
        Some(MIN_POSITIVE),
        problem,
    );
    if p.max_interval < p.interval {
        problem(
            &key("max_interval"),
            format!(
                "{} is shorter than interval {}",
                humantime::format_duration(p.max_interval),
                humantime::format_duration(p.interval)
            ),
        );
    }
    check_duration(&key("timeout"), p.timeout, Some(MIN_POSITIVE), problem);
    if request_period(p.requests_per_second).is_none() {
        problem(
            &key("requests_per_second"),
            "must be a finite number greater than 0, at least one request per 100y".into(),
        );
    }
    if p.max_concurrency == 0 {
        problem(&key("max_concurrency"), "must be at least 1".into());
    }
    check_duration(
        &key("max_task_age"),
        p.max_task_age,
        Some(MIN_POSITIVE),
        problem,
    );
    check_duration(&key("retention"), p.retention, None, problem);
    check_duration(
        &key("forget_after"),
        p.forget_after,
        Some(MIN_FORGET_AFTER),
        problem,
    );
    if p.forget_after < p.retention {
        problem(
            &key("forget_after"),
            format!(
                "{} is shorter than retention {}",
                humantime::format_duration(p.forget_after),
                humantime::format_duration(p.retention)
            ),
        );
    }
}

/// Histogram bucket bounds: at least one, finite, positive, strictly increasing.
fn check_buckets(at: &str, buckets: &[f64], problem: &mut impl FnMut(&str, String)) {
    if buckets.is_empty() {
        problem(at, "must not be empty".into());
    } else if !buckets.iter().all(|b| b.is_finite() && *b > 0.0)
        || buckets.windows(2).any(|w| w[0] >= w[1])
    {
        problem(
            at,
            "must be positive finite numbers in strictly increasing order".into(),
        );
    }
}

fn resolve_provider(
    at: &str,
    p: &ProviderFile,
    defaults: &Polling,
    env: &dyn Environment,
) -> Result<ProviderSettings, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut problem = |path: String, message: String| problems.push(Problem { path, message });

    // The name is a label value and a URL path segment (`/webhooks/{name}`): keep it tame.
    let name_ok = !p.name.is_empty()
        && p.name.len() <= 64
        && p.name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !name_ok {
        problem(
            format!("{at}.name"),
            format!(
                "{:?} must be 1-64 characters of a-z, 0-9, '_' or '-'",
                p.name
            ),
        );
    }

    let base_url = p
        .base_url
        .clone()
        .unwrap_or_else(|| p.kind.default_base_url().to_string());
    let base_url = base_url.trim_end_matches('/').to_string();
    match reqwest::Url::parse(&base_url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
            if !url.username().is_empty() || url.password().is_some() {
                problem(
                    format!("{at}.base_url"),
                    "must not contain credentials; use token_env or token_file".into(),
                );
            }
        }
        _ => problem(
            format!("{at}.base_url"),
            "must be an http:// or https:// URL".into(),
        ),
    }

    let token = match load_secret(
        at,
        "token",
        p.token_env.as_deref(),
        p.token_file.as_deref(),
        true,
        env,
    ) {
        Ok(t) => t,
        Err(ps) => {
            problems.extend(ps);
            None
        }
    };
    let mut problem = |path: String, message: String| problems.push(Problem { path, message });

    let polling = defaults.merged(&p.polling);
    // Problems of the shared defaults are reported once, under `polling`.
    if polling != *defaults {
        check_polling(&format!("{at}.polling"), &polling, &mut |path, m| {
            problem(path.to_string(), m)
        });
    }

    for (j, id) in p.tasks.iter().enumerate() {
        if !is_valid_task_id(id) {
            problem(
                format!("{at}.tasks[{j}]"),
                format!("not a task id (1-{MAX_TASK_ID_LEN} printable characters, no spaces)"),
            );
        }
    }
    for (j, pattern) in p.task_files.iter().enumerate() {
        if let Err(e) = glob::Pattern::new(pattern) {
            problem(format!("{at}.task_files[{j}]"), format!("bad glob: {e}"));
        }
    }

    let mut webhook_token = None;
    if let Some(w) = p.webhook.as_ref().filter(|w| w.enabled) {
        let wat = format!("{at}.webhook");
        match load_secret(
            &wat,
            "token",
            w.token_env.as_deref(),
            w.token_file.as_deref(),
            true,
            env,
        ) {
            Ok(t) => webhook_token = t,
            Err(ps) => problems.extend(ps),
        }
    }
    let mut problem = |path: String, message: String| problems.push(Problem { path, message });

    let mut history = None;
    if let Some(h) = p.history.as_ref().filter(|h| h.enabled) {
        if p.kind != ProviderType::Apimall {
            problem(
                format!("{at}.history"),
                format!("{} has no history endpoint", p.kind.as_str()),
            );
        }
        check_duration(
            &format!("{at}.history.interval"),
            h.interval.0,
            Some(MIN_POSITIVE),
            &mut |path, m| problem(path.to_string(), m),
        );
        if h.max_pages == 0 {
            problem(
                format!("{at}.history.max_pages"),
                "must be at least 1".into(),
            );
        }
        if h.kinds.is_empty() {
            problem(
                format!("{at}.history.kinds"),
                "must name at least one of images, videos, audio".into(),
            );
        }
        let mut kinds = Vec::new();
        for (j, k) in h.kinds.iter().enumerate() {
            match k.as_str() {
                "images" | "videos" | "audio" if h.kinds[..j].contains(k) => problem(
                    format!("{at}.history.kinds[{j}]"),
                    format!("{k:?} is listed twice"),
                ),
                "images" => kinds.push(HistoryKind::Images),
                "videos" => kinds.push(HistoryKind::Videos),
                "audio" => kinds.push(HistoryKind::Audio),
                other => problem(
                    format!("{at}.history.kinds[{j}]"),
                    format!("{other:?} is not one of images, videos, audio"),
                ),
            }
        }
        history = Some(HistorySettings {
            interval: h.interval.0,
            max_pages: h.max_pages,
            kinds,
        });
    }

    let mut balance_interval = None;
    if let Some(b) = p.balance.as_ref().filter(|b| b.enabled) {
        if p.kind != ProviderType::Apimall {
            problem(
                format!("{at}.balance"),
                format!("{} has no balance endpoint", p.kind.as_str()),
            );
        }
        check_duration(
            &format!("{at}.balance.interval"),
            b.interval.0,
            Some(MIN_POSITIVE),
            &mut |path, m| problem(path.to_string(), m),
        );
        balance_interval = Some(b.interval.0);
    }

    let proxy = &p.proxy;
    check_duration(
        &format!("{at}.proxy.timeout"),
        proxy.timeout.0,
        Some(MIN_POSITIVE),
        &mut |path, m| problem(path.to_string(), m),
    );
    if proxy.max_request_body_bytes == 0 {
        problem(
            format!("{at}.proxy.max_request_body_bytes"),
            "must be at least 1".to_string(),
        );
    }
    let proxy = ProxySettings {
        enabled: proxy.enabled,
        max_request_body_bytes: proxy.max_request_body_bytes,
        timeout: proxy.timeout.0,
    };
    let webhook_confirm = p
        .webhook
        .as_ref()
        .and_then(|w| w.confirm)
        .unwrap_or(p.kind.confirms_webhooks_by_default());

    let rule_pairs: Vec<(String, String)> = p
        .failure_reasons
        .iter()
        .map(|r| (r.reason.clone(), r.pattern.clone()))
        .collect();
    let failure_rules = match FailureRules::new(&rule_pairs) {
        Ok(rules) => rules,
        Err(e) => {
            problem(format!("{at}.failure_reasons"), e.to_string());
            FailureRules::defaults()
        }
    };

    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(ProviderSettings {
        name: p.name.clone(),
        kind: p.kind,
        base_url,
        token: token.expect("a required secret is present when no problem was reported"),
        polling,
        tasks: p.tasks.clone(),
        task_files: p.task_files.clone(),
        webhook_token,
        webhook_confirm,
        history,
        balance_interval,
        failure_rules,
        failure_rules_source: rule_pairs,
        proxy,
    })
}
