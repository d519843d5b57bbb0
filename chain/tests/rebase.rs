//! `chain::rebase` (unsafe, no copy): parents moved to other folders, children relinked; the
//! chains open, verify and read exactly as before (model and libvhdi); a parent with another
//! identity is refused and the child left byte-identical. The copying rebase is tested in
//! `rebase_copy.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use std::path::{Path, PathBuf};

use block_io::BlockDevice;
use chain::{ChainError, Disk, LinkCheck, OpenOptions, PathPolicy, RebaseOptions};

fn unsafe_opts() -> RebaseOptions {
    RebaseOptions {
        unsafe_no_copy: true,
        ..RebaseOptions::default()
    }
}

fn rooted(root: &Path) -> OpenOptions {
    OpenOptions::new().read_only(true).policy(PathPolicy {
        roots: vec![root.to_path_buf()],
        ..PathPolicy::default()
    })
}

/// Opens `top` under `opts`, checks every link verified, the bytes against `model`, and
/// (libvhdi) the same bytes read by the independent reader over `paths` (top first).
fn assert_chain_reads(top: &Path, opts: &OpenOptions, model: &[u8], paths: &[PathBuf]) {
    let disk = Disk::open(top, opts).unwrap();
    assert_eq!(disk.layers().len(), paths.len());
    assert!(disk.links().iter().all(|l| *l == LinkCheck::Verified));
    for (layer, p) in disk.layers().iter().zip(paths) {
        assert_eq!(
            std::fs::canonicalize(&layer.path).unwrap(),
            std::fs::canonicalize(p).unwrap()
        );
    }
    let got = read_all(&disk);
    if let Some(i) = first_diff(&got, model) {
        panic!("{}: byte {i} differs from the model", top.display());
    }
    if let Some(theirs) = libvhdi_read(paths, SIZE) {
        if let Some(i) = first_diff(&theirs, model) {
            panic!(
                "{}: libvhdi differs from the model at byte {i}",
                top.display()
            );
        }
    }
}

fn check_clean(fmt: Fmt, p: &Path) {
    let s = block_io::FileStorage::open(p, &block_io::OpenOptions::new().read_only(true)).unwrap();
    match fmt {
        Fmt::Vhd => assert!(vhd_format::check_storage(&s).unwrap().is_clean()),
        Fmt::Vhdx => {
            let r = vhdx_format::check_image(s).unwrap();
            assert!(r.errors.is_empty(), "{:?}", r.errors);
            assert!(!r.log_was_dirty);
        }
    }
}

/// Identity facts that must survive a rebase (children of the rebased image stay linked).
fn identity(p: &Path) -> chain::Identity {
    chain::open_layer(p, None, true, false).unwrap().identity
}

fn move_parent_then_rebase(fmt: Fmt) {
    let d = tempfile::tempdir().unwrap();
    let (paths, models) = build_chain(fmt, d.path(), 2, 7 + fmt as u64);
    let moved_dir = d.path().join("moved");
    std::fs::create_dir(&moved_dir).unwrap();
    let moved = moved_dir.join(paths[0].file_name().unwrap());
    std::fs::rename(&paths[0], &moved).unwrap();
    let ro = OpenOptions::new().read_only(true);
    assert!(matches!(
        Disk::open(&paths[1], &ro),
        Err(ChainError::ParentNotFound { .. })
    ));
    let before = identity(&paths[1]);
    chain::rebase(&paths[1], &moved, &unsafe_opts()).unwrap();
    // The child keeps its own identity (its own children stay linked).
    assert_eq!(identity(&paths[1]), before);
    // The moved parent lies inside the child's folder tree: the default policy follows it.
    assert_chain_reads(
        &paths[1],
        &ro,
        &models[1],
        &[paths[1].clone(), moved.clone()],
    );
    check_clean(fmt, &paths[1]);
    // Rebasing again (the same parent) is idempotent, and the chain stays writable.
    chain::rebase(&paths[1], &moved, &unsafe_opts()).unwrap();
    let disk = Disk::open(&paths[1], &OpenOptions::new()).unwrap();
    disk.write_at(&[0xEE; 4096], 8192).unwrap();
    disk.flush().unwrap();
    drop(disk);
    let mut model = models[1].clone();
    model[8192..8192 + 4096].fill(0xEE);
    assert_chain_reads(&paths[1], &ro, &model, &[paths[1].clone(), moved]);
    check_clean(fmt, &paths[1]);
}

#[test]
fn vhd_child_rebased_onto_moved_parent() {
    move_parent_then_rebase(Fmt::Vhd);
}

#[test]
fn vhdx_child_rebased_onto_moved_parent() {
    move_parent_then_rebase(Fmt::Vhdx);
}

/// A chain 3 deep, each layer moved to its own folder: the middle layer is rebased onto the
/// moved base, then the top onto the moved middle (which still verifies: rebasing changed
/// only its locator, not its identity).
fn three_deep(fmt: Fmt) {
    let d = tempfile::tempdir().unwrap();
    let (paths, models) = build_chain(fmt, d.path(), 3, 40 + fmt as u64);
    let mut moved = Vec::new();
    for (i, p) in paths.iter().enumerate().take(2) {
        let dir = d.path().join(format!("dir{i}"));
        std::fs::create_dir(&dir).unwrap();
        let to = dir.join(p.file_name().unwrap());
        std::fs::rename(p, &to).unwrap();
        moved.push(to);
    }
    let ids: Vec<_> = moved.iter().map(|p| identity(p)).collect();
    chain::rebase(&moved[1], &moved[0], &unsafe_opts()).unwrap();
    chain::rebase(&paths[2], &moved[1], &unsafe_opts()).unwrap();
    assert_eq!(identity(&moved[1]), ids[1]);
    assert_eq!(identity(&moved[0]), ids[0]);
    // dir1/l1 names ..\dir0\l0: outside its folder, so open with the temp dir as a root.
    let opts = rooted(d.path());
    let top_first = [paths[2].clone(), moved[1].clone(), moved[0].clone()];
    assert_chain_reads(&paths[2], &opts, &models[2], &top_first);
    assert_chain_reads(&moved[1], &opts, &models[1], &top_first[1..]);
    for p in [&paths[2], &moved[1]] {
        check_clean(fmt, p);
    }
}

#[test]
fn vhd_chain_3_deep_moved_and_rebased() {
    three_deep(Fmt::Vhd);
}

#[test]
fn vhdx_chain_3_deep_moved_and_rebased() {
    three_deep(Fmt::Vhdx);
}

fn refusals(fmt: Fmt) {
    let d = tempfile::tempdir().unwrap();
    let (paths, _) = build_chain(fmt, d.path(), 2, 90 + fmt as u64);
    // Another image of the same size: another DataWriteGuid / unique id.
    let other = d.path().join(format!("other.{}", fmt.ext()));
    let o = create_base(fmt, &other, SIZE);
    o.write_at(&[1; 512], 0).unwrap();
    o.flush().unwrap();
    drop(o);
    let child_bytes = std::fs::read(&paths[1]).unwrap();
    let e = chain::rebase(&paths[1], &other, &unsafe_opts()).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, ChainError::RebaseMismatch { .. }),
        "{fmt:?}: {e:?}"
    );
    let (want, have) = (
        chain::open_layer(&paths[1], None, true, false)
            .unwrap()
            .parent
            .unwrap()
            .expected
            .to_string(),
        identity(&other).to_string(),
    );
    assert!(msg.contains(&want) && msg.contains(&have), "{msg}");
    assert_eq!(std::fs::read(&paths[1]).unwrap(), child_bytes);
    // An image is never its own parent, in either mode.
    for opts in [unsafe_opts(), RebaseOptions::default()] {
        let e = chain::rebase(&paths[1], &paths[1], &opts).unwrap_err();
        assert!(matches!(e, ChainError::RebaseRefused { .. }), "{e:?}");
        assert!(e.to_string().contains("cannot be its own parent"), "{e}");
    }
    // A base image has no parent to change; the other format is no parent.
    let e = chain::rebase(&paths[0], &other, &unsafe_opts()).unwrap_err();
    assert!(matches!(e, ChainError::RebaseRefused { .. }), "{e:?}");
    let alien_fmt = if fmt == Fmt::Vhd { Fmt::Vhdx } else { Fmt::Vhd };
    let alien = d.path().join(format!("alien.{}", alien_fmt.ext()));
    drop(create_base(alien_fmt, &alien, SIZE));
    for opts in [unsafe_opts(), RebaseOptions::default()] {
        let e = chain::rebase(&paths[1], &alien, &opts).unwrap_err();
        assert!(matches!(e, ChainError::RebaseRefused { .. }), "{e:?}");
        assert!(e.to_string().contains("parent;"), "{e}");
    }
    assert_eq!(std::fs::read(&paths[1]).unwrap(), child_bytes);
}

#[test]
fn vhd_rebase_onto_other_content_refused_child_untouched() {
    refusals(Fmt::Vhd);
}

#[test]
fn vhdx_rebase_onto_other_content_refused_child_untouched() {
    refusals(Fmt::Vhdx);
}

/// A copy of the parent (same DataWriteGuid / unique id) is as good a parent as the original.
#[test]
fn rebase_onto_a_copy_of_the_parent() {
    for fmt in [Fmt::Vhd, Fmt::Vhdx] {
        let d = tempfile::tempdir().unwrap();
        let (paths, models) = build_chain(fmt, d.path(), 2, 120 + fmt as u64);
        let copy = d.path().join(format!("copy-of-base.{}", fmt.ext()));
        std::fs::copy(&paths[0], &copy).unwrap();
        chain::rebase(&paths[1], &copy, &unsafe_opts()).unwrap();
        std::fs::remove_file(&paths[0]).unwrap();
        let ro = OpenOptions::new().read_only(true);
        assert_chain_reads(&paths[1], &ro, &models[1], &[paths[1].clone(), copy]);
    }
}
