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

/// The TLS 1.3 suites of a transfer's data channel, most preferred first.
///
/// AES-128-GCM leads: both ends are ours, and its 10 AES rounds against AES-256's 14 make
/// every byte of a copy cheaper to seal and open (the copy is CPU bound on loopback). The
/// other TLS 1.3 suites of `ring` stay as fallbacks; TLS 1.2 is never offered.
pub const SUITES: &[rustls::SupportedCipherSuite] = &[
    rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
    rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
];

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: SUITES.to_vec(),
        ..rustls::crypto::ring::default_provider()
    })
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
    let mut config = ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![CertificateDer::from(cert.to_vec())], key)
        .map_err(tls_error)?;
    // block-io's NBD server hands the finished connection's keys over to its record layer
    // after the NBD handshake (rustls' `dangerous_extract_secrets`, as for kernel TLS): the
    // records stay TLS 1.3 of this suite, and a read's reply is sealed where it lies in the
    // server's buffer instead of being copied into a new one per record.
    config.enable_secret_extraction = true;
    // Each connection is made once per token: nothing to resume, and no ticket must follow
    // the handshake into the record layer.
    config.send_tls13_tickets = 0;
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
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(vec![CertificateDer::from(cert.to_vec())], key)
        .map_err(tls_error)?;
    // block-io's NBD client hands the keys over to its record layer after the NBD handshake,
    // which opens each record where it lands and copies its bytes once, into the caller's
    // buffer (rustls' buffered connection copies them three times).
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::crypto::ring::cipher_suite;
    use rustls::{ClientConnection, ServerConnection, SupportedCipherSuite};

    use super::*;
    use crate::transfer::ca::{ProviderKeyPair, TransferCa};

    /// A handshake in memory between S's configuration and `client`; the suite agreed.
    fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        transfer: Uuid,
    ) -> Option<SupportedCipherSuite> {
        let name = ServerName::try_from(peer_name(transfer, Role::Source)).unwrap();
        let mut c = ClientConnection::new(client, name).unwrap();
        let mut s = ServerConnection::new(server).unwrap();
        for _ in 0..10 {
            let mut wire = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut wire).unwrap();
            }
            let mut r = &wire[..];
            while !r.is_empty() {
                s.read_tls(&mut r).unwrap();
            }
            s.process_new_packets().unwrap();
            let mut wire = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut wire).unwrap();
            }
            let mut r = &wire[..];
            while !r.is_empty() {
                c.read_tls(&mut r).unwrap();
            }
            c.process_new_packets().unwrap();
            if !c.is_handshaking() && !s.is_handshaking() {
                assert_eq!(c.negotiated_cipher_suite(), s.negotiated_cipher_suite());
                return s.negotiated_cipher_suite();
            }
        }
        None
    }

    /// S's configuration and D's certificate and key for one transfer.
    fn transfer_pair() -> (
        Uuid,
        Arc<ServerConfig>,
        TransferCa,
        Vec<u8>,
        ProviderKeyPair,
    ) {
        let transfer = Uuid::new_v4();
        let ca = TransferCa::new(transfer, Duration::from_secs(600)).unwrap();
        let (s_key, d_key) = (
            ProviderKeyPair::generate().unwrap(),
            ProviderKeyPair::generate().unwrap(),
        );
        let s_cert = ca.issue(Role::Source, &s_key.public().unwrap()).unwrap();
        let d_cert = ca
            .issue(Role::Destination, &d_key.public().unwrap())
            .unwrap();
        let server = source_config(transfer, ca.cert_der(), &s_cert, s_key.private_der()).unwrap();
        (transfer, server, ca, d_cert, d_key)
    }

    #[test]
    fn the_data_channel_agrees_on_aes_128_gcm() {
        let (transfer, server, ca, d_cert, d_key) = transfer_pair();
        let client = destination_config(ca.cert_der(), &d_cert, d_key.private_der()).unwrap();
        let suite = handshake(server, client, transfer).expect("the handshake completes");
        assert_eq!(suite, cipher_suite::TLS13_AES_128_GCM_SHA256);
    }

    #[test]
    fn a_peer_offering_only_aes_256_gcm_still_connects() {
        let (transfer, server, ca, d_cert, d_key) = transfer_pair();
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: vec![cipher_suite::TLS13_AES_256_GCM_SHA384],
            ..rustls::crypto::ring::default_provider()
        };
        let client = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots(ca.cert_der()).unwrap())
            .with_client_auth_cert(vec![CertificateDer::from(d_cert)], d_key.private_der())
            .unwrap();
        let suite = handshake(server, Arc::new(client), transfer).expect("the handshake completes");
        assert_eq!(suite, cipher_suite::TLS13_AES_256_GCM_SHA384);
    }
}
