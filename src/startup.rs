//! Start-up, in one place for the binary (run and demo) and the tests: bind the listener,
//! start the application, serve until asked to stop, save state on the way out.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::app::{App, StartError};
use crate::clock::Clock;
use crate::config::{Overrides, Settings};
use crate::http;
use crate::metrics::VERSION;
use crate::web::{self, Web};

/// How the application is started, besides its settings.
#[derive(Default)]
pub struct Options {
    /// The configuration file re-read on reload; `None` when the settings were built in
    /// (demo, tests): reload then re-reads nothing but the web configuration.
    pub config_path: Option<PathBuf>,
    /// Command-line overrides, applied again on reload.
    pub overrides: Overrides,
    /// TLS, basic auth and headers; also re-read on reload.
    pub web: Option<Arc<Web>>,
    /// Drives the schedules (`Clock::system()` but in timing tests).
    pub clock: Clock,
}

/// A started exporter, not yet serving.
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    app: Arc<App>,
    web: Option<Arc<Web>>,
}

impl Application {
    /// Binds `settings.listen_address`, then starts the application (store, providers).
    pub async fn build(settings: Settings, options: Options) -> Result<Application, StartError> {
        let address = settings.listen_address;
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| StartError::Listen { address, source })?;
        Application::build_on(listener, settings, options).await
    }

    /// Same, on a listener bound beforehand (when others must know the address first).
    pub async fn build_on(
        listener: TcpListener,
        settings: Settings,
        options: Options,
    ) -> Result<Application, StartError> {
        let addr = listener.local_addr().map_err(|source| StartError::Listen {
            address: settings.listen_address,
            source,
        })?;
        let app = App::start_with_clock(
            settings,
            options.config_path,
            options.overrides,
            options.clock,
        )
        .await?;
        if let Some(web) = &options.web {
            let web = web.clone();
            app.on_reload(Box::new(move || web.reload()));
        }
        Ok(Application {
            listener,
            addr,
            app,
            web: options.web,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether it serves HTTPS.
    pub fn is_tls(&self) -> bool {
        self.web.as_ref().is_some_and(|w| w.is_tls())
    }

    /// The running state (reload, flush, readiness).
    pub fn app(&self) -> Arc<App> {
        self.app.clone()
    }

    /// Serves until `shutdown` completes, then stops the providers and commits what is
    /// pending. The error is the listener's.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let tls = self.is_tls();
        tracing::info!(address = %self.addr, version = VERSION, tls, "listening");
        let result = web::serve(
            self.listener,
            http::router(self.app.clone()),
            self.web,
            self.app.metrics.listener.clone(),
            shutdown,
        )
        .await;
        self.app.shutdown().await;
        result
    }
}
