//! Jobs on real files: raw files (both ends plain files: `copy_file_range`), a VHDX read
//! through its mapping into a raw file, and converts of differencing chains opened as
//! `chain::Disk` (flattened into a VHD or VHDX) under guest I/O, each destination reopened
//! from disk afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use block_io::{BlockDevice, FileStorage, OpenOptions as FileOptions};
use common::Model;
use meta_ops::{Job, JobOptions, JobReport, JobRunner, LiveDisk, Pivot};

const SIZE: u64 = 8 << 20;

fn open_chain(path: &Path) -> Arc<chain::Disk> {
    Arc::new(chain::Disk::open(path, &chain::OpenOptions::new()).unwrap())
}

fn vhdx(path: &Path, size: u64) -> Arc<dyn BlockDevice> {
    let mut o = vhdx_format::CreateOptions::dynamic(size);
    o.block_size = Some(1 << 20);
    Arc::new(vhdx_format::create(FileStorage::create(path).unwrap(), &o).unwrap())
}

fn vhd(path: &Path, size: u64) -> Arc<dyn BlockDevice> {
    let mut o = vhd_format::CreateOptions::new(size, vhd_format::Subformat::Dynamic);
    o.block_size = 512 * 1024;
    Arc::new(vhd_format::VhdFile::create(FileStorage::create(path).unwrap(), &o).unwrap())
}

/// A differencing child of `parent` at `path`, of the parent's format.
fn child(vhdx_fmt: bool, path: &Path, parent: &Path) {
    let name = parent.file_name().unwrap().to_str().unwrap().to_string();
    let ps = FileStorage::open(parent, &FileOptions::new().read_only(true)).unwrap();
    let s = FileStorage::create(path).unwrap();
    if vhdx_fmt {
        let d = vhdx_format::VhdxFile::open(ps, &vhdx_format::OpenOptions::new().read_only(true))
            .unwrap()
            .details();
        let pref = vhdx_format::ParentRef {
            data_write_guid: d.data_write_guid,
            relative_path: name,
            absolute_path: Some(parent.display().to_string()),
        };
        let mut o = vhdx_format::CreateOptions::differencing(d.virtual_size, pref);
        o.block_size = Some(1 << 20);
        drop(vhdx_format::create(s, &o).unwrap());
    } else {
        let d = vhd_format::VhdFile::open(ps, &vhd_format::OpenOptions::new().read_only(true))
            .unwrap()
            .details();
        let abs = parent.display().to_string();
        let mut o =
            vhd_format::DifferencingOptions::for_parent(&d, abs.clone(), Some(abs), Some(name));
        o.block_size = 512 * 1024;
        drop(vhd_format::VhdFile::create_differencing(s, &o).unwrap());
    }
}

/// Runs `job` on `src` under three guest threads; checks the guest's reads, then the disk
/// the guest ends on against the model and the other disk against the model at the pivot.
#[allow(clippy::too_many_arguments)]
fn run(
    runner: &JobRunner,
    src: Arc<dyn BlockDevice>,
    initial: Vec<u8>,
    dest: Arc<dyn BlockDevice>,
    job: Job,
    pivot: Pivot,
    seed: u64,
    discard_zeroes: bool,
) -> (JobReport, Model) {
    let live = LiveDisk::new(src.clone());
    let guests = common::start(&live, Model::new(initial, 0), 3, seed, discard_zeroes);
    guests.run_for_ops(100);
    let report = runner.start(&live, job).unwrap().wait_blocking().unwrap();
    guests.run_for_ops(300);
    let (model, counts) = guests.stop();
    assert_eq!(counts.errors.load(Ordering::Relaxed), 0);
    assert_eq!(counts.mismatches.load(Ordering::Relaxed), 0);
    let (now, other) = match pivot {
        Pivot::Switch => (dest, src),
        Pivot::Detach => (src, dest),
    };
    live.flush().unwrap();
    assert_eq!(common::mismatches(&*now, 0, &model.cur), 0, "{report:?}");
    assert_eq!(
        common::mismatches(&*other, 0, &model.at_pivot),
        0,
        "{report:?}"
    );
    (report, model)
}

fn throttled() -> JobOptions {
    JobOptions {
        rate: 48 << 20,
        chunk: 256 << 10,
        ..JobOptions::default()
    }
}

#[test]
fn raw_file_to_raw_file_uses_copy_file_range() {
    let dir = tempfile::tempdir().unwrap();
    let runner = JobRunner::new().unwrap();
    for seed in 0..3u64 {
        let initial = common::initial(SIZE, seed);
        let src = common::raw_file(&dir.path().join(format!("s{seed}.raw")), SIZE);
        common::fill(&*src, &initial);
        let dest = common::raw_file(&dir.path().join(format!("d{seed}.raw")), SIZE);
        let job = Job::copy(dest.clone())
            .dest_zeroed(true)
            .options(throttled());
        let (r, _) = run(&runner, src, initial, dest, job, Pivot::Detach, seed, true);
        assert!(r.copy_file_range_bytes > 0, "{r:?}");
    }
}

#[test]
fn vhdx_into_a_raw_file_maps_both_ends() {
    let dir = tempfile::tempdir().unwrap();
    let runner = JobRunner::new().unwrap();
    let initial = common::initial(SIZE, 7);
    let p = dir.path().join("s.vhdx");
    common::fill(&*vhdx(&p, SIZE), &initial);
    let src = open_chain(&p);
    let dest = common::raw_file(&dir.path().join("d.raw"), SIZE);
    let job = Job::convert(dest.clone()).options(throttled());
    let (r, model) = run(&runner, src, initial, dest, job, Pivot::Switch, 7, true);
    assert!(r.copy_file_range_bytes > 0, "{r:?}");
    let reopened = open_chain(&dir.path().join("d.raw"));
    assert_eq!(common::mismatches(&*reopened, 0, &model.cur), 0);
}

#[test]
fn chains_flatten_into_the_other_format_under_guest_io() {
    let runner = JobRunner::new().unwrap();
    for (seed, vhdx_src) in [(1u64, true), (2, false), (3, true), (4, false)] {
        let dir = tempfile::tempdir().unwrap();
        let ext = if vhdx_src { "vhdx" } else { "vhd" };
        let base = dir.path().join(format!("base.{ext}"));
        let top = dir.path().join(format!("top.{ext}"));
        let b = if vhdx_src {
            vhdx(&base, SIZE)
        } else {
            vhd(&base, SIZE)
        };
        let lower = common::initial(SIZE, seed);
        common::fill(&*b, &lower);
        drop(b);
        child(vhdx_src, &top, &base);
        let src = open_chain(&top);
        assert_eq!(src.layers().len(), 2);
        // Overwrite some of the parent's data in the child.
        let upper = common::initial(SIZE, seed + 100);
        let mut initial = lower.clone();
        for (i, c) in upper.chunks(1 << 20).enumerate() {
            if i % 2 == 0 {
                let at = i << 20;
                src.write_at(c, at as u64).unwrap();
                initial[at..at + c.len()].copy_from_slice(c);
            }
        }
        let out = dir
            .path()
            .join(if vhdx_src { "flat.vhd" } else { "flat.vhdx" });
        let dest = if vhdx_src {
            vhd(&out, SIZE)
        } else {
            vhdx(&out, SIZE)
        };
        let job = Job::convert(dest.clone()).options(throttled());
        // A chain's discard may show the parent's data: the guests zero instead.
        let (r, model) = run(&runner, src, initial, dest, job, Pivot::Switch, seed, false);
        assert!(r.bytes >= SIZE / 2, "{r:?}");
        let reopened = open_chain(&out);
        assert_eq!(reopened.layers().len(), 1);
        assert_eq!(
            common::mismatches(&*reopened, 0, &model.cur),
            0,
            "seed {seed}"
        );
    }
}

/// Allocated bytes of a file (st_blocks).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Data runs that read as zeros — holes of the source file inside an allocated VHDX block
/// (moved with `copy_file_range`) and blocks written full of zeros (moved through a buffer
/// into a VHDX) — stay holes in a fresh destination, as `qemu-img convert` leaves them;
/// the contents are equal.
#[test]
fn convert_keeps_zeros_inside_data_runs_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("src.vhdx");
    // 8 MiB blocks: each written 64 KiB leaves the rest of its block a hole of the file.
    let mut o = vhdx_format::CreateOptions::dynamic(64 << 20);
    o.block_size = Some(8 << 20);
    let src = vhdx_format::create(FileStorage::create(&src_path).unwrap(), &o).unwrap();
    let mut want = vec![0u8; 64 << 20];
    for i in 0..8u64 {
        let off = i * (8 << 20) + (i % 3) * (1 << 20);
        let d = vec![i as u8 + 1; 64 << 10];
        src.write_at(&d, off).unwrap();
        want[off as usize..off as usize + d.len()].copy_from_slice(&d);
    }
    // A block allocated with nothing but zeros in it.
    src.write_at(&vec![0u8; 1 << 20], 60 << 20).unwrap();
    src.flush().unwrap();
    drop(src);
    let open_src = || {
        let st = FileStorage::open(&src_path, &FileOptions::new().read_only(true)).unwrap();
        Arc::new(
            vhdx_format::VhdxFile::open(st, &vhdx_format::OpenOptions::new().read_only(true))
                .unwrap(),
        ) as Arc<dyn BlockDevice>
    };
    let raw_path = dir.path().join("out.raw");
    let raw = FileStorage::create(&raw_path).unwrap();
    block_io::Storage::set_len(&raw, 64 << 20).unwrap();
    let raw: Arc<dyn BlockDevice> = Arc::new(block_io::RawDisk::new(raw).unwrap());
    let vhdx_path = dir.path().join("out.vhdx");
    let mut o = vhdx_format::CreateOptions::dynamic(64 << 20);
    o.block_size = Some(1 << 20);
    let out_vhdx: Arc<dyn BlockDevice> =
        Arc::new(vhdx_format::create(FileStorage::create(&vhdx_path).unwrap(), &o).unwrap());
    let runner = JobRunner::new().unwrap();
    for dest in [raw.clone(), out_vhdx.clone()] {
        let live = LiveDisk::new(open_src());
        let job = Job::convert(dest.clone()).pivot(Pivot::Detach);
        runner.start(&live, job).unwrap().wait_blocking().unwrap();
        let mut got = vec![0u8; 64 << 20];
        dest.read_at(&mut got, 0).unwrap();
        assert!(got == want, "contents differ");
    }
    // 8 pieces of 64 KiB: raw keeps them in about as many file-system blocks (plus the
    // written zero block: copy_file_range moves the source file's data without reading it,
    // so zeros stored as data go along; the holes around the pieces stay holes). The VHDX
    // (buffered: the job sees the bytes) allocates one 1 MiB block per piece, not the 8 MiB
    // source blocks, and not the zero block.
    assert!(
        allocated(&raw_path) <= 8 * (128 << 10) + (1 << 20),
        "{}",
        allocated(&raw_path)
    );
    let mut st = out_vhdx.block_status(60 << 20, 1 << 20).unwrap();
    assert_ne!(
        st.status,
        block_io::BlockStatus::Data,
        "the zero block was copied"
    );
    st = out_vhdx.block_status(0, 1 << 20).unwrap();
    assert_eq!(st.status, block_io::BlockStatus::Data);
    drop(out_vhdx);
    assert!(
        allocated(&vhdx_path) < 8 * (1 << 20) + (8 << 20),
        "{}",
        allocated(&vhdx_path)
    );
}
