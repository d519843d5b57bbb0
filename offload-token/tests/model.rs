//! Property test: random interleavings of guest writes, zeroings, offload reads, redeems and
//! revocations on two disks agree with a simple model — the disks' bytes, which tokens are
//! alive (a token dies exactly when a write overlaps its range or it is revoked), what a
//! redeem writes, and the offload read's promises (transfer length, zero token,
//! ALL_ZERO_BEYOND_CURRENT_RANGE).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use block_io::BlockDevice;
use common::*;
use offload_token::{
    Access, Acl, Error, KeyRing, Limits, ManualClock, Opened, Principal, Provider, Token,
    TrackedDisk,
};
use proptest::prelude::*;

const SECTOR: u64 = 512;
const SECTORS: u64 = 256; // 128 KiB disks: two 64 KiB allocation chunks each
const SIZE: u64 = SECTORS * SECTOR;
const CAP_TOKEN: u64 = 32 << 10;
const CAP_WRITE: u64 = 8 << 10;

#[derive(Debug, Clone)]
enum Op {
    Write {
        disk: usize,
        sector: u64,
        count: u64,
        byte: u8,
    },
    Zero {
        disk: usize,
        sector: u64,
        count: u64,
    },
    Mint {
        disk: usize,
        sector: u64,
        count: u64,
    },
    Redeem {
        token: usize,
        disk: usize,
        sector: u64,
        count: u64,
        token_sector: u64,
    },
    Revoke {
        token: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..2usize, 0..SECTORS, 1..=96u64);
    prop_oneof![
        3 => (range.clone(), 1..=255u8).prop_map(|((disk, sector, count), byte)| Op::Write { disk, sector, count, byte }),
        1 => range.clone().prop_map(|(disk, sector, count)| Op::Zero { disk, sector, count }),
        3 => range.clone().prop_map(|(disk, sector, count)| Op::Mint { disk, sector, count }),
        4 => (0..16usize, range, 0..80u64).prop_map(|(token, (disk, sector, count), token_sector)| Op::Redeem { token, disk, sector, count, token_sector }),
        1 => (0..16usize).prop_map(|token| Op::Revoke { token }),
    ]
}

struct ModelToken {
    token: Token,
    disk: usize,
    offset: u64,
    len: u64,
    /// The bytes it stands for (zeros for the zero token).
    data: Vec<u8>,
    zero: bool,
    alive: bool,
    revoked: bool,
}

struct Model {
    bytes: [Vec<u8>; 2],
    tokens: Vec<ModelToken>,
}

impl Model {
    /// A write to `disk` over `[off, off+len)`: the bytes change, overlapping sealed tokens die.
    fn write(&mut self, disk: usize, off: u64, data: &[u8]) {
        self.bytes[disk][off as usize..off as usize + data.len()].copy_from_slice(data);
        let end = off + data.len() as u64;
        for t in &mut self.tokens {
            if !t.zero && t.disk == disk && t.offset < end && off < t.offset + t.len {
                t.alive = false;
            }
        }
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let acl = Arc::new(Acl::new());
    let disks: [Arc<TrackedDisk>; 2] = [disk(1, SIZE), disk(2, SIZE)];
    let who = Principal::new("initiator");
    for d in &disks {
        acl.grant(&who.id(), Access::Read, d.id());
        acl.grant(&who.id(), Access::Write, d.id());
    }
    let limits = Limits {
        max_token_len: CAP_TOKEN,
        max_write_len: CAP_WRITE,
        min_zero_run: 16 << 10,
        max_live_per_principal: 10_000,
        ..Limits::default()
    };
    let p = Provider::new(PROVIDER, KeyRing::new(key1()), acl)
        .with_clock(Arc::new(ManualClock::new(T0)))
        .with_limits(limits)
        .with_id_seed(1);
    let mut m = Model {
        bytes: [vec![0; SIZE as usize], vec![0; SIZE as usize]],
        tokens: Vec::new(),
    };
    for op in ops {
        match op {
            Op::Write {
                disk,
                sector,
                count,
                byte,
            } => {
                let count = count.min(SECTORS - sector);
                let data = vec![byte; (count * SECTOR) as usize];
                disks[disk].write_at(&data, sector * SECTOR).unwrap();
                m.write(disk, sector * SECTOR, &data);
            }
            Op::Zero {
                disk,
                sector,
                count,
            } => {
                let count = count.min(SECTORS - sector);
                disks[disk]
                    .write_zeroes(sector * SECTOR, count * SECTOR, sector % 2 == 0)
                    .unwrap();
                m.write(disk, sector * SECTOR, &vec![0; (count * SECTOR) as usize]);
            }
            Op::Mint {
                disk,
                sector,
                count,
            } => {
                let (off, len) = (sector * SECTOR, count * SECTOR);
                let r = p.offload_read(&who, &disks[disk], off, len, None).unwrap();
                let end = (off + len).min(SIZE);
                let t = r.transfer_length;
                prop_assert!(t > 0 && t % SECTOR == 0 && off + t <= end, "transfer {t}");
                let bytes = &m.bytes[disk];
                let zero = r.token.is_zero();
                if zero {
                    prop_assert!(bytes[off as usize..(off + t) as usize]
                        .iter()
                        .all(|&b| b == 0));
                } else {
                    prop_assert!(t <= CAP_TOKEN);
                    let Opened::Sealed(b) = p.open(&r.token).unwrap() else {
                        panic!("sealed token opens as zero")
                    };
                    prop_assert_eq!((b.offset, b.length), (off, t));
                }
                if r.all_zero_beyond() {
                    prop_assert!(off + t < end);
                    prop_assert!(bytes[(off + t) as usize..end as usize]
                        .iter()
                        .all(|&b| b == 0));
                }
                let data = bytes[off as usize..(off + t) as usize].to_vec();
                m.tokens.push(ModelToken {
                    token: r.token,
                    disk,
                    offset: off,
                    len: t,
                    data: if zero { vec![0; t as usize] } else { data },
                    zero,
                    alive: true,
                    revoked: false,
                });
            }
            Op::Redeem {
                token,
                disk,
                sector,
                count,
                token_sector,
            } => {
                if m.tokens.is_empty() {
                    continue;
                }
                let i = token % m.tokens.len();
                let count = count.min(SECTORS - sector);
                let (off, len, toff) = (sector * SECTOR, count * SECTOR, token_sector * SECTOR);
                let t = &m.tokens[i];
                let r = p.offload_write(&who, &disks[disk], off, len, &t.token, toff);
                if t.zero {
                    let n = r.unwrap();
                    prop_assert_eq!(n, len.min(CAP_WRITE));
                    m.write(disk, off, &vec![0; n as usize]);
                } else if t.revoked {
                    prop_assert!(matches!(r, Err(Error::Revoked(_))), "{r:?}");
                } else if !t.alive {
                    prop_assert!(matches!(r, Err(Error::Invalidated(_))), "{r:?}");
                } else if toff >= t.len {
                    prop_assert!(matches!(r, Err(Error::OutOfRange { .. })), "{r:?}");
                } else {
                    let n = r.unwrap();
                    prop_assert_eq!(n, len.min(t.len - toff).min(CAP_WRITE));
                    let data = t.data[toff as usize..(toff + n) as usize].to_vec();
                    m.write(disk, off, &data);
                }
            }
            Op::Revoke { token } => {
                if m.tokens.is_empty() {
                    continue;
                }
                let i = token % m.tokens.len();
                let t = &mut m.tokens[i];
                if t.zero {
                    continue;
                }
                let Opened::Sealed(b) = p.open(&t.token).unwrap() else {
                    panic!("sealed token opens as zero")
                };
                // Only a live token can be revoked; a dead one keeps its cause of death.
                let was_live = p.revoke(b.id);
                prop_assert_eq!(was_live, t.alive && !t.revoked);
                if t.alive {
                    t.revoked = true;
                }
            }
        }
        for (d, (disk, model)) in disks.iter().zip(&m.bytes).enumerate() {
            prop_assert!(
                read(disk.as_ref(), 0, SIZE as usize) == *model,
                "disk {d} differs from the model"
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn interleavings_agree_with_the_model(ops in prop::collection::vec(op(), 1..60)) {
        run(ops)?;
    }
}
