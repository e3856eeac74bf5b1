//! `--web.config.file` over real listeners: TLS, client certificates, basic auth, the health
//! exemption, extra headers, the rate limit, and certificate rotation without a restart.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Binary, Exporter};
use genai_task_exporter::web::{Options, Web};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

const API_TOKEN: &str = "web-api-token-77c2";
const WAIT: Duration = Duration::from_secs(15);

/// A provider with no tasks (it sends no request anywhere), its key in `key_file`.
fn idle_provider(key_file: &Path) -> String {
    format!(
        "providers:\n  - name: idle\n    type: maxapi\n    base_url: http://127.0.0.1:9\n    token_file: {}\n",
        key_file.display()
    )
}

/// A certificate authority that signs server and client certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A leaf certificate for `names`: (certificate PEM, key PEM).
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn install_provider() {
    genai_task_exporter::upstream::install_crypto_provider();
}

/// An HTTPS client trusting `ca_pem`, optionally presenting a client certificate.
fn client(ca_pem: &str, identity: Option<&(String, String)>, tls13_only: bool) -> reqwest::Client {
    install_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS12]
    };
    let builder = rustls::ClientConfig::builder_with_protocol_versions(versions)
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // No idle connections kept: each request shakes hands again and sees the current
    // certificate (an open connection rightly keeps the one it started with).
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .tls_backend_preconfigured(config)
        .build()
        .unwrap()
}

/// TLS 1.3 client without a client certificate.
fn plain_client(ca_pem: &str) -> reqwest::Client {
    client(ca_pem, None, true)
}

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let setup = Setup {
            dir: tempfile::tempdir().unwrap(),
        };
        setup.write("api-token", API_TOKEN);
        setup.write(
            "config.yaml",
            &format!(
                "server:\n  api_token_file: {}\nstate:\n  path: {}\n{}",
                setup.path("api-token").display(),
                setup.path("state").display(),
                idle_provider(&setup.path("api-token"))
            ),
        );
        setup
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) {
        let tmp = self.path(&format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.path(name)).unwrap();
    }

    fn server_cert(&self, ca: &Ca) {
        let (cert, key) = ca.leaf(&["127.0.0.1", "localhost"]);
        self.write("server.crt", &cert);
        self.write("server.key", &key);
    }

    async fn start(&self, web_yaml: &str, options: Options) -> Exporter {
        self.write("web.yml", web_yaml);
        let web = Web::load(&self.path("web.yml"), options).expect("web config loads");
        Exporter::start_from_file_with_web(&self.path("config.yaml"), Some(web)).await
    }
}

/// bcrypt hash of `password` at a low cost (tests run unoptimized).
fn hash(password: &str, cost: u32) -> String {
    bcrypt::hash(password, cost).unwrap()
}

async fn status(request: reqwest::RequestBuilder) -> Result<u16, String> {
    request
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_basic_auth_headers_and_health_exemption() {
    let setup = Setup::new();
    let ca = Ca::new("test CA");
    setup.server_cert(&ca);
    let web_yaml = format!(
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n\
         http_server_config:\n  headers:\n    X-Frame-Options: deny\n    Strict-Transport-Security: max-age=63072000\n\
         basic_auth_users:\n  alice: {}\n",
        hash("wonderland", 4)
    );
    let exporter = setup
        .start(
            &web_yaml,
            Options {
                health_without_auth: true,
            },
        )
        .await;
    let https = plain_client(&ca.pem);

    // No credentials, wrong ones, unknown user: 401 with a Basic challenge and the headers.
    for user in [
        None,
        Some(("alice", "wrong")),
        Some(("mallory", "wonderland")),
    ] {
        let mut request = https.get(exporter.url("/metrics"));
        if let Some((u, p)) = user {
            request = request.basic_auth(u, Some(p));
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{user:?}");
        assert_eq!(response.headers()["www-authenticate"], "Basic");
        assert_eq!(response.headers()["x-frame-options"], "deny");
    }

    // The right ones: the page, over HTTP/2 (offered by ALPN), with the headers.
    let response = https
        .get(exporter.url("/metrics"))
        .basic_auth("alice", Some("wonderland"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(
        response.headers()["strict-transport-security"],
        "max-age=63072000"
    );
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("genai_exporter_build_info")
    );

    // Every route is behind the password, except the health check (flag given) ...
    for path in ["/", "/-/ready", "/api/v1/tasks", "/nonexistent"] {
        assert_eq!(
            status(https.get(exporter.url(path))).await,
            Ok(401),
            "{path}"
        );
    }
    let health = https.get(exporter.url("/-/healthy")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.headers()["x-frame-options"], "deny");
    // ... and the routes with their own credential, which check it themselves.
    assert_eq!(
        status(https.post(exporter.url("/-/reload")).bearer_auth(API_TOKEN)).await,
        Ok(200)
    );
    assert_eq!(
        status(https.post(exporter.url("/-/reload")).bearer_auth("guess")).await,
        Ok(401)
    );
    assert_eq!(
        status(https.get(exporter.url("/metrics")).bearer_auth(API_TOKEN)).await,
        Ok(401),
        "a bearer token does not open read routes"
    );

    // Plain HTTP on the TLS port is refused.
    let plain = reqwest::get(format!("http://{}/-/healthy", exporter.addr)).await;
    assert!(
        plain.is_err() || plain.unwrap().status() != 200,
        "plain HTTP must not be served"
    );
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_needs_auth_without_the_flag_and_successful_checks_are_cached() {
    let setup = Setup::new();
    // No TLS: basic auth over plain HTTP (behind a TLS-terminating proxy, say).
    let web_yaml = format!("basic_auth_users:\n  prom: {}\n", hash("scrape", 10));
    let exporter = setup.start(&web_yaml, Options::default()).await;
    let http = reqwest::Client::new();
    assert_eq!(status(http.get(exporter.url("/-/healthy"))).await, Ok(401));

    let scrape = || {
        http.get(exporter.url("/metrics"))
            .basic_auth("prom", Some("scrape"))
    };
    let first = Instant::now();
    assert_eq!(status(scrape()).await, Ok(200));
    let first = first.elapsed();
    let next = Instant::now();
    for _ in 0..5 {
        assert_eq!(status(scrape()).await, Ok(200));
    }
    let next = next.elapsed();
    assert!(
        next < first,
        "five cached checks ({next:?}) must be cheaper than one bcrypt check ({first:?})"
    );
    exporter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_policies() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let stranger_ca = Ca::new("stranger CA");
    let good = client_ca.leaf(&["scraper.example"]);
    let stranger = stranger_ca.leaf(&["scraper.example"]);

    let cases = [
        // (client_auth_type, no cert, cert from client CA, cert from another CA)
        ("RequireAndVerifyClientCert", false, true, false),
        ("VerifyClientCertIfGiven", true, true, false),
        ("RequireAnyClientCert", false, true, true),
        ("RequestClientCert", true, true, true),
        ("NoClientCert", true, true, true),
    ];
    for (auth, none_ok, good_ok, stranger_ok) in cases {
        let setup = Setup::new();
        setup.server_cert(&server_ca);
        setup.write("clients.crt", &client_ca.pem);
        let ca_line = if auth.contains("Verify") {
            "\n  client_ca_file: clients.crt"
        } else {
            ""
        };
        let exporter = setup
            .start(
                &format!(
                    "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  client_auth_type: {auth}{ca_line}\n"
                ),
                Options::default(),
            )
            .await;
        for (who, identity, expected) in [
            ("no certificate", None, none_ok),
            ("client CA certificate", Some(&good), good_ok),
            ("other CA certificate", Some(&stranger), stranger_ok),
        ] {
            for tls13 in [true, false] {
                let https = client(&server_ca.pem, identity, tls13);
                let got = status(https.get(exporter.url("/-/healthy"))).await;
                assert_eq!(
                    got.is_ok(),
                    expected,
                    "{auth}, {who}, TLS 1.{}: {got:?}",
                    if tls13 { 3 } else { 2 }
                );
            }
        }
        exporter.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_http1_only_and_rate_limit() {
    let setup = Setup::new();
    let ca = Ca::new("test CA");
    setup.server_cert(&ca);
    let exporter = setup
        .start(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n  min_version: TLS13\n\
             http_server_config:\n  http2: false\n\
             rate_limit:\n  burst: 3\n  interval: 1h\n",
            Options::default(),
        )
        .await;
    let tls12 = client(&ca.pem, None, false);
    assert!(
        status(tls12.get(exporter.url("/-/healthy"))).await.is_err(),
        "TLS 1.2 refused with min_version TLS13"
    );
    let https = plain_client(&ca.pem);
    let response = https.get(exporter.url("/-/healthy")).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    assert_eq!(status(https.get(exporter.url("/-/healthy"))).await, Ok(200));
    // Burst of 3 spent (the refused TLS 1.2 client never got to a request).
    assert_eq!(status(https.get(exporter.url("/-/healthy"))).await, Ok(200));
    assert_eq!(status(https.get(exporter.url("/-/healthy"))).await, Ok(429));
    exporter.stop().await;
}

async fn wait_for_status(client: &reqwest::Client, url: &str, ok: bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = status(client.get(url)).await;
        if got.is_ok() == ok {
            return;
        }
        assert!(Instant::now() < deadline, "{url}: still {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_on_reload_and_on_change() {
    let setup = Setup::new();
    let first = Ca::new("first CA");
    let second = Ca::new("second CA");
    let third = Ca::new("third CA");
    setup.server_cert(&first);
    let web_yaml = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n";
    let exporter = setup.start(web_yaml, Options::default()).await;
    let health = exporter.url("/-/healthy");
    let (trusts_first, trusts_second, trusts_third) = (
        plain_client(&first.pem),
        plain_client(&second.pem),
        plain_client(&third.pem),
    );
    assert_eq!(status(trusts_first.get(&health)).await, Ok(200));
    assert!(status(trusts_second.get(&health)).await.is_err());

    // Rotation by reload (POST /-/reload).
    setup.server_cert(&second);
    let reload = trusts_first
        .post(exporter.url("/-/reload"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200);
    assert_eq!(status(trusts_second.get(&health)).await, Ok(200));
    assert!(status(trusts_first.get(&health)).await.is_err());

    // Rotation by rewriting the files alone: picked up within about a second.
    setup.server_cert(&third);
    wait_for_status(&trusts_third, &health, true).await;
    assert!(status(trusts_second.get(&health)).await.is_err());

    // A broken web configuration on reload: 400 naming the file and key, old one kept.
    setup.write("web.yml", &format!("{web_yaml}  cert_flie: x\n"));
    let reload = trusts_third
        .post(exporter.url("/-/reload"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 400);
    let text = reload.text().await.unwrap();
    assert!(
        text.contains("web.yml") && text.contains("cert_flie"),
        "{text}"
    );
    assert_eq!(status(trusts_third.get(&health)).await, Ok(200));
    let m = trusts_third
        .get(exporter.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let m = common::Scrape::parse(&m);
    assert_eq!(
        m.get("genai_exporter_config_last_reload_successful", &[]),
        Some(0.0)
    );
    // A key that does not match the certificate is refused too.
    setup.write("web.yml", web_yaml);
    let (_, other_key) = third.leaf(&["127.0.0.1"]);
    setup.write("server.key", &other_key);
    let reload = trusts_third
        .post(exporter.url("/-/reload"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 400);
    let text = reload.text().await.unwrap();
    assert!(text.contains("tls_server_config.key_file"), "{text}");
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    assert_eq!(status(trusts_third.get(&health)).await, Ok(200));
    exporter.stop().await;
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_refuses_a_bad_web_config_and_serves_a_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "config.yaml",
        &format!(
            "state:\n  path: {}\n{}",
            dir.path().join("state").display(),
            idle_provider(&write(dir.path(), "idle.key", "idle-key"))
        ),
    );
    let bin = env!("CARGO_BIN_EXE_genai-task-exporter");
    let bad = write(
        dir.path(),
        "web-bad.yml",
        "tls_server_config:\n  cert_file: c.pem\n  key_file: k.pem\n  client_auth_type: Maybe\n",
    );
    for args in [
        vec!["--web.listen-address", "127.0.0.1:0"],
        vec!["check-config"],
    ] {
        let out = std::process::Command::new(bin)
            .args(["--config.file", config.to_str().unwrap()])
            .args(["--web.config.file", bad.to_str().unwrap()])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("web-bad.yml"), "{stderr}");
        assert!(
            stderr.contains("tls_server_config.client_auth_type"),
            "{stderr}"
        );
    }

    let good = write(
        dir.path(),
        "web.yml",
        &format!("basic_auth_users:\n  prom: {}\n", hash("scrape", 4)),
    );
    let binary = Binary::start(&[
        "--config.file",
        config.to_str().unwrap(),
        "--web.config.file",
        good.to_str().unwrap(),
        "--web.listen-address",
        "127.0.0.1:0",
        "--web.health-without-auth",
    ])
    .await;
    let http = reqwest::Client::new();
    assert_eq!(status(http.get(binary.url("/-/healthy"))).await, Ok(200));
    assert_eq!(status(http.get(binary.url("/metrics"))).await, Ok(401));
    assert_eq!(
        status(
            http.get(binary.url("/metrics"))
                .basic_auth("prom", Some("scrape"))
        )
        .await,
        Ok(200)
    );
    assert!(binary.stop().success());
}

#[test]
fn web_config_keeps_a_clean_debug() {
    // The web configuration holds hashes and maybe inline keys: its Debug must not show them.
    let dir = tempfile::tempdir().unwrap();
    let secret_hash = hash("pw", 4);
    let path = write(
        dir.path(),
        "web.yml",
        &format!("basic_auth_users:\n  alice: {secret_hash}\n"),
    );
    let web: Arc<Web> = Web::load(&path, Options::default()).unwrap();
    let config = web.config();
    assert!(!format!("{config:?}").contains(&secret_hash));
}
