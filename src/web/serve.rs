//! Serving the router, plain HTTP or TLS through rustls, on one accept loop with hyper:
//! header-read, TLS-handshake and idle timeouts, a connection cap that leaves file descriptors
//! for the rest of the exporter, and a bounded drain on shutdown (see `docs/security.md`).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;

use super::limits::{Activity, Closed, Connections, EVICTION_SLACK, Limits, Slot};
use super::{Web, auth};
use crate::logging::LogGate;
use crate::metrics::ListenerMetrics;

/// Back-off after a failed `accept`, doubled while it keeps failing.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` until `shutdown` completes, then drains open requests for a
/// few seconds and closes the rest. With `web`, every request passes its basic auth, rate
/// limit and headers, and the listener speaks TLS when it configures a certificate.
/// Timeouts and the connection cap are [`Limits::from_process`]; `metrics` shows the open
/// connections, the cap and what the listener closed.
pub(crate) async fn serve<F>(
    listener: TcpListener,
    router: Router,
    web: Option<Arc<Web>>,
    metrics: ListenerMetrics,
    shutdown: F,
) -> io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let limits = Limits::from_process();
    let connections = Connections::new(limits.max_connections, metrics);
    let mut router = router;
    if let Some(web) = &web {
        router = router.layer(axum::middleware::from_fn_with_state(
            web.clone(),
            auth::guard,
        ));
    }
    let tls = web.filter(|w| w.is_tls());
    tracing::debug!(
        max_connections = limits.max_connections,
        header_read_timeout = ?limits.header_read_timeout,
        idle_timeout = ?limits.idle_timeout,
        drain_timeout = ?limits.drain_timeout,
        "listener limits"
    );

    // Connections watch `stop`; it carries the end of the drain once shutdown is asked for.
    let (stop_tx, stop_rx) = watch::channel(None::<tokio::time::Instant>);
    let mut tasks = JoinSet::new();
    let accept_log = LogGate::new();
    let refuse_log = LogGate::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    tokio::pin!(shutdown);
    'accept: loop {
        while tasks.try_join_next().is_some() {}
        // Evicted connections must be gone before more are accepted, or a burst of new ones
        // outruns them and the process runs out of descriptors.
        loop {
            let closed = connections.closed.notified();
            if connections.total() < connections.cap + EVICTION_SLACK {
                break;
            }
            tokio::select! {
                () = closed => {}
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                () = &mut shutdown => break 'accept,
            }
        }
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    conn
                }
                Err(e) => {
                    connections.count(Closed::AcceptError);
                    if let Some(suppressed) = accept_log.open() {
                        tracing::warn!(error = %e, suppressed, "accept failed; backing off");
                    }
                    if out_of_descriptors(&e) {
                        // Free a descriptor for the connection waiting in the backlog.
                        connections.evict_idlest();
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = &mut shutdown => break 'accept,
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
            () = &mut shutdown => break 'accept,
        };
        if connections.len() >= connections.cap && !connections.evict_idlest() {
            // Every connection has a request in flight: this one cannot have a slot.
            connections.count(Closed::ConnectionLimit);
            if let Some(suppressed) = refuse_log.open() {
                tracing::warn!(
                    cap = connections.cap,
                    suppressed,
                    "connection cap reached; connection refused"
                );
            }
            drop(stream);
            continue;
        }
        let slot = connections.admit();
        tasks.spawn(run_connection(
            stream,
            peer,
            tls.clone(),
            router.clone(),
            limits,
            slot,
            stop_rx.clone(),
        ));
    }
    drop(listener);
    let drain_end = tokio::time::Instant::now() + limits.drain_timeout;
    let _ = stop_tx.send(Some(drain_end));
    let open = tasks.len();
    // Each connection closes itself at `drain_end`; the margin only covers its last steps.
    let drained = tokio::time::timeout_at(drain_end + Duration::from_millis(500), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = tasks.len(),
            "connections still open after the drain; closing them"
        );
        tasks.abort_all();
    }
    tracing::debug!(open, "listener stopped");
    Ok(())
}

fn out_of_descriptors(e: &io::Error) -> bool {
    // EMFILE (24), ENFILE (23): per-process and system-wide file limits.
    matches!(e.raw_os_error(), Some(23 | 24))
}

async fn run_connection(
    stream: TcpStream,
    peer: SocketAddr,
    web: Option<Arc<Web>>,
    router: Router,
    limits: Limits,
    slot: Slot,
    mut stop: watch::Receiver<Option<tokio::time::Instant>>,
) {
    let _ = stream.set_nodelay(true);
    let activity = slot.activity.clone();
    let io = Tracked {
        inner: stream,
        activity: activity.clone(),
    };
    let Some(web) = web else {
        return serve_http(io, true, router, limits, &slot, stop).await;
    };
    // The current configuration, so that a rotated certificate serves new connections.
    let config = web.config();
    let Some(tls) = config.tls.clone() else {
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let handshake = tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(io));
    let stream = tokio::select! {
        result = handshake => match result {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                slot.count(Closed::TlsHandshakeFailed);
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                slot.count(Closed::TlsHandshakeTimeout);
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        },
        () = activity.evict.notified() => {
            slot.count(Closed::ConnectionLimit);
            return;
        }
        _ = stop.changed() => return,
    };
    serve_http(stream, config.http2, router, limits, &slot, stop).await;
}

/// Serves HTTP on an accepted (and TLS-terminated) connection, closing it when the first
/// request is late, when it stays idle, when it is evicted at the cap, or at the drain's end.
async fn serve_http<I>(
    io: I,
    http2: bool,
    router: Router,
    limits: Limits,
    slot: &Slot,
    mut stop: watch::Receiver<Option<tokio::time::Instant>>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = slot.activity.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper also applies this to the wait for the next request on a kept-alive HTTP/1
    // connection.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    if !http2 {
        builder = builder.http1_only();
    }
    let requests = activity.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let in_flight = requests.request();
        let router = router.clone();
        async move {
            let response = router.oneshot(request.map(Body::new)).await;
            drop(in_flight);
            response
        }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    // The first request's headers (HTTP/1 or HTTP/2, before hyper knows which) are due by then.
    let first_request_due = Instant::now() + limits.header_read_timeout;
    let drain_end = loop {
        let now = Instant::now();
        let mut due = activity.last_io() + limits.idle_timeout;
        if activity.requests() == 0 {
            due = due.min(first_request_due);
        }
        if due <= now {
            // A request in flight outlasts the idle timeout: look again later.
            due = now + limits.idle_timeout;
        }
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    if is_header_timeout(&*e) {
                        slot.count(Closed::HeaderTimeout);
                    } else {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                return;
            }
            () = tokio::time::sleep_until(due.into()) => {
                let now = Instant::now();
                if activity.requests() == 0 && now >= first_request_due {
                    slot.count(Closed::HeaderTimeout);
                    return;
                }
                if activity.in_flight() == 0 && now >= activity.last_io() + limits.idle_timeout {
                    slot.count(Closed::IdleTimeout);
                    break tokio::time::Instant::now() + limits.drain_timeout;
                }
            }
            () = activity.evict.notified() => {
                if activity.in_flight() == 0 {
                    slot.count(Closed::ConnectionLimit);
                    return;
                }
                activity.keep();
            }
            changed = stop.changed() => {
                let end = stop.borrow().unwrap_or_else(tokio::time::Instant::now);
                if changed.is_err() || activity.in_flight() == 0 {
                    // Nothing to finish: close now.
                    return;
                }
                break end;
            }
        }
    };
    // Let a request in flight finish (HTTP/2: GOAWAY, open streams finish), up to `drain_end`.
    conn.as_mut().graceful_shutdown();
    if tokio::time::timeout_at(drain_end, conn).await.is_err() {
        slot.count(Closed::DrainTimeout);
    }
}

fn is_header_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<hyper::Error>()
        .is_some_and(hyper::Error::is_timeout)
}

/// A stream that records when bytes last moved, for the idle timeout.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
