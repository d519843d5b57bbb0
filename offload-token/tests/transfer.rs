//! Provider-to-provider offload copies (issue 14 part 3): two provider daemons on loopback
//! with different roots, driven by the initiator; trust refusals at both ends of the data
//! channel; a source that dies mid-copy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use block_io::nbd::{Export, NbdClient, NbdClientOptions, NbdServer, RetryPolicy, TlsOptions};
use block_io::{BlockDevice, FileStorage};
use chain::{Disk, OpenOptions};
use offload_token::transfer::{
    copy_blocking, destination_config, peer_name, resolve_under, ByteCounter, ControlClient,
    ControlKey, CopyRequest, DaemonConfig, DaemonStop, Endpoint, ImageOpener, ProviderDaemon,
    ProviderKeyPair, Reply, Request, Role, TransferCa, TransferError,
};
use uuid::Uuid;

const MIB: u64 = 1 << 20;

/// Opens images as chains, as the CLI's provider does.
#[derive(Debug)]
struct ChainOpener;

impl ImageOpener for ChainOpener {
    fn open(&self, path: &Path, writable: bool) -> Result<Arc<dyn BlockDevice>, TransferError> {
        let o = OpenOptions::new().read_only(!writable);
        let d = Disk::open(path, &o).map_err(|e| TransferError::Invalid(e.to_string()))?;
        Ok(Arc::new(d))
    }
}

struct Daemon {
    addr: String,
    key: ControlKey,
    stop: DaemonStop,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    fn start(root: &Path, tune: impl FnOnce(&mut DaemonConfig)) -> Daemon {
        let key = ControlKey::generate();
        let mut config = DaemonConfig::new(root, key.clone());
        tune(&mut config);
        let d = ProviderDaemon::bind("127.0.0.1:0", config, Arc::new(ChainOpener)).unwrap();
        let addr = d.local_addr().unwrap().to_string();
        let stop = d.stop_handle();
        let thread = std::thread::spawn(move || d.serve_blocking().unwrap());
        Daemon {
            addr,
            key,
            stop,
            thread: Some(thread),
        }
    }

    fn endpoint(&self, path: &str, offset: u64) -> Endpoint {
        Endpoint {
            addr: self.addr.clone(),
            key: self.key.clone(),
            path: path.into(),
            offset,
        }
    }

    fn kill(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A dynamic VHDX of `size` bytes with data in `pieces` (offset, len) and zeros elsewhere.
fn make_vhdx(path: &Path, size: u64, pieces: &[(u64, u64)]) {
    let mut o = vhdx_format::CreateOptions::dynamic(size);
    o.block_size = Some(MIB as u32);
    let f = vhdx_format::create_file(path, &o).unwrap();
    for (i, &(off, len)) in pieces.iter().enumerate() {
        f.write_at(&pattern(i as u64 + 1, len as usize), off)
            .unwrap();
    }
    f.flush().unwrap();
}

fn make_vhd(path: &Path, size: u64) {
    let o = vhd_format::CreateOptions::new(size, vhd_format::Subformat::Dynamic);
    let f = vhd_format::VhdFile::create(FileStorage::create(path).unwrap(), &o).unwrap();
    f.flush().unwrap();
}

fn read_all(path: &Path, off: u64, len: u64) -> Vec<u8> {
    let d = Disk::open(path, &OpenOptions::new().read_only(true)).unwrap();
    let mut b = vec![0u8; len as usize];
    d.read_at(&mut b, off).unwrap();
    b
}

fn vhd_is_clean(path: &Path) -> bool {
    let s =
        block_io::FileStorage::open(path, &block_io::OpenOptions::new().read_only(true)).unwrap();
    let f = vhd_format::VhdFile::open(s, &vhd_format::OpenOptions::new().read_only(true)).unwrap();
    f.check().unwrap().is_clean()
}

fn roots() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("s");
    let d = dir.path().join("d");
    std::fs::create_dir(&s).unwrap();
    std::fs::create_dir(&d).unwrap();
    (dir, s, d)
}

#[test]
fn vhdx_data_arrives_byte_exact_in_a_vhd_and_never_through_the_initiator() {
    let (_dir, sroot, droot) = roots();
    let size = 48 * MIB;
    // With 1 MiB blocks: a leading hole (the zero-data token), data with holes inside (a
    // sealed token), and a zero tail (ALL_ZERO_BEYOND_CURRENT_RANGE).
    let pieces = [
        (3 * MIB, 5 * MIB),
        (9 * MIB + 4096, 3 * MIB),
        (20 * MIB, 9 * MIB + 512),
    ];
    make_vhdx(&sroot.join("src.vhdx"), size, &pieces);
    std::fs::create_dir(droot.join("sub")).unwrap();
    make_vhd(&droot.join("sub/dst.vhd"), size);
    make_vhd(&droot.join("relay.vhd"), size);
    let s = Daemon::start(&sroot, |_| {});
    let d = Daemon::start(&droot, |c| c.max_redeem_len = 4 * MIB);

    let req = CopyRequest::new(
        s.endpoint("src.vhdx", 0),
        d.endpoint("sub/dst.vhd", 0),
        None,
    );
    let r = copy_blocking(&req).unwrap();
    assert_eq!(r.bytes_copied, size);
    assert!(r.tokens >= 2, "{r:?}");
    assert!(r.zero_bytes >= 3 * MIB, "{r:?}");
    // Short redeems (4 MiB at most) looped to completion.
    assert!(r.redeems >= 7, "{r:?}");
    // Control traffic only: a few KiB per token, never the 17 MiB of data.
    assert!(
        r.bytes_through_initiator < 64 * 1024,
        "{} bytes through the initiator",
        r.bytes_through_initiator
    );
    let want = read_all(&sroot.join("src.vhdx"), 0, size);
    let got = read_all(&droot.join("sub/dst.vhd"), 0, size);
    assert!(want == got, "the VHD differs from the VHDX");
    assert!(vhd_is_clean(&droot.join("sub/dst.vhd")));

    // A sub-range to an offset, relayed: the same bytes, and now the data does cross the
    // initiator (its counter sees it).
    let mut req = CopyRequest::new(
        s.endpoint("src.vhdx", 20 * MIB),
        d.endpoint("relay.vhd", 2 * MIB),
        Some(8 * MIB),
    );
    req.relay = true;
    let r = copy_blocking(&req).unwrap();
    assert_eq!(r.bytes_copied, 8 * MIB);
    assert!(r.bytes_through_initiator >= 16 * MIB, "{r:?}");
    let got = read_all(&droot.join("relay.vhd"), 2 * MIB, 8 * MIB);
    assert!(got == want[20 * MIB as usize..28 * MIB as usize]);
    assert!(read_all(&droot.join("relay.vhd"), 0, 2 * MIB)
        .iter()
        .all(|&b| b == 0));
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Connects to S's export as a destination would, with `cert` over `key`, trusting `ca`.
fn pull_with(
    ca: &[u8],
    cert: &[u8],
    key: &ProviderKeyPair,
    transfer: Uuid,
    url: &str,
) -> Result<Vec<u8>, String> {
    let config = destination_config(ca, cert, key.private_der()).map_err(|e| e.to_string())?;
    pull_with_config(config, transfer, url)
}

fn pull_with_config(
    config: Arc<block_io::nbd::tls::rustls::ClientConfig>,
    transfer: Uuid,
    url: &str,
) -> Result<Vec<u8>, String> {
    let opts = NbdClientOptions {
        connect_timeout: Duration::from_secs(5),
        retry: RetryPolicy::never(),
        tls: Some(TlsOptions::new(config).with_server_name(peer_name(transfer, Role::Source))),
        read_only: true,
        ..NbdClientOptions::default()
    };
    let url = url.to_string();
    // NbdClient runs a runtime of its own: not from inside the test's runtime.
    std::thread::spawn(move || {
        let c = NbdClient::open(&url, opts).map_err(|e| e.to_string())?;
        let mut b = vec![0u8; 4096];
        c.read_at(&mut b, 0).map_err(|e| e.to_string())?;
        Ok(b)
    })
    .join()
    .unwrap()
}

#[test]
fn certificates_of_another_transfer_expired_or_of_the_wrong_role_are_refused() {
    let (_dir, sroot, droot) = roots();
    make_vhdx(&sroot.join("src.vhdx"), 8 * MIB, &[(0, 8 * MIB)]);
    make_vhd(&droot.join("dst.vhd"), 8 * MIB);
    let s = Daemon::start(&sroot, |_| {});
    let d = Daemon::start(&droot, |_| {});
    let rt = rt();
    let counter = Arc::new(ByteCounter::default());
    let ca = TransferCa::new(Uuid::new_v4(), Duration::from_secs(600)).unwrap();
    let tid = ca.transfer();
    let mut sc = rt
        .block_on(ControlClient::connect(&s.addr, &s.key, counter.clone()))
        .unwrap();
    rt.block_on(sc.join(&ca, Role::Source)).unwrap();
    let m = rt
        .block_on(sc.mint(tid, "src.vhdx", 0, 8 * MIB, None))
        .unwrap();
    let ep = m.source.clone().expect("a data token has an export");
    let url = format!("nbds://{}:{}/{}", ep.host, ep.port, ep.export);
    let want = read_all(&sroot.join("src.vhdx"), 0, 4096);

    let key = ProviderKeyPair::generate().unwrap();
    let public = key.public().unwrap();
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    // The honest destination certificate works: the refusals below are the certificates'.
    let good = ca.issue(Role::Destination, &public).unwrap();
    assert_eq!(
        pull_with(ca.cert_der(), &good, &key, tid, &url).unwrap(),
        want
    );

    let other = TransferCa::new(Uuid::new_v4(), Duration::from_secs(600)).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "another transfer's CA and id",
            other.issue(Role::Destination, &public).unwrap(),
        ),
        (
            "another transfer's CA naming this transfer",
            other
                .issue_with(tid, Role::Destination, &public, now - hour, now + hour)
                .unwrap(),
        ),
        (
            "expired",
            ca.issue_with(tid, Role::Destination, &public, now - 2 * hour, now - hour)
                .unwrap(),
        ),
        ("the source role", ca.issue(Role::Source, &public).unwrap()),
        (
            "another transfer id from this CA",
            ca.issue_with(
                Uuid::new_v4(),
                Role::Destination,
                &public,
                now - hour,
                now + hour,
            )
            .unwrap(),
        ),
    ];
    for (what, cert) in &cases {
        let r = pull_with(ca.cert_der(), cert, &key, tid, &url);
        assert!(r.is_err(), "S admitted a certificate of {what}");
    }
    // No certificate at all.
    {
        use block_io::nbd::tls::rustls;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().to_vec().into()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let r = pull_with_config(Arc::new(config), tid, &url);
        assert!(r.is_err(), "S admitted a client without a certificate");
    }

    // D refuses a source whose certificate is not this transfer's source.
    let mut dc = rt
        .block_on(ControlClient::connect(&d.addr, &d.key, counter.clone()))
        .unwrap();
    rt.block_on(dc.join(&ca, Role::Destination)).unwrap();
    let _guard = rt.enter();
    let rogue_key = ProviderKeyPair::generate().unwrap();
    let rogue_public = rogue_key.public().unwrap();
    // The last one is a valid source certificate: the harness itself works.
    let rogues: Vec<(&str, Vec<u8>)> = vec![
        (
            "another transfer's CA",
            other
                .issue_with(tid, Role::Source, &rogue_public, now - hour, now + hour)
                .unwrap(),
        ),
        (
            "expired",
            ca.issue_with(tid, Role::Source, &rogue_public, now - 2 * hour, now - hour)
                .unwrap(),
        ),
        (
            "the destination role",
            ca.issue(Role::Destination, &rogue_public).unwrap(),
        ),
        (
            "another transfer id from this CA",
            ca.issue_with(
                Uuid::new_v4(),
                Role::Source,
                &rogue_public,
                now - hour,
                now + hour,
            )
            .unwrap(),
        ),
        ("honest", ca.issue(Role::Source, &rogue_public).unwrap()),
    ];
    for (what, cert) in rogues {
        // The rogue S admits any client (its own CA) and serves 8 MiB of ones.
        let mem = block_io::MemStorage::new();
        block_io::Storage::set_len(&mem, 8 * MIB).unwrap();
        block_io::Storage::write_at(&mem, &vec![1u8; 8 * MIB as usize], 0).unwrap();
        let dev = Arc::new(block_io::RawDisk::new(mem).unwrap());
        let config = block_io::nbd::tls::server_config(
            vec![cert.clone().into()],
            rogue_key.private_der(),
            None,
        )
        .unwrap();
        let server = NbdServer::bind_tcp("127.0.0.1:0", vec![Export::new("x", dev)])
            .unwrap()
            .require_tls(config);
        let port = server.local_addr().unwrap().port();
        let stop = server.stop_handle();
        rt.spawn(async move { server.serve_async().await });
        let source = offload_token::transfer::SourceEndpoint {
            host: "127.0.0.1".into(),
            port,
            export: "x".into(),
        };
        let at = if what == "honest" { 2 * MIB } else { MIB };
        let r = rt.block_on(dc.redeem(tid, "dst.vhd", at, MIB, &m.token, 0, Some(source)));
        stop.stop();
        if what == "honest" {
            assert_eq!(r.unwrap(), MIB);
        } else {
            assert!(
                matches!(r, Err(TransferError::Remote { .. })),
                "D pulled from a source with a certificate of {what}: {r:?}"
            );
        }
    }
    // And from the real S it pulls.
    let n = rt
        .block_on(dc.redeem(tid, "dst.vhd", 0, MIB, &m.token, 0, Some(ep)))
        .unwrap();
    assert_eq!(n, MIB);
    rt.block_on(dc.close(tid, Role::Destination)).unwrap();
    let got = read_all(&droot.join("dst.vhd"), 0, 3 * MIB);
    assert!(got[..MIB as usize] == read_all(&sroot.join("src.vhdx"), 0, MIB)[..]);
    assert!(
        got[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 0),
        "a rogue source's bytes landed"
    );
    assert!(got[2 * MIB as usize..].iter().all(|&b| b == 1));
    drop(sc);
}

#[test]
fn a_source_killed_mid_copy_fails_the_copy_cleanly_and_d_stays_valid() {
    let (_dir, sroot, droot) = roots();
    let size = 32 * MIB;
    make_vhdx(&sroot.join("src.vhdx"), size, &[(0, size)]);
    make_vhd(&droot.join("dst.vhd"), size);
    // S serves 8 MiB/s: the copy takes about 4 s, and S dies after 1.
    let mut s = Daemon::start(&sroot, |c| c.export_rate = Some(8 * MIB));
    let d = Daemon::start(&droot, |_| {});
    let req = CopyRequest::new(s.endpoint("src.vhdx", 0), d.endpoint("dst.vhd", 0), None);
    let copy = std::thread::spawn(move || copy_blocking(&req));
    std::thread::sleep(Duration::from_millis(1000));
    s.kill();
    let started = std::time::Instant::now();
    let r = copy.join().unwrap();
    assert!(r.is_err(), "the copy succeeded without its source: {r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the error took {:?}",
        started.elapsed()
    );
    // D ended the transfer when the initiator left; its image opens and checks clean.
    std::thread::sleep(Duration::from_millis(300));
    assert!(vhd_is_clean(&droot.join("dst.vhd")));
    let got = read_all(&droot.join("dst.vhd"), 0, MIB);
    assert!(got.iter().all(|&b| b == 0) || got == read_all(&sroot.join("src.vhdx"), 0, MIB));
}

#[test]
fn the_control_channel_wants_the_key_and_paths_stay_under_the_root() {
    let (dir, sroot, _droot) = roots();
    make_vhd(&sroot.join("a.vhd"), MIB);
    std::fs::write(dir.path().join("outside.raw"), vec![0u8; 4096]).unwrap();
    std::os::unix::fs::symlink(dir.path().join("outside.raw"), sroot.join("link.raw")).unwrap();
    let s = Daemon::start(&sroot, |_| {});
    let rt = rt();
    let counter = Arc::new(ByteCounter::default());

    let wrong = ControlKey::generate();
    let r = rt.block_on(async {
        let mut c = ControlClient::connect(&s.addr, &wrong, counter.clone()).await?;
        c.info("a.vhd").await
    });
    assert!(r.is_err(), "a wrong control key was accepted: {r:?}");

    let mut c = rt
        .block_on(ControlClient::connect(&s.addr, &s.key, counter.clone()))
        .unwrap();
    assert_eq!(rt.block_on(c.info("a.vhd")).unwrap().0, MIB);
    let root = sroot.canonicalize().unwrap();
    for bad in [
        "../outside.raw",
        "/etc/passwd",
        "link.raw",
        "",
        "./../s/a.vhd",
    ] {
        assert!(resolve_under(&root, bad).is_err(), "{bad} resolved");
        match rt.block_on(c.info(bad)) {
            Err(TransferError::Remote { code, .. }) => assert_eq!(code, "outside-root", "{bad}"),
            r => panic!("{bad}: {r:?}"),
        }
    }
    // A missing image inside the root: the refusal names it.
    match rt.block_on(c.info("missing.vhd")) {
        Err(TransferError::Remote { message, .. }) => {
            assert!(message.contains("missing.vhd"), "{message}")
        }
        r => panic!("missing.vhd: {r:?}"),
    }
    // The session survives refusals, and a transfer cannot be minted from before trust.
    let r = rt.block_on(c.mint(Uuid::new_v4(), "a.vhd", 0, 4096, None));
    assert!(matches!(r, Err(TransferError::Remote { ref code, .. }) if code == "no-transfer"));
}

#[test]
fn cancel_from_another_connection_stops_a_running_redeem() {
    let (_dir, sroot, droot) = roots();
    make_vhdx(&sroot.join("src.vhdx"), 16 * MIB, &[(0, 16 * MIB)]);
    make_vhd(&droot.join("dst.vhd"), 16 * MIB);
    // S serves 2 MiB/s: one 16 MiB redeem would take 8 s.
    let s = Daemon::start(&sroot, |c| c.export_rate = Some(2 * MIB));
    let d = Daemon::start(&droot, |c| {
        c.max_redeem_len = 16 * MIB;
        c.redeem_time = Duration::from_secs(20);
        c.pull_chunk = 256 * 1024;
    });
    let rt = rt();
    let counter = Arc::new(ByteCounter::default());
    let ca = TransferCa::new(Uuid::new_v4(), Duration::from_secs(600)).unwrap();
    let tid = ca.transfer();
    let (mut sc, mut dc, mut other) = rt
        .block_on(async {
            let sc = ControlClient::connect(&s.addr, &s.key, counter.clone()).await?;
            let dc = ControlClient::connect(&d.addr, &d.key, counter.clone()).await?;
            let other = ControlClient::connect(&d.addr, &d.key, counter.clone()).await?;
            Ok::<_, TransferError>((sc, dc, other))
        })
        .unwrap();
    rt.block_on(sc.join(&ca, Role::Source)).unwrap();
    rt.block_on(dc.join(&ca, Role::Destination)).unwrap();
    let m = rt
        .block_on(sc.mint(tid, "src.vhdx", 0, 16 * MIB, None))
        .unwrap();
    let started = std::time::Instant::now();
    let redeem = rt.spawn(async move {
        let r = dc
            .redeem(tid, "dst.vhd", 0, 16 * MIB, &m.token, 0, m.source.clone())
            .await;
        (r, dc)
    });
    std::thread::sleep(Duration::from_millis(700));
    let status = |c: &mut ControlClient| match rt.block_on(c.call(&Request::Status {
        transfer: tid,
        role: Role::Destination,
    })) {
        Ok(Reply::Status(st)) => st,
        r => panic!("{r:?}"),
    };
    let st = status(&mut other);
    assert!(st.certified && !st.cancelled, "{st:?}");
    match rt.block_on(other.call(&Request::Cancel {
        transfer: tid,
        role: Role::Destination,
    })) {
        Ok(Reply::Cancelled { .. }) => {}
        r => panic!("{r:?}"),
    }
    let (r, mut dc) = rt.block_on(redeem).unwrap();
    match r {
        Err(TransferError::Remote { code, .. }) => assert_eq!(code, "cancelled"),
        r => panic!("the redeem went on after cancel: {r:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(7));
    assert!(status(&mut other).cancelled);
    // A cancelled transfer takes no more redeems.
    let r = rt.block_on(dc.redeem(
        tid,
        "dst.vhd",
        0,
        MIB,
        &offload_token::Token::zero(),
        0,
        None,
    ));
    assert!(matches!(r, Err(TransferError::Remote { ref code, .. }) if code == "cancelled"));
}

#[test]
fn a_slow_source_gets_short_redeems_that_loop_to_completion() {
    let (_dir, sroot, droot) = roots();
    make_vhdx(&sroot.join("src.vhdx"), 8 * MIB, &[(0, 8 * MIB)]);
    make_vhd(&droot.join("dst.vhd"), 8 * MIB);
    // 8 MiB at 4 MiB/s with redeems cut after 200 ms (2 pulls of 256 KiB in flight):
    // about 1 MiB per redeem.
    let s = Daemon::start(&sroot, |c| c.export_rate = Some(4 * MIB));
    let d = Daemon::start(&droot, |c| {
        c.redeem_time = Duration::from_millis(200);
        c.pull_chunk = 256 * 1024;
        c.pull_workers = 2;
    });
    let req = CopyRequest::new(s.endpoint("src.vhdx", 0), d.endpoint("dst.vhd", 0), None);
    let r = copy_blocking(&req).unwrap();
    assert_eq!(r.bytes_copied, 8 * MIB);
    assert_eq!(r.tokens, 1, "{r:?}");
    assert!(r.redeems >= 3, "{r:?}");
    drop(s);
    drop(d);
    assert!(
        read_all(&sroot.join("src.vhdx"), 0, 8 * MIB)
            == read_all(&droot.join("dst.vhd"), 0, 8 * MIB)
    );
}
