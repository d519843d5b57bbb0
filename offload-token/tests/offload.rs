//! FSCTL_OFFLOAD_READ / FSCTL_OFFLOAD_WRITE semantics: short reads (size cap, end of disk,
//! end of data with ALL_ZERO_BEYOND_CURRENT_RANGE), zero-data tokens for zero runs, short
//! writes, and callers that loop to completion with byte-exact data.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use block_io::BlockDevice;
use common::*;
use offload_token::{
    Access, Acl, Error, KeyRing, Limits, Opened, Principal, Provider, ReadOutput, Token,
    TrackedDisk, ALL_ZERO_BEYOND_CURRENT_RANGE,
};

const MIB: u64 = 1 << 20;

fn small_limits() -> Limits {
    Limits {
        max_token_len: MIB,
        max_write_len: 128 << 10,
        min_zero_run: 256 << 10,
        ..Limits::default()
    }
}

fn length_of(w: &World, r: &ReadOutput) -> u64 {
    match w.provider.open(&r.token).unwrap() {
        Opened::Sealed(b) => b.length,
        Opened::Zero => r.transfer_length,
    }
}

#[test]
fn offload_read_is_capped_per_token() {
    let w = world_with(8 * MIB, 8 * MIB, small_limits());
    let r = w
        .provider
        .offload_read(&w.alice, &w.src, 0, 8 * MIB, None)
        .unwrap();
    assert_eq!(r.transfer_length, MIB);
    assert_eq!(r.flags, 0);
    assert_eq!(length_of(&w, &r), MIB);
}

#[test]
fn offload_read_stops_at_the_end_of_the_disk() {
    let w = world_with(2 * MIB, 2 * MIB, small_limits());
    let r = w
        .provider
        .offload_read(&w.alice, &w.src, 2 * MIB - 4096, 64 * MIB, None)
        .unwrap();
    assert_eq!(r.transfer_length, 4096);
    assert_eq!(r.flags, 0);
}

#[test]
fn offload_read_stops_at_the_end_of_the_data() {
    // Data in the first 200 KiB, zeros after.
    let w = world_with(8 * MIB, 200 << 10, small_limits());
    let r = w
        .provider
        .offload_read(&w.alice, &w.src, 0, 4 * MIB, None)
        .unwrap();
    // MemStorage allocates in 64 KiB chunks: the data run ends at 256 KiB.
    assert_eq!(r.transfer_length, 256 << 10);
    assert_eq!(r.flags, ALL_ZERO_BEYOND_CURRENT_RANGE);
    assert!(r.all_zero_beyond());
    // Data past the asked range does not matter; data inside it past the cap does.
    w.src.write_at(&[5u8; 512], 3 * MIB).unwrap();
    let r = w
        .provider
        .offload_read(&w.alice, &w.src, 0, 2 * MIB, None)
        .unwrap();
    assert_eq!(
        (r.transfer_length, r.flags),
        (256 << 10, ALL_ZERO_BEYOND_CURRENT_RANGE)
    );
    let r = w
        .provider
        .offload_read(&w.alice, &w.src, 0, 4 * MIB, None)
        .unwrap();
    assert_eq!((r.transfer_length, r.flags), (MIB, 0));
}

#[test]
fn zero_runs_get_the_zero_token() {
    let w = world_with(8 * MIB, 0, small_limits());
    // All zeros: one zero token for the whole asked range, past the per-token cap.
    let r = w
        .provider
        .offload_read(&w.alice, &w.src, 0, 8 * MIB, None)
        .unwrap();
    assert!(r.token.is_zero());
    assert_eq!((r.transfer_length, r.flags), (8 * MIB, 0));
    assert_eq!(w.provider.live_tokens_of(&w.alice), 0);
    // A long leading run of zeros, then data: the zero token up to the data.
    w.src.write_at(&pattern(1, 4096), 3 * MIB).unwrap();
    let r = w
        .provider
        .offload_read(&w.alice, &w.src, 0, 8 * MIB, None)
        .unwrap();
    assert!(r.token.is_zero());
    assert_eq!(r.transfer_length, 3 * MIB);
    // A short leading run is folded into a sealed token.
    let r = w
        .provider
        .offload_read(&w.alice, &w.src, 3 * MIB - 4096, 8192, None)
        .unwrap();
    assert!(!r.token.is_zero());
    assert_eq!(r.transfer_length, 8192);
}

/// Reads and writes in loops, as an initiator does, honouring short results.
fn loop_copy(w: &World, src_off: u64, dst: &TrackedDisk, dst_off: u64, len: u64) -> (u64, u64) {
    let (mut reads, mut writes) = (0, 0);
    let mut done = 0;
    while done < len {
        let r = w
            .provider
            .offload_read(&w.alice, &w.src, src_off + done, len - done, None)
            .unwrap();
        reads += 1;
        assert!(r.transfer_length > 0 && r.transfer_length <= len - done);
        let mut t = 0;
        while t < r.transfer_length {
            let n = w
                .provider
                .offload_write(
                    &w.alice,
                    dst,
                    dst_off + done + t,
                    r.transfer_length - t,
                    &r.token,
                    t,
                )
                .unwrap();
            assert!(n > 0 && n <= 128 << 10);
            writes += 1;
            t += n;
        }
        done += r.transfer_length;
        if r.all_zero_beyond() {
            let z = Token::zero();
            while done < len {
                done += w
                    .provider
                    .offload_write(&w.alice, dst, dst_off + done, len - done, &z, 0)
                    .unwrap();
                writes += 1;
            }
        }
    }
    (reads, writes)
}

#[test]
fn partial_reads_and_writes_loop_to_completion() {
    let w = world_with(8 * MIB, 5 * MIB + 4096, small_limits());
    // Pre-fill the destination so zeros must really be written.
    w.dst.write_at(&vec![0xEE; 8 * MIB as usize], 0).unwrap();
    let (reads, writes) = loop_copy(&w, 4096, &w.dst, 8192, 7 * MIB);
    assert!(reads >= 6, "{reads} reads");
    assert!(writes >= 40, "{writes} writes");
    let src = read(w.src.as_ref(), 4096, (7 * MIB) as usize);
    let dst = read(w.dst.as_ref(), 8192, (7 * MIB) as usize);
    assert!(src == dst, "data differs");
    // Outside the copied range the destination is untouched.
    assert!(read(w.dst.as_ref(), 0, 8192).iter().all(|&b| b == 0xEE));
    // The provider's own loop gives the same.
    let w2 = world_with(8 * MIB, 5 * MIB + 4096, small_limits());
    let st = w2
        .provider
        .copy(&w2.alice, &w2.src, 4096, &w2.dst, 8192, 7 * MIB)
        .unwrap();
    assert_eq!(st.data_bytes + st.zero_bytes, 7 * MIB);
    // The data ends near 5 MiB (64 KiB allocation chunks); the rest went as zeros.
    assert!(st.zero_bytes >= MIB, "{st:?}");
    assert!(read(w2.dst.as_ref(), 8192, (7 * MIB) as usize) == src);
}

#[test]
fn four_k_sectors_are_honoured() {
    let clock = Arc::new(offload_token::ManualClock::new(T0));
    let acl = Arc::new(Acl::new());
    let src = disk_with(1, 4 * MIB, 4096);
    let dst = disk_with(2, 4 * MIB, 4096);
    src.write_at(&pattern(9, (4 * MIB) as usize), 0).unwrap();
    let a = Principal::new("a");
    acl.grant(&a.id(), Access::Read, src.id());
    acl.grant(&a.id(), Access::Write, dst.id());
    let p = Provider::new(PROVIDER, KeyRing::new(key1()), acl).with_clock(clock);
    assert!(matches!(
        p.offload_read(&a, &src, 512, 4096, None),
        Err(Error::Unaligned { sector: 4096, .. })
    ));
    let r = p.offload_read(&a, &src, 4096, MIB, None).unwrap();
    assert!(matches!(
        p.offload_write(&a, &dst, 0, 4096, &r.token, 512),
        Err(Error::Unaligned { .. })
    ));
    assert_eq!(p.offload_write(&a, &dst, 0, MIB, &r.token, 0).unwrap(), MIB);
    assert!(read(dst.as_ref(), 0, MIB as usize) == read(src.as_ref(), 4096, MIB as usize));
}

#[test]
fn a_write_to_the_source_mid_copy_invalidates_the_token() {
    let w = world_with(4 * MIB, 4 * MIB, small_limits());
    let r = w
        .provider
        .offload_read(&w.alice, &w.src, 0, MIB, None)
        .unwrap();
    assert_eq!(r.transfer_length, MIB);
    let before = read(w.src.as_ref(), 0, MIB as usize);
    // The first partial write goes through.
    let n = w
        .provider
        .offload_write(&w.alice, &w.dst, 0, MIB, &r.token, 0)
        .unwrap();
    assert_eq!(n, 128 << 10);
    // A guest write lands in the part not yet copied.
    w.src.write_at(&[0xAB; 4096], 512 << 10).unwrap();
    assert!(matches!(
        w.provider
            .offload_write(&w.alice, &w.dst, n, MIB - n, &r.token, n),
        Err(Error::Invalidated(_))
    ));
    // What arrived is the token's data, and nothing after it.
    assert!(read(w.dst.as_ref(), 0, n as usize) == before[..n as usize]);
    assert!(read(w.dst.as_ref(), n, (MIB - n) as usize)
        .iter()
        .all(|&b| b == 0));
    // Re-minting gives the new data.
    let st = w
        .provider
        .copy(&w.alice, &w.src, 0, &w.dst, 0, MIB)
        .unwrap();
    assert_eq!(st.data_bytes, MIB);
    assert!(read(w.dst.as_ref(), 0, MIB as usize) == read(w.src.as_ref(), 0, MIB as usize));
}

#[test]
fn a_redeem_into_its_own_source_range_invalidates_it_after_writing() {
    let w = world_with(4 * MIB, MIB, small_limits());
    let r = w
        .provider
        .offload_read(&w.alice, &w.src, 0, 64 << 10, None)
        .unwrap();
    let data = read(w.src.as_ref(), 0, 64 << 10);
    // Copy onto itself shifted by 4 KiB: the write overlaps the token's own range.
    assert_eq!(
        w.provider
            .offload_write(&w.alice, &w.src, 4096, 64 << 10, &r.token, 0)
            .unwrap(),
        64 << 10
    );
    assert!(read(w.src.as_ref(), 4096, 64 << 10) == data);
    assert!(matches!(
        w.provider
            .offload_write(&w.alice, &w.dst, 0, 4096, &r.token, 0),
        Err(Error::Invalidated(_))
    ));
}

#[test]
fn admitted_tokens_are_bound_to_the_source_stamp() {
    let w = world_with(4 * MIB, MIB, small_limits());
    let stamp = [7u8; 32];
    let req = offload_token::ReadRequest {
        offset: 0,
        len: 64 << 10,
        source_stamp: stamp,
        locator: b"/images/a.vhdx".to_vec(),
        ..Default::default()
    };
    let t = w
        .provider
        .offload_read_with(&w.alice, &w.src, &req)
        .unwrap()
        .token;
    // Another process: a fresh provider with the same identity and key.
    let other =
        Provider::new(PROVIDER, KeyRing::new(key1()), w.acl.clone()).with_clock(w.clock.clone());
    assert!(matches!(
        other.admit(&t, &w.src, &[8u8; 32]),
        Err(Error::SourceChanged)
    ));
    let b = other.admit(&t, &w.src, &stamp).unwrap();
    assert_eq!(b.locator, b"/images/a.vhdx");
    assert_eq!(
        other
            .offload_write(&w.alice, &w.dst, 0, 64 << 10, &t, 0)
            .unwrap(),
        64 << 10
    );
    // Another disk under the token's name is refused.
    let fresh =
        Provider::new(PROVIDER, KeyRing::new(key1()), w.acl.clone()).with_clock(w.clock.clone());
    assert!(matches!(
        fresh.admit(&t, &w.dst, &stamp),
        Err(Error::SourceChanged)
    ));
    // Admission counts inactivity from the issue time.
    w.clock.advance(std::time::Duration::from_secs(31));
    assert!(matches!(
        fresh.admit(&t, &w.src, &stamp),
        Err(Error::Expired(_))
    ));
}
