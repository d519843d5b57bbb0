//! Shared fixtures: memory-backed disks behind `TrackedDisk`s, a provider on a manual clock,
//! and principals with an ACL.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use block_io::{BlockDevice, MemStorage, RawDisk, RawOptions, Storage};
use offload_token::{
    Access, Acl, KeyRing, Limits, ManualClock, Principal, Provider, ProviderKey, TrackedDisk,
};
use uuid::Uuid;

pub const T0: u64 = 1_700_000_000_000;

/// A raw disk of `size` bytes over sparse memory, with `sector`-byte sectors.
pub fn disk_with(id: u128, size: u64, sector: u32) -> Arc<TrackedDisk> {
    let m = MemStorage::new();
    m.set_len(size).unwrap();
    let d = RawDisk::open(m, &RawOptions::new().sector_size(sector)).unwrap();
    Arc::new(TrackedDisk::with_id(Arc::new(d), Uuid::from_u128(id)))
}

pub fn disk(id: u128, size: u64) -> Arc<TrackedDisk> {
    disk_with(id, size, 512)
}

/// Deterministic non-zero bytes.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

pub fn read(d: &dyn BlockDevice, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    d.read_at(&mut b, off).unwrap();
    b
}

pub struct World {
    pub provider: Provider,
    pub clock: Arc<ManualClock>,
    pub acl: Arc<Acl>,
    pub alice: Principal,
    pub bob: Principal,
    pub mallory: Principal,
    pub src: Arc<TrackedDisk>,
    pub dst: Arc<TrackedDisk>,
}

pub const PROVIDER: Uuid = Uuid::from_u128(0xabc);

pub fn key1() -> ProviderKey {
    ProviderKey::new(1, [0x42; 32])
}

/// Alice may read `src` and write `dst`; Bob and Mallory may write `dst`. `src` holds a
/// pattern over its first `data` bytes, zeros after.
pub fn world_with(size: u64, data: u64, limits: Limits) -> World {
    let clock = Arc::new(ManualClock::new(T0));
    let acl = Arc::new(Acl::new());
    let src = disk(1, size);
    let dst = disk(2, size);
    if data > 0 {
        src.write_at(&pattern(7, data as usize), 0).unwrap();
    }
    let (alice, bob, mallory) = (
        Principal::new("alice"),
        Principal::new("bob"),
        Principal::new("mallory"),
    );
    acl.grant(&alice.id(), Access::Read, src.id());
    acl.grant(&alice.id(), Access::Read, dst.id());
    acl.grant(&alice.id(), Access::Write, src.id());
    for p in [&alice, &bob, &mallory] {
        acl.grant(&p.id(), Access::Write, dst.id());
    }
    let provider = Provider::new(PROVIDER, KeyRing::new(key1()), acl.clone())
        .with_clock(clock.clone())
        .with_limits(limits);
    World {
        provider,
        clock,
        acl,
        alice,
        bob,
        mallory,
        src,
        dst,
    }
}

pub fn world() -> World {
    world_with(4 << 20, 4 << 20, Limits::default())
}
