//! Builds VHDX images with large hostile or busy logs and times opening them, for measuring
//! the log scan (run under `/usr/bin/time -v` for the peak RSS):
//!
//! ```text
//! cargo run --release -p vhdx-format --example log_scan -- make KIND LOG_MIB PATH
//! cargo run --release -p vhdx-format --example log_scan -- open ro|rw PATH
//! ```
//!
//! KIND is `bogus64` (64 entry headers claiming huge EntryLengths in a sparse log),
//! `bogus64-dense` (the same in a log whose other bytes are 0xEE), `bogus-all` (every log
//! sector a header whose descriptors look valid), `valid` (the log full of one valid sequence
//! of 1 MiB entries, each writing 254 distinct sectors) or `zeros` (the log full of valid
//! entries of "zero" descriptors, each zeroing every other sector).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use block_io::{BlockDevice, FileStorage, OpenOptions, Storage};
use uuid::Uuid;
use vhdx_format::header::{Header, HEADER_OFFSETS};
use vhdx_format::log::{build_entry, header_sectors, EntryParams};
use vhdx_format::{create_file, CreateOptions, VhdxFile};

const MIB: u64 = 1 << 20;
const GUID: Uuid = Uuid::from_u128(0x5157_AB1E);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["make", kind, mib, path] => make(kind, mib.parse().unwrap(), path),
        ["open", mode, path] => open(mode == "ro", path),
        _ => panic!("usage: make KIND LOG_MIB PATH | open ro|rw PATH"),
    }
}

fn header_sector(length: u32, count: u32, seq: u64, valid_descriptors: usize) -> Vec<u8> {
    let mut s = vec![0u8; 4096];
    s[..4].copy_from_slice(b"loge");
    s[8..12].copy_from_slice(&length.to_le_bytes());
    s[16..24].copy_from_slice(&seq.to_le_bytes());
    s[24..28].copy_from_slice(&count.to_le_bytes());
    s[32..48].copy_from_slice(&vhdx_format::guid::to_disk(&GUID));
    for i in 0..valid_descriptors.min(126) {
        let d = &mut s[64 + 32 * i..96 + 32 * i];
        d[..4].copy_from_slice(b"desc");
        d[16..24].copy_from_slice(&(4u64 << 20).to_le_bytes());
        d[24..32].copy_from_slice(&seq.to_le_bytes());
    }
    let crc = crc32c::crc32c(&s);
    s[4..8].copy_from_slice(&crc.to_le_bytes());
    s
}

/// One valid entry of `count` zero descriptors, each zeroing one sector, every other sector
/// from `base`.
fn zero_entry(seq: u64, tail: u64, count: u64, base: u64, len: u64) -> Vec<u8> {
    let hs = header_sectors(count);
    let length = hs * 4096;
    let mut e = vec![0u8; length as usize];
    e[..4].copy_from_slice(b"loge");
    e[8..12].copy_from_slice(&(length as u32).to_le_bytes());
    e[12..16].copy_from_slice(&(tail as u32).to_le_bytes());
    e[16..24].copy_from_slice(&seq.to_le_bytes());
    e[24..28].copy_from_slice(&(count as u32).to_le_bytes());
    e[32..48].copy_from_slice(&vhdx_format::guid::to_disk(&GUID));
    e[48..56].copy_from_slice(&len.to_le_bytes());
    e[56..64].copy_from_slice(&len.to_le_bytes());
    for i in 0..count as usize {
        let d = &mut e[64 + 32 * i..96 + 32 * i];
        d[..4].copy_from_slice(b"zero");
        d[8..16].copy_from_slice(&4096u64.to_le_bytes());
        d[16..24].copy_from_slice(&(base + 8192 * i as u64).to_le_bytes());
        d[24..32].copy_from_slice(&seq.to_le_bytes());
    }
    let crc = crc32c::crc32c(&e);
    e[4..8].copy_from_slice(&crc.to_le_bytes());
    e
}

fn make(kind: &str, log_mib: u32, path: &str) {
    let _ = std::fs::remove_file(path);
    let log_len = u64::from(log_mib) * MIB;
    // A fixed image (sparse) big enough for the data entries' distinct targets.
    let mut o = CreateOptions::fixed((log_len + 64 * MIB).max(64 * MIB));
    o.log_size = log_mib * MIB as u32;
    let f = create_file(path, &o).unwrap();
    let payload = f.block_status(0, 4096).unwrap().file_offset.unwrap();
    let h = f.header();
    f.close().unwrap();
    drop(f);
    let st = FileStorage::open(path, &OpenOptions::new()).unwrap();
    let file_len = st.len().unwrap();
    let log = h.log_offset;
    let put = |pos: u64, b: &[u8]| st.write_at(b, log + pos).unwrap();
    match kind {
        "bogus64" | "bogus64-dense" => {
            if kind == "bogus64-dense" {
                let filler = vec![0xEEu8; MIB as usize];
                for piece in 0..log_len / MIB {
                    put(piece * MIB, &filler);
                }
            }
            for k in 0..64u64 {
                let pos = k * (log_len / 64);
                let claim = (log_len - pos).min(u64::from(u32::MAX)) as u32 & !0xFFF;
                let s = if k % 2 == 0 {
                    header_sector(claim, 1, k + 1, 1)
                } else {
                    let count = (claim / 4096 / 2).max(1);
                    let len = (header_sectors(u64::from(count)) + u64::from(count)) * 4096;
                    header_sector(len.min(u64::from(claim)) as u32, count, k + 1, 126)
                };
                put(pos, &s);
            }
        }
        "bogus-all" => {
            let mut chunk = Vec::with_capacity(MIB as usize);
            let mut k = 0u64;
            for piece in 0..log_len / MIB {
                chunk.clear();
                for _ in 0..256 {
                    k += 1;
                    chunk.extend_from_slice(&header_sector(127 * 4096, 126, k, 126));
                }
                put(piece * MIB, &chunk);
            }
        }
        "valid" => {
            let sector = vec![0xA5u8; 4096];
            let n = 254u64; // 2 header sectors + 254 data sectors = 1 MiB
            let entries = log_len / MIB;
            for i in 0..entries {
                let refs: Vec<(u64, &[u8])> = (0..n)
                    .map(|j| (payload + (i * n + j) * 4096, &sector[..]))
                    .collect();
                let e = build_entry(
                    &EntryParams {
                        sequence_number: 1000 + i,
                        log_guid: GUID,
                        tail: 0,
                        flushed_file_offset: file_len,
                        last_file_offset: file_len,
                    },
                    &refs,
                );
                put(i * MIB, &e);
            }
        }
        "zeros" => {
            let count = 32766u64; // 256 header sectors: 1 MiB entries
            for i in 0..log_len / MIB {
                let base = payload + (i * count * 8192) % (log_len / 2);
                put(i * MIB, &zero_entry(1000 + i, 0, count, base, file_len));
            }
        }
        _ => panic!("unknown kind {kind}"),
    }
    // Name the log in the current header.
    let (mut cur, slot) = read_current(&st);
    cur.log_guid = GUID;
    st.write_at(&cur.to_bytes(), HEADER_OFFSETS[slot]).unwrap();
    st.sync_data().unwrap();
    println!("made {kind}: log {log_mib} MiB, file {file_len} bytes");
}

/// The current header and its slot.
fn read_current(st: &FileStorage) -> (Header, usize) {
    let read = |slot: usize| {
        let mut b = vec![0u8; 4096];
        st.read_at(&mut b, HEADER_OFFSETS[slot]).unwrap();
        Header::parse(&b).unwrap()
    };
    let (a, b) = (read(0), read(1));
    if b.sequence_number > a.sequence_number {
        (b, 1)
    } else {
        (a, 0)
    }
}

fn open(read_only: bool, path: &str) {
    let st = FileStorage::open(path, &OpenOptions::new().read_only(read_only)).unwrap();
    // The scan alone (finding the active sequence), then the whole open.
    let t = Instant::now();
    let (h, _) = read_current(&st);
    let plan = vhdx_format::replay::find_active(&st, &h).unwrap();
    println!(
        "scan: {:.3} s, active sequence of {} entries",
        t.elapsed().as_secs_f64(),
        plan.map_or(0, |p| p.positions.len())
    );
    let t = Instant::now();
    let r = VhdxFile::open(st, &vhdx_format::OpenOptions::new().read_only(read_only));
    let secs = t.elapsed().as_secs_f64();
    match r {
        Ok(f) => println!(
            "open {}: ok in {secs:.3} s, log dirty {}",
            if read_only { "ro" } else { "rw" },
            f.details().log_dirty
        ),
        Err(e) => println!("open: error in {secs:.3} s: {}", e.chain_string()),
    }
}
