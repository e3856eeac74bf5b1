//! Command line: parsing and wiring only.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use genai_task_exporter::app::App;
use genai_task_exporter::clock::Clock;
use genai_task_exporter::config::{self, Overrides, Settings};
use genai_task_exporter::logging::{self, Format, Level};
use genai_task_exporter::metrics::VERSION;
use genai_task_exporter::simulator::{SimConfig, Simulator};
use genai_task_exporter::startup::{Application, Options};
use genai_task_exporter::web::{self, Web};
use genai_task_exporter::{demo, reshard, upstream};

#[derive(Debug, Parser)]
#[command(
    name = "genai-task-exporter",
    version = VERSION,
    about = "Prometheus exporter for asynchronous AI image and video generation tasks (maxapi.io, apimall.ai)."
)]
struct Cli {
    /// Configuration file.
    #[arg(
        long = "config.file",
        value_name = "PATH",
        default_value = "config.yaml",
        global = true
    )]
    config_file: PathBuf,
    /// Address to listen on (overrides server.listen_address).
    #[arg(long = "web.listen-address", value_name = "ADDR", global = true)]
    listen_address: Option<String>,
    /// TLS and basic-auth configuration (Prometheus exporter-toolkit web-config format).
    #[arg(long = "web.config.file", value_name = "PATH", global = true)]
    web_config_file: Option<PathBuf>,
    /// Serve `GET /-/healthy` without basic auth (for liveness probes that send no credentials).
    #[arg(long = "web.health-without-auth", global = true)]
    health_without_auth: bool,
    /// Log level.
    #[arg(long = "log.level", value_enum, default_value = "info", global = true)]
    log_level: Level,
    /// Log format.
    #[arg(
        long = "log.format",
        value_enum,
        default_value = "logfmt",
        global = true
    )]
    log_format: Format,
    /// This replica's shard index (overrides sharding.index).
    #[arg(
        long = "shard.index",
        env = "GENAI_EXPORTER_SHARD_INDEX",
        global = true
    )]
    shard_index: Option<u32>,
    /// Number of shards (overrides sharding.count).
    #[arg(
        long = "shard.count",
        env = "GENAI_EXPORTER_SHARD_COUNT",
        global = true
    )]
    shard_count: Option<u32>,
    /// Start over with an empty state store when the one at state.path is empty (0 bytes)
    /// or corrupt, instead of refusing to start; the old file is kept, renamed.
    #[arg(long = "state.start-fresh", global = true)]
    start_fresh: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the configuration and print a summary; exit 0 when valid, 1 when not.
    CheckConfig,
    /// Run simulated providers and the exporter on loopback: no keys, no network.
    Demo {
        /// Address of the simulated providers.
        #[arg(
            long = "simulator.listen-address",
            value_name = "ADDR",
            default_value = "127.0.0.1:9851"
        )]
        simulator_address: String,
    },
    /// Move tasks between the stores of stopped shards after the shard count changed.
    Reshard {
        /// The state directories of shards 0, 1, ... (as many as --shard.count).
        #[arg(value_name = "STATE_DIR", required = true)]
        dirs: Vec<PathBuf>,
    },
    /// Serve only the simulated provider APIs (both providers' paths on one listener).
    Simulate {
        /// Address to listen on.
        #[arg(long = "listen", value_name = "ADDR", default_value = "127.0.0.1:9851")]
        listen: String,
        /// Simulator scenario (YAML); default: the demo's workload and faults.
        #[arg(long = "simulator.config", value_name = "PATH")]
        scenario: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_level, cli.log_format);
    genai_task_exporter::store::set_start_fresh(cli.start_fresh);
    let overrides = Overrides {
        listen_address: cli.listen_address.clone(),
        shard_index: cli.shard_index,
        shard_count: cli.shard_count,
    };
    let web_options = web::Options {
        health_without_auth: cli.health_without_auth,
    };
    match cli.command {
        Some(Command::CheckConfig) => {
            let mut code = match config::load(&cli.config_file, &overrides, &config::ProcessEnv) {
                Ok(settings) => {
                    print!("{}", settings.summary());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            };
            if let Some(path) = &cli.web_config_file {
                upstream::install_crypto_provider();
                match Web::load(path, web_options) {
                    Ok(_) => println!("web configuration {} is valid", path.display()),
                    Err(e) => {
                        eprintln!("{e}");
                        code = ExitCode::FAILURE;
                    }
                }
            }
            code
        }
        Some(Command::Reshard { dirs }) => {
            let count = cli.shard_count.unwrap_or(dirs.len() as u32);
            if count as usize != dirs.len() {
                eprintln!(
                    "reshard: give one state directory per shard ({count} for --shard.count {count}), in shard order"
                );
                return ExitCode::FAILURE;
            }
            match reshard::reshard(&dirs, count) {
                Ok(report) => {
                    println!(
                        "resharded to {count} shard(s): {} task(s) moved, {} kept, {} tombstone(s) moved",
                        report.tasks_moved, report.tasks_kept, report.tombstones_moved
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("reshard: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Some(Command::Demo { simulator_address }) => {
            let runtime = runtime();
            // Signals first: a SIGHUP or SIGTERM during start-up must not kill the process
            // with the signal's default action.
            let signals = runtime.block_on(async { Signals::install() });
            let listen = cli
                .listen_address
                .unwrap_or_else(|| "127.0.0.1:9850".to_string());
            runtime.block_on(run_demo(&listen, &simulator_address, signals))
        }
        Some(Command::Simulate { listen, scenario }) => {
            let runtime = runtime();
            let signals = runtime.block_on(async { Signals::install() });
            runtime.block_on(run_simulator(&listen, scenario, signals))
        }
        None => {
            let runtime = runtime();
            let signals = runtime.block_on(async { Signals::install() });
            let settings = match config::load(&cli.config_file, &overrides, &config::ProcessEnv) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "invalid configuration");
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            let web = match cli.web_config_file.as_deref() {
                None => None,
                Some(path) => {
                    upstream::install_crypto_provider();
                    match Web::load(path, web_options) {
                        Ok(web) => Some(web),
                        Err(e) => {
                            tracing::error!(error = %e, "invalid web configuration");
                            eprintln!("{e}");
                            return ExitCode::FAILURE;
                        }
                    }
                }
            };
            let options = Options {
                config_path: Some(cli.config_file),
                overrides,
                web,
                clock: Clock::system(),
            };
            runtime.block_on(run_exporter(settings, options, signals))
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

async fn run_exporter(settings: Settings, options: Options, signals: Signals) -> ExitCode {
    upstream::install_crypto_provider();
    match Application::build(settings, options).await {
        Ok(application) => serve(application, signals).await,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("cannot start: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_demo(exporter_address: &str, simulator_address: &str, signals: Signals) -> ExitCode {
    upstream::install_crypto_provider();
    let (exporter_listener, simulator_listener, state) =
        match demo::bind(exporter_address, simulator_address).await {
            Ok(bound) => bound,
            Err(e) => {
                eprintln!("cannot listen: {e}");
                return ExitCode::FAILURE;
            }
        };
    let exporter = exporter_listener.local_addr().expect("bound");
    let simulator = simulator_listener.local_addr().expect("bound");
    demo::start_simulator(
        Simulator::new(demo::simulator_config(exporter)),
        simulator_listener,
    );
    let settings = demo::settings(simulator, exporter, &state);
    let application =
        match Application::build_on(exporter_listener, settings, Options::default()).await {
            Ok(application) => application,
            Err(e) => {
                eprintln!("cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
    demo::start_proxied_client(exporter);
    print!("{}", demo::banner(exporter, simulator));
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let code = serve(application, signals).await;
    let _ = std::fs::remove_dir_all(&state);
    code
}

async fn run_simulator(listen: &str, scenario: Option<PathBuf>, signals: Signals) -> ExitCode {
    let config = match scenario {
        None => SimConfig::demo(),
        Some(path) => {
            let loaded = std::fs::read_to_string(&path)
                .map_err(|e| e.to_string())
                .and_then(|text| SimConfig::from_yaml(&text).map_err(|e| e.to_string()));
            match loaded {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    upstream::install_crypto_provider();
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().expect("bound");
    let sim = Simulator::new(config);
    sim.spawn_workload();
    println!(
        "simulated providers on http://{addr} (maxapi and apimall paths; ground truth: http://{addr}/_sim/truth)"
    );
    let _ = std::io::Write::flush(&mut std::io::stdout());
    match sim.serve(listener, signals.shutdown()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("simulator failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Serves until SIGINT/SIGTERM, reloading on SIGHUP; saves state on the way out.
async fn serve(application: Application, signals: Signals) -> ExitCode {
    let Signals {
        hangup,
        interrupt,
        terminate,
    } = signals;
    spawn_sighup_reload(application.app(), hangup);
    let shutdown = Signals {
        hangup: None,
        interrupt,
        terminate,
    }
    .shutdown();
    match application.run_until_stopped(shutdown).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}

/// The process signals, taken over from their default actions as soon as the process
/// starts (a signal that arrives before the application is up waits for it).
struct Signals {
    hangup: Option<Signal>,
    interrupt: Option<Signal>,
    terminate: Option<Signal>,
}

#[cfg(unix)]
type Signal = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Signal = std::convert::Infallible;

impl Signals {
    /// Installs the handlers (inside the runtime).
    fn install() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let take = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(signal = name, error = %e, "cannot handle signal");
                    None
                }
            };
            Signals {
                hangup: take(SignalKind::hangup(), "SIGHUP"),
                interrupt: take(SignalKind::interrupt(), "SIGINT"),
                terminate: take(SignalKind::terminate(), "SIGTERM"),
            }
        }
        #[cfg(not(unix))]
        Signals {
            hangup: None,
            interrupt: None,
            terminate: None,
        }
    }

    /// Completes on SIGINT or SIGTERM.
    async fn shutdown(self) {
        #[cfg(unix)]
        {
            let wait = |s: Option<Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(self.interrupt) => {},
                _ = wait(self.terminate) => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutting down");
    }
}

/// Reloads on every SIGHUP, including one that arrived during start-up.
fn spawn_sighup_reload(app: Arc<App>, hangup: Option<Signal>) {
    #[cfg(unix)]
    if let Some(mut hup) = hangup {
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading configuration");
                let reload = std::panic::AssertUnwindSafe(app.reload());
                if futures_util::FutureExt::catch_unwind(reload).await.is_err() {
                    tracing::error!(
                        "configuration reload panicked; keeping the running configuration"
                    );
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (app, hangup);
}
