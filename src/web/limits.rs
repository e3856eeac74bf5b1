//! What the listener allows a connection: timeouts, the connection cap derived from the open
//! file limit, and the metrics that show what the listener closed and why.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::metrics::ListenerMetrics;

/// Request headers must arrive within this time, counted from the connection (or the end of
/// the previous request) to the end of the headers: one byte every few seconds does not help.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A TLS handshake must finish within this time.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection on which nothing was read or written for this long is closed (HTTP/1
/// keep-alive and HTTP/2 alike; a request in flight finishes first).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// After SIGTERM, open requests get this long to finish; the rest are closed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// File descriptors kept out of the connection cap: the store, upstream connections, task and
/// secret files, the listener itself, stdio and the runtime.
const FD_RESERVE: u64 = 128;
/// The cap never goes below this, however low the file limit.
const MIN_CONNECTIONS: u64 = 16;
/// Nor above this: an exporter has a few scrapers, not thousands of clients.
const MAX_CONNECTIONS: u64 = 4096;
/// Connections chosen for eviction whose descriptors are not closed yet, at most: beyond
/// this, new connections wait in the backlog until evicted ones are gone.
pub(crate) const EVICTION_SLACK: usize = 16;
/// Used when the open file limit cannot be read.
const FALLBACK_FD_LIMIT: u64 = 1024;

/// Overrides the timeouts, for tests only:
/// `header_read=2,tls_handshake=2,idle=3,drain=5` (seconds, each key optional).
pub(crate) const TIMEOUTS_ENV: &str = "GENAI_EXPORTER_LISTENER_TIMEOUTS";

/// Timeouts and the connection cap of one listener.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Limits {
    pub(crate) header_read_timeout: Duration,
    pub(crate) tls_handshake_timeout: Duration,
    pub(crate) idle_timeout: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) max_connections: usize,
}

impl Limits {
    /// The defaults, the cap from the process's open file limit, and the test override of
    /// [`TIMEOUTS_ENV`] when set.
    pub(crate) fn from_process() -> Limits {
        let mut limits = Limits {
            header_read_timeout: HEADER_READ_TIMEOUT,
            tls_handshake_timeout: TLS_HANDSHAKE_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            drain_timeout: DRAIN_TIMEOUT,
            max_connections: connection_cap(open_file_limit()),
        };
        if let Ok(spec) = std::env::var(TIMEOUTS_ENV) {
            limits.apply_overrides(&spec);
        }
        limits
    }

    fn apply_overrides(&mut self, spec: &str) {
        for item in spec.split(',').filter(|s| !s.trim().is_empty()) {
            let parsed = item.split_once('=').and_then(|(key, value)| {
                let seconds = value.trim().parse::<f64>().ok()?;
                let duration = Duration::try_from_secs_f64(seconds).ok()?;
                Some((key.trim(), duration))
            });
            match parsed {
                Some(("header_read", d)) => self.header_read_timeout = d,
                Some(("tls_handshake", d)) => self.tls_handshake_timeout = d,
                Some(("idle", d)) => self.idle_timeout = d,
                Some(("drain", d)) => self.drain_timeout = d,
                _ => tracing::warn!(variable = TIMEOUTS_ENV, item, "ignored"),
            }
        }
    }
}

/// The connection cap for a soft open file limit of `fd_limit`.
pub(crate) fn connection_cap(fd_limit: u64) -> usize {
    fd_limit
        .saturating_sub(FD_RESERVE)
        .clamp(MIN_CONNECTIONS, MAX_CONNECTIONS) as usize
}

/// The soft `RLIMIT_NOFILE`, read from `/proc/self/limits` (no `unsafe` needed).
fn open_file_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| soft_open_file_limit(&text))
        .unwrap_or(FALLBACK_FD_LIMIT)
}

/// Parses the "Max open files" line: soft limit, hard limit, unit; "unlimited" counts as the
/// fallback's opposite, the largest cap.
fn soft_open_file_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

// ---------------------------------------------------------------------------------------
// Open connections
// ---------------------------------------------------------------------------------------

/// What one connection is doing, shared between its task and the listener.
#[derive(Debug)]
pub(crate) struct Activity {
    started: Instant,
    /// Milliseconds after `started` of the last byte read or written.
    last_io_ms: AtomicU64,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    /// Set once the connection was chosen for eviction (it no longer counts toward the cap).
    evicting: AtomicBool,
    /// Asks the connection to close (the cap is reached and it is the longest idle).
    pub(crate) evict: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            started: Instant::now(),
            last_io_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            evicting: AtomicBool::new(false),
            evict: Notify::new(),
        }
    }

    pub(crate) fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_io_ms.store(ms, Ordering::Relaxed);
    }

    pub(crate) fn last_io(&self) -> Instant {
        self.started + Duration::from_millis(self.last_io_ms.load(Ordering::Relaxed))
    }

    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Withdraws an eviction that came as a request started: the connection counts again.
    pub(crate) fn keep(&self) {
        self.evicting.store(false, Ordering::Relaxed);
    }

    /// Marks a request as started until the returned guard drops.
    pub(crate) fn request(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// The open connections: counted, capped, and the longest idle one closed for a newcomer.
pub(crate) struct Connections {
    open: Mutex<HashMap<u64, Arc<Activity>>>,
    next_id: AtomicU64,
    pub(crate) cap: usize,
    metrics: ListenerMetrics,
    /// Woken whenever a connection's task ends.
    pub(crate) closed: Notify,
}

/// Removes its connection from the table when the connection's task ends.
pub(crate) struct Slot {
    connections: Arc<Connections>,
    id: u64,
    pub(crate) activity: Arc<Activity>,
}

impl Slot {
    /// Counts this connection's closing by the listener.
    pub(crate) fn count(&self, reason: Closed) {
        self.connections.count(reason);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.connections.open.lock().expect("connections lock");
        open.remove(&self.id);
        self.connections.metrics.open.set(open.len() as i64);
        drop(open);
        self.connections.closed.notify_waiters();
    }
}

impl Connections {
    pub(crate) fn new(cap: usize, metrics: ListenerMetrics) -> Arc<Connections> {
        metrics.limit.set(cap as i64);
        metrics.open.set(0);
        // Every reason's series exists from the start, at 0.
        for reason in Closed::ALL {
            metrics.rejected.with_label_values(&[reason.label()]);
        }
        Arc::new(Connections {
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            cap,
            metrics,
            closed: Notify::new(),
        })
    }

    /// Counts a connection the listener closed or could not accept.
    pub(crate) fn count(&self, reason: Closed) {
        self.metrics
            .rejected
            .with_label_values(&[reason.label()])
            .inc();
    }

    /// Open connections not already on their way out.
    pub(crate) fn len(&self) -> usize {
        let open = self.open.lock().expect("connections lock");
        open.values()
            .filter(|a| !a.evicting.load(Ordering::Relaxed))
            .count()
    }

    /// Open connections, counting those on their way out.
    pub(crate) fn total(&self) -> usize {
        self.open.lock().expect("connections lock").len()
    }

    /// Registers a new connection.
    pub(crate) fn admit(self: &Arc<Self>) -> Slot {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new());
        let mut open = self.open.lock().expect("connections lock");
        open.insert(id, activity.clone());
        self.metrics.open.set(open.len() as i64);
        Slot {
            connections: self.clone(),
            id,
            activity,
        }
    }

    /// Asks the connection that has no request in flight and was quiet the longest to close.
    /// False when every connection is busy with a request.
    pub(crate) fn evict_idlest(&self) -> bool {
        let open = self.open.lock().expect("connections lock");
        let idlest = open
            .values()
            .filter(|a| a.in_flight() == 0 && !a.evicting.load(Ordering::Relaxed))
            .min_by_key(|a| a.last_io());
        match idlest {
            Some(activity) => {
                activity.evicting.store(true, Ordering::Relaxed);
                activity.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------

/// Why the listener closed or refused a connection (`reason` label).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Closed {
    /// Request headers (or the first request) did not arrive in time.
    HeaderTimeout,
    /// The TLS handshake did not finish in time.
    TlsHandshakeTimeout,
    /// The TLS handshake failed.
    TlsHandshakeFailed,
    /// Nothing was read or written for the idle timeout.
    IdleTimeout,
    /// Closed to make room for a new connection at the cap, or refused there.
    ConnectionLimit,
    /// `accept` failed (out of file descriptors and the like).
    AcceptError,
    /// Still open at the end of the drain after SIGTERM.
    DrainTimeout,
}

impl Closed {
    const ALL: [Closed; 7] = [
        Closed::HeaderTimeout,
        Closed::TlsHandshakeTimeout,
        Closed::TlsHandshakeFailed,
        Closed::IdleTimeout,
        Closed::ConnectionLimit,
        Closed::AcceptError,
        Closed::DrainTimeout,
    ];

    fn label(self) -> &'static str {
        match self {
            Closed::HeaderTimeout => "header_timeout",
            Closed::TlsHandshakeTimeout => "tls_handshake_timeout",
            Closed::TlsHandshakeFailed => "tls_handshake_failed",
            Closed::IdleTimeout => "idle_timeout",
            Closed::ConnectionLimit => "connection_limit",
            Closed::AcceptError => "accept_error",
            Closed::DrainTimeout => "drain_timeout",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_keeps_a_reserve_and_stays_in_bounds() {
        assert_eq!(connection_cap(1024), 896);
        assert_eq!(connection_cap(256), 128);
        assert_eq!(connection_cap(64), 16);
        assert_eq!(connection_cap(1 << 20), 4096);
        assert_eq!(connection_cap(u64::MAX), 4096);
    }

    #[test]
    fn reads_the_soft_open_file_limit() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             63448                63448                processes \n\
                    Max open files            256                  524288               files     \n";
        assert_eq!(soft_open_file_limit(text), Some(256));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(soft_open_file_limit(unlimited), Some(u64::MAX));
        assert_eq!(soft_open_file_limit("nothing"), None);
    }

    #[test]
    fn timeouts_can_be_overridden_for_tests() {
        let mut limits = Limits::from_process();
        limits.apply_overrides("header_read=0.5, idle=3,drain=1,bogus=2,tls_handshake=x");
        assert_eq!(limits.header_read_timeout, Duration::from_millis(500));
        assert_eq!(limits.idle_timeout, Duration::from_secs(3));
        assert_eq!(limits.drain_timeout, Duration::from_secs(1));
        assert_eq!(limits.tls_handshake_timeout, TLS_HANDSHAKE_TIMEOUT);
    }
}
