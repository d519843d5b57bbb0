//! The sidecar of a replica: which granules it holds, for which base (see the module docs of
//! [`crate::cor`]), written whole by a synced new file renamed over the old one.

use std::io::Write;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::{StreamError, HEAD, MAGIC};
use crate::layer::Identity;

/// What the sidecar records.
#[derive(Debug, Clone)]
pub(crate) struct Sidecar {
    pub(crate) path: PathBuf,
    pub(crate) granule: u64,
    pub(crate) size: u64,
    pub(crate) identity: Identity,
}

impl Sidecar {
    pub(crate) fn encode(&self, bits: &[u64], granules: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEAD + bits.len() * 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.granule.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        let (kind, id, ts) = identity_parts(&self.identity);
        out.push(kind);
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&ts.to_le_bytes());
        out.extend_from_slice(&granules.to_le_bytes());
        for w in bits {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Reads the sidecar at `path`: (granule, size, identity, bit words).
    pub(crate) fn load(path: &Path) -> std::result::Result<(Sidecar, Vec<u64>), StreamError> {
        let bad = |why: &str| StreamError::Sidecar {
            path: path.to_path_buf(),
            why: why.to_string(),
        };
        let data = std::fs::read(path).map_err(|e| StreamError::Io {
            op: "read",
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        if data.len() < HEAD || &data[..8] != MAGIC {
            return Err(bad("not a stream sidecar of version v1"));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&data[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let granule = u64_at(8);
        let size = u64_at(16);
        let kind = data[24];
        let mut id = [0u8; 16];
        id.copy_from_slice(&data[25..41]);
        let mut ts = [0u8; 4];
        ts.copy_from_slice(&data[41..45]);
        let granules = u64_at(45);
        if granule < 4096 || !granule.is_power_of_two() {
            return Err(bad("bad granule size"));
        }
        if granules != size.div_ceil(granule) {
            return Err(bad("the bit count does not match the size"));
        }
        let words = usize::try_from(granules.div_ceil(64)).map_err(|_| bad("too many bits"))?;
        // Bounded by the file's length before anything is sized by it.
        let want = words.checked_mul(8).and_then(|n| n.checked_add(HEAD));
        if want != Some(data.len()) {
            return Err(bad("truncated or overlong"));
        }
        let identity = match kind {
            1 => Identity::Vhdx {
                data_write_guid: Uuid::from_bytes(id),
                disk_id: Uuid::nil(),
            },
            2 => Identity::Vhd {
                unique_id: Uuid::from_bytes(id),
                timestamp: u32::from_le_bytes(ts),
            },
            _ => return Err(bad("unknown identity kind")),
        };
        let bits = (0..words).map(|i| u64_at(HEAD + i * 8)).collect();
        Ok((
            Sidecar {
                path: path.to_path_buf(),
                granule,
                size,
                identity,
            },
            bits,
        ))
    }

    /// Writes the sidecar whole: a new file, synced, renamed over the old one, folder synced.
    pub(crate) fn store(
        &self,
        bits: &[u64],
        granules: u64,
    ) -> std::result::Result<(), StreamError> {
        let tmp = {
            let mut s = self.path.as_os_str().to_os_string();
            s.push(".tmp");
            PathBuf::from(s)
        };
        let io = |op: &'static str| {
            let path = self.path.clone();
            move |e: std::io::Error| StreamError::Io {
                op,
                path,
                source: e.into(),
            }
        };
        let mut f = std::fs::File::create(&tmp).map_err(io("create"))?;
        f.write_all(&self.encode(bits, granules))
            .map_err(io("write"))?;
        f.sync_all().map_err(io("sync"))?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(io("rename"))?;
        sync_dir(&self.path).map_err(io("sync the folder of"))
    }

    /// Whether this sidecar belongs to a base of `size` bytes and identity `id`.
    pub(crate) fn matches(&self, size: u64, id: &Identity) -> bool {
        self.size == size && identity_parts(&self.identity) == identity_parts(id)
    }
}

pub(crate) fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// (kind, id, timestamp) of an identity: what the sidecar keeps and compares (a VHDX disk id
/// is not part of it: the child records only the DataWriteGuid).
pub(crate) fn identity_parts(id: &Identity) -> (u8, Uuid, u32) {
    match *id {
        Identity::Vhdx {
            data_write_guid, ..
        } => (1, data_write_guid, 0),
        Identity::Vhd {
            unique_id,
            timestamp,
        } => (2, unique_id, timestamp),
        Identity::Raw => (0, Uuid::nil(), 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> Sidecar {
        Sidecar {
            path: dir.join("s.fetched"),
            granule: 1 << 20,
            size: 130 << 20,
            identity: Identity::Vhd {
                unique_id: Uuid::from_u128(7),
                timestamp: 9,
            },
        }
    }

    #[test]
    fn round_trips_and_refuses_malformed_files() {
        let d = tempfile::tempdir().unwrap();
        let s = sample(d.path());
        let bits = vec![u64::MAX, 0b101, 0];
        s.store(&bits, 130).unwrap();
        let (back, got) = Sidecar::load(&s.path).unwrap();
        assert_eq!(got, bits);
        assert!(back.matches(130 << 20, &s.identity));
        assert!(!back.matches(129 << 20, &s.identity));
        let good = std::fs::read(&s.path).unwrap();
        let mut cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            good[..HEAD].to_vec(),
            good[..good.len() - 1].to_vec(),
            [good.clone(), vec![0]].concat(),
        ];
        // Bad magic, granule, identity kind.
        let mut bad = good.clone();
        bad[0] ^= 1;
        cases.push(bad);
        let mut bad = good.clone();
        bad[8..16].copy_from_slice(&3000u64.to_le_bytes());
        cases.push(bad);
        let mut bad = good.clone();
        bad[24] = 9;
        cases.push(bad);
        // A huge size with a matching bit count: refused by the length, no allocation.
        let mut bad = good.clone();
        bad[16..24].copy_from_slice(&(u64::MAX - 4096).to_le_bytes());
        bad[45..53].copy_from_slice(&(u64::MAX - 4096).div_ceil(1 << 20).to_le_bytes());
        cases.push(bad);
        for (i, c) in cases.iter().enumerate() {
            std::fs::write(&s.path, c).unwrap();
            assert!(
                matches!(Sidecar::load(&s.path), Err(StreamError::Sidecar { .. })),
                "case {i}"
            );
        }
    }
}
