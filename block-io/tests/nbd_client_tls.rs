//! The NBD client over TLS (`NBD_OPT_STARTTLS`, rustls): against qemu-nbd with
//! `--object tls-creds-x509` (with and without `verify-peer`), over TCP and a Unix socket,
//! and against our own server requiring mutual TLS. Certificates are made with rcgen into
//! qemu's directory layout. A wrong CA, a wrong server name, a missing client certificate
//! and a plain client are all refused.
#![cfg(feature = "nbd")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod nbd_client_util;

#[path = "support/test_ca.rs"]
mod test_ca;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use test_ca::Ca;

use block_io::nbd::tls::TlsCredentials;
use block_io::nbd::{ClientError, Export, NbdClient, NbdClientOptions, NbdServer, TlsOptions};
use block_io::{BlockDevice, ErrorKind};
use nbd_client_util::{
    free_port, mem_disk, model_workload, oracle, pattern, quick_opts, Listen, Proc,
};

const MIB: u64 = 1 << 20;

impl Ca {
    /// `dir/name` in qemu's `endpoint=server` layout.
    fn server_dir(&self, dir: &Path, name: &str) -> PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let (cert, key) = self.leaf(true, "server");
        std::fs::write(d.join("ca-cert.pem"), &self.pem).unwrap();
        std::fs::write(d.join("server-cert.pem"), cert).unwrap();
        std::fs::write(d.join("server-key.pem"), key).unwrap();
        d
    }

    /// `dir/name` in qemu's `endpoint=client` layout trusting this CA, with a client
    /// certificate signed by `signer` when given.
    fn client_dir(&self, dir: &Path, name: &str, signer: Option<&Ca>) -> PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("ca-cert.pem"), &self.pem).unwrap();
        if let Some(s) = signer {
            let (cert, key) = s.leaf(false, "client");
            std::fs::write(d.join("client-cert.pem"), cert).unwrap();
            std::fs::write(d.join("client-key.pem"), key).unwrap();
        }
        d
    }
}

fn tls_opts(client_dir: &Path) -> NbdClientOptions {
    NbdClientOptions {
        tls: Some(TlsOptions::from_qemu_creds_dir(client_dir).unwrap()),
        ..quick_opts()
    }
}

/// qemu-nbd requiring TLS with the credentials in `server_dir`.
fn qemu_tls(file: &Path, server_dir: &Path, verify_peer: bool, listen: Listen) -> Proc {
    let obj = format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={},verify-peer={}",
        server_dir.display(),
        if verify_peer { "on" } else { "off" }
    );
    Proc::qemu_nbd(
        file,
        "raw",
        listen,
        &["--object", &obj, "--tls-creds", "tls0"],
    )
}

fn tls_url(p: &Proc) -> String {
    p.url().replacen("nbd", "nbds", 1)
}

fn read(dev: &dyn BlockDevice, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    dev.read_at(&mut b, off).unwrap();
    b
}

#[test]
fn qemu_nbd_with_verify_peer_takes_our_client_certificate_and_survives_a_restart() {
    if !oracle("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let sdir = ca.server_dir(dir.path(), "server");
    let cdir = ca.client_dir(dir.path(), "client", Some(&ca));
    let f = dir.path().join("d.raw");
    std::fs::write(&f, pattern(0, 16 * MIB as usize, 1)).unwrap();
    let mut p = qemu_tls(&f, &sdir, true, Listen::Tcp(free_port()));
    let c = NbdClient::open(&tls_url(&p), tls_opts(&cdir)).unwrap();
    assert!(c.url().tls);
    assert!(read(&c, 4096, 65_536) == pattern(4096, 65_536, 1));
    model_workload(&c, 2, 100, 256 * 1024, 21);
    c.flush().unwrap();
    // A restarted server gets a new TLS session; the client carries on.
    p.kill();
    p.restart();
    let tail = read(&c, 15 * MIB, 65_536);
    assert!(tail == std::fs::read(&f).unwrap()[15 * MIB as usize..][..65_536]);
    assert!(c.reconnects() >= 1);
}

#[test]
fn qemu_nbd_over_unix_socket_without_peer_verification() {
    if !oracle("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let sdir = ca.server_dir(dir.path(), "server");
    // No client certificate: the server does not ask for one.
    let cdir = ca.client_dir(dir.path(), "client", None);
    let f = dir.path().join("d.raw");
    std::fs::write(&f, pattern(0, 8 * MIB as usize, 2)).unwrap();
    let p = qemu_tls(&f, &sdir, false, Listen::Unix(dir.path().join("s.sock")));
    // The certificate names localhost, the default name for a Unix socket.
    let c = NbdClient::open(&tls_url(&p), tls_opts(&cdir)).unwrap();
    assert!(read(&c, 0, 65_536) == pattern(0, 65_536, 2));
    c.write_at(&[9u8; 4096], 8192).unwrap();
    assert!(read(&c, 8192, 4096) == vec![9u8; 4096]);
}

#[test]
fn wrong_ca_wrong_name_missing_client_certificate_and_plain_clients_are_refused() {
    if !oracle("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let other = Ca::new("other CA");
    let sdir = ca.server_dir(dir.path(), "server");
    let f = dir.path().join("d.raw");
    std::fs::write(&f, vec![0u8; MIB as usize]).unwrap();
    let p = qemu_tls(&f, &sdir, true, Listen::Tcp(free_port()));

    // A client trusting another CA refuses the server's certificate.
    let wrong = other.client_dir(dir.path(), "wrong-ca", Some(&ca));
    let e = NbdClient::open(&tls_url(&p), tls_opts(&wrong)).unwrap_err();
    assert!(matches!(e, ClientError::Tls(_)), "{e:?}");
    assert_eq!(block_io::Error::from(e).kind(), ErrorKind::Io);

    // The right CA but another name than the certificate carries.
    let good = ca.client_dir(dir.path(), "good", Some(&ca));
    let mut o = tls_opts(&good);
    o.tls = o.tls.map(|t| t.with_server_name("elsewhere.example"));
    let e = NbdClient::open(&tls_url(&p), o).unwrap_err();
    assert!(matches!(e, ClientError::Tls(_)), "{e:?}");

    // No client certificate while the server verifies peers: the server ends the session
    // (during the handshake or at the first option after it).
    let anon = ca.client_dir(dir.path(), "anon", None);
    let e = NbdClient::open(&tls_url(&p), tls_opts(&anon)).unwrap_err();
    assert!(
        matches!(e, ClientError::Tls(_) | ClientError::Transport(_)),
        "{e:?}"
    );

    // A client certificate from another CA.
    let foreign = ca.client_dir(dir.path(), "foreign", Some(&other));
    let e = NbdClient::open(&tls_url(&p), tls_opts(&foreign)).unwrap_err();
    assert!(
        matches!(e, ClientError::Tls(_) | ClientError::Transport(_)),
        "{e:?}"
    );

    // A plain client is told TLS is required.
    let e = NbdClient::open(&p.url(), quick_opts()).unwrap_err();
    assert!(matches!(e, ClientError::TlsRequired), "{e:?}");

    // And the good client gets in.
    let c = NbdClient::open(&tls_url(&p), tls_opts(&good)).unwrap();
    assert_eq!(c.info().virtual_size, MIB);
}

#[test]
fn tls_creds_directories_that_cannot_be_loaded_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = TlsOptions::from_qemu_creds_dir(dir.path()).unwrap_err();
    assert!(matches!(e, ClientError::TlsConfig(_)), "{e:?}");
    std::fs::write(dir.path().join("ca-cert.pem"), "not a certificate").unwrap();
    let e = TlsOptions::from_qemu_creds_dir(dir.path()).unwrap_err();
    assert!(matches!(e, ClientError::TlsConfig(_)), "{e:?}");
    let ca = Ca::new("test CA");
    let d = ca.client_dir(dir.path(), "c", Some(&ca));
    std::fs::write(d.join("client-key.pem"), "garbage").unwrap();
    let e = TlsOptions::from_qemu_creds_dir(&d).unwrap_err();
    assert!(matches!(e, ClientError::TlsConfig(_)), "{e:?}");
    assert_eq!(block_io::Error::from(e).kind(), ErrorKind::InvalidInput);
}

#[test]
fn our_server_with_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let sdir = ca.server_dir(dir.path(), "server");
    let config = TlsCredentials::from_dir(&sdir)
        .verify_peer(true)
        .server_config()
        .unwrap();
    let disk = mem_disk(16 * MIB);
    let server = NbdServer::bind_tcp(
        "127.0.0.1:0",
        vec![Export::new("disk", disk.clone() as Arc<dyn BlockDevice>)],
    )
    .unwrap()
    .require_tls(config);
    let addr = server.local_addr().unwrap();
    let stop = server.stop_handle();
    let t = std::thread::spawn(move || server.serve());
    let url = format!("nbds://{addr}/disk");
    let cdir = ca.client_dir(dir.path(), "client", Some(&ca));
    let c = NbdClient::open(&url, tls_opts(&cdir)).unwrap();
    model_workload(&c, 4, 150, 512 * 1024, 22);
    let data = pattern(MIB, 40 * 65_536, 3);
    c.write_at(&data, MIB).unwrap();
    assert!(read(&*disk, MIB, data.len()) == data);
    drop(c);
    // Without a client certificate: refused.
    let anon = ca.client_dir(dir.path(), "anon", None);
    assert!(NbdClient::open(&url, tls_opts(&anon)).is_err());
    // Plain: told TLS is required.
    let e = NbdClient::open(&format!("nbd://{addr}/disk"), quick_opts()).unwrap_err();
    assert!(matches!(e, ClientError::TlsRequired), "{e:?}");
    stop.stop();
    t.join().unwrap().unwrap();
}
