//! Hostile chains: each a clear, typed error naming the path and the rule — never a panic,
//! never a file opened outside the policy.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use std::path::Path;

use block_io::{BlockDevice, FileStorage};
use chain::{ChainError, Disk, OpenOptions, PathPolicy};
use uuid::Uuid;

/// A VHDX differencing image at `path` whose locator says `relative` and whose linkage is
/// `linkage` (no parent is opened to make it).
fn vhdx_child_raw(path: &Path, relative: &str, linkage: Uuid, size: u64, sector: u32) {
    let pref = vhdx_format::ParentRef {
        data_write_guid: linkage,
        relative_path: relative.to_string(),
        absolute_path: None,
    };
    let mut o = vhdx_format::CreateOptions::differencing(size, pref);
    o.logical_sector_size = sector;
    drop(vhdx_format::create(FileStorage::create(path).unwrap(), &o).unwrap());
}

fn open_err(path: &Path, opts: &OpenOptions) -> ChainError {
    match Disk::open(path, opts) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e,
    }
}

#[test]
fn locator_outside_the_allowed_roots_is_refused() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("a")).unwrap();
    std::fs::create_dir_all(d.path().join("b")).unwrap();
    let base = d.path().join("a/base.vhdx");
    drop(create_base(Fmt::Vhdx, &base, SIZE));
    let child = d.path().join("b/child.vhdx");
    drop(create_child(Fmt::Vhdx, &child, &base, "..\\a\\base.vhdx"));
    let e = open_err(&child, &OpenOptions::new());
    let msg = e.to_string();
    assert!(matches!(e, ChainError::ParentNotFound { .. }), "{msg}");
    assert!(
        msg.contains("..\\a\\base.vhdx") && msg.contains("climbs out"),
        "{msg}"
    );
    // The absolute path the child also carries is refused too, by its own rule.
    assert!(
        msg.contains("absolute parent paths are not allowed"),
        "{msg}"
    );
    // A configured root lets it in.
    let opts = OpenOptions::new().policy(PathPolicy {
        roots: vec![d.path().to_path_buf()],
        ..PathPolicy::default()
    });
    assert_eq!(Disk::open(&child, &opts).unwrap().layers().len(), 2);
}

#[test]
fn a_parent_outside_policy_is_never_opened() {
    // The out-of-policy "parent" is a FIFO: opening it for reading would block forever, so a
    // hang here means the chain opened a file it had refused.
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("in")).unwrap();
    let fifo = d.path().join("trap.vhdx");
    let c = std::ffi::CString::new(fifo.display().to_string()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let child = d.path().join("in/child.vhdx");
    vhdx_child_raw(&child, "..\\trap.vhdx", Uuid::new_v4(), SIZE, 512);
    let (tx, rx) = std::sync::mpsc::channel();
    let c2 = child.clone();
    std::thread::spawn(move || {
        let r = Disk::open(&c2, &OpenOptions::new()).map(|_| ());
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    let r = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the chain blocked opening a refused FIFO");
    assert!(r.unwrap_err().contains("climbs out"));
}

#[test]
fn self_reference_and_loops_are_detected() {
    let d = tempfile::tempdir().unwrap();
    let me = d.path().join("me.vhdx");
    vhdx_child_raw(&me, "me.vhdx", Uuid::new_v4(), SIZE, 512);
    let e = open_err(&me, &OpenOptions::new());
    assert!(matches!(e, ChainError::Loop { .. }), "{e}");
    assert!(e.to_string().contains("me.vhdx"));

    let (a, b) = (d.path().join("a.vhdx"), d.path().join("b.vhdx"));
    vhdx_child_raw(&a, "b.vhdx", Uuid::new_v4(), SIZE, 512);
    vhdx_child_raw(&b, "a.vhdx", Uuid::new_v4(), SIZE, 512);
    // The a -> b link fails lineage first unless overridden; with the override, the loop.
    let e = open_err(&a, &OpenOptions::new().ignore_lineage(true));
    assert!(matches!(e, ChainError::Loop { .. }), "{e}");
}

#[test]
fn missing_parent_names_every_path_tried() {
    let d = tempfile::tempdir().unwrap();
    let c = d.path().join("c.vhdx");
    vhdx_child_raw(&c, ".\\gone.vhdx", Uuid::new_v4(), SIZE, 512);
    let e = open_err(&c, &OpenOptions::new());
    assert!(matches!(e, ChainError::ParentNotFound { .. }), "{e}");
    assert!(
        e.to_string().contains("gone.vhdx") && e.to_string().contains("not found"),
        "{e}"
    );
    // Mapped to block-io's error at the boundary: a sentence, not a panic.
    let io: block_io::Error = e.into();
    assert_eq!(io.kind(), block_io::ErrorKind::InvalidInput);
}

#[test]
fn sector_size_and_size_mismatches_are_refused() {
    let d = tempfile::tempdir().unwrap();
    // A 4096-byte-sector parent under a 512-byte-sector child.
    let p4k = d.path().join("p4k.vhdx");
    let mut o = vhdx_format::CreateOptions::dynamic(SIZE);
    o.logical_sector_size = 4096;
    let p = vhdx_format::create(FileStorage::create(&p4k).unwrap(), &o).unwrap();
    let dwg = p.details().data_write_guid;
    drop(p);
    let c = d.path().join("c.vhdx");
    vhdx_child_raw(&c, "p4k.vhdx", dwg, SIZE, 512);
    let e = open_err(&c, &OpenOptions::new());
    assert!(matches!(e, ChainError::Geometry { .. }), "{e}");
    assert!(e.to_string().contains("4096-byte"), "{e}");

    // A VHD child larger than its parent: refused.
    let small = d.path().join("small.vhd");
    drop(create_base(Fmt::Vhd, &small, SIZE / 2));
    let big = d.path().join("big.vhd");
    let ps = FileStorage::open(&small, &block_io::OpenOptions::new().read_only(true)).unwrap();
    let det = vhd_format::VhdFile::open(ps, &vhd_format::OpenOptions::new().read_only(true))
        .unwrap()
        .details();
    let mut o = vhd_format::DifferencingOptions::for_parent(
        &det,
        "small.vhd",
        None,
        Some(".\\small.vhd".into()),
    );
    o.size = SIZE;
    drop(vhd_format::VhdFile::create_differencing(FileStorage::create(&big).unwrap(), &o).unwrap());
    let e = open_err(&big, &OpenOptions::new());
    assert!(matches!(e, ChainError::Geometry { .. }), "{e}");
    assert!(e.to_string().contains("fewer than the child's"), "{e}");

    // A VHDX child larger than its parent is allowed: past the parent's end reads zeros.
    let pv = d.path().join("pv.vhdx");
    let p = create_base(Fmt::Vhdx, &pv, SIZE / 2);
    p.write_at(&vec![0x77; 1 << 20], (SIZE / 2) - (1 << 20))
        .unwrap();
    p.flush().unwrap();
    drop(p);
    let dwg = {
        let s = FileStorage::open(&pv, &block_io::OpenOptions::new().read_only(true)).unwrap();
        vhdx_format::VhdxFile::open(s, &vhdx_format::OpenOptions::new().read_only(true))
            .unwrap()
            .details()
            .data_write_guid
    };
    let cv = d.path().join("cv.vhdx");
    vhdx_child_raw(&cv, "pv.vhdx", dwg, SIZE, 512);
    let disk = Disk::open(&cv, &OpenOptions::new().read_only(true)).unwrap();
    let mut buf = vec![1u8; 2 << 20];
    disk.read_at(&mut buf, (SIZE / 2) - (1 << 20)).unwrap();
    assert!(buf[..1 << 20].iter().all(|&b| b == 0x77));
    assert!(buf[1 << 20..].iter().all(|&b| b == 0));
}

#[test]
fn a_modified_vhdx_parent_is_detected_with_both_ids() {
    let d = tempfile::tempdir().unwrap();
    let (paths, _) = build_chain(Fmt::Vhdx, d.path(), 2, 7);
    let before = {
        let s =
            FileStorage::open(&paths[0], &block_io::OpenOptions::new().read_only(true)).unwrap();
        vhdx_format::VhdxFile::open(s, &vhdx_format::OpenOptions::new().read_only(true))
            .unwrap()
            .details()
            .data_write_guid
    };
    // Someone writes to the parent after the child was made: its DataWriteGuid changes.
    let p = Disk::open(&paths[0], &OpenOptions::new()).unwrap();
    p.write_at(&[0xEE; 512], 0).unwrap();
    p.flush().unwrap();
    drop(p);
    let after = {
        let s =
            FileStorage::open(&paths[0], &block_io::OpenOptions::new().read_only(true)).unwrap();
        vhdx_format::VhdxFile::open(s, &vhdx_format::OpenOptions::new().read_only(true))
            .unwrap()
            .details()
            .data_write_guid
    };
    assert_ne!(before, after, "a write must change the DataWriteGuid");
    let e = open_err(&paths[1], &OpenOptions::new().read_only(true));
    let msg = e.to_string();
    assert!(matches!(e, ChainError::LineageMismatch { .. }), "{msg}");
    assert!(
        msg.contains(&before.to_string()) && msg.contains(&after.to_string()),
        "{msg}"
    );
    assert!(msg.contains("possible corruption"), "{msg}");
    // Opening anyway takes an explicit override, and the link says it did not verify.
    let disk = Disk::open(
        &paths[1],
        &OpenOptions::new().read_only(true).ignore_lineage(true),
    )
    .unwrap();
    assert!(matches!(disk.links()[0], chain::LinkCheck::Mismatch(_)));
}

#[test]
fn a_replaced_vhd_parent_is_detected() {
    let d = tempfile::tempdir().unwrap();
    let (paths, _) = build_chain(Fmt::Vhd, d.path(), 2, 9);
    // Replace the parent by another image of the same name and size.
    std::fs::remove_file(&paths[0]).unwrap();
    drop(create_base(Fmt::Vhd, &paths[0], SIZE));
    let e = open_err(&paths[1], &OpenOptions::new().read_only(true));
    assert!(matches!(e, ChainError::LineageMismatch { .. }), "{e}");
    assert!(e.to_string().contains("unique id"), "{e}");
}

#[test]
fn depth_is_capped() {
    let d = tempfile::tempdir().unwrap();
    let (paths, _) = build_chain(Fmt::Vhdx, d.path(), 4, 3);
    let e = open_err(&paths[3], &OpenOptions::new().max_depth(3));
    assert!(matches!(e, ChainError::TooDeep { max: 3, .. }), "{e}");
    assert_eq!(
        Disk::open(&paths[3], &OpenOptions::new().max_depth(4))
            .unwrap()
            .layers()
            .len(),
        4
    );
}

#[test]
fn garbage_and_truncated_images_are_errors_not_panics() {
    let d = tempfile::tempdir().unwrap();
    let (paths, _) = build_chain(Fmt::Vhdx, d.path(), 2, 5);
    // Truncate the parent: opening the child must fail cleanly.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&paths[0])
        .unwrap();
    f.set_len(300 * 1024).unwrap();
    drop(f);
    let e = open_err(&paths[1], &OpenOptions::new().read_only(true));
    assert!(matches!(e, ChainError::Open { .. }), "{e}");
    // A parent that is garbage detected as raw: a VHDX child refuses a raw parent.
    std::fs::write(&paths[0], vec![0x42u8; SIZE as usize]).unwrap();
    let e = open_err(
        &paths[1],
        &OpenOptions::new().read_only(true).ignore_lineage(true),
    );
    assert!(matches!(e, ChainError::Geometry { .. }), "{e}");
}
