//! The listener under hostile clients, on the real binary: slow headers, a flood of idle
//! connections under a low open file limit, SIGTERM with slow clients, a silent TLS client.
//! Each test prints the figures it observed.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{BIN, Binary, Scrape};

/// The binary, started with `prefix` (e.g. `prlimit ...`) in front, its stderr collected.
struct Exporter {
    binary: Binary,
    _dir: tempfile::TempDir,
}

impl Exporter {
    fn start(prefix: &[&str], extra_args: &[&str], timeouts: &str) -> Exporter {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("idle.key");
        std::fs::write(&key, "idle-key").unwrap();
        let config = dir.path().join("config.yaml");
        std::fs::write(
            &config,
            format!(
                "state:\n  path: {}\nproviders:\n  - name: idle\n    type: maxapi\n    base_url: http://127.0.0.1:9\n    token_file: {}\n",
                dir.path().join("state").display(),
                key.display()
            ),
        )
        .unwrap();
        let mut command = match prefix.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(BIN);
                command
            }
            None => Command::new(BIN),
        };
        command
            .args(["--config.file", config.to_str().unwrap()])
            .args(["--web.listen-address", "127.0.0.1:0"])
            .args(extra_args)
            .env("GENAI_EXPORTER_LISTENER_TIMEOUTS", timeouts);
        // These tests are synchronous (blocking clients); only the start-up wait needs a runtime.
        let binary = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(Binary::start_command(command));
        Exporter { binary, _dir: dir }
    }

    fn addr(&self) -> SocketAddr {
        self.binary.addr
    }

    fn logs(&self) -> String {
        self.binary.logs()
    }

    /// `GET /metrics` on a fresh connection (plain HTTP/1.0, read to the end).
    fn scrape(&self) -> (u16, Scrape) {
        let mut stream = TcpStream::connect(self.addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (status, Scrape::parse(&body))
    }
}

fn rejected(scrape: &Scrape, reason: &str) -> f64 {
    scrape
        .get(
            "genai_exporter_http_connections_rejected_total",
            &[("reason", reason)],
        )
        .unwrap_or(0.0)
}

/// Whether the server closed `stream`: a read sees the end or an error other than a timeout.
fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// A client that sends a request one header byte every `interval` until the server closes;
/// returns how long after connecting the server closed the connection.
fn slow_header_client(addr: SocketAddr, interval: Duration, give_up: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(interval)).unwrap();
    let request = b"GET /metrics HTTP/1.1\r\nHost: slow\r\nX-Padding: ";
    for sent in 0.. {
        let byte = request.get(sent).copied().unwrap_or(b'a');
        if stream.write_all(&[byte]).is_err() || closed_by_server(&mut stream) {
            return Some(start.elapsed());
        }
        if start.elapsed() > give_up {
            return None;
        }
    }
    None
}

#[test]
fn slow_header_clients_are_disconnected_after_the_header_timeout() {
    let exporter = Exporter::start(&[], &[], "header_read=2");
    let addr = exporter.addr();
    let clients: Vec<_> = (0..20)
        .map(|_| {
            std::thread::spawn(move || {
                slow_header_client(addr, Duration::from_millis(500), Duration::from_secs(20))
            })
        })
        .collect();
    // Silent clients never send a byte (hyper has not even chosen HTTP/1 or HTTP/2 yet).
    let silent: Vec<_> = (0..5)
        .map(|_| {
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut stream = TcpStream::connect(addr).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                closed_by_server(&mut stream).then(|| start.elapsed())
            })
        })
        .collect();
    let times: Vec<Duration> = clients
        .into_iter()
        .map(|c| {
            c.join()
                .unwrap()
                .expect("the server closed the slow client")
        })
        .collect();
    let slowest = times.iter().max().unwrap();
    let fastest = times.iter().min().unwrap();
    let silent: Vec<Duration> = silent
        .into_iter()
        .map(|c| {
            c.join()
                .unwrap()
                .expect("the server closed the silent client")
        })
        .collect();
    println!(
        "20 slow-header clients (1 byte / 0.5 s, header timeout 2 s) disconnected after {fastest:?} to {slowest:?}; 5 silent clients after {:?} to {:?}",
        silent.iter().min().unwrap(),
        silent.iter().max().unwrap()
    );
    assert!(*fastest >= Duration::from_millis(1900), "{fastest:?}");
    assert!(*slowest < Duration::from_secs(6), "{slowest:?}");
    for t in &silent {
        assert!(
            *t >= Duration::from_millis(1900) && *t < Duration::from_secs(6),
            "{t:?}"
        );
    }
    let (status, scrape) = exporter.scrape();
    assert_eq!(status, 200);
    assert_eq!(rejected(&scrape, "header_timeout"), 25.0, "{}", scrape.text);
}

#[test]
fn metrics_answer_under_an_idle_connection_flood_at_a_low_file_limit() {
    let mut exporter = Exporter::start(&["prlimit", "--nofile=256:256", "--"], &[], "");
    let (status, scrape) = exporter.scrape();
    assert_eq!(status, 200);
    let cap = scrape
        .get("genai_exporter_http_connections_limit", &[])
        .unwrap();
    assert_eq!(cap, 128.0, "256 descriptors minus the reserve of 128");

    // Far more idle connections than the file limit allows the process.
    let mut idle = Vec::new();
    for _ in 0..600 {
        idle.push(TcpStream::connect(exporter.addr()).unwrap());
    }
    let start = Instant::now();
    let mut answered = 0;
    let mut last = None;
    for _ in 0..20 {
        let (status, scrape) = exporter.scrape();
        assert_eq!(status, 200, "logs:\n{}", exporter.logs());
        answered += 1;
        last = Some(scrape);
    }
    let elapsed = start.elapsed();
    let scrape = last.unwrap();
    let open = scrape.get("genai_exporter_http_connections", &[]).unwrap();
    let evicted = rejected(&scrape, "connection_limit");
    println!(
        "nofile 256, 600 idle connections: {answered}/20 scrapes answered 200 in {elapsed:?}; \
         {open} connections open (cap {cap}), {evicted} closed at the cap"
    );
    assert!(open <= cap + 1.0, "{open}");
    assert!(evicted >= 600.0 - cap, "{evicted}");
    let logs = exporter.logs();
    let fd_errors: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("Too many open files"))
        .collect();
    println!("fd errors: {}", fd_errors.len());
    assert!(fd_errors.is_empty(), "{fd_errors:?}");

    // Still a clean exit with the flood open.
    exporter.binary.signal("TERM");
    let (status, took) = exporter.binary.wait_exit(Duration::from_secs(15));
    println!("exit after SIGTERM with the idle flood open: {took:?}");
    assert!(status.success());
    drop(idle);
}

#[test]
fn sigterm_with_slow_clients_exits_within_the_drain() {
    let mut exporter = Exporter::start(&[], &[], "");
    let addr = exporter.addr();
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHo").unwrap();
        slow.push(stream);
    }
    // Two requests in flight: the handler waits for a body that never comes.
    let mut in_flight = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .write_all(b"POST /webhooks/idle HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"id\"")
            .unwrap();
        in_flight.push(stream);
    }
    // The slow clients trickle a header byte each, one client every 50 ms.
    let trickle = std::thread::spawn(move || {
        for i in 0..200 {
            let count = slow.len();
            if slow[i % count].write_all(b"s").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let (status, scrape) = exporter.scrape();
    assert_eq!(status, 200);
    assert!(scrape.get("genai_exporter_http_connections", &[]).unwrap() >= 20.0);
    exporter.binary.signal("TERM");
    let (status, took) = exporter.binary.wait_exit(Duration::from_secs(30));
    println!(
        "exit after SIGTERM with 20 slow-header clients and 2 stalled requests (drain 5 s): {took:?} (status {status})"
    );
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    let logs = exporter.logs();
    assert!(logs.contains("msg=stopped"), "{logs}");
    let _ = trickle.join();
    drop(in_flight);
}

#[test]
fn tls_listener_closes_silent_handshakes() {
    let ca = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let exporter_dir = tempfile::tempdir().unwrap();
    let cert = write(exporter_dir.path(), "server.crt", &ca.cert.pem());
    let key = write(
        exporter_dir.path(),
        "server.key",
        &ca.signing_key.serialize_pem(),
    );
    let web = write(
        exporter_dir.path(),
        "web.yml",
        &format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
            cert.display(),
            key.display()
        ),
    );
    let exporter = Exporter::start(
        &[],
        &["--web.config.file", web.to_str().unwrap()],
        "tls_handshake=1,header_read=2",
    );
    // Silent clients and clients that stop in the middle of a ClientHello.
    let start = Instant::now();
    let clients: Vec<_> = (0..10)
        .map(|i| {
            let addr = exporter.addr();
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(addr).unwrap();
                if i % 2 == 1 {
                    stream.write_all(&[0x16, 0x03, 0x01, 0x00]).unwrap();
                }
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                (closed_by_server(&mut stream), start.elapsed())
            })
        })
        .collect();
    let results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let slowest = results.iter().map(|(_, t)| *t).max().unwrap();
    println!("10 silent TLS clients (handshake timeout 1 s) closed by {slowest:?}");
    assert!(results.iter().all(|(closed, _)| *closed));
    assert!(slowest < Duration::from_secs(5), "{slowest:?}");
    assert!(slowest >= Duration::from_millis(900), "{slowest:?}");

    genai_task_exporter::upstream::install_crypto_provider();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let text = runtime.block_on(async {
        let root = reqwest::Certificate::from_pem(ca.cert.pem().as_bytes()).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(root)
            .build()
            .unwrap();
        let url = format!("https://{}/metrics", exporter.addr());
        let response = client.get(url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    });
    let scrape = Scrape::parse(&text);
    assert_eq!(rejected(&scrape, "tls_handshake_timeout"), 10.0, "{text}");
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn idle_http2_connections_are_closed() {
    let exporter = Exporter::start(&[], &[], "idle=1");
    let start = Instant::now();
    // An HTTP/2 (prior knowledge) client makes one request and keeps its connection idle.
    genai_task_exporter::upstream::install_crypto_provider();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let status = runtime.block_on(async {
        let url = format!("http://{}/-/healthy", exporter.addr());
        client.get(url).send().await.unwrap().status()
    });
    assert_eq!(status, 200);
    let mut closed_idle = None;
    while start.elapsed() < Duration::from_secs(10) {
        let (_, scrape) = exporter.scrape();
        if rejected(&scrape, "idle_timeout") >= 1.0 {
            closed_idle = Some(start.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let closed_idle = closed_idle.expect("the idle HTTP/2 connection was closed");
    assert!(closed_idle >= Duration::from_millis(900), "{closed_idle:?}");
    println!("idle HTTP/2 connection (idle timeout 1 s) closed by {closed_idle:?}");
    assert!(closed_idle < Duration::from_secs(4), "{closed_idle:?}");
    drop(client);
}
