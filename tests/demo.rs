//! `demo` and `simulate`, as a user runs them: the real binary, its printed URLs.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::demo::Demo;
use common::{Scrape, promtool_check_metrics};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary with `args` and returns the URL printed after `marker`.
fn start(args: &[&str], marker: &str) -> (Running, String) {
    genai_task_exporter::upstream::install_crypto_provider(); // for this test's own client
    let mut child = Command::new(env!("CARGO_BIN_EXE_genai-task-exporter"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.split_once(marker).map(|(_, r)| r) {
            let url = rest
                .split_whitespace()
                .find(|w| w.starts_with("http://"))
                .unwrap()
                .to_string();
            return (running, url);
        }
    }
    panic!("no {marker:?} line printed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_clean_metrics_with_every_provider_up_within_10_seconds() {
    genai_task_exporter::upstream::install_crypto_provider(); // for this test's own client
    let started = Instant::now();
    let demo = Demo::start();
    let url = demo.metrics_url.clone();
    let m = loop {
        if let Ok(r) = reqwest::get(&url).await {
            let m = Scrape::parse(&r.text().await.unwrap());
            let up = |p| m.get("genai_exporter_provider_up", &[("provider", p)]) == Some(1.0);
            let counting =
                m.sum("genai_tasks", &[]) > 0.0 && m.sum("genai_task_discovered_total", &[]) > 0.0;
            if up("maxapi") && up("apimall") && counting {
                break m;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "demo not serving with both providers up within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("demo ready in {:?}", started.elapsed());
    assert_eq!(promtool_check_metrics(&m.text), "");
    let landing = reqwest::get(&demo.landing_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        landing.contains("data-provider=\"maxapi\"")
            && landing.contains("data-provider=\"apimall\"")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_serves_both_providers_and_its_ground_truth() {
    let (_sim, base) = start(
        &["simulate", "--listen", "127.0.0.1:0"],
        "simulated providers on",
    );
    let truth: serde_json::Value = serde_json::from_str(
        &reqwest::get(format!("{base}/_sim/truth"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(truth["providers"]["maxapi"].is_object() && truth["providers"]["apimall"].is_object());
    let refused = reqwest::get(format!("{base}/api/v1/account/balances"))
        .await
        .unwrap();
    assert_eq!(
        refused.status(),
        401,
        "the simulator checks keys like the real gateway"
    );
}
