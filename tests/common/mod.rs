//! Test harness: a scriptable fake upstream, the exporter started in-process on
//! 127.0.0.1:0, and a parser for the text exposition format.
#![allow(dead_code)] // each test binary uses a different part of the harness
#![allow(unreachable_pub)] // shared by the test binaries: `pub` is how they reach it

pub mod demo;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use genai_task_exporter::app::App;
use genai_task_exporter::config::{self, Overrides};
use genai_task_exporter::registry::Source;
use genai_task_exporter::simulator::GroundTruth;
use genai_task_exporter::startup::{Application, Options};
use genai_task_exporter::task::{FailureReason, Status, now_millis};

// ---------------------------------------------------------------------------------------
// Fake upstream
// ---------------------------------------------------------------------------------------

/// One scripted answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    pub delay: Duration,
}

impl Reply {
    pub fn json(status: u16, body: serde_json::Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: body.to_string().into_bytes(),
            delay: Duration::ZERO,
        }
    }

    pub fn raw(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status,
            headers: vec![],
            body: body.into(),
            delay: Duration::ZERO,
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Reply {
        self.headers.push((name, value.into()));
        self
    }

    pub fn delayed(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

#[derive(Default)]
struct FakeState {
    /// Answers per path, used in order; the last one repeats.
    script: HashMap<String, VecDeque<Reply>>,
    hits: Vec<(String, Instant, Option<String>)>,
}

/// A fake provider API on 127.0.0.1:0 that answers from a script.
#[derive(Clone)]
pub struct FakeUpstream {
    pub addr: SocketAddr,
    state: Arc<Mutex<FakeState>>,
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        let state = Arc::new(Mutex::new(FakeState::default()));
        let app = Router::new()
            .fallback(fake_handler)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeUpstream { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers `path` with `replies` in order (the last one repeats).
    pub fn script(&self, path: &str, replies: Vec<Reply>) {
        self.state
            .lock()
            .unwrap()
            .script
            .insert(path.to_string(), replies.into());
    }

    /// Answers maxapi's get-task for `id` with [`maxapi_task`] in `status`, always.
    pub fn script_maxapi_task(&self, id: &str, status: &str) {
        let answer = maxapi_task(id, status, serde_json::Value::Null);
        self.script(
            &format!("/api/v1/task/{id}"),
            vec![Reply::json(200, answer)],
        );
    }

    /// Requests seen for `path`.
    pub fn hits(&self, path: &str) -> Vec<Instant> {
        self.state
            .lock()
            .unwrap()
            .hits
            .iter()
            .filter(|(p, _, _)| p == path)
            .map(|(_, t, _)| *t)
            .collect()
    }

    /// Waits until `path` has been requested `more` times beyond the requests seen so far:
    /// the positive event after which "nothing else happened" can be asserted (a poller
    /// that went round again had every chance to send what it must not).
    pub async fn wait_for_more_hits(&self, path: &str, more: usize, timeout: Duration) {
        let target = self.hits(path).len() + more;
        let deadline = Instant::now() + timeout;
        while self.hits(path).len() < target {
            assert!(
                Instant::now() < deadline,
                "{path} was not requested {more} more time(s) within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Authorization headers seen, all paths.
    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.state
            .lock()
            .unwrap()
            .hits
            .iter()
            .map(|(_, _, a)| a.clone())
            .collect()
    }
}

async fn fake_handler(State(state): State<Arc<Mutex<FakeState>>>, req: Request) -> Response {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let reply = {
        let mut s = state.lock().unwrap();
        s.hits.push((path.clone(), Instant::now(), auth));
        match s.script.get_mut(&path) {
            Some(queue) if queue.len() > 1 => queue.pop_front(),
            Some(queue) => queue.front().cloned(),
            None => None,
        }
    };
    let reply = reply.unwrap_or_else(|| Reply::raw(404, "no script for this path"));
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut response = Response::new(Body::from(reply.body));
    *response.status_mut() = StatusCode::from_u16(reply.status).unwrap();
    for (name, value) in reply.headers {
        response
            .headers_mut()
            .insert(name, HeaderValue::from_str(&value).unwrap());
    }
    response
}

// ---------------------------------------------------------------------------------------
// The exporter, in-process
// ---------------------------------------------------------------------------------------

pub struct Exporter {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    stop: tokio::sync::oneshot::Sender<()>,
    scheme: &'static str,
}

impl Exporter {
    /// Starts the exporter from a configuration file, as the binary does: secrets come from
    /// the process environment or files, and reload re-reads `path`.
    pub async fn start_from_file(path: &Path) -> Exporter {
        Self::start_from_file_with_web(path, None).await
    }

    /// Same, served through `web` (TLS, basic auth, headers) when given; a reload re-reads
    /// the web configuration too.
    pub async fn start_from_file_with_web(
        path: &Path,
        web: Option<Arc<genai_task_exporter::web::Web>>,
    ) -> Exporter {
        let settings = config::load(path, &Overrides::default(), &config::ProcessEnv)
            .expect("test config is valid");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let options = Options {
            config_path: Some(path.to_path_buf()),
            web,
            ..Options::default()
        };
        let application = Application::build_on(listener, settings, options)
            .await
            .expect("exporter starts");
        Exporter::serve(application)
    }

    /// Starts the exporter from YAML; `env` supplies the variables the YAML names.
    pub async fn start(yaml: &str, env: &[(&str, &str)], state_dir: &Path) -> Exporter {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Exporter::start_on(listener, yaml, env, state_dir).await
    }

    /// Same, on a listener bound beforehand (when others must know the address first).
    pub async fn start_on(
        listener: tokio::net::TcpListener,
        yaml: &str,
        env: &[(&str, &str)],
        state_dir: &Path,
    ) -> Exporter {
        Exporter::try_start_on(listener, yaml, env, state_dir)
            .await
            .expect("exporter starts")
    }

    /// Starts the exporter, or says why it refused to.
    pub async fn try_start(
        yaml: &str,
        env: &[(&str, &str)],
        state_dir: &Path,
    ) -> Result<Exporter, genai_task_exporter::app::StartError> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Exporter::try_start_on(listener, yaml, env, state_dir).await
    }

    async fn try_start_on(
        listener: tokio::net::TcpListener,
        yaml: &str,
        env: &[(&str, &str)],
        state_dir: &Path,
    ) -> Result<Exporter, genai_task_exporter::app::StartError> {
        let settings = settings_from_yaml(yaml, env, state_dir);
        let application = Application::build_on(listener, settings, Options::default()).await?;
        Ok(Exporter::serve(application))
    }

    /// Serves `application` in the background until [`Exporter::stop`].
    fn serve(application: Application) -> Exporter {
        let addr = application.addr();
        let app = application.app();
        let scheme = if application.is_tls() {
            "https"
        } else {
            "http"
        };
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(application.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        Exporter {
            addr,
            app,
            server,
            stop,
            scheme,
        }
    }

    /// Tracks `id` for `provider` as the registration API would: a canary whose polls show
    /// that the provider's poller keeps going round.
    pub fn track(&self, provider: &str, id: &str) {
        self.app
            .with_runtime(provider, |rt| rt.tasks.track(id, Source::Api, now_millis()))
            .expect("provider runs");
    }

    /// Stops tracking `id` (a canary no longer needed).
    pub fn untrack(&self, provider: &str, id: &str) {
        let untracked = self
            .app
            .with_runtime(provider, |rt| rt.tasks.untrack(id, now_millis()))
            .expect("provider runs");
        assert!(untracked, "{id} was tracked");
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{}", self.scheme, self.addr, path)
    }

    /// Scrapes `/metrics` over HTTP, after committing pending counts.
    pub async fn scrape(&self) -> Scrape {
        self.app.flush().await;
        let text = reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        Scrape::parse(&text)
    }

    /// Scrapes until `check` holds, or panics after `timeout` showing the last page.
    pub async fn wait_for(&self, timeout: Duration, check: impl Fn(&Scrape) -> bool) -> Scrape {
        let deadline = Instant::now() + timeout;
        loop {
            let scrape = self.scrape().await;
            if check(&scrape) {
                return scrape;
            }
            if Instant::now() > deadline {
                panic!(
                    "condition not met within {timeout:?}; last scrape:\n{}",
                    scrape.text
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops serving, stops the providers and commits what is pending, as SIGTERM does.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        match tokio::time::timeout(Duration::from_secs(20), self.server).await {
            Ok(served) => served.expect("server task").expect("server"),
            Err(_) => panic!("the exporter did not stop within 20 s"),
        }
    }
}

/// Settings from test YAML with the state in `state_dir`; `env` supplies the variables the
/// YAML names.
pub fn settings_from_yaml(
    yaml: &str,
    env: &[(&str, &str)],
    state_dir: &Path,
) -> genai_task_exporter::config::Settings {
    let yaml = format!("state:\n  path: {}\n{yaml}", state_dir.display());
    let file = config::parse(&yaml).expect("test config parses");
    let vars: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let lookup = move |name: &str| vars.get(name).cloned();
    config::resolve(file, Path::new("test.yaml"), &Overrides::default(), &lookup)
        .expect("test config is valid")
}

// ---------------------------------------------------------------------------------------
// Text exposition parsing
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
    pub types: HashMap<String, String>,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        let mut types = HashMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                types.insert(
                    parts.next().unwrap().to_string(),
                    parts.next().unwrap().to_string(),
                );
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            samples.push(parse_sample(line));
        }
        Scrape {
            text: text.to_string(),
            samples,
            types,
        }
    }

    /// The sample `name` whose labels include all of `labels`; panics if several match.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matches: Vec<&Sample> = self.matching(name, labels).collect();
        assert!(
            matches.len() <= 1,
            "{name} {labels:?} is ambiguous: {matches:?}"
        );
        matches.first().map(|s| s.value)
    }

    /// Sum of every sample `name` whose labels include all of `labels` (0 when none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        // `+ 0.0` turns the empty sum (-0.0) into 0.
        self.matching(name, labels).map(|s| s.value).sum::<f64>() + 0.0
    }

    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

fn parse_sample(line: &str) -> Sample {
    let (head, value) = line.rsplit_once(' ').expect("sample has a value");
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}")),
    };
    let (name, labels) = match head.split_once('{') {
        None => (head.to_string(), BTreeMap::new()),
        Some((name, rest)) => {
            let body = rest.strip_suffix('}').expect("closing brace");
            let mut labels = BTreeMap::new();
            let mut rest = body;
            while !rest.is_empty() {
                let (key, after) = rest.split_once("=\"").expect("label");
                let mut value = String::new();
                let mut chars = after.char_indices();
                let mut end = after.len();
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next().map(|(_, c)| c) {
                            Some('n') => value.push('\n'),
                            Some(c) => value.push(c),
                            None => {}
                        },
                        '"' => {
                            end = i + 1;
                            break;
                        }
                        c => value.push(c),
                    }
                }
                labels.insert(key.to_string(), value);
                rest = after[end..].trim_start_matches(',');
            }
            (name.to_string(), labels)
        }
    };
    Sample {
        name,
        labels,
        value,
    }
}

/// Runs `promtool check metrics` on a page; returns its complaints (empty when clean).
pub fn promtool_check_metrics(text: &str) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed by the test command (scripts/test)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && complaints.trim().is_empty() {
        String::new()
    } else {
        format!("exit {:?}: {complaints}", out.status.code())
    }
}

// ---------------------------------------------------------------------------------------
// Upstream answers
// ---------------------------------------------------------------------------------------

/// RFC 3339 time `seconds_ago` before a recent whole second (tasks older than
/// `max_task_age` are dropped, so test tasks must be recent; whole seconds keep latencies
/// exact).
pub fn ago(seconds_ago: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let t = std::time::UNIX_EPOCH + Duration::from_secs(now - seconds_ago);
    humantime::format_rfc3339_micros(t).to_string()
}

/// A maxapi get-task answer for a `nano-banana` task created 20 s ago; `reason` becomes
/// `failure_reason` when it is not null (and always for `FAILURE`).
pub fn maxapi_task(id: &str, status: &str, reason: serde_json::Value) -> serde_json::Value {
    let mut data = serde_json::json!({
        "taskId": id,
        "status": status,
        "input": {"model": "nano-banana", "prompt": "a cat"},
        "result": null,
        "created_at": ago(20),
        "updated_at": ago(2)
    });
    if !reason.is_null() || status == "FAILURE" {
        data["failure_reason"] = reason;
    }
    serde_json::json!({"code": 0, "msg": "ok", "data": data})
}

// ---------------------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------------------

/// The exporter binary built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_genai-task-exporter");

/// The exporter binary, started with `args`, its stderr collected line by line.
pub struct Binary {
    pub child: std::process::Child,
    pub logs: Arc<Mutex<Vec<String>>>,
    pub addr: SocketAddr,
}

impl Binary {
    /// Starts the binary and waits for its `listening` line (give it
    /// `--web.listen-address 127.0.0.1:0`), then for `/-/healthy` to answer.
    pub async fn start(args: &[&str]) -> Binary {
        Binary::start_with_env(args, &[]).await
    }

    /// Like [`start`](Self::start), with extra environment variables for the child.
    pub async fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Binary {
        let mut command = std::process::Command::new(BIN);
        command.args(args).envs(env.iter().copied());
        Binary::start_command(command).await
    }

    /// Starts `command`: the binary, or a wrapper (`prlimit ... --`) with the binary
    /// ([`BIN`]) among its arguments. Waits for the `listening` line as [`start`](Self::start)
    /// does.
    pub async fn start_command(mut command: std::process::Command) -> Binary {
        use std::io::BufRead;
        let mut child = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("binary starts");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let found = logs.lock().unwrap().iter().find_map(|l| {
                let rest = l.split(" address=").nth(1)?;
                l.contains("msg=listening")
                    .then(|| rest.split(' ').next()?.parse::<SocketAddr>().ok())
                    .flatten()
            });
            if let Some(addr) = found {
                break addr;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "binary exited with {status} before listening:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
            assert!(
                Instant::now() < deadline,
                "no listening line:\n{}",
                logs.lock().unwrap().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Binary { child, logs, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name}");
    }

    /// Scrapes `/metrics` over HTTP.
    pub async fn scrape(&self) -> Scrape {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        Scrape::parse(&text)
    }

    /// Scrapes until `check` holds, or panics after `timeout` showing the last page and logs.
    pub async fn wait_for(&self, timeout: Duration, check: impl Fn(&Scrape) -> bool) -> Scrape {
        let deadline = Instant::now() + timeout;
        loop {
            let scrape = self.scrape().await;
            if check(&scrape) {
                return scrape;
            }
            if Instant::now() > deadline {
                panic!(
                    "condition not met within {timeout:?}; last scrape:\n{}\nlogs:\n{}",
                    scrape.text,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        self.wait_exit(Duration::from_secs(20)).0
    }

    /// Waits up to `limit` for the exit (else kills it and panics with the logs); the status
    /// and the time it took.
    pub fn wait_exit(&mut self, limit: Duration) -> (std::process::ExitStatus, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, start.elapsed());
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                panic!("no exit within {limit:?}; logs:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Ground truth
// ---------------------------------------------------------------------------------------

/// Tasks of the truth that reached a terminal status, every provider.
pub fn terminal_total(truth: &GroundTruth) -> f64 {
    truth
        .providers
        .values()
        .map(|p| p.totals.terminal.total() as f64)
        .sum()
}

/// Scrapes (with `scrape`) until the simulator has drained and every terminal task is
/// counted, then once more after a flush: nothing may move past the truth afterwards.
/// Returns that truth and scrape; panics after `timeout`, with `detail()` in the message.
pub async fn until_drained<F: std::future::Future<Output = Scrape>>(
    sim: &genai_task_exporter::simulator::Simulator,
    timeout: Duration,
    mut scrape: impl FnMut() -> F,
    detail: impl Fn() -> String,
) -> (GroundTruth, Scrape) {
    let deadline = Instant::now() + timeout;
    loop {
        let truth = sim.truth();
        let m = scrape().await;
        let counted = m.sum("genai_task_completions_total", &[]);
        if truth.drained && counted >= terminal_total(&truth) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            return (sim.truth(), scrape().await);
        }
        assert!(
            Instant::now() < deadline,
            "not drained in {timeout:?}: simulator drained={} terminal={}, exporter counted {counted}, discovered {}{}",
            truth.drained,
            terminal_total(&truth),
            m.sum("genai_task_discovered_total", &[]),
            detail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Compares every task counter with the truth, printing the figures; returns mismatches.
pub fn compare_with_truth(truth: &GroundTruth, m: &Scrape) -> Vec<String> {
    let mut mismatches = Vec::new();
    let mut check = |what: String, expected: f64, got: f64| {
        let ok = (expected - got).abs() < 1e-9;
        println!(
            "{:<70} truth {:>8} exporter {:>8} {}",
            what,
            expected,
            got,
            if ok { "ok" } else { "MISMATCH" }
        );
        if !ok {
            mismatches.push(what);
        }
    };
    for (provider, p) in &truth.providers {
        for (model, t) in &p.models {
            let labels = |extra: (&'static str, &'static str)| {
                vec![
                    ("provider", provider.as_str()),
                    ("model", model.as_str()),
                    extra,
                ]
            };
            for status in [
                Status::Succeeded,
                Status::Failed,
                Status::TimedOut,
                Status::Cancelled,
            ] {
                let got = m.sum(
                    "genai_task_completions_total",
                    &labels(("status", status.as_str())),
                );
                check(
                    format!("{provider}/{model} completions {status}"),
                    t.terminal.get(status) as f64,
                    got,
                );
            }
            for reason in FailureReason::ALL {
                let got = m.sum(
                    "genai_task_failures_total",
                    &labels(("reason", reason.as_str())),
                );
                check(
                    format!("{provider}/{model} failures {}", reason.as_str()),
                    t.failures.get(reason) as f64,
                    got,
                );
            }
            let base = [("provider", provider.as_str()), ("model", model.as_str())];
            check(
                format!("{provider}/{model} credits used"),
                t.credits_used,
                m.sum("genai_task_credits_used_total", &base),
            );
            check(
                format!("{provider}/{model} credits refunded"),
                t.credits_refunded,
                m.sum("genai_task_credits_refunded_total", &base),
            );
            check(
                format!("{provider}/{model} latency observations"),
                t.terminal.total() as f64,
                m.sum("genai_task_completion_latency_seconds_count", &base),
            );
        }
        check(
            format!("{provider} completions, all models"),
            p.totals.terminal.total() as f64,
            m.sum(
                "genai_task_completions_total",
                &[("provider", provider.as_str())],
            ),
        );
    }
    mismatches
}

/// Appends every id the simulator creates for `provider` to `file`, as a job that submits
/// tasks would: the exporter finds them through `task_files`.
pub fn spawn_task_file_writer(
    sim: genai_task_exporter::simulator::Simulator,
    provider: genai_task_exporter::simulator::SimProvider,
    file: std::path::PathBuf,
) {
    use std::io::Write;
    tokio::spawn(async move {
        let mut after = 0;
        loop {
            let list = sim.task_ids(provider, after, 10_000);
            if !list.task_ids.is_empty() {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&file)
                    .unwrap();
                for id in &list.task_ids {
                    writeln!(f, "{id}").unwrap();
                }
                after = list.next;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}
