//! send/receive: byte-exact round trips of raw, VHD, VHDX images and a 3-layer chain (our
//! read-back against a byte model, and `qemu-img compare` as an oracle), incremental
//! streams (`since`) with their lineage check, corrupted or truncated streams refused
//! with the destination left as it was, and interrupted incremental receives (a power cut
//! on the fault backend while the journal is applied) finished by `resume` or the next
//! `receive`, with damaged, orphaned or foreign journals refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod chains;

use std::path::{Path, PathBuf};
use std::process::Command;

use block_io::testing::oracle;
use std::sync::Arc;

use block_io::{BlockDevice, CutPoint, FaultStorage, FileStorage, MemStorage, RawDisk, Storage};
use chains::{read_all, Kind};
use meta_ops::send::{self, Level, ReceiveOptions, SendError, SendOptions};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SIZE: u64 = 8 << 20;

/// `qemu-img compare` says `a` and `b` read the same (when qemu-img is there).
fn qemu_same(a: &Path, b: &Path) {
    if !oracle("qemu-img") {
        return;
    }
    let out = Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn open_ro(p: &Path) -> chain::Disk {
    chain::Disk::open(p, &chain::OpenOptions::new().read_only(true)).unwrap()
}

/// A raw image with random data runs (some compressible, some not) and holes.
fn raw_image(path: &Path, seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let storage = FileStorage::create(path).unwrap();
    storage.set_len(SIZE).unwrap();
    let dev = RawDisk::new(storage).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    for _ in 0..24 {
        let len = rng.random_range(1..600u64) * 512;
        let off = rng.random_range(0..(SIZE - len) / 512) * 512;
        let data: Vec<u8> = if rng.random_bool(0.5) {
            (0..len).map(|_| rng.random()).collect()
        } else {
            (0..len)
                .map(|i| b"vdisk send "[(i % 11) as usize])
                .collect()
        };
        dev.write_at(&data, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    dev.flush().unwrap();
    model
}

fn send_to_vec(src: &Path, opts: &SendOptions) -> (Vec<u8>, send::SendReport) {
    let disk = open_ro(src);
    let mut out = Vec::new();
    let r = send::send(&disk, opts, &mut out).unwrap();
    assert_eq!(r.stream_bytes, out.len() as u64);
    (out, r)
}

fn receive_new(stream: &[u8], dest: &Path) -> Result<send::ReceiveReport, SendError> {
    send::receive(&mut &stream[..], dest, &ReceiveOptions::default())
}

/// Files in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `model` as a raw file in `dir`, for qemu-img to compare with (qemu-img cannot open VHDX
/// differencing images, so chains are compared through their model).
fn model_file(dir: &Path, model: &[u8]) -> PathBuf {
    let p = dir.join("model.raw");
    std::fs::write(&p, model).unwrap();
    p
}

/// Receives `stream` into new images of every format and checks each against `model` (our
/// read-back, and qemu-img's reading of the image against the model as a raw file).
fn check_round_trips(dir: &Path, stream: &[u8], model: &[u8]) {
    let model_raw = model_file(dir, model);
    for ext in ["raw", "vhd", "vhdx"] {
        let dest = dir.join(format!("out-{ext}.{ext}"));
        let r = receive_new(stream, &dest).unwrap();
        assert!(!r.incremental);
        assert_eq!(r.format.name(), ext);
        let got = read_all(&open_ro(&dest));
        assert!(got == model, "{ext} destination differs from the source");
        qemu_same(&model_raw, &dest);
    }
    std::fs::remove_file(model_raw).unwrap();
}

#[test]
fn raw_round_trips_into_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let model = raw_image(&src, 1);
    let (stream, rep) = send_to_vec(&src, &SendOptions::default());
    assert!(rep.data_bytes < SIZE, "holes are not sent");
    let v = send::verify(&mut &stream[..]).unwrap();
    assert_eq!(v.records, rep.records);
    assert_eq!(v.data_bytes, rep.data_bytes);
    let data_records: u64 = rep.levels.iter().map(|l| l.records).sum();
    assert!(data_records > 0 && data_records <= rep.records);
    check_round_trips(dir.path(), &stream, &model);
}

#[test]
fn vhd_and_vhdx_round_trip() {
    for kind in [Kind::Vhd, Kind::Vhdx] {
        let dir = tempfile::tempdir().unwrap();
        let (src, model) = chains::build(dir.path(), kind, 1, SIZE, 7);
        for level in [Level::Auto, Level::Fixed(0), Level::Fixed(3)] {
            let opts = SendOptions {
                level,
                threads: 3,
                chunk: 256 << 10,
                ..SendOptions::default()
            };
            let (stream, _) = send_to_vec(&src, &opts);
            let sub = dir
                .path()
                .join(format!("{level:?}").replace(['(', ')'], ""));
            std::fs::create_dir(&sub).unwrap();
            check_round_trips(&sub, &stream, &model);
        }
    }
}

#[test]
fn chain_is_sent_flattened() {
    for kind in [Kind::Vhdx, Kind::Vhd] {
        let dir = tempfile::tempdir().unwrap();
        let (top, model) = chains::build(dir.path(), kind, 3, SIZE, 11);
        let (stream, rep) = send_to_vec(&top, &SendOptions::default());
        assert!(rep.header.base.is_none());
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        check_round_trips(&out, &stream, &model);
    }
}

/// A copy of `src` (byte for byte, as `cp`).
fn copy(src: &Path, dest: &Path) {
    std::fs::copy(src, dest).unwrap();
}

#[test]
fn incremental_since_a_snapshot() {
    for kind in [Kind::Vhdx, Kind::Vhd] {
        let dir = tempfile::tempdir().unwrap();
        let (top, model) = chains::build(dir.path(), kind, 3, SIZE, 23);
        for snap_i in [0, 1] {
            let snap = chains::layer_path(dir.path(), kind, snap_i);
            let opts = SendOptions {
                since: Some(snap.clone()),
                ..SendOptions::default()
            };
            let (stream, rep) = send_to_vec(&top, &opts);
            assert!(rep.header.base.is_some());
            let full = send_to_vec(&top, &SendOptions::default()).1;
            assert!(
                rep.data_bytes < full.data_bytes,
                "only the changes are sent"
            );
            // The snapshot's copy beside the chain (a child's copy finds its parents).
            let dest = dir.path().join(format!("dest{snap_i}.{}", kind.ext()));
            copy(&snap, &dest);
            let r = send::receive(&mut &stream[..], &dest, &ReceiveOptions::default()).unwrap();
            assert!(r.incremental);
            let got = read_all(&open_ro(&dest));
            assert!(
                got == model,
                "{kind:?} since layer {snap_i}: destination differs"
            );
            // qemu-img is no oracle for a differencing copy (layer 1): it opens no VHDX
            // differencing image and reads a VHD one's allocated blocks whole, ignoring the
            // sector bitmaps (it disagrees with the chain's model before any send).
            if snap_i == 0 {
                let model_raw = model_file(dir.path(), &model);
                qemu_same(&model_raw, &dest);
            }
        }
    }
}

#[test]
fn incremental_on_raw_base_uses_a_fingerprint() {
    // A VHD child over a raw base (linked by path only: a raw image has no identity).
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let mut model = raw_image(&base, 5);
    let child = dir.path().join("child.vhd");
    let o = vhd_format::DifferencingOptions {
        size: SIZE,
        block_size: 1 << 20,
        parent_unique_id: uuid::Uuid::nil(),
        parent_timestamp: 0,
        parent_name: base.display().to_string(),
        absolute_path: Some(base.display().to_string()),
        relative_path: Some(".\\base.img".into()),
        unique_id: None,
        timestamp: None,
        creator: vhd_format::Creator::default(),
    };
    let f =
        vhd_format::VhdFile::create_differencing(FileStorage::create(&child).unwrap(), &o).unwrap();
    f.write_at(&[0xabu8; 8192], 1 << 20).unwrap();
    model[1 << 20..(1 << 20) + 8192].fill(0xab);
    f.flush().unwrap();
    drop(f);
    let disk = chain::Disk::open(
        &child,
        &chain::OpenOptions::new()
            .read_only(true)
            .ignore_lineage(true),
    )
    .unwrap();
    let mut stream = Vec::new();
    let opts = SendOptions {
        since: Some(base.clone()),
        ..SendOptions::default()
    };
    let rep = send::send(&disk, &opts, &mut stream).unwrap();
    drop(disk);
    assert_eq!(rep.data_bytes, 8192);
    // Another raw file of the same size is refused.
    let other = dir.path().join("other.img");
    raw_image(&other, 6);
    let before = std::fs::read(&other).unwrap();
    let e = send::receive(&mut &stream[..], &other, &ReceiveOptions::default()).unwrap_err();
    assert!(matches!(e, SendError::Lineage { .. }), "{e}");
    assert!(std::fs::read(&other).unwrap() == before);
    let dest = dir.path().join("dest.img");
    copy(&base, &dest);
    send::receive(&mut &stream[..], &dest, &ReceiveOptions::default()).unwrap();
    assert!(std::fs::read(&dest).unwrap() == model);
}

#[test]
fn wrong_snapshot_is_refused_and_dest_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (top, _) = chains::build(dir.path(), Kind::Vhdx, 3, SIZE, 31);
    let l0 = chains::layer_path(dir.path(), Kind::Vhdx, 0);
    let l1 = chains::layer_path(dir.path(), Kind::Vhdx, 1);
    let opts = SendOptions {
        since: Some(l0),
        ..SendOptions::default()
    };
    let (stream, _) = send_to_vec(&top, &opts);
    let dest = dir.path().join("dest.vhdx");
    copy(&l1, &dest);
    let before = std::fs::read(&dest).unwrap();
    let e = send::receive(&mut &stream[..], &dest, &ReceiveOptions::default()).unwrap_err();
    assert!(matches!(e, SendError::Lineage { .. }), "{e}");
    assert!(e.to_string().contains("DataWriteGuid"), "{e}");
    assert!(std::fs::read(&dest).unwrap() == before);
    // A missing destination, and a full stream onto an existing one.
    let e = send::receive(
        &mut &stream[..],
        &dir.path().join("nope.vhdx"),
        &ReceiveOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, SendError::DestMissing(_)), "{e}");
    let (full, _) = send_to_vec(&top, &SendOptions::default());
    let e = receive_new(&full, &dest).unwrap_err();
    assert!(matches!(e, SendError::DestExists(_)), "{e}");
    assert!(std::fs::read(&dest).unwrap() == before);
    // A snapshot that is not in the chain.
    let e = send::send(
        &open_ro(&top),
        &SendOptions {
            since: Some(dest.clone()),
            ..SendOptions::default()
        },
        &mut Vec::new(),
    )
    .unwrap_err();
    assert!(matches!(e, SendError::NotInChain { .. }), "{e}");
}

/// Positions to corrupt or cut a stream at: every header byte, the first records' bytes,
/// the END record's, and a spread over the rest.
fn positions(len: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..120.min(len)).collect();
    v.extend((len.saturating_sub(40))..len);
    let step = (len / 150).max(1);
    v.extend((0..len).step_by(step));
    v.sort_unstable();
    v.dedup();
    v
}

#[test]
fn corrupt_or_truncated_stream_leaves_no_new_image() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    raw_image(&src, 3);
    let opts = SendOptions {
        chunk: 64 << 10,
        ..SendOptions::default()
    };
    let (stream, _) = send_to_vec(&src, &opts);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let dest = out.join("dest.vhdx");
    for at in positions(stream.len()) {
        let mut bad = stream.clone();
        bad[at] ^= 0x5a;
        let e = receive_new(&bad, &dest).expect_err("a flipped byte is refused");
        let msg = e.to_string();
        assert!(
            matches!(
                e,
                SendError::BadMagic { .. }
                    | SendError::Version { .. }
                    | SendError::HeaderChecksum { .. }
                    | SendError::RecordChecksum { .. }
                    | SendError::BadRecord { .. }
                    | SendError::Digest(_)
            ),
            "flip at {at}: {msg}"
        );
        assert!(
            listing(&out).is_empty(),
            "flip at {at} left {:?}",
            listing(&out)
        );
    }
    for cut in positions(stream.len()) {
        let e = receive_new(&stream[..cut], &dest).expect_err("a truncated stream is refused");
        match e {
            SendError::Truncated { after } => assert_eq!(after, cut as u64),
            e => panic!("cut at {cut}: {e}"),
        }
        assert!(
            listing(&out).is_empty(),
            "cut at {cut} left {:?}",
            listing(&out)
        );
    }
    let mut long = stream.clone();
    long.push(0);
    assert!(matches!(
        receive_new(&long, &dest),
        Err(SendError::Trailing { .. })
    ));
    assert!(listing(&out).is_empty());
    // The named causes.
    let mut b = stream.clone();
    b[0] = b'X';
    assert!(receive_new(&b, &dest)
        .unwrap_err()
        .to_string()
        .contains("bad magic"));
    let mut b = stream.clone();
    b[8] = 9;
    assert!(receive_new(&b, &dest)
        .unwrap_err()
        .to_string()
        .contains("version 9"));
    let mut b = stream.clone();
    let last = b.len() - 40;
    b[last] ^= 1;
    assert!(receive_new(&b, &dest)
        .unwrap_err()
        .to_string()
        .contains("checksum mismatch at record"));
    receive_new(&stream, &dest).unwrap();
}

#[test]
fn corrupt_incremental_stream_leaves_dest_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (top, _) = chains::build(dir.path(), Kind::Vhdx, 2, SIZE, 41);
    let l0 = chains::layer_path(dir.path(), Kind::Vhdx, 0);
    let opts = SendOptions {
        since: Some(l0.clone()),
        chunk: 64 << 10,
        ..SendOptions::default()
    };
    let (stream, _) = send_to_vec(&top, &opts);
    let dest = dir.path().join("dest.vhdx");
    copy(&l0, &dest);
    let before = std::fs::read(&dest).unwrap();
    let files = listing(dir.path());
    let len = stream.len();
    // Late damage matters most: the records before it would already be applied if receive
    // did not verify the whole stream first.
    for at in [0, 50, 110, len / 2, len - 60, len - 30, len - 5, len - 1] {
        let mut bad = stream.clone();
        bad[at] ^= 0x01;
        send::receive(&mut &bad[..], &dest, &ReceiveOptions::default()).unwrap_err();
        assert!(
            std::fs::read(&dest).unwrap() == before,
            "flip at {at} changed DEST"
        );
        assert_eq!(listing(dir.path()), files, "flip at {at} left a spool");
    }
    for cut in [1, 103, 104, len / 3, len - 33, len - 1] {
        let e = send::receive(&mut &stream[..cut], &dest, &ReceiveOptions::default()).unwrap_err();
        assert!(
            matches!(e, SendError::Truncated { .. }),
            "cut at {cut}: {e}"
        );
        assert!(
            std::fs::read(&dest).unwrap() == before,
            "cut at {cut} changed DEST"
        );
        assert_eq!(listing(dir.path()), files);
    }
}

#[test]
fn adaptive_levels_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let model = raw_image(&src, 9);
    // A slow output (rate limited) fills the queue: the level climbs.
    let opts = SendOptions {
        chunk: 16 << 10,
        threads: 2,
        rate: 8 << 20,
        ..SendOptions::default()
    };
    let (stream, rep) = send_to_vec(&src, &opts);
    let top = rep.levels.iter().map(|l| l.level).max().unwrap();
    assert!(top > 1, "a slow output raised the level: {:?}", rep.levels);
    assert!(
        rep.levels.iter().any(|l| l.incompressible > 0),
        "random runs stored raw"
    );
    let dest = dir.path().join("d.img");
    receive_new(&stream, &dest).unwrap();
    assert!(std::fs::read(&dest).unwrap() == model);
    // A fixed level 0 stores everything raw.
    let (_, rep) = send_to_vec(
        &src,
        &SendOptions {
            level: Level::Fixed(0),
            ..SendOptions::default()
        },
    );
    assert!(rep.levels.iter().all(|l| l.level == 0), "{:?}", rep.levels);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Mutated and truncated streams: `verify` returns Ok or a typed error, never panics.
    #[test]
    fn hostile_streams_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let stream = hostile_seed();
        let mut s = stream.to_vec();
        for (i, b) in &edits {
            let i = i.index(s.len());
            s[i] = *b;
        }
        if do_cut {
            s.truncate(cut.index(s.len() + 1));
        }
        let r = send::verify(&mut &s[..]);
        if s == stream {
            prop_assert!(r.is_ok());
        } else if let Err(e) = r {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}

/// A small stream with DATA (both codecs) and ZERO records, made once.
fn hostile_seed() -> &'static [u8] {
    static SEED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    SEED.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p: PathBuf = dir.path().join("s.img");
        let storage = FileStorage::create(&p).unwrap();
        storage.set_len(256 << 10).unwrap();
        let dev = RawDisk::new(storage).unwrap();
        dev.write_at(&[7u8; 4096], 0).unwrap();
        let rnd: Vec<u8> = (0..8192u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        dev.write_at(&rnd, 64 << 10).unwrap();
        dev.write_at(&[0u8; 4096], 128 << 10).unwrap();
        dev.flush().unwrap();
        let opts = SendOptions {
            chunk: 4096,
            level: Level::Fixed(1),
            ..SendOptions::default()
        };
        send_to_vec(&p, &opts).0
    })
}

/// `path`, an image of `kind` without parents, opened read-write on `s` as a one-layer
/// chain named `path`.
fn layer_disk<S: Storage + 'static>(path: &Path, kind: Kind, s: S) -> chain::Disk {
    let (dev, format, identity): (Arc<dyn BlockDevice>, _, _) = match kind {
        Kind::Vhdx => {
            let f =
                vhdx_format::VhdxFile::open(s, &vhdx_format::OpenOptions::new().read_only(false))
                    .unwrap();
            let d = f.details();
            let id = chain::Identity::Vhdx {
                data_write_guid: d.data_write_guid,
                disk_id: d.disk_id,
            };
            (Arc::new(f), chain::Format::Vhdx, id)
        }
        Kind::Vhd => {
            let f = vhd_format::VhdFile::open(s, &vhd_format::OpenOptions::new().read_only(false))
                .unwrap();
            let d = f.details();
            let id = chain::Identity::Vhd {
                unique_id: d.unique_id,
                timestamp: d.timestamp,
            };
            (Arc::new(f), chain::Format::Vhd, id)
        }
    };
    let layer = chain::Layer {
        path: path.to_path_buf(),
        format,
        dev,
        identity,
        parent: None,
    };
    chain::Disk::from_layers(vec![layer], false).unwrap()
}

/// An incremental receive of `stream` into `dest` (an image of `kind` without parents)
/// that the power cut after `ops` writes and syncs of DEST's storage (the fault backend
/// over DEST's bytes): the receive fails, its journal is left beside DEST, and DEST is
/// rewritten with what a reboot would find on its disk.
fn interrupted(dest: &Path, kind: Kind, stream: &[u8], ops: u64) {
    let bytes = std::fs::read(dest).unwrap();
    let fs = Arc::new(FaultStorage::new(MemStorage::from_bytes(&bytes)));
    let disk = layer_disk(dest, kind, fs.clone());
    fs.set_cut(CutPoint::AfterOps(fs.ops() + ops));
    let e = send::receive_into(
        &mut &stream[..],
        &disk,
        dest.parent().unwrap(),
        &ReceiveOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e, SendError::Interrupted { .. }), "{e}");
    drop(disk);
    std::fs::write(dest, fs.crash_image(1).to_vec().unwrap()).unwrap();
    assert!(send::journal_path(dest).exists());
}

/// A 2-layer chain of `kind` in `dir`, its stream since the base, what the top reads, and
/// DEST: a copy of the base.
fn interrupted_setup(dir: &Path, kind: Kind, seed: u64) -> (Vec<u8>, Vec<u8>, PathBuf) {
    let (top, model) = chains::build(dir, kind, 2, SIZE, seed);
    let l0 = chains::layer_path(dir, kind, 0);
    let opts = SendOptions {
        since: Some(l0.clone()),
        chunk: 128 << 10,
        ..SendOptions::default()
    };
    let (stream, _) = send_to_vec(&top, &opts);
    let dest = dir.join(format!("dest.{}", kind.ext()));
    copy(&l0, &dest);
    (stream, model, dest)
}

#[test]
fn an_interrupted_receive_is_finished_by_the_next_one() {
    for kind in [Kind::Vhdx, Kind::Vhd] {
        let dir = tempfile::tempdir().unwrap();
        let (stream, model, dest) = interrupted_setup(dir.path(), kind, 71);
        let files = listing(dir.path());
        let e = send::resume(&dest, &ReceiveOptions::default()).unwrap_err();
        assert!(matches!(e, SendError::NoJournal { .. }), "{e}");
        assert!(e.to_string().contains("no interrupted receive"), "{e}");
        interrupted(&dest, kind, &stream, 3);
        assert!(
            read_all(&open_ro(&dest)) != model,
            "{kind:?}: the cut came too late"
        );
        // The same stream: the journal is finished, then the stream is already applied.
        let r = send::receive(&mut &stream[..], &dest, &ReceiveOptions::default()).unwrap();
        let resumed = r.resumed.as_ref().expect("the journal was finished");
        assert_eq!(resumed.header, r.header);
        assert!(resumed.data_bytes > 0);
        assert!(r.already_applied, "{kind:?}");
        assert!(read_all(&open_ro(&dest)) == model, "{kind:?}: DEST differs");
        assert_eq!(listing(dir.path()), files, "{kind:?}: the journal is gone");
        // Once more, with no journal: the lineage check decides, as after any receive. A
        // VHDX has a new DataWriteGuid; a VHD keeps its identity when written, so the
        // stream passes and is applied again (the records are absolute: no change).
        let r = send::receive(&mut &stream[..], &dest, &ReceiveOptions::default());
        match kind {
            Kind::Vhdx => assert!(matches!(r, Err(SendError::Lineage { .. })), "{r:?}"),
            Kind::Vhd => assert!(r.is_ok_and(|r| r.resumed.is_none() && !r.already_applied)),
        }
        assert!(read_all(&open_ro(&dest)) == model, "{kind:?}: DEST differs");
    }
}

#[test]
fn a_completed_receive_is_not_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let (stream, model, dest) = interrupted_setup(dir.path(), Kind::Vhdx, 72);
    let r = send::receive(&mut &stream[..], &dest, &ReceiveOptions::default()).unwrap();
    assert!(r.resumed.is_none() && !r.already_applied);
    let e = send::receive(&mut &stream[..], &dest, &ReceiveOptions::default()).unwrap_err();
    assert!(matches!(e, SendError::Lineage { .. }), "{e}");
    assert!(read_all(&open_ro(&dest)) == model);
    assert!(!send::journal_path(&dest).exists());
}

#[test]
fn resume_refuses_a_damaged_or_foreign_journal_and_finishes_a_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let (stream, model, dest) = interrupted_setup(dir.path(), Kind::Vhdx, 73);
    interrupted(&dest, Kind::Vhdx, &stream, 5);
    let journal = send::journal_path(&dest);
    let good = std::fs::read(&journal).unwrap();
    let crashed = std::fs::read(&dest).unwrap();
    let len = good.len();
    for (what, bad) in [
        ("torn", good[..len - 700].to_vec()),
        ("empty", Vec::new()),
        ("magic", {
            let mut b = good.clone();
            b[0] ^= 1;
            b
        }),
        ("record", {
            let mut b = good.clone();
            b[len / 2] ^= 1;
            b
        }),
    ] {
        std::fs::write(&journal, &bad).unwrap();
        for how in ["resume", "receive"] {
            let e = match how {
                "resume" => send::resume(&dest, &ReceiveOptions::default()).unwrap_err(),
                _ => {
                    send::receive(&mut &stream[..], &dest, &ReceiveOptions::default()).unwrap_err()
                }
            };
            assert!(
                matches!(&e, SendError::Journal { path, .. } if *path == journal),
                "{what} {how}: {e}"
            );
            assert!(e.to_string().contains(&journal.display().to_string()));
            assert!(
                std::fs::read(&dest).unwrap() == crashed,
                "{what} {how} wrote DEST"
            );
            assert!(std::fs::read(&journal).unwrap() == bad, "{what} {how}");
        }
    }
    std::fs::write(&journal, &good).unwrap();
    // Beside another image (another virtual disk id): refused, nothing written.
    let other = dir.path().join("other.vhdx");
    std::fs::rename(&dest, &other).unwrap();
    copy(&chains::layer_path(dir.path(), Kind::Vhdx, 1), &dest);
    let foreign = std::fs::read(&dest).unwrap();
    let e = send::resume(&dest, &ReceiveOptions::default()).unwrap_err();
    assert!(matches!(e, SendError::JournalMismatch { .. }), "{e}");
    assert!(std::fs::read(&dest).unwrap() == foreign);
    // Beside no image: refused, whatever the stream.
    std::fs::remove_file(&dest).unwrap();
    let e = send::resume(&dest, &ReceiveOptions::default()).unwrap_err();
    assert!(matches!(e, SendError::JournalOrphan { .. }), "{e}");
    let e = send::receive(&mut &stream[..], &dest, &ReceiveOptions::default()).unwrap_err();
    assert!(matches!(e, SendError::JournalOrphan { .. }), "{e}");
    assert!(!dest.exists());
    // Its own image back: finished.
    std::fs::rename(&other, &dest).unwrap();
    let r = send::resume(&dest, &ReceiveOptions::default()).unwrap();
    assert_eq!(r.journal, journal);
    assert!(r.data_bytes > 0);
    assert!(read_all(&open_ro(&dest)) == model);
    assert!(!journal.exists());
    let e = send::resume(&dest, &ReceiveOptions::default()).unwrap_err();
    assert!(matches!(e, SendError::NoJournal { .. }), "{e}");
}

/// A receive removes the temporary files beside DEST of a receive into it whose process is
/// gone, and keeps those of a live one (this process).
#[test]
fn stale_temporary_files_of_a_dead_receive_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let model = raw_image(&src, 5);
    let (stream, _) = send_to_vec(&src, &SendOptions::default());
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let me = std::process::id();
    let stale = [
        dir.path().join(format!(".out.vhdx.vdisk-recv-{dead}-0")),
        dir.path().join(format!(".out.vhdx.vdisk-spool-{dead}-1")),
    ];
    let live = dir.path().join(format!(".out.vhdx.vdisk-recv-{me}-7"));
    for f in stale.iter().chain([&live]) {
        std::fs::write(f, b"partial image").unwrap();
    }
    let dest = dir.path().join("out.vhdx");
    let mut r = receive_new(&stream, &dest).unwrap();
    r.removed_stale.sort();
    assert_eq!(r.removed_stale, stale);
    assert!(stale.iter().all(|f| !f.exists()) && live.exists());
    assert!(read_all(&open_ro(&dest)) == model);
}
