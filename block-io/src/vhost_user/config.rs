//! The virtio-blk configuration space (virtio 1.2, 5.2.4 "Device configuration layout") and
//! feature bits (5.2.3).
//!
//! Little-endian, laid out as `struct virtio_blk_config` up to `write_zeroes_may_unmap`:
//!
//! | offset | field |
//! |---|---|
//! | 0 | capacity u64, in 512-byte sectors |
//! | 8 | size_max u32 |
//! | 12 | seg_max u32 |
//! | 16 | geometry {cylinders u16, heads u8, sectors u8} |
//! | 20 | blk_size u32 |
//! | 24 | physical_block_exp u8, alignment_offset u8, min_io_size u16, opt_io_size u32 |
//! | 32 | writeback u8, unused u8 |
//! | 34 | num_queues u16 |
//! | 36 | max_discard_sectors u32, max_discard_seg u32, discard_sector_alignment u32 |
//! | 48 | max_write_zeroes_sectors u32, max_write_zeroes_seg u32 |
//! | 56 | write_zeroes_may_unmap u8, unused u8\[3\] |

use crate::device::DiskInfo;

use super::request::{MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS};

/// Feature bit: `seg_max` is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// Feature bit: the device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature bit: `blk_size` is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
/// Feature bit: FLUSH is supported.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Feature bit: the topology fields are valid.
pub const VIRTIO_BLK_F_TOPOLOGY: u64 = 1 << 10;
/// Feature bit: `num_queues` is valid (multiqueue).
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
/// Feature bit: DISCARD is supported.
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
/// Feature bit: WRITE_ZEROES is supported.
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;
/// Feature bit: indirect descriptors.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// Feature bit: used_event / avail_event notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Feature bit: vhost-user protocol features.
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Feature bit: virtio 1.x.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Length of the configuration space we expose.
pub const CONFIG_LEN: usize = 60;

/// Largest segment count per request we advertise (queue size 128 minus header and status, as
/// QEMU does).
pub const SEG_MAX: u32 = 126;

/// The features the backend offers for a disk.
pub fn device_features(info: &DiskInfo) -> u64 {
    let mut f = VIRTIO_BLK_F_SEG_MAX
        | VIRTIO_BLK_F_BLK_SIZE
        | VIRTIO_BLK_F_FLUSH
        | VIRTIO_BLK_F_TOPOLOGY
        | VIRTIO_BLK_F_MQ
        | VIRTIO_RING_F_INDIRECT_DESC
        | VIRTIO_RING_F_EVENT_IDX
        | VHOST_USER_F_PROTOCOL_FEATURES
        | VIRTIO_F_VERSION_1;
    if info.read_only {
        f |= VIRTIO_BLK_F_RO;
    } else {
        f |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
    }
    f
}

/// The parsed configuration space: what a driver reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Largest number of data segments per request.
    pub seg_max: u32,
    /// Logical block size in bytes.
    pub blk_size: u32,
    /// log2(physical block / logical block).
    pub physical_block_exp: u8,
    /// Smallest I/O size in logical blocks that avoids read-modify-write.
    pub min_io_size: u16,
    /// Number of request queues.
    pub num_queues: u16,
    /// Largest discard in 512-byte sectors.
    pub max_discard_sectors: u32,
    /// Largest number of discard segments per request.
    pub max_discard_seg: u32,
    /// Discard alignment in 512-byte sectors.
    pub discard_sector_alignment: u32,
    /// Largest write-zeroes in 512-byte sectors.
    pub max_write_zeroes_sectors: u32,
    /// Largest number of write-zeroes segments per request.
    pub max_write_zeroes_seg: u32,
    /// Whether write-zeroes with UNMAP may release space.
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    /// The configuration of `info` served on `num_queues` queues.
    pub fn for_disk(info: &DiskInfo, num_queues: u16) -> Self {
        let lbs = info.logical_sector_size.max(512);
        let pbs = info.physical_sector_size.max(lbs);
        let exp = (pbs / lbs).checked_ilog2().unwrap_or(0) as u8;
        let writable = !info.read_only;
        BlkConfig {
            capacity: info.virtual_size / 512,
            seg_max: SEG_MAX,
            blk_size: lbs,
            physical_block_exp: exp,
            min_io_size: 1,
            num_queues,
            max_discard_sectors: if writable { MAX_DISCARD_SECTORS } else { 0 },
            max_discard_seg: u32::from(writable),
            discard_sector_alignment: lbs / 512,
            max_write_zeroes_sectors: if writable {
                MAX_WRITE_ZEROES_SECTORS
            } else {
                0
            },
            max_write_zeroes_seg: u32::from(writable),
            write_zeroes_may_unmap: u8::from(writable),
        }
    }

    /// The little-endian bytes of the configuration space.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        b[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        b[12..16].copy_from_slice(&self.seg_max.to_le_bytes());
        b[20..24].copy_from_slice(&self.blk_size.to_le_bytes());
        b[24] = self.physical_block_exp;
        b[26..28].copy_from_slice(&self.min_io_size.to_le_bytes());
        b[34..36].copy_from_slice(&self.num_queues.to_le_bytes());
        b[36..40].copy_from_slice(&self.max_discard_sectors.to_le_bytes());
        b[40..44].copy_from_slice(&self.max_discard_seg.to_le_bytes());
        b[44..48].copy_from_slice(&self.discard_sector_alignment.to_le_bytes());
        b[48..52].copy_from_slice(&self.max_write_zeroes_sectors.to_le_bytes());
        b[52..56].copy_from_slice(&self.max_write_zeroes_seg.to_le_bytes());
        b[56] = self.write_zeroes_may_unmap;
        b
    }

    /// Parses configuration bytes as read from a device; missing bytes read as zero.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut b = [0u8; CONFIG_LEN];
        let n = bytes.len().min(CONFIG_LEN);
        b[..n].copy_from_slice(&bytes[..n]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let mut cap = [0u8; 8];
        cap.copy_from_slice(&b[0..8]);
        BlkConfig {
            capacity: u64::from_le_bytes(cap),
            seg_max: u32_at(12),
            blk_size: u32_at(20),
            physical_block_exp: b[24],
            min_io_size: u16_at(26),
            num_queues: u16_at(34),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: b[56],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_and_places_fields() {
        let mut info = DiskInfo::new("raw", 1 << 30);
        info.physical_sector_size = 4096;
        let c = BlkConfig::for_disk(&info, 2);
        let b = c.to_bytes();
        assert_eq!(&b[0..8], &(2u64 << 20).to_le_bytes());
        assert_eq!(&b[20..24], &512u32.to_le_bytes());
        assert_eq!(b[24], 3);
        assert_eq!(&b[34..36], &2u16.to_le_bytes());
        assert_eq!(BlkConfig::from_bytes(&b), c);
    }

    #[test]
    fn read_only_disks_offer_ro_and_no_discard() {
        let mut info = DiskInfo::new("raw", 1 << 20);
        info.read_only = true;
        let f = device_features(&info);
        assert_ne!(f & VIRTIO_BLK_F_RO, 0);
        assert_eq!(f & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }
}
