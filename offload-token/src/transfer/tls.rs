//! The mutual TLS 1.3 of a transfer's data channel (rustls, `ring`): S's server
//! configuration, which admits only a client certificate chaining to the transfer's CA,
//! valid now, for TLS client authentication and naming the destination role of this transfer;
//! and D's client configuration, which admits only a server certificate chaining to the same
//! CA, valid now, for TLS server authentication and naming the source role (checked as the
//! server name, [`peer_name`]).

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use uuid::Uuid;

use super::ca::{peer_name, Role};
use super::TransferError;

fn tls_error(e: impl std::fmt::Display) -> TransferError {
    TransferError::Tls(e.to_string())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &[u8]) -> Result<Arc<RootCertStore>, TransferError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca.to_vec()))
        .map_err(tls_error)?;
    Ok(Arc::new(roots))
}

/// A client verifier that, after the web PKI checks (chain to the CA, validity, client
/// authentication usage), requires the leaf to carry one exact DNS name.
#[derive(Debug)]
struct NamedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    name: ServerName<'static>,
}

impl ClientCertVerifier for NamedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        cert.verify_is_valid_for_subject_name(&self.name)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::NotValidForName))?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// S's server configuration for `transfer`: presents `cert` (signed by the CA `ca`) with
/// `key`, TLS 1.3 only, and admits only the destination's certificate of this transfer.
pub fn source_config(
    transfer: Uuid,
    ca: &[u8],
    cert: &[u8],
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, TransferError> {
    let p = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(roots(ca)?, p.clone())
        .build()
        .map_err(tls_error)?;
    let name = ServerName::try_from(peer_name(transfer, Role::Destination)).map_err(tls_error)?;
    let verifier = Arc::new(NamedClientVerifier { inner, name });
    let config = ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![CertificateDer::from(cert.to_vec())], key)
        .map_err(tls_error)?;
    Ok(Arc::new(config))
}

/// D's client configuration: presents `cert` with `key`, TLS 1.3 only, and trusts only
/// server certificates signed by `ca` (the name is checked by the caller's server name,
/// [`peer_name`]`(transfer, Role::Source)`).
pub fn destination_config(
    ca: &[u8],
    cert: &[u8],
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ClientConfig>, TransferError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(vec![CertificateDer::from(cert.to_vec())], key)
        .map_err(tls_error)?;
    Ok(Arc::new(config))
}
