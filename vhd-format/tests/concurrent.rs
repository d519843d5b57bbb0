//! Concurrent writers on one dynamic or differencing layer (issue 11: no metadata lock across
//! payload I/O or a sync).
//!
//! - Eight threads write, read (through `read_at` and through `BlockDevice::map`, as the I/O
//!   engine does) and flush over shared blocks, each owning its own sectors (see
//!   `common/workload.rs`), against an exact model; then the image is reopened and checked.
//! - Two threads allocate the same block at once, many times: every sector must hold one of
//!   the two writes whole, and the block is allocated once.
//! - While a sync is held at a gate, reads, overwrites and maps of allocated blocks complete,
//!   a block being allocated does not map, another allocation reserves and writes its payload,
//!   and that allocation and a flush then share one sync.
//! - An allocation that fails after a later one committed leaves unreferenced space between
//!   blocks: the image reopens, checks clean, and qemu-img and libvhdi read it as our model.
//!
//! `bench_concurrent_allocation` (ignored) prints wall time and sync counts of N threads
//! allocating at once on a real file.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use block_io::{BlockDevice, ErrorKind, FileStorage, Mapping, MemStorage, OpenOptions, Storage};
use common::probe::Probe;
use common::workload::{merged_model, run_thread, thread_ops, Geometry, Log};
use common::{have_pyvhdi, have_qemu, pattern, run, s};
use parking_lot::{Condvar, Mutex};
use vhd_format::{CreateOptions, DifferencingOptions, FooterSource, Subformat, VhdFile};

fn diff_options(size: u64, block: u32) -> DifferencingOptions {
    DifferencingOptions {
        size,
        block_size: block,
        parent_unique_id: uuid::Uuid::from_bytes([1; 16]),
        parent_timestamp: 1,
        parent_name: "p.vhd".into(),
        absolute_path: None,
        relative_path: Some(".\\p.vhd".into()),
        unique_id: None,
        timestamp: Some(2),
        creator: Default::default(),
    }
}

fn create<S: Storage>(st: S, diff: bool, size: u64, block: u32) -> VhdFile<S> {
    if diff {
        VhdFile::create_differencing(st, &diff_options(size, block)).unwrap()
    } else {
        let mut o = CreateOptions::new(size, Subformat::Dynamic);
        o.block_size = block;
        VhdFile::create(st, &o).unwrap()
    }
}

fn read_all<S: Storage>(dev: &VhdFile<S>) -> Vec<u8> {
    let mut buf = vec![0u8; dev.info().virtual_size as usize];
    dev.read_at(&mut buf, 0).unwrap();
    buf
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = got
        .chunks(512)
        .zip(want.chunks(512))
        .position(|(a, b)| a != b)
    {
        panic!("{what}: sector {i} differs from the model");
    }
}

/// Runs the eight-thread workload for `seed` on a fresh image in `st`, checks the result and
/// a reopen against the model.
fn model_run<S: Storage>(st: Arc<Probe<S>>, diff: bool, seed: u64) -> Vec<Log> {
    let geo = Geometry {
        size: 2 << 20,
        block: 64 << 10,
        chunk: 8,
        threads: 8,
        hot: 6,
    };
    let dev = create(st.clone(), diff, geo.size, geo.block as u32);
    st.set_jitter(true);
    let ops: Vec<_> = (0..geo.threads)
        .map(|t| thread_ops(&geo, seed, t, 120))
        .collect();
    let clock = AtomicU64::new(0);
    let logs: Vec<Log> = std::thread::scope(|sc| {
        let hs: Vec<_> = ops
            .iter()
            .enumerate()
            .map(|(t, ops)| {
                let (dev, geo, clock) = (&dev, &geo, &clock);
                sc.spawn(move || run_thread(dev, geo, t, ops, clock))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    st.set_jitter(false);
    for (t, l) in logs.iter().enumerate() {
        assert_eq!(l.error, None, "seed {seed}: thread {t} failed");
    }
    let model = merged_model(&geo, &logs);
    assert_same(&read_all(&dev), &model, &format!("seed {seed} (live)"));
    dev.flush().unwrap();
    drop(dev);
    for read_only in [true, false] {
        let dev = VhdFile::open(
            st.clone(),
            &vhd_format::OpenOptions::new().read_only(read_only),
        )
        .unwrap();
        assert_eq!(dev.footer_source(), FooterSource::End);
        assert_same(&read_all(&dev), &model, &format!("seed {seed} (reopened)"));
        let r = dev.check().unwrap();
        assert!(r.is_clean(), "seed {seed}: {r:?}");
    }
    logs
}

#[test]
fn eight_writers_match_the_model_in_memory() {
    for diff in [false, true] {
        for seed in 1..=3 {
            model_run(Arc::new(Probe::new(MemStorage::new())), diff, seed);
        }
    }
}

/// On a real file, where `map` maps (reads and overwrites go around the layer).
#[test]
fn eight_writers_match_the_model_on_a_file() {
    let dir = tempfile::tempdir().unwrap();
    for diff in [false, true] {
        for seed in 4..=5 {
            let path = dir.path().join(format!("m{diff}{seed}.vhd"));
            let st = Arc::new(Probe::new(FileStorage::create(&path).unwrap()));
            let logs = model_run(st, diff, seed);
            let mapped: u64 = logs.iter().map(|l| l.mapped).sum();
            assert!(mapped > 50, "only {mapped} mapped ops");
        }
    }
}

/// Per sector: in both ranges, one of the two writes whole; in one, that write; else zeros.
#[test]
fn two_writers_of_one_block_allocate_it_once() {
    const SPB: u64 = 128; // 64 KiB blocks
    const BLOCKS: u64 = 48;
    // (A's sectors, B's sectors) inside the block.
    let cases = [
        (0..SPB, 0..SPB),
        (0..SPB, 40..72),
        (0..96, 32..SPB),
        (8..40, 24..100),
    ];
    for diff in [false, true] {
        let st = Arc::new(Probe::new(MemStorage::new()));
        let dev = create(st.clone(), diff, BLOCKS * SPB * 512, (SPB * 512) as u32);
        st.set_jitter(true);
        for b in 0..BLOCKS {
            let (ra, rb) = cases[(b % 4) as usize].clone();
            let barrier = Barrier::new(2);
            std::thread::scope(|sc| {
                for (k, r) in [(1u64, ra), (2u64, rb)] {
                    let (dev, barrier) = (&dev, &barrier);
                    sc.spawn(move || {
                        let data = pattern(b * 10 + k, ((r.end - r.start) * 512) as usize);
                        barrier.wait();
                        dev.write_at(&data, (b * SPB + r.start) * 512).unwrap();
                    });
                }
            });
        }
        st.set_jitter(false);
        let verify = |dev: &VhdFile<Arc<Probe<MemStorage>>>, what: &str| {
            let all = read_all(dev);
            for b in 0..BLOCKS {
                let (ra, rb) = cases[(b % 4) as usize].clone();
                let a = pattern(b * 10 + 1, ((ra.end - ra.start) * 512) as usize);
                let bb = pattern(b * 10 + 2, ((rb.end - rb.start) * 512) as usize);
                for sct in 0..SPB {
                    let at = ((b * SPB + sct) * 512) as usize;
                    let got = &all[at..at + 512];
                    let from = |r: &std::ops::Range<u64>, d: &[u8]| {
                        r.contains(&sct).then(|| {
                            let o = ((sct - r.start) * 512) as usize;
                            d[o..o + 512].to_vec()
                        })
                    };
                    let (va, vb) = (from(&ra, &a), from(&rb, &bb));
                    let ok = match (&va, &vb) {
                        (Some(x), Some(y)) => got == &x[..] || got == &y[..],
                        (Some(x), None) | (None, Some(x)) => got == &x[..],
                        (None, None) => got.iter().all(|&v| v == 0),
                    };
                    assert!(ok, "{what} diff={diff}: block {b} sector {sct}");
                }
            }
        };
        verify(&dev, "live");
        dev.flush().unwrap();
        let r = dev.check().unwrap();
        assert!(r.is_clean(), "{r:?}");
        assert_eq!(r.allocated_blocks, BLOCKS, "a block was allocated twice");
        drop(dev);
        verify(
            &VhdFile::open(st.clone(), &vhd_format::OpenOptions::new().read_only(true)).unwrap(),
            "reopened",
        );
    }
}

/// Runs `f` on a thread; panics if it does not finish within `secs` (it would be blocked).
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} is blocked behind a sync in progress"))
}

fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(10), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn sync_in_progress_blocks_no_lock(diff: bool) {
    const B: u64 = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let st = Arc::new(Probe::new(
        FileStorage::create(dir.path().join("g.vhd")).unwrap(),
    ));
    let dev = Arc::new(create(st.clone(), diff, 16 * B, B as u32));
    let d0 = pattern(1, B as usize);
    dev.write_at(&d0, 0).unwrap();
    dev.flush().unwrap();

    // Block 1 is allocated and published; its BAT entry waits for a flush.
    dev.write_at(&pattern(2, 4096), B).unwrap();
    st.close_gate(true);
    let flush = {
        let dev = dev.clone();
        std::thread::spawn(move || dev.flush())
    };
    wait_until("the flush reaches its data sync", || st.held() == 1);
    // With the flush's sync in progress: reads, overwrites, maps and allocations go on.
    let d0b = pattern(3, 8192);
    let (dev2, d0b2) = (dev.clone(), d0b.clone());
    within(10, "a read or an overwrite", move || {
        let mut buf = vec![0u8; 8192];
        dev2.read_at(&mut buf, 4096).unwrap();
        dev2.write_at(&d0b2, 4096).unwrap();
        dev2.read_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, d0b2);
    });
    let dev2 = dev.clone();
    within(10, "a map", move || {
        let mut out = Vec::new();
        assert!(dev2.map(0, 8192, true, &mut out).unwrap());
        assert!(matches!(out[..], [Mapping::File { file_offset, .. }] if file_offset > 0));
        // The block whose entry is not yet in the file maps in place, for reads and writes.
        for write in [true, false] {
            out.clear();
            assert!(dev2.map(B, 4096, write, &mut out).unwrap());
            assert!(matches!(out[..], [Mapping::File { file_offset, .. }] if file_offset > B));
        }
        let mut buf = vec![1u8; 4096];
        dev2.read_at(&mut buf, B).unwrap();
        assert_eq!(buf, pattern(2, 4096));
    });
    let dev2 = dev.clone();
    within(10, "an allocation", move || {
        dev2.write_at(&pattern(4, 4096), 2 * B).unwrap();
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(st.held(), 1, "only one sync runs at a time");
    assert!(!flush.is_finished());
    let syncs = st.syncs();
    st.close_gate(false);
    flush.join().unwrap().unwrap();
    // The flush: its data sync (already counted), then the BAT entries of what was
    // published before it started, then one more sync.
    assert_eq!(st.syncs() - syncs, 1, "one sync after the BAT write");

    let mut model = vec![0u8; (16 * B) as usize];
    model[..B as usize].copy_from_slice(&d0);
    model[4096..4096 + 8192].copy_from_slice(&d0b);
    model[B as usize..B as usize + 4096].copy_from_slice(&pattern(2, 4096));
    model[2 * B as usize..2 * B as usize + 4096].copy_from_slice(&pattern(4, 4096));
    assert_same(&read_all(&dev), &model, "live");
    drop(dev);
    let dev = VhdFile::open(st.clone(), &vhd_format::OpenOptions::new().read_only(false)).unwrap();
    assert_same(&read_all(&dev), &model, "reopened");
    assert!(dev.check().unwrap().is_clean());
}

#[test]
fn a_sync_in_progress_blocks_no_reader_overwriter_or_allocator_dynamic() {
    sync_in_progress_blocks_no_lock(false);
}

#[test]
fn a_sync_in_progress_blocks_no_reader_overwriter_or_allocator_differencing() {
    sync_in_progress_blocks_no_lock(true);
}

/// Holds the write whose data is `held_data` until released, then fails the next write of
/// the same thread (the block's bitmap): an allocation that fails after its payload landed.
struct HoldThenFail {
    held_data: Vec<u8>,
    state: Mutex<(bool, bool, Option<std::thread::ThreadId>)>, // (held, released, thread)
    cv: Condvar,
}

impl HoldThenFail {
    fn hook(self: &Arc<Self>) -> common::probe::WriteHook {
        let me = self.clone();
        Box::new(move |_off, data| {
            let id = std::thread::current().id();
            let mut s = me.state.lock();
            if data == &me.held_data[..] {
                s.0 = true;
                s.2 = Some(id);
                me.cv.notify_all();
                while !s.1 {
                    me.cv.wait(&mut s);
                }
                return Ok(());
            }
            if s.2 == Some(id) {
                return Err(block_io::Error::io(
                    "injected",
                    std::io::Error::other("bitmap write fails"),
                ));
            }
            Ok(())
        })
    }
}

fn failed_allocation_leaves_readable_unreferenced_space(diff: bool) {
    const MB: u64 = 1 << 20;
    const SIZE: u64 = 16 * MB; // 2 MiB blocks
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("gap.vhd");
    let parent = dir.path().join("parent.vhd");
    let opts = OpenOptions::new().create(true);
    let st = Arc::new(Probe::new(FileStorage::open(&img, &opts).unwrap()));
    let dev = Arc::new(if diff {
        let p = VhdFile::create(
            FileStorage::open(&parent, &opts).unwrap(),
            &CreateOptions::new(SIZE, Subformat::Dynamic),
        )
        .unwrap();
        let o = DifferencingOptions::for_parent(
            &p.details(),
            s(&parent),
            Some(s(&parent).to_string()),
            Some("./parent.vhd".into()),
        );
        VhdFile::create_differencing(st.clone(), &o).unwrap()
    } else {
        VhdFile::create(st.clone(), &CreateOptions::new(SIZE, Subformat::Dynamic)).unwrap()
    });
    let mut model = vec![0u8; SIZE as usize];
    let mut put = |dev: &VhdFile<_>, off: u64, len: u64, tag: u64| {
        let d = pattern(tag, len as usize);
        dev.write_at(&d, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&d);
    };
    put(&dev, 0, 64 << 10, 1);

    // A allocates block 1 and is held in its payload write; B allocates block 2 (reserved
    // after A's space) and flushes; then A's bitmap write fails.
    let a_data = pattern(2, 64 << 10);
    let hold = Arc::new(HoldThenFail {
        held_data: a_data.clone(),
        state: Mutex::new((false, false, None)),
        cv: Condvar::new(),
    });
    st.set_hook(Some(hold.hook()));
    let a = {
        let (dev, a_data) = (dev.clone(), a_data.clone());
        std::thread::spawn(move || dev.write_at(&a_data, 2 * MB + 8192))
    };
    wait_until("A holds in its payload write", || hold.state.lock().0);
    put(&dev, 4 * MB + 4096, 8192, 3);
    // B's flush writes its BAT entry (not A's: unpublished) and the footer past A's space.
    dev.flush().unwrap();
    {
        let mut s = hold.state.lock();
        s.1 = true;
        hold.cv.notify_all();
    }
    let e = a.join().unwrap().unwrap_err();
    assert_ne!(e.kind(), ErrorKind::Failed, "A fails with its own error");
    assert!(dev.is_failed());
    st.set_hook(None);
    drop(dev);
    drop(st);

    let raw_file = std::fs::read(&img).unwrap();
    assert!(
        raw_file.windows(4096).any(|w| w == &a_data[..4096]),
        "A's payload landed (unreferenced)"
    );
    let ro = OpenOptions::new().read_only(true);
    let r = vhd_format::check_storage(&FileStorage::open(&img, &ro).unwrap()).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.allocated_blocks, 2);

    // Reopen (the footer at the end is valid: B's flush wrote it past every reservation),
    // allocate past the gap, flush.
    let st = Arc::new(Probe::new(
        FileStorage::open(&img, &OpenOptions::new()).unwrap(),
    ));
    let dev = VhdFile::open(st, &vhd_format::OpenOptions::new().read_only(false)).unwrap();
    assert_eq!(dev.footer_source(), FooterSource::End);
    put(&dev, 6 * MB, 2 * MB, 4);
    put(&dev, SIZE - 4096, 4096, 5);
    dev.flush().unwrap();
    assert_same(&read_all(&dev), &model, "ours");
    let r = dev.check().unwrap();
    assert!(r.is_clean(), "{r:?}");
    drop(dev);

    if !diff && have_qemu() {
        let raw = dir.path().join("model.raw");
        std::fs::write(&raw, &model).unwrap();
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-f", "vpc", s(&img)])
            .output()
            .unwrap();
        // qemu-img does not implement check for vpc (63); a failure would be 1-3.
        assert!(matches!(out.status.code(), Some(0) | Some(63)), "{out:?}");
        run(
            "qemu-img",
            &["compare", "-f", "vpc", "-F", "raw", s(&img), s(&raw)],
        );
    }
    if have_pyvhdi() {
        let set_parent = if diff {
            format!(
                "p=pyvhdi.file(); p.open({:?}); f.set_parent(p)\n",
                s(&parent)
            )
        } else {
            String::new()
        };
        let script = format!(
            "import pyvhdi,sys\nf=pyvhdi.file(); f.open({:?})\n{set_parent}\
             sys.stdout.buffer.write(f.read_buffer_at_offset({SIZE}, 0))\n",
            s(&img)
        );
        let out = std::process::Command::new("/usr/bin/python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_same(&out.stdout, &model, "libvhdi");
    }
}

#[test]
fn failed_allocation_leaves_readable_unreferenced_space_dynamic() {
    failed_allocation_leaves_readable_unreferenced_space(false);
}

#[test]
fn failed_allocation_leaves_readable_unreferenced_space_differencing() {
    failed_allocation_leaves_readable_unreferenced_space(true);
}

/// N threads at once, each allocating `PER_THREAD` blocks (a 4 KiB write into a fresh 2 MiB
/// block), on a real file; for a differencing layer then the same number of first writes to
/// absent sectors of allocated blocks (data, sync, bitmap). Prints the median of `REPS` runs
/// of wall time and syncs (counted by `Probe`). Run with
/// `cargo test -p vhd-format --release --test concurrent bench -- --ignored --nocapture`
/// (`BENCH_REPS`, default 5; `BENCH_DIR`, default the temp dir).
#[test]
#[ignore]
fn bench_concurrent_allocation() {
    const BLOCK: u64 = 2 << 20;
    const PER_THREAD: u64 = 32;
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let dir = match std::env::var("BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).unwrap(),
        Err(_) => tempfile::tempdir().unwrap(),
    };
    // Runs `threads` writers, writer `t` writing `pattern(t + tag)` at `at(t, i)`; returns
    // (seconds, syncs).
    let phase = |dev: &VhdFile<Arc<Probe<FileStorage>>>,
                 st: &Probe<FileStorage>,
                 threads: u64,
                 tag: u64,
                 at: &(dyn Fn(u64, u64) -> u64 + Sync)| {
        let syncs = st.syncs();
        let t0 = Instant::now();
        std::thread::scope(|sc| {
            for t in 0..threads {
                sc.spawn(move || {
                    let data = pattern(t + tag, 4096);
                    for i in 0..PER_THREAD {
                        dev.write_at(&data, at(t, i)).unwrap();
                    }
                });
            }
        });
        (t0.elapsed().as_secs_f64(), st.syncs() - syncs)
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    for diff in [false, true] {
        for threads in [1u64, 2, 4, 8] {
            let blocks = threads * PER_THREAD;
            let (mut at, mut asy, mut bt, mut bsy) = (vec![], vec![], vec![], vec![]);
            for rep in 0..reps {
                let path = dir.path().join(format!("b{diff}{threads}{rep}.vhd"));
                let st = Arc::new(Probe::new(FileStorage::create(&path).unwrap()));
                let dev = create(st.clone(), diff, blocks * BLOCK, BLOCK as u32);
                let block = |t: u64, i: u64| (t * PER_THREAD + i) * BLOCK;
                let (secs, syncs) = phase(&dev, &st, threads, 0, &block);
                at.push(secs);
                asy.push(syncs as f64);
                if diff {
                    let (secs, syncs) = phase(&dev, &st, threads, 100, &|t, i| block(t, i) + 65536);
                    bt.push(secs);
                    bsy.push(syncs as f64);
                }
                drop(dev);
                std::fs::remove_file(&path).unwrap();
            }
            let (secs, syncs) = (median(at), median(asy));
            let bitmaps = if diff {
                let (secs, syncs) = (median(bt), median(bsy));
                format!(
                    "; {blocks} bitmap updates {:.1} ms ({:.0}/s), {syncs} syncs",
                    secs * 1e3,
                    blocks as f64 / secs
                )
            } else {
                String::new()
            };
            println!(
                "{} threads={threads}: {blocks} allocations {:.1} ms ({:.0}/s), {syncs} \
                 syncs{bitmaps} (median of {reps})",
                if diff { "differencing" } else { "dynamic" },
                secs * 1e3,
                blocks as f64 / secs,
            );
        }
    }
}
