//! The listener side of every endpoint: TLS (with client certificates), basic auth, extra
//! response headers and a request rate limit, from `--web.config.file` in the Prometheus
//! exporter-toolkit format. Without that flag the router is served as plain HTTP.
//!
//! The web configuration and the certificates it names are re-read on reload (SIGHUP,
//! `POST /-/reload`) and when one of those files changes on disk (checked at most once a
//! second, on new connections and requests), so a rotated certificate is served without a
//! restart. A file that no longer loads keeps the running configuration.

pub(crate) mod auth;
pub mod config;
pub(crate) mod limits;
pub(crate) mod serve;
pub(crate) mod tls;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

pub use config::WebConfig;
pub(crate) use serve::serve;

use crate::config::{ConfigError, Problem};

/// How often, at most, the files are checked for changes.
const CHANGE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Options from the command line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// `--web.health-without-auth`: `GET /-/healthy` needs no basic auth (kubelet probes).
    pub health_without_auth: bool,
}

/// The running web configuration, reloadable.
pub struct Web {
    path: PathBuf,
    current: RwLock<Arc<WebConfig>>,
    /// Whether the listener was started with TLS: switching needs a restart.
    tls: bool,
    pub(crate) health_without_auth: bool,
    pub(crate) verifier: auth::Verifier,
    pub(crate) limiter: auth::Limiter,
    last_check: Mutex<Instant>,
    /// The file stamps of the last automatic reload that failed, not to retry it every second.
    failed: Mutex<Option<Vec<Option<config::FileStamp>>>>,
}

impl std::fmt::Debug for Web {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Web").field("path", &self.path).finish()
    }
}

impl Web {
    /// Loads `path`; an error names the file and the key.
    pub fn load(path: &Path, options: Options) -> Result<Arc<Web>, ConfigError> {
        let config = config::load(path)?;
        log_loaded(&config);
        Ok(Arc::new(Web {
            path: path.to_path_buf(),
            tls: config.tls.is_some(),
            current: RwLock::new(Arc::new(config)),
            health_without_auth: options.health_without_auth,
            verifier: auth::Verifier::default(),
            limiter: auth::Limiter::default(),
            last_check: Mutex::new(Instant::now()),
            failed: Mutex::new(None),
        }))
    }

    pub(crate) fn is_tls(&self) -> bool {
        self.tls
    }

    /// The configuration to use now; re-reads it first when one of its files changed.
    pub fn config(&self) -> Arc<WebConfig> {
        self.check_for_changes();
        self.current.read().expect("web config lock").clone()
    }

    /// Re-reads the file and the certificates. On error the running configuration stays.
    pub(crate) fn reload(&self) -> Result<(), ConfigError> {
        let config = config::load(&self.path)?;
        if config.tls.is_some() != self.tls {
            return Err(ConfigError::Invalid {
                file: self.path.display().to_string(),
                problems: vec![Problem {
                    path: "tls_server_config".into(),
                    message: "switching between TLS and plain HTTP needs a restart".into(),
                }],
            });
        }
        log_loaded(&config);
        *self.current.write().expect("web config lock") = Arc::new(config);
        *self.failed.lock().expect("web config lock") = None;
        Ok(())
    }

    fn check_for_changes(&self) {
        {
            let mut last = self.last_check.lock().expect("web config lock");
            if last.elapsed() < CHANGE_CHECK_INTERVAL {
                return;
            }
            *last = Instant::now();
        }
        let current = self.current.read().expect("web config lock").clone();
        let now: Vec<_> = current
            .stamps
            .iter()
            .map(|(path, _)| config::stamp(path))
            .collect();
        if current
            .stamps
            .iter()
            .map(|(_, s)| *s)
            .eq(now.iter().copied())
        {
            return;
        }
        if self.failed.lock().expect("web config lock").as_ref() == Some(&now) {
            return;
        }
        match self.reload() {
            Ok(()) => {
                tracing::info!(file = %self.path.display(), "web configuration files changed; reloaded")
            }
            Err(e) => {
                tracing::error!(error = %e, "web configuration files changed but do not load; keeping the running one");
                *self.failed.lock().expect("web config lock") = Some(now);
            }
        }
    }
}

fn log_loaded(config: &WebConfig) {
    for warning in &config.warnings {
        tracing::warn!(file = %config.source.display(), "{warning}");
    }
    tracing::info!(
        file = %config.source.display(),
        tls = config.tls.is_some(),
        basic_auth_users = config.users.len(),
        headers = config.headers.len(),
        "web configuration loaded"
    );
}
