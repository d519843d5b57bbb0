//! Identity rules of MS-VHDX 2.2.2: FileWriteGuid changes before the first write of a
//! session, DataWriteGuid before the first user-visible change, LogGuid is zero when the log
//! is empty; headers advance by the two-slot protocol; read-only opens change nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use block_io::{BlockDevice, MemStorage};
use vhdx_format::header::{Header, HEADER_OFFSETS};
use vhdx_format::{create, CreateOptions, VhdxFile};

fn headers(m: &MemStorage) -> [Header; 2] {
    let b = m.to_vec().unwrap();
    HEADER_OFFSETS.map(|o| Header::parse(&b[o as usize..o as usize + 4096]).unwrap())
}

#[test]
fn write_session_changes_ids_once() {
    let m = Arc::new(MemStorage::new());
    let mut o = CreateOptions::dynamic(4 << 20);
    o.block_size = Some(1 << 20);
    let f = create(m.clone(), &o).unwrap();
    let h0 = f.header();
    assert!(h0.log_guid.is_nil());
    // Reads change nothing.
    let mut b = [0u8; 512];
    f.read_at(&mut b, 0).unwrap();
    assert_eq!(f.header(), h0);
    f.write_at(&[1; 512], 0).unwrap();
    let h1 = f.header();
    assert_ne!(h1.file_write_guid, h0.file_write_guid);
    assert_ne!(h1.data_write_guid, h0.data_write_guid);
    assert!(
        !h1.log_guid.is_nil(),
        "the log is in use during the session"
    );
    assert!(h1.sequence_number > h0.sequence_number);
    // Both slots hold valid headers, the current one newer.
    let [a, c] = headers(&m);
    assert_eq!(a.sequence_number.max(c.sequence_number), h1.sequence_number);
    assert_eq!(a.sequence_number.abs_diff(c.sequence_number), 1);
    // A second write in the same session: no further change.
    f.write_at(&[2; 512], 4096).unwrap();
    assert_eq!(f.header(), h1);
    f.close().unwrap();
    let h2 = f.header();
    assert!(h2.log_guid.is_nil());
    assert_eq!(h2.data_write_guid, h1.data_write_guid);
    drop(f);
    // Read-only open: nothing written.
    let before = m.to_vec().unwrap();
    let r = VhdxFile::open(
        m.as_ref().clone(),
        &vhdx_format::OpenOptions::new().read_only(true),
    )
    .unwrap();
    r.flush().unwrap();
    drop(r);
    assert!(m.to_vec().unwrap() == before);
    // Writable open without writes: nothing changes either.
    let w = VhdxFile::open(m.clone(), &vhdx_format::OpenOptions::new().read_only(false)).unwrap();
    drop(w);
    assert!(m.to_vec().unwrap() == before);
}

#[test]
fn details_report_format_facts() {
    let m = Arc::new(MemStorage::new());
    let mut o = CreateOptions::fixed(6 << 20);
    o.block_size = Some(2 << 20);
    o.logical_sector_size = 4096;
    o.physical_sector_size = Some(4096);
    let f = create(m.clone(), &o).unwrap();
    let d = f.details();
    assert_eq!(d.subformat, vhdx_format::Subformat::Fixed);
    assert_eq!((d.virtual_size, d.block_size), (6 << 20, 2 << 20));
    assert_eq!(
        (d.logical_sector_size, d.physical_sector_size),
        (4096, 4096)
    );
    assert_eq!(d.log_size, 1 << 20);
    assert!(!d.log_dirty);
    assert!(d.parent_locator.is_empty());
    assert_eq!(f.info().disk_id, Some(d.disk_id));
    // Fixed: every block present and preallocated.
    let r = f.block_status(0, 6 << 20).unwrap();
    assert_eq!((r.status, r.len), (block_io::BlockStatus::Data, 6 << 20));
    assert!(d.file_size >= (6 << 20) + (4 << 20));
}
