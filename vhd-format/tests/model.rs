//! Property tests against a simple model: random reads, writes, write-zeroes and discards on
//! dynamic, fixed and differencing images, with reopen checks and block_status checks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use block_io::{BlockDevice, BlockStatus, MemStorage};
use proptest::prelude::*;
use vhd_format::{CreateOptions, DifferencingOptions, Subformat, VhdFile};

const SIZE: u64 = 64 * 4096 + 7 * 512; // odd size: a partial last block
const BLOCK: u32 = 16 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Write {
        sector: u64,
        count: u64,
        tag: u64,
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
    let sectors = SIZE / 512;
    let range = (0..sectors).prop_flat_map(move |s| (Just(s), 1..=(sectors - s).min(80)));
    prop_oneof![
        6 => (range.clone(), any::<u64>()).prop_map(|((sector, count), tag)| Op::Write { sector, count, tag }),
        1 => (range.clone(), any::<bool>()).prop_map(|((sector, count), unmap)| Op::Zero { sector, count, unmap }),
        1 => range.prop_map(|(sector, count)| Op::Discard { sector, count }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

/// Sector model: `None` = absent from the layer (reads zeros, status Unallocated).
type Model = Vec<Option<[u8; 512]>>;

fn apply(model: &mut Model, op: &Op, diff: bool) {
    match *op {
        Op::Write { sector, count, tag } => {
            let data = common::pattern(tag, (count * 512) as usize);
            for i in 0..count {
                let mut s = [0u8; 512];
                s.copy_from_slice(&data[(i * 512) as usize..((i + 1) * 512) as usize]);
                model[(sector + i) as usize] = Some(s);
            }
        }
        Op::Zero { sector, count, .. } => {
            for i in sector..sector + count {
                // Dynamic: zeros in place (unallocated stays unallocated). Diff: stored zeros.
                let m = &mut model[i as usize];
                if diff || m.is_some() {
                    *m = Some([0; 512]);
                }
            }
        }
        Op::Discard { sector, count } => {
            for i in sector..sector + count {
                let m = &mut model[i as usize];
                if diff {
                    *m = None;
                } else if m.is_some() {
                    *m = Some([0; 512]);
                }
            }
        }
        Op::Flush | Op::Reopen => {}
    }
}

fn verify(f: &VhdFile<Arc<MemStorage>>, model: &Model, diff: bool) {
    let mut buf = vec![0u8; SIZE as usize];
    f.read_at(&mut buf, 0).unwrap();
    for (i, m) in model.iter().enumerate() {
        let want = m.unwrap_or([0; 512]);
        assert_eq!(&buf[i * 512..(i + 1) * 512], &want[..], "sector {i}");
    }
    if diff {
        let mut off = 0;
        while off < SIZE {
            let run = f.block_status(off, SIZE - off).unwrap();
            assert!(run.len > 0 && run.len % 512 == 0);
            for s in off / 512..(off + run.len) / 512 {
                let present = model[s as usize].is_some();
                assert_eq!(
                    run.status == BlockStatus::Data,
                    present,
                    "status of sector {s}: {run:?}"
                );
            }
            if run.status == BlockStatus::Data {
                // read_data_at skips the bitmap: on a data run it must read what read_at does.
                let mut data = vec![0u8; run.len as usize];
                f.read_data_at(&mut data, off).unwrap();
                assert!(
                    data == buf[off as usize..(off + run.len) as usize],
                    "run at {off}"
                );
            }
            off += run.len;
        }
    }
    let mut b = vec![0u8; 512];
    assert!(f.read_data_at(&mut b, SIZE).is_err(), "past the end");
    assert!(f.read_data_at(&mut b[..100], 0).is_err(), "misaligned");
}

fn run_ops(ops: &[Op], kind: &str) {
    let storage = Arc::new(MemStorage::new());
    let diff = kind == "diff";
    let mut f = match kind {
        "diff" => {
            let mut o = DifferencingOptions {
                size: SIZE,
                block_size: BLOCK,
                parent_unique_id: uuid::Uuid::from_bytes([9; 16]),
                parent_timestamp: 5,
                parent_name: "parent.vhd".into(),
                absolute_path: Some("/x/parent.vhd".into()),
                relative_path: Some("./parent.vhd".into()),
                unique_id: None,
                timestamp: None,
                creator: Default::default(),
            };
            o.timestamp = Some(1);
            VhdFile::create_differencing(storage.clone(), &o).unwrap()
        }
        "fixed" => {
            VhdFile::create(storage.clone(), &CreateOptions::new(SIZE, Subformat::Fixed)).unwrap()
        }
        _ => {
            let mut o = CreateOptions::new(SIZE, Subformat::Dynamic);
            o.block_size = BLOCK;
            VhdFile::create(storage.clone(), &o).unwrap()
        }
    };
    let mut model: Model = vec![
        if kind == "fixed" {
            Some([0; 512])
        } else {
            None
        };
        (SIZE / 512) as usize
    ];
    for op in ops {
        match *op {
            Op::Write { sector, count, tag } => {
                f.write_at(&common::pattern(tag, (count * 512) as usize), sector * 512)
                    .unwrap();
            }
            Op::Zero {
                sector,
                count,
                unmap,
            } => {
                f.write_zeroes(sector * 512, count * 512, unmap).unwrap();
            }
            Op::Discard { sector, count } => f.discard(sector * 512, count * 512).unwrap(),
            Op::Flush => f.flush().unwrap(),
            Op::Reopen => {
                f.flush().unwrap();
                drop(f);
                f = VhdFile::open(
                    storage.clone(),
                    &vhd_format::OpenOptions::new().read_only(false),
                )
                .unwrap();
            }
        }
        apply(&mut model, op, diff);
    }
    verify(&f, &model, diff);
    f.flush().unwrap();
    drop(f);
    let f = VhdFile::open(
        storage.clone(),
        &vhd_format::OpenOptions::new().read_only(true),
    )
    .unwrap();
    verify(&f, &model, diff);
    let r = f.check().unwrap();
    assert!(r.is_clean(), "{r:?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn dynamic_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        run_ops(&ops, "dynamic");
    }

    #[test]
    fn differencing_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        run_ops(&ops, "diff");
    }

    #[test]
    fn fixed_matches_model(ops in proptest::collection::vec(op(), 1..30)) {
        run_ops(&ops, "fixed");
    }
}

#[test]
fn concurrent_writers_allocate_safely() {
    let storage = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(8 << 20, Subformat::Dynamic);
    o.block_size = 64 * 1024;
    let f = Arc::new(VhdFile::create(storage.clone(), &o).unwrap());
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let f = f.clone();
            std::thread::spawn(move || {
                for i in 0..64u64 {
                    // Interleaved 4 KiB pieces so threads race for the same blocks.
                    let off = (i * 4 + t) * 4096 * 8 % (8 << 20);
                    f.write_at(&common::pattern(t * 1000 + i, 4096), off)
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    f.flush().unwrap();
    let g = VhdFile::open(
        storage.clone(),
        &vhd_format::OpenOptions::new().read_only(true),
    )
    .unwrap();
    for t in 0..4u64 {
        for i in 0..64u64 {
            let off = (i * 4 + t) * 4096 * 8 % (8 << 20);
            let mut buf = vec![0u8; 4096];
            g.read_at(&mut buf, off).unwrap();
            assert_eq!(buf, common::pattern(t * 1000 + i, 4096), "t{t} i{i}");
        }
    }
    assert!(g.check().unwrap().is_clean());
}
