//! The dashboards and alert rules against live data: the real exporter in demo mode (simulated
//! providers), scraped every second by a real Prometheus that loads
//! alerts/genai-task-exporter.rules.yml. Every query of every dashboard panel and every rule
//! expression is evaluated through Prometheus' HTTP API: none may fail, and every panel must show
//! data, except the few listed in ALLOWED_EMPTY. Prometheus must also report every rule healthy.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

mod common;
use common::demo::{Demo, url_after};

/// Panels that may show nothing in a demo that has run for about a minute, with the reason.
/// ("Days of balance left" is not here: the demo polls the balance every 15 s while it spends.)
const ALLOWED_EMPTY: &[(&str, &str, &str)] = &[(
    "genai-task-exporter.json",
    "Dropped tasks by reason",
    "needs a dropped task (6 h max age, not found upstream, or deleted through the API)",
)];

/// How long the panels may take to all show data once Prometheus has its first samples.
const DATA_DEADLINE: Duration = Duration::from_secs(90);

const PROMETHEUS: &str = "/usr/bin/prometheus";

#[test]
fn every_panel_query_and_rule_expression_evaluates_on_live_data() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules_file = root.join("alerts/genai-task-exporter.rules.yml");
    let dashboards = load_dashboards(&root.join("dashboards"));
    let rules = load_rules(&rules_file);
    assert!(!dashboards.is_empty(), "no dashboards found");
    assert!(!rules.is_empty(), "no rules found");

    let demo = Demo::start();
    let metrics = demo.metrics_url.strip_prefix("http://").expect("http URL");
    let (target, metrics_path) = metrics.split_once('/').expect("URL with a path");
    let prometheus = Prometheus::start(target, &format!("/{metrics_path}"), &rules_file);

    // Wait for the first scrapes.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = prometheus.query("up{job=\"genai-task-exporter\"} == 1");
        let tasks = prometheus.query("sum(genai_tasks)");
        if up.as_ref().is_ok_and(has_data) && tasks.as_ref().is_ok_and(has_data) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus has no data from the exporter after 60 s (up: {up:?}, genai_tasks: {tasks:?})\n{}",
            prometheus.log_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Every panel query: no error ever, data within the deadline.
    let mut queries: Vec<PanelQuery> = dashboards.iter().flat_map(panel_queries).collect();
    let total = queries.len();
    for (file, title, _) in ALLOWED_EMPTY {
        assert!(
            queries.iter().any(|q| q.file == *file && q.title == *title),
            "ALLOWED_EMPTY names {file} / {title:?}, which has no query"
        );
    }
    let deadline = Instant::now() + DATA_DEADLINE;
    loop {
        let mut waiting = Vec::new();
        for q in queries {
            match prometheus.query(&q.promql) {
                Err(e) => panic!(
                    "{} / {:?} query {}: Prometheus rejected it: {e}\n{}",
                    q.file, q.title, q.ref_id, q.promql
                ),
                Ok(result) if has_data(&result) || q.allowed_empty => {}
                Ok(_) => waiting.push(q),
            }
        }
        queries = waiting;
        if queries.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            let mut msg = format!(
                "{} of {total} panel queries returned no data within {DATA_DEADLINE:?}:\n",
                queries.len()
            );
            for q in &queries {
                let _ = writeln!(
                    msg,
                    "  {} / {:?} query {}: {}",
                    q.file, q.title, q.ref_id, q.promql
                );
            }
            panic!("{msg}");
        }
        std::thread::sleep(Duration::from_secs(2));
    }

    // Every rule expression evaluates without error.
    for rule in &rules {
        if let Err(e) = prometheus.query(&rule.expr) {
            panic!(
                "rule {}: Prometheus rejected its expression: {e}\n{}",
                rule.name, rule.expr
            );
        }
    }

    // And Prometheus has loaded every rule and evaluated each without error.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let loaded = prometheus.rules();
        let pending: Vec<&String> = rules
            .iter()
            .map(|r| &r.name)
            .filter(|name| {
                !loaded
                    .get(*name)
                    .is_some_and(|health| health.iter().all(|h| h == "ok"))
            })
            .collect();
        let loaded_count: usize = loaded.values().map(Vec::len).sum();
        if pending.is_empty() && loaded_count == rules.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rules not loaded or not healthy in Prometheus: {pending:?}; loaded: {loaded:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    drop(prometheus);
    drop(demo);
}

// ---------------------------------------------------------------------------------------------
// Dashboards and rules
// ---------------------------------------------------------------------------------------------

struct Dashboard {
    file: String,
    json: Value,
}

struct PanelQuery {
    file: String,
    title: String,
    ref_id: String,
    promql: String,
    allowed_empty: bool,
}

fn load_dashboards(dir: &Path) -> Vec<Dashboard> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dashboards directory")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| Dashboard {
            file: path.file_name().unwrap().to_string_lossy().into_owned(),
            json: serde_json::from_str(
                &std::fs::read_to_string(&path).expect("readable dashboard"),
            )
            .expect("dashboard is JSON"),
        })
        .collect()
}

fn panel_queries(d: &Dashboard) -> Vec<PanelQuery> {
    let mut panels = Vec::new();
    for p in d.json["panels"].as_array().expect("panels") {
        panels.push(p);
        if let Some(inner) = p["panels"].as_array() {
            panels.extend(inner);
        }
    }
    let mut out = Vec::new();
    for p in panels {
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().expect("panel title").to_string();
        let allowed_empty = ALLOWED_EMPTY
            .iter()
            .any(|(f, t, _)| *f == d.file && *t == title);
        let targets = p["targets"].as_array().expect("panel targets");
        assert!(!targets.is_empty(), "{} / {title:?} has no query", d.file);
        for t in targets {
            out.push(PanelQuery {
                file: d.file.clone(),
                title: title.clone(),
                ref_id: t["refId"].as_str().unwrap_or("?").to_string(),
                promql: grafana_to_promql(t["expr"].as_str().expect("target expr")),
                allowed_empty,
            });
        }
    }
    out
}

/// Substitutes Grafana's variables as Grafana would: the template variables by their "All"
/// value `.*`, the interval variables by durations that suit a scrape interval of 1 s.
fn grafana_to_promql(expr: &str) -> String {
    let expr = expr
        .replace("$__rate_interval", "1m")
        .replace("$__interval", "15s")
        .replace("$__range", "5m");
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr.as_str();
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (braced, name_start) = match after.strip_prefix('{') {
            Some(s) => (true, s),
            None => (false, after),
        };
        let len = name_start
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(name_start.len());
        assert!(len > 0, "lone $ in {expr}");
        // `$name`, or `${name}` / `${name:format}` with its braces
        let consumed = if braced {
            let close = name_start[len..].find('}').expect("closing brace");
            1 + len + close + 1
        } else {
            len
        };
        out.push_str(".*");
        rest = &after[consumed..];
    }
    out.push_str(rest);
    out
}

#[derive(Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
struct RuleGroup {
    rules: Vec<RuleEntry>,
}

#[derive(Deserialize)]
struct RuleEntry {
    record: Option<String>,
    alert: Option<String>,
    expr: String,
}

struct Rule {
    name: String,
    expr: String,
}

fn load_rules(path: &Path) -> Vec<Rule> {
    let text = std::fs::read_to_string(path).expect("readable rule file");
    let file: RuleFile = serde_saphyr::from_str(&text).expect("rule file is YAML");
    file.groups
        .into_iter()
        .flat_map(|g| g.rules)
        .map(|r| Rule {
            name: r.record.or(r.alert).expect("rule with record or alert"),
            expr: r.expr,
        })
        .collect()
}

/// A query result has data when at least one sample is a number (not NaN).
fn has_data(result: &Value) -> bool {
    let Some(samples) = result.as_array() else {
        return false;
    };
    samples.iter().any(|s| {
        let values: Vec<&Value> = match (s.get("value"), s.get("values")) {
            (Some(v), _) => vec![v],
            (None, Some(Value::Array(vs))) => vs.iter().collect(),
            _ => vec![],
        };
        values
            .iter()
            .filter_map(|v| v.get(1)?.as_str())
            .any(|v| v.parse::<f64>().is_ok_and(|f| !f.is_nan()))
    })
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// The Debian `prometheus` server with a 1 s scrape and evaluation interval.
struct Prometheus {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str, metrics_path: &str, rules_file: &Path) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: genai-task-exporter\n    metrics_path: {metrics_path}\n    \
                 static_configs:\n      - targets: [\"{target}\"]\n",
                rules = rules_file.display()
            ),
        )
        .expect("write prometheus.yml");
        let addr = format!("127.0.0.1:{}", free_port());
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {PROMETHEUS} (Debian package prometheus): {e}"));
        let prometheus = Prometheus { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_get(&prometheus.addr, "/-/ready").map(|(status, _)| status) != Ok(200) {
            assert!(
                Instant::now() < deadline,
                "Prometheus not ready after 30 s\n{}",
                prometheus.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    /// An instant query; the `result` array, or the error Prometheus gave.
    fn query(&self, promql: &str) -> Result<Value, String> {
        let (status, body) = http_get(
            &self.addr,
            &format!("/api/v1/query?query={}", url_encode(promql)),
        )?;
        let json: Value = serde_json::from_str(&body)
            .map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
        if json["status"] != "success" {
            return Err(format!(
                "HTTP {status}: {} {}",
                json["errorType"], json["error"]
            ));
        }
        if let Some(warnings) = json.get("warnings") {
            return Err(format!("warnings: {warnings}"));
        }
        Ok(json["data"]["result"].clone())
    }

    /// Loaded rules: name -> health of each rule of that name.
    fn rules(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let Ok((_, body)) = http_get(&self.addr, "/api/v1/rules") else {
            return out;
        };
        let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        for group in json["data"]["groups"].as_array().into_iter().flatten() {
            for rule in group["rules"].as_array().into_iter().flatten() {
                let evaluated = rule["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001-"));
                let health = if evaluated {
                    match rule["health"].as_str() {
                        Some("ok") => "ok".to_string(),
                        other => format!("{}: {}", other.unwrap_or("?"), rule["lastError"]),
                    }
                } else {
                    "not evaluated yet".to_string()
                };
                out.entry(rule["name"].as_str().unwrap_or("?").to_string())
                    .or_default()
                    .push(health);
            }
        }
        out
    }

    fn log_tail(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// A plain HTTP/1.0 GET (no chunked encoding, the server closes the connection).
fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP header")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no HTTP status")?;
    Ok((status, body.to_string()))
}

fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[test]
fn grafana_variables_become_promql() {
    assert_eq!(
        grafana_to_promql(
            "sum by (le) (rate(x_bucket{provider=~\"$provider\", model=~\"${model}\"}[$__rate_interval])) + increase(y[$__range]) + z[$__interval]"
        ),
        "sum by (le) (rate(x_bucket{provider=~\".*\", model=~\".*\"}[1m])) + increase(y[5m]) + z[15s]"
    );
    assert_eq!(
        url_after(
            "  metrics:             http://127.0.0.1:4242/metrics",
            "metrics:"
        )
        .as_deref(),
        Some("http://127.0.0.1:4242/metrics")
    );
    assert_eq!(
        url_after("  landing page:        http://127.0.0.1:1/", "metrics:"),
        None
    );
}
