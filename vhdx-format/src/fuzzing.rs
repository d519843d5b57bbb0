//! The fuzzing entry point shared by `fuzz/fuzz_targets/vhdx_open.rs` and the corpus replay
//! test, and the compact seed encoding.
//!
//! VHDX files are at least a few MiB and mostly zeros, so fuzz inputs are *sparse images*:
//! `[u32 file length][{u32 offset, u16 length, bytes}...]` (little-endian), materialised into a
//! capacity-limited [`MemStorage`]. An input starting with "vhdxfile" is taken as a raw image.

use block_io::{BlockDevice, MemStorage, Storage};

use crate::file::VhdxFile;

/// Largest file a fuzz input may describe.
pub const MAX_FILE: u64 = 48 << 20;

/// Builds the storage an input describes (`None` if it describes nothing usable).
pub fn materialize(data: &[u8]) -> Option<MemStorage> {
    let m = MemStorage::with_capacity_limit(MAX_FILE);
    if data.starts_with(crate::file_id::SIGNATURE) {
        m.write_at(data, 0).ok()?;
        return Some(m);
    }
    let len = u64::from(u32::from_le_bytes(data.get(..4)?.try_into().ok()?)).min(MAX_FILE);
    let mut rest = &data[4..];
    let mut segments = 0;
    while rest.len() >= 6 && segments < 4096 {
        let off = u64::from(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]));
        let n = usize::from(u16::from_le_bytes([rest[4], rest[5]])).min(rest.len() - 6);
        if off + n as u64 <= MAX_FILE {
            m.write_at(&rest[6..6 + n], off).ok()?;
        }
        rest = &rest[6 + n..];
        segments += 1;
    }
    if m.len().ok()? < len {
        m.set_len(len).ok()?;
    }
    Some(m)
}

/// Encodes an image as a sparse fuzz input: every 512-byte run that is not all zeros.
pub fn encode_sparse(image: &[u8]) -> Vec<u8> {
    let mut out = (image.len() as u32).to_le_bytes().to_vec();
    let mut pos = 0;
    while pos < image.len() {
        if image[pos..(pos + 512).min(image.len())]
            .iter()
            .all(|&b| b == 0)
        {
            pos += 512;
            continue;
        }
        let start = pos;
        while pos < image.len()
            && pos - start < 32 * 1024
            && !image[pos..(pos + 512).min(image.len())]
                .iter()
                .all(|&b| b == 0)
        {
            pos += 512;
        }
        let end = pos.min(image.len());
        out.extend_from_slice(&(start as u32).to_le_bytes());
        out.extend_from_slice(&((end - start) as u16).to_le_bytes());
        out.extend_from_slice(&image[start..end]);
    }
    out
}

/// Opens the input read-only and writable and exercises reads, status, writes, zeroes,
/// flush and close. Errors are fine; panics, hangs and huge allocations are bugs.
pub fn run(data: &[u8]) {
    let Some(m) = materialize(data) else { return };
    if let Ok(f) = VhdxFile::open(m.clone(), &crate::OpenOptions::new().read_only(true)) {
        exercise_reads(&f);
        let _ = f.details();
        let _ = f.check();
    }
    if let Ok(f) = VhdxFile::open(m, &crate::OpenOptions::new().read_only(false)) {
        exercise_reads(&f);
        let info = f.info();
        let ss = u64::from(info.logical_sector_size);
        let size = info.virtual_size;
        let buf = vec![0x5Au8; (ss * 3) as usize];
        for off in [0, size / 2, size.saturating_sub(ss * 3)] {
            let off = off - off % ss;
            let _ = f.write_at(&buf, off);
        }
        let _ = f.write_zeroes(0, size.min(2 << 20), true);
        let _ = f.discard(size / 2 - (size / 2) % ss, ss.min(size / 2));
        let _ = f.flush();
        exercise_reads(&f);
        let _ = f.close();
    }
}

fn exercise_reads<S: Storage>(f: &VhdxFile<S>) {
    let info = f.info();
    let ss = u64::from(info.logical_sector_size);
    let size = info.virtual_size;
    let mut buf = vec![0u8; (ss * 8) as usize];
    for off in [0, size / 3, size.saturating_sub(ss * 8)] {
        let off = off - off % ss;
        let n = (size - off).min(buf.len() as u64) as usize;
        let _ = f.read_at(&mut buf[..n], off);
        // What a chain does on a cached group: trusts the bitmap was checked.
        let _ = f.read_data_at(&mut buf[..n], off);
    }
    let mut pos = 0;
    for _ in 0..64 {
        if pos >= size {
            break;
        }
        match f.block_status(pos, size - pos) {
            Ok(r) if r.len > 0 => pos += r.len,
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_round_trip() {
        let mut img = vec![0u8; 1 << 20];
        img[10] = 1;
        img[700_000] = 2;
        let enc = encode_sparse(&img);
        assert!(enc.len() < 2000);
        let m = materialize(&enc).unwrap();
        assert_eq!(m.to_vec().unwrap(), img);
    }
}
