//! Conformance: the same requests, through the same VM-less frontend, to our backend and to
//! qemu-storage-daemon serving identical raw images. Status bytes, used lengths, returned data,
//! configuration space and the final image bytes must agree (GET_ID's text aside).
#![cfg(feature = "vhost-user")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod vhost_user_util;

use std::path::Path;
use std::sync::Arc;

use block_io::testing::oracle;
use block_io::vhost_user::client::{segment, Client, Request, Response};
use block_io::vhost_user::config::VIRTIO_BLK_F_RO;
use block_io::vhost_user::request::*;
use block_io::{BlockDevice, FileStorage, OpenOptions, RawDisk, RawOptions};
use vhost_user_util::{connect, pattern, Qsd, Served};

const DISK: u64 = 4 << 20;
const SECTORS: u64 = DISK / 512;

fn make_image(path: &Path) {
    let mut bytes = pattern(1 << 20, 7);
    bytes.resize(DISK as usize, 0);
    std::fs::write(path, &bytes).unwrap();
}

fn open_raw(path: &Path, read_only: bool) -> Arc<dyn BlockDevice> {
    let s = FileStorage::open(path, &OpenOptions::new().read_only(read_only)).unwrap();
    Arc::new(RawDisk::open(s, &RawOptions::new().read_only(read_only)).unwrap())
}

fn rq(kind: u32, sector: u64, out: Vec<u8>, in_len: u32, seg: u32) -> Request {
    Request {
        kind,
        sector,
        out,
        in_len,
        seg,
    }
}

/// The request script: well-framed requests, valid and invalid.
fn script() -> Vec<(&'static str, Request)> {
    let seg = |s: u64, n: u32, f: u32| segment(s, n, f).to_vec();
    vec![
        ("read 4K at 0", rq(VIRTIO_BLK_T_IN, 0, vec![], 4096, 0)),
        (
            "write 8K at 8",
            rq(VIRTIO_BLK_T_OUT, 8, pattern(8192, 3), 0, 0),
        ),
        ("read back 8K", rq(VIRTIO_BLK_T_IN, 8, vec![], 8192, 0)),
        (
            "write 12K in 1000-byte segments",
            rq(VIRTIO_BLK_T_OUT, 100, pattern(12288, 4), 0, 1000),
        ),
        (
            "read 12K in 700-byte segments",
            rq(VIRTIO_BLK_T_IN, 100, vec![], 12288, 700),
        ),
        (
            "write with barrier bit",
            rq(VIRTIO_BLK_T_OUT | 0x8000_0000, 300, pattern(512, 5), 0, 0),
        ),
        (
            "read crossing the end",
            rq(VIRTIO_BLK_T_IN, SECTORS - 4, vec![], 4096, 0),
        ),
        (
            "read the last sector",
            rq(VIRTIO_BLK_T_IN, SECTORS - 1, vec![], 512, 0),
        ),
        (
            "empty read at the end",
            rq(VIRTIO_BLK_T_IN, SECTORS, vec![], 0, 0),
        ),
        (
            "empty read past the end",
            rq(VIRTIO_BLK_T_IN, SECTORS + 1, vec![], 0, 0),
        ),
        (
            "read of 1000 bytes",
            rq(VIRTIO_BLK_T_IN, 0, vec![], 1000, 0),
        ),
        (
            "read at sector u64::MAX",
            rq(VIRTIO_BLK_T_IN, u64::MAX, vec![], 512, 0),
        ),
        (
            "read at sector 2^55",
            rq(VIRTIO_BLK_T_IN, 1 << 55, vec![], 512, 0),
        ),
        (
            "write crossing the end",
            rq(VIRTIO_BLK_T_OUT, SECTORS - 1, pattern(1024, 6), 0, 0),
        ),
        (
            "write of 700 bytes",
            rq(VIRTIO_BLK_T_OUT, 0, pattern(700, 6), 0, 0),
        ),
        ("flush", rq(VIRTIO_BLK_T_FLUSH, 0, vec![], 0, 0)),
        (
            "flush with a sector",
            rq(VIRTIO_BLK_T_FLUSH, 77, vec![], 0, 0),
        ),
        ("unknown type 99", rq(99, 0, vec![], 0, 0)),
        ("GET_LIFETIME (10) unsupported", rq(10, 0, vec![], 16, 0)),
        (
            "SECURE_ERASE (14) unsupported",
            rq(14, 0, seg(0, 8, 0), 0, 0),
        ),
        (
            "discard 128K",
            rq(VIRTIO_BLK_T_DISCARD, 1024, seg(1024, 256, 0), 0, 0),
        ),
        (
            "discard with UNMAP",
            rq(VIRTIO_BLK_T_DISCARD, 0, seg(1024, 8, 1), 0, 0),
        ),
        (
            "discard with unknown flag",
            rq(VIRTIO_BLK_T_DISCARD, 0, seg(1024, 8, 2), 0, 0),
        ),
        (
            "discard too long",
            rq(VIRTIO_BLK_T_DISCARD, 0, seg(0, 32769, 0), 0, 0),
        ),
        (
            "discard past the end",
            rq(VIRTIO_BLK_T_DISCARD, 0, seg(SECTORS - 4, 8, 0), 0, 0),
        ),
        (
            "discard of 0 sectors",
            rq(VIRTIO_BLK_T_DISCARD, 0, seg(16, 0, 0), 0, 0),
        ),
        (
            "discard with two segments",
            rq(
                VIRTIO_BLK_T_DISCARD,
                0,
                [seg(0, 8, 0), seg(64, 8, 0)].concat(),
                0,
                0,
            ),
        ),
        (
            "discard with a short segment",
            rq(VIRTIO_BLK_T_DISCARD, 0, seg(0, 8, 0)[..8].to_vec(), 0, 0),
        ),
        (
            "write zeroes 64K",
            rq(VIRTIO_BLK_T_WRITE_ZEROES, 0, seg(1500, 128, 0), 0, 0),
        ),
        (
            "write zeroes 64K with UNMAP",
            rq(VIRTIO_BLK_T_WRITE_ZEROES, 0, seg(1700, 128, 1), 0, 0),
        ),
        (
            "write zeroes with unknown flag",
            rq(VIRTIO_BLK_T_WRITE_ZEROES, 0, seg(1700, 8, 4), 0, 0),
        ),
        (
            "write zeroes past the end",
            rq(VIRTIO_BLK_T_WRITE_ZEROES, 0, seg(SECTORS, 1, 0), 0, 0),
        ),
        (
            "write zeroes too long",
            rq(VIRTIO_BLK_T_WRITE_ZEROES, 0, seg(0, 32769, 0), 0, 0),
        ),
        (
            "read the zeroed ranges",
            rq(VIRTIO_BLK_T_IN, 1024, vec![], 1024 * 512, 0),
        ),
        (
            "read everything",
            rq(VIRTIO_BLK_T_IN, 0, vec![], DISK as u32, 0),
        ),
    ]
}

fn run_script(c: &mut Client) -> Vec<Response> {
    script()
        .iter()
        .map(|(_, r)| c.request(r).unwrap())
        .collect()
}

fn client(path: &Path) -> Client {
    Client::connect(
        path,
        &block_io::vhost_user::client::ClientOptions {
            num_queues: 1,
            data_per_queue: 8 << 20,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn same_answers_as_qemu_storage_daemon() {
    if !oracle("qemu-storage-daemon") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ours_img = dir.path().join("ours.raw");
    let qsd_img = dir.path().join("qsd.raw");
    make_image(&ours_img);
    make_image(&qsd_img);

    let served = Served::start(open_raw(&ours_img, false), 1);
    let mut ours = client(&served.path);
    let ours_answers = run_script(&mut ours);
    let ours_cfg = *ours.config();
    let ours_feat = ours.features();
    let (st, _) = ours.queue(0).unwrap().get_id().unwrap();
    assert_eq!(st, VIRTIO_BLK_S_OK);
    drop(ours);
    served.stop();

    let qsd = Qsd::start(&qsd_img, true, 1);
    let mut theirs = client(&qsd.path);
    let qsd_answers = run_script(&mut theirs);
    let qsd_cfg = *theirs.config();
    let (st, _) = theirs.queue(0).unwrap().get_id().unwrap();
    assert_eq!(st, VIRTIO_BLK_S_OK);
    assert_eq!(
        ours_feat & VIRTIO_BLK_F_RO,
        theirs.features() & VIRTIO_BLK_F_RO
    );
    drop(theirs);
    drop(qsd);

    let mut bad = Vec::new();
    for (((name, _), a), b) in script().iter().zip(&ours_answers).zip(&qsd_answers) {
        if a != b {
            bad.push(format!(
                "{name}: ours status {} used {} / qsd status {} used {}{}",
                a.status,
                a.used_len,
                b.status,
                b.used_len,
                if a.data != b.data {
                    " (data differ)"
                } else {
                    ""
                }
            ));
        }
    }
    assert!(bad.is_empty(), "answers differ:\n{}", bad.join("\n"));
    // The script is not trivially passing: it has successes, IOERRs and UNSUPPs.
    for s in [VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP] {
        assert!(ours_answers.iter().any(|r| r.status == s), "no status {s}");
    }
    // One deliberate difference: we say write-zeroes with UNMAP may free space (it punches a
    // hole, as the discard tests check); qemu-storage-daemon says it may not.
    assert_eq!(ours_cfg.write_zeroes_may_unmap, 1);
    assert_eq!(qsd_cfg.write_zeroes_may_unmap, 0);
    let ours_cfg = block_io::vhost_user::BlkConfig {
        write_zeroes_may_unmap: 0,
        ..ours_cfg
    };
    assert_eq!(ours_cfg, qsd_cfg, "config spaces differ");
    let a = std::fs::read(&ours_img).unwrap();
    let b = std::fs::read(&qsd_img).unwrap();
    assert!(a == b, "the images differ after the script");
}

#[test]
fn same_answers_read_only() {
    if !oracle("qemu-storage-daemon") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("ro.raw");
    make_image(&img);
    let script = [
        rq(VIRTIO_BLK_T_IN, 0, vec![], 8192, 0),
        rq(VIRTIO_BLK_T_OUT, 0, pattern(512, 1), 0, 0),
        rq(VIRTIO_BLK_T_DISCARD, 0, segment(0, 8, 0).to_vec(), 0, 0),
        rq(
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            segment(0, 8, 0).to_vec(),
            0,
            0,
        ),
        rq(VIRTIO_BLK_T_FLUSH, 0, vec![], 0, 0),
    ];
    let served = Served::start(open_raw(&img, true), 1);
    let mut ours = client(&served.path);
    let a: Vec<Response> = script.iter().map(|r| ours.request(r).unwrap()).collect();
    let fa = ours.features();
    drop(ours);
    served.stop();
    let qsd = Qsd::start(&img, false, 1);
    let mut theirs = client(&qsd.path);
    let b: Vec<Response> = script.iter().map(|r| theirs.request(r).unwrap()).collect();
    let fb = theirs.features();
    assert_eq!(a, b);
    assert_ne!(fa & VIRTIO_BLK_F_RO, 0);
    assert_eq!(fa & VIRTIO_BLK_F_RO, fb & VIRTIO_BLK_F_RO);
    assert_eq!(a[1].status, VIRTIO_BLK_S_IOERR);
    assert_eq!(a[0].status, VIRTIO_BLK_S_OK);
}

#[test]
fn same_answers_on_two_queues() {
    if !oracle("qemu-storage-daemon") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("mq.raw");
    make_image(&img);
    for qsd in [false, true] {
        let (_s, _q, path) = if qsd {
            let q = Qsd::start(&img, true, 2);
            let p = q.path.clone();
            (None, Some(q), p)
        } else {
            let s = Served::start(open_raw(&img, false), 2);
            let p = s.path.clone();
            (Some(s), None, p)
        };
        let mut c = connect(&path, 2, true);
        assert_eq!(c.config().num_queues, 2);
        let d = pattern(4096, if qsd { 11 } else { 12 });
        assert_eq!(c.queue(1).unwrap().write(64, &d).unwrap(), VIRTIO_BLK_S_OK);
        let (st, back) = c.queue(0).unwrap().read(64, 4096).unwrap();
        assert_eq!((st, back), (VIRTIO_BLK_S_OK, d));
    }
}
