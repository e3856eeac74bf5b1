//! Hands task ids seen through the proxy to the replicas that must track them
//! (`sharding.peer_url_template`).
//!
//! Behind one Service, each replica sees only part of the application's traffic. An id a
//! replica does not own must reach its owner shard, and with HA copies every copy of that
//! shard must learn it. [`Forwarder::forward_to_owner`] queues the id (never blocking the
//! proxy); a worker batches queued ids per provider and owner, resolves the owner's address
//! from the template (every address the host name resolves to: one per HA copy behind a
//! headless Service) and registers the batch at each through `POST /api/v1/tasks` with the
//! shared API token. Refused for a while (5xx, 429, no connection): retried with doubling
//! back-off, a bounded number of times. Every id is counted once per receiving replica in
//! `genai_proxy_forwarded_total{provider,outcome}`: `delivered`, `rejected` (the peer
//! refused it: invalid, or owned by another shard), `failed` (retries exhausted) or
//! `dropped` (queue full).

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};

use crate::config::Shard;
use crate::logging::LogGate;
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::shard::shard_of;

/// Ids waiting for delivery; past this, new ids are dropped and counted.
pub const QUEUE_CAPACITY: usize = 10_000;
/// Ids queued once are not queued again (the application polls a task many times) until
/// this many have been remembered; then the memory starts over.
const RECENT_CAPACITY: usize = 50_000;
/// Ids per registration call (the API takes up to 10,000).
const MAX_BATCH: usize = 1_000;
/// Deliveries in flight at once, each to one peer address.
const MAX_DELIVERIES: usize = 16;
/// Attempts per delivery, the first included: with the back-off below, about a minute.
pub const MAX_ATTEMPTS: u32 = 7;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// `sharding.peer_url_template`, checked: an http(s) base URL once `{index}` is replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTemplate(String);

impl PeerTemplate {
    /// Checks `template` for `count` shards. `{index}` is required with more than one shard
    /// (each shard has its own address); without sharding it may name every replica at once.
    pub fn parse(template: &str, count: u32) -> Result<PeerTemplate, String> {
        if count > 1 && !template.contains("{index}") {
            return Err(format!(
                "must contain {{index}} with {count} shards, so that each shard has its own address"
            ));
        }
        let sample = reqwest::Url::parse(&template.replace("{index}", "0"))
            .map_err(|e| format!("is not a URL once {{index}} is replaced: {e}"))?;
        if !matches!(sample.scheme(), "http" | "https") || sample.host_str().is_none() {
            return Err("must be an http or https URL with a host".into());
        }
        if !sample.username().is_empty() || sample.password().is_some() {
            return Err(
                "must not carry credentials (the API token is sent as a bearer token)".into(),
            );
        }
        if sample.query().is_some() || sample.fragment().is_some() {
            return Err("must not have a query or fragment".into());
        }
        Ok(PeerTemplate(template.trim_end_matches('/').to_string()))
    }

    /// The registration API URL of shard `index`.
    pub fn registration_url(&self, index: u32) -> String {
        format!(
            "{}/api/v1/tasks",
            self.0.replace("{index}", &index.to_string())
        )
    }
}

/// Outcome label values of `genai_proxy_forwarded_total`.
const DELIVERED: &str = "delivered";
const REJECTED: &str = "rejected";
const FAILED: &str = "failed";
const DROPPED: &str = "dropped";

struct Queued {
    provider: String,
    task_id: String,
}

/// The forwarding queue and its worker (started by [`Forwarder::start`]).
pub struct Forwarder {
    queue: mpsc::Sender<Queued>,
    shard: Shard,
    metrics: Arc<Metrics>,
    drops_log: LogGate,
    /// `provider \0 task_id` of ids queued lately.
    recent: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

/// What a delivery needs, shared by every delivery task.
struct Peers {
    template: PeerTemplate,
    shard: Shard,
    /// This replica's listen port: an address of its own shard that is local with this port
    /// is this replica, which already tracks the id.
    own_port: u16,
    token: Secret,
    metrics: Arc<Metrics>,
    permits: Arc<Semaphore>,
    failures_log: LogGate,
    /// Back-off between attempts; shortened by tests.
    first_backoff: Duration,
}

impl Forwarder {
    /// Starts the worker on the current tokio runtime. `listen` is this replica's listener
    /// address; `token` the API token every replica shares.
    pub fn start(
        template: PeerTemplate,
        shard: Shard,
        listen: SocketAddr,
        token: Secret,
        metrics: Arc<Metrics>,
    ) -> Arc<Forwarder> {
        Self::start_with_backoff(template, shard, listen, token, metrics, FIRST_BACKOFF)
    }

    /// [`start`](Self::start) with another first back-off (tests).
    pub fn start_with_backoff(
        template: PeerTemplate,
        shard: Shard,
        listen: SocketAddr,
        token: Secret,
        metrics: Arc<Metrics>,
        first_backoff: Duration,
    ) -> Arc<Forwarder> {
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let peers = Arc::new(Peers {
            template,
            shard,
            own_port: listen.port(),
            token,
            metrics: Arc::clone(&metrics),
            permits: Arc::new(Semaphore::new(MAX_DELIVERIES)),
            failures_log: LogGate::default(),
            first_backoff,
        });
        tokio::spawn(run(receiver, peers));
        Arc::new(Forwarder {
            queue,
            shard,
            metrics,
            drops_log: LogGate::default(),
            recent: Mutex::new(HashSet::new()),
        })
    }

    /// Queues `task_id` of `provider` for the replicas of its owner shard (every HA copy of
    /// it; this replica skips itself); an id queued lately is not queued again. Never blocks: with the queue full the id is dropped,
    /// counted and logged (rate-limited); the owner's other discovery sources still apply.
    pub fn forward_to_owner(&self, provider: &str, task_id: &str) {
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() >= RECENT_CAPACITY {
                recent.clear();
            }
            if !recent.insert(format!("{provider}\0{task_id}")) {
                return;
            }
        }
        let item = Queued {
            provider: provider.to_string(),
            task_id: task_id.to_string(),
        };
        if self.queue.try_send(item).is_err() {
            self.metrics.count_forwarded(provider, DROPPED, 1);
            if let Some(suppressed) = self.drops_log.open() {
                tracing::warn!(
                    provider,
                    capacity = QUEUE_CAPACITY,
                    suppressed,
                    "forwarding queue full: a task id seen through the proxy was not sent to its owner"
                );
            }
        }
    }

    /// The shard that owns `task_id` of `provider`.
    pub fn owner_of(&self, provider: &str, task_id: &str) -> u32 {
        shard_of(provider, task_id, self.shard.count.max(1))
    }
}

/// Takes what is queued, in batches per (provider, owner), and delivers each batch.
async fn run(mut receiver: mpsc::Receiver<Queued>, peers: Arc<Peers>) {
    let mut taken = Vec::with_capacity(MAX_BATCH);
    while receiver.recv_many(&mut taken, MAX_BATCH).await > 0 {
        let mut batches: BTreeMap<(String, u32), Vec<String>> = BTreeMap::new();
        for Queued { provider, task_id } in taken.drain(..) {
            let owner = shard_of(&provider, &task_id, peers.shard.count.max(1));
            let ids = batches.entry((provider, owner)).or_default();
            if !ids.contains(&task_id) {
                ids.push(task_id);
            }
        }
        for ((provider, owner), ids) in batches {
            // Waits while MAX_DELIVERIES are in flight: the queue then fills, and drops.
            let Ok(permit) = Arc::clone(&peers.permits).acquire_owned().await else {
                return;
            };
            let peers = Arc::clone(&peers);
            tokio::spawn(async move {
                deliver_to_shard(&peers, &provider, owner, &ids).await;
                drop(permit);
            });
        }
    }
}

/// A client for one peer address: the URL keeps its host name (TLS, virtual hosts), the
/// connection goes to `address`. No redirects: following one would send the API token
/// wherever it points.
fn client_for(host: &str, address: SocketAddr) -> Option<reqwest::Client> {
    crate::upstream::install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(REQUEST_TIMEOUT)
        .resolve_to_addrs(host, &[address])
        .build()
        .ok()
}

/// Registers `ids` at every replica of shard `owner`, each address in turn.
async fn deliver_to_shard(peers: &Peers, provider: &str, owner: u32, ids: &[String]) {
    let url = peers.template.registration_url(owner);
    let Some(addresses) = resolve(peers.first_backoff, &url).await else {
        peers.metrics.count_forwarded(provider, FAILED, ids.len());
        peers.log_failure(provider, owner, "the peer's host name does not resolve");
        return;
    };
    for address in addresses {
        if owner == peers.shard.index && address.port() == peers.own_port && is_local(address.ip())
        {
            continue;
        }
        deliver(peers, &url, address, provider, owner, ids).await;
    }
}

/// Every address of the URL's host, retried like a delivery while the name does not
/// resolve (a peer pod not yet in DNS).
async fn resolve(first_backoff: Duration, url: &str) -> Option<Vec<SocketAddr>> {
    let parsed = reqwest::Url::parse(url).ok()?;
    let host = parsed
        .host_str()?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = parsed.port_or_known_default()?;
    let mut backoff = first_backoff;
    for attempt in 1..=MAX_ATTEMPTS {
        if let Ok(found) = tokio::net::lookup_host((host, port)).await {
            let mut found: Vec<SocketAddr> = found.collect();
            found.sort_unstable();
            found.dedup();
            if !found.is_empty() {
                return Some(found);
            }
        }
        if attempt < MAX_ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
    None
}

/// Whether `ip` is an address of this machine (binding to any other one fails).
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// The peer's answer, as far as forwarding cares.
#[derive(serde::Deserialize)]
struct RegistrationAnswer {
    #[serde(default)]
    other_shard: usize,
    #[serde(default)]
    invalid: usize,
}

/// One batch to one replica, with retries.
async fn deliver(
    peers: &Peers,
    url: &str,
    address: SocketAddr,
    provider: &str,
    owner: u32,
    ids: &[String],
) {
    let Some(client) = host_of(url).and_then(|host| client_for(&host, address)) else {
        peers.metrics.count_forwarded(provider, FAILED, ids.len());
        peers.log_failure(provider, owner, "no HTTP client for the peer's URL");
        return;
    };
    // Serialized here: the exporter's reqwest is built without its `json` feature.
    let body = serde_json::json!({ "provider": provider, "task_ids": ids }).to_string();
    let mut backoff = peers.first_backoff;
    let mut last_problem = String::new();
    for attempt in 1..=MAX_ATTEMPTS {
        let request = client
            .post(url)
            .bearer_auth(peers.token.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone());
        match request.send().await {
            Ok(answer) if answer.status().is_success() => {
                let refused = answer
                    .bytes()
                    .await
                    .ok()
                    .and_then(|b| serde_json::from_slice::<RegistrationAnswer>(&b).ok())
                    .map_or(0, |a| (a.other_shard + a.invalid).min(ids.len()));
                peers
                    .metrics
                    .count_forwarded(provider, DELIVERED, ids.len() - refused);
                if refused > 0 {
                    peers.metrics.count_forwarded(provider, REJECTED, refused);
                    peers.log_failure(
                        provider,
                        owner,
                        "the peer refused ids as invalid or owned by another shard: check that every replica has the same sharding.count and template",
                    );
                }
                return;
            }
            Ok(answer) if is_retryable(answer.status()) => {
                last_problem = format!("answered {}", answer.status().as_u16());
            }
            Ok(answer) => {
                // 400, 401, 403, 404, 413: the same request will be refused again.
                peers.metrics.count_forwarded(provider, REJECTED, ids.len());
                let status = answer.status().as_u16();
                peers.log_failure(
                    provider,
                    owner,
                    &format!("the peer answered {status}: check the API token and provider names"),
                );
                return;
            }
            Err(error) => {
                last_problem = if error.is_timeout() {
                    "timed out".into()
                } else if error.is_connect() {
                    "connection failed".into()
                } else {
                    "request failed".into()
                };
            }
        }
        if attempt < MAX_ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
    peers.metrics.count_forwarded(provider, FAILED, ids.len());
    peers.log_failure(
        provider,
        owner,
        &format!("gave up after {MAX_ATTEMPTS} attempts, the last one {last_problem}"),
    );
}

fn host_of(url: &str) -> Option<String> {
    reqwest::Url::parse(url)
        .ok()?
        .host_str()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
}

/// Worth another try: the peer is starting, overloaded, or its store is down.
fn is_retryable(status: reqwest::StatusCode) -> bool {
    status.is_server_error()
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
}

impl Peers {
    fn log_failure(&self, provider: &str, owner: u32, problem: &str) {
        if let Some(suppressed) = self.failures_log.open() {
            tracing::warn!(
                provider,
                owner_shard = owner,
                problem,
                suppressed,
                "could not hand task ids seen through the proxy to their owner"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_are_checked() {
        let ok = PeerTemplate::parse("http://genai-exporter-{index}.genai-exporter:9850/", 3)
            .expect("valid");
        assert_eq!(
            ok.registration_url(2),
            "http://genai-exporter-2.genai-exporter:9850/api/v1/tasks"
        );
        // Without sharding one name may cover every replica.
        assert!(PeerTemplate::parse("http://genai-exporter-peers:9850", 1).is_ok());
        for (bad, count) in [
            ("http://genai-exporter:9850", 2),
            ("ftp://genai-exporter-{index}:21", 2),
            ("http://user:pw@genai-exporter-{index}:9850", 2),
            ("http://genai-exporter-{index}:9850/?x=1", 2),
            ("genai-exporter-{index}", 2),
        ] {
            assert!(PeerTemplate::parse(bad, count).is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback_and_own_addresses_are_local_others_not() {
        assert!(is_local("127.0.0.1".parse().unwrap()));
        assert!(is_local("127.0.0.2".parse().unwrap()));
        // TEST-NET-1 (RFC 5737) is never assigned to a machine.
        assert!(!is_local("192.0.2.1".parse().unwrap()));
    }

    use std::collections::VecDeque;

    use axum::http::{HeaderMap, StatusCode};

    use crate::metrics::Family;

    /// A peer's registration API answering from a script (the last answer repeats), and
    /// what it received: the `Authorization` value and the ids of each call.
    #[derive(Default)]
    struct FakePeer {
        answers: Mutex<VecDeque<StatusCode>>,
        calls: Mutex<Vec<(String, Vec<String>)>>,
    }

    async fn start_peer(answers: &[StatusCode]) -> (SocketAddr, Arc<FakePeer>) {
        let peer = Arc::new(FakePeer {
            answers: Mutex::new(answers.iter().copied().collect()),
            ..FakePeer::default()
        });
        let state = Arc::clone(&peer);
        let app = axum::Router::new().route(
            "/api/v1/tasks",
            axum::routing::post(
                move |headers: HeaderMap, axum::Json(body): axum::Json<serde_json::Value>| {
                    let peer = Arc::clone(&state);
                    async move {
                        let auth = headers
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        let ids: Vec<String> = body["task_ids"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect();
                        let added = ids.len();
                        peer.calls.lock().unwrap().push((auth, ids));
                        let mut answers = peer.answers.lock().unwrap();
                        let status = if answers.len() > 1 {
                            answers.pop_front().unwrap()
                        } else {
                            answers.front().copied().unwrap_or(StatusCode::OK)
                        };
                        (
                            status,
                            axum::Json(serde_json::json!({
                                "added": added, "already_tracked": 0, "already_finished": 0,
                                "other_shard": 0, "invalid": 0
                            })),
                        )
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (addr, peer)
    }

    /// Counts by outcome, gathered from the metrics' pending counts.
    #[derive(Default)]
    struct Counted(std::collections::HashMap<String, f64>);

    impl Counted {
        fn take(&mut self, metrics: &Metrics) {
            for (key, value) in metrics.take_pending_counts().counters {
                if key.family == Family::ProxyForwarded {
                    *self.0.entry(key.labels[0].clone()).or_default() += value;
                }
            }
        }
        fn get(&self, outcome: &str) -> f64 {
            self.0.get(outcome).copied().unwrap_or(0.0)
        }
    }

    /// Waits until `outcome` has been counted `value` times; returns every count.
    async fn until_counted(metrics: &Metrics, outcome: &str, value: f64) -> Counted {
        let mut counted = Counted::default();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            counted.take(metrics);
            if counted.get(outcome) >= value {
                return counted;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{outcome}: {:?}",
                counted.0
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A forwarder of shard 0 of 2 whose peers are all at `peer` (`127.0.0.{index}`: only
    /// shard 1's ids are used, which go to 127.0.0.1).
    fn forwarder(peer: SocketAddr, metrics: &Arc<Metrics>) -> Arc<Forwarder> {
        let template =
            PeerTemplate::parse(&format!("http://127.0.0.{{index}}:{}", peer.port()), 2).unwrap();
        Forwarder::start_with_backoff(
            template,
            Shard { index: 0, count: 2 },
            "0.0.0.0:9850".parse().unwrap(),
            Secret::new("peer-token"),
            Arc::clone(metrics),
            Duration::from_millis(1),
        )
    }

    fn ids_of_shard_1(n: usize) -> Vec<String> {
        (0u32..)
            .map(|i| format!("task-{i}"))
            .filter(|id| shard_of("mx", id, 2) == 1)
            .take(n)
            .collect()
    }

    #[tokio::test]
    async fn ids_reach_the_owner_once_each_with_the_token() {
        let (addr, peer) = start_peer(&[StatusCode::OK]).await;
        let metrics = Arc::new(Metrics::new(vec![1.0]));
        let forwarder = forwarder(addr, &metrics);
        let ids = ids_of_shard_1(3);
        for id in ids.iter().chain(&ids) {
            forwarder.forward_to_owner("mx", id);
        }
        let counted = until_counted(&metrics, DELIVERED, 3.0).await;
        assert_eq!(counted.get(DELIVERED), 3.0);
        let calls = peer.calls.lock().unwrap().clone();
        let mut received: Vec<String> = calls.iter().flat_map(|(_, ids)| ids.clone()).collect();
        received.sort();
        let mut expected = ids.clone();
        expected.sort();
        assert_eq!(received, expected, "each id once");
        assert!(calls.iter().all(|(auth, _)| auth == "Bearer peer-token"));
    }

    #[tokio::test]
    async fn transient_refusals_are_retried_until_delivered() {
        let answers = [
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::OK,
        ];
        let (addr, peer) = start_peer(&answers).await;
        let metrics = Arc::new(Metrics::new(vec![1.0]));
        let forwarder = forwarder(addr, &metrics);
        forwarder.forward_to_owner("mx", &ids_of_shard_1(1)[0]);
        let counted = until_counted(&metrics, DELIVERED, 1.0).await;
        assert_eq!(counted.get(FAILED) + counted.get(REJECTED), 0.0);
        assert_eq!(peer.calls.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn a_refused_token_is_rejected_at_once() {
        let (addr, peer) = start_peer(&[StatusCode::UNAUTHORIZED]).await;
        let metrics = Arc::new(Metrics::new(vec![1.0]));
        let forwarder = forwarder(addr, &metrics);
        forwarder.forward_to_owner("mx", &ids_of_shard_1(1)[0]);
        let counted = until_counted(&metrics, REJECTED, 1.0).await;
        assert_eq!(counted.get(DELIVERED), 0.0);
        assert_eq!(peer.calls.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_peer_that_stays_down_fails_after_the_bounded_attempts() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let metrics = Arc::new(Metrics::new(vec![1.0]));
        let forwarder = forwarder(addr, &metrics);
        forwarder.forward_to_owner("mx", &ids_of_shard_1(1)[0]);
        let counted = until_counted(&metrics, FAILED, 1.0).await;
        assert_eq!(counted.get(DELIVERED), 0.0);
    }

    #[tokio::test]
    async fn a_stalled_peer_never_blocks_the_proxy_and_excess_ids_are_dropped() {
        // Accepts connections and never answers: every delivery waits for its timeout.
        let stalled = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = stalled.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = stalled.accept().await {
                held.push(stream);
            }
        });
        let metrics = Arc::new(Metrics::new(vec![1.0]));
        let forwarder = forwarder(addr, &metrics);
        // More than the queue plus what the deliveries in flight hold.
        let n = QUEUE_CAPACITY + (MAX_DELIVERIES + 2) * MAX_BATCH + 1_000;
        let ids = ids_of_shard_1(n);
        let started = std::time::Instant::now();
        for id in &ids {
            forwarder.forward_to_owner("mx", id);
        }
        assert!(started.elapsed() < REQUEST_TIMEOUT, "forwarding blocked");
        let counted = until_counted(&metrics, DROPPED, 1.0).await;
        assert!(counted.get(DROPPED) <= n as f64);
        assert_eq!(counted.get(DELIVERED), 0.0);
    }

    #[test]
    fn only_transient_answers_are_retried() {
        use reqwest::StatusCode;
        for status in [500, 502, 503, 429, 408] {
            assert!(
                is_retryable(StatusCode::from_u16(status).unwrap()),
                "{status}"
            );
        }
        for status in [400, 401, 403, 404, 413] {
            assert!(
                !is_retryable(StatusCode::from_u16(status).unwrap()),
                "{status}"
            );
        }
    }
}
