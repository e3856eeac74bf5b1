//! Replicas behind one Service: a task submitted through the proxy of a replica that does not
//! own it reaches its owner, and with HA copies every copy learns it
//! (`sharding.peer_url_template`, through the registration API). Real exporters on
//! 127.0.0.1, a scripted provider, an application client.

mod common;

use std::time::{Duration, Instant};

use common::{Exporter, FakeUpstream, Reply};
use genai_task_exporter::shard::shard_of;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);
const ENV: [(&str, &str); 2] = [
    ("FORWARD_TEST_API_TOKEN", "cluster-api-token-9c2e"),
    ("FORWARD_TEST_MAXAPI_KEY", "exporter-key-4d1a"),
];

/// A task id that shard `index` of `count` owns.
fn id_owned_by(index: u32, count: u32) -> String {
    (0u32..)
        .map(|n| format!("9db7d1ed-d1e5-4d11-9f3a-{n:012x}"))
        .find(|id| shard_of("maxapi", id, count) == index)
        .expect("some id hashes to every shard")
}

fn yaml(upstream: &str, index: u32, count: u32, template: Option<String>) -> String {
    let template = template
        .map(|t| format!("  peer_url_template: \"{t}\"\n"))
        .unwrap_or_default();
    format!(
        "server:\n  api_token_env: FORWARD_TEST_API_TOKEN\n\
         sharding:\n  index: {index}\n  count: {count}\n{template}\
         providers:\n\
         \x20 - name: maxapi\n\
         \x20   type: maxapi\n\
         \x20   base_url: {upstream}\n\
         \x20   token_env: FORWARD_TEST_MAXAPI_KEY\n\
         \x20   polling: {{interval: 1h, max_interval: 1h}}\n\
         \x20   proxy: {{enabled: true}}\n"
    )
}

/// The ids `exporter` tracks for maxapi, from its task API.
async fn tracked(client: &reqwest::Client, exporter: &Exporter) -> Vec<String> {
    let answer: serde_json::Value = client
        .get(exporter.url("/api/v1/tasks?provider=maxapi&limit=1000"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let tasks = answer
        .as_array()
        .or_else(|| answer["tasks"].as_array())
        .unwrap_or_else(|| panic!("task list: {answer}"));
    tasks
        .iter()
        .map(|t| t["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Waits until `exporter` tracks `id`.
async fn until_tracked(client: &reqwest::Client, exporter: &Exporter, id: &str) {
    let deadline = Instant::now() + WAIT;
    while !tracked(client, exporter).await.iter().any(|t| t == id) {
        assert!(
            Instant::now() < deadline,
            "{id} never reached {}",
            exporter.addr
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `exporter` shows `value` for `genai_proxy_forwarded_total{outcome}`.
async fn until_forwarded(exporter: &Exporter, outcome: &str, value: f64) {
    let labels = [("provider", "maxapi"), ("outcome", outcome)];
    exporter
        .wait_for(WAIT, |s| {
            s.sum("genai_proxy_forwarded_total", &labels) == value
        })
        .await;
}

/// The application submits through `exporter`'s proxy; the answer is the provider's.
async fn submit_through(client: &reqwest::Client, exporter: &Exporter, upstream_answer: &str) {
    let answer = client
        .post(exporter.url("/proxy/maxapi/api/v1/task/submit"))
        .header("authorization", "Bearer application-key-77")
        .json(&json!({"model": "nano-banana", "prompt": "a lighthouse"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.text().await.unwrap(), upstream_answer);
}

/// The provider, answering every submission with task `id`.
async fn upstream_accepting(id: &str) -> FakeUpstream {
    genai_task_exporter::upstream::install_crypto_provider();
    let upstream = FakeUpstream::start().await;
    upstream.script(
        "/api/v1/task/submit",
        vec![Reply::json(200, submit_answer(id))],
    );
    upstream
}

fn submit_answer(id: &str) -> serde_json::Value {
    json!({"code": 0, "msg": "ok", "data": {"taskId": id}})
}

/// Two replicas of `count` shards: `receiver` (shard `receiver_shard`, started with
/// `receiver_env`) listening on a port chosen here, and `entry` (shard `entry_shard`), the
/// one the application talks to, whose `peer_url_template` is `template` with `{port}`
/// replaced by the receiver's port.
struct Replicas {
    receiver: Exporter,
    entry: Exporter,
    _dirs: [tempfile::TempDir; 2],
}

impl Replicas {
    async fn start(
        upstream: &str,
        count: u32,
        (receiver_shard, receiver_env): (u32, &[(&str, &str)]),
        (entry_shard, template): (u32, &str),
    ) -> Replicas {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let receiver = Exporter::start_on(
            listener,
            &yaml(upstream, receiver_shard, count, None),
            receiver_env,
            dirs[0].path(),
        )
        .await;
        let template = template.replace("{port}", &port.to_string());
        let entry = Exporter::start(
            &yaml(upstream, entry_shard, count, Some(template)),
            &ENV,
            dirs[1].path(),
        )
        .await;
        Replicas {
            receiver,
            entry,
            _dirs: dirs,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_submitted_through_a_replica_that_does_not_own_it_reaches_its_owner() {
    let id = id_owned_by(1, 2);
    let upstream = upstream_accepting(&id).await;
    let client = reqwest::Client::new();

    // Shard 1 owns the id; shard 0 takes the application's request. The template sends
    // shard 1's share to 127.0.0.1 (shard 0's address, 127.0.0.0, is never used here).
    let Replicas {
        receiver: owner,
        entry,
        _dirs,
    } = Replicas::start(
        &upstream.url(),
        2,
        (1, &ENV),
        (0, "http://127.0.0.{index}:{port}"),
    )
    .await;
    submit_through(&client, &entry, &submit_answer(&id).to_string()).await;

    until_tracked(&client, &owner, &id).await;
    until_forwarded(&entry, "delivered", 1.0).await;
    assert!(
        !tracked(&client, &entry).await.contains(&id),
        "the entry replica must not track an id it does not own"
    );
    let owner_scrape = owner.scrape().await;
    assert_eq!(
        owner_scrape.sum(
            "genai_task_discovered_total",
            &[("provider", "maxapi"), ("source", "api")]
        ),
        1.0
    );
    let entry_scrape = entry.scrape().await;
    for outcome in ["rejected", "failed", "dropped"] {
        assert_eq!(
            entry_scrape.sum(
                "genai_proxy_forwarded_total",
                &[("provider", "maxapi"), ("outcome", outcome)]
            ),
            0.0,
            "{outcome}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_ha_copies_the_copy_that_did_not_see_the_submission_learns_it() {
    let id = id_owned_by(0, 1);
    let upstream = upstream_accepting(&id).await;
    let client = reqwest::Client::new();

    // Two copies of one shard; the template names the other copy (in a cluster: a headless
    // Service resolving to every copy, this replica skipping itself).
    let Replicas {
        receiver: other,
        entry,
        _dirs,
    } = Replicas::start(
        &upstream.url(),
        1,
        (0, &ENV),
        (0, "http://127.0.0.1:{port}"),
    )
    .await;
    submit_through(&client, &entry, &submit_answer(&id).to_string()).await;

    until_tracked(&client, &entry, &id).await;
    until_tracked(&client, &other, &id).await;
    until_forwarded(&entry, "delivered", 1.0).await;
    let entry_scrape = entry.scrape().await;
    assert_eq!(
        entry_scrape.sum(
            "genai_task_discovered_total",
            &[("provider", "maxapi"), ("source", "proxy")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_token_is_counted_as_rejected_and_not_retried() {
    let id = id_owned_by(1, 2);
    let upstream = upstream_accepting(&id).await;
    let client = reqwest::Client::new();

    let other_token = [("FORWARD_TEST_API_TOKEN", "another-token"), ENV[1]];
    let Replicas {
        receiver: owner,
        entry,
        _dirs,
    } = Replicas::start(
        &upstream.url(),
        2,
        (1, &other_token),
        (0, "http://127.0.0.{index}:{port}"),
    )
    .await;
    submit_through(&client, &entry, &submit_answer(&id).to_string()).await;

    until_forwarded(&entry, "rejected", 1.0).await;
    assert!(!tracked(&client, &owner).await.contains(&id));
    let entry_scrape = entry.scrape().await;
    assert_eq!(
        entry_scrape.sum("genai_proxy_forwarded_total", &[("provider", "maxapi")]),
        1.0
    );
}
