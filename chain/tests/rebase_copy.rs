//! `chain::rebase` copying (qemu-img's default rebase): a child of A moved onto B, where B
//! differs from A in some ranges and equals it in others. The child reads byte for byte the
//! same before and after (the chain and libvhdi), keeps its own sectors, holds only the
//! sectors where A and B differ, and now opens over B with the link verified. Also: a new
//! parent that is itself a differencing chain, dropping a middle layer, a smaller VHDX
//! parent, and the refusals (missing old parent, own chain).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use std::path::{Path, PathBuf};

use block_io::{BlockDevice, BlockStatus};
use chain::{ChainError, Disk, LinkCheck, OpenOptions, RebaseOptions, RebaseProgress};

const MIB: u64 = 1 << 20;
const SECTOR: u64 = 512;

fn fill(seed: u8, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8).wrapping_mul(7) ^ (i as u8))
        .collect()
}

/// Writes `data` at `off` into `dev` and `model`.
fn put(dev: &dyn BlockDevice, model: &mut [u8], off: u64, data: &[u8]) {
    dev.write_at(data, off).unwrap();
    model[off as usize..off as usize + data.len()].copy_from_slice(data);
}

/// A writes its ranges, B the same or other bytes: equal data [0, 2M), different [2M, 4M),
/// A only [4M, 5M), B only [5M, 6M), nothing in both [6M, 8M), equal but one sector
/// [8M, 9M). Returns the models of A and B.
fn bases(fmt: Fmt, a: &Path, b: &Path, b_size: u64) -> (Vec<u8>, Vec<u8>) {
    let (da, db) = (create_base(fmt, a, SIZE), create_base(fmt, b, b_size));
    let mut ma = vec![0u8; SIZE as usize];
    let mut mb = vec![0u8; b_size as usize];
    let same = fill(1, 2 * MIB);
    put(&*da, &mut ma, 0, &same);
    put(&*db, &mut mb, 0, &same);
    put(&*da, &mut ma, 2 * MIB, &fill(2, 2 * MIB));
    put(&*db, &mut mb, 2 * MIB, &fill(3, 2 * MIB));
    put(&*da, &mut ma, 4 * MIB, &fill(4, MIB));
    put(&*db, &mut mb, 5 * MIB, &fill(5, MIB));
    let mut almost = fill(6, MIB);
    put(&*da, &mut ma, 8 * MIB, &almost);
    almost[300 * 512] ^= 0xFF;
    if b_size >= 9 * MIB {
        put(&*db, &mut mb, 8 * MIB, &almost);
    }
    // A's last MiB (past the end of a smaller B).
    put(&*da, &mut ma, SIZE - MIB, &fill(7, MIB));
    da.flush().unwrap();
    db.flush().unwrap();
    (ma, mb)
}

/// C over A with its own writes: a whole range where A and B differ, part of a block (a
/// PARTIALLY_PRESENT VHDX block) there, a 4 KiB piece where only A has data. Returns C's
/// model and a mask of the sectors C holds.
fn child(fmt: Fmt, c: &Path, a: &Path, ma: &[u8]) -> (Vec<u8>, Vec<bool>) {
    let rel = format!(".\\{}", a.file_name().unwrap().to_string_lossy());
    drop(create_child(fmt, c, a, &rel));
    let disk = Disk::open(c, &OpenOptions::new()).unwrap();
    let mut model = ma.to_vec();
    let mut own = vec![false; (SIZE / SECTOR) as usize];
    for (off, len, seed) in [
        (2 * MIB, MIB / 2, 20u8),
        (3 * MIB + 4096, 4096, 21),
        (4 * MIB + 64 * 1024, 4096, 22),
    ] {
        put(&disk, &mut model, off, &fill(seed, len));
        own[(off / SECTOR) as usize..((off + len) / SECTOR) as usize].fill(true);
    }
    disk.flush().unwrap();
    (model, own)
}

/// Which sectors the layer `p` holds itself.
fn held(p: &Path) -> Vec<bool> {
    let l = chain::open_layer(p, None, true, false).unwrap();
    let mut out = vec![false; (SIZE / SECTOR) as usize];
    let mut pos = 0;
    while pos < SIZE {
        let r = l.dev.block_status(pos, SIZE - pos).unwrap();
        if r.status != BlockStatus::Unallocated {
            out[(pos / SECTOR) as usize..((pos + r.len) / SECTOR) as usize].fill(true);
        }
        pos += r.len;
    }
    out
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

/// Opens `top`, checks the layers are `paths` with every link verified, and the bytes (the
/// chain's and libvhdi's) are `model`.
fn assert_reads(top: &Path, model: &[u8], paths: &[PathBuf]) {
    let disk = Disk::open(top, &OpenOptions::new().read_only(true)).unwrap();
    let got: Vec<PathBuf> = disk.layers().iter().map(|l| l.path.clone()).collect();
    let canon = |v: &[PathBuf]| -> Vec<PathBuf> {
        v.iter()
            .map(|p| std::fs::canonicalize(p).unwrap())
            .collect()
    };
    assert_eq!(canon(&got), canon(paths));
    assert!(disk.links().iter().all(|l| *l == LinkCheck::Verified));
    if let Some(i) = first_diff(&read_all(&disk), model) {
        panic!("{}: byte {i} differs from before the rebase", top.display());
    }
    // libvhdi fails reading past the end of a parent smaller than its VHDX child.
    let smaller = disk
        .layers()
        .iter()
        .any(|l| l.dev.info().virtual_size < SIZE);
    if smaller {
        return;
    }
    if let Some(theirs) = libvhdi_read(paths, SIZE) {
        if let Some(i) = first_diff(&theirs, model) {
            panic!("{}: libvhdi differs at byte {i}", top.display());
        }
    }
}

/// The sectors C lacks where the old chain and the new one read differently.
fn expected_copies(own: &[bool], old: &[u8], new: &[u8]) -> Vec<bool> {
    own.iter()
        .enumerate()
        .map(|(s, &own)| {
            let r = s * 512..(s + 1) * 512;
            let n = if r.end <= new.len() {
                new[r.clone()].to_vec()
            } else {
                vec![0u8; 512]
            };
            !own && old[r] != n[..]
        })
        .collect()
}

/// C (over A) rebased onto `new` (whose chain is `new_chain`, top first, reading
/// `new_model`): content kept, own data kept, only differing sectors copied.
fn rebase_and_check(
    fmt: Fmt,
    c: &Path,
    (model, own): (&[u8], &[bool]),
    old_model: &[u8],
    new_chain: &[PathBuf],
    new_model: &[u8],
) {
    let before = Disk::open(c, &OpenOptions::new().read_only(true)).unwrap();
    assert_eq!(read_all(&before), model);
    drop(before);
    let id = chain::open_layer(c, None, true, false).unwrap().identity;
    let mut seen = Vec::new();
    let p = chain::rebase_with_progress(c, &new_chain[0], &RebaseOptions::default(), &mut |p| {
        seen.push(p)
    })
    .unwrap();
    let want = expected_copies(own, old_model, new_model);
    let want_bytes = want.iter().filter(|&&w| w).count() as u64 * SECTOR;
    assert_eq!(
        p,
        RebaseProgress {
            done: SIZE,
            total: SIZE,
            copied: want_bytes
        }
    );
    assert_eq!(seen.len() as u64, SIZE / MIB);
    assert!(seen.windows(2).all(|w| w[0].done < w[1].done));
    // The child keeps its identity (VHDX DataWriteGuid, VHD footer): its children stay linked.
    assert_eq!(
        chain::open_layer(c, None, true, false).unwrap().identity,
        id
    );
    let mut paths = vec![c.to_path_buf()];
    paths.extend(new_chain.iter().cloned());
    assert_reads(c, model, &paths);
    check_clean(fmt, c);
    // Held now: its own sectors and the copied ones (VHD: widened to whole 4 KiB groups, as
    // every write to a VHD child is); nothing where the chains agree.
    let h = held(c);
    for (s, (&h, (&o, &w))) in h.iter().zip(own.iter().zip(&want)).enumerate() {
        let group = s / 8 * 8..s / 8 * 8 + 8;
        let widened = fmt == Fmt::Vhd && group.clone().any(|g| own[g] || want[g]);
        assert!(h == (o || w) || (widened && h), "{fmt:?}: sector {s}");
    }
    let full = SIZE / SECTOR;
    let n = h.iter().filter(|&&h| h).count() as u64;
    assert!(n < full / 2, "{fmt:?}: {n} of {full} sectors allocated");
}

fn onto_other_base(fmt: Fmt) {
    let d = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        d.path().join(format!("a.{}", fmt.ext())),
        d.path().join(format!("b.{}", fmt.ext())),
        d.path().join(format!("c.{}", fmt.ext())),
    );
    let (ma, mb) = bases(fmt, &a, &b, SIZE);
    let (mc, own) = child(fmt, &c, &a, &ma);
    // A grandchild over C stays linked through the rebase.
    let g = d.path().join(format!("g.{}", fmt.ext()));
    drop(create_child(fmt, &g, &c, &format!(".\\c.{}", fmt.ext())));
    // (libvhdi misreads the layers below a VHDX child that holds no block at all.)
    let mut mg = mc.clone();
    let gd = Disk::open(&g, &OpenOptions::new()).unwrap();
    put(&gd, &mut mg, 12 * MIB, &fill(50, 4096));
    gd.flush().unwrap();
    drop(gd);
    assert_reads(&g, &mg, &[g.clone(), c.clone(), a.clone()]);
    rebase_and_check(fmt, &c, (&mc, &own), &ma, std::slice::from_ref(&b), &mb);
    assert_reads(&g, &mg, &[g.clone(), c.clone(), b.clone()]);
    // The ranges where A and B agree were not copied.
    let h = held(&c);
    assert!(h[..(2 * MIB / SECTOR) as usize].iter().all(|&h| !h));
    let r = (6 * MIB / SECTOR) as usize..(8 * MIB / SECTOR) as usize;
    assert!(h[r].iter().all(|&h| !h));
    let r = (8 * MIB / SECTOR) as usize..(9 * MIB / SECTOR) as usize;
    let n = h[r].iter().filter(|&&h| h).count();
    assert_eq!(n, if fmt == Fmt::Vhd { 8 } else { 1 }, "{fmt:?}");
    // A is no longer needed.
    std::fs::remove_file(&a).unwrap();
    assert_reads(&c, &mc, &[c.clone(), b]);
}

#[test]
fn vhd_child_rebased_onto_another_base_copying() {
    onto_other_base(Fmt::Vhd);
}

#[test]
fn vhdx_child_rebased_onto_another_base_copying() {
    onto_other_base(Fmt::Vhdx);
}

/// The new parent is itself a differencing image (B2 over B).
fn onto_a_differencing_parent(fmt: Fmt) {
    let d = tempfile::tempdir().unwrap();
    let (a, b, b2, c) = (
        d.path().join(format!("a.{}", fmt.ext())),
        d.path().join(format!("b.{}", fmt.ext())),
        d.path().join(format!("b2.{}", fmt.ext())),
        d.path().join(format!("c.{}", fmt.ext())),
    );
    let (ma, mut mb) = bases(fmt, &a, &b, SIZE);
    drop(create_child(fmt, &b2, &b, &format!(".\\b.{}", fmt.ext())));
    let disk = Disk::open(&b2, &OpenOptions::new()).unwrap();
    // B2 makes [4M, 5M) agree with A again, and changes a piece of the equal range.
    put(
        &disk,
        &mut mb,
        4 * MIB,
        &ma[4 * MIB as usize..5 * MIB as usize],
    );
    put(&disk, &mut mb, MIB, &fill(40, 64 * 1024));
    disk.flush().unwrap();
    drop(disk);
    let (mc, own) = child(fmt, &c, &a, &ma);
    let before = held(&c);
    rebase_and_check(fmt, &c, (&mc, &own), &ma, &[b2.clone(), b.clone()], &mb);
    let h = held(&c);
    // [4M, 5M) now agrees: only what C held there before.
    let r = (4 * MIB / SECTOR) as usize..(5 * MIB / SECTOR) as usize;
    assert_eq!(h[r.clone()], before[r]);
}

#[test]
fn vhd_child_rebased_onto_a_differencing_chain() {
    onto_a_differencing_parent(Fmt::Vhd);
}

#[test]
fn vhdx_child_rebased_onto_a_differencing_chain() {
    onto_a_differencing_parent(Fmt::Vhdx);
}

/// C over M over P rebased onto P (dropping M, qemu-img's usual use): only what M held is
/// copied; ranges read from P on both sides are skipped.
#[test]
fn dropping_a_middle_layer_copies_only_what_it_held() {
    for fmt in [Fmt::Vhd, Fmt::Vhdx] {
        let d = tempfile::tempdir().unwrap();
        let (paths, models) = build_chain(fmt, d.path(), 3, 300 + fmt as u64);
        let m_held = held(&paths[1]);
        let c_held = held(&paths[2]);
        let p = chain::rebase_with_progress(
            &paths[2],
            &paths[0],
            &RebaseOptions::default(),
            &mut |_| {},
        )
        .unwrap();
        assert_reads(&paths[2], &models[2], &[paths[2].clone(), paths[0].clone()]);
        check_clean(fmt, &paths[2]);
        // Nothing outside what M held was copied, and the copies fit in it.
        let h = held(&paths[2]);
        for s in 0..h.len() {
            let group = s / 8 * 8..s / 8 * 8 + 8;
            let near = |v: &[bool]| group.clone().any(|g| v[g]);
            if h[s] && !c_held[s] {
                assert!(
                    m_held[s] || (fmt == Fmt::Vhd && near(&m_held)),
                    "{fmt:?}: sector {s}"
                );
            }
        }
        let m_bytes = m_held.iter().filter(|&&x| x).count() as u64 * SECTOR;
        assert!(p.copied <= m_bytes, "{fmt:?}: {} > {m_bytes}", p.copied);
    }
}

/// A VHDX parent smaller than the child reads zeros past its end (as qemu-img treats a
/// shorter backing file): what A has there is copied. A VHD parent may not be smaller.
#[test]
fn smaller_new_parent() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        d.path().join("a.vhdx"),
        d.path().join("b.vhdx"),
        d.path().join("c.vhdx"),
    );
    let (ma, mb) = bases(Fmt::Vhdx, &a, &b, 8 * MIB);
    let (mc, own) = child(Fmt::Vhdx, &c, &a, &ma);
    rebase_and_check(Fmt::Vhdx, &c, (&mc, &own), &ma, &[b], &mb);
    let h = held(&c);
    assert!(h[((SIZE - MIB) / SECTOR) as usize..].iter().all(|&h| h));

    let (a, b, c) = (
        d.path().join("a.vhd"),
        d.path().join("b.vhd"),
        d.path().join("c.vhd"),
    );
    let (ma, _) = bases(Fmt::Vhd, &a, &b, 8 * MIB);
    child(Fmt::Vhd, &c, &a, &ma);
    let bytes = std::fs::read(&c).unwrap();
    let e = chain::rebase(&c, &b, &RebaseOptions::default()).unwrap_err();
    assert!(matches!(e, ChainError::Geometry { .. }), "{e:?}");
    assert!(e.to_string().contains("fewer than the child's"), "{e}");
    assert_eq!(std::fs::read(&c).unwrap(), bytes);
}

/// A missing old parent, a new parent whose chain holds the child, a base image: refused
/// with the cause named, nothing written.
#[test]
fn copying_refusals_write_nothing() {
    for fmt in [Fmt::Vhd, Fmt::Vhdx] {
        let d = tempfile::tempdir().unwrap();
        let (paths, _) = build_chain(fmt, d.path(), 3, 400 + fmt as u64);
        let bytes: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
        let copying = RebaseOptions::default();

        // l1 onto l2, its own child: l1 is in l2's chain.
        let e = chain::rebase(&paths[1], &paths[2], &copying).unwrap_err();
        assert!(matches!(e, ChainError::RebaseRefused { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("in the chain of") && msg.contains("own parent"),
            "{msg}"
        );
        // A base image has no parent.
        let other = d.path().join(format!("other.{}", fmt.ext()));
        drop(create_base(fmt, &other, SIZE));
        let e = chain::rebase(&paths[0], &other, &copying).unwrap_err();
        assert!(e.to_string().contains("not a differencing image"), "{e}");

        // l2's old parent l1 is gone: the copying rebase needs it; -u does not read it.
        let gone = d.path().join("elsewhere");
        std::fs::rename(&paths[1], &gone).unwrap();
        let e = chain::rebase(&paths[2], &paths[0], &copying).unwrap_err();
        assert!(matches!(e, ChainError::RebaseOldChain { .. }), "{e:?}");
        let line = block_io::Error::from(e).chain_string();
        let name = paths[1].file_name().unwrap().to_string_lossy().to_string();
        assert!(
            line.contains("current parent chain") && line.contains(&name),
            "{line}"
        );
        std::fs::rename(&gone, &paths[1]).unwrap();
        for (p, b) in paths.iter().zip(&bytes) {
            assert_eq!(&std::fs::read(p).unwrap(), b, "{}", p.display());
        }
    }
}
