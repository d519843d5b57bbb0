//! `RawDisk` over memory and over a real file, against a byte-vector model.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use block_io::{BlockDevice, BlockStatus, ErrorKind, FileStorage, MemStorage, RawDisk, Storage};
use proptest::prelude::*;
use std::io::{IoSlice, IoSliceMut};

const SIZE: u64 = 256 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Read {
        sector: u64,
        count: u64,
    },
    Write {
        sector: u64,
        count: u64,
        byte: u8,
    },
    WriteV {
        sector: u64,
        split: usize,
        count: u64,
        byte: u8,
    },
    Zeroes {
        sector: u64,
        count: u64,
        unmap: bool,
    },
    Discard {
        sector: u64,
        count: u64,
    },
    Flush,
    Status {
        sector: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0u64..SIZE / 512, 1u64..64);
    prop_oneof![
        3 => range.clone().prop_map(|(sector, count)| Op::Read { sector, count }),
        3 => (range.clone(), any::<u8>()).prop_map(|((sector, count), byte)| Op::Write { sector, count, byte }),
        1 => (range.clone(), 0usize..32768, any::<u8>()).prop_map(|((sector, count), split, byte)| Op::WriteV { sector, split, count, byte }),
        1 => (range.clone(), any::<bool>()).prop_map(|((sector, count), unmap)| Op::Zeroes { sector, count, unmap }),
        1 => range.prop_map(|(sector, count)| Op::Discard { sector, count }),
        1 => Just(Op::Flush),
        1 => (0u64..SIZE / 512).prop_map(|sector| Op::Status { sector }),
    ]
}

fn check(dev: &dyn BlockDevice, model: &mut [u8], op: &Op) -> Result<(), TestCaseError> {
    let span = |sector: u64, count: u64| {
        let off = sector * 512;
        (off, (count * 512).min(SIZE - off))
    };
    match *op {
        Op::Read { sector, count } => {
            let (off, len) = span(sector, count);
            let mut buf = vec![0xEEu8; len as usize];
            dev.read_at(&mut buf, off).unwrap();
            prop_assert!(
                buf == model[off as usize..(off + len) as usize],
                "read {}+{}",
                off,
                len
            );
            // Vectored read of the same range, split unevenly.
            let mut a = vec![0u8; (len as usize) / 3];
            let mut b = vec![0u8; len as usize - a.len()];
            dev.read_vectored_at(&mut [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)], off)
                .unwrap();
            a.extend_from_slice(&b);
            prop_assert!(a == buf);
        }
        Op::Write {
            sector,
            count,
            byte,
        } => {
            let (off, len) = span(sector, count);
            dev.write_at(&vec![byte; len as usize], off).unwrap();
            model[off as usize..(off + len) as usize].fill(byte);
        }
        Op::WriteV {
            sector,
            split,
            count,
            byte,
        } => {
            let (off, len) = span(sector, count);
            let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
            let split = split.min(data.len());
            dev.write_vectored_at(
                &[IoSlice::new(&data[..split]), IoSlice::new(&data[split..])],
                off,
            )
            .unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        Op::Zeroes {
            sector,
            count,
            unmap,
        } => {
            let (off, len) = span(sector, count);
            dev.write_zeroes(off, len, unmap).unwrap();
            model[off as usize..(off + len) as usize].fill(0);
        }
        Op::Discard { sector, count } => {
            let (off, len) = span(sector, count);
            dev.discard(off, len).unwrap();
            model[off as usize..(off + len) as usize].fill(0);
        }
        Op::Flush => dev.flush().unwrap(),
        Op::Status { sector } => {
            let off = sector * 512;
            let r = dev.block_status(off, SIZE - off).unwrap();
            prop_assert!(r.len >= 512 && r.len % 512 == 0 && off + r.len <= SIZE);
            prop_assert!(r.status != BlockStatus::Unallocated);
            if r.status == BlockStatus::Zero {
                let run = &model[off as usize..(off + r.len) as usize];
                prop_assert!(
                    run.iter().all(|&b| b == 0),
                    "Zero run {}+{} holds data",
                    off,
                    r.len
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn raw_disk_on_memory_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let m = MemStorage::new();
        m.set_len(SIZE).unwrap();
        let dev = RawDisk::new(m).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        for op in &ops {
            check(&dev, &mut model, op)?;
        }
        prop_assert_eq!(dev.into_storage().to_vec().unwrap(), model);
    }

    #[test]
    fn raw_disk_on_file_matches_model(ops in proptest::collection::vec(op(), 1..40), direct in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        FileStorage::create(&path).unwrap().set_len(SIZE).unwrap();
        let s = FileStorage::open(&path, &block_io::OpenOptions::new().direct(direct)).unwrap();
        let dev = RawDisk::new(s).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        for op in &ops {
            check(&dev, &mut model, op)?;
        }
        dev.flush().unwrap();
        prop_assert_eq!(std::fs::read(&path).unwrap(), model);
    }
}

#[test]
fn failed_write_latches_until_reopen() {
    use block_io::{FaultStorage, Injection};
    let f = FaultStorage::new(MemStorage::from_bytes(&[0u8; 4096]));
    f.inject(Injection::WriteError { nth: 1 });
    let dev = RawDisk::new(f).unwrap();
    dev.write_at(&[1u8; 512], 0).unwrap();
    assert_eq!(
        dev.write_at(&[2u8; 512], 512).unwrap_err().kind(),
        ErrorKind::Io
    );
    assert_eq!(
        dev.write_at(&[3u8; 512], 1024).unwrap_err().kind(),
        ErrorKind::Failed
    );
    assert_eq!(dev.flush().unwrap_err().kind(), ErrorKind::Failed);
    // Reads still work.
    let mut b = [0u8; 512];
    dev.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [1u8; 512]);
    // A new device over the same storage accepts writes again.
    let dev = RawDisk::new(dev.into_storage()).unwrap();
    dev.write_at(&[3u8; 512], 1024).unwrap();
}

#[test]
fn failed_sync_latches() {
    use block_io::{FaultStorage, Injection};
    let f = FaultStorage::new(MemStorage::from_bytes(&[0u8; 4096]));
    f.inject(Injection::SyncError { nth: 0 });
    let dev = RawDisk::new(f).unwrap();
    dev.write_at(&[1u8; 512], 0).unwrap();
    assert_eq!(dev.flush().unwrap_err().kind(), ErrorKind::Io);
    assert_eq!(dev.flush().unwrap_err().kind(), ErrorKind::Failed);
    assert_eq!(
        dev.write_at(&[1u8; 512], 0).unwrap_err().kind(),
        ErrorKind::Failed
    );
}

#[test]
fn file_storage_holes_direct_and_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let s = FileStorage::create(&path).unwrap();
    s.set_len(8 << 20).unwrap();
    s.write_at(&[0xAA; 1 << 20], 2 << 20).unwrap();
    s.sync_data().unwrap();
    let e = s.extent(0, 8 << 20).unwrap();
    assert!(!e.allocated && e.len == 2 << 20, "{e:?}");
    let e = s.extent(2 << 20, 8 << 20).unwrap();
    assert!(e.allocated && e.len == 1 << 20, "{e:?}");
    let used = |p: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    };
    assert!(used(&path) >= 1 << 20);
    s.punch_hole(2 << 20, 1 << 20).unwrap();
    assert!(used(&path) < 1 << 20, "hole punched releases space");
    let mut b = vec![1u8; 4096];
    s.read_at(&mut b, 2 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    assert_eq!(s.len().unwrap(), 8 << 20, "punching keeps the length");
    assert_eq!(
        s.read_at(&mut b, (8 << 20) - 100).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );

    // O_DIRECT with unaligned requests bounces and read-modify-writes. One writer at a time:
    // the image lock refuses a second read-write open.
    drop(s);
    let d = FileStorage::open(&path, &block_io::OpenOptions::new().direct(true)).unwrap();
    d.write_at(b"hello", 1000).unwrap();
    d.write_at(b"world", (8 << 20) - 5).unwrap();
    d.write_at(b"grow", 8 << 20).unwrap();
    assert_eq!(
        d.len().unwrap(),
        (8 << 20) + 4,
        "no over-extension by aligned bounce"
    );
    let mut h = [0u8; 5];
    d.read_at(&mut h, 1000).unwrap();
    assert_eq!(&h, b"hello");
    let all = std::fs::read(&path).unwrap();
    assert_eq!(&all[1000..1005], b"hello");
    assert_eq!(&all[(8 << 20) - 5..], b"worldgrow");
    assert!(all[..1000].iter().all(|&x| x == 0));

    // Read-only refuses writes (opened once the writer is gone: it refuses to share writes).
    drop(d);
    let r = FileStorage::open(&path, &block_io::OpenOptions::new().read_only(true)).unwrap();
    assert_eq!(r.write_at(b"x", 0).unwrap_err().kind(), ErrorKind::ReadOnly);
}
