//! Rewriting the parent name and locators of a differencing disk (VHD spec 1.0, "Dynamic Disk
//! Header Format": Parent Unicode Name and Parent Locator Entries): what Hyper-V's
//! `Set-VHD -ParentPath` does, and the format half of `vdisk rebase -u`.
//!
//! The new W2ku (absolute) and W2ru (relative) locators are written the way Hyper-V writes
//! them: UTF-16LE paths, the data space in bytes, each in its own sector-aligned area. Their
//! data always goes to new sectors where the footer was (the footer moves up, as for a block
//! allocation), never over the old locator data: the old header keeps pointing at intact old
//! data until the new header replaces it. Order: (1) locator data and the moved footer, (2)
//! sync, (3) the 1 KiB header in one write, (4) sync. A crash before (3) is durable leaves the
//! old header with its old locators (plus unreferenced sectors, or a torn tail that the footer
//! copy at offset 0 recovers from, as after an interrupted allocation); after it, the new one.
//! The old locator sectors stay in the file, unreferenced. VHD keeps no second header: the
//! commit relies on the 1 KiB header write (at 512, inside the file's first 4 KiB) not tearing,
//! which holds on devices and filesystems with 4 KiB atomic writes.
//!
//! [`VhdFile::set_parent`] keeps the parent unique id and timestamp: the new parent must be the
//! same content (the `chain` crate's unsafe `rebase` checks that before calling it).
//! [`VhdFile::set_parent_as`] also records a new parent's unique id and timestamp, in the
//! same header write (the `chain` crate's copying `rebase`, once the child holds every sector
//! where the two parents differ). Deprecated path
//! locators (Wi2k, Wi2r, MacX) and Mac aliases name the old place and are dropped; locators of
//! unknown platforms are kept.

use block_io::{BlockDevice, Error, ErrorKind, Result, Storage};

use crate::error::{corrupt, invalid_input};
use crate::file::VhdFile;
use crate::footer::DiskType;
use crate::header::encode_parent_name;
use crate::locator::{hyper_v_locators, PlatformCode};

impl<S: Storage> VhdFile<S> {
    /// Sets the parent name (UTF-16BE in the header) and the W2ku (`absolute_path`) and W2ru
    /// (`relative_path`) locators of this differencing disk, crash-safely (see the module
    /// docs). The parent unique id and timestamp stay.
    ///
    /// Errors: `ReadOnly` on a read-only handle, `InvalidInput` for a non-differencing disk, a
    /// name longer than 256 UTF-16 units or a path longer than 64 KiB, `NoSpace` past the
    /// 32-bit sector offsets, I/O errors (which latch the fail-stop state).
    pub fn set_parent(
        &mut self,
        parent_name: &str,
        absolute_path: Option<&str>,
        relative_path: Option<&str>,
    ) -> Result<()> {
        self.relink(None, parent_name, absolute_path, relative_path)
    }

    /// [`set_parent`](Self::set_parent), and the parent unique id and timestamp the child
    /// records become `parent_unique_id` and `parent_timestamp` (a new parent's footer
    /// values), in the same header write: a crash leaves the old link or the new one whole.
    /// Errors as for `set_parent`.
    pub fn set_parent_as(
        &mut self,
        parent_unique_id: uuid::Uuid,
        parent_timestamp: u32,
        parent_name: &str,
        absolute_path: Option<&str>,
        relative_path: Option<&str>,
    ) -> Result<()> {
        self.relink(
            Some((parent_unique_id, parent_timestamp)),
            parent_name,
            absolute_path,
            relative_path,
        )
    }

    fn relink(
        &mut self,
        identity: Option<(uuid::Uuid, u32)>,
        parent_name: &str,
        absolute_path: Option<&str>,
        relative_path: Option<&str>,
    ) -> Result<()> {
        if self.info().read_only {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                "cannot change the parent of a read-only image",
            ));
        }
        if self.footer.disk_type != DiskType::Differencing {
            return Err(invalid_input("not a differencing image: it has no parent"));
        }
        self.failstop.check()?;
        let header_off = self
            .footer
            .data_offset
            .ok_or_else(|| corrupt("differencing image without a dynamic header offset"))?;
        let Some(d) = self.dynamic.as_ref() else {
            return Err(corrupt("differencing image without a dynamic header"));
        };
        encode_parent_name(parent_name).map_err(|e| invalid_input(e.to_string()))?;
        let pos = self.alloc.lock().end;

        // Lay the new locator data out from the footer's place.
        let mut header = d.header.clone();
        header.parent_name = parent_name.to_string();
        if let Some((unique_id, timestamp)) = identity {
            header.parent_unique_id = unique_id;
            header.parent_timestamp = timestamp;
        }
        header
            .locators
            .retain(|l| matches!(l.platform, PlatformCode::Other(_)));
        let (locators, data) = hyper_v_locators(absolute_path, relative_path, pos)?;
        header.locators.extend(locators);
        if header.locators.len() > crate::header::LOCATOR_COUNT {
            return Err(invalid_input("more than 8 parent locators"));
        }
        let new_end = pos + data.len() as u64;
        if new_end / 512 >= u64::from(u32::MAX) {
            return Err(Error::new(
                ErrorKind::NoSpace,
                "VHD sector offsets exhausted",
            ));
        }
        let hb = header
            .to_bytes()
            .map_err(|e| invalid_input(e.to_string()))?;

        // (1) data and the moved footer, (2) sync, (3) header, (4) sync. `&mut self`: no
        // allocation is in flight, so the footer slot at `pos` is free to take.
        let fs = &self.failstop;
        if !data.is_empty() {
            fs.guard(self.storage().write_at(&data, pos))?;
            fs.guard(self.storage().write_at(&self.footer_bytes, new_end))?;
        }
        fs.guard(self.storage().sync_data())?;
        fs.guard(self.storage().write_at(&hb, header_off))?;
        fs.guard(self.storage().sync_data())?;
        self.alloc.get_mut().end = new_end;
        if let Some(d) = self.dynamic.as_mut() {
            d.header = header;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use block_io::{BlockDevice, MemStorage};

    use crate::{CreateOptions, DifferencingOptions, Subformat, VhdFile};

    fn pair() -> (MemStorage, crate::VhdDetails) {
        let base = VhdFile::create(
            MemStorage::new(),
            &CreateOptions::new(8 << 20, Subformat::Dynamic),
        )
        .unwrap();
        let pd = base.details();
        let o = DifferencingOptions::for_parent(
            &pd,
            "C:\\old\\base.vhd",
            Some("C:\\old\\base.vhd".into()),
            Some(".\\base.vhd".into()),
        );
        let child = VhdFile::create_differencing(MemStorage::new(), &o).unwrap();
        child.write_at(&[0x5A; 4096], 1 << 20).unwrap();
        child.flush().unwrap();
        (child.into_storage(), pd)
    }

    #[test]
    fn set_parent_rewrites_locators_and_keeps_data() {
        let (mem, pd) = pair();
        let mem = Arc::new(mem);
        let mut f =
            VhdFile::open(mem.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
        let long = format!("D:\\{}\\base.vhd", "x".repeat(700));
        f.set_parent("base.vhd", Some(&long), Some(".\\sub\\base.vhd"))
            .unwrap();
        // The handle still writes correctly (the footer moved past the new locator data).
        f.write_at(&[0x6B; 512], 3 << 20).unwrap();
        f.flush().unwrap();
        drop(f);
        let f = VhdFile::open(mem.clone(), &crate::OpenOptions::new().read_only(true)).unwrap();
        let d = f.details();
        assert_eq!(d.parent_name.as_deref(), Some("base.vhd"));
        assert_eq!(d.parent_unique_id, Some(pd.unique_id));
        let paths: Vec<_> = d
            .locators
            .iter()
            .map(|l| (l.platform_code.clone(), l.path.clone().unwrap()))
            .collect();
        assert_eq!(
            paths,
            vec![
                ("W2ku".to_string(), long.clone()),
                ("W2ru".to_string(), ".\\sub\\base.vhd".to_string())
            ]
        );
        // Hyper-V style: data space in bytes, a sector multiple, UTF-16LE.
        let w2ku = &d.locators[0].entry;
        assert_eq!(w2ku.data_length as usize, long.len() * 2);
        assert_eq!(w2ku.data_space % 512, 0);
        assert!(w2ku.data_space >= w2ku.data_length);
        let mut buf = vec![0u8; 4096];
        f.read_at(&mut buf, 1 << 20).unwrap();
        assert_eq!(buf, vec![0x5A; 4096]);
        f.read_at(&mut buf[..512], 3 << 20).unwrap();
        assert_eq!(&buf[..512], &[0x6B; 512][..]);
        assert!(f.check().unwrap().is_clean());
    }

    #[test]
    fn set_parent_as_records_the_new_identity() {
        let (mem, _) = pair();
        let mem = Arc::new(mem);
        let mut f =
            VhdFile::open(mem.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
        let id = uuid::Uuid::from_u128(0x1234);
        f.set_parent_as(id, 99, "new.vhd", Some("/x/new.vhd"), Some(".\\new.vhd"))
            .unwrap();
        drop(f);
        let f = VhdFile::open(mem, &crate::OpenOptions::new().read_only(true)).unwrap();
        let d = f.details();
        assert_eq!(d.parent_unique_id, Some(id));
        assert_eq!(d.parent_timestamp, Some(99));
        assert_eq!(d.parent_name.as_deref(), Some("new.vhd"));
        let mut buf = vec![0u8; 4096];
        f.read_at(&mut buf, 1 << 20).unwrap();
        assert_eq!(buf, vec![0x5A; 4096]);
        assert!(f.check().unwrap().is_clean());
    }

    #[test]
    fn refused_cases_write_nothing() {
        let (mem, _) = pair();
        let mem = Arc::new(mem);
        let before = mem.to_vec().unwrap();
        let mut ro =
            VhdFile::open(mem.clone(), &crate::OpenOptions::new().read_only(true)).unwrap();
        assert_eq!(
            ro.set_parent("p", Some("p"), None).unwrap_err().kind(),
            block_io::ErrorKind::ReadOnly
        );
        let mut f =
            VhdFile::open(mem.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
        let name = "n".repeat(300);
        assert_eq!(
            f.set_parent(&name, None, None).unwrap_err().kind(),
            block_io::ErrorKind::InvalidInput
        );
        assert_eq!(mem.to_vec().unwrap(), before);
        let base = VhdFile::create(
            MemStorage::new(),
            &CreateOptions::new(8 << 20, Subformat::Dynamic),
        )
        .unwrap();
        let mut base = VhdFile::open(
            base.into_storage(),
            &crate::OpenOptions::new().read_only(false),
        )
        .unwrap();
        assert_eq!(
            base.set_parent("p", Some("p"), None).unwrap_err().kind(),
            block_io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn every_crash_point_leaves_old_or_new_locators() {
        use block_io::{CutPoint, FaultStorage};
        let (mem, _) = pair();
        let old = VhdFile::open(mem.clone(), &crate::OpenOptions::new().read_only(true))
            .unwrap()
            .details();
        let (mut saw_old, mut saw_new) = (false, false);
        let mut n = 0;
        loop {
            // The header is one 1 KiB write inside the first 4 KiB: atomic on devices and
            // filesystems with 4 KiB atomic writes, which this models. (VHD keeps no second
            // header, so a device that tears 512-byte sectors could tear it.)
            let fault = Arc::new(FaultStorage::new(mem.clone()).with_sector_size(4096));
            let mut f =
                VhdFile::open(fault.clone(), &crate::OpenOptions::new().read_only(false)).unwrap();
            fault.set_cut(CutPoint::AfterOps(n));
            let done = f
                .set_parent("new.vhd", Some("E:\\new\\new.vhd"), Some(".\\new.vhd"))
                .is_ok();
            for seed in 0..6 {
                let img = fault.crash_image(seed);
                for ro in [true, false] {
                    let f = VhdFile::open(img.clone(), &crate::OpenOptions::new().read_only(ro))
                        .unwrap();
                    let d = f.details();
                    let name = d.parent_name.clone().unwrap();
                    if name == "new.vhd" {
                        saw_new = true;
                        let p: Vec<_> = d.locators.iter().map(|l| l.path.clone()).collect();
                        assert_eq!(
                            p,
                            vec![Some("E:\\new\\new.vhd".into()), Some(".\\new.vhd".into())]
                        );
                    } else {
                        assert_eq!(d.locators, old.locators, "cut {n} seed {seed}");
                        saw_old = true;
                        assert_eq!(d.parent_name, old.parent_name);
                    }
                    let mut buf = vec![0u8; 4096];
                    f.read_at(&mut buf, 1 << 20).unwrap();
                    assert_eq!(buf, vec![0x5A; 4096], "cut {n} seed {seed}");
                }
            }
            if done {
                // Everything synced: the new header is durable.
                let img = fault.durable_image();
                let d = VhdFile::open(img, &crate::OpenOptions::new().read_only(true))
                    .unwrap()
                    .details();
                assert_eq!(d.parent_name.as_deref(), Some("new.vhd"));
                break;
            }
            n += 1;
            assert!(n < 50, "set_parent never completed");
        }
        assert!(saw_old && saw_new);
    }
}
