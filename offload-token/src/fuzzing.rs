//! The fuzzing entry point shared by `fuzz/fuzz_targets/offload_token.rs` and the corpus
//! replay test (`tests/fuzz_corpus.rs`): token parsing and redeem against a fixed provider.
//!
//! An input is `[mode u8][material: 512 bytes, zero-padded][dst offset u64 LE][length u64
//! LE][token offset u64 LE][principal u8][events u8]` (missing bytes read as zero). The mode
//! picks the token: 0 the material itself, 1 the provider's minted token XOR the material,
//! 2 the zero-data token XOR the material. Events (bits) happen between mint and redeem:
//! 1 a write into the token's source range, 2 revocation, 4 the clock passes the TTL, 8 the
//! sealing key is rotated and the old one retired. The principal is alice (minter, in the
//! audience), bob (in the audience) or mallory (may write, not in the audience).
//!
//! [`run`] checks that no forged or altered token is ever redeemed, that a genuine one is
//! redeemed exactly when nothing refused it, and that the bytes written are the token's.

use std::sync::Arc;
use std::time::Duration;

use block_io::{BlockDevice, MemStorage, RawDisk, Storage};
use uuid::Uuid;
use zerocopy::FromBytes;

use crate::acl::{Access, Acl, Principal};
use crate::body::{Audience, RawBody, TokenBody};
use crate::clock::ManualClock;
use crate::envelope::{Token, TOKEN_SIZE};
use crate::key::{KeyRing, ProviderKey};
use crate::provider::{Provider, ReadRequest};
use crate::tracked::TrackedDisk;

/// Size of both disks.
pub const DISK_SIZE: u64 = 1 << 20;
/// Where the minted token's range starts.
pub const TOKEN_OFFSET: u64 = 64 << 10;
/// The minted token's length.
pub const TOKEN_LEN: u64 = 256 << 10;
/// Length of a complete input.
pub const INPUT_LEN: usize = 1 + TOKEN_SIZE + 8 * 3 + 2;

/// An invariant the provider broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("fuzz invariant violated: {0}")]
pub struct Violation(pub String);

/// The fixed world an input runs in.
#[derive(Debug)]
pub struct World {
    /// The provider.
    pub provider: Provider,
    /// Its clock.
    pub clock: Arc<ManualClock>,
    /// The source disk.
    pub src: Arc<TrackedDisk>,
    /// The destination disk.
    pub dst: Arc<TrackedDisk>,
    /// alice, bob, mallory.
    pub principals: [Principal; 3],
    /// The token alice minted over `[TOKEN_OFFSET, TOKEN_OFFSET + TOKEN_LEN)` of `src`.
    pub minted: Token,
}

fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(131) >> 3) as u8 | 1
}

fn disk(id: u128, fill: bool) -> Option<Arc<TrackedDisk>> {
    let m = MemStorage::with_capacity_limit(DISK_SIZE);
    m.set_len(DISK_SIZE).ok()?;
    if fill {
        let bytes: Vec<u8> = (0..DISK_SIZE).map(pattern).collect();
        m.write_at(&bytes, 0).ok()?;
    }
    let d = RawDisk::new(m).ok()?;
    Some(Arc::new(TrackedDisk::with_id(
        Arc::new(d),
        Uuid::from_u128(id),
    )))
}

/// Builds the world: a provider (key 1, seeded ids, clock at a fixed time), a patterned
/// source, a blank destination, and alice's token (audience alice and bob).
pub fn world() -> Option<World> {
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let (src, dst) = (disk(1, true)?, disk(2, false)?);
    let principals = [
        Principal::new("alice"),
        Principal::new("bob"),
        Principal::new("mallory"),
    ];
    let acl = Acl::new();
    acl.grant(&principals[0].id(), Access::Read, src.id());
    for p in &principals {
        acl.grant(&p.id(), Access::Write, dst.id());
    }
    let provider = Provider::new(
        Uuid::from_u128(0x5644_4f54),
        KeyRing::new(ProviderKey::new(1, [0x11; 32])),
        Arc::new(acl),
    )
    .with_clock(clock.clone())
    .with_id_seed(7);
    let req = ReadRequest {
        offset: TOKEN_OFFSET,
        len: TOKEN_LEN,
        ttl: Some(Duration::from_secs(30)),
        audience: Audience::new(&[principals[0].id(), principals[1].id()]),
        ..ReadRequest::default()
    };
    let minted = provider
        .offload_read_with(&principals[0], &src, &req)
        .ok()?
        .token;
    Some(World {
        provider,
        clock,
        src,
        dst,
        principals,
        minted,
    })
}

/// Encodes an input (the inverse of what [`run`] reads).
pub fn input(
    mode: u8,
    material: &[u8; TOKEN_SIZE],
    dst_offset: u64,
    len: u64,
    token_offset: u64,
    principal: u8,
    events: u8,
) -> Vec<u8> {
    let mut v = Vec::with_capacity(INPUT_LEN);
    v.push(mode);
    v.extend_from_slice(material);
    v.extend_from_slice(&dst_offset.to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(&token_offset.to_le_bytes());
    v.push(principal);
    v.push(events);
    v
}

fn xor(a: &Token, m: &[u8; TOKEN_SIZE]) -> Token {
    let mut b = *a.as_bytes();
    for (x, y) in b.iter_mut().zip(m) {
        *x ^= y;
    }
    Token::from_bytes(b)
}

/// Runs one input. Errors from the provider are expected; a [`Violation`] is a bug.
pub fn run(data: &[u8]) -> Result<(), Violation> {
    let mut full = [0u8; INPUT_LEN];
    let n = data.len().min(INPUT_LEN);
    full[..n].copy_from_slice(&data[..n]);
    let mode = full[0] % 3;
    let mut material = [0u8; TOKEN_SIZE];
    material.copy_from_slice(&full[1..1 + TOKEN_SIZE]);
    let u = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&full[i..i + 8]);
        u64::from_le_bytes(b)
    };
    let p = 1 + TOKEN_SIZE;
    let (dst_offset, len, token_offset) = (u(p), u(p + 8), u(p + 16));
    let who = usize::from(full[p + 24] % 3);
    let events = full[p + 25];

    // Parsing alone, on the raw material: never a panic.
    let _ = Token::from_bytes(material).envelope();
    if let Ok(raw) = RawBody::ref_from_bytes(&material[8..]) {
        let _ = TokenBody::try_from(raw);
    }

    let Some(w) = world() else {
        return Err(Violation("the fixed world could not be built".into()));
    };
    let token = match mode {
        0 => Token::from_bytes(material),
        1 => xor(&w.minted, &material),
        _ => xor(&Token::zero(), &material),
    };
    let _ = w.provider.open(&token);
    let genuine = token == w.minted;
    let zero = token.is_zero();

    let mut refused = false;
    if events & 1 != 0 {
        let at = TOKEN_OFFSET + (len % (TOKEN_LEN / 512)) * 512;
        let _ = w.src.write_at(&[0xEE; 512], at);
        refused = true;
    }
    if events & 2 != 0 {
        if let Ok(crate::key::Opened::Sealed(b)) = w.provider.open(&w.minted) {
            w.provider.revoke(b.id);
        }
        refused = true;
    }
    if events & 4 != 0 {
        w.clock.advance(Duration::from_secs(31));
        refused = true;
    }
    if events & 8 != 0 {
        let _ = w.provider.rotate_key(ProviderKey::new(2, [0x22; 32]));
        let _ = w.provider.retire_key(1);
        refused = true;
    }
    // Snapshot of the source before the redeem.
    let mut before = vec![0u8; TOKEN_LEN as usize];
    let _ = w.src.read_at(&mut before, TOKEN_OFFSET);

    let r = w.provider.offload_write(
        &w.principals[who],
        &w.dst,
        dst_offset,
        len,
        &token,
        token_offset,
    );
    let aligned = dst_offset % 512 == 0 && len % 512 == 0 && token_offset % 512 == 0;
    let in_disk = dst_offset
        .checked_add(len)
        .is_some_and(|e| e <= DISK_SIZE && (len == 0 || dst_offset < DISK_SIZE));
    match r {
        Ok(n) => {
            if n > len || n % 512 != 0 {
                return Err(Violation(format!("wrote {n} of {len} asked")));
            }
            if n > 0 && !genuine && !zero {
                return Err(Violation("a forged or altered token was redeemed".into()));
            }
            if n > 0 && genuine && (refused || who == 2) {
                return Err(Violation(format!(
                    "a token was redeemed despite events {events:#x} / principal {who}"
                )));
            }
            let mut got = vec![0u8; usize::try_from(n).unwrap_or(0)];
            if w.dst.read_at(&mut got, dst_offset).is_err() {
                return Err(Violation("the written range cannot be read".into()));
            }
            if genuine && n > 0 {
                let s = usize::try_from(token_offset).unwrap_or(usize::MAX);
                if before.get(s..s.saturating_add(got.len())) != Some(&got[..]) {
                    return Err(Violation("the bytes written are not the token's".into()));
                }
            } else if zero && got.iter().any(|&b| b != 0) {
                return Err(Violation("the zero token wrote non-zero bytes".into()));
            }
        }
        Err(e) => {
            let should_work = genuine
                && !refused
                && who < 2
                && aligned
                && in_disk
                && len > 0
                && token_offset < TOKEN_LEN;
            if should_work {
                return Err(Violation(format!("a valid redeem was refused: {e}")));
            }
            if zero && aligned && in_disk {
                return Err(Violation(format!(
                    "a valid zero-token write was refused: {e}"
                )));
            }
        }
    }
    Ok(())
}
