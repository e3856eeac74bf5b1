//! The persister: every few hundred milliseconds it takes what the registry changed,
//! commits it with the counter totals it moved, and only then publishes the counters.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::{Metrics, Staged};
use crate::registry::Registry;
use crate::store::{Batch, Store};
use crate::task::now_millis;

/// How often changes are committed: small enough that counters look live, large enough
/// that thousands of answers a second become a handful of transactions.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// At most how long expired tombstones wait to be deleted from the store (a full scan).
const TOMBSTONE_EXPIRY_INTERVAL: Duration = Duration::from_secs(3600);
/// A commit of at least this many rows was a burst (a task file of many ids, a registration
/// storm): see [`release_freed_memory`].
const BURST_ROWS: usize = 10_000;

pub struct Persister {
    store: Arc<Store>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// A batch whose commit failed: retried before anything new is taken.
    failed: Option<(Batch, Staged)>,
}

impl Persister {
    pub fn new(store: Arc<Store>, registry: Arc<Registry>, metrics: Arc<Metrics>) -> Self {
        Persister {
            store,
            registry,
            metrics,
            failed: None,
        }
    }

    /// Flushes forever, every [`FLUSH_INTERVAL`]. The persister is shared behind a lock:
    /// staged totals start from the published ones, so two flushes must never interleave.
    pub async fn run(shared: Arc<tokio::sync::Mutex<Persister>>) {
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_expiry = Instant::now();
        loop {
            tick.tick().await;
            let mut persister = shared.lock().await;
            persister.flush().await;
            // Hourly, or once per `forget_after` when that is shorter: the store holds no
            // more than about two periods of tombstones.
            let ttl =
                Duration::from_millis(persister.registry.max_tombstone_ttl_ms().max(1000) as u64);
            if last_expiry.elapsed() >= TOMBSTONE_EXPIRY_INTERVAL.min(ttl) {
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
    /// failed (it is retried on the next call).
    pub async fn flush(&mut self) -> bool {
        self.flush_with(false).await
    }

    /// Like [`flush`](Self::flush), with the poll bookkeeping the registry otherwise writes
    /// only once a minute (shutdown).
    pub async fn flush_all(&mut self) -> bool {
        self.flush_with(true).await
    }

    async fn flush_with(&mut self, everything: bool) -> bool {
        let (batch, staged) = match self.failed.take() {
            Some(retry) => retry,
            None => self.collect(everything),
        };
        if batch.is_empty() {
            return true;
        }
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
        match committed {
            Ok((_, Ok(()))) => {
                self.metrics.accounting.publish(staged);
                true
            }
            Ok((batch, Err(e))) => {
                tracing::error!(error = %e, rows = batch.len(), "state commit failed; retrying");
                self.metrics
                    .store_errors
                    .with_label_values(&["commit"])
                    .inc();
                self.failed = Some((batch, staged));
                false
            }
            Err(join_error) => {
                tracing::error!(error = %join_error, "state commit task failed");
                false
            }
        }
    }

    /// Takes every provider's pending work into one batch. (A provider's lists are moved,
    /// not copied, when they are the first: a burst's batch is large.)
    fn collect(&mut self, everything: bool) -> (Batch, Staged) {
        let now = now_millis();
        let mut batch = Batch::default();
        let mut staged = Staged::default();
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
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
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
