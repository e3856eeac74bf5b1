//! The persister: every few hundred milliseconds it takes what the registry changed,
//! commits it with the counter totals it moved, and only then publishes the counters.
//!
//! When the store cannot commit (a full disk, any I/O error) the work is kept in memory and
//! the store reopened with back-off until a commit succeeds; nothing is published or
//! acknowledged before that (see [`Durability`]). A store file deleted or replaced under the
//! running process is written anew from the copy still open.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use crate::metrics::{Metrics, Staged};
use crate::registry::Registry;
use crate::store::{Batch, Store};
use crate::task::now_millis;

/// How often changes are committed: small enough that counters look live, large enough
/// that thousands of answers a second become a handful of transactions.
pub(crate) const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// At most how long expired tombstones wait to be deleted from the store (a full scan).
const TOMBSTONE_EXPIRY_INTERVAL: Duration = Duration::from_secs(3600);
/// A commit of at least this many rows was a burst (a task file of many ids, a registration
/// storm): see [`release_freed_memory`].
const BURST_ROWS: usize = 10_000;
/// How often the file at the store's path is checked to still be the one open.
const IDENTITY_CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Back-off between attempts to reopen a failed store: doubling from the first to the last.
const REOPEN_BACKOFF_FIRST: Duration = Duration::from_millis(250);
const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Why a change could not be confirmed durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotDurable {
    /// The store cannot commit (disk full, I/O error): retry later.
    StoreDown,
    /// No commit held the change within the bound.
    TimedOut,
}

/// Commit progress shared with request handlers: a handler that changed the registry waits
/// for a commit that collected the registry after its change (group commit), so that its
/// 2xx means durable.
pub(crate) struct Durability {
    /// Number of the latest collection of pending work (counted before it takes anything).
    collected: AtomicU64,
    /// (number of the latest committed collection, store up).
    committed: watch::Sender<(u64, bool)>,
    up: AtomicBool,
    /// Wakes the persister early when a handler waits.
    wake: Notify,
}

impl Durability {
    pub(crate) fn new() -> Arc<Durability> {
        Arc::new(Durability {
            collected: AtomicU64::new(0),
            committed: watch::Sender::new((0, true)),
            up: AtomicBool::new(true),
            wake: Notify::new(),
        })
    }

    /// Whether the store commits (the last attempt succeeded).
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Waits until every change made to the registry before this call is committed, at most
    /// `bound`. Fails at once while the store is down.
    pub(crate) async fn wait(&self, bound: Duration) -> Result<(), NotDurable> {
        if !self.is_up() {
            return Err(NotDurable::StoreDown);
        }
        // Any collection numbered above the current one starts after this point, so it
        // takes the caller's change.
        let target = self.collected.load(Ordering::SeqCst) + 1;
        let mut committed = self.committed.subscribe();
        self.wake.notify_one();
        let reached = committed.wait_for(|&(seq, up)| seq >= target || !up);
        match tokio::time::timeout(bound, reached).await {
            Ok(Ok(state)) if state.0 >= target => Ok(()),
            Ok(_) => Err(NotDurable::StoreDown),
            Err(_) if !self.is_up() => Err(NotDurable::StoreDown),
            Err(_) => Err(NotDurable::TimedOut),
        }
    }

    fn set_up(&self, up: bool, metrics: &Metrics) {
        self.up.store(up, Ordering::SeqCst);
        metrics.set_store_up(up);
        self.committed.send_modify(|state| state.1 = up);
    }

    fn committed(&self, seq: u64) {
        self.committed
            .send_modify(|state| *state = (state.0.max(seq), true));
    }
}

/// Work collected from the registry but not committed (the store failed). One entry per
/// key, the latest state winning, so its size is bounded by the registry's own (one row per
/// task, tombstone and counter series touched), however long the outage: the registry's
/// pending lists are emptied into it on every flush.
#[derive(Default)]
struct Held {
    /// `Some(record)` to write, `None` to delete.
    tasks: HashMap<String, Option<Vec<u8>>>,
    tombstones: HashMap<String, Option<i64>>,
    /// Learnt completion times, the latest of each model.
    latencies: HashMap<String, Vec<u8>>,
    /// Counter totals, absolute, of every series touched since the last commit.
    staged: Staged,
    /// Number of the latest collection folded in.
    seq: u64,
}

impl Held {
    fn absorb(&mut self, batch: Batch) {
        // Within one batch deletions win (the store applies them last).
        for (k, v) in batch.put_tasks {
            self.tasks.insert(k, Some(v));
        }
        for k in batch.delete_tasks {
            self.tasks.insert(k, None);
        }
        for (k, v) in batch.put_tombstones {
            self.tombstones.insert(k, Some(v));
        }
        for k in batch.delete_tombstones {
            self.tombstones.insert(k, None);
        }
        self.latencies.extend(batch.put_latencies);
    }

    fn rows(&self) -> usize {
        self.tasks.len() + self.tombstones.len() + self.latencies.len()
    }

    fn to_batch(&self, metrics: &Metrics) -> Batch {
        let mut batch = Batch::default();
        for (k, v) in &self.tasks {
            match v {
                Some(v) => batch.put_tasks.push((k.clone(), v.clone())),
                None => batch.delete_tasks.push(k.clone()),
            }
        }
        for (k, v) in &self.tombstones {
            match v {
                Some(v) => batch.put_tombstones.push((k.clone(), *v)),
                None => batch.delete_tombstones.push(k.clone()),
            }
        }
        batch.put_latencies = (self.latencies.iter())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        batch.put_counters = metrics.accounting.encode(&self.staged);
        batch
    }
}

/// The store cannot commit: since when, and when to try again.
struct Outage {
    since: Instant,
    next_attempt: Instant,
    backoff: Duration,
}

pub(crate) struct Persister {
    store: Arc<Store>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    durability: Arc<Durability>,
    /// Work whose commit failed: retried, with newer work folded in.
    held: Option<Held>,
    outage: Option<Outage>,
    last_identity_check: Instant,
}

impl Persister {
    pub(crate) fn new(
        store: Arc<Store>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        durability: Arc<Durability>,
    ) -> Self {
        metrics.set_store_up(true);
        Persister {
            store,
            registry,
            metrics,
            durability,
            held: None,
            outage: None,
            last_identity_check: Instant::now(),
        }
    }

    /// Flushes forever, every [`FLUSH_INTERVAL`] or sooner when a handler waits for a
    /// commit. The persister is shared behind a lock: staged totals start from the
    /// published ones, so two flushes must never interleave.
    pub(crate) async fn run(shared: Arc<tokio::sync::Mutex<Persister>>) {
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let durability = shared.lock().await.durability.clone();
        let mut last_expiry = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = durability.wake.notified() => {}
            }
            let mut persister = shared.lock().await;
            persister.flush().await;
            // Hourly, or once per `forget_after` when that is shorter: the store holds no
            // more than about two periods of tombstones.
            let ttl =
                Duration::from_millis(persister.registry.max_tombstone_ttl_ms().max(1000) as u64);
            if last_expiry.elapsed() >= TOMBSTONE_EXPIRY_INTERVAL.min(ttl)
                && persister.outage.is_none()
            {
                last_expiry = Instant::now();
                persister.expire_tombstones().await;
            }
        }
    }

    /// Deletes the store rows of tombstones past their time (the registry forgets them in
    /// memory on its own sweep).
    async fn expire_tombstones(&self) {
        let store = self.store.clone();
        let ttl = self.registry.max_tombstone_ttl_ms();
        if ttl == 0 {
            return; // no provider configured: nothing to judge by
        }
        let cutoff = now_millis() - ttl;
        match tokio::task::spawn_blocking(move || store.expire_tombstones(cutoff)).await {
            Ok(Ok(n)) if n > 0 => tracing::debug!(expired = n, "forgot old tombstones"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot expire tombstones; retrying later");
                self.metrics
                    .store_errors
                    .with_label_values(&["expire"])
                    .inc();
            }
            Err(e) => tracing::warn!(error = %e, "tombstone expiry task failed"),
        }
    }

    /// Commits pending changes and publishes their counters. Returns false when the commit
    /// failed (the work is kept and retried on a later call).
    pub(crate) async fn flush(&mut self) -> bool {
        self.flush_with(false).await
    }

    /// Like [`flush`](Self::flush), with the poll bookkeeping the registry otherwise writes
    /// only once a minute, and a reopen attempt whatever the back-off (shutdown).
    pub(crate) async fn flush_all(&mut self) -> bool {
        self.flush_with(true).await
    }

    /// Rows collected but not committed (0 while the store is up).
    pub(crate) fn pending_rows(&self) -> usize {
        self.held.as_ref().map_or(0, Held::rows)
    }

    async fn flush_with(&mut self, everything: bool) -> bool {
        if everything || self.last_identity_check.elapsed() >= IDENTITY_CHECK_INTERVAL {
            self.last_identity_check = Instant::now();
            self.recreate_if_replaced().await;
        }
        let seq = self.durability.collected.fetch_add(1, Ordering::SeqCst) + 1;
        let batch = match self.held.take() {
            None => {
                let (batch, staged) = self.collect(everything, Staged::default());
                if batch.is_empty() {
                    self.durability.committed(seq);
                    return true;
                }
                (batch, staged)
            }
            Some(mut held) => {
                let (batch, staged) = self.collect(everything, std::mem::take(&mut held.staged));
                held.absorb(batch);
                held.staged = staged;
                held.seq = seq;
                let wait = self
                    .outage
                    .as_ref()
                    .is_some_and(|o| Instant::now() < o.next_attempt);
                if wait && !everything {
                    self.held = Some(held);
                    return false;
                }
                if self.outage.is_some() && !self.reopen().await {
                    self.held = Some(held);
                    return false;
                }
                let batch = held.to_batch(&self.metrics);
                self.held = Some(held);
                (batch, Staged::default())
            }
        };
        self.commit(batch, seq).await
    }

    /// Commits `batch` (fresh work with its staged totals, or the held work when the staged
    /// totals are empty) and publishes.
    async fn commit(&mut self, (batch, staged): (Batch, Staged), seq: u64) -> bool {
        let store = self.store.clone();
        let committed = tokio::task::spawn_blocking(move || {
            let result = store.commit(&batch);
            if result.is_ok() && batch.len() >= BURST_ROWS {
                drop(batch);
                release_freed_memory();
                return (Batch::default(), result);
            }
            (batch, result)
        })
        .await;
        let (batch, result) = match committed {
            Ok(done) => done,
            Err(join_error) => {
                tracing::error!(error = %join_error, "state commit task failed");
                return false;
            }
        };
        match result {
            Ok(()) => {
                let staged = match self.held.take() {
                    Some(held) => held.staged,
                    None => staged,
                };
                self.metrics.accounting.publish(staged);
                if let Some(outage) = self.outage.take() {
                    tracing::info!(
                        down_ms = outage.since.elapsed().as_millis() as u64,
                        rows = batch.len(),
                        "state store recovered; pending changes committed"
                    );
                    self.durability.set_up(true, &self.metrics);
                }
                self.durability.committed(seq);
                true
            }
            Err(e) => {
                self.metrics
                    .store_errors
                    .with_label_values(&["commit"])
                    .inc();
                let held = match self.held.take() {
                    Some(held) => held,
                    None => {
                        let mut held = Held {
                            staged,
                            seq,
                            ..Held::default()
                        };
                        held.absorb(batch);
                        held
                    }
                };
                tracing::error!(error = %e, pending_rows = held.rows(), "state commit failed; keeping the changes in memory and reopening the store");
                self.held = Some(held);
                self.store_failed();
                false
            }
        }
    }

    fn store_failed(&mut self) {
        let now = Instant::now();
        match &mut self.outage {
            Some(outage) => {
                outage.backoff = (outage.backoff * 2).min(REOPEN_BACKOFF_MAX);
                outage.next_attempt = now + outage.backoff;
            }
            None => {
                self.outage = Some(Outage {
                    since: now,
                    next_attempt: now + REOPEN_BACKOFF_FIRST,
                    backoff: REOPEN_BACKOFF_FIRST,
                });
                self.durability.set_up(false, &self.metrics);
            }
        }
    }

    /// Closes and reopens the store (redb refuses everything after an I/O error until then).
    async fn reopen(&mut self) -> bool {
        let store = self.store.clone();
        let reopened = tokio::task::spawn_blocking(move || {
            if store.is_replaced() {
                store.recreate().map(|_| ())
            } else {
                store.reopen()
            }
        })
        .await;
        match reopened {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                self.metrics
                    .store_errors
                    .with_label_values(&["reopen"])
                    .inc();
                tracing::error!(error = %e, pending_rows = self.pending_rows(), "cannot reopen the state store; retrying");
                self.store_failed();
                false
            }
            Err(join_error) => {
                tracing::error!(error = %join_error, "state reopen task failed");
                self.store_failed();
                false
            }
        }
    }

    /// When the file at the store's path is no longer the one open (deleted, replaced),
    /// writes a new one from the open copy: every committed task, tombstone and total.
    async fn recreate_if_replaced(&mut self) {
        if self.outage.is_some() {
            return; // the reopen path checks this itself
        }
        let store = self.store.clone();
        let recreated = tokio::task::spawn_blocking(move || {
            if !store.is_replaced() {
                return None;
            }
            Some(store.recreate())
        })
        .await;
        match recreated {
            Ok(None) => {}
            Ok(Some(Ok(rows))) => {
                tracing::error!(path = %self.store.path().display(), rows, "state store file was deleted or replaced while running; recreated it from the open copy");
                self.metrics
                    .store_errors
                    .with_label_values(&["replaced"])
                    .inc();
            }
            Ok(Some(Err(e))) => {
                tracing::error!(error = %e, "state store file was deleted or replaced while running and cannot be recreated; retrying");
                self.metrics
                    .store_errors
                    .with_label_values(&["replaced"])
                    .inc();
            }
            Err(e) => tracing::error!(error = %e, "state recreate task failed"),
        }
    }

    /// Takes every provider's pending work into one batch, staging its counters on top of
    /// `staged`. (A provider's lists are moved, not copied, when they are the first: a
    /// burst's batch is large.)
    fn collect(&mut self, everything: bool, mut staged: Staged) -> (Batch, Staged) {
        let now = now_millis();
        let mut batch = Batch::default();
        // A removed provider's last commit takes everything, poll bookkeeping included.
        let current = self
            .registry
            .providers()
            .into_iter()
            .map(|p| (p, everything));
        let retired = self.registry.take_retired().into_iter().map(|p| (p, true));
        for (provider, everything) in current.chain(retired) {
            provider.sweep(now);
            let pending = if everything {
                provider.take_pending_all()
            } else {
                provider.take_pending()
            };
            append(&mut batch.put_tasks, pending.batch.put_tasks);
            append(&mut batch.delete_tasks, pending.batch.delete_tasks);
            append(&mut batch.put_tombstones, pending.batch.put_tombstones);
            append(
                &mut batch.delete_tombstones,
                pending.batch.delete_tombstones,
            );
            append(&mut batch.put_latencies, pending.batch.put_latencies);
            self.metrics
                .accounting
                .stage(&mut staged, provider.name(), &pending.events);
        }
        let counts = self.metrics.take_pending_counts();
        self.metrics.accounting.stage_counts(&mut staged, counts);
        batch.put_counters = self.metrics.accounting.encode(&staged);
        (batch, staged)
    }
}

fn append<T>(to: &mut Vec<T>, from: Vec<T>) {
    if to.is_empty() {
        *to = from;
    } else {
        to.extend(from);
    }
}

/// Hands freed heap memory back to the operating system after a burst. glibc keeps what a
/// process frees mapped for reuse (only the very top of the heap is returned on its own), so
/// after the buffers of one large commit (a million new tasks: some 300 MB of records,
/// keys and events) resident memory would stay at that high-water mark for good.
/// `malloc_trim` returns the free pages; it takes milliseconds and runs only after bursts,
/// on the blocking pool. Other allocators and C libraries return memory on their own terms.
fn release_freed_memory() {
    // The crate's one `unsafe`: a foreign call with no pointers (see the SAFETY note).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim takes no pointers and only releases free memory; glibc makes
        // it safe to call from any thread at any time.
        unsafe {
            malloc_trim(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_work_keeps_the_latest_state_of_each_row() {
        let mut held = Held::default();
        held.absorb(Batch {
            put_tasks: vec![("a".into(), vec![1]), ("b".into(), vec![1])],
            delete_tasks: vec!["b".into()],
            put_tombstones: vec![("b".into(), 5)],
            ..Batch::default()
        });
        // A later batch: `a` changes again, `b` was deleted before and is written again.
        held.absorb(Batch {
            put_tasks: vec![("a".into(), vec![2]), ("b".into(), vec![3])],
            delete_tombstones: vec!["b".into()],
            ..Batch::default()
        });
        assert_eq!(held.rows(), 3, "one entry per key, however many batches");
        assert_eq!(held.tasks["a"], Some(vec![2]));
        assert_eq!(held.tasks["b"], Some(vec![3]));
        assert_eq!(held.tombstones["b"], None);
    }
}
