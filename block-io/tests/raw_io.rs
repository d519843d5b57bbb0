//! Raw-pointer I/O (`Storage::read_raw_at`/`write_raw_at`, `BlockDevice::read_raw_at`/
//! `write_raw_at`) against a byte-vector model: `FileStorage` buffered and `O_DIRECT` (aligned
//! requests go down as `preadv`/`pwritev`, unaligned ones bounce), `MemStorage` (the trait's
//! default bounce), `RawDisk` (request checks, fail-stop) and a device that keeps the
//! `BlockDevice` defaults. Buffers are laid out with sentinel gaps so that a transfer touching
//! a byte it was not given is caught.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use block_io::{
    AlignedBuf, BlockDevice, DiskInfo, ErrorKind, FaultStorage, FileStorage, Injection, MemStorage,
    OpenOptions, RawBuf, RawDisk, RawOptions, Result, StatusRun, Storage,
};
use proptest::prelude::*;

const SIZE: usize = 128 * 1024;
const GAP: usize = 512;
const SENTINEL: u8 = 0xEE;

/// Pieces of sizes `sizes` inside one aligned backing buffer, `GAP` sentinel bytes apart
/// (so with 512-multiple sizes every piece starts 512-aligned).
struct Layout {
    mem: AlignedBuf,
    starts: Vec<usize>,
    sizes: Vec<usize>,
}

impl Layout {
    fn new(sizes: &[usize]) -> Self {
        let mut starts = Vec::new();
        let mut at = GAP;
        for &s in sizes {
            starts.push(at);
            at += s + GAP;
        }
        let mut mem = AlignedBuf::new(at, 4096);
        mem.fill(SENTINEL);
        Layout {
            mem,
            starts,
            sizes: sizes.to_vec(),
        }
    }

    fn total(&self) -> usize {
        self.sizes.iter().sum()
    }

    fn bufs(&mut self) -> Vec<RawBuf> {
        let base = self.mem.as_mut_ptr();
        self.starts
            .iter()
            .zip(&self.sizes)
            // Pointers derived from one `as_mut_ptr`, so they stay valid together.
            .map(|(&s, &len)| RawBuf {
                ptr: base.wrapping_add(s),
                len,
            })
            .collect()
    }

    fn fill(&mut self, data: &[u8]) {
        let mut pos = 0;
        for (&s, &len) in self.starts.iter().zip(&self.sizes) {
            self.mem[s..s + len].copy_from_slice(&data[pos..pos + len]);
            pos += len;
        }
    }

    fn gathered(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (&s, &len) in self.starts.iter().zip(&self.sizes) {
            out.extend_from_slice(&self.mem[s..s + len]);
        }
        out
    }

    /// Every byte outside the pieces still holds the sentinel.
    fn gaps_intact(&self) -> bool {
        let mut at = 0;
        for (&s, &len) in self.starts.iter().zip(&self.sizes) {
            if self.mem[at..s].iter().any(|&b| b != SENTINEL) {
                return false;
            }
            at = s + len;
        }
        self.mem[at..].iter().all(|&b| b == SENTINEL)
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    Read {
        offset: u64,
        sizes: Vec<usize>,
    },
    Write {
        offset: u64,
        sizes: Vec<usize>,
        seed: u8,
    },
}

/// Requests of any byte shape, up to 2000 pieces (beyond IOV_MAX) and past the end.
fn any_op() -> impl Strategy<Value = Op> {
    let sizes = prop_oneof![
        3 => proptest::collection::vec(0usize..9000, 1..8),
        1 => proptest::collection::vec(1usize..40, 1000..2000),
    ];
    let offset = 0u64..(SIZE as u64 + 4096);
    prop_oneof![
        (offset.clone(), sizes.clone()).prop_map(|(offset, sizes)| Op::Read { offset, sizes }),
        (offset, sizes, any::<u8>()).prop_map(|(offset, sizes, seed)| Op::Write {
            offset,
            sizes,
            seed
        }),
    ]
}

/// Requests whose offset and piece sizes are multiples of 512 (pieces are 512-aligned in
/// memory by `Layout`), so `O_DIRECT` takes them as they are.
fn aligned_op() -> impl Strategy<Value = Op> {
    let sizes = prop_oneof![
        3 => proptest::collection::vec((0usize..24).prop_map(|n| n * 512), 1..8),
        1 => proptest::collection::vec(Just(512usize), 1030..1100),
    ];
    let offset = (0u64..(SIZE as u64 / 512 + 8)).prop_map(|s| s * 512);
    prop_oneof![
        (offset.clone(), sizes.clone()).prop_map(|(offset, sizes)| Op::Read { offset, sizes }),
        (offset, sizes, any::<u8>()).prop_map(|(offset, sizes, seed)| Op::Write {
            offset,
            sizes,
            seed
        }),
    ]
}

/// Runs `op` on `s` through the raw methods and on `model`, comparing.
fn check_storage(s: &dyn Storage, model: &mut Vec<u8>, op: &Op) -> Result<(), TestCaseError> {
    match op {
        Op::Read { offset, sizes } => {
            let mut l = Layout::new(sizes);
            let bufs = l.bufs();
            // SAFETY: the pieces lie inside `l.mem`, which lives past the call and is not
            // otherwise accessed during it.
            let r = unsafe { s.read_raw_at(&bufs, *offset) };
            let end = *offset as usize + l.total();
            if end > model.len() {
                prop_assert_eq!(r.unwrap_err().kind(), ErrorKind::OutOfRange);
            } else {
                r.unwrap();
                prop_assert!(l.gathered() == model[*offset as usize..end], "data differs");
            }
            prop_assert!(l.gaps_intact(), "read touched bytes outside its buffers");
        }
        Op::Write {
            offset,
            sizes,
            seed,
        } => {
            let mut l = Layout::new(sizes);
            let data = pattern(l.total(), *seed);
            l.fill(&data);
            let bufs = l.bufs();
            // SAFETY: as above.
            unsafe { s.write_raw_at(&bufs, *offset) }.unwrap();
            let off = *offset as usize;
            if data.is_empty() {
                return Ok(());
            }
            if model.len() < off + data.len() {
                model.resize(off + data.len(), 0);
            }
            model[off..off + data.len()].copy_from_slice(&data);
            prop_assert_eq!(s.len().unwrap(), model.len() as u64);
        }
    }
    let mut all = vec![0u8; model.len()];
    s.read_at(&mut all, 0).unwrap();
    prop_assert!(all == *model, "storage differs from the model");
    Ok(())
}

fn file_with(dir: &tempfile::TempDir, direct: bool, init: &[u8]) -> FileStorage {
    let path = dir.path().join("f");
    std::fs::write(&path, init).unwrap();
    FileStorage::open(&path, &OpenOptions::new().direct(direct)).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn file_storage_raw_matches_model(ops in proptest::collection::vec(any_op(), 1..12)) {
        let dir = tempfile::tempdir().unwrap();
        let mut model = pattern(SIZE, 7);
        let s = file_with(&dir, false, &model);
        for op in &ops {
            check_storage(&s, &mut model, op)?;
        }
    }

    #[test]
    fn direct_file_storage_raw_matches_model(
        ops in proptest::collection::vec(prop_oneof![aligned_op(), any_op()], 1..12),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut model = pattern(SIZE, 9);
        let s = file_with(&dir, true, &model);
        for op in &ops {
            check_storage(&s, &mut model, op)?;
        }
    }

    #[test]
    fn mem_storage_default_raw_matches_model(ops in proptest::collection::vec(any_op(), 1..12)) {
        let mut model = pattern(SIZE, 11);
        let s = MemStorage::from_bytes(&model);
        for op in &ops {
            check_storage(&s, &mut model, op)?;
        }
    }
}

#[test]
fn short_read_at_eof_is_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    for direct in [false, true] {
        // 1000 bytes: with O_DIRECT the aligned preadv stops mid-sector at EOF.
        let s = file_with(&dir, direct, &pattern(1000, 1));
        for (offset, sizes) in [
            (0u64, vec![512usize, 1024]),
            (512, vec![512]),
            (1024, vec![512]),
            (0, vec![1001]),
            (999, vec![1, 1]),
        ] {
            let mut l = Layout::new(&sizes);
            let bufs = l.bufs();
            // SAFETY: pieces inside `l.mem`, alive and untouched during the call.
            let e = unsafe { s.read_raw_at(&bufs, offset) }.unwrap_err();
            assert_eq!(
                e.kind(),
                ErrorKind::OutOfRange,
                "{direct} {offset} {sizes:?}"
            );
        }
        let mut l = Layout::new(&[512, 488]);
        let bufs = l.bufs();
        // SAFETY: as above.
        unsafe { s.read_raw_at(&bufs, 0) }.unwrap();
        assert_eq!(l.gathered(), pattern(1000, 1));
    }
}

#[test]
fn aliased_buffers_are_fine() {
    let dir = tempfile::tempdir().unwrap();
    let init = pattern(8192, 3);
    for direct in [false, true] {
        let s = file_with(&dir, direct, &init);
        let mut mem = AlignedBuf::new(4096, 4096);
        let p = mem.as_mut_ptr();
        // The same 4 KiB twice: a read lands the second half of the file in it (last wins)
        // or the first; both halves differ, so check it is exactly one of them.
        let bufs = [RawBuf { ptr: p, len: 4096 }, RawBuf { ptr: p, len: 4096 }];
        // SAFETY: both name `mem`, alive and untouched during the call; aliasing is allowed.
        unsafe { s.read_raw_at(&bufs, 0) }.unwrap();
        assert!(mem[..] == init[4096..] || mem[..] == init[..4096]);
        // A write from aliased buffers writes the same bytes twice.
        mem.fill(0x5A);
        // SAFETY: as above.
        unsafe { s.write_raw_at(&bufs, 0) }.unwrap();
        let mut back = vec![0u8; 8192];
        s.read_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 0x5A));
    }
}

#[test]
fn read_only_file_refuses_raw_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ro");
    std::fs::write(&path, [0u8; 4096]).unwrap();
    let s = FileStorage::open(&path, &OpenOptions::new().read_only(true)).unwrap();
    let mut l = Layout::new(&[512]);
    let bufs = l.bufs();
    // SAFETY: pieces inside `l.mem`, alive and untouched during the call.
    let e = unsafe { s.write_raw_at(&bufs, 0) }.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
}

/// A device that keeps the `BlockDevice` defaults for raw and vectored I/O.
struct Plain(RawDisk<MemStorage>);

impl BlockDevice for Plain {
    fn info(&self) -> DiskInfo {
        self.0.info()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.0.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.0.write_zeroes(offset, len, unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.0.discard(offset, len)
    }
    fn flush(&self) -> Result<()> {
        self.0.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<StatusRun> {
        self.0.block_status(offset, len)
    }
}

const DISK: usize = 4 << 20;

/// Sector-granular requests: any piece sizes whose total is whole sectors (a last piece
/// makes it up), some beyond the 256 KiB bounce piece, some unaligned or out of range.
fn dev_op() -> impl Strategy<Value = (bool, u64, Vec<usize>, u8)> {
    (
        any::<bool>(),
        prop_oneof![
            6 => (0u64..(DISK as u64 / 512)).prop_map(|s| s * 512),
            1 => 0u64..(DISK as u64 + 4096),
        ],
        prop_oneof![
            3 => proptest::collection::vec(1usize..5000, 1..6),
            1 => proptest::collection::vec(100_000usize..700_000, 1..5),
            1 => proptest::collection::vec(1usize..16, 1100..1500),
        ],
        any::<u8>(),
    )
        .prop_map(|(write, offset, mut sizes, seed)| {
            let total: usize = sizes.iter().sum();
            if seed % 8 != 0 {
                sizes.push((512 - total % 512) % 512);
            }
            (write, offset, sizes, seed)
        })
}

fn check_dev(
    dev: &dyn BlockDevice,
    model: &mut [u8],
    (write, offset, sizes, seed): &(bool, u64, Vec<usize>, u8),
) -> Result<(), TestCaseError> {
    let mut l = Layout::new(sizes);
    let total = l.total();
    let off = *offset as usize;
    let expect = if off % 512 != 0 || total % 512 != 0 {
        Some(ErrorKind::Unaligned)
    } else if off + total > model.len() {
        Some(ErrorKind::OutOfRange)
    } else {
        None
    };
    let data = pattern(total, *seed);
    if *write {
        l.fill(&data);
    }
    let bufs = l.bufs();
    // SAFETY: the pieces lie inside `l.mem`, alive and untouched during the call.
    let r = unsafe {
        if *write {
            dev.write_raw_at(&bufs, *offset)
        } else {
            dev.read_raw_at(&bufs, *offset)
        }
    };
    match expect {
        Some(kind) => prop_assert_eq!(r.unwrap_err().kind(), kind),
        None => {
            r.unwrap();
            if *write {
                model[off..off + total].copy_from_slice(&data);
            } else {
                prop_assert!(l.gathered() == model[off..off + total], "data differs");
            }
        }
    }
    prop_assert!(l.gaps_intact(), "touched bytes outside the buffers");
    let mut all = vec![0u8; model.len()];
    dev.read_at(&mut all, 0).unwrap();
    prop_assert!(all == *model, "device differs from the model");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn raw_disk_raw_io_matches_model(
        ops in proptest::collection::vec(dev_op(), 1..10),
        direct in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut model = pattern(DISK, 5);
        let d = RawDisk::new(file_with(&dir, direct, &model)).unwrap();
        for op in &ops {
            check_dev(&d, &mut model, op)?;
        }
    }

    #[test]
    fn default_device_raw_io_matches_model(ops in proptest::collection::vec(dev_op(), 1..10)) {
        let mut model = pattern(DISK, 6);
        let d = Plain(RawDisk::new(MemStorage::from_bytes(&model)).unwrap());
        for op in &ops {
            check_dev(&d, &mut model, op)?;
        }
    }
}

#[test]
fn raw_disk_raw_writes_check_and_fail_stop() {
    let mut l = Layout::new(&[1024]);
    let bufs = l.bufs();
    let ro = RawDisk::open(
        MemStorage::from_bytes(&[0; 4096]),
        &RawOptions::new().read_only(true),
    )
    .unwrap();
    // SAFETY (all calls below): pieces inside `l.mem`, alive and untouched during the call.
    let e = unsafe { ro.write_raw_at(&bufs, 0) }.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    let d4k = RawDisk::open(
        MemStorage::from_bytes(&[0; 8192]),
        &RawOptions::new().sector_size(4096),
    )
    .unwrap();
    let e = unsafe { d4k.read_raw_at(&bufs, 0) }.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unaligned);

    let f = FaultStorage::new(MemStorage::from_bytes(&[0; 8192]));
    f.inject(Injection::WriteError { nth: 0 });
    let d = RawDisk::new(f).unwrap();
    let e = unsafe { d.write_raw_at(&bufs, 0) }.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    let e = unsafe { d.write_raw_at(&bufs, 0) }.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Failed, "the first failure latches");
    unsafe { d.read_raw_at(&bufs, 0) }.unwrap();
    assert!(
        l.gathered().iter().all(|&b| b == 0),
        "the failed write was not carried out"
    );
}
