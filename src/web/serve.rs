//! Serving the router: plain HTTP through `axum::serve`, or TLS through rustls and hyper,
//! with graceful shutdown either way.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{Web, auth};

/// A TLS handshake must finish within this time (a silent client holds no slot for long).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Request headers must arrive within this time (slow-header clients).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connections may take to finish after shutdown is asked for.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `router` on `listener` until `shutdown` completes, then lets open requests finish.
/// With `web`, every request passes its basic auth, rate limit and headers, and the
/// listener speaks TLS when it configures a certificate.
pub async fn serve<F>(
    listener: TcpListener,
    router: Router,
    web: Option<Arc<Web>>,
    shutdown: F,
) -> io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let Some(web) = web else {
        return axum::serve(listener, router.into_make_service())
            .with_graceful_shutdown(shutdown)
            .await;
    };
    let router = router.layer(axum::middleware::from_fn_with_state(
        web.clone(),
        auth::guard,
    ));
    if !web.is_tls() {
        return axum::serve(listener, router.into_make_service())
            .with_graceful_shutdown(shutdown)
            .await;
    }
    serve_tls(listener, router, web, shutdown).await
}

async fn serve_tls<F>(
    listener: TcpListener,
    router: Router,
    web: Arc<Web>,
    shutdown: F,
) -> io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    // Connections watch `stop` to finish gracefully; `done` closes when the last one ends.
    let (stop_tx, stop_rx) = watch::channel(());
    let (done_tx, done_rx) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // The current configuration, so that a rotated certificate serves new connections.
        let config = web.config();
        let Some(tls) = config.tls.clone() else {
            continue;
        };
        let http2 = config.http2;
        let router = router.clone();
        let mut stop = stop_rx.clone();
        let done = done_rx.clone();
        tokio::spawn(async move {
            let _done = done;
            let _ = stream.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            let stream =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            if !http2 {
                builder = builder.http1_only();
            }
            let service = TowerToHyperService::new(router);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop_tx.send(());
    drop(done_rx);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, done_tx.closed()).await;
    Ok(())
}
