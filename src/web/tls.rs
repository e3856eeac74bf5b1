//! TLS: certificates and keys read from PEM, client-certificate policies, protocol versions.

use std::path::PathBuf;
use std::sync::Arc;

use pki_types::pem::PemObject;
use pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};

use crate::config::Problem;
use crate::secret::{Secret, read_bounded_text};

/// Where a PEM block comes from.
#[derive(Debug, Clone)]
pub(crate) enum PemSource {
    File(PathBuf),
    /// Inline in the web configuration (`cert`, `key`, `client_ca`).
    Inline(Secret),
}

/// `client_auth_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientAuth {
    /// `NoClientCert`: no certificate is asked for.
    None,
    /// `RequestClientCert`: asked for, not required, not verified.
    Request,
    /// `RequireAnyClientCert`: required, not verified against a CA.
    RequireAny,
    /// `VerifyClientCertIfGiven`: verified against `client_ca_file` when one is sent.
    VerifyIfGiven,
    /// `RequireAndVerifyClientCert`: required and verified against `client_ca_file`.
    RequireAndVerify,
}

/// The checked `tls_server_config`.
#[derive(Debug, Clone)]
pub(crate) struct TlsSettings {
    pub(crate) cert: PemSource,
    pub(crate) key: PemSource,
    pub(crate) client_ca: Option<PemSource>,
    pub(crate) client_auth: ClientAuth,
    pub(crate) tls12: bool,
    pub(crate) tls13: bool,
    pub(crate) http2: bool,
    pub(crate) prefer_server_order: bool,
}

impl TlsSettings {
    /// The files this configuration reads (to notice when they change).
    pub(crate) fn files(&self) -> impl Iterator<Item = &PathBuf> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|s| match s {
                PemSource::File(p) => Some(p),
                PemSource::Inline(_) => None,
            })
    }
}

/// Certificate chains and keys are a few KiB; a CA bundle a few hundred.
const MAX_PEM_FILE_BYTES: u64 = 4 << 20;

fn read(source: &PemSource, key: &str) -> Result<Vec<u8>, Problem> {
    match source {
        PemSource::Inline(text) => Ok(text.expose().as_bytes().to_vec()),
        // Bounded, regular files only: a FIFO or /dev/zero named here must not wedge a reload.
        PemSource::File(path) => read_bounded_text(path, MAX_PEM_FILE_BYTES)
            .map(String::into_bytes)
            .map_err(|e| Problem {
                path: format!("tls_server_config.{key}_file"),
                message: format!("{}: {e}", path.display()),
            }),
    }
}

fn key_name(source: &PemSource, key: &str) -> String {
    match source {
        PemSource::File(_) => format!("tls_server_config.{key}_file"),
        PemSource::Inline(_) => format!("tls_server_config.{key}"),
    }
}

fn certificates(source: &PemSource, key: &str) -> Result<Vec<CertificateDer<'static>>, Problem> {
    let pem = read(source, key)?;
    let problem = |message: String| Problem {
        path: key_name(source, key),
        message,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(problem("no PEM certificate found".into()));
    }
    Ok(certs)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the certificates and keys and builds the server configuration.
pub(crate) fn server_config(s: &TlsSettings) -> Result<Arc<ServerConfig>, Vec<Problem>> {
    let mut problems = Vec::new();
    let certs = certificates(&s.cert, "cert")
        .map_err(|p| problems.push(p))
        .ok();
    let key = read(&s.key, "key")
        .and_then(|pem| {
            PrivateKeyDer::from_pem_slice(&pem).map_err(|e| Problem {
                path: key_name(&s.key, "key"),
                message: match e {
                    pki_types::pem::Error::NoItemsFound => "no PEM private key found".into(),
                    // Never the PEM text itself: it is the secret.
                    _ => "not a PEM private key".into(),
                },
            })
        })
        .map_err(|p| problems.push(p))
        .ok();
    let verifier = client_verifier(s).map_err(|p| problems.push(p)).ok();
    let (Some(certs), Some(key), Some(verifier)) = (certs, key, verifier) else {
        return Err(problems);
    };

    let mut versions: Vec<&'static rustls::SupportedProtocolVersion> = Vec::new();
    if s.tls13 {
        versions.push(&rustls::version::TLS13);
    }
    if s.tls12 {
        versions.push(&rustls::version::TLS12);
    }
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&versions)
        .map_err(|e| {
            vec![Problem {
                path: "tls_server_config.min_version".into(),
                message: e.to_string(),
            }]
        })?;
    let mut config = builder
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| {
            vec![Problem {
                path: key_name(&s.key, "key"),
                message: format!("does not fit the certificate: {e}"),
            }]
        })?;
    config.ignore_client_order = s.prefer_server_order;
    config.alpn_protocols = if s.http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(Arc::new(config))
}

fn client_verifier(s: &TlsSettings) -> Result<Arc<dyn ClientCertVerifier>, Problem> {
    let algorithms = provider().signature_verification_algorithms;
    match s.client_auth {
        ClientAuth::None => Ok(WebPkiClientVerifier::no_client_auth()),
        ClientAuth::Request => Ok(Arc::new(AnyClientCert {
            mandatory: false,
            algorithms,
        })),
        ClientAuth::RequireAny => Ok(Arc::new(AnyClientCert {
            mandatory: true,
            algorithms,
        })),
        ClientAuth::VerifyIfGiven | ClientAuth::RequireAndVerify => {
            let source = s.client_ca.as_ref().ok_or_else(|| Problem {
                path: "tls_server_config.client_ca_file".into(),
                message: "required by this client_auth_type".into(),
            })?;
            let mut roots = RootCertStore::empty();
            for cert in certificates(source, "client_ca")? {
                roots.add(cert).map_err(|e| Problem {
                    path: key_name(source, "client_ca"),
                    message: format!("not a usable CA certificate: {e}"),
                })?;
            }
            let mut builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            if s.client_auth == ClientAuth::VerifyIfGiven {
                builder = builder.allow_unauthenticated();
            }
            builder.build().map_err(|e| Problem {
                path: key_name(source, "client_ca"),
                message: e.to_string(),
            })
        }
    }
}

/// `RequestClientCert` and `RequireAnyClientCert`: any certificate is accepted (as in Go's
/// crypto/tls), but the client must still prove it holds the certificate's key.
#[derive(Debug)]
struct AnyClientCert {
    mandatory: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
