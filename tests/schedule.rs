//! The learned schedule survives a restart: completion times learnt from finished tasks are
//! committed to the store, and after a restart on the same store the next task of that
//! provider is scheduled by them (its first poll placed near the early quantiles, shown by
//! the task API's `next_poll_at`), not polled at once as before anything was learnt.

mod common;

use std::time::Duration;

use common::{Exporter, FakeUpstream, Reply, ago};
use serde_json::{Value, json};

const MX_KEY: &str = "mx-schedule-key-7d21";
const WAIT: Duration = Duration::from_secs(20);
const FINISHED: u64 = 24;

fn id(k: u64) -> String {
    format!("5c0f2b1e-9a4d-4e8b-8c3f-{k:012}")
}

/// A finished maxapi task that took `took` seconds (maxapi's completion time is `updated_at`).
fn finished(id: &str, took: u64) -> Value {
    json!({"code": 0, "msg": "ok", "data": {
        "taskId": id,
        "status": "SUCCESS",
        "input": {"model": "nano-banana", "prompt": "a cat"},
        "result": null,
        "created_at": ago(took + 5),
        "updated_at": ago(5)
    }})
}

fn config(base_url: &str, tasks: &[String]) -> String {
    format!(
        "polling: {{interval: 1s, max_interval: 60s, timeout: 2s, requests_per_second: 500, max_concurrency: 8}}\n\
         providers:\n  - name: mx\n    type: maxapi\n    base_url: {base_url}\n    token_env: MX_KEY\n    tasks: {tasks:?}\n"
    )
}

/// `next_poll_at - first_seen_at` of `id` in the task API, in seconds.
async fn first_poll_delay(exporter: &Exporter, id: &str) -> f64 {
    let list: Value = reqwest::get(exporter.url("/api/v1/tasks?provider=mx"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let tasks = list["tasks"].as_array().expect("a task list");
    let task = tasks
        .iter()
        .find(|t| t["id"] == id)
        .unwrap_or_else(|| panic!("{id} tracked: {tasks:?}"));
    let time = |field: &str| {
        let text = task[field]
            .as_str()
            .unwrap_or_else(|| panic!("{field}: {task}"));
        humantime::parse_rfc3339(text).unwrap()
    };
    time("next_poll_at")
        .duration_since(time("first_seen_at"))
        .unwrap_or_default()
        .as_secs_f64()
}

/// Starts the exporter on `state`, once the stopped one's last tasks have let the store go.
async fn restart(yaml: &str, env: &[(&str, &str)], state: &std::path::Path) -> Exporter {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match Exporter::try_start(yaml, env, state).await {
            Ok(exporter) => return exporter,
            Err(e) if e.to_string().contains("already open") => {
                assert!(std::time::Instant::now() < deadline, "{e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("restart: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_learned_schedule_survives_a_restart() {
    let fake = FakeUpstream::start().await;
    // Tasks that took 20 to 43 s: the quantiles a new task's first poll is placed by.
    let ids: Vec<String> = (0..FINISHED).map(id).collect();
    for (k, id) in ids.iter().enumerate() {
        let reply = Reply::json(200, finished(id, 20 + k as u64));
        fake.script(&format!("/api/v1/task/{id}"), vec![reply]);
    }
    let running = json!({"code": 0, "msg": "ok", "data": {
        "taskId": "x", "status": "PROCESSING", "input": {"model": "nano-banana"},
        "created_at": ago(0), "updated_at": ago(0)
    }});
    for k in [100, 101] {
        fake.script(
            &format!("/api/v1/task/{}", id(k)),
            vec![Reply::json(200, running.clone())],
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let yaml = config(&fake.url(), &ids);
    let env = [("MX_KEY", MX_KEY)];

    let exporter = Exporter::start(&yaml, &env, dir.path()).await;
    exporter
        .wait_for(WAIT, |m| {
            m.sum("genai_task_completions_total", &[]) == FINISHED as f64
        })
        .await;
    // Before anything was learnt a new task is polled at once; every one was.
    for id in &ids {
        assert_eq!(fake.hits(&format!("/api/v1/task/{id}")).len(), 1, "{id}");
    }
    exporter.stop().await;

    let exporter = restart(&yaml, &env, dir.path()).await;
    let learnt = id(100);
    exporter.track("mx", &learnt);
    let delay = first_poll_delay(&exporter, &learnt).await;
    // p20 of 20-43 s is about 25 s (buckets are 10 % wide).
    assert!((22.0..=29.0).contains(&delay), "first poll after {delay} s");
    assert!(fake.hits(&format!("/api/v1/task/{learnt}")).is_empty());
    exporter.stop().await;

    // The same restart on a new store has nothing learnt: the next task is polled at once.
    let fresh = tempfile::tempdir().unwrap();
    let exporter = Exporter::start(&config(&fake.url(), &[]), &env, fresh.path()).await;
    let unlearnt = id(101);
    exporter.track("mx", &unlearnt);
    fake.wait_for_more_hits(&format!("/api/v1/task/{unlearnt}"), 1, WAIT)
        .await;
    exporter.stop().await;
}
