//! Background tasks that outlive their own panics: a panic is caught, logged, counted in
//! `genai_exporter_task_panics_total{task}`, and the task is started again after a back-off.
//! Also the lock helpers that keep serving when such a panic poisoned a std lock.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;

/// First pause before a panicked task runs again; doubles up to [`RESTART_MAX`].
const RESTART_MIN: Duration = Duration::from_secs(1);
/// Longest pause; a task that ran this long before panicking starts over at [`RESTART_MIN`].
const RESTART_MAX: Duration = Duration::from_secs(60);
/// Panic messages are logged cut to this many bytes.
const MAX_PANIC_TEXT: usize = 200;

/// The background tasks (the `task` label of `genai_exporter_task_panics_total`: a fixed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Worker {
    Poller,
    History,
    Balance,
    TaskFiles,
    Static,
    Persister,
}

impl Worker {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Worker::Poller => "poller",
            Worker::History => "history",
            Worker::Balance => "balance",
            Worker::TaskFiles => "task_files",
            Worker::Static => "static",
            Worker::Persister => "persister",
        }
    }
}

/// Spawns `make()` and, each time it panics, logs, counts and spawns it again after a
/// back-off. Returns when a run ends normally; aborting the handle stops it for good.
/// `scope` names the instance in logs (a provider name, or empty).
pub(crate) fn spawn_supervised<F, Fut>(
    task: Worker,
    scope: &str,
    metrics: Arc<Metrics>,
    mut make: F,
) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let scope = scope.to_string();
    tokio::spawn(async move {
        let mut pause = RESTART_MIN;
        loop {
            let started = tokio::time::Instant::now();
            let Err(panic) = AssertUnwindSafe(make()).catch_unwind().await else {
                return;
            };
            if started.elapsed() >= RESTART_MAX {
                pause = RESTART_MIN;
            }
            report_panic(task, &scope, &metrics, panic.as_ref(), pause);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RESTART_MAX);
        }
    })
}

/// Logs and counts a panic caught in `task`.
pub(crate) fn report_panic(
    task: Worker,
    scope: &str,
    metrics: &Metrics,
    panic: &(dyn Any + Send),
    restart_in: Duration,
) {
    metrics.count_task_panic(task.as_str());
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    tracing::error!(
        task = task.as_str(),
        scope,
        panic = %crate::task::truncate(message, MAX_PANIC_TEXT),
        restart_in_ms = restart_in.as_millis() as u64,
        "background task panicked; restarting it"
    );
}

/// Locks `mutex`, recovering it when a panic poisoned it. Only for state that stays
/// consistent whatever line panicked (values replaced whole, maps updated in one call).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// [`lock`] for reading an `RwLock`.
pub(crate) fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// [`lock`] for writing an `RwLock`.
pub(crate) fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(vec![1.0]))
    }

    fn panics_counted(metrics: &Metrics, task: &str) -> u64 {
        metrics.task_panics.with_label_values(&[task]).get()
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_counted_and_restarted_with_back_off() {
        let metrics = metrics();
        let runs = Arc::new(AtomicU32::new(0));
        let counter = runs.clone();
        let handle = spawn_supervised(Worker::History, "am", metrics.clone(), move || {
            let run = counter.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if run <= 3 {
                    panic!("run {run} fails");
                }
                // The fourth run lives on until aborted.
                std::future::pending::<()>().await
            }
        });
        tokio::task::yield_now().await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(panics_counted(&metrics, "history"), 1);
        // Back-off 1 s, then 2 s, then 4 s.
        tokio::time::sleep(Duration::from_millis(999)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1, "not before its back-off");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        tokio::time::sleep(Duration::from_millis(2_000)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        tokio::time::sleep(Duration::from_millis(4_000)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 4);
        assert_eq!(panics_counted(&metrics, "history"), 3);
        assert_eq!(panics_counted(&metrics, "poller"), 0);
        handle.abort();
        assert!(handle.await.unwrap_err().is_cancelled());
    }

    #[test]
    fn a_poisoned_lock_still_serves() {
        let state = Arc::new(RwLock::new(vec![1]));
        let poisoner = state.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.write().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(state.read().is_err(), "the lock is poisoned");
        write(&state).push(2);
        assert_eq!(*read(&state), [1, 2]);
    }
}
