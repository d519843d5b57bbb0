//! The NBD server with TLS required (`NBD_OPT_STARTTLS`), against real clients on loopback:
//! qemu-io and qemu-img with `tls-creds-x509` objects, nbdinfo and nbdcopy with `nbds://`
//! URLs; plain clients refused; client certificates verified (verify-peer); clients that
//! break off or garble the TLS handshake. Certificates are made with rcgen for each test.
#![cfg(feature = "nbd")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/test_ca.rs"]
mod test_ca;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use test_ca::Ca;

use block_io::nbd::proto::{self, InfoRequest, OptionHeader, Request};
use block_io::nbd::tls::{self, rustls, TlsCredentials};
use block_io::nbd::{Export, NbdServer, StopHandle};
use block_io::testing::oracle;
use block_io::{BlockDevice, FileStorage, MemStorage, RawDisk, Storage};

// ---- oracles and processes -------------------------------------------------------------

fn output(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs a command, panicking with its output on failure; returns stdout and stderr.
fn run(cmd: &str, args: &[&str]) -> String {
    let o = output(cmd, args);
    assert!(o.status.success(), "{cmd} {args:?} failed: {}", text(&o));
    text(&o)
}

// ---- certificates ----------------------------------------------------------------------

impl Ca {
    /// A directory in QEMU's `tls-creds-x509` layout for a server signed by this CA.
    fn server_dir(&self, dir: &Path) -> PathBuf {
        let d = dir.join("server");
        std::fs::create_dir_all(&d).unwrap();
        let (cert, key) = self.leaf(true, "nbd server");
        std::fs::write(d.join("ca-cert.pem"), &self.pem).unwrap();
        std::fs::write(d.join("server-cert.pem"), cert).unwrap();
        std::fs::write(d.join("server-key.pem"), key).unwrap();
        d
    }

    /// A client directory (qemu `endpoint=client`, libnbd `tls-certificates=`) trusting this
    /// CA, with a client certificate from `signer` when given. The signer's CA is trusted as
    /// well: qemu refuses to load a client certificate that does not chain to a CA it trusts,
    /// and it must get as far as offering it to the server.
    fn client_dir(&self, dir: &Path, name: &str, signer: Option<&Ca>) -> PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let mut cas = self.pem.clone();
        if let Some(s) = signer.filter(|s| s.pem != self.pem) {
            cas.push_str(&s.pem);
        }
        std::fs::write(d.join("ca-cert.pem"), cas).unwrap();
        if let Some(s) = signer {
            let (cert, key) = s.leaf(false, name);
            std::fs::write(d.join("client-cert.pem"), cert).unwrap();
            std::fs::write(d.join("client-key.pem"), key).unwrap();
        }
        d
    }
}

// ---- the server ------------------------------------------------------------------------

/// A server running on its own thread; stopped (and checked) on drop.
struct Running {
    stop: StopHandle,
    thread: Option<JoinHandle<block_io::Result<()>>>,
    addr: SocketAddr,
}

impl Running {
    fn start(exports: Vec<Export>, config: Arc<rustls::ServerConfig>) -> Running {
        let server = NbdServer::bind_tcp("127.0.0.1:0", exports)
            .unwrap()
            .require_tls(config);
        assert!(server.tls_required());
        let stop = server.stop_handle();
        let addr = server.local_addr().unwrap();
        let thread = std::thread::spawn(move || server.serve());
        Running {
            stop,
            thread: Some(thread),
            addr,
        }
    }

    fn port(&self) -> String {
        self.addr.port().to_string()
    }

    /// `--image-opts` for qemu naming export `name` over TLS object `tls0` (or plain).
    fn qemu_opts(&self, name: &str, tls: bool) -> String {
        let mut s = format!(
            "driver=nbd,host=127.0.0.1,port={},export={name}",
            self.port()
        );
        if tls {
            s.push_str(",tls-creds=tls0");
        }
        s
    }

    fn nbds_url(&self, name: &str, certs: &Path) -> String {
        format!(
            "nbds://127.0.0.1:{}/{name}?tls-certificates={}",
            self.port(),
            certs.display()
        )
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    fn finish(mut self) {
        self.stop.stop();
        self.thread.take().unwrap().join().unwrap().unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn mem_disk(size: u64) -> Arc<RawDisk<MemStorage>> {
    let s = MemStorage::new();
    s.set_len(size).unwrap();
    Arc::new(RawDisk::new(s).unwrap())
}

fn read_dev(dev: &dyn BlockDevice, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    dev.read_at(&mut b, off).unwrap();
    b
}

/// The `--object` of a qemu TLS client reading `dir`.
fn qemu_tls_object(dir: &Path) -> String {
    format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        dir.display()
    )
}

/// qemu-io over TLS with the client credentials in `dir`, running `cmds`.
fn qemu_io_tls(srv: &Running, dir: &Path, name: &str, cmds: &[&str]) -> Output {
    let obj = qemu_tls_object(dir);
    let opts = srv.qemu_opts(name, true);
    let mut args = vec!["--object", obj.as_str(), "--image-opts", opts.as_str()];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    output("qemu-io", &args)
}

/// qemu failed in the option haggling after starting TLS, not while loading its credentials.
fn refused_by_server(o: &Output) -> bool {
    let t = text(o);
    !o.status.success() && !t.contains("Our own certificate") && t.contains("option")
}

fn qemu_io_ok(o: &Output) -> bool {
    let t = text(o);
    o.status.success() && !t.contains("Pattern verification failed") && !t.contains("error")
}

// ---- real clients ----------------------------------------------------------------------

#[test]
fn qemu_io_writes_and_reads_over_tls_1_3_and_the_data_lands() {
    if !oracle("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let sdir = ca.server_dir(dir.path());
    let cdir = ca.client_dir(dir.path(), "client", None);
    // TLS 1.3 only: the client must speak it for anything to work.
    let chain = tls::load_certs(&sdir.join("server-cert.pem")).unwrap();
    let key = tls::load_key(&sdir.join("server-key.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let dev = mem_disk(16 << 20);
    let srv = Running::start(vec![Export::new("disk", dev.clone())], Arc::new(config));
    let o = qemu_io_tls(
        &srv,
        &cdir,
        "disk",
        &[
            "write -P 0x5a 0 64k",
            "read -P 0x5a 0 64k",
            "write -z 1M 1M",
        ],
    );
    assert!(qemu_io_ok(&o), "qemu-io over TLS: {}", text(&o));
    assert_eq!(read_dev(&*dev, 0, 65536), vec![0x5a; 65536]);
    // A second connection sees the first one's data.
    let o = qemu_io_tls(&srv, &cdir, "disk", &["read -P 0x5a 0 64k"]);
    assert!(qemu_io_ok(&o), "qemu-io over TLS: {}", text(&o));
    srv.finish();
}

#[test]
fn tls_over_a_unix_socket() {
    if !oracle("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let sdir = ca.server_dir(dir.path());
    let cdir = ca.client_dir(dir.path(), "client", None);
    let config = TlsCredentials::from_dir(&sdir).server_config().unwrap();
    let dev = mem_disk(1 << 20);
    let sock = dir.path().join("nbd.sock");
    let server = NbdServer::bind_unix(&sock, vec![Export::new("d", dev.clone())])
        .unwrap()
        .require_tls(config);
    let stop = server.stop_handle();
    let thread = std::thread::spawn(move || server.serve());
    let obj = qemu_tls_object(&cdir);
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=d,tls-creds=tls0,tls-hostname=localhost",
        sock.display()
    );
    let o = output(
        "qemu-io",
        &[
            "--object",
            &obj,
            "--image-opts",
            &opts,
            "-c",
            "write -P 0x7e 4k 4k",
            "-c",
            "read -P 0x7e 4k 4k",
        ],
    );
    let plain = format!("nbd+unix:///d?socket={}", sock.display());
    let refused = output("qemu-io", &["-f", "raw", "-c", "read 0 4k", &plain]);
    stop.stop();
    thread.join().unwrap().unwrap();
    assert!(
        qemu_io_ok(&o),
        "qemu-io over TLS on a Unix socket: {}",
        text(&o)
    );
    assert_eq!(read_dev(&*dev, 4096, 4096), vec![0x7e; 4096]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(text(&refused).contains("TLS"), "{}", text(&refused));
}

#[test]
fn qemu_img_convert_and_compare_over_tls() {
    if !oracle("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let sdir = ca.server_dir(dir.path());
    let cdir = ca.client_dir(dir.path(), "client", None);
    let config = TlsCredentials::from_dir(&sdir).server_config().unwrap();
    let src = dir.path().join("src.raw");
    let s = FileStorage::create(&src).unwrap();
    s.set_len(8 << 20).unwrap();
    let dev = RawDisk::new(s).unwrap();
    let pattern: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i % 251) as u8).collect();
    dev.write_at(&pattern, 2 << 20).unwrap();
    dev.flush().unwrap();
    let srv = Running::start(
        vec![Export::new("src", Arc::new(dev)).read_only(true)],
        config,
    );
    let obj = qemu_tls_object(&cdir);
    let json = format!(
        "json:{{\"driver\":\"raw\",\"file\":{{\"driver\":\"nbd\",\"server\":{{\"type\":\"inet\",\
         \"host\":\"127.0.0.1\",\"port\":\"{}\"}},\"export\":\"src\",\"tls-creds\":\"tls0\"}}}}",
        srv.port()
    );
    let dst = dir.path().join("dst.qcow2");
    let dst_s = dst.to_str().unwrap();
    run(
        "qemu-img",
        &["convert", "--object", &obj, "-O", "qcow2", &json, dst_s],
    );
    // The copy is the source, compared by qemu-img itself over TLS.
    run("qemu-img", &["compare", "--object", &obj, &json, dst_s]);
    run(
        "qemu-img",
        &["compare", "-f", "raw", src.to_str().unwrap(), dst_s],
    );
    // The holes stayed holes: only the megabyte of data was allocated.
    let map = run("qemu-img", &["map", "--output=json", dst_s]);
    let data: Vec<&str> = map
        .lines()
        .filter(|l| l.contains("\"data\": true"))
        .collect();
    assert_eq!(data.len(), 1, "{map}");
    assert!(data[0].contains("\"start\": 2097152"), "{map}");
    assert!(data[0].contains("\"length\": 1048576"), "{map}");
    srv.finish();
}

#[test]
fn nbdinfo_and_nbdcopy_over_nbds() {
    if !oracle("nbdinfo") || !oracle("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let sdir = ca.server_dir(dir.path());
    let cdir = ca.client_dir(dir.path(), "client", None);
    let config =
        TlsCredentials::from_pem(sdir.join("server-cert.pem"), sdir.join("server-key.pem"))
            .server_config()
            .unwrap();
    let dev = mem_disk(4 << 20);
    dev.write_at(&vec![0x11; 65536], 1 << 20).unwrap();
    let srv = Running::start(
        vec![Export::new("d", dev.clone()).description("over TLS")],
        config,
    );
    let url = srv.nbds_url("d", &cdir);
    let info = run("nbdinfo", &[&url]);
    assert!(info.contains("export-size: 4194304"), "{info}");
    assert!(info.contains("over TLS"), "{info}");
    let map = run("nbdinfo", &["--map", &url]);
    assert!(map.contains("1048576") && map.contains("data"), "{map}");
    let copy = dir.path().join("copy.raw");
    run("nbdcopy", &[&url, copy.to_str().unwrap()]);
    let got = std::fs::read(&copy).unwrap();
    assert_eq!(got.len(), 4 << 20);
    assert_eq!(got, read_dev(&*dev, 0, 4 << 20));
    // And back: nbdcopy writes through TLS into the export.
    let src = dir.path().join("src.raw");
    std::fs::write(&src, vec![0x77u8; 4 << 20]).unwrap();
    run("nbdcopy", &[src.to_str().unwrap(), &url]);
    assert_eq!(read_dev(&*dev, 0, 4 << 20), vec![0x77; 4 << 20]);
    srv.finish();
}

#[test]
fn plain_clients_are_told_tls_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let sdir = ca.server_dir(dir.path());
    let config = TlsCredentials::from_dir(&sdir).server_config().unwrap();
    let dev = mem_disk(1 << 20);
    let srv = Running::start(vec![Export::new("d", dev.clone())], config);
    if oracle("qemu-io") {
        let opts = srv.qemu_opts("d", false);
        let o = output(
            "qemu-io",
            &["--image-opts", &opts, "-c", "write -P 0x33 0 4k"],
        );
        assert!(!o.status.success(), "{}", text(&o));
        // qemu: "Server requires TLS" (the NBD_REP_ERR_TLS_REQD reply).
        assert!(text(&o).contains("TLS"), "{}", text(&o));
    }
    if oracle("nbdinfo") {
        let url = format!("nbd://127.0.0.1:{}/d", srv.port());
        let o = output("nbdinfo", &[&url]);
        assert!(!o.status.success(), "{}", text(&o));
    }
    assert_eq!(
        read_dev(&*dev, 0, 4096),
        vec![0; 4096],
        "nothing was written"
    );

    // What real clients never show: every option before STARTTLS.
    let mut c = Raw::open(&srv);
    for opt in [
        proto::OPT_LIST,
        proto::OPT_STRUCTURED_REPLY,
        proto::OPT_INFO,
        proto::OPT_GO,
        proto::OPT_SET_META_CONTEXT,
        77,
    ] {
        let data = if matches!(opt, proto::OPT_INFO | proto::OPT_GO) {
            InfoRequest {
                name: "d".into(),
                requests: vec![],
            }
            .encode()
        } else {
            vec![]
        };
        c.option(opt, &data);
        let r = c.replies(opt);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, proto::REP_ERR_TLS_REQD, "option {opt}");
    }
    c.option(proto::OPT_STARTTLS, b"x");
    assert_eq!(c.replies(proto::OPT_STARTTLS)[0].0, proto::REP_ERR_INVALID);
    c.option(proto::OPT_ABORT, &[]);
    assert_eq!(c.replies(proto::OPT_ABORT)[0].0, proto::REP_ACK);
    assert!(c.closed());
    // NBD_OPT_EXPORT_NAME cannot be refused with an error: the connection closes.
    let mut c = Raw::open(&srv);
    c.option(proto::OPT_EXPORT_NAME, b"d");
    assert!(c.closed());
    srv.finish();
}

#[test]
fn verify_peer_takes_only_client_certificates_of_its_ca() {
    if !oracle("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("our CA");
    let other = Ca::new("another CA");
    let sdir = ca.server_dir(dir.path());
    let config = TlsCredentials::from_dir(&sdir)
        .verify_peer(true)
        .server_config()
        .unwrap();
    let dev = mem_disk(1 << 20);
    let srv = Running::start(vec![Export::new("d", dev.clone())], config);

    let foreign = ca.client_dir(dir.path(), "foreign", Some(&other));
    let o = qemu_io_tls(&srv, &foreign, "d", &["write -P 0x44 0 4k"]);
    assert!(
        !o.status.success(),
        "a foreign client certificate: {}",
        text(&o)
    );
    // Refused by the server (qemu loaded its certificate and lost the connection when the
    // server checked it: a TLS alert or a closed socket, whichever it saw first).
    assert!(refused_by_server(&o), "{}", text(&o));
    let none = ca.client_dir(dir.path(), "none", None);
    let o = qemu_io_tls(&srv, &none, "d", &["write -P 0x44 0 4k"]);
    assert!(!o.status.success(), "no client certificate: {}", text(&o));
    assert!(refused_by_server(&o), "{}", text(&o));
    assert_eq!(
        read_dev(&*dev, 0, 4096),
        vec![0; 4096],
        "nothing was written"
    );

    let good = ca.client_dir(dir.path(), "good", Some(&ca));
    let o = qemu_io_tls(
        &srv,
        &good,
        "d",
        &["write -P 0x44 0 4k", "read -P 0x44 0 4k"],
    );
    assert!(qemu_io_ok(&o), "our client certificate: {}", text(&o));
    assert_eq!(read_dev(&*dev, 0, 4096), vec![0x44; 4096]);
    if oracle("nbdinfo") {
        let url = srv.nbds_url("d", &good);
        let info = run("nbdinfo", &[&url]);
        assert!(info.contains("export-size: 1048576"), "{info}");
        let url = srv.nbds_url("d", &foreign);
        assert!(!output("nbdinfo", &[&url]).status.success());
    }
    srv.finish();
}

#[test]
fn mutual_tls_from_certificates_in_memory_with_a_rustls_client() {
    // The offload providers' way: no files, a per-transfer CA, rustls on both ends.
    let ca = Ca::new("per-transfer CA");
    let (scert, skey) = ca.leaf(true, "source");
    let (ccert, ckey) = ca.leaf(false, "destination");
    let pem_certs = |s: &str| {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::pem_slice_iter(s.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    };
    let pem_key = |s: &str| {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::PrivateKeyDer::from_pem_slice(s.as_bytes()).unwrap()
    };
    let config = tls::server_config(
        pem_certs(&scert),
        pem_key(&skey),
        Some(vec![rustls::pki_types::CertificateDer::from(
            ca.der.clone(),
        )]),
    )
    .unwrap();
    let dev = mem_disk(1 << 20);
    dev.write_at(&vec![0xab; 4096], 8192).unwrap();
    let srv = Running::start(
        vec![Export::new("src", dev.clone()).read_only(true)],
        config,
    );

    let client_config = |with_cert: bool| {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(ca.der.clone()))
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots);
        Arc::new(if with_cert {
            b.with_client_auth_cert(pem_certs(&ccert), pem_key(&ckey))
                .unwrap()
        } else {
            b.with_no_client_auth()
        })
    };

    let mut c = Raw::open(&srv);
    c.option(proto::OPT_STARTTLS, &[]);
    assert_eq!(c.replies(proto::OPT_STARTTLS)[0].0, proto::REP_ACK);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(client_config(true), name.clone()).unwrap();
    let mut t = Raw {
        s: rustls::StreamOwned::new(conn, c.s),
    };
    // A second STARTTLS over TLS is invalid; the haggling starts afresh.
    t.option(proto::OPT_STARTTLS, &[]);
    assert_eq!(t.replies(proto::OPT_STARTTLS)[0].0, proto::REP_ERR_INVALID);
    t.option(proto::OPT_LIST, &[]);
    let list = t.replies(proto::OPT_LIST);
    assert_eq!(list[0].0, proto::REP_SERVER);
    assert_eq!(list.last().unwrap().0, proto::REP_ACK);
    let g = InfoRequest {
        name: "src".into(),
        requests: vec![],
    };
    t.option(proto::OPT_GO, &g.encode());
    assert_eq!(t.replies(proto::OPT_GO).last().unwrap().0, proto::REP_ACK);
    t.request(proto::CMD_READ, 0, 7, 8192, 4096);
    let (cookie, err, data) = t.simple_reply(4096);
    assert_eq!((cookie, err), (7, 0));
    assert_eq!(data, vec![0xab; 4096]);
    t.request(proto::CMD_WRITE, 0, 8, 0, 512);
    t.s.write_all(&[1u8; 512]).unwrap();
    let (cookie, err, _) = t.simple_reply(0);
    assert_eq!((cookie, err), (8, proto::EPERM));
    t.request(proto::CMD_DISC, 0, 9, 0, 0);
    t.s.flush().unwrap();

    // Without a client certificate the handshake fails.
    let mut c = Raw::open(&srv);
    c.option(proto::OPT_STARTTLS, &[]);
    assert_eq!(c.replies(proto::OPT_STARTTLS)[0].0, proto::REP_ACK);
    let conn = rustls::ClientConnection::new(client_config(false), name).unwrap();
    let mut t = Raw {
        s: rustls::StreamOwned::new(conn, c.s),
    };
    t.option(proto::OPT_LIST, &[]);
    let mut b = [0u8; 20];
    assert!(
        t.s.read_exact(&mut b).is_err(),
        "served without a client certificate"
    );
    srv.finish();
}

#[test]
fn clients_breaking_off_the_tls_handshake_do_not_hurt_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let sdir = ca.server_dir(dir.path());
    let cdir = ca.client_dir(dir.path(), "client", None);
    let config = TlsCredentials::from_dir(&sdir).server_config().unwrap();
    let dev = mem_disk(1 << 20);
    let srv = Running::start(vec![Export::new("d", dev.clone())], config);

    // A client that leaves right after the STARTTLS ACK.
    let mut c = Raw::open(&srv);
    c.option(proto::OPT_STARTTLS, &[]);
    assert_eq!(c.replies(proto::OPT_STARTTLS)[0].0, proto::REP_ACK);
    drop(c);
    // A client that sends half a ClientHello and leaves.
    let mut c = Raw::open(&srv);
    c.option(proto::OPT_STARTTLS, &[]);
    assert_eq!(c.replies(proto::OPT_STARTTLS)[0].0, proto::REP_ACK);
    c.s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])
        .unwrap();
    drop(c);
    // A client that sends garbage instead of a ClientHello: the server closes.
    let mut c = Raw::open(&srv);
    c.option(proto::OPT_STARTTLS, &[]);
    assert_eq!(c.replies(proto::OPT_STARTTLS)[0].0, proto::REP_ACK);
    c.s.write_all(&[0x42; 64]).unwrap();
    assert!(c.closed());
    // A client stuck mid-handshake holds only its own connection.
    let mut stuck = Raw::open(&srv);
    stuck.option(proto::OPT_STARTTLS, &[]);
    assert_eq!(stuck.replies(proto::OPT_STARTTLS)[0].0, proto::REP_ACK);
    stuck.s.write_all(&[0x16, 0x03, 0x01]).unwrap();

    if oracle("qemu-io") {
        let o = qemu_io_tls(
            &srv,
            &cdir,
            "d",
            &["write -P 0x21 0 4k", "read -P 0x21 0 4k"],
        );
        assert!(qemu_io_ok(&o), "after the broken handshakes: {}", text(&o));
        assert_eq!(read_dev(&*dev, 0, 4096), vec![0x21; 4096]);
    }
    // Stopping the server ends the stuck handshake too.
    srv.finish();
    assert!(stuck.closed());
}

#[test]
fn a_client_stalled_in_the_tls_handshake_is_cut_off_at_the_handshake_limit() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let sdir = ca.server_dir(dir.path());
    let config = TlsCredentials::from_dir(&sdir).server_config().unwrap();
    let server = NbdServer::bind_tcp("127.0.0.1:0", vec![Export::new("d", mem_disk(1 << 20))])
        .unwrap()
        .require_tls(config)
        .handshake_limit(Duration::from_millis(300));
    let addr = server.local_addr().unwrap();
    let stop = server.stop_handle();
    let thread = std::thread::spawn(move || server.serve());
    let mut c = Raw {
        s: TcpStream::connect(addr).unwrap(),
    };
    c.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut g = [0u8; 18];
    c.s.read_exact(&mut g).unwrap();
    c.s.write_all(&proto::CLIENT_FIXED_NEWSTYLE.to_be_bytes())
        .unwrap();
    c.option(proto::OPT_STARTTLS, &[]);
    assert_eq!(c.replies(proto::OPT_STARTTLS)[0].0, proto::REP_ACK);
    c.s.write_all(&[0x16, 0x03, 0x01]).unwrap();
    let t0 = std::time::Instant::now();
    assert!(c.closed(), "still connected after the handshake limit");
    assert!(t0.elapsed() < Duration::from_secs(4));
    stop.stop();
    thread.join().unwrap().unwrap();
}

#[test]
fn credentials_that_cannot_be_loaded_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = TlsCredentials::from_dir(dir.path())
        .server_config()
        .unwrap_err();
    assert_eq!(e.kind(), block_io::ErrorKind::InvalidInput);
    assert!(
        e.chain_string().contains("server-cert.pem"),
        "{}",
        e.chain_string()
    );
    let ca = Ca::new("test CA");
    let sdir = ca.server_dir(dir.path());
    // A key is not a certificate.
    let e = tls::load_certs(&sdir.join("server-key.pem")).unwrap_err();
    assert!(
        e.chain_string().contains("no certificate"),
        "{}",
        e.chain_string()
    );
    // Verifying peers without a CA.
    let e = TlsCredentials::from_pem(sdir.join("server-cert.pem"), sdir.join("server-key.pem"))
        .verify_peer(true)
        .server_config()
        .unwrap_err();
    assert!(e.chain_string().contains("CA"), "{}", e.chain_string());
    // A key that does not match the certificate.
    let (other_cert, _) = ca.leaf(true, "other");
    std::fs::write(dir.path().join("other.pem"), other_cert).unwrap();
    let e = TlsCredentials::from_pem(dir.path().join("other.pem"), sdir.join("server-key.pem"))
        .server_config()
        .unwrap_err();
    assert_eq!(e.kind(), block_io::ErrorKind::InvalidInput);
    // With the CA missing, verify-peer fails; without verify-peer the CA is not needed.
    std::fs::remove_file(sdir.join("ca-cert.pem")).unwrap();
    assert!(TlsCredentials::from_dir(&sdir).server_config().is_ok());
    let e = TlsCredentials::from_dir(&sdir)
        .verify_peer(true)
        .server_config()
        .unwrap_err();
    assert!(
        e.chain_string().contains("ca-cert.pem"),
        "{}",
        e.chain_string()
    );
}

// ---- a raw-protocol client -------------------------------------------------------------

/// A connection past the greeting and client flags, over TCP or TLS.
struct Raw<S> {
    s: S,
}

impl Raw<TcpStream> {
    fn open(srv: &Running) -> Raw<TcpStream> {
        let mut s = srv.connect();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        s.write_all(&(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES).to_be_bytes())
            .unwrap();
        Raw { s }
    }
}

impl<S: Read + Write> Raw<S> {
    fn option(&mut self, option: u32, data: &[u8]) {
        let h = OptionHeader {
            option,
            len: data.len() as u32,
        };
        self.s.write_all(&h.encode()).unwrap();
        self.s.write_all(data).unwrap();
        self.s.flush().unwrap();
    }

    /// Reads option replies until a final one (ACK or error): (type, data) of each.
    fn replies(&mut self, option: u32) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let mut h = [0u8; proto::OPTION_REPLY_LEN];
            self.s.read_exact(&mut h).unwrap();
            let h = proto::OptionReplyHeader::parse(&h).unwrap();
            assert_eq!(h.option, option);
            let mut d = vec![0u8; h.len as usize];
            self.s.read_exact(&mut d).unwrap();
            let last = h.reply == proto::REP_ACK || h.reply & (1 << 31) != 0;
            out.push((h.reply, d));
            if last {
                return out;
            }
        }
    }

    fn request(&mut self, cmd: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let r = Request {
            flags,
            command: proto::Command::from_code(cmd),
            cookie,
            offset,
            length,
        };
        self.s.write_all(&r.encode()).unwrap();
        self.s.flush().unwrap();
    }

    /// One simple reply: (cookie, error, data of `read_len` bytes when it succeeded).
    fn simple_reply(&mut self, read_len: usize) -> (u64, u32, Vec<u8>) {
        let mut p = [0u8; 16];
        self.s.read_exact(&mut p).unwrap();
        match proto::ReplyHeader::parse_prefix(&p).unwrap() {
            (proto::ReplyHeader::Simple { error, cookie }, _) => {
                let mut data = Vec::new();
                if error == 0 {
                    data = vec![0u8; read_len];
                    self.s.read_exact(&mut data).unwrap();
                }
                (cookie, error, data)
            }
            other => panic!("expected a simple reply, got {other:?}"),
        }
    }

    /// Whether the server closes the connection (after whatever it still sends, such as a
    /// TLS alert): reads until EOF or a reset; a read timeout means it did not.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 256];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) => {
                    return !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    )
                }
            }
        }
    }
}
