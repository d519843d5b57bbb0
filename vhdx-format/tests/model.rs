//! Property tests against a flat model: random writes, zeroes, discards and flushes on dynamic,
//! fixed and differencing images (512 and 4096-byte sectors) read back like the model, before
//! and after a reopen; block_status never calls data zero.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use block_io::{BlockDevice, BlockStatus, MemStorage};
use common::read_all;
use proptest::prelude::*;
use vhdx_format::{create, CreateOptions, ParentRef, Subformat, VhdxFile};

const SIZE: u64 = 5 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write {
        sector: u64,
        count: u64,
        fill: u8,
    },
    Zero {
        sector: u64,
        count: u64,
        unmap: bool,
    },
    Discard {
        sector: u64,
        count: u64,
    },
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..2560, 1u64..600, any::<u8>()).prop_map(|(sector, count, fill)| Op::Write { sector, count, fill }),
        1 => (0u64..2560, 1u64..3000, any::<bool>()).prop_map(|(sector, count, unmap)| Op::Zero { sector, count, unmap }),
        1 => (0u64..2560, 1u64..3000).prop_map(|(sector, count)| Op::Discard { sector, count }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn clamp(sector: u64, count: u64, ss: u64) -> (u64, u64) {
    let total = SIZE / ss;
    let s = (sector * 512 / ss).min(total - 1);
    let c = (count * 512 / ss).clamp(1, total - s);
    (s * ss, c * ss)
}

fn run_case(kind: Subformat, ss: u32, ops: &[Op]) {
    let mem = Arc::new(MemStorage::new());
    let mut o = match kind {
        Subformat::Fixed => CreateOptions::fixed(SIZE),
        Subformat::Dynamic => CreateOptions::dynamic(SIZE),
        Subformat::Differencing => CreateOptions::differencing(
            SIZE,
            ParentRef {
                data_write_guid: uuid::Uuid::from_u128(9),
                relative_path: "p.vhdx".into(),
                absolute_path: None,
            },
        ),
    };
    o.block_size = Some(1 << 20);
    o.logical_sector_size = ss;
    let mut dev = create(mem.clone(), &o).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let ssz = u64::from(ss);
    for op in ops {
        match *op {
            Op::Write {
                sector,
                count,
                fill,
            } => {
                let (off, len) = clamp(sector, count, ssz);
                let data: Vec<u8> = (0..len).map(|i| fill ^ (i / 512) as u8).collect();
                dev.write_at(&data, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Zero {
                sector,
                count,
                unmap,
            } => {
                let (off, len) = clamp(sector, count, ssz);
                dev.write_zeroes(off, len, unmap).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Discard { sector, count } => {
                let (off, len) = clamp(sector, count, ssz);
                dev.discard(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Flush => dev.flush().unwrap(),
            Op::Reopen => {
                dev.close().unwrap();
                drop(dev);
                dev = VhdxFile::open(
                    mem.clone(),
                    &vhdx_format::OpenOptions::new().read_only(false),
                )
                .unwrap();
            }
        }
    }
    assert!(read_all(&dev) == model);
    let mut pos = 0;
    while pos < SIZE {
        let r = dev.block_status(pos, SIZE - pos).unwrap();
        assert!(r.len > 0 && r.len % ssz == 0);
        if r.status != BlockStatus::Data {
            assert!(model[pos as usize..(pos + r.len) as usize]
                .iter()
                .all(|&b| b == 0));
        }
        pos += r.len;
    }
    dev.close().unwrap();
    drop(dev);
    let ro = VhdxFile::open(
        mem.as_ref().clone(),
        &vhdx_format::OpenOptions::new().read_only(true),
    )
    .unwrap();
    assert!(read_all(&ro) == model);
    data_runs_read_alike(&ro, &model);
}

/// `read_data_at` over every run `block_status` calls data returns the model's bytes (it skips
/// the sector bitmap, so it must only ever be trusted on such runs).
fn data_runs_read_alike(dev: &VhdxFile<MemStorage>, model: &[u8]) {
    let mut pos = 0;
    while pos < SIZE {
        let r = dev.block_status(pos, SIZE - pos).unwrap();
        if r.status == BlockStatus::Data {
            let mut buf = vec![0u8; r.len as usize];
            dev.read_data_at(&mut buf, pos).unwrap();
            assert!(
                buf == model[pos as usize..(pos + r.len) as usize],
                "data run at {pos}"
            );
        }
        pos += r.len;
    }
    // Checked like read_at: past the end and misaligned requests are errors.
    let mut b = vec![0u8; 512];
    assert!(dev.read_data_at(&mut b, SIZE).is_err());
    assert!(dev.read_data_at(&mut b[..100], 0).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn dynamic_matches_model(ops in prop::collection::vec(op(), 1..30)) {
        run_case(Subformat::Dynamic, 512, &ops);
    }

    #[test]
    fn dynamic_4k_matches_model(ops in prop::collection::vec(op(), 1..30)) {
        run_case(Subformat::Dynamic, 4096, &ops);
    }

    #[test]
    fn fixed_matches_model(ops in prop::collection::vec(op(), 1..30)) {
        run_case(Subformat::Fixed, 512, &ops);
    }

    #[test]
    fn differencing_matches_model(ops in prop::collection::vec(op(), 1..30)) {
        run_case(Subformat::Differencing, 512, &ops);
    }
}
