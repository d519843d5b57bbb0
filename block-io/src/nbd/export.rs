//! An export as the server serves it: the device behind the I/O engine's async API, its size
//! and block-size constraints (proto.md "Size constraints") and its transmission flags.

use std::sync::Arc;

use super::proto::{self, MAX_PAYLOAD};
use super::ranges::IoRanges;
use crate::engine::AsyncDisk;
use crate::error::{ErrorKind, Result};
use crate::BlockDevice;

/// One export of an [`NbdServer`](super::NbdServer): a name and the device behind it.
#[derive(Clone)]
pub struct Export {
    pub(crate) name: String,
    pub(crate) dev: Arc<dyn BlockDevice>,
    pub(crate) read_only: bool,
    pub(crate) description: Option<String>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("read_only", &self.read_only)
            .field("description", &self.description)
            .finish()
    }
}

impl Export {
    /// Exports `dev` as `name` ("" is the default export clients get when they name none),
    /// writable unless the device is read-only.
    pub fn new(name: impl Into<String>, dev: Arc<dyn BlockDevice>) -> Self {
        Export {
            name: name.into(),
            dev,
            read_only: false,
            description: None,
        }
    }

    /// Refuses writes (`NBD_FLAG_READ_ONLY`) even when the device takes them.
    pub fn read_only(mut self, yes: bool) -> Self {
        self.read_only = yes;
        self
    }

    /// A description shown to people (`NBD_INFO_DESCRIPTION`, `nbdinfo`).
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.description = Some(text.into());
        self
    }

    /// The export's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// An export while the server runs.
pub(crate) struct Served {
    pub name: String,
    pub description: Option<String>,
    pub disk: AsyncDisk,
    pub read_only: bool,
    pub size: u64,
    /// Minimum block size: the device's logical sector, the unit every offset and length
    /// must be a multiple of.
    pub min_block: u32,
    /// Preferred block size: the physical sector, at least 4 KiB.
    pub preferred: u32,
    /// Reads and writes lock their range shared, trims and write-zeroes exclusively, at
    /// 1 MiB granularity: a device may release blocks on those, and a mapped read or write
    /// in flight to a released block could then touch another range's data (see
    /// [`AsyncDisk::write_zeroes`]). A client must not overlap such requests anyway; this
    /// keeps a client that does from hurting anything but its own range, while requests
    /// elsewhere in the export go on.
    pub ranges: IoRanges,
}

impl Served {
    pub fn new(e: &Export) -> Result<Arc<Served>> {
        let info = e.dev.info();
        let disk = AsyncDisk::new(e.dev.clone())?;
        let min_block = info.logical_sector_size.clamp(1, 65536);
        if !min_block.is_power_of_two() {
            return Err(crate::Error::new(
                ErrorKind::Unsupported,
                format!("logical sector size {min_block} is not a power of two"),
            ));
        }
        let preferred = info
            .physical_sector_size
            .max(min_block)
            .max(4096)
            .next_power_of_two()
            .min(MAX_PAYLOAD);
        Ok(Arc::new(Served {
            name: e.name.clone(),
            description: e.description.clone(),
            disk,
            read_only: e.read_only || info.read_only,
            size: info.virtual_size,
            min_block,
            preferred,
            ranges: IoRanges::default(),
        }))
    }

    /// The transmission flags of this export.
    pub fn flags(&self, structured: bool) -> u16 {
        // CAN_MULTI_CONN is safe: every connection to an export shares this one `Served`, so
        // one AsyncDisk over one `BlockDevice`. Devices do `&self` I/O and are Send + Sync,
        // with no per-connection cache, so a write one connection completed is visible to
        // every other at once, and `BlockDevice::flush` makes every completed write durable,
        // whichever connection issued it (proto.md "Transmission flags").
        let mut f = proto::TF_HAS_FLAGS | proto::TF_SEND_FLUSH | proto::TF_CAN_MULTI_CONN;
        if self.read_only {
            f |= proto::TF_READ_ONLY;
        } else {
            f |= proto::TF_SEND_FUA
                | proto::TF_SEND_TRIM
                | proto::TF_SEND_WRITE_ZEROES
                | proto::TF_SEND_FAST_ZERO;
        }
        if structured {
            // Every read is answered with one data chunk, so "don't fragment" always holds.
            f |= proto::TF_SEND_DF;
        }
        f
    }
}
