//! Command line: parsing and wiring only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use genai_task_exporter::app::App;
use genai_task_exporter::config::{self, Overrides, Settings};
use genai_task_exporter::logging::{self, Format, Level};
use genai_task_exporter::metrics::VERSION;
use genai_task_exporter::simulator::{SimConfig, Simulator};
use genai_task_exporter::web::{self, Web};
use genai_task_exporter::{demo, http, reshard, upstream};

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
        Some(Command::Demo { simulator_address }) => {
            let listen = cli
                .listen_address
                .unwrap_or_else(|| "127.0.0.1:9850".to_string());
            run_demo(&listen, &simulator_address)
        }
        Some(Command::Simulate { listen, scenario }) => run_simulator(&listen, scenario),
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
        None => {
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
            run_exporter(settings, Some(cli.config_file), overrides, web)
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn run_exporter(
    settings: Settings,
    config_path: Option<PathBuf>,
    overrides: Overrides,
    web: Option<std::sync::Arc<Web>>,
) -> ExitCode {
    upstream::install_crypto_provider();
    runtime().block_on(async move {
        let listen = settings.listen_address;
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(address = %listen, error = %e, "cannot listen");
                eprintln!("cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let app = match App::start(settings, config_path, overrides).await {
            Ok(app) => app,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(web) = &web {
            let web = web.clone();
            app.on_reload(Box::new(move || web.reload()));
        }
        serve(app, listener, web).await
    })
}

fn run_demo(exporter_address: &str, simulator_address: &str) -> ExitCode {
    upstream::install_crypto_provider();
    runtime().block_on(async move {
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
        let app = match App::start(settings, None, Overrides::default()).await {
            Ok(app) => app,
            Err(e) => {
                eprintln!("cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        print!("{}", demo::banner(exporter, simulator));
        let _ = std::io::Write::flush(&mut std::io::stdout());
        let code = serve(app, exporter_listener, None).await;
        let _ = std::fs::remove_dir_all(&state);
        code
    })
}

fn run_simulator(listen: &str, scenario: Option<PathBuf>) -> ExitCode {
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
    runtime().block_on(async move {
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
        match sim.serve(listener, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("simulator failed: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Serves until SIGINT/SIGTERM, reloading on SIGHUP; saves state on the way out.
async fn serve(
    app: std::sync::Arc<App>,
    listener: tokio::net::TcpListener,
    web: Option<std::sync::Arc<Web>>,
) -> ExitCode {
    let local: SocketAddr = listener
        .local_addr()
        .expect("bound listener has an address");
    let tls = web.as_ref().is_some_and(|w| w.is_tls());
    tracing::info!(address = %local, version = VERSION, tls, "listening");
    spawn_sighup_reload(app.clone());
    let result = web::serve(listener, http::router(app.clone()), web, shutdown_signal()).await;
    app.shutdown().await;
    match result {
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

fn spawn_sighup_reload(app: std::sync::Arc<App>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading configuration");
            let _ = app.reload().await;
        }
    });
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
}
