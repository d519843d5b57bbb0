//! `meta_ops::convert_layers`: a differencing chain converted layer by layer. Every depth of
//! the new chain must read as the same depth of the old one (our reader, and libvhdi for VHD
//! outputs: it misreads some VHDX differencing layers, so it is the oracle on VHD only), each
//! link must verify, each layer must hold about what its source layer holds, and a failure
//! or refusal must leave no file behind.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use block_io::testing::pyvhdi;
use block_io::{BlockDevice, BlockStatus, DiskInfo, FileStorage, StatusRun};
use chain::{Disk, Format, LinkCheck};
use meta_ops::layers::{layer_paths, LayersProgress};
use meta_ops::{convert_layers, convert_layers_to, LayersError, LayersOptions};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;

fn pattern(tag: u64, len: usize) -> Vec<u8> {
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn ro() -> chain::OpenOptions {
    chain::OpenOptions::new().read_only(true)
}

/// A 3-deep VHDX chain in `dir` with `sector`-byte logical sectors, top first: a base with
/// data; a middle child with partial blocks, a ZERO block and a partial zero range over the
/// base's data; a top with a full block, sub-4 KiB writes and an UNMAPPED block over data.
fn vhdx_chain(dir: &Path, sector: u32) -> Vec<PathBuf> {
    let base = dir.join("base.vhdx");
    let mid = dir.join("mid.vhdx");
    let top = dir.join("top.vhdx");
    let mut o = vhdx_format::CreateOptions::dynamic(SIZE);
    o.block_size = Some(MIB as u32);
    o.logical_sector_size = sector;
    let b = vhdx_format::create(FileStorage::create(&base).unwrap(), &o).unwrap();
    b.write_at(&pattern(1, 6 * MIB as usize), 0).unwrap();
    b.write_at(&pattern(2, MIB as usize), 8 * MIB).unwrap();
    b.write_at(&pattern(3, 4096), SIZE - 4096).unwrap();
    b.close().unwrap();
    drop(b);
    let s = sector as u64;
    let child = |path: &Path, parent: &Path, writes: &dyn Fn(&dyn BlockDevice)| {
        let l = chain::open_layer(parent, None, true, false).unwrap();
        let chain::Identity::Vhdx {
            data_write_guid, ..
        } = l.identity
        else {
            panic!("not a VHDX")
        };
        drop(l);
        let (rel, abs) = chain::parent_paths(path, parent).unwrap();
        let mut o = vhdx_format::CreateOptions::differencing(
            SIZE,
            vhdx_format::ParentRef {
                data_write_guid,
                relative_path: rel,
                absolute_path: Some(abs.display().to_string()),
            },
        );
        o.logical_sector_size = sector;
        let f = vhdx_format::create(FileStorage::create(path).unwrap(), &o).unwrap();
        writes(&f);
        f.close().unwrap();
    };
    child(&mid, &base, &|f| {
        // Partial blocks: single sectors and a few KiB inside the first block.
        f.write_at(&pattern(10, s as usize), MIB + 3 * s).unwrap();
        f.write_at(&pattern(11, 3 * s as usize), 7 * s).unwrap();
        // A whole 2 MiB block of zeros over base data: a ZERO block.
        f.write_zeroes(2 * MIB, 2 * MIB, false).unwrap();
        // A partial zero range over base data: zeros stored in a partial block.
        f.write_zeroes(5 * MIB + 2 * s, 2 * s, false).unwrap();
        // Data where the base has none.
        f.write_at(&pattern(12, 64 << 10), 12 * MIB).unwrap();
    });
    child(&top, &mid, &|f| {
        f.write_at(&pattern(20, 2 * MIB as usize), 6 * MIB).unwrap();
        f.write_at(&pattern(21, s as usize), 2 * MIB + 5 * s)
            .unwrap();
        f.write_at(&pattern(22, s as usize), 5 * MIB + 2 * s)
            .unwrap();
        // An UNMAPPED block over the base's data at 8 MiB: reads as zeros in our reader.
        f.discard(8 * MIB, 2 * MIB).unwrap();
    });
    // The structures asked for are there.
    let m = chain::open_layer(&mid, None, true, false).unwrap();
    assert_eq!(
        m.dev.block_status(2 * MIB, 2 * MIB).unwrap().status,
        BlockStatus::Zero
    );
    let r = m.dev.block_status(MIB, MIB).unwrap();
    assert_eq!((r.status, r.len), (BlockStatus::Unallocated, 3 * s));
    let t = chain::open_layer(&top, None, true, false).unwrap();
    assert_eq!(
        t.dev.block_status(8 * MIB, 2 * MIB).unwrap().status,
        BlockStatus::Zero
    );
    vec![top, mid, base]
}

/// A 3-deep VHD chain in `dir`, top first, with sub-4 KiB writes in both children.
fn vhd_chain(dir: &Path) -> Vec<PathBuf> {
    let base = dir.join("base.vhd");
    let mid = dir.join("mid.vhd");
    let top = dir.join("top.vhd");
    let o = vhd_format::CreateOptions::new(SIZE, vhd_format::Subformat::Dynamic);
    let b = vhd_format::VhdFile::create(FileStorage::create(&base).unwrap(), &o).unwrap();
    b.write_at(&pattern(1, 5 * MIB as usize), MIB).unwrap();
    b.flush().unwrap();
    drop(b);
    let child = |path: &Path, parent: &Path, writes: &dyn Fn(&dyn BlockDevice)| {
        let ps = FileStorage::open(parent, &block_io::OpenOptions::new().read_only(true)).unwrap();
        let details = vhd_format::read_details(ps).unwrap();
        let (rel, abs) = chain::parent_paths(path, parent).unwrap();
        let abs = abs.display().to_string();
        let o = vhd_format::DifferencingOptions::for_parent(
            &details,
            abs.clone(),
            Some(abs),
            Some(rel),
        );
        let f = vhd_format::VhdFile::create_differencing(FileStorage::create(path).unwrap(), &o)
            .unwrap();
        writes(&f);
        f.flush().unwrap();
    };
    child(&mid, &base, &|f| {
        f.write_at(&pattern(10, 512), MIB + 1536).unwrap();
        f.write_at(&pattern(11, 3 << 20), 3 * MIB).unwrap();
        // Zeros over the base's data, stored in the child.
        f.write_zeroes(2 * MIB, MIB, false).unwrap();
    });
    child(&top, &mid, &|f| {
        f.write_at(&pattern(20, 1024), 4 * MIB + 512).unwrap();
        f.write_at(&pattern(21, MIB as usize), 10 * MIB).unwrap();
    });
    vec![top, mid, base]
}

/// The chain from `top` read whole by our reader; asserts it has `depth` layers, all links
/// verified, every layer but the base differencing.
fn read_chain(top: &Path, depth: usize) -> Vec<u8> {
    let d = Disk::open(top, &ro()).unwrap();
    assert_eq!(d.layers().len(), depth, "{}", top.display());
    assert!(d.links().iter().all(|l| *l == LinkCheck::Verified));
    for (i, l) in d.layers().iter().enumerate() {
        assert_eq!(l.parent.is_some(), i + 1 < depth, "{}", l.path.display());
    }
    let mut buf = vec![0u8; d.info().virtual_size as usize];
    d.read_at(&mut buf, 0).unwrap();
    buf
}

/// Bytes a layer holds itself: data, and (in a differencing layer) zeros over its parent.
fn own_bytes(path: &Path) -> u64 {
    let l = chain::open_layer(path, None, true, false).unwrap();
    let size = l.dev.info().virtual_size;
    let mut pos = 0;
    let mut own = 0;
    while pos < size {
        let r = l.dev.block_status(pos, size - pos).unwrap();
        if r.status == BlockStatus::Data || (r.status == BlockStatus::Zero && l.parent.is_some()) {
            own += r.len;
        }
        pos += r.len;
    }
    own
}

/// Bytes of the `bs`-byte blocks that a base layer's data touches.
fn own_bytes_in_blocks(path: &Path, bs: u64) -> u64 {
    let l = chain::open_layer(path, None, true, false).unwrap();
    let size = l.dev.info().virtual_size;
    let mut touched = vec![false; size.div_ceil(bs) as usize];
    let mut pos = 0;
    while pos < size {
        let r = l.dev.block_status(pos, size - pos).unwrap();
        if r.status == BlockStatus::Data {
            for b in pos / bs..=(pos + r.len - 1) / bs {
                touched[b as usize] = true;
            }
        }
        pos += r.len;
    }
    touched.iter().filter(|&&t| t).count() as u64 * bs
}

/// A VHD or VHDX image's block size.
fn block_size(path: &Path) -> u64 {
    let s = FileStorage::open(path, &block_io::OpenOptions::new().read_only(true)).unwrap();
    match chain::detect(&s).unwrap() {
        Format::Vhd => u64::from(vhd_format::read_details(s).unwrap().block_size.unwrap()),
        _ => {
            let o = vhdx_format::OpenOptions::new().read_only(true);
            u64::from(
                vhdx_format::VhdxFile::open(s, &o)
                    .unwrap()
                    .details()
                    .block_size,
            )
        }
    }
}

/// The files in `dir`, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Converts the chain `old` (top first) to `format` at `dir/new.EXT` and checks every depth.
fn convert_and_check(dir: &Path, old: &[PathBuf], format: Format) -> Vec<PathBuf> {
    let ext = format.name();
    let dst = dir.join(format!("new.{ext}"));
    let calls = Arc::new(AtomicU64::new(0));
    let last = Arc::new(AtomicU64::new(0));
    let mut o = LayersOptions::new(format);
    let (c, l) = (calls.clone(), last.clone());
    o.progress = Some(Arc::new(move |p: &LayersProgress| {
        c.fetch_add(1, Ordering::Relaxed);
        assert!(p.done_bytes <= p.total_bytes);
        assert_eq!(p.layers, 3);
        l.store(p.done_bytes, Ordering::Relaxed);
    }));
    let src = Disk::open(&old[0], &ro()).unwrap();
    let report = convert_layers(&src, &dst, &o).unwrap();
    drop(src);
    let new = layer_paths(&dst, old.len(), format);
    assert_eq!(
        report
            .layers
            .iter()
            .map(|l| l.path.clone())
            .collect::<Vec<_>>(),
        new
    );
    assert_eq!(
        new[1].file_name().unwrap().to_str().unwrap(),
        format!("new-1.{ext}")
    );
    assert!(calls.load(Ordering::Relaxed) > 0);
    for depth in 0..old.len() {
        let want = read_chain(&old[depth], old.len() - depth);
        let got = read_chain(&new[depth], old.len() - depth);
        assert!(
            got == want,
            "depth {depth}: {} differs",
            new[depth].display()
        );
        let (o_own, n_own) = (own_bytes(&old[depth]), own_bytes(&new[depth]));
        if depth + 1 < old.len() {
            // VHD children widen sub-4 KiB runs to 4 KiB groups; nothing else is added.
            assert!(
                n_own >= o_own && n_own <= o_own + 64 * 1024,
                "depth {depth}: {n_own} bytes held, the source layer {o_own}"
            );
            assert!(
                n_own < SIZE / 2,
                "depth {depth} holds {n_own} bytes: not a flattened copy"
            );
        } else {
            // A base is allocated in whole blocks, of each format's default size: at most
            // the new blocks the old base's data touches.
            let bs = block_size(&new[depth]);
            let most = own_bytes_in_blocks(&old[depth], bs);
            assert!(
                n_own <= most,
                "base: {n_own} bytes held, the source's data in {bs}-byte blocks {most}"
            );
        }
        if format == Format::Vhd {
            let s = FileStorage::open(&new[depth], &block_io::OpenOptions::new().read_only(true))
                .unwrap();
            let r = vhd_format::check_storage(&s).unwrap();
            assert!(r.is_clean(), "{}: {:?}", new[depth].display(), r.issues);
            if pyvhdi() {
                let lib = read_with_libvhdi(&new[depth..]);
                assert!(lib == want, "libvhdi reads depth {depth} differently");
            }
        }
    }
    // Sources untouched and no temporary file left.
    assert!(
        files(dir).iter().all(|f| !f.ends_with(".tmp")),
        "{:?}",
        files(dir)
    );
    new
}

#[test]
fn vhdx_chain_to_vhd_and_vhdx() {
    let dir = tempfile::tempdir().unwrap();
    let old = vhdx_chain(dir.path(), 512);
    let new = convert_and_check(dir.path(), &old, Format::Vhd);
    // The middle child's ZERO block and zero range became zeros stored in the VHD child.
    let l = chain::open_layer(&new[1], None, true, false).unwrap();
    assert_eq!(
        l.dev.block_status(2 * MIB, 2 * MIB).unwrap().status,
        BlockStatus::Data
    );
    // Sub-4 KiB writes were widened to their 4 KiB group; the rest stays transparent.
    assert_eq!(
        l.dev.block_status(MIB, 4096).unwrap().status,
        BlockStatus::Data
    );
    assert_eq!(
        l.dev.block_status(MIB + 4096, 512).unwrap().status,
        BlockStatus::Unallocated
    );
    drop(l);
    // VHDX to VHDX keeps the ZERO block as one.
    let sub = dir.path().join("x");
    std::fs::create_dir(&sub).unwrap();
    let new = convert_and_check(&sub, &old, Format::Vhdx);
    let l = chain::open_layer(&new[1], None, true, false).unwrap();
    let r = l.dev.block_status(2 * MIB, 2 * MIB).unwrap();
    assert_eq!((r.status, r.len), (BlockStatus::Zero, 2 * MIB));
}

#[test]
fn vhdx_chain_with_4k_sectors_to_vhd() {
    let dir = tempfile::tempdir().unwrap();
    let old = vhdx_chain(dir.path(), 4096);
    convert_and_check(dir.path(), &old, Format::Vhd);
}

#[test]
fn vhd_chain_to_vhdx() {
    let dir = tempfile::tempdir().unwrap();
    let old = vhd_chain(dir.path());
    let new = convert_and_check(dir.path(), &old, Format::Vhdx);
    for p in &new {
        let l = chain::open_layer(p, None, true, false).unwrap();
        assert_eq!(l.format, Format::Vhdx);
        assert_eq!(l.dev.info().logical_sector_size, 512);
    }
}

#[test]
fn block_size_applies_to_every_layer() {
    let dir = tempfile::tempdir().unwrap();
    let old = vhd_chain(dir.path());
    let dst = dir.path().join("n.vhdx");
    let mut o = LayersOptions::new(Format::Vhdx);
    o.block_size = Some(4 << 20);
    let src = Disk::open(&old[0], &ro()).unwrap();
    convert_layers(&src, &dst, &o).unwrap();
    for p in layer_paths(&dst, 3, Format::Vhdx) {
        let s = FileStorage::open(&p, &block_io::OpenOptions::new().read_only(true)).unwrap();
        let f = vhdx_format::VhdxFile::open(s, &vhdx_format::OpenOptions::new().read_only(true))
            .unwrap();
        assert_eq!(f.details().block_size, 4 << 20, "{}", p.display());
    }
}

/// Runs a convert of the VHDX chain that must fail, and checks that `dir` holds only what it
/// held before.
fn fails_leaving_nothing(dir: &Path, src: &Disk, dst: &Path, o: &LayersOptions) -> LayersError {
    let before = files(dir);
    let e = convert_layers(src, dst, o).unwrap_err();
    assert_eq!(files(dir), before, "{e}");
    e
}

#[test]
fn refusals_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let old = vhdx_chain(dir.path(), 512);
    let src = Disk::open(&old[0], &ro()).unwrap();
    let d = dir.path();
    let e = fails_leaving_nothing(d, &src, &d.join("r.raw"), &LayersOptions::new(Format::Raw));
    assert!(matches!(e, LayersError::RawTarget), "{e}");
    assert!(e.to_string().contains("no parent link"), "{e}");
    // The top itself, a parent through a symlink, and a parent as a derived name.
    std::os::unix::fs::symlink(&old[1], d.join("link.vhd")).unwrap();
    std::fs::hard_link(&old[2], d.join("top-2.vhd")).unwrap();
    for dst in [old[0].clone(), d.join("link.vhd"), d.join("top.vhd")] {
        let e = fails_leaving_nothing(d, &src, &dst, &LayersOptions::new(Format::Vhd));
        assert!(matches!(e, LayersError::DestinationIsSource(_)), "{e}");
    }
    // A derived name that exists.
    std::fs::write(d.join("n-2.vhd"), b"mine").unwrap();
    let e = fails_leaving_nothing(d, &src, &d.join("n.vhd"), &LayersOptions::new(Format::Vhd));
    match &e {
        LayersError::DestinationExists(p) => assert!(p.ends_with("n-2.vhd")),
        e => panic!("{e}"),
    }
    assert_eq!(std::fs::read(d.join("n-2.vhd")).unwrap(), b"mine");
    drop(src);
    // A VHDX child larger than its parent has no VHD form.
    let big = d.join("big.vhdx");
    let l = chain::open_layer(&old[0], None, true, false).unwrap();
    let chain::Identity::Vhdx {
        data_write_guid, ..
    } = l.identity
    else {
        panic!()
    };
    drop(l);
    let (rel, abs) = chain::parent_paths(&big, &old[0]).unwrap();
    let o = vhdx_format::CreateOptions::differencing(
        2 * SIZE,
        vhdx_format::ParentRef {
            data_write_guid,
            relative_path: rel,
            absolute_path: Some(abs.display().to_string()),
        },
    );
    vhdx_format::create(FileStorage::create(&big).unwrap(), &o)
        .unwrap()
        .close()
        .unwrap();
    let src = Disk::open(&big, &ro()).unwrap();
    let e = fails_leaving_nothing(d, &src, &d.join("b.vhd"), &LayersOptions::new(Format::Vhd));
    assert!(matches!(e, LayersError::ChildLarger { .. }), "{e}");
    // As VHDX it converts.
    convert_layers(&src, &d.join("b.vhdx"), &LayersOptions::new(Format::Vhdx)).unwrap();
    assert!(read_chain(&d.join("b.vhdx"), 4) == read_chain(&big, 4));
}

/// A source layer whose reads fail from `fail_at` on.
struct FailingReads {
    inner: Arc<dyn BlockDevice>,
    fail_at: u64,
}

impl std::fmt::Debug for FailingReads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FailingReads")
    }
}

impl BlockDevice for FailingReads {
    fn info(&self) -> DiskInfo {
        self.inner.info()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> block_io::Result<()> {
        if offset + buf.len() as u64 > self.fail_at {
            return Err(block_io::Error::new(
                block_io::ErrorKind::Io,
                "injected read error",
            ));
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> block_io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> block_io::Result<()> {
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> block_io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> block_io::Result<()> {
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> block_io::Result<StatusRun> {
        self.inner.block_status(offset, len)
    }
}

#[test]
fn failures_mid_way_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let old = vhdx_chain(d, 512);
    // A read error in the middle layer, after the base was built.
    let mut layers: Vec<chain::Layer> = Disk::open(&old[0], &ro()).unwrap().layers().to_vec();
    layers[1].dev = Arc::new(FailingReads {
        inner: layers[1].dev.clone(),
        fail_at: 10 * MIB,
    });
    let src = Disk::from_layers(layers, false).unwrap();
    for format in [Format::Vhd, Format::Vhdx] {
        let seen = Arc::new(AtomicU64::new(0));
        let mut o = LayersOptions::new(format);
        let s = seen.clone();
        o.progress = Some(Arc::new(move |p: &LayersProgress| {
            s.fetch_max(p.layers as u64 - p.layer as u64, Ordering::Relaxed);
        }));
        let dst = d.join(format!("new.{}", format.name()));
        let e = fails_leaving_nothing(d, &src, &dst, &o);
        match &e {
            LayersError::Read { layer, offset, .. } => {
                assert_eq!(layer, &old[1]);
                assert!(*offset >= 10 * MIB - MIB, "{e}");
            }
            e => panic!("{e}"),
        }
        // The base was done and the middle started before the failure.
        assert_eq!(seen.load(Ordering::Relaxed), 2);
    }
    drop(src);

    // Cancelled while the middle layer is written.
    let src = Disk::open(&old[0], &ro()).unwrap();
    let cancel = Arc::new(AtomicBool::new(false));
    let mut o = LayersOptions::new(Format::Vhd);
    o.cancel = Some(cancel.clone());
    o.progress = Some(Arc::new(move |p: &LayersProgress| {
        if p.layer == 1 {
            cancel.store(true, Ordering::Relaxed);
        }
    }));
    let e = fails_leaving_nothing(d, &src, &d.join("new.vhd"), &o);
    assert!(matches!(e, LayersError::Cancelled), "{e}");

    // A file appears under a final name while the layers are built: the renames stop there,
    // the layers renamed already are removed, and the intruder is kept.
    let intruder = d.join("new-1.vhd");
    let i2 = intruder.clone();
    let mut o = LayersOptions::new(Format::Vhd);
    o.progress = Some(Arc::new(move |p: &LayersProgress| {
        if p.layer == 0 && !i2.exists() {
            std::fs::write(&i2, b"not yours").unwrap();
        }
    }));
    let before = files(d);
    let e = convert_layers(&src, &d.join("new.vhd"), &o).unwrap_err();
    match &e {
        LayersError::DestinationExists(p) => assert_eq!(p, &intruder),
        e => panic!("{e}"),
    }
    let mut want = before;
    want.push("new-1.vhd".into());
    want.sort();
    assert_eq!(files(d), want);
    assert_eq!(std::fs::read(&intruder).unwrap(), b"not yours");
}

#[test]
fn one_layer_is_a_plain_convert() {
    let dir = tempfile::tempdir().unwrap();
    let old = vhd_chain(dir.path());
    let src = Disk::open(&old[2], &ro()).unwrap();
    let dst = dir.path().join("single.vhdx");
    let r = convert_layers(&src, &dst, &LayersOptions::new(Format::Vhdx)).unwrap();
    assert_eq!(r.layers.len(), 1);
    assert!(!r.layers[0].differencing);
    assert!(read_chain(&dst, 1) == read_chain(&old[2], 1));
}

#[test]
fn named_layers_must_fit_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let old = vhdx_chain(dir.path(), 512);
    let src = Disk::open(&old[0], &ro()).unwrap();
    let d = dir.path();
    let o = LayersOptions::new(Format::Vhd);
    let before = files(d);
    let names = |e: LayersError| match e {
        LayersError::Names(m) => m,
        e => panic!("{e}"),
    };
    // One name too few, and a layer in another folder: refused before anything is made.
    let few = vec![d.join("a.vhd"), d.join("a-1.vhd")];
    let m = names(convert_layers_to(&src, &few, &o).unwrap_err());
    assert!(m.contains("2 names for 3 layers"), "{m}");
    let sub = d.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let spread = vec![d.join("a.vhd"), sub.join("a-1.vhd"), d.join("a-2.vhd")];
    let m = names(convert_layers_to(&src, &spread, &o).unwrap_err());
    assert!(m.contains("one folder"), "{m}");
    std::fs::remove_dir(&sub).unwrap();
    assert_eq!(files(d), before);
    // Names of one's own choosing: the chain links through them.
    let mine = vec![d.join("top.vhd"), d.join("mid.vhd"), d.join("bottom.vhd")];
    let r = convert_layers_to(&src, &mine, &o).unwrap();
    let made: Vec<_> = r.layers.iter().map(|l| l.path.clone()).collect();
    assert_eq!(made, mine);
    drop(src);
    assert_eq!(read_chain(&mine[0], 3), read_chain(&old[0], 3));
}

/// The chain from `layers[0]` (top first) as libvhdi reads it.
fn read_with_libvhdi(layers: &[PathBuf]) -> Vec<u8> {
    let base_first: Vec<&Path> = layers.iter().rev().map(PathBuf::as_path).collect();
    block_io::testing::pyvhdi_read(&base_first, SIZE).unwrap()
}
