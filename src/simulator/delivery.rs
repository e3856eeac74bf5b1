//! Background tick: accounts tasks that reached their terminal instant, sends their callbacks
//! and registers new task ids with an exporter.
//!
//! Outbound HTTP is plain `http://` to loopback in every intended use (the demo's exporter, a
//! test's receiver): the client trusts no certificate authority, so `https://` targets fail
//! and are counted as failed deliveries rather than silently trusted.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::state::Delivery;
use super::{Inner, SimProvider, Simulator};

/// How often terminal tasks are accounted and callbacks sent.
const TICK: Duration = Duration::from_millis(100);
/// How often new ids are registered.
const REGISTER_EVERY: Duration = Duration::from_millis(500);
/// Ids per registration request, and batches per provider per flush.
const REGISTER_BATCH: usize = 500;
const REGISTER_BATCHES_PER_FLUSH: usize = 20;
/// maxapi documents a 5-second callback delivery timeout; used for every outbound request.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(5);
/// Callbacks in flight at once.
const MAX_CALLBACKS_IN_FLIGHT: usize = 64;

pub(super) async fn pump(weak: Weak<Inner>) {
    let client = client();
    let permits = Arc::new(Semaphore::new(MAX_CALLBACKS_IN_FLIGHT));
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_register = Instant::now();
    loop {
        ticker.tick().await;
        let Some(sim) = Simulator::from_weak(&weak) else {
            return;
        };
        let deliveries: Vec<Delivery> = {
            let mut st = sim.advanced();
            st.outbox.drain(..).collect()
        };
        for d in deliveries {
            let Some(client) = client.clone() else {
                sim.lock().provider(d.provider).callbacks.failed += 1;
                continue;
            };
            let permits = permits.clone();
            let weak = weak.clone();
            tokio::spawn(async move {
                let Ok(_permit) = permits.acquire_owned().await else {
                    return;
                };
                let ok = post(&client, &d.url, None, d.body).await;
                if let Some(sim) = Simulator::from_weak(&weak) {
                    let mut st = sim.lock();
                    let c = &mut st.provider(d.provider).callbacks;
                    if ok {
                        c.delivered += 1;
                    } else {
                        c.failed += 1;
                    }
                }
            });
        }
        if last_register.elapsed() >= REGISTER_EVERY {
            last_register = Instant::now();
            for p in SimProvider::ALL {
                register(&sim, client.as_ref(), p).await;
            }
        }
    }
}

/// Send queued ids in batches; a failed batch goes back to the front of the queue and is
/// retried at the next flush (the queue is bounded, oldest ids dropped first).
async fn register(sim: &Simulator, client: Option<&reqwest::Client>, p: SimProvider) {
    let Some(reg) = p.config(&sim.inner.cfg).register.as_ref() else {
        return;
    };
    let Some(client) = client else {
        let mut st = sim.lock();
        let ps = st.provider(p);
        ps.registrations.failed += ps.register_queue.len() as u64;
        ps.register_queue.clear();
        return;
    };
    let name = reg.provider_name.as_deref().unwrap_or(p.as_str());
    let token = match (&reg.token, &reg.token_env) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(var)) => std::env::var(var).ok(),
        (None, None) => None,
    };
    for _ in 0..REGISTER_BATCHES_PER_FLUSH {
        let batch: Vec<Arc<str>> = {
            let mut st = sim.lock();
            let q = &mut st.provider(p).register_queue;
            let n = q.len().min(REGISTER_BATCH);
            q.drain(..n).collect()
        };
        if batch.is_empty() {
            return;
        }
        let ids: Vec<&str> = batch.iter().map(|s| &**s).collect();
        let body = serde_json::to_vec(&serde_json::json!({"provider": name, "task_ids": ids}))
            .unwrap_or_default();
        let ok = post(client, &reg.url, token.as_deref(), body).await;
        let mut st = sim.lock();
        let ps = st.provider(p);
        if ok {
            ps.registrations.delivered += batch.len() as u64;
        } else {
            ps.registrations.failed += batch.len() as u64;
            for id in batch.into_iter().rev() {
                ps.register_queue.push_front(id);
            }
            return;
        }
    }
}

async fn post(client: &reqwest::Client, url: &str, token: Option<&str>, body: Vec<u8>) -> bool {
    let mut req = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    match req.send().await {
        Ok(resp) => resp.status().is_success(),
        Err(e) => {
            tracing::debug!(error = %e, "simulator delivery failed");
            false
        }
    }
}

/// An HTTP client that needs no process-wide TLS set-up (see the module note).
fn client() -> Option<reqwest::Client> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .timeout(DELIVERY_TIMEOUT)
        .build()
        .map_err(|e| tracing::warn!(error = %e, "simulator: no HTTP client for deliveries"))
        .ok()
}
