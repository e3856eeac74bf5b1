//! Configuration reload (`POST /-/reload`, SIGHUP) over real listeners: providers added and
//! removed, bad files refused while the running configuration keeps working, secrets
//! re-read, and the reload metrics.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Binary, Exporter, FakeUpstream, Scrape, maxapi_task};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(15);
const API_TOKEN: &str = "reload-api-token-4b1d";

/// A tempdir with the API token and one key file per provider name.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        let files = Files {
            dir: tempfile::tempdir().unwrap(),
        };
        files.write("api-token", API_TOKEN);
        files
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) {
        // Write then rename, so a reader never sees half a file.
        let tmp = self.path(&format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.path(name)).unwrap();
    }

    fn config(&self) -> PathBuf {
        self.path("config.yaml")
    }
}

/// The block of provider `one` on `base_url`, tracking `task`, its key file written.
fn provider_one(files: &Files, base_url: &str, task: &str) -> String {
    files.write("one.key", "key-one");
    provider("one", base_url, &files.path("one.key"), &[task])
}

/// Writes `config.yaml` with provider `one` alone (see [`provider_one`]); returns its text.
fn write_config_of_one(files: &Files, base_url: &str, task: &str) -> String {
    let one = provider_one(files, base_url, task);
    let yaml = config_yaml(files, &[one]);
    files.write("config.yaml", &yaml);
    yaml
}

/// One maxapi provider block.
fn provider(name: &str, base_url: &str, key_file: &Path, tasks: &[&str]) -> String {
    format!(
        "  - name: {name}\n    type: maxapi\n    base_url: {base_url}\n    token_file: {}\n    tasks: {tasks:?}\n",
        key_file.display()
    )
}

fn config_yaml(files: &Files, providers: &[String]) -> String {
    format!(
        "server:\n  api_token_file: {}\nstate:\n  path: {}\n\
         polling: {{interval: 100ms, max_interval: 200ms, timeout: 2s, requests_per_second: 200}}\n\
         providers:\n{}",
        files.path("api-token").display(),
        files.path("state").display(),
        if providers.is_empty() {
            "  []\n".to_string()
        } else {
            providers.concat()
        }
    )
}

async fn post_reload(url: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(url)
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

fn reload_gauges(m: &Scrape) -> (f64, f64) {
    (
        m.get("genai_exporter_config_last_reload_successful", &[])
            .unwrap(),
        m.get(
            "genai_exporter_config_last_reload_success_timestamp_seconds",
            &[],
        )
        .unwrap(),
    )
}

async fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_providers_and_keeps_counters() {
    let fake = FakeUpstream::start().await;
    fake.script_maxapi_task("t-one", "SUCCESS");
    fake.script_maxapi_task("t-two", "SUCCESS");
    fake.script_maxapi_task("t-two-pending", "PENDING");
    let files = Files::new();
    files.write("two.key", "key-two");
    let one = provider_one(&files, &fake.url(), "t-one");
    let two = provider(
        "two",
        &fake.url(),
        &files.path("two.key"),
        &["t-two", "t-two-pending"],
    );
    files.write(
        "config.yaml",
        &config_yaml(&files, std::slice::from_ref(&one)),
    );
    let exporter = Exporter::start_from_file(&files.config()).await;

    let completions =
        |m: &Scrape, p: &str| m.sum("genai_task_completions_total", &[("provider", p)]);
    let m = exporter
        .wait_for(WAIT, |m| completions(m, "one") == 1.0)
        .await;
    assert_eq!(
        m.get("genai_exporter_provider_up", &[("provider", "two")]),
        None
    );
    let (ok, started_at) = reload_gauges(&m);
    assert_eq!(ok, 1.0);
    assert!(fake.hits("/api/v1/task/t-two").is_empty());

    // Add provider "two": it starts polling, "one" keeps its counters.
    files.write(
        "config.yaml",
        &config_yaml(&files, &[one.clone(), two.clone()]),
    );
    let (status, body) = post_reload(&exporter.url("/-/reload")).await;
    assert_eq!((status, body.as_str()), (200, "configuration reloaded\n"));
    let m = exporter
        .wait_for(WAIT, |m| completions(m, "two") == 1.0)
        .await;
    assert!(!fake.hits("/api/v1/task/t-two").is_empty());
    assert_eq!(
        completions(&m, "one"),
        1.0,
        "counters of the unchanged provider stay"
    );
    assert_eq!(
        m.get("genai_exporter_provider_up", &[("provider", "two")]),
        Some(1.0)
    );
    let (ok, reloaded_at) = reload_gauges(&m);
    assert_eq!(ok, 1.0);
    assert!(reloaded_at >= started_at);

    // Remove provider "one": its series leave the page, "two" goes on.
    files.write(
        "config.yaml",
        &config_yaml(&files, std::slice::from_ref(&two)),
    );
    let (status, _) = post_reload(&exporter.url("/-/reload")).await;
    assert_eq!(status, 200);
    let m = exporter.scrape().await;
    let leftovers: Vec<_> = m
        .samples
        .iter()
        .filter(|s| s.labels.get("provider").map(String::as_str) == Some("one"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "series of a removed provider: {leftovers:?}"
    );
    assert_eq!(completions(&m, "two"), 1.0);
    let tasks: Value = serde_json::from_str(
        &reqwest::get(exporter.url("/api/v1/tasks?provider=one"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(tasks["tasks"], json!([]));
    // The removed provider's poller stopped: no more requests for its task.
    let settled = fake.hits("/api/v1/task/t-one").len();
    let pending_before = fake.hits("/api/v1/task/t-two-pending").len();
    wait_until("two more polls of the remaining provider", WAIT, || {
        fake.hits("/api/v1/task/t-two-pending").len() >= pending_before + 2
    })
    .await;
    assert_eq!(fake.hits("/api/v1/task/t-one").len(), settled);
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_file_is_refused_and_the_running_configuration_stays() {
    let fake = FakeUpstream::start().await;
    fake.script_maxapi_task("t-slow", "PROCESSING");
    let files = Files::new();
    let good = write_config_of_one(&files, &fake.url(), "t-slow");
    let exporter = Exporter::start_from_file(&files.config()).await;
    let (_, started_at) = reload_gauges(&exporter.scrape().await);

    // A typo: unknown key. The answer names the file and the key.
    files.write(
        "config.yaml",
        &good.replace("polling: {interval:", "polling: {intervall:"),
    );
    let (status, body) = post_reload(&exporter.url("/-/reload")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("config.yaml"), "{body}");
    assert!(body.contains("intervall"), "{body}");
    let m = exporter.scrape().await;
    assert_eq!(reload_gauges(&m), (0.0, started_at));

    // A value problem: also refused, with its key path.
    files.write(
        "config.yaml",
        &good.replace("requests_per_second: 200", "requests_per_second: 0"),
    );
    let (status, body) = post_reload(&exporter.url("/-/reload")).await;
    assert_eq!(status, 400);
    assert!(body.contains("polling.requests_per_second"), "{body}");

    // The old configuration still polls.
    let before = fake.hits("/api/v1/task/t-slow").len();
    wait_until("polls after the bad reload", WAIT, || {
        fake.hits("/api/v1/task/t-slow").len() >= before + 2
    })
    .await;
    assert_eq!(
        reload_gauges(&exporter.scrape().await),
        (0.0, started_at),
        "the success timestamp moves only on success"
    );

    // A good file again.
    tokio::time::sleep(Duration::from_millis(20)).await; // a later timestamp than the start
    files.write("config.yaml", &good);
    let (status, _) = post_reload(&exporter.url("/-/reload")).await;
    assert_eq!(status, 200);
    let (ok, at) = reload_gauges(&exporter.scrape().await);
    assert_eq!(ok, 1.0);
    assert!(at > started_at, "{at} > {started_at}");

    // Reload needs the bearer token.
    let response = reqwest::Client::new()
        .post(exporter.url("/-/reload"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_re_reads_token_files() {
    let fake = FakeUpstream::start().await;
    fake.script_maxapi_task("t-long", "PROCESSING");
    let files = Files::new();
    files.write("one.key", "key-before-rotation");
    let one = provider("one", &fake.url(), &files.path("one.key"), &["t-long"]);
    files.write("config.yaml", &config_yaml(&files, &[one]));
    let exporter = Exporter::start_from_file(&files.config()).await;
    let seen = |key: &str| {
        let wanted = format!("Bearer {key}");
        fake.authorizations()
            .iter()
            .any(|a| a.as_deref() == Some(wanted.as_str()))
    };
    wait_until("the first key upstream", WAIT, || {
        seen("key-before-rotation")
    })
    .await;

    files.write("one.key", "key-after-rotation\n");
    let (status, _) = post_reload(&exporter.url("/-/reload")).await;
    assert_eq!(status, 200);
    let cutoff = fake.authorizations().len();
    wait_until("the new key upstream", WAIT, || seen("key-after-rotation")).await;
    // Once the new key is in use the old one is not sent again.
    let newest = fake.authorizations().len();
    wait_until("more polls", WAIT, || {
        fake.authorizations().len() >= newest + 2
    })
    .await;
    let late: Vec<_> = fake.authorizations()[cutoff..].to_vec();
    let first_new = late
        .iter()
        .position(|a| a.as_deref() == Some("Bearer key-after-rotation"))
        .unwrap();
    assert!(
        late[first_new..]
            .iter()
            .all(|a| a.as_deref() == Some("Bearer key-after-rotation")),
        "{late:?}"
    );

    // The API token file is re-read too: the old token stops working.
    files.write("api-token", "rotated-api-token");
    let (status, _) = post_reload(&exporter.url("/-/reload")).await;
    assert_eq!(
        status, 200,
        "the old token still authorizes the reload itself"
    );
    let (status, _) = post_reload(&exporter.url("/-/reload")).await;
    assert_eq!(status, 401, "the old token is refused after the reload");
    let response = reqwest::Client::new()
        .post(exporter.url("/-/reload"))
        .bearer_auth("rotated-api-token")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_real_binary() {
    let fake = FakeUpstream::start().await;
    fake.script_maxapi_task("t-one", "SUCCESS");
    fake.script_maxapi_task("t-two", "SUCCESS");
    let files = Files::new();
    files.write("two.key", "key-two");
    let one = provider_one(&files, &fake.url(), "t-one");
    let two = provider("two", &fake.url(), &files.path("two.key"), &["t-two"]);
    files.write(
        "config.yaml",
        &config_yaml(&files, std::slice::from_ref(&one)),
    );
    let config = files.config();
    let binary = Binary::start(&[
        "--config.file",
        config.to_str().unwrap(),
        "--web.listen-address",
        "127.0.0.1:0",
    ])
    .await;
    let m = binary
        .wait_for(WAIT, |m| {
            m.sum("genai_task_completions_total", &[("provider", "one")]) == 1.0
        })
        .await;
    let (_, started_at) = reload_gauges(&m);

    // A bad file on SIGHUP: gauge 0, the process keeps running.
    files.write("config.yaml", "providers: [{name: x, type: nosuchtype}]\n");
    binary.signal("HUP");
    binary.wait_for(WAIT, |m| reload_gauges(m).0 == 0.0).await;
    assert!(
        binary.logs().contains("configuration reload failed"),
        "{}",
        binary.logs()
    );

    // A good one: provider "two" starts.
    tokio::time::sleep(Duration::from_millis(20)).await; // a later timestamp than the start
    files.write("config.yaml", &config_yaml(&files, &[one, two]));
    binary.signal("HUP");
    let m = binary
        .wait_for(WAIT, |m| {
            m.sum("genai_task_completions_total", &[("provider", "two")]) == 1.0
        })
        .await;
    let (ok, at) = reload_gauges(&m);
    assert_eq!(ok, 1.0);
    assert!(at > started_at);
    assert_eq!(
        m.sum("genai_task_completions_total", &[("provider", "one")]),
        1.0
    );
    let status = binary.stop();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
}

/// Values that would panic a conversion later (a rate whose request interval overflows, a
/// duration whose milliseconds overflow) are refused by `check-config` and by a reload, and
/// the running configuration goes on polling and answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_values_are_refused_and_polling_goes_on() {
    let fake = FakeUpstream::start().await;
    fake.script_maxapi_task("t-slow", "PROCESSING");
    let files = Files::new();
    let good = write_config_of_one(&files, &fake.url(), "t-slow");
    let exporter = Exporter::start_from_file(&files.config()).await;
    let requests = |m: &Scrape| m.sum("genai_upstream_requests_total", &[("provider", "one")]);
    exporter.wait_for(WAIT, |m| requests(m) >= 1.0).await;
    let (_, started_at) = reload_gauges(&exporter.scrape().await);

    let bad_files = [
        (
            good.replace("requests_per_second: 200", "requests_per_second: 1e-20"),
            "polling.requests_per_second",
        ),
        (
            good.replace("timeout: 2s", "timeout: 2s, max_task_age: 500000000y"),
            "polling.max_task_age",
        ),
        (
            good.replace("interval: 100ms,", "interval: 0s,"),
            "polling.interval",
        ),
        (
            good.replace("requests_per_second: 200", "requests_per_second: .nan"),
            "polling.requests_per_second",
        ),
    ];
    for (bad, key) in bad_files {
        files.write("config.yaml", &bad);
        // check-config, the real binary: exit 1, the key path named.
        let check = std::process::Command::new(env!("CARGO_BIN_EXE_genai-task-exporter"))
            .args(["check-config", "--config.file"])
            .arg(files.config())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&check.stderr).to_string()
            + &String::from_utf8_lossy(&check.stdout);
        assert_eq!(check.status.code(), Some(1), "{key}: {said}");
        assert!(said.contains(key), "{key}: {said}");

        // The reload is refused; the gauge says so.
        let (status, body) = post_reload(&exporter.url("/-/reload")).await;
        assert_eq!(status, 400, "{key}: {body}");
        assert!(body.contains(key), "{body}");
        let m = exporter.scrape().await;
        assert_eq!(reload_gauges(&m), (0.0, started_at), "{key}");

        // Polling goes on at the old rate, and the pages keep answering.
        let before = requests(&m);
        exporter
            .wait_for(WAIT, |m| requests(m) >= before + 2.0)
            .await;
        for path in ["/-/ready", "/", "/-/healthy"] {
            let response = reqwest::get(exporter.url(path)).await.unwrap();
            assert_eq!(response.status(), 200, "{path} after the {key} reload");
        }
    }

    // A key file that is a FIFO with no writer, or /dev/zero: refused at once, by name.
    let fifo = files.path("key-fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    for (key_file, kind) in [
        (fifo, "is a FIFO, not a regular file"),
        (
            PathBuf::from("/dev/zero"),
            "is a character device, not a regular file",
        ),
    ] {
        let wrong_key = provider("one", &fake.url(), &key_file, &["t-slow"]);
        files.write("config.yaml", &config_yaml(&files, &[wrong_key]));
        let (status, body) = tokio::time::timeout(WAIT, post_reload(&exporter.url("/-/reload")))
            .await
            .expect("the reload answers instead of waiting on the file");
        assert_eq!(status, 400, "{body}");
        assert!(
            body.contains(&format!(
                "providers[0].token_file: {} {kind}",
                key_file.display()
            )),
            "{body}"
        );
    }
    let before = requests(&exporter.scrape().await);
    exporter
        .wait_for(WAIT, |m| requests(m) >= before + 2.0)
        .await;
    exporter.stop().await;
}

/// Whether process `pid` has a handler for SIGHUP (bit 0 of `SigCgt` in /proc).
fn catches_sighup(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & 1 == 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_during_start_up_does_not_kill_the_binary() {
    use std::io::BufRead;
    genai_task_exporter::upstream::install_crypto_provider();
    let fake = FakeUpstream::start().await;
    fake.script_maxapi_task("t-one", "SUCCESS");
    let files = Files::new();
    let one = provider_one(&files, &fake.url(), "t-one");
    files.write("config.yaml", &config_yaml(&files, &[one]));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_genai-task-exporter"))
        .args([
            "--config.file",
            files.config().to_str().unwrap(),
            "--web.listen-address",
            "127.0.0.1:0",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let logs = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = logs.clone();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let mut logs = sink.lock().unwrap();
            logs.push_str(&line);
            logs.push('\n');
        }
    });
    // The first moment the process can take a signal at all (the loader and the handler
    // installation cannot be raced from outside): then SIGHUP, several times, while it
    // opens its store and starts its providers.
    let deadline = Instant::now() + WAIT;
    while !catches_sighup(pid) {
        assert!(child.try_wait().unwrap().is_none(), "exited early");
        assert!(Instant::now() < deadline, "no SIGHUP handler");
        std::thread::sleep(Duration::from_micros(200));
    }
    let kill_hup = || {
        std::process::Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap()
    };
    for _ in 0..5 {
        assert!(kill_hup().success());
    }
    println!(
        "SIGHUP sent {} the listening line was read",
        if logs.lock().unwrap().contains("msg=listening") {
            "after"
        } else {
            "before"
        }
    );
    // Still running, and serving: the provider's task is counted.
    let addr = loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the binary died after SIGHUP during start-up:\n{}",
            logs.lock().unwrap()
        );
        let found = logs.lock().unwrap().lines().find_map(|l| {
            let rest = l.split(" address=").nth(1)?;
            l.contains("msg=listening")
                .then(|| rest.split(' ').next()?.parse::<std::net::SocketAddr>().ok())
                .flatten()
        });
        if let Some(addr) = found {
            break addr;
        }
        assert!(Instant::now() < deadline, "no listening line");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    loop {
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if Scrape::parse(&text).sum("genai_task_completions_total", &[("provider", "one")]) == 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "task not counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The pending SIGHUP is taken as a reload once serving.
    wait_until("the SIGHUP reload", WAIT, || {
        logs.lock()
            .unwrap()
            .contains("SIGHUP: reloading configuration")
    })
    .await;
    assert!(child.try_wait().unwrap().is_none());
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline + WAIT, "no exit on SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "clean exit on SIGTERM: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_panics_leaves_every_endpoint_answering() {
    let fake = FakeUpstream::start().await;
    fake.script_maxapi_task("t-run", "PROCESSING");
    let files = Files::new();
    let good = write_config_of_one(&files, &fake.url(), "t-run");
    let exporter = Exporter::start_from_file(&files.config()).await;
    fake.wait_for_more_hits("/api/v1/task/t-run", 1, WAIT).await;

    // A rate no timer can represent: starting the provider with it panics while the
    // runtimes are locked (unless validation refuses it first: then it is a 400).
    files.write(
        "config.yaml",
        &good.replace("requests_per_second: 200", "requests_per_second: 1e-20"),
    );
    let answer = reqwest::Client::new()
        .post(exporter.url("/-/reload"))
        .bearer_auth(API_TOKEN)
        .send()
        .await;
    if let Ok(response) = answer {
        assert_ne!(response.status(), 200, "an unusable rate is not accepted");
    }

    // Everything still answers.
    for path in ["/", "/-/healthy", "/-/ready", "/api/v1/tasks"] {
        let response = reqwest::Client::new()
            .get(exporter.url(path))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    let webhook = reqwest::Client::new()
        .post(exporter.url("/webhooks/one?token=wrong"))
        .json(&maxapi_task("t-run", "SUCCESS", Value::Null))
        .send()
        .await
        .unwrap();
    assert!(webhook.status().is_client_error(), "{}", webhook.status());

    // A good file again: accepted, and the provider polls again.
    files.write("config.yaml", &good);
    let (status, body) = post_reload(&exporter.url("/-/reload")).await;
    assert_eq!(status, 200, "{body}");
    fake.wait_for_more_hits("/api/v1/task/t-run", 2, WAIT).await;
    assert_eq!(reload_gauges(&exporter.scrape().await).0, 1.0);
    exporter.stop().await;
}
