//! `meta_ops::split`: a base image (raw, VHDX, or a chain) cut into a chain of differencing
//! layers. Oracles: libvhdi (pyvhdi) reads a split VHD chain from its top and must give the
//! source's bytes (see `split_and_check` for why not a VHDX one); `qemu-img compare` compares the source with the chain flattened; `qemu-img
//! check` checks the bottom layer (qemu opens no differencing VHD or VHDX). Per layer, the
//! block status says which blocks each holds: every data block in exactly one layer, the hot
//! ones in layer 0, holes in none.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use block_io::testing::{oracle, pyvhdi};
use block_io::{BlockDevice, BlockStatus, FileStorage, LockMode};
use meta_ops::split::{parse_hot_list, read_hot_list, HotRange};
use meta_ops::{split, SplitError, SplitFormat, SplitOptions};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 24 * MIB;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

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

/// The writes of the source: (offset, length); blocks 3, 6, 10, 11 and 17.. stay holes.
const WRITES: &[(u64, u64)] = &[
    (0, MIB),
    (MIB + 4096, 8192),
    (2 * MIB, MIB),
    (4 * MIB, 2 * MIB),
    (7 * MIB + 512, 512),
    (8 * MIB, 2 * MIB),
    (12 * MIB, 5 * MIB),
    (SIZE - 4096, 4096),
];

/// A sparse raw source with [`WRITES`], and its bytes.
fn raw_source(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("src.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(SIZE).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    for (i, &(off, len)) in WRITES.iter().enumerate() {
        let d = pattern(i as u64 + 1, len as usize);
        std::os::unix::fs::FileExt::write_all_at(&f, &d, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&d);
    }
    (path, model)
}

/// Blocks (of 1 MiB) holding data in the model.
fn data_blocks(model: &[u8]) -> Vec<bool> {
    model
        .chunks(MIB as usize)
        .map(|c| c.iter().any(|&b| b != 0))
        .collect()
}

/// Which 1 MiB blocks each layer holds, by its own block status.
fn layer_blocks(path: &Path) -> Vec<bool> {
    let l = chain::open_layer_with(
        path,
        None,
        &chain::LayerOptions {
            read_only: true,
            parent: true,
            ..Default::default()
        },
    )
    .unwrap();
    let size = l.dev.info().virtual_size;
    assert_eq!(size, SIZE);
    (0..SIZE / MIB)
        .map(|b| {
            let mut pos = b * MIB;
            let mut any = false;
            while pos < (b + 1) * MIB {
                let r = l.dev.block_status(pos, (b + 1) * MIB - pos).unwrap();
                any |= r.status == BlockStatus::Data;
                pos += r.len;
            }
            any
        })
        .collect()
}

/// The chain opened from its top by our reader, written to a raw file.
fn flatten(top: &Path, out: &Path) -> Vec<u8> {
    let d = chain::Disk::open(top, &chain::OpenOptions::new().read_only(true)).unwrap();
    let mut buf = vec![0u8; SIZE as usize];
    d.read_at(&mut buf, 0).unwrap();
    std::fs::write(out, &buf).unwrap();
    buf
}

/// Splits `src` into `n` layers and checks everything against `model`; returns the layers'
/// block sets.
fn split_and_check(
    dir: &Path,
    src: &Path,
    model: &[u8],
    fmt: SplitFormat,
    n: usize,
    hot: Vec<HotRange>,
) -> Vec<Vec<bool>> {
    let mut o = SplitOptions::new(n, dir.join(format!("out-{n}")));
    o.format = fmt;
    o.block_size = MIB as u32;
    o.hot = hot;
    let calls = Arc::new(AtomicU64::new(0));
    let last = Arc::new(AtomicU64::new(0));
    let (c2, l2) = (calls.clone(), last.clone());
    o.progress = Some(Arc::new(move |p| {
        c2.fetch_add(1, Ordering::Relaxed);
        assert!(p.done_bytes <= p.total_bytes);
        l2.store(p.done_bytes, Ordering::Relaxed);
    }));
    let report = split(src, &o).unwrap();
    let paths = o.layer_paths();
    assert_eq!(report.layers.len(), n);
    let wanted = data_blocks(model);
    let nblocks = wanted.iter().filter(|&&b| b).count() as u64;
    assert_eq!(report.data_blocks, nblocks);
    assert_eq!(calls.load(Ordering::Relaxed), nblocks);
    assert_eq!(last.load(Ordering::Relaxed), report.data_bytes);
    assert_eq!(report.layers.iter().map(|l| l.blocks).sum::<u64>(), nblocks);

    // Each data block in exactly one layer, holes in none.
    let sets: Vec<Vec<bool>> = paths.iter().map(|p| layer_blocks(p)).collect();
    for (b, &want) in wanted.iter().enumerate() {
        let holders = sets.iter().filter(|s| s[b]).count();
        assert_eq!(
            holders,
            usize::from(want),
            "block {b}: {holders} layers hold it"
        );
    }
    for (l, set) in report.layers.iter().zip(&sets) {
        assert!(l.blocks > 0);
        assert_eq!(set.iter().filter(|&&b| b).count() as u64, l.blocks);
    }

    // Our reader, then the oracles.
    let flat = dir.join(format!("flat-{n}.raw"));
    assert!(
        flatten(paths.last().unwrap(), &flat) == model,
        "our chain read differs"
    );
    if oracle("qemu-img") {
        let src_raw = dir.join("model.raw");
        std::fs::write(&src_raw, model).unwrap();
        run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", s(&src_raw), s(&flat)],
        );
        // The bottom layer is a dynamic image qemu opens; it checks clean.
        let f = match fmt {
            SplitFormat::Vhdx => "vhdx",
            SplitFormat::Vhd => "vpc",
        };
        if fmt == SplitFormat::Vhdx {
            run("qemu-img", &["check", "-f", f, s(&paths[0])]);
        }
        // And it reads as the source where it holds blocks, zeros elsewhere.
        let bottom = dir.join(format!("bottom-{n}.raw"));
        run(
            "qemu-img",
            &["convert", "-f", f, "-O", "raw", s(&paths[0]), s(&bottom)],
        );
        let got = std::fs::read(&bottom).unwrap();
        for (b, &held) in sets[0].iter().enumerate() {
            let r = b * MIB as usize..(b + 1) * MIB as usize;
            if held {
                assert!(got[r.clone()] == model[r], "bottom block {b} differs");
            } else {
                assert!(got[r].iter().all(|&x| x == 0), "bottom block {b} not zero");
            }
        }
    }
    for p in &paths {
        chain_check(p, fmt);
    }
    // libvhdi (Debian's 20210425) only for VHD: on our VHDX differencing layers it reads
    // zeros for the sectors of a block absent from the top (PAYLOAD_BLOCK_NOT_PRESENT, to be
    // read from the parent) whose bits are set in the file's first bytes, the "vhdxfile"
    // signature, as if it took the block's sector bitmap from file offset 0. The layers
    // check clean and read right through our reader and the bottom through qemu.
    if fmt == SplitFormat::Vhd && pyvhdi() {
        let got = read_with_libvhdi(&paths);
        assert_eq!(got.len(), model.len());
        let bad: Vec<usize> = (0..model.len() / MIB as usize)
            .filter(|&b| {
                got[b * MIB as usize..][..MIB as usize] != model[b * MIB as usize..][..MIB as usize]
            })
            .collect();
        assert!(
            bad.is_empty(),
            "{fmt:?} x{n}: libvhdi reads blocks {bad:?} differently"
        );
    }
    sets
}

/// Our own checker on every layer (qemu-img cannot open differencing ones).
fn chain_check(p: &Path, fmt: SplitFormat) {
    let st = FileStorage::open(p, &block_io::OpenOptions::new().read_only(true)).unwrap();
    match fmt {
        SplitFormat::Vhdx => {
            let r = vhdx_format::check_image(st).unwrap();
            assert!(
                r.errors.is_empty() && !r.log_was_dirty,
                "{}: {r:?}",
                p.display()
            );
        }
        SplitFormat::Vhd => {
            let r = vhd_format::check_storage(&st).unwrap();
            assert!(r.is_clean(), "{}: {r:?}", p.display());
        }
    }
}

#[test]
fn raw_source_into_vhdx_and_vhd_layers_ascending() {
    let dir = tempfile::tempdir().unwrap();
    let (src, model) = raw_source(dir.path());
    for fmt in [SplitFormat::Vhdx, SplitFormat::Vhd] {
        let d = dir.path().join(fmt.extension());
        std::fs::create_dir(&d).unwrap();
        let sets = split_and_check(&d, &src, &model, fmt, 3, Vec::new());
        // Ascending: the first blocks at the bottom.
        let first: Vec<usize> = (0..sets[0].len()).filter(|&b| sets[0][b]).collect();
        assert_eq!(first[0], 0);
        let last_of_0 = *first.last().unwrap();
        for set in &sets[1..] {
            assert!(set.iter().enumerate().all(|(b, &h)| !h || b > last_of_0));
        }
    }
}

#[test]
fn hot_blocks_go_to_the_bottom_layer() {
    let dir = tempfile::tempdir().unwrap();
    let (src, model) = raw_source(dir.path());
    // Blocks 16, 9, 4 (and the hole 3, which stays a hole), then a sector of block 1.
    let hot = parse_hot_list(&format!(
        "# boot\n{} 4096\n{}+{}\n{} {}\n0x{:x} 512\n",
        16 * MIB,
        9 * MIB + 100,
        10,
        3 * MIB,
        MIB + 1,
        MIB + 4096
    ))
    .unwrap();
    for fmt in [SplitFormat::Vhdx, SplitFormat::Vhd] {
        let d = dir.path().join(fmt.extension());
        std::fs::create_dir(&d).unwrap();
        // 11 MiB of data in 3 layers: the hot blocks (3 MiB + 8 KiB), then block 0.
        let sets = split_and_check(&d, &src, &model, fmt, 3, hot.clone());
        let bottom: Vec<usize> = (0..sets[0].len()).filter(|&b| sets[0][b]).collect();
        assert_eq!(bottom, [0, 1, 4, 9, 16], "{fmt:?}");
        assert!(!sets.iter().any(|s| s[3]), "the hole stayed a hole");
    }
}

#[test]
fn vhdx_source_and_a_chain_source() {
    if !oracle("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (raw, model) = raw_source(dir.path());
    // A VHDX made by qemu-img.
    let vhdx = dir.path().join("src.vhdx");
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "vhdx", s(&raw), s(&vhdx)],
    );
    let d = dir.path().join("a");
    std::fs::create_dir(&d).unwrap();
    split_and_check(&d, &vhdx, &model, SplitFormat::Vhd, 2, Vec::new());

    // A chain: the first half of the writes in a base, the rest in a child.
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.vhdx");
    drop(vhdx_format::create_file(&base, &vhdx_format::CreateOptions::dynamic(SIZE)).unwrap());
    let write = |top: &Path, from: usize, to: usize| {
        let disk = chain::Disk::open(top, &chain::OpenOptions::new()).unwrap();
        for (i, &(off, len)) in WRITES.iter().enumerate().take(to).skip(from) {
            disk.write_at(&pattern(i as u64 + 1, len as usize), off)
                .unwrap();
        }
        disk.flush().unwrap();
    };
    write(&base, 0, 4);
    let l = chain::open_layer(&base, None, true, false).unwrap();
    let chain::Identity::Vhdx {
        data_write_guid, ..
    } = l.identity
    else {
        panic!()
    };
    drop(l);
    let (rel, abs) = chain::parent_paths(&child, &base).unwrap();
    drop(
        vhdx_format::create_file(
            &child,
            &vhdx_format::CreateOptions::differencing(
                SIZE,
                vhdx_format::ParentRef {
                    data_write_guid,
                    relative_path: rel,
                    absolute_path: Some(abs.display().to_string()),
                },
            ),
        )
        .unwrap(),
    );
    write(&child, 4, WRITES.len());
    let d = dir.path().join("b");
    std::fs::create_dir(&d).unwrap();
    split_and_check(&d, &child, &model, SplitFormat::Vhd, 5, Vec::new());
    let d = dir.path().join("c");
    std::fs::create_dir(&d).unwrap();
    split_and_check(&d, &child, &model, SplitFormat::Vhdx, 4, Vec::new());
}

#[test]
fn first_layer_size() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = raw_source(dir.path());
    let mut o = SplitOptions::new(3, dir.path().join("f"));
    o.block_size = MIB as u32;
    o.first_layer = Some(2 * MIB);
    let r = split(&src, &o).unwrap();
    // Blocks 0 and 1 (1 MiB + 8 KiB of data) reach 2 MiB only with block 2.
    assert_eq!(r.layers[0].blocks, 3);
    assert_eq!(r.layers[0].data_bytes, 2 * MIB + 8192);
    let rest: Vec<u64> = r.layers[1..].iter().map(|l| l.data_bytes).collect();
    let total: u64 = rest.iter().sum();
    assert!(rest.iter().all(|&b| b * 3 >= total), "unequal: {rest:?}");
}

#[test]
fn bad_requests_are_refused_with_their_cause() {
    let dir = tempfile::tempdir().unwrap();
    let (src, _) = raw_source(dir.path());
    let mk = |n: usize, prefix: &str| {
        let mut o = SplitOptions::new(n, dir.path().join(prefix));
        o.block_size = MIB as u32;
        o.lock = LockMode::Auto;
        o
    };
    assert!(matches!(
        split(&src, &mk(0, "z")),
        Err(SplitError::NoLayers)
    ));
    // 14 blocks hold data.
    match split(&src, &mk(15, "z")) {
        Err(
            e @ SplitError::TooManyLayers {
                layers: 15,
                blocks: 14,
            },
        ) => {
            assert!(e.to_string().contains("only 14 blocks"), "{e}")
        }
        r => panic!("{r:?}"),
    }
    let mut o = mk(2, "z");
    o.block_size = 3 << 20;
    assert!(matches!(split(&src, &o), Err(SplitError::BlockSize(_))));
    // A layer name that exists; nothing else is created.
    std::fs::write(dir.path().join("e-1.vhdx"), b"keep").unwrap();
    match split(&src, &mk(2, "e")) {
        Err(SplitError::DestinationExists(p)) => assert!(p.ends_with("e-1.vhdx")),
        r => panic!("{r:?}"),
    }
    assert!(!dir.path().join("e-0.vhdx").exists());
    assert_eq!(std::fs::read(dir.path().join("e-1.vhdx")).unwrap(), b"keep");
    // A layer name that is the source.
    let vsrc = dir.path().join("img-0.vhdx");
    let mut o = SplitOptions::new(1, dir.path().join("v"));
    o.block_size = MIB as u32;
    split(&src, &o).unwrap();
    std::fs::rename(dir.path().join("v-0.vhdx"), &vsrc).unwrap();
    match split(&vsrc, &mk(1, "img")) {
        Err(SplitError::DestinationIsSource(p)) => assert!(p.ends_with("img-0.vhdx")),
        r => panic!("{r:?}"),
    }
    // A hot list with a bad line, and one past the end.
    let hl = dir.path().join("hot.txt");
    std::fs::write(&hl, "0 512\n\n4096 x\n").unwrap();
    match read_hot_list(&hl) {
        Err(e @ SplitError::HotList { line: 3, .. }) => {
            assert!(e.to_string().starts_with("hot list line 3:"), "{e}")
        }
        r => panic!("{r:?}"),
    }
    let mut o = mk(2, "h");
    o.hot = parse_hot_list(&format!("0 512\n{} 1024\n", SIZE - 512)).unwrap();
    match split(&src, &o) {
        Err(SplitError::HotList { line: 2, reason }) => {
            assert!(reason.contains("past"), "{reason}")
        }
        r => panic!("{r:?}"),
    }
    assert!(!dir.path().join("h-0.vhdx").exists());
    // A missing source.
    assert!(matches!(
        split(&dir.path().join("nope.raw"), &mk(1, "m")),
        Err(SplitError::Source(_))
    ));
}

/// The split chain (base first) as libvhdi reads it.
fn read_with_libvhdi(layers: &[PathBuf]) -> Vec<u8> {
    let paths: Vec<&Path> = layers.iter().map(PathBuf::as_path).collect();
    block_io::testing::pyvhdi_read(&paths, SIZE).unwrap()
}
