//! Wiring: the store, registry, metrics and one runtime per provider (poller, discovery),
//! and the swap to a new configuration on reload.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use tokio::task::JoinHandle;

use crate::account;
use crate::background::{self, Worker, lock, read, write};
use crate::clock::Clock;
use crate::config::{self, ConfigError, Overrides, ProviderSettings, ProviderType, Settings};
use crate::discovery;
use crate::forward::{Forwarder, PeerTemplate};
use crate::metrics::Metrics;
use crate::persist::{Durability, Persister};
use crate::poller;
use crate::providers::{Adapter, apimall::Apimall, maxapi::Maxapi};
use crate::proxy::{self, ProviderKind, ProviderProxy, ProxyTable};
use crate::registry::{ProviderTasks, Registry};
use crate::store::{self, Store, StoreError};
use crate::task::now_millis;
use crate::upstream::{Upstream, UpstreamStatus, build_client};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("state store task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// The store holds tasks that hash to other shards: the shard count changed. Starting
    /// anyway would let the new owners count finished tasks a second time.
    #[error(
        "state store {path} holds {foreign} task(s) owned by other shards of {count}: the shard count changed; \
         stop every shard and run `genai-task-exporter reshard --shard.count {count} DIR...` first (see README, \"Scaling out\")"
    )]
    ForeignTasks {
        path: PathBuf,
        foreign: usize,
        count: u32,
    },
}

/// Builds the adapter of a provider's type.
pub(crate) fn adapter_for(settings: &ProviderSettings) -> Adapter {
    match settings.kind {
        ProviderType::Maxapi => Adapter::Maxapi(Maxapi::new()),
        ProviderType::Apimall => Adapter::Apimall(Apimall::new(settings.failure_rules.clone())),
    }
}

/// A running provider: its settings and the tasks working for it.
pub struct ProviderRuntime {
    pub(crate) settings: ProviderSettings,
    pub(crate) adapter: Adapter,
    pub upstream: Arc<Upstream>,
    pub tasks: Arc<ProviderTasks>,
    handles: Vec<JoinHandle<()>>,
    /// Whether history or balance requests run on their own, whatever the tasks.
    periodic_requests: bool,
}

impl ProviderRuntime {
    fn stop(&self) {
        for h in &self.handles {
            h.abort();
        }
    }

    /// Whether the provider has had its first poll: any upstream answer, or nothing to ask
    /// yet. A provider whose tasks wait for callbacks has nothing to ask until a task is
    /// overdue; it must not hold readiness back, or the callbacks (routed to ready replicas
    /// only) would never arrive.
    pub(crate) fn has_polled(&self) -> bool {
        let status = self.upstream.status();
        let nothing_to_ask = self.tasks.tracked() == 0 || self.settings.webhook_token.is_some();
        status.requests > 0 || (nothing_to_ask && !self.periodic_requests)
    }
}

/// What the landing page shows per provider.
#[derive(Debug, Clone)]
pub(crate) struct ProviderSummary {
    pub(crate) name: String,
    pub(crate) kind: &'static str,
    pub(crate) upstream: UpstreamStatus,
    pub(crate) tasks_by_status: Vec<(&'static str, u64)>,
    pub(crate) tracked: u64,
}

pub struct App {
    pub registry: Arc<Registry>,
    pub(crate) metrics: Arc<Metrics>,
    /// Commit progress: handlers wait on it before a 2xx.
    pub(crate) durability: Arc<Durability>,
    store: Arc<Store>,
    http: reqwest::Client,
    settings: RwLock<Arc<Settings>>,
    runtimes: RwLock<HashMap<String, ProviderRuntime>>,
    /// The one persister (flushes must not interleave) and its periodic task.
    persister: Arc<tokio::sync::Mutex<Persister>>,
    persister_task: Mutex<Option<JoinHandle<()>>>,
    loaded: AtomicBool,
    config_path: Option<PathBuf>,
    overrides: Overrides,
    /// Serializes reloads (SIGHUP and `POST /-/reload` may race).
    reload_lock: tokio::sync::Mutex<()>,
    /// Other files re-read with the configuration (the web configuration).
    reload_hooks: Mutex<Vec<ReloadHook>>,
    /// Drives the pollers' and discovery loops' schedules.
    clock: Clock,
    /// The providers served under `/proxy/{provider}`, replaced whole on reload.
    proxies: ProxyTable,
    /// Sends ids seen through the proxy to the replicas that own them.
    forwarder: Option<Arc<Forwarder>>,
}

/// One run of a provider's background task, restarted by `background::spawn_supervised`
/// after a panic.
type BoxedRun = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
/// Builds a new run of a background task.
type MakeRun = Box<dyn FnMut() -> BoxedRun + Send>;

/// The forwarder of `sharding.peer_url_template` (checked with the configuration).
fn forwarder_for(settings: &Settings, metrics: &Arc<Metrics>) -> Option<Arc<Forwarder>> {
    let template = settings.peer_url_template.as_deref()?;
    let template = PeerTemplate::parse(template, settings.shard.count.max(1)).ok()?;
    let token = settings.api_token.clone()?;
    Some(Forwarder::start(
        template,
        settings.shard,
        settings.listen_address,
        token,
        metrics.clone(),
    ))
}

/// Re-reads something on reload; an error is reported like a configuration error.
pub(crate) type ReloadHook = Box<dyn Fn() -> Result<(), ConfigError> + Send + Sync>;

impl App {
    /// Opens the store, restores counters and tasks, and starts every provider.
    pub async fn start(
        settings: Settings,
        config_path: Option<PathBuf>,
        overrides: Overrides,
    ) -> Result<Arc<App>, StartError> {
        App::start_with_clock(settings, config_path, overrides, Clock::system()).await
    }

    /// [`App::start`] with the schedules driven by `clock`.
    pub(crate) async fn start_with_clock(
        settings: Settings,
        config_path: Option<PathBuf>,
        overrides: Overrides,
        clock: Clock,
    ) -> Result<Arc<App>, StartError> {
        let registry = Arc::new(Registry::new(
            settings.max_models_per_provider,
            settings.shard,
        ));
        let metrics = Arc::new(Metrics::new(settings.latency_buckets.clone()));
        metrics.set_shard(settings.shard.index, settings.shard.count);

        let state_path = settings.state_path.clone();
        let started = std::time::Instant::now();
        let shard = settings.shard;
        let (store, counters, foreign) = tokio::task::spawn_blocking(move || {
            let store = Store::open(&state_path)?;
            let counters = store.load_counters()?;
            // A single shard owns every task: no need to read the keys.
            let mut foreign = 0;
            if shard.count > 1 {
                store.for_each_key(|key| {
                    if store::split_task_key(key).is_some_and(|(p, id)| !shard.owns(p, id)) {
                        foreign += 1;
                    }
                })?;
            }
            Ok::<_, StoreError>((store, counters, foreign))
        })
        .await??;
        if foreign > 0 {
            return Err(StartError::ForeignTasks {
                path: store.path().to_path_buf(),
                foreign,
                count: settings.shard.count,
            });
        }
        let store = Arc::new(store);
        metrics.restore(&counters);

        let durability = Durability::new();
        let persister = Persister::new(
            store.clone(),
            registry.clone(),
            metrics.clone(),
            durability.clone(),
        );
        let forwarder = forwarder_for(&settings, &metrics);
        let app = Arc::new(App {
            forwarder,
            registry,
            metrics,
            durability,
            store,
            http: build_client(),
            settings: RwLock::new(Arc::new(settings.clone())),
            runtimes: RwLock::new(HashMap::new()),
            persister: Arc::new(tokio::sync::Mutex::new(persister)),
            persister_task: Mutex::new(None),
            loaded: AtomicBool::new(false),
            config_path,
            overrides,
            reload_lock: tokio::sync::Mutex::new(()),
            reload_hooks: Mutex::new(Vec::new()),
            clock,
            proxies: ProxyTable::default(),
        });

        // Rows are read in place, straight into the registry (rows of providers no longer
        // configured are not read at all).
        let providers: Vec<Arc<ProviderTasks>> = settings
            .providers
            .iter()
            .map(|p| app.registry.provider_or_insert(&p.name, &p.polling))
            .collect();
        let counted_models: Vec<Vec<String>> = providers
            .iter()
            .map(|tasks| app.metrics.counted_models(tasks.name()))
            .collect();
        let store_for_restore = app.store.clone();
        let restored = tokio::task::spawn_blocking(move || {
            // With one provider, every stored task is its own: size the registry once.
            if let [tasks] = providers.as_slice() {
                let rows = store_for_restore.task_count()?;
                tasks.restorer().reserve(rows as usize);
            }
            let mut restored = 0;
            for (tasks, models) in providers.iter().zip(&counted_models) {
                tasks.restorer().models(models);
                restored += restore_provider(&store_for_restore, tasks)?;
            }
            Ok::<_, StoreError>(restored)
        })
        .await??;
        tracing::info!(
            tasks = restored,
            elapsed_ms = started.elapsed().as_millis() as u64,
            path = %app.store.path().display(),
            "state loaded"
        );

        app.apply(&settings);
        app.metrics.reload_successful.set(1);
        app.metrics
            .reload_success_timestamp
            .set(unix_seconds(SystemTime::now()));

        let persister = app.persister.clone();
        *lock(&app.persister_task) = Some(background::spawn_supervised(
            Worker::Persister,
            "",
            app.metrics.clone(),
            move || Persister::run(persister.clone()),
        ));
        app.loaded.store(true, Ordering::SeqCst);
        Ok(app)
    }

    pub(crate) fn settings(&self) -> Arc<Settings> {
        read(&self.settings).clone()
    }

    /// Starts, restarts or stops provider runtimes to match `settings`. Tasks of providers
    /// that stay are kept; counters are never touched.
    fn apply(&self, settings: &Settings) {
        let mut runtimes = write(&self.runtimes);
        let wanted: HashMap<&str, &ProviderSettings> = settings
            .providers
            .iter()
            .map(|p| (p.name.as_str(), p))
            .collect();

        let removed: Vec<String> = runtimes
            .keys()
            .filter(|name| !wanted.contains_key(name.as_str()))
            .cloned()
            .collect();
        for name in removed {
            if let Some(rt) = runtimes.remove(&name) {
                rt.stop();
                self.registry.remove_provider(&name);
                tracing::info!(provider = %name, "provider removed");
            }
        }

        for p in &settings.providers {
            if runtimes
                .get(&p.name)
                .is_some_and(|rt| same_runtime(&rt.settings, p))
            {
                continue;
            }
            // Out of the map before it stops: should starting the new one fail, the next
            // reload starts it instead of keeping a stopped runtime.
            if let Some(rt) = runtimes.remove(&p.name) {
                rt.stop();
                tracing::info!(provider = %p.name, "provider changed; restarting its pollers");
            }
            let tasks = match self.registry.provider(&p.name) {
                Some(tasks) => {
                    tasks.set_polling(&p.polling);
                    tasks
                }
                None => {
                    let tasks = self.registry.provider_or_insert(&p.name, &p.polling);
                    // A provider (re)added by reload continues from its stored tasks.
                    match restore_provider(&self.store, &tasks) {
                        Ok(_) => {}
                        Err(e) => {
                            tracing::error!(provider = %p.name, error = %e, "cannot load stored tasks")
                        }
                    }
                    tasks
                }
            };
            let runtime = self.start_provider(p, tasks);
            runtimes.insert(p.name.clone(), runtime);
        }
        let names: Vec<String> = settings.providers.iter().map(|p| p.name.clone()).collect();
        self.metrics.set_providers(&names);
        self.apply_proxies(settings);
        *write(&self.settings) = Arc::new(settings.clone());
    }

    /// Builds the proxies of the providers with `proxy.enabled` and swaps them in at once.
    /// A proxy is cheap to build (its client pools connections lazily), so a reload builds
    /// them all again; requests in flight finish on the proxy they started with.
    fn apply_proxies(&self, settings: &Settings) {
        let proxies: Vec<ProviderProxy> = settings
            .providers
            .iter()
            .filter(|p| p.proxy.enabled)
            .filter_map(|p| {
                let observer = Arc::new(proxy::Traffic::new(
                    self.registry.clone(),
                    self.metrics.clone(),
                    adapter_for(p),
                    self.clock,
                ).with_forwarder(self.forwarder.clone()));
                let kind = match p.kind {
                    ProviderType::Maxapi => ProviderKind::Maxapi,
                    ProviderType::Apimall => ProviderKind::Apimall,
                };
                ProviderProxy::new(
                    p.name.clone(),
                    kind,
                    &p.base_url,
                    &p.proxy,
                    p.failure_rules.clone(),
                    observer,
                )
                .inspect_err(|e| {
                    tracing::error!(provider = %p.name, error = %e, "cannot serve the proxy of this provider")
                })
                .ok()
            })
            .collect();
        let before = self.proxies.names();
        self.proxies.replace(proxies);
        let after = self.proxies.names();
        if before != after {
            tracing::info!(providers = ?after, "proxy serving /proxy/{{provider}}");
        }
    }

    /// The proxied providers, for the `/proxy/...` routes.
    pub fn proxies(&self) -> ProxyTable {
        self.proxies.clone()
    }

    fn start_provider(&self, p: &ProviderSettings, tasks: Arc<ProviderTasks>) -> ProviderRuntime {
        let adapter = adapter_for(p);
        let upstream = Arc::new(Upstream::new(p, self.http.clone(), self.metrics.clone()));
        let clock = self.clock;
        // Callbacks and history walks tell outcomes: polls are then only a safety net.
        tasks.set_expect_callbacks(p.webhook_token.is_some() || p.history.is_some());
        tasks.reschedule_unscheduled(clock.now_millis());
        discovery::track_static(&tasks, &p.tasks, clock);

        // Each task is built again by its closure when it restarts after a panic.
        let metrics = &self.metrics;
        let supervised = |task: Worker, make: MakeRun| {
            background::spawn_supervised(task, &p.name, metrics.clone(), make)
        };
        let mut handles = vec![supervised(Worker::Poller, {
            let (tasks, upstream, adapter, metrics) = (
                tasks.clone(),
                upstream.clone(),
                adapter.clone(),
                metrics.clone(),
            );
            Box::new(move || {
                Box::pin(poller::run(
                    tasks.clone(),
                    upstream.clone(),
                    adapter.clone(),
                    metrics.clone(),
                    clock,
                ))
            })
        })];
        if !p.tasks.is_empty() {
            let (tasks, ids) = (tasks.clone(), p.tasks.clone());
            let interval = crate::registry::remention_interval(&p.polling);
            handles.push(supervised(
                Worker::Static,
                Box::new(move || {
                    Box::pin(discovery::keep_static(
                        tasks.clone(),
                        ids.clone(),
                        interval,
                        clock,
                    ))
                }),
            ));
        }
        if !p.task_files.is_empty() {
            let (settings, tasks, metrics) = (p.clone(), tasks.clone(), metrics.clone());
            handles.push(supervised(
                Worker::TaskFiles,
                Box::new(move || {
                    Box::pin(discovery::watch_task_files(
                        settings.clone(),
                        tasks.clone(),
                        metrics.clone(),
                        clock,
                    ))
                }),
            ));
        }
        if let Some(history) = &p.history {
            let (history, name, tasks, upstream, adapter, metrics) = (
                history.clone(),
                p.name.clone(),
                tasks.clone(),
                upstream.clone(),
                adapter.clone(),
                metrics.clone(),
            );
            handles.push(supervised(
                Worker::History,
                Box::new(move || {
                    Box::pin(discovery::poll_history(
                        history.clone(),
                        name.clone(),
                        tasks.clone(),
                        upstream.clone(),
                        adapter.clone(),
                        metrics.clone(),
                        clock,
                    ))
                }),
            ));
        }
        // The balance is one account-wide number: shard 0 alone asks for it. History
        // pages are read by every shard, each keeping the tasks it owns (another shard's
        // tasks would otherwise never be found).
        let balance_owner = self.registry.shard().index == 0;
        if let Some(interval) = p.balance_interval.filter(|_| balance_owner) {
            let (name, upstream, adapter, metrics) = (
                p.name.clone(),
                upstream.clone(),
                adapter.clone(),
                metrics.clone(),
            );
            handles.push(supervised(
                Worker::Balance,
                Box::new(move || {
                    Box::pin(account::poll_balance(
                        interval,
                        name.clone(),
                        upstream.clone(),
                        adapter.clone(),
                        metrics.clone(),
                    ))
                }),
            ));
        }
        tracing::info!(provider = %p.name, kind = p.kind.as_str(), base_url = %p.base_url, "provider started");
        ProviderRuntime {
            settings: p.clone(),
            adapter,
            upstream,
            tasks,
            handles,
            periodic_requests: p.history.is_some()
                || (p.balance_interval.is_some() && balance_owner),
        }
    }

    /// Adds something to re-read on every reload, after the configuration file.
    pub(crate) fn on_reload(&self, hook: ReloadHook) {
        lock(&self.reload_hooks).push(hook);
    }

    /// Re-reads the configuration file and then runs the reload hooks. Each file that loads
    /// replaces the running one; one that does not is reported and changes nothing. The
    /// reload counts as successful (gauge 1, timestamp moved) only when everything loaded.
    pub async fn reload(&self) -> Result<(), ConfigError> {
        let _guard = self.reload_lock.lock().await;
        let result = self.reload_config_file().await;
        let mut hook_error = None;
        for hook in lock(&self.reload_hooks).iter() {
            if let Err(e) = hook() {
                tracing::error!(error = %e, "reload failed; keeping the running web configuration");
                hook_error.get_or_insert(e);
            }
        }
        let result = result.and_then(|()| hook_error.map_or(Ok(()), Err));
        if result.is_ok() {
            self.metrics.reload_successful.set(1);
            self.metrics
                .reload_success_timestamp
                .set(unix_seconds(SystemTime::now()));
        } else {
            self.metrics.reload_successful.set(0);
        }
        result
    }

    async fn reload_config_file(&self) -> Result<(), ConfigError> {
        let Some(path) = self.config_path.clone() else {
            return Ok(()); // demo: built-in configuration, nothing to re-read
        };
        let overrides = self.overrides.clone();
        let file = path.display().to_string();
        let loaded = tokio::task::spawn_blocking(move || {
            config::load(&path, &overrides, &config::ProcessEnv)
        })
        .await
        .unwrap_or_else(|_panicked| {
            // A bug, not a bad file: the running configuration is kept all the same.
            Err(ConfigError::Parse {
                file,
                message: "loading the configuration panicked".into(),
            })
        });
        match loaded {
            Ok(mut settings) => {
                let current = self.settings();
                // Listener, store and shard cannot change under a running process.
                for (what, changed) in [
                    (
                        "listen address",
                        settings.listen_address != current.listen_address,
                    ),
                    ("state.path", settings.state_path != current.state_path),
                    (
                        "sharding",
                        settings.shard != current.shard
                            || settings.peer_url_template != current.peer_url_template,
                    ),
                    (
                        "metrics",
                        settings.latency_buckets != current.latency_buckets
                            || settings.max_models_per_provider != current.max_models_per_provider,
                    ),
                ] {
                    if changed {
                        tracing::warn!(
                            setting = what,
                            "changed in the file; takes effect at the next restart"
                        );
                    }
                }
                settings.listen_address = current.listen_address;
                settings.state_path = current.state_path.clone();
                settings.shard = current.shard;
                settings.latency_buckets = current.latency_buckets.clone();
                settings.max_models_per_provider = current.max_models_per_provider;
                self.apply(&settings);
                tracing::info!(file = %settings.source.display(), providers = settings.providers.len(), "configuration reloaded");
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "configuration reload failed; keeping the running configuration");
                Err(e)
            }
        }
    }

    /// Ready: state loaded, the store commits, and every provider polled once.
    pub fn is_ready(&self) -> bool {
        self.loaded.load(Ordering::SeqCst)
            && self.durability.is_up()
            && read(&self.runtimes)
                .values()
                .all(ProviderRuntime::has_polled)
    }

    /// The runtime of `provider`, for routes that need its adapter or tasks.
    pub fn with_runtime<T>(
        &self,
        provider: &str,
        f: impl FnOnce(&ProviderRuntime) -> T,
    ) -> Option<T> {
        read(&self.runtimes).get(provider).map(f)
    }

    pub(crate) fn summaries(&self) -> Vec<ProviderSummary> {
        let runtimes = read(&self.runtimes);
        let mut list: Vec<ProviderSummary> = runtimes
            .values()
            .map(|rt| {
                let gauges = rt.tasks.gauges();
                let mut by_status: Vec<(&'static str, u64)> = Vec::new();
                for (_, status, n) in &gauges.tasks {
                    match by_status.iter_mut().find(|(s, _)| *s == status.as_str()) {
                        Some((_, total)) => *total += n,
                        None => by_status.push((status.as_str(), *n)),
                    }
                }
                by_status.sort();
                ProviderSummary {
                    name: rt.settings.name.clone(),
                    kind: rt.settings.kind.as_str(),
                    upstream: rt.upstream.status(),
                    tasks_by_status: by_status,
                    tracked: gauges.tracked,
                }
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Stops every provider and commits what is pending. Called once, at shutdown.
    pub async fn shutdown(&self) {
        for rt in read(&self.runtimes).values() {
            rt.stop();
        }
        if let Some(h) = lock(&self.persister_task).take() {
            h.abort();
        }
        let mut persister = self.persister.lock().await;
        let mut saved = false;
        for _ in 0..3 {
            saved = persister.flush_all().await;
            if saved {
                break;
            }
        }
        if saved {
            tracing::info!("state saved");
        } else {
            tracing::error!(
                pending_rows = persister.pending_rows(),
                "final state commit failed: changes since the last commit are lost"
            );
        }
    }

    /// Commits pending changes now (tests and shutdown).
    pub async fn flush(&self) {
        self.persister.lock().await.flush_all().await;
    }
}

/// Restores the stored tasks, tombstones and learnt completion times of one provider;
/// returns how many tasks.
fn restore_provider(store: &Store, tasks: &ProviderTasks) -> Result<usize, StoreError> {
    let now = now_millis();
    let mut restorer = tasks.restorer();
    let mut restored = 0;
    store.for_each_latency(tasks.name(), |model, row| {
        if !restorer.latencies(model, row) {
            tracing::warn!(
                provider = tasks.name(),
                model,
                "skipping stored completion times"
            );
        }
    })?;
    store.for_each_task(tasks.name(), |key, record| {
        let Some((_, id)) = store::split_task_key(key) else {
            return;
        };
        match restorer.task(id, record, now) {
            Ok(()) => restored += 1,
            Err(e) => {
                tracing::warn!(provider = tasks.name(), task = id, error = %e, "skipping stored task")
            }
        }
    })?;
    store.for_each_tombstone(tasks.name(), |key, last| {
        if let Some((_, id)) = store::split_task_key(key) {
            restorer.tombstone(id, last);
        }
    })?;
    Ok(restored)
}

/// Whether a running provider can keep running unchanged under `new`.
fn same_runtime(old: &ProviderSettings, new: &ProviderSettings) -> bool {
    old.kind == new.kind
        && old.base_url == new.base_url
        && old.token == new.token
        && old.polling == new.polling
        && old.tasks == new.tasks
        && old.task_files == new.task_files
        && old.webhook_token == new.webhook_token
        && old.history == new.history
        && old.balance_interval == new.balance_interval
        && old.failure_rules_source == new.failure_rules_source
}

pub(crate) fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}
