//! The NBD client (`NbdClient`) against real servers on loopback: qemu-nbd (TCP and Unix,
//! raw and qcow2), nbdkit (file plugin; the delay and error filters for slow and failing
//! links; no structured replies) and our own `NbdServer`. Random reads, writes, zeroes,
//! trims and flushes from several threads are checked against a model; block status must
//! skip holes; server errors map to error kinds; servers killed mid-read and restarted are
//! reconnected to transparently with correct data, or (not restarted) give a clean error.
//! Protocol violations come from a scripted fake server in `nbd_client_fake.rs`.
#![cfg(feature = "nbd")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod nbd_client_util;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_io::nbd::{ClientError, NbdClient, NbdClientOptions, RetryPolicy, UrlError};
use block_io::{BlockDevice, BlockStatus, ErrorKind, FileStorage, RawDisk, Storage};
use nbd_client_util::{
    free_port, mem_disk, model_workload, oracle, pattern, quick_opts, sparse_file, Listen, Ours,
    Proc,
};

const MIB: u64 = 1 << 20;

fn client_error(e: &block_io::Error) -> &ClientError {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<ClientError>())
        .unwrap_or_else(|| panic!("no ClientError under {e:?}"))
}

/// The whole disk as merged (status, offset, len) runs.
fn map(dev: &dyn BlockDevice) -> Vec<(BlockStatus, u64, u64)> {
    let size = dev.info().virtual_size;
    let mut out: Vec<(BlockStatus, u64, u64)> = Vec::new();
    let mut off = 0;
    while off < size {
        let r = dev.block_status(off, size - off).unwrap();
        assert!(r.len > 0 && r.len <= size - off, "bad run {r:?} at {off}");
        match out.last_mut() {
            Some(l) if l.0 == r.status => l.2 += r.len,
            _ => out.push((r.status, off, r.len)),
        }
        off += r.len;
    }
    out
}

/// A file of `size` bytes holding `pattern(.., tag)` everywhere.
fn pattern_file(path: &std::path::Path, size: u64, tag: u8) {
    std::fs::write(path, pattern(0, size as usize, tag)).unwrap();
}

fn read(dev: &dyn BlockDevice, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    dev.read_at(&mut b, off).unwrap();
    b
}

#[test]
fn malformed_urls_and_bad_targets_are_typed_errors() {
    let o = NbdClientOptions::default;
    assert!(matches!(
        NbdClient::open("http://h/x", o()),
        Err(ClientError::Url(UrlError::UnknownScheme(_)))
    ));
    assert!(matches!(
        NbdClient::open("nbd://h:70000/x", o()),
        Err(ClientError::Url(UrlError::BadPort(_)))
    ));
    assert!(matches!(
        NbdClient::open("nbd+unix:///x", o()),
        Err(ClientError::Url(UrlError::MissingSocket))
    ));
    assert!(matches!(
        NbdClient::open("nbd://127.0.0.1/x?socket=/s", o()),
        Err(ClientError::Url(UrlError::UnsupportedQuery(_)))
    ));
    // nbds needs TLS options.
    assert!(matches!(
        NbdClient::open("nbds://127.0.0.1/x", o()),
        Err(ClientError::TlsConfig(_))
    ));
    // Nobody listening.
    let port = free_port();
    let e = NbdClient::open(&format!("nbd://127.0.0.1:{port}/x"), o()).unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
    let e = block_io::Error::from(e);
    assert_eq!(e.kind(), ErrorKind::Io);
    // A Unix socket that does not exist.
    let e = NbdClient::open("nbd+unix:///x?socket=/nonexistent/sock", o()).unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e:?}");
}

#[test]
fn own_server_random_ops_from_four_threads_match_a_model() {
    let srv = Ours::start(mem_disk(64 * MIB));
    let c = NbdClient::open(&srv.url(), quick_opts()).unwrap();
    let info = c.export_info();
    assert!(info.structured_replies && info.base_allocation, "{info:?}");
    assert_eq!(c.info().virtual_size, 64 * MIB);
    assert_eq!(c.info().format, "nbd");
    model_workload(&c, 4, 300, 1 << 20, 1);
    assert_eq!(c.reconnects(), 0);
}

#[test]
fn requests_above_the_maximum_payload_are_split_and_in_order() {
    let srv = Ours::start(mem_disk(96 * MIB));
    let c = NbdClient::open(&srv.url(), quick_opts()).unwrap();
    assert_eq!(c.max_payload(), 32 * MIB);
    let len = 80 * MIB as usize + 4096;
    let data = pattern(4096, len, 7);
    c.write_at(&data, 4096).unwrap();
    assert!(read(&c, 4096, len) == data, "80 MiB read differs");
    // Unaligned and out-of-range requests are refused locally.
    let mut b = vec![0u8; 100];
    assert_eq!(
        c.read_at(&mut b, 0).unwrap_err().kind(),
        ErrorKind::Unaligned
    );
    let mut b = vec![0u8; 1024];
    assert_eq!(
        c.read_at(&mut b, 96 * MIB - 512).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
}

#[test]
fn qemu_nbd_tcp_random_ops_match_a_model() {
    if !oracle("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.raw");
    pattern_file(&f, 48 * MIB, 3);
    let p = Proc::qemu_nbd(&f, "raw", Listen::Tcp(free_port()), &["--discard=unmap"]);
    let c = NbdClient::open(&p.url(), quick_opts()).unwrap();
    let info = c.export_info();
    assert!(info.structured_replies && info.base_allocation, "{info:?}");
    model_workload(&c, 4, 250, 2 << 20, 2);
    c.flush().unwrap();
    drop(c);
    drop(p);
    // What the client wrote is in the file: re-read it through a fresh server and client.
    let p = Proc::qemu_nbd(&f, "raw", Listen::Tcp(free_port()), &[]);
    let c = NbdClient::open(&p.url(), quick_opts()).unwrap();
    let via_nbd = read(&c, 0, 48 * MIB as usize);
    assert!(via_nbd == std::fs::read(&f).unwrap());
}

#[test]
fn nbdkit_unix_socket_random_ops_match_a_model() {
    if !oracle("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.raw");
    pattern_file(&f, 32 * MIB, 4);
    let p = Proc::nbdkit(&f, Listen::Unix(dir.path().join("s.sock")), &[], &[]);
    let c = NbdClient::open(&p.url(), quick_opts()).unwrap();
    model_workload(&c, 4, 250, 1 << 20, 3);
    c.flush().unwrap();
}

#[test]
fn nbdkit_without_structured_replies_uses_simple_replies_and_reports_all_data() {
    if !oracle("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.raw");
    sparse_file(&f, 16 * MIB);
    let mut p = Proc::nbdkit(&f, Listen::Tcp(free_port()), &[], &[]);
    p.restart_with(|a| a.insert(0, "--no-sr".into()));
    let c = NbdClient::open(&p.url(), quick_opts()).unwrap();
    let info = c.export_info();
    assert!(
        !info.structured_replies && !info.base_allocation,
        "{info:?}"
    );
    let r = c.block_status(0, 16 * MIB).unwrap();
    assert_eq!((r.status, r.len), (BlockStatus::Data, 16 * MIB));
    model_workload(&c, 3, 200, 1 << 20, 4);
}

#[test]
fn block_status_skips_holes_on_qemu_nbd_raw_and_qcow2_nbdkit_and_our_server() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let expect = vec![
        (BlockStatus::Zero, 0, MIB),
        (BlockStatus::Data, MIB, 128 * 1024),
        (BlockStatus::Zero, MIB + 128 * 1024, 7 * MIB - 128 * 1024),
        (BlockStatus::Data, 8 * MIB, 64 * 1024),
        (BlockStatus::Zero, 8 * MIB + 64 * 1024, 8 * MIB - 64 * 1024),
    ];
    let check = |c: &NbdClient, who: &str| {
        assert_eq!(map(c), expect, "{who}");
        assert!(read(c, MIB, 128 * 1024) == vec![0xab; 128 * 1024], "{who}");
        assert!(
            read(c, 8 * MIB, 64 * 1024) == vec![0xcd; 64 * 1024],
            "{who}"
        );
        assert!(read(c, 0, MIB as usize).iter().all(|&b| b == 0), "{who}");
        // A read across data and holes (qemu-nbd answers it in data and hole chunks).
        let mixed = read(c, MIB - 4096, 200 * 1024);
        assert!(mixed[..4096].iter().all(|&b| b == 0), "{who}");
        assert!(
            mixed[4096..4096 + 128 * 1024].iter().all(|&b| b == 0xab),
            "{who}"
        );
        assert!(mixed[4096 + 128 * 1024..].iter().all(|&b| b == 0), "{who}");
    };
    // Our own server on a sparse file.
    let raw = dir.path().join("ours.raw");
    {
        let s = FileStorage::create(&raw).unwrap();
        s.set_len(size).unwrap();
        let d = RawDisk::new(s).unwrap();
        d.write_at(&vec![0xab; 128 * 1024], MIB).unwrap();
        d.write_at(&vec![0xcd; 64 * 1024], 8 * MIB).unwrap();
        d.flush().unwrap();
        let srv = Ours::start(Arc::new(d));
        let c = NbdClient::open(&srv.url(), quick_opts()).unwrap();
        check(&c, "our server");
    }
    if oracle("qemu-nbd") {
        let p = Proc::qemu_nbd(&raw, "raw", Listen::Tcp(free_port()), &["-r"]);
        let c = NbdClient::open(&p.url(), quick_opts()).unwrap();
        assert!(c.info().read_only);
        check(&c, "qemu-nbd raw");
        // Writes to a read-only export are refused locally with the right kind.
        assert_eq!(
            c.write_at(&[0; 512], 0).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
        drop(c);
        drop(p);
        let q = dir.path().join("d.qcow2");
        let ok = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&q)
            .arg("16M")
            .status()
            .unwrap();
        assert!(ok.success());
        let p = Proc::qemu_nbd(&q, "qcow2", Listen::Unix(dir.path().join("q.sock")), &[]);
        let c = NbdClient::open(&p.url(), quick_opts()).unwrap();
        c.write_at(&vec![0xab; 128 * 1024], MIB).unwrap();
        c.write_at(&vec![0xcd; 64 * 1024], 8 * MIB).unwrap();
        check(&c, "qemu-nbd qcow2");
        // Unmapping zeroes make a hole again; zeroes without unmap read as zeros too.
        c.write_zeroes(8 * MIB, 64 * 1024, true).unwrap();
        let r = c.block_status(8 * MIB, 64 * 1024).unwrap();
        assert_eq!(r.status, BlockStatus::Zero);
        assert!(read(&c, 8 * MIB, 64 * 1024).iter().all(|&b| b == 0));
    }
    if oracle("nbdkit") {
        let p = Proc::nbdkit(&raw, Listen::Tcp(free_port()), &[], &["-r"]);
        let c = NbdClient::open(&p.url(), quick_opts()).unwrap();
        check(&c, "nbdkit file");
    }
}

#[test]
fn nbdkit_error_filter_errors_map_to_kinds_and_keep_the_connection() {
    if !oracle("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.raw");
    pattern_file(&f, 8 * MIB, 5);
    let trigger = dir.path().join("fail-now");
    let tr = format!("error-pread-file={}", trigger.display());
    let p = Proc::nbdkit(
        &f,
        Listen::Tcp(free_port()),
        &["error"],
        &[
            "error-pread=EIO",
            "error-pread-rate=100%",
            &tr,
            "error-pwrite=ENOSPC",
            "error-pwrite-rate=100%",
            "error-trim=EPERM",
            "error-trim-rate=100%",
        ],
    );
    let c = NbdClient::open(&p.url(), quick_opts()).unwrap();
    // Reads work until the trigger file exists.
    assert!(read(&c, 4096, 8192) == pattern(4096, 8192, 5));
    std::fs::write(&trigger, b"").unwrap();
    let mut b = vec![0u8; 8192];
    let e = c.read_at(&mut b, 4096).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(
        matches!(client_error(&e), ClientError::Server { errno: 5, .. }),
        "{e:?}"
    );
    assert!(e.chain_string().contains("EIO"), "{}", e.chain_string());
    std::fs::remove_file(&trigger).unwrap();
    assert!(read(&c, 4096, 8192) == pattern(4096, 8192, 5));
    let e = c.write_at(&[1; 4096], 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e:?}");
    let e = c.discard(0, 4096).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly, "{e:?}");
    // Error replies are answers, not broken connections.
    assert_eq!(c.reconnects(), 0);
    assert!(read(&c, 0, 4096) == pattern(0, 4096, 5));
}

#[test]
fn nbdkit_failing_half_the_reads_gives_errors_or_correct_data_never_wrong_data() {
    if !oracle("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.raw");
    pattern_file(&f, 8 * MIB, 6);
    let p = Proc::nbdkit(
        &f,
        Listen::Tcp(free_port()),
        &["error"],
        &["error-pread=EIO", "error-pread-rate=50%"],
    );
    let c = NbdClient::open(&p.url(), quick_opts()).unwrap();
    let (ok, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (c, ok, failed) = (&c, &ok, &failed);
            s.spawn(move || {
                for i in 0..100u64 {
                    let off = ((t * 100 + i) * 12_288) % (8 * MIB - 65_536);
                    let mut b = vec![0u8; 65_536];
                    match c.read_at(&mut b, off) {
                        Ok(()) => {
                            assert!(b == pattern(off, 65_536, 6), "wrong data at {off}");
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            assert_eq!(e.kind(), ErrorKind::Io);
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    let (ok, failed) = (ok.into_inner(), failed.into_inner());
    assert!(ok > 50 && failed > 50, "ok {ok} failed {failed}");
    assert_eq!(c.reconnects(), 0);
}

#[test]
fn slow_link_keeps_many_requests_in_flight_and_a_silent_server_times_out() {
    if !oracle("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.raw");
    pattern_file(&f, 8 * MIB, 8);
    let p = Proc::nbdkit(&f, Listen::Tcp(free_port()), &["delay"], &["rdelay=300ms"]);
    let c = NbdClient::open(&p.url(), quick_opts()).unwrap();
    // 16 reads of 300 ms each from 16 threads: in flight together they take about 300 ms;
    // one at a time they would take 4.8 s.
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for t in 0..16u64 {
            let c = &c;
            s.spawn(move || {
                let off = t * 65_536;
                assert!(read(c, off, 65_536) == pattern(off, 65_536, 8));
            });
        }
    });
    let took = t0.elapsed();
    eprintln!("16 concurrent 300 ms reads took {took:?}");
    assert!(took < Duration::from_millis(2400), "{took:?}");

    // A request timeout shorter than the delay: each connection is declared dead, the read
    // is re-issued, and after two tries it fails cleanly.
    let mut o = quick_opts();
    o.request_timeout = Some(Duration::from_millis(100));
    o.retry.max_tries_per_request = 2;
    let c = NbdClient::open(&p.url(), o).unwrap();
    let mut b = vec![0u8; 4096];
    let e = c.read_at(&mut b, 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    match client_error(&e) {
        ClientError::TooManyTries { tries: 2, last } => {
            assert!(matches!(**last, ClientError::Timeout(_)), "{last:?}")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        b.iter().all(|&x| x == 0),
        "a failed read must not fill the buffer"
    );
}

/// Reader threads check every read against the file's pattern while the server is killed
/// with SIGKILL and restarted `rounds` times.
fn kill_and_restart_under_reads(
    p: &mut Proc,
    opts: NbdClientOptions,
    read_len: usize,
    rounds: usize,
    tag: u8,
) {
    let c = NbdClient::open(&p.url(), opts).unwrap();
    let size = c.info().virtual_size;
    let expect = pattern(0, size as usize, tag);
    let stop = AtomicBool::new(false);
    let reads = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (c, stop, reads, expect) = (&c, &stop, &reads, &expect);
            s.spawn(move || {
                let mut i = 0u64;
                let mut got = vec![0u8; read_len];
                while !stop.load(Ordering::Relaxed) {
                    let off = ((t * 7 + i * 13) * 65_536) % (size - read_len as u64);
                    got.fill(0xee);
                    c.read_at(&mut got, off).unwrap();
                    let o = off as usize;
                    assert!(got == expect[o..o + read_len], "wrong data at {off}");
                    reads.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            });
        }
        for _ in 0..rounds {
            std::thread::sleep(Duration::from_millis(300));
            p.kill();
            std::thread::sleep(Duration::from_millis(150));
            p.restart();
        }
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
    });
    eprintln!(
        "{} reads, {} reconnects, {} requests re-issued",
        reads.load(Ordering::Relaxed),
        c.reconnects(),
        c.reissued_requests()
    );
    // Every kill drops the connection; a kill between two requests is noticed (and
    // reconnected) only by the next one, so two kills may share one reconnect.
    assert!(c.reconnects() >= 1, "{} reconnects", c.reconnects());
    assert!(
        c.reissued_requests() >= 1,
        "no request was in flight at any kill"
    );
}

#[test]
fn nbdkit_killed_mid_read_and_restarted_is_reconnected_with_correct_data() {
    if !oracle("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.raw");
    pattern_file(&f, 16 * MIB, 9);
    // A slow link makes sure reads are in flight when the server dies.
    let mut p = Proc::nbdkit(&f, Listen::Tcp(free_port()), &["delay"], &["rdelay=100ms"]);
    kill_and_restart_under_reads(&mut p, quick_opts(), 256 * 1024, 3, 9);
}

#[test]
fn qemu_nbd_unix_killed_mid_transfer_and_restarted_is_reconnected_with_correct_data() {
    if !oracle("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.raw");
    pattern_file(&f, 64 * MIB, 10);
    // Large reads: the kill often lands while a reply's data is streaming.
    let mut p = Proc::qemu_nbd(&f, "raw", Listen::Unix(dir.path().join("s.sock")), &[]);
    kill_and_restart_under_reads(&mut p, quick_opts(), 8 << 20, 3, 10);
}

#[test]
fn server_killed_and_not_restarted_gives_a_clean_error_then_recovers_when_it_returns() {
    if !oracle("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.raw");
    pattern_file(&f, 4 * MIB, 11);
    let mut p = Proc::nbdkit(&f, Listen::Tcp(free_port()), &["delay"], &["rdelay=500ms"]);
    let mut o = quick_opts();
    o.retry = RetryPolicy {
        max_attempts: 5,
        max_elapsed: Duration::from_secs(1),
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        max_tries_per_request: 5,
    };
    let c = NbdClient::open(&p.url(), o).unwrap();
    let mut b = vec![0u8; 65_536];
    let t0 = Instant::now();
    let e = std::thread::scope(|s| {
        let h = s.spawn(|| c.read_at(&mut b, 65_536));
        std::thread::sleep(Duration::from_millis(150));
        p.kill();
        h.join().unwrap().unwrap_err()
    });
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(e.kind(), ErrorKind::Io);
    match client_error(&e) {
        ClientError::GaveUp { attempts, last, .. } => {
            assert!(*attempts >= 1);
            assert!(matches!(**last, ClientError::Connect { .. }), "{last:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        b.iter().all(|&x| x == 0),
        "a failed read must not fill the buffer"
    );
    assert!(
        e.chain_string().contains("reconnect"),
        "{}",
        e.chain_string()
    );
    // The server returns: the next request starts a new round and succeeds.
    p.restart();
    assert!(read(&c, 65_536, 65_536) == pattern(65_536, 65_536, 11));
}

#[test]
fn our_server_stopped_and_restarted_on_the_same_port_is_reconnected() {
    let disk = mem_disk(8 * MIB);
    disk.write_at(&pattern(0, 8 * MIB as usize, 12), 0).unwrap();
    let srv = Ours::start(disk.clone());
    let addr = srv.addr;
    let c = NbdClient::open(&srv.url(), quick_opts()).unwrap();
    assert!(read(&c, 0, 4096) == pattern(0, 4096, 12));
    drop(srv);
    // Meanwhile a write waits for the server to come back.
    std::thread::scope(|s| {
        let h = s.spawn(|| c.write_at(&pattern(MIB, 65_536, 13), MIB));
        std::thread::sleep(Duration::from_millis(200));
        let server = block_io::nbd::NbdServer::bind_tcp(
            addr,
            vec![block_io::nbd::Export::new(
                "disk",
                disk.clone() as Arc<dyn BlockDevice>,
            )],
        )
        .unwrap();
        let stop = server.stop_handle();
        let t = std::thread::spawn(move || server.serve());
        h.join().unwrap().unwrap();
        assert!(read(&c, MIB, 65_536) == pattern(MIB, 65_536, 13));
        assert!(c.reconnects() >= 1);
        stop.stop();
        t.join().unwrap().unwrap();
    });
    assert!(read(&*disk, MIB, 65_536) == pattern(MIB, 65_536, 13));
}

#[test]
fn multi_conn_spreads_requests_over_connections_that_share_writes_and_flushes() {
    let disk = mem_disk(32 * MIB);
    let srv = Ours::start(disk.clone());
    let o = NbdClientOptions {
        connections: 4,
        ..quick_opts()
    };
    let c = NbdClient::open(&srv.url(), o).unwrap();
    assert_ne!(
        c.export_info().flags & block_io::nbd::proto::TF_CAN_MULTI_CONN,
        0
    );
    assert_eq!(c.connections(), 4);
    // Requests of one caller land on different connections; each thread's reads must see
    // its own writes whichever connection carried them.
    model_workload(&c, 4, 200, 1 << 20, 31);
    c.flush().unwrap();
    let data = pattern(0, 8 * MIB as usize, 33);
    c.write_at(&data, 0).unwrap();
    assert!(read(&*disk, 0, data.len()) == data);
}

#[test]
fn nbdkit_multi_conn_killed_and_restarted_reconnects_every_connection() {
    if !oracle("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.raw");
    pattern_file(&f, 16 * MIB, 14);
    let mut p = Proc::nbdkit(&f, Listen::Tcp(free_port()), &["delay"], &["rdelay=50ms"]);
    let o = NbdClientOptions {
        connections: 3,
        ..quick_opts()
    };
    let c = NbdClient::open(&p.url(), o.clone()).unwrap();
    let multi = c.export_info().flags & block_io::nbd::proto::TF_CAN_MULTI_CONN != 0;
    assert_eq!(c.connections(), if multi { 3 } else { 1 });
    drop(c);
    kill_and_restart_under_reads(&mut p, o, 128 * 1024, 2, 14);
}

#[test]
fn our_server_re_exports_a_client_of_qemu_nbd() {
    if !oracle("qemu-nbd") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.raw");
    pattern_file(&f, 32 * MIB, 15);
    let p = Proc::qemu_nbd(&f, "raw", Listen::Tcp(free_port()), &["--discard=unmap"]);
    // qemu-nbd <- NbdClient <- our NbdServer <- NbdClient: every layer sees the same disk.
    let inner = Arc::new(NbdClient::open(&p.url(), quick_opts()).unwrap());
    let srv = Ours::start(inner.clone());
    let outer = NbdClient::open(&srv.url(), quick_opts()).unwrap();
    assert_eq!(outer.info().virtual_size, 32 * MIB);
    model_workload(&outer, 4, 150, 1 << 20, 41);
    outer.flush().unwrap();
    let via_outer = read(&outer, 0, 32 * MIB as usize);
    assert!(via_outer == read(&*inner, 0, 32 * MIB as usize));
    drop(outer);
    drop(srv);
    drop(inner);
    drop(p);
    assert!(via_outer == std::fs::read(&f).unwrap());
}

#[test]
fn raw_and_vectored_requests_scatter_and_gather_across_pieces() {
    let srv = Ours::start(mem_disk(48 * MIB));
    let c = NbdClient::open(&srv.url(), quick_opts()).unwrap();
    // 20 MiB + 4 KiB in three unequal buffers: more than one raw batch and one payload.
    let lens = [
        3 * MIB as usize + 100,
        9 * MIB as usize - 100,
        8 * MIB as usize + 4096,
    ];
    let total: usize = lens.iter().sum();
    let data = pattern(4096, total, 16);
    let mut parts: Vec<Vec<u8>> = Vec::new();
    let mut at = 0;
    for l in lens {
        parts.push(data[at..at + l].to_vec());
        at += l;
    }
    let raws: Vec<block_io::RawBuf> = parts
        .iter_mut()
        .map(|p| block_io::RawBuf {
            ptr: p.as_mut_ptr(),
            len: p.len(),
        })
        .collect();
    // SAFETY: the parts live and are not otherwise used until the call returns.
    unsafe { c.write_raw_at(&raws, 4096) }.unwrap();
    assert!(read(&c, 4096, total) == data);
    for p in &mut parts {
        p.fill(0);
    }
    let raws: Vec<block_io::RawBuf> = parts
        .iter_mut()
        .map(|p| block_io::RawBuf {
            ptr: p.as_mut_ptr(),
            len: p.len(),
        })
        .collect();
    // SAFETY: as above.
    unsafe { c.read_raw_at(&raws, 4096) }.unwrap();
    assert!(parts.concat() == data);
    // Vectored reads take the default path over read_at.
    let (mut a, mut b) = (vec![0u8; 1000], vec![0u8; 3096]);
    let mut v = [
        std::io::IoSliceMut::new(&mut a),
        std::io::IoSliceMut::new(&mut b),
    ];
    c.read_vectored_at(&mut v, 4096).unwrap();
    assert!([a, b].concat() == data[..4096]);
}

#[test]
fn writes_in_flight_when_the_server_dies_are_reissued_and_the_model_holds() {
    if !oracle("nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("d.raw");
    pattern_file(&f, 16 * MIB, 17);
    let mut p = Proc::nbdkit(
        &f,
        Listen::Unix(dir.path().join("s.sock")),
        &["delay"],
        &["rdelay=20ms", "wdelay=20ms"],
    );
    let c = NbdClient::open(&p.url(), quick_opts()).unwrap();
    std::thread::scope(|s| {
        let w = s.spawn(|| model_workload(&c, 4, 120, 256 * 1024, 51));
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(400));
            p.kill();
            std::thread::sleep(Duration::from_millis(100));
            p.restart();
        }
        w.join().unwrap();
    });
    eprintln!(
        "{} reconnects, {} requests re-issued",
        c.reconnects(),
        c.reissued_requests()
    );
    assert!(c.reconnects() >= 1 && c.reissued_requests() >= 1);
    // What the model saw is what the file holds.
    c.flush().unwrap();
    let all = read(&c, 0, 16 * MIB as usize);
    drop(c);
    drop(p);
    assert!(all == std::fs::read(&f).unwrap());
}
