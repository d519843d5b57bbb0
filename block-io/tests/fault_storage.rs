//! The fault-injecting backend, tested against a model: a cut never changes synced bytes, every
//! byte after a crash comes from the durable image or from a pending write that covers it, and
//! every subset, tear and order of unsynced writes is reachable from some seed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;

use block_io::{CutPoint, ErrorKind, FaultStorage, Injection, MemStorage, Storage, WriteFate};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: usize, byte: u8 },
    Punch { offset: u64, len: u64 },
    SetLen(u64),
    Sync,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0u64..16384, 1usize..3000, any::<u8>())
            .prop_map(|(offset, len, byte)| Op::Write { offset, len, byte }),
        1 => (0u64..16384, 1u64..4096).prop_map(|(offset, len)| Op::Punch { offset, len }),
        1 => (0u64..20000).prop_map(Op::SetLen),
        2 => Just(Op::Sync),
    ]
}

/// Applies `op` to a byte-vector model.
fn apply_model(model: &mut Vec<u8>, op: &Op) {
    match *op {
        Op::Write { offset, len, byte } => {
            let end = offset as usize + len;
            if model.len() < end {
                model.resize(end, 0);
            }
            model[offset as usize..end].fill(byte);
        }
        Op::Punch { offset, len } => {
            let end = ((offset + len) as usize).min(model.len());
            if (offset as usize) < end {
                model[offset as usize..end].fill(0);
            }
        }
        Op::SetLen(n) => model.resize(n as usize, 0),
        Op::Sync => {}
    }
}

fn run(s: &FaultStorage, op: &Op) -> block_io::Result<()> {
    match *op {
        Op::Write { offset, len, byte } => s.write_at(&vec![byte; len], offset),
        Op::Punch { offset, len } => s.punch_hole(offset, len),
        Op::SetLen(n) => s.set_len(n),
        Op::Sync => s.sync_data(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Runs ops until a cut at a random index, then checks every byte of several crash images.
    #[test]
    fn crash_keeps_synced_bytes_and_takes_only_pending_ones(
        ops in proptest::collection::vec(op(), 1..40),
        cut in 0u64..45,
        seeds in proptest::collection::vec(any::<u64>(), 1..6),
    ) {
        let s = FaultStorage::new(MemStorage::new());
        s.set_cut(CutPoint::AfterOps(cut));
        let mut live = Vec::new();
        let mut durable = Vec::new();
        let mut pending: Vec<Op> = Vec::new();
        for op in &ops {
            let live_len = live.len() as u64;
            match run(&s, op) {
                Ok(()) => {
                    apply_model(&mut live, op);
                    // A hole wholly past the end changes nothing and is not queued.
                    if matches!(*op, Op::Punch { offset, .. } if offset >= live_len) {
                        continue;
                    }
                    if matches!(op, Op::Sync) {
                        for p in pending.drain(..) {
                            apply_model(&mut durable, &p);
                        }
                    } else {
                        pending.push(op.clone());
                    }
                }
                Err(e) => {
                    prop_assert_eq!(e.kind(), ErrorKind::PowerCut);
                    break;
                }
            }
        }
        // Reads see the live model until the cut.
        if !s.is_cut() {
            prop_assert_eq!(s.live_image().to_vec().unwrap(), live.clone());
        }
        prop_assert_eq!(s.durable_image().to_vec().unwrap(), durable.clone());
        prop_assert_eq!(s.pending_writes(), pending.len());
        for &seed in &seeds {
            let img = s.crash_image(seed).to_vec().unwrap();
            // Deterministic: the same seed gives the same image.
            prop_assert_eq!(&img, &s.crash_image(seed).to_vec().unwrap());
            // Any byte equals the durable byte or a byte some pending op could have left there.
            let covers = |i: usize, v: u8| pending.iter().any(|p| match *p {
                Op::Write { offset, len, byte } =>
                    (offset as usize..offset as usize + len).contains(&i) && byte == v,
                Op::Punch { offset, len } =>
                    (offset as usize..(offset + len) as usize).contains(&i) && v == 0,
                // A size change can zero a byte (shrink then grow) or create it as zero.
                Op::SetLen(_) => v == 0,
                Op::Sync => false,
            });
            for (i, &v) in img.iter().enumerate() {
                let d = durable.get(i).copied();
                prop_assert!(d == Some(v) || covers(i, v) || (d.is_none() && v == 0),
                    "byte {} = {} neither durable ({:?}) nor pending", i, v, d);
            }
            // With nothing pending, the crash image is exactly the durable image.
            if pending.is_empty() {
                prop_assert_eq!(&img, &durable);
            }
        }
    }
}

#[test]
fn every_subset_of_unsynced_writes_is_reachable() {
    let s = FaultStorage::new(MemStorage::from_bytes(&[0u8; 3 * 512]));
    s.sync_data().unwrap();
    for i in 0..3u8 {
        s.write_at(&[i + 1; 512], u64::from(i) * 512).unwrap();
    }
    s.cut_now();
    let mut seen = HashSet::new();
    for seed in 0..500 {
        let img = s.crash_image(seed).to_vec().unwrap();
        let mask: Vec<bool> = (0..3).map(|i| img[i * 512] != 0).collect();
        seen.insert(mask);
    }
    assert_eq!(seen.len(), 8, "reached only {seen:?}");
}

#[test]
fn every_tear_of_one_write_is_reachable() {
    let s = FaultStorage::new(MemStorage::from_bytes(&[0u8; 4 * 512]));
    s.write_at(&[9u8; 3 * 512], 512).unwrap();
    assert_eq!(s.pending_sectors(0), Some(3));
    let mut seen = HashSet::new();
    for seed in 0..2000 {
        let img = s.crash_image(seed).to_vec().unwrap();
        assert_eq!(img[0], 0, "a sector the write never touched changed");
        let mask: Vec<bool> = (1..4).map(|i| img[i * 512] == 9).collect();
        // A sector is never half-written.
        for i in 1..4 {
            let sector = &img[i * 512..(i + 1) * 512];
            assert!(sector.iter().all(|&b| b == sector[0]));
        }
        seen.insert(mask);
    }
    assert_eq!(seen.len(), 8, "reached only {seen:?}");
}

#[test]
fn both_orders_of_overlapping_writes_are_reachable() {
    let s = FaultStorage::new(MemStorage::from_bytes(&[0u8; 512]));
    s.write_at(&[1u8; 512], 0).unwrap();
    s.write_at(&[2u8; 512], 0).unwrap();
    let seen: HashSet<u8> = (0..200)
        .map(|seed| s.crash_image(seed).to_vec().unwrap()[0])
        .collect();
    assert_eq!(seen, HashSet::from([0, 1, 2]));
    // Explicit plans reach each order too.
    let img = s
        .crash_image_with(&[(1, WriteFate::Whole), (0, WriteFate::Whole)])
        .unwrap();
    assert_eq!(img.to_vec().unwrap()[0], 1);
    let img = s
        .crash_image_with(&[(0, WriteFate::Whole), (1, WriteFate::Whole)])
        .unwrap();
    assert_eq!(img.to_vec().unwrap()[0], 2);
}

#[test]
fn explicit_plans_are_validated() {
    let s = FaultStorage::new(MemStorage::new());
    s.write_at(&[1u8; 1024], 0).unwrap();
    s.set_len(4096).unwrap();
    let bad = |plan: &[(usize, WriteFate)]| s.crash_image_with(plan).unwrap_err().kind();
    assert_eq!(bad(&[(2, WriteFate::Whole)]), ErrorKind::InvalidInput);
    assert_eq!(
        bad(&[(0, WriteFate::Whole), (0, WriteFate::Lost)]),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        bad(&[(0, WriteFate::Torn(vec![true]))]),
        ErrorKind::InvalidInput
    );
    assert_eq!(
        bad(&[(1, WriteFate::Torn(vec![true]))]),
        ErrorKind::InvalidInput
    );
    let img = s
        .crash_image_with(&[(0, WriteFate::Torn(vec![false, true]))])
        .unwrap()
        .to_vec()
        .unwrap();
    assert_eq!(img.len(), 1024);
    assert!(img[..512].iter().all(|&b| b == 0) && img[512..].iter().all(|&b| b == 1));
}

#[test]
fn cut_points_count_the_right_operations() {
    // AfterWrites: syncs do not count.
    let s = FaultStorage::empty();
    s.set_cut(CutPoint::AfterWrites(2));
    s.write_at(&[1], 0).unwrap();
    s.sync_data().unwrap();
    s.write_at(&[2], 1).unwrap();
    s.sync_data().unwrap();
    assert_eq!(s.write_at(&[3], 2).unwrap_err().kind(), ErrorKind::PowerCut);
    assert!(s.is_cut());
    assert_eq!(s.sync_data().unwrap_err().kind(), ErrorKind::PowerCut);
    let mut b = [0u8; 1];
    assert_eq!(
        s.read_at(&mut b, 0).unwrap_err().kind(),
        ErrorKind::PowerCut
    );
    assert_eq!(s.durable_image().to_vec().unwrap(), vec![1, 2]);

    // AfterSyncs: the (n+1)-th sync strikes before it syncs.
    let s = FaultStorage::empty();
    s.set_cut(CutPoint::AfterSyncs(1));
    s.write_at(&[1], 0).unwrap();
    s.sync_data().unwrap();
    s.write_at(&[2], 1).unwrap();
    s.write_at(&[3], 2).unwrap();
    assert_eq!(s.sync_data().unwrap_err().kind(), ErrorKind::PowerCut);
    assert_eq!(s.durable_image().to_vec().unwrap(), vec![1]);
    assert_eq!(s.pending_writes(), 2);

    // AfterOps(0): nothing gets through.
    let s = FaultStorage::empty();
    s.set_cut(CutPoint::AfterOps(0));
    assert_eq!(s.set_len(10).unwrap_err().kind(), ErrorKind::PowerCut);
    assert_eq!(s.ops(), 0);
}

#[test]
fn injected_errors_fire_once_at_their_index() {
    let s = FaultStorage::new(MemStorage::from_bytes(&[5u8; 100]));
    s.inject(Injection::ReadError { nth: 1 });
    s.inject(Injection::NoSpace { nth: 0 });
    s.inject(Injection::WriteError { nth: 2 });
    let mut b = [0u8; 10];
    s.read_at(&mut b, 0).unwrap();
    assert_eq!(s.read_at(&mut b, 0).unwrap_err().kind(), ErrorKind::Io);
    s.read_at(&mut b, 0).unwrap();
    assert_eq!(s.write_at(&[1], 0).unwrap_err().kind(), ErrorKind::NoSpace);
    s.write_at(&[1], 0).unwrap();
    assert_eq!(s.write_at(&[2], 1).unwrap_err().kind(), ErrorKind::Io);
    s.write_at(&[3], 2).unwrap();
    let live = s.live_image().to_vec().unwrap();
    assert_eq!(&live[..3], &[1, 5, 3], "failed writes are not carried out");
}

#[test]
fn failed_sync_drops_pending_writes_forever() {
    let s = FaultStorage::new(MemStorage::from_bytes(&[0u8; 512]));
    s.inject(Injection::SyncError { nth: 0 });
    s.write_at(&[7u8; 512], 0).unwrap();
    assert_eq!(s.sync_data().unwrap_err().kind(), ErrorKind::Io);
    // The page cache still shows the write ...
    assert_eq!(s.live_image().to_vec().unwrap()[0], 7);
    // ... but a retried sync does not make it durable.
    s.sync_data().unwrap();
    assert_eq!(s.durable_image().to_vec().unwrap()[0], 0);
    for seed in 0..50 {
        assert_eq!(s.crash_image(seed).to_vec().unwrap()[0], 0);
    }
}
