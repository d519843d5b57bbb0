//! Refusals: forged, tampered (every byte), expired, revoked, wrong-audience, wrong-key,
//! foreign and replayed-after-invalidation tokens each fail with their own typed error and
//! write nothing; the zero token writes zeros.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use block_io::BlockDevice;
use common::*;
use offload_token::{
    Access, Audience, Error, FormatError, KeyRing, Limits, Opened, Provider, ProviderKey,
    ReadRequest, Token, TokenBody, TOKEN_SIZE,
};

const LEN: u64 = 64 << 10;

fn mint(w: &World) -> Token {
    let r = w
        .provider
        .offload_read(&w.alice, &w.src, 0, LEN, None)
        .unwrap();
    assert_eq!(r.transfer_length, LEN);
    assert!(!r.token.is_zero());
    r.token
}

fn body(w: &World, t: &Token) -> TokenBody {
    match w.provider.open(t).unwrap() {
        Opened::Sealed(b) => b,
        Opened::Zero => panic!("zero token"),
    }
}

fn redeem(w: &World, t: &Token) -> Result<u64, Error> {
    w.provider.offload_write(&w.alice, &w.dst, 0, LEN, t, 0)
}

fn dst_untouched(w: &World) {
    assert!(read(w.dst.as_ref(), 0, LEN as usize)
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn genuine_token_redeems_byte_exact() {
    let w = world();
    let t = mint(&w);
    assert_eq!(redeem(&w, &t).unwrap(), LEN);
    assert_eq!(
        read(w.dst.as_ref(), 0, LEN as usize),
        read(w.src.as_ref(), 0, LEN as usize)
    );
    // A token is good for more than one redeem while it lives.
    assert_eq!(
        w.provider
            .offload_write(&w.bob, &w.dst, LEN, LEN, &t, 0)
            .map_err(|e| e.to_string()),
        Err(format!(
            "principal {} is not in the token's audience",
            w.bob.id()
        ))
    );
    assert_eq!(
        w.provider
            .offload_write(&w.alice, &w.dst, LEN, LEN, &t, 0)
            .unwrap(),
        LEN
    );
}

#[test]
fn tampering_any_byte_is_refused_with_its_error() {
    let w = world();
    let t = mint(&w);
    for mask in [0x01u8, 0x80, 0xFF] {
        for i in 0..TOKEN_SIZE {
            let mut b = *t.as_bytes();
            b[i] ^= mask;
            let e = redeem(&w, &Token::from_bytes(b)).unwrap_err();
            let f = e.format_error().unwrap_or_else(|| panic!("byte {i}: {e}"));
            let ok = match i {
                0..=3 => matches!(f, FormatError::UnknownType(_)),
                4..=5 => *f == FormatError::ReservedNotZero,
                6..=7 => matches!(f, FormatError::BadIdLength(_)),
                8..=9 => matches!(f, FormatError::UnsupportedVersion(_)),
                12..=15 => matches!(f, FormatError::UnknownKey(_)),
                _ => *f == FormatError::BadMac,
            };
            assert!(ok, "byte {i} mask {mask:#x}: {f:?}");
            assert_eq!(e.ntstatus(), offload_token::status::INVALID_TOKEN);
        }
    }
    dst_untouched(&w);
    // The original still works: refusals changed nothing.
    assert_eq!(redeem(&w, &t).unwrap(), LEN);
}

#[test]
fn forged_tokens_are_refused() {
    let w = world();
    let genuine = mint(&w);
    let b = body(&w, &genuine);
    // Same key id, another secret: a forger who guessed everything but the key.
    let forger = KeyRing::new(ProviderKey::new(1, [0x43; 32]));
    let mut forged_body = b.clone();
    forged_body.length = 4 << 20;
    forged_body.expires_ms = u64::MAX;
    let forged = forger.seal(&forged_body).unwrap();
    assert!(matches!(
        redeem(&w, &forged),
        Err(Error::Format(FormatError::BadMac))
    ));
    // Random bytes of the vendor type with a valid envelope.
    let mut raw = [0x5Au8; TOKEN_SIZE];
    raw[..8].copy_from_slice(&genuine.as_bytes()[..8]);
    raw[8..10].copy_from_slice(&1u16.to_be_bytes());
    raw[12..16].copy_from_slice(&1u32.to_be_bytes());
    assert!(matches!(
        redeem(&w, &Token::from_bytes(raw)),
        Err(Error::Format(FormatError::BadMac))
    ));
    // A body from a future format version.
    let mut v2 = *genuine.as_bytes();
    v2[8..10].copy_from_slice(&2u16.to_be_bytes());
    assert!(matches!(
        redeem(&w, &Token::from_bytes(v2)),
        Err(Error::Format(FormatError::UnsupportedVersion(2)))
    ));
    // Another vendor's token type.
    let mut other = *genuine.as_bytes();
    other[..4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    assert!(matches!(
        redeem(&w, &Token::from_bytes(other)),
        Err(Error::Format(FormatError::UnknownType(0x1234_5678)))
    ));
    // Wrong size.
    assert_eq!(
        Token::from_slice(&genuine.as_bytes()[..511]),
        Err(FormatError::WrongSize(511))
    );
    dst_untouched(&w);
}

#[test]
fn wrong_key_is_refused() {
    let w = world();
    let t = mint(&w);
    // The same provider id and key id with another secret (a reinstalled provider).
    let other = Provider::new(
        PROVIDER,
        KeyRing::new(ProviderKey::new(1, [0x99; 32])),
        w.acl.clone(),
    );
    assert!(matches!(
        other.offload_write(&w.alice, &w.dst, 0, LEN, &t, 0),
        Err(Error::Format(FormatError::BadMac))
    ));
    // A key id the ring does not hold.
    let other = Provider::new(
        PROVIDER,
        KeyRing::new(ProviderKey::new(9, [0x42; 32])),
        w.acl.clone(),
    );
    assert!(matches!(
        other.offload_write(&w.alice, &w.dst, 0, LEN, &t, 0),
        Err(Error::Format(FormatError::UnknownKey(1)))
    ));
    dst_untouched(&w);
}

#[test]
fn key_rotation_keeps_old_tokens_until_retired() {
    let w = world();
    let old = mint(&w);
    assert!(w.provider.rotate_key(ProviderKey::new(2, [0x77; 32])));
    assert!(
        !w.provider.rotate_key(ProviderKey::new(2, [0x78; 32])),
        "id reuse refused"
    );
    let new = mint(&w);
    assert_eq!(body(&w, &new).key_id, 2);
    assert_eq!(redeem(&w, &old).unwrap(), LEN);
    assert!(w.provider.retire_key(1));
    assert!(
        !w.provider.retire_key(2),
        "the sealing key cannot be retired"
    );
    assert!(matches!(
        redeem(&w, &old),
        Err(Error::Format(FormatError::UnknownKey(1)))
    ));
    assert_eq!(redeem(&w, &new).unwrap(), LEN);
}

#[test]
fn expired_tokens_are_refused() {
    // Inactivity: 5 s TTL; a redeem within it restarts it.
    let w = world();
    let t = w
        .provider
        .offload_read(&w.alice, &w.src, 0, LEN, Some(Duration::from_secs(5)))
        .unwrap()
        .token;
    w.clock.advance(Duration::from_secs(4));
    assert_eq!(redeem(&w, &t).unwrap(), LEN);
    w.clock.advance(Duration::from_secs(4));
    assert_eq!(redeem(&w, &t).unwrap(), LEN);
    w.clock.advance(Duration::from_secs(5));
    let id = body(&w, &t).id;
    assert!(matches!(redeem(&w, &t), Err(Error::Expired(i)) if i == id));
    // Still expired later (remembered), and no longer live.
    assert!(matches!(redeem(&w, &t), Err(Error::Expired(_))));
    assert_eq!(w.provider.live_tokens_of(&w.alice), 0);

    // Hard expiry: a token used every second still dies at its lifetime.
    let limits = Limits {
        lifetime: Duration::from_secs(10),
        ..Limits::default()
    };
    let w = world_with(1 << 20, 1 << 20, limits);
    let t = w
        .provider
        .offload_read(&w.alice, &w.src, 0, LEN, Some(Duration::from_secs(5)))
        .unwrap()
        .token;
    let b = body(&w, &t);
    assert_eq!(b.expires_ms, T0 + 10_000);
    assert_eq!(b.inactivity_ttl_ms, 5_000);
    for _ in 0..9 {
        w.clock.advance(Duration::from_secs(1));
        assert_eq!(redeem(&w, &t).unwrap(), LEN);
    }
    w.clock.advance(Duration::from_secs(1));
    assert!(matches!(redeem(&w, &t), Err(Error::Expired(_))));
}

#[test]
fn revoked_tokens_are_refused() {
    let w = world();
    let t = mint(&w);
    let id = body(&w, &t).id;
    assert!(w.provider.revoke(id));
    assert!(!w.provider.revoke(id));
    assert!(matches!(redeem(&w, &t), Err(Error::Revoked(i)) if i == id));
    // Per minter and per disk.
    let (a, b) = (mint(&w), mint(&w));
    assert_eq!(w.provider.revoke_minted_by(&w.alice), 2);
    assert!(matches!(redeem(&w, &a), Err(Error::Revoked(_))));
    assert!(matches!(redeem(&w, &b), Err(Error::Revoked(_))));
    let c = mint(&w);
    assert_eq!(w.provider.live_tokens_on(w.src.id()), 1);
    assert_eq!(w.provider.revoke_disk(w.src.id()), 1);
    assert!(matches!(redeem(&w, &c), Err(Error::Revoked(_))));
    assert_eq!(w.src.live_tokens(), 0);
    dst_untouched(&w);
}

#[test]
fn wrong_audience_is_refused() {
    let w = world();
    let req = ReadRequest {
        offset: 0,
        len: LEN,
        audience: Audience::new(&[w.bob.id()]),
        ..ReadRequest::default()
    };
    let t = w
        .provider
        .offload_read_with(&w.alice, &w.src, &req)
        .unwrap()
        .token;
    // Alice minted it for Bob: neither she nor Mallory may redeem it.
    for p in [&w.alice, &w.mallory] {
        let e = w
            .provider
            .offload_write(p, &w.dst, 0, LEN, &t, 0)
            .unwrap_err();
        assert!(
            matches!(e, Error::AudienceRefused(id) if id == p.id()),
            "{e}"
        );
        assert_eq!(e.ntstatus(), offload_token::status::ACCESS_DENIED);
    }
    dst_untouched(&w);
    assert_eq!(
        w.provider
            .offload_write(&w.bob, &w.dst, 0, LEN, &t, 0)
            .unwrap(),
        LEN
    );
}

#[test]
fn rights_are_checked_at_mint_and_redeem() {
    let w = world();
    // Mallory may not read the source.
    assert!(matches!(
        w.provider.offload_read(&w.mallory, &w.src, 0, LEN, None),
        Err(Error::AccessDenied {
            op: Access::Read,
            ..
        })
    ));
    let t = mint(&w);
    // Alice may not write the source: redeeming into it is refused.
    w.acl.revoke(&w.alice.id(), Access::Write, w.src.id());
    assert!(matches!(
        w.provider.offload_write(&w.alice, &w.src, LEN, LEN, &t, 0),
        Err(Error::AccessDenied {
            op: Access::Write,
            ..
        })
    ));
    // The minter losing read access ends the token's power.
    w.acl.revoke(&w.alice.id(), Access::Read, w.src.id());
    assert!(matches!(
        redeem(&w, &t),
        Err(Error::AccessDenied {
            op: Access::Read,
            ..
        })
    ));
    dst_untouched(&w);
}

#[test]
fn replay_after_invalidation_is_refused() {
    let w = world();
    let t = mint(&w);
    let id = body(&w, &t).id;
    assert_eq!(redeem(&w, &t).unwrap(), LEN);
    // A write elsewhere on the source leaves the token alive (invalidation is exact).
    w.src.write_at(&[1u8; 512], LEN).unwrap();
    assert_eq!(redeem(&w, &t).unwrap(), LEN);
    // One overlapping sector kills it, for good.
    w.src.write_at(&[2u8; 512], LEN - 512).unwrap();
    assert!(matches!(redeem(&w, &t), Err(Error::Invalidated(i)) if i == id));
    assert!(matches!(redeem(&w, &t), Err(Error::Invalidated(_))));
    // So do zeroing and discard.
    for op in 0..2 {
        let t = mint(&w);
        if op == 0 {
            w.src.write_zeroes(4096, 512, false).unwrap();
        } else {
            w.src.discard(0, 4096).unwrap();
        }
        assert!(matches!(redeem(&w, &t), Err(Error::Invalidated(_))));
    }
    assert_eq!(w.src.live_tokens(), 0);
}

#[test]
fn foreign_provider_tokens_are_refused() {
    let w = world();
    let t = mint(&w);
    // Same key, another provider id.
    let other = Provider::new(
        uuid::Uuid::from_u128(0xdef),
        KeyRing::new(key1()),
        w.acl.clone(),
    );
    assert!(matches!(
        other.offload_write(&w.alice, &w.dst, 0, LEN, &t, 0),
        Err(Error::ForeignProvider(p)) if p == PROVIDER
    ));
    // Same id and key, but a fresh registry (a restarted provider): unknown.
    let restarted = Provider::new(PROVIDER, KeyRing::new(key1()), w.acl.clone());
    assert!(matches!(
        restarted.offload_write(&w.alice, &w.dst, 0, LEN, &t, 0),
        Err(Error::UnknownToken(_))
    ));
}

#[test]
fn zero_token_writes_zeros() {
    let w = world();
    w.dst.write_at(&pattern(3, 1 << 20), 0).unwrap();
    let z = Token::zero();
    assert_eq!(w.provider.open(&z).unwrap(), Opened::Zero);
    // Anyone who may write the destination may redeem it, at any token offset.
    let n = w
        .provider
        .offload_write(&w.mallory, &w.dst, 4096, 64 << 10, &z, 12345 * 512)
        .unwrap();
    assert_eq!(n, 64 << 10);
    let after = read(w.dst.as_ref(), 0, 1 << 20);
    assert_eq!(after[..4096], pattern(3, 4096)[..]);
    assert!(after[4096..4096 + (64 << 10)].iter().all(|&b| b == 0));
    assert_eq!(
        after[4096 + (64 << 10)..],
        pattern(3, 1 << 20)[4096 + (64 << 10)..]
    );
    // But not someone who may not write it.
    let stranger = offload_token::Principal::new("stranger");
    assert!(matches!(
        w.provider.offload_write(&stranger, &w.dst, 0, 512, &z, 0),
        Err(Error::AccessDenied {
            op: Access::Write,
            ..
        })
    ));
}

#[test]
fn per_principal_limit_holds() {
    let limits = Limits {
        max_live_per_principal: 3,
        ..Limits::default()
    };
    let w = world_with(1 << 20, 1 << 20, limits);
    let ts: Vec<Token> = (0..3).map(|_| mint(&w)).collect();
    assert!(matches!(
        w.provider.offload_read(&w.alice, &w.src, 0, LEN, None),
        Err(Error::TooManyTokens { limit: 3, .. })
    ));
    // A dead token frees its slot.
    w.provider.revoke(body(&w, &ts[0]).id);
    let _ = mint(&w);
    w.src.write_at(&[9; 512], 0).unwrap();
    assert_eq!(w.provider.live_tokens_of(&w.alice), 0);
    let _ = mint(&w);
    assert_eq!(w.provider.live_tokens_of(&w.alice), 1);
}

#[test]
fn misaligned_and_out_of_range_requests_are_typed() {
    let w = world();
    let p = &w.provider;
    assert!(matches!(
        p.offload_read(&w.alice, &w.src, 100, LEN, None),
        Err(Error::Unaligned { what: "offset", .. })
    ));
    assert!(matches!(
        p.offload_read(&w.alice, &w.src, 0, 1000, None),
        Err(Error::Unaligned { what: "length", .. })
    ));
    assert!(matches!(
        p.offload_read(&w.alice, &w.src, 0, 0, None),
        Err(Error::InvalidRequest(_))
    ));
    assert!(matches!(
        p.offload_read(&w.alice, &w.src, 4 << 20, 512, None),
        Err(Error::OutOfRange { .. })
    ));
    let t = mint(&w);
    assert!(matches!(
        p.offload_write(&w.alice, &w.dst, 0, LEN, &t, 100),
        Err(Error::Unaligned {
            what: "token offset",
            ..
        })
    ));
    assert!(matches!(
        p.offload_write(&w.alice, &w.dst, 0, LEN, &t, LEN),
        Err(Error::OutOfRange {
            what: "token offset",
            ..
        })
    ));
    assert!(matches!(
        p.offload_write(&w.alice, &w.dst, 4 << 20, 512, &t, 0),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        p.offload_write(&w.alice, &w.dst, u64::MAX - 511, 512, &t, 0),
        Err(Error::InvalidRequest(_))
    ));
    // A zero-length write is a no-op that still parses the token.
    assert_eq!(p.offload_write(&w.alice, &w.dst, 0, 0, &t, 0).unwrap(), 0);
    dst_untouched(&w);
}
