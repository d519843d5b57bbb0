//! TLS for the NBD server (proto.md "TLS support", `NBD_OPT_STARTTLS`): the rustls
//! configuration a server requires its clients to upgrade to, built from x509 credentials in
//! PEM files, either in the directory layout of QEMU's `tls-creds-x509` object (what
//! `qemu-nbd --tls-creds` reads) or named one by one.
//!
//! The server side takes any [`rustls::ServerConfig`] ([`NbdServer::require_tls`]), so a
//! caller with its own certificates in memory (the offload providers' per-transfer CA) builds
//! one with [`server_config`] and needs no files at all. Every configuration made here uses
//! the `ring` provider and offers TLS 1.3 and 1.2.
//!
//! [`NbdServer::require_tls`]: super::NbdServer::require_tls

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::error::{Error, ErrorKind, Result};

/// The rustls this module builds on, for callers that make their own [`ServerConfig`].
pub use rustls;

/// The CA certificate(s) in a `tls-creds-x509` directory: what client certificates must chain
/// to when peers are verified.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The server's certificate chain (leaf first) in a `tls-creds-x509` directory.
pub const SERVER_CERT_FILE: &str = "server-cert.pem";
/// The server's private key (PKCS#8, PKCS#1 or SEC1, unencrypted) in a `tls-creds-x509`
/// directory.
pub const SERVER_KEY_FILE: &str = "server-key.pem";

/// Why credentials could not be loaded or a configuration built: the source of the
/// [`Error`] the functions of this module return.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file could not be read or decoded.
    #[error("cannot read {path}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A PEM file holds no certificate.
    #[error("{path} holds no certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the certificates or key.
    #[error("rustls refused the credentials")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built from the CA certificates.
    #[error("cannot verify clients with these CA certificates")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn tls_error(context: &'static str, e: impl Into<TlsError>) -> Error {
    Error::with_source(ErrorKind::InvalidInput, context, e.into())
}

/// Where a server's x509 credentials are, and whether clients must present a certificate.
///
/// ```no_run
/// # fn main() -> block_io::Result<()> {
/// use block_io::nbd::tls::TlsCredentials;
/// // As `qemu-nbd --object tls-creds-x509,id=tls0,endpoint=server,dir=/etc/pki/qemu,verify-peer=on`.
/// let config = TlsCredentials::from_dir("/etc/pki/qemu").verify_peer(true).server_config()?;
/// # let _ = config;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsCredentials {
    cert: PathBuf,
    key: PathBuf,
    ca: Option<PathBuf>,
    verify_peer: bool,
}

impl TlsCredentials {
    /// The files of QEMU's `tls-creds-x509` layout in `dir`: [`SERVER_CERT_FILE`],
    /// [`SERVER_KEY_FILE`] and, used only when peers are verified, [`CA_CERT_FILE`]. Peers are
    /// not verified unless [`verify_peer`](Self::verify_peer) says so.
    pub fn from_dir(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        TlsCredentials {
            cert: dir.join(SERVER_CERT_FILE),
            key: dir.join(SERVER_KEY_FILE),
            ca: Some(dir.join(CA_CERT_FILE)),
            verify_peer: false,
        }
    }

    /// A certificate chain (leaf first) and its private key, in PEM files.
    pub fn from_pem(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        TlsCredentials {
            cert: cert.into(),
            key: key.into(),
            ca: None,
            verify_peer: false,
        }
    }

    /// The CA certificate(s), in a PEM file, that client certificates must chain to.
    pub fn ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca = Some(path.into());
        self
    }

    /// Requires every client to present a certificate that chains to the CA (QEMU's
    /// `verify-peer=on`); without a valid one the TLS handshake fails.
    pub fn verify_peer(mut self, yes: bool) -> Self {
        self.verify_peer = yes;
        self
    }

    /// Loads the files and builds the server configuration.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>> {
        let chain = load_certs(&self.cert)?;
        let key = load_key(&self.key)?;
        let client_ca = match (&self.ca, self.verify_peer) {
            (Some(ca), true) => Some(load_certs(ca)?),
            (None, true) => {
                return Err(Error::new(
                    ErrorKind::InvalidInput,
                    "verifying peers needs a CA certificate",
                ))
            }
            (_, false) => None,
        };
        server_config(chain, key, client_ca)
    }
}

/// Every certificate in the PEM file at `path` (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = |source| {
        let e = TlsError::Pem {
            path: path.to_path_buf(),
            source,
        };
        Error::with_source(ErrorKind::InvalidInput, "cannot load a certificate", e)
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        let e = TlsError::NoCertificate {
            path: path.to_path_buf(),
        };
        return Err(tls_error("cannot load a certificate", e));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1, unencrypted) in the PEM file at `path`.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| {
        let e = TlsError::Pem {
            path: path.to_path_buf(),
            source,
        };
        Error::with_source(ErrorKind::InvalidInput, "cannot load a private key", e)
    })
}

/// A server configuration (TLS 1.3 and 1.2, `ring`) presenting `chain` (leaf first) with
/// `key`. With `client_ca`, every client must present a certificate chaining to one of those
/// CA certificates, else the handshake fails; without, client certificates are not asked for.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: Option<Vec<CertificateDer<'static>>>,
) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(rustls::ALL_VERSIONS)
        .map_err(|e| tls_error("cannot configure TLS", e))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(cas) => {
            let mut roots = RootCertStore::empty();
            for c in cas {
                roots
                    .add(c)
                    .map_err(|e| tls_error("cannot use a CA certificate", e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| tls_error("cannot verify clients", e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| tls_error("cannot use the server certificate and key", e))?;
    Ok(Arc::new(config))
}
