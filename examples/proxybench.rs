//! Proxy overhead benchmark, loopback only (`scripts/bench proxy` runs it).
//!
//! One run measures the same GET-task request (an application polling maxapi) three ways,
//! against the same local responder: straight to the responder, through nginx
//! `proxy_pass`, and through the exporter's `/proxy/{provider}/...` route. Targets take turns
//! within each round, so machine noise falls on all three alike. Added latency is a target's
//! percentile minus the direct one at the same concurrency.
//!
//! Every server is a child process: the responder (`proxybench responder`), nginx with a
//! generated configuration in a temporary directory, and the exporter binary given with
//! `--exporter-bin` (a generated configuration with `proxy.enabled: true`). Without a binary,
//! or when the binary does not serve `/proxy/`, the proxy engine alone (`proxy::router`, no
//! observer work) runs in a child (`proxybench engine`) and the table says so.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use genai_task_exporter::providers::FailureRules;
use genai_task_exporter::proxy::{
    self, ProviderKind, ProviderProxy, ProxyCode, ProxyEndpoint, ProxyObserver, ProxySettings,
    ProxyTable, Refusal, RejectReason, Submission, TaskAnswer,
};

const TASK_PATH: &str = "/api/v1/task/9db7d1ed-d1e5-4d11-9f3a-61f653b905ad";

#[derive(Parser)]
#[command(about = "genai-task-exporter proxy overhead benchmark (loopback only)")]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Sub {
    /// The local upstream: prints `listening ADDR`, serves until stdin closes.
    Responder,
    /// The proxy engine alone in front of UPSTREAM: prints `listening ADDR`.
    Engine {
        #[arg(long)]
        upstream: SocketAddr,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// The release exporter binary; without it the engine alone is measured.
    #[arg(long)]
    exporter_bin: Option<PathBuf>,
    /// Concurrency levels (requests in flight).
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    concurrency: Vec<usize>,
    /// Measured requests per target, level and round.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Unmeasured requests before each measurement.
    #[arg(long, default_value_t = 2_000)]
    warmup: usize,
    /// Rounds; the table shows the median of each figure.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The nginx executable (`scripts/bench proxy` installs it when missing).
    #[arg(long, default_value = "nginx")]
    nginx: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    genai_task_exporter::upstream::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match cli.command {
        Some(Sub::Responder) => runtime.block_on(responder()),
        Some(Sub::Engine { upstream }) => runtime.block_on(engine(upstream)),
        None => runtime.block_on(run(cli.run)),
    }
}

// ---------------------------------------------------------------------------------------
// The servers
// ---------------------------------------------------------------------------------------

/// Serve until the parent closes our stdin (it died or is done).
fn exit_when_stdin_closes() {
    std::thread::spawn(|| {
        let mut sink = String::new();
        let _ = std::io::stdin().read_line(&mut sink);
        std::process::exit(0);
    });
}

async fn announce(listener: &tokio::net::TcpListener) {
    println!("listening {}", listener.local_addr().expect("bound"));
    std::io::stdout().flush().expect("stdout");
}

/// A maxapi get-task answer (docs/providers.md §1), the same bytes for every request.
fn task_body() -> bytes::Bytes {
    bytes::Bytes::from_static(
        br#"{"code":0,"msg":"ok","data":{"taskId":"9db7d1ed-d1e5-4d11-9f3a-61f653b905ad","status":"PROCESSING","input":{"model":"nano-banana","prompt":"a lighthouse at dusk","ratio":"16:9","resolution":"2k"},"result":null,"failure_reason":null,"created_at":"2026-01-01T00:00:00Z","updated_at":"2026-01-01T00:00:00Z"}}"#,
    )
}

async fn responder() {
    use hyper::body::Incoming;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    announce(&listener).await;
    exit_when_stdin_closes();
    let body = task_body();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_request: hyper::Request<Incoming>| {
                let body = body.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(
                        hyper::Response::builder()
                            .header("content-type", "application/json")
                            .body(axum::body::Body::from(body))
                            .expect("response"),
                    )
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Drops what the proxy reports: the engine's own cost, without the exporter's.
struct IgnoreObserver;

impl ProxyObserver for IgnoreObserver {
    fn request_finished(&self, _: &str, _: ProxyEndpoint, _: ProxyCode, _: Duration) {}
    fn request_refused(&self, _: &str, _: Refusal) {}
    fn task_submitted(&self, _: &str, _: Submission) {}
    fn submit_rejected(&self, _: &str, _: RejectReason) {}
    fn task_answer(&self, _: &str, _: TaskAnswer) {}
}

async fn engine(upstream: SocketAddr) {
    let proxy = ProviderProxy::new(
        "maxapi",
        ProviderKind::Maxapi,
        &format!("http://{upstream}"),
        &ProxySettings {
            enabled: true,
            ..ProxySettings::default()
        },
        FailureRules::defaults(),
        Arc::new(IgnoreObserver),
    )
    .expect("proxy settings");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    announce(&listener).await;
    exit_when_stdin_closes();
    axum::serve(listener, proxy::router(ProxyTable::new([proxy])))
        .await
        .expect("serve");
}

/// A child process that runs until dropped: stdin closed (our own children) or killed.
struct Server {
    child: Child,
    kill_on_drop: bool,
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.kill_on_drop {
            // SIGTERM, not SIGKILL: nginx's master then stops its workers too.
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
        }
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// Starts `proxybench SUB ...` and reads the address it announces.
fn start_own(args: &[String]) -> (Server, SocketAddr) {
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start child");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("piped"))
        .read_line(&mut line)
        .expect("child address");
    let addr = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("child said {line:?}"));
    let server = Server {
        child,
        kill_on_drop: false,
    };
    (server, addr)
}

/// A loopback port free right now (the child binds it just after).
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

fn start_nginx(nginx: &Path, dir: &Path, upstream: SocketAddr) -> (Server, SocketAddr) {
    let addr = free_port();
    let d = dir.display();
    // The usual reverse-proxy set-up: pooled keep-alive connections to the upstream, no
    // access log (the exporter writes none per request either), answers buffered in memory.
    let config = format!(
        "worker_processes auto;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
           access_log off;\n\
           client_body_temp_path {d}/client_body;\n\
           proxy_temp_path {d}/proxy;\n\
           upstream responder {{ server {upstream}; keepalive 128; }}\n\
           server {{\n\
             listen {addr};\n\
             location / {{\n\
               proxy_pass http://responder;\n\
               proxy_http_version 1.1;\n\
               proxy_set_header Connection \"\";\n\
             }}\n\
           }}\n\
         }}\n"
    );
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, config).expect("write nginx.conf");
    let child = Command::new(nginx)
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&conf)
        .args(["-g", "daemon off; master_process on;"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "start {} (scripts/bench proxy installs it): {e}",
                nginx.display()
            )
        });
    (
        Server {
            child,
            kill_on_drop: true,
        },
        addr,
    )
}

fn start_exporter(bin: &Path, dir: &Path, upstream: SocketAddr) -> (Server, SocketAddr) {
    let addr = free_port();
    let d = dir.display();
    let config = format!(
        "server:\n  listen_address: {addr}\n\
         state:\n  path: {d}/state\n\
         providers:\n\
         \x20 - name: maxapi\n\
         \x20   type: maxapi\n\
         \x20   base_url: http://{upstream}\n\
         \x20   token_env: PROXYBENCH_EXPORTER_KEY\n\
         \x20   proxy: {{enabled: true}}\n"
    );
    let conf = dir.join("exporter.yaml");
    std::fs::write(&conf, config).expect("write exporter.yaml");
    let child = Command::new(bin)
        .arg("--config.file")
        .arg(&conf)
        .args(["--log.level", "warn"])
        .env("PROXYBENCH_EXPORTER_KEY", "exporter-own-key")
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
    (
        Server {
            child,
            kill_on_drop: true,
        },
        addr,
    )
}

/// Waits until `url` answers at all, then returns its status.
async fn wait_for(client: &reqwest::Client, url: &str) -> reqwest::StatusCode {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client.get(url).send().await {
            Ok(answer) => return answer.status(),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("{url} never answered: {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The load
// ---------------------------------------------------------------------------------------

struct Target {
    name: &'static str,
    url: String,
}

struct Sample {
    p50_us: f64,
    p99_us: f64,
    per_second: f64,
}

/// `requests` GETs of `url`, `concurrency` in flight, each loop on its own keep-alive
/// connection (the pool grows to `concurrency`).
async fn load(client: &reqwest::Client, url: &str, concurrency: usize, requests: usize) -> Sample {
    let per_loop = requests.div_ceil(concurrency);
    let started = Instant::now();
    let loops: Vec<_> = (0..concurrency)
        .map(|_| {
            let client = client.clone();
            let url = url.to_string();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_loop);
                for _ in 0..per_loop {
                    let sent = Instant::now();
                    let answer = client
                        .get(&url)
                        .header("authorization", "Bearer application-key")
                        .send()
                        .await
                        .expect("request");
                    assert_eq!(answer.status(), 200, "{url}");
                    let body = answer.bytes().await.expect("body");
                    assert_eq!(body.len(), task_body().len(), "{url}");
                    latencies.push(sent.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::with_capacity(per_loop * concurrency);
    for one in loops {
        all.extend(one.await.expect("load loop"));
    }
    let elapsed = started.elapsed();
    all.sort_unstable();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    Sample {
        p50_us: at(0.50).as_secs_f64() * 1e6,
        p99_us: at(0.99).as_secs_f64() * 1e6,
        per_second: all.len() as f64 / elapsed.as_secs_f64(),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

async fn run(args: RunArgs) {
    let dir = tempfile::Builder::new()
        .prefix("proxybench")
        .tempdir()
        .expect("temporary directory");
    let (_responder, upstream) = start_own(&["responder".into()]);
    let (_nginx, nginx_addr) = start_nginx(&args.nginx, dir.path(), upstream);

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()
        .expect("client");
    let mut engine_only = None;
    let mut exporter_server = None;
    let exporter_addr = match &args.exporter_bin {
        Some(bin) => {
            let (server, addr) = start_exporter(bin, dir.path(), upstream);
            let status = wait_for(&client, &format!("http://{addr}/proxy/maxapi{TASK_PATH}")).await;
            if status == 200 {
                exporter_server = Some(server);
                Some(addr)
            } else {
                eprintln!(
                    "{} answers {status} on /proxy/maxapi/...: no proxy route in this build; measuring the engine alone",
                    bin.display()
                );
                None
            }
        }
        None => None,
    };
    let exporter_addr = exporter_addr.unwrap_or_else(|| {
        let (server, addr) =
            start_own(&["engine".into(), "--upstream".into(), upstream.to_string()]);
        engine_only = Some(server);
        addr
    });
    let exporter_name = if exporter_server.is_some() {
        "exporter"
    } else {
        "proxy engine"
    };
    wait_for(&client, &format!("http://{nginx_addr}{TASK_PATH}")).await;

    let targets = [
        Target {
            name: "direct",
            url: format!("http://{upstream}{TASK_PATH}"),
        },
        Target {
            name: "nginx",
            url: format!("http://{nginx_addr}{TASK_PATH}"),
        },
        Target {
            name: exporter_name,
            url: format!("http://{exporter_addr}/proxy/maxapi{TASK_PATH}"),
        },
    ];

    // samples[level][target] = one Sample per round.
    let mut samples: Vec<Vec<Vec<Sample>>> = args
        .concurrency
        .iter()
        .map(|_| targets.iter().map(|_| Vec::new()).collect())
        .collect();
    for round in 0..args.rounds {
        for (level, &concurrency) in args.concurrency.iter().enumerate() {
            for (t, target) in targets.iter().enumerate() {
                load(&client, &target.url, concurrency, args.warmup).await;
                let sample = load(&client, &target.url, concurrency, args.requests).await;
                eprintln!(
                    "round {} c={concurrency:<3} {:<13} p50 {:>7.1} us  p99 {:>7.1} us  {:>7.0} req/s",
                    round + 1,
                    target.name,
                    sample.p50_us,
                    sample.p99_us,
                    sample.per_second
                );
                samples[level][t].push(sample);
            }
        }
    }

    println!(
        "\n| concurrency | path | p50 | p99 | added p50 | added p99 | req/s | req/s vs direct |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (level, &concurrency) in args.concurrency.iter().enumerate() {
        let figure =
            |t: usize, f: fn(&Sample) -> f64| median(samples[level][t].iter().map(f).collect());
        let (direct_p50, direct_p99, direct_rate) = (
            figure(0, |s| s.p50_us),
            figure(0, |s| s.p99_us),
            figure(0, |s| s.per_second),
        );
        for (t, target) in targets.iter().enumerate() {
            let (p50, p99, rate) = (
                figure(t, |s| s.p50_us),
                figure(t, |s| s.p99_us),
                figure(t, |s| s.per_second),
            );
            let added = |v: f64, base: f64| {
                if t == 0 {
                    "".to_string()
                } else {
                    format!("{:+.0} µs", v - base)
                }
            };
            println!(
                "| {concurrency} | {} | {p50:.0} µs | {p99:.0} µs | {} | {} | {rate:.0} | {:.2} |",
                target.name,
                added(p50, direct_p50),
                added(p99, direct_p99),
                rate / direct_rate
            );
        }
    }
    println!(
        "\n{} rounds (medians), {} measured requests per target, level and round after {} warm-up; one GET of a {}-byte maxapi task answer each.",
        args.rounds,
        args.requests,
        args.warmup,
        task_body().len()
    );
    drop(engine_only);
    drop(exporter_server);
}
