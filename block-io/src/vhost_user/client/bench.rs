//! Read benchmarks driven through a [`ClientQueue`]: a fixed number of requests in flight,
//! each slot resubmitted as soon as it completes, for a set time.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use vm_memory::{Bytes, GuestAddress};

use crate::error::{Error, ErrorKind, Result};
use crate::vhost_user::request::{HEADER_LEN, VIRTIO_BLK_T_IN};

use super::{mem_err, ClientQueue, STATUS_UNSET};

/// What [`ClientQueue::bench_reads`] runs.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    /// Bytes per request.
    pub block: u32,
    /// Requests in flight.
    pub depth: u16,
    /// Random offsets (else sequential, wrapping at `span`).
    pub random: bool,
    /// Bytes of the disk to cover, from offset 0.
    pub span: u64,
    /// How long to keep submitting.
    pub duration: Duration,
    /// Seed of the offsets.
    pub seed: u64,
}

/// What [`ClientQueue::bench_reads`] measured.
#[derive(Debug, Clone, Default)]
pub struct BenchResult {
    /// Requests completed with status OK.
    pub ops: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Requests completed with another status.
    pub errors: u64,
    /// Wall time from the first submission to the last completion.
    pub elapsed: Duration,
}

impl ClientQueue {
    /// Runs a read benchmark on this queue: `spec.depth` requests of `spec.block` bytes in
    /// flight until `spec.duration` has passed.
    pub fn bench_reads(&mut self, spec: &BenchSpec) -> Result<BenchResult> {
        let slot_len = 4096 + u64::from(spec.block);
        let depth = usize::from(spec.depth.max(1));
        if slot_len * depth as u64 > self.data_len || 3 * depth > usize::from(self.size) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "queue too small for this depth and block size",
            ));
        }
        let blocks = spec.span / u64::from(spec.block.max(512));
        if blocks == 0 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "span smaller than a block",
            ));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.seed);
        let mut next_seq = 0u64;
        let mut next_offset = |rng: &mut rand_chacha::ChaCha8Rng| {
            let b = if spec.random {
                rng.random_range(0..blocks)
            } else {
                let b = next_seq % blocks;
                next_seq += 1;
                b
            };
            b * u64::from(spec.block) / 512
        };
        let mut slot_of = vec![usize::MAX; usize::from(self.size)];
        let mut res = BenchResult::default();
        let start = Instant::now();
        let mut in_flight = 0usize;
        for slot in 0..depth {
            let sector = next_offset(&mut rng);
            let head = self.submit_read_slot(slot, slot_len, spec.block, sector)?;
            slot_of[usize::from(head)] = slot;
            in_flight += 1;
        }
        self.kick()?;
        while in_flight > 0 {
            let done = self.wait(Duration::from_secs(10))?;
            let running = start.elapsed() < spec.duration;
            for c in done {
                let Some(&slot) = slot_of.get(c.id as usize) else {
                    continue;
                };
                in_flight -= 1;
                let status_at = self.data + slot as u64 * slot_len + 64;
                let st: u8 = self
                    .mem
                    .read_obj(GuestAddress(status_at))
                    .map_err(mem_err)?;
                if st == 0 {
                    res.ops += 1;
                    res.bytes += u64::from(spec.block);
                } else {
                    res.errors += 1;
                }
                if running {
                    let sector = next_offset(&mut rng);
                    let head = self.submit_read_slot(slot, slot_len, spec.block, sector)?;
                    slot_of[usize::from(head)] = slot;
                    in_flight += 1;
                }
            }
            self.kick()?;
        }
        res.elapsed = start.elapsed();
        Ok(res)
    }

    fn submit_read_slot(
        &mut self,
        slot: usize,
        slot_len: u64,
        block: u32,
        sector: u64,
    ) -> Result<u16> {
        let base = self.data + slot as u64 * slot_len;
        let mut hdr = [0u8; HEADER_LEN];
        hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem
            .write_slice(&hdr, GuestAddress(base))
            .map_err(mem_err)?;
        self.mem
            .write_obj(STATUS_UNSET, GuestAddress(base + 64))
            .map_err(mem_err)?;
        self.submit(&[
            (base, HEADER_LEN as u32, false),
            (base + 4096, block, true),
            (base + 64, 1, true),
        ])
    }
}
