//! Byte-level regression tests for malformed images: every one must give an error (never a
//! panic or a huge allocation), and `check_storage` must report rather than fail.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use block_io::{BlockDevice, ErrorKind, MemStorage, Storage};
use vhd_format::footer::checksum;
use vhd_format::{
    check_storage, repair_storage, CreateOptions, DifferencingOptions, FooterSource, Subformat,
    VhdFile,
};

const BLOCK: u32 = 4096;

/// A dynamic image of 64 KiB with 4 KiB blocks and two blocks allocated.
fn dynamic_bytes() -> Vec<u8> {
    let st = Arc::new(MemStorage::new());
    let mut o = CreateOptions::new(64 * 1024, Subformat::Dynamic);
    o.block_size = BLOCK;
    o.timestamp = Some(0);
    let f = VhdFile::create(st.clone(), &o).unwrap();
    f.write_at(&[0xAA; 4096], 0).unwrap();
    f.write_at(&[0xBB; 512], 5 * 4096).unwrap();
    f.flush().unwrap();
    st.to_vec().unwrap()
}

fn diff_bytes() -> Vec<u8> {
    let st = Arc::new(MemStorage::new());
    let o = DifferencingOptions {
        size: 64 * 1024,
        block_size: BLOCK,
        parent_unique_id: uuid::Uuid::from_bytes([5; 16]),
        parent_timestamp: 7,
        parent_name: "/images/parent.vhd".into(),
        absolute_path: Some("/images/parent.vhd".into()),
        relative_path: Some("./parent.vhd".into()),
        unique_id: None,
        timestamp: Some(0),
        creator: Default::default(),
    };
    VhdFile::create_differencing(st.clone(), &o).unwrap();
    st.to_vec().unwrap()
}

fn be32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

/// Recomputes the footer checksum of both copies and the header checksum.
fn fix_sums(b: &mut [u8]) {
    let n = b.len();
    for off in [0, n - 512] {
        let sum = checksum(&b[off..off + 512], 64..68);
        be32(b, off + 64, sum);
    }
    let sum = checksum(&b[512..1536], 36..40);
    be32(b, 512 + 36, sum);
}

fn same(a: &[u8], b: &[u8]) {
    let first = a.iter().zip(b).position(|(x, y)| x != y);
    assert!(
        a.len() == b.len() && first.is_none(),
        "images differ: lengths {} and {}, first difference at {first:?}",
        a.len(),
        b.len()
    );
}

fn expect_err(bytes: &[u8], what: &str) -> block_io::Error {
    let st = MemStorage::from_bytes(bytes);
    let e =
        VhdFile::open(st.clone(), &vhd_format::OpenOptions::new().read_only(true)).expect_err(what);
    assert!(
        matches!(
            e.kind(),
            ErrorKind::Corrupt | ErrorKind::Unsupported | ErrorKind::OutOfRange
        ),
        "{what}: {e:?}"
    );
    let r = check_storage(&st).unwrap();
    assert!(!r.is_clean(), "{what}: check found nothing");
    e
}

#[test]
fn block_size_zero_and_not_power_of_two() {
    for bs in [0u32, 3000, 1, 1 << 30] {
        let mut b = dynamic_bytes();
        be32(&mut b, 512 + 32, bs);
        fix_sums(&mut b);
        expect_err(&b, &format!("block size {bs}"));
    }
}

#[test]
fn huge_max_table_entries() {
    for n in [u32::MAX, 1 << 24, 100_000] {
        let mut b = dynamic_bytes();
        be32(&mut b, 512 + 28, n);
        fix_sums(&mut b);
        expect_err(&b, &format!("max table entries {n}"));
    }
    // Too few entries for the size.
    let mut b = dynamic_bytes();
    be32(&mut b, 512 + 28, 2);
    fix_sums(&mut b);
    expect_err(&b, "BAT too small");
}

#[test]
fn bat_entries_past_eof_and_overlapping() {
    let mut b = dynamic_bytes();
    be32(&mut b, 1536 + 4 * 3, 0x00FF_FFFF);
    let e = expect_err(&b, "BAT entry past EOF");
    assert!(e.chain_string().contains("BAT entry 3"), "{e:?}");
    let r = check_storage(&MemStorage::from_bytes(&b)).unwrap();
    assert_eq!(r.bat_entries_past_eof, vec![3]);

    let mut b = dynamic_bytes();
    let first = u32::from_be_bytes(b[1536..1540].try_into().unwrap());
    be32(&mut b, 1536 + 4 * 7, first + 1);
    expect_err(&b, "overlapping blocks");
    let r = check_storage(&MemStorage::from_bytes(&b)).unwrap();
    assert!(r.overlapping_blocks.contains(&(0, 7)), "{r:?}");

    let mut b = dynamic_bytes();
    be32(&mut b, 1536 + 4 * 2, 3); // sector 3 = inside the header
    expect_err(&b, "block over metadata");
}

#[test]
fn checksum_errors() {
    // Header checksum: always refused.
    let mut b = dynamic_bytes();
    b[512 + 100] ^= 1;
    let e = expect_err(&b, "header checksum");
    assert!(e.chain_string().contains("checksum"));
    // Both footers bad: refused.
    let mut b = dynamic_bytes();
    let n = b.len();
    b[n - 512 + 20] ^= 1;
    b[20] ^= 1;
    expect_err(&b, "both footers");
    // Fixed disk footer bad: refused (no copy).
    let st = Arc::new(MemStorage::new());
    VhdFile::create(st.clone(), &CreateOptions::new(8192, Subformat::Fixed)).unwrap();
    let mut b = st.to_vec().unwrap();
    let n = b.len();
    b[n - 512 + 20] ^= 1;
    expect_err(&b, "fixed footer");
}

#[test]
fn bad_end_footer_falls_back_to_the_copy_and_repairs() {
    let good = dynamic_bytes();
    let mut b = good.clone();
    let n = b.len();
    b[n - 512 + 20] ^= 1;
    let st = MemStorage::from_bytes(&b);
    let f = VhdFile::open(st.clone(), &vhd_format::OpenOptions::new().read_only(true)).unwrap();
    assert_eq!(f.footer_source(), FooterSource::CopyAtStart);
    let d = f.details();
    assert!(d.end_footer_error.unwrap().contains("checksum"));
    let mut buf = vec![0u8; 4096];
    f.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![0xAA; 4096]);
    // check + repair rewrites the footer from the copy.
    let r = check_storage(&st).unwrap();
    assert!(!r.footer_ok && !r.is_clean());
    let r = repair_storage(&st).unwrap();
    assert!(r.is_clean(), "{r:?}");
    same(&st.to_vec().unwrap(), &good);
    // A writable open repairs too.
    let st = Arc::new(MemStorage::from_bytes(&b));
    VhdFile::open(st.clone(), &vhd_format::OpenOptions::new().read_only(false)).unwrap();
    same(&st.to_vec().unwrap(), &good);
    // A bad copy at 0 is repaired from the end footer.
    let mut b = good.clone();
    b[30] ^= 1;
    let st = MemStorage::from_bytes(&b);
    assert_eq!(
        VhdFile::open(st.clone(), &vhd_format::OpenOptions::new().read_only(true))
            .unwrap()
            .footer_source(),
        FooterSource::End
    );
    let r = repair_storage(&st).unwrap();
    assert!(r.is_clean() && !r.issues.is_empty(), "{r:?}");
    same(&st.to_vec().unwrap(), &good);
}

#[test]
fn bad_cookies() {
    let mut b = dynamic_bytes();
    b[512] = b'X';
    fix_sums(&mut b);
    expect_err(&b, "header cookie");
    let mut b = dynamic_bytes();
    let n = b.len();
    b[0] = b'X';
    b[n - 512] = b'X';
    expect_err(&b, "footer cookies");
}

#[test]
fn truncated_files() {
    let b = dynamic_bytes();
    for len in [
        0usize,
        1,
        100,
        511,
        512,
        1000,
        1536,
        2000,
        b.len() / 2,
        b.len() - 1,
    ] {
        let st = MemStorage::from_bytes(&b[..len]);
        match VhdFile::open(st.clone(), &vhd_format::OpenOptions::new().read_only(true)) {
            // Cut inside the last block the copy at 0 still opens; reads must not fail.
            Ok(f) => {
                let mut buf = vec![0u8; 64 * 1024];
                f.read_at(&mut buf, 0).unwrap();
            }
            Err(e) => assert!(
                matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::OutOfRange),
                "len {len}: {e:?}"
            ),
        }
        let _ = check_storage(&st).unwrap();
    }
    // A header that does not fit.
    let mut b = dynamic_bytes();
    let n = b.len();
    for off in [16, n - 512 + 16] {
        b[off..off + 8].copy_from_slice(&(u64::MAX - 10).to_be_bytes());
    }
    fix_sums(&mut b);
    expect_err(&b, "header offset past EOF");
}

#[test]
fn locator_offsets_past_eof() {
    let mut b = diff_bytes();
    // First locator entry at header + 576: data offset at +16.
    let off = 512 + 576 + 16;
    b[off..off + 8].copy_from_slice(&(1u64 << 40).to_be_bytes());
    fix_sums(&mut b);
    let e = expect_err(&b, "locator past EOF");
    assert!(e.chain_string().contains("locator"), "{e:?}");
    let mut b = diff_bytes();
    be32(&mut b, 512 + 576 + 8, u32::MAX); // data length
    fix_sums(&mut b);
    expect_err(&b, "huge locator length");
}

#[test]
fn odd_footer_fields() {
    let mut b = dynamic_bytes();
    let n = b.len();
    for base in [0, n - 512] {
        be32(&mut b, base + 60, 7); // disk type
    }
    fix_sums(&mut b);
    assert_eq!(expect_err(&b, "disk type").kind(), ErrorKind::Unsupported);
    let mut b = dynamic_bytes();
    for base in [0, n - 512] {
        b[base + 48..base + 56].copy_from_slice(&1000u64.to_be_bytes());
    }
    fix_sums(&mut b);
    expect_err(&b, "size not a multiple of 512");
    // A fixed disk whose size exceeds the file.
    let st = Arc::new(MemStorage::new());
    VhdFile::create(st.clone(), &CreateOptions::new(8192, Subformat::Fixed)).unwrap();
    let mut b = st.to_vec().unwrap();
    let n = b.len();
    b[n - 512 + 48..n - 512 + 56].copy_from_slice(&(1u64 << 20).to_be_bytes());
    let sum = checksum(&b[n - 512..], 64..68);
    be32(&mut b, n - 512 + 64, sum);
    expect_err(&b, "fixed size beyond the file");
}

#[test]
fn create_rejects_bad_options() {
    let mut o = CreateOptions::new(1 << 20, Subformat::Dynamic);
    o.block_size = 3000;
    let e = VhdFile::create(MemStorage::new(), &o).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    let o = CreateOptions::new(0, Subformat::Dynamic);
    assert!(VhdFile::create(MemStorage::new(), &o).is_err());
    let o = CreateOptions::new(3 << 40, Subformat::Fixed);
    assert!(VhdFile::create(MemStorage::new(), &o).is_err());
    let st = MemStorage::new();
    assert!(!vhd_format::probe(&st));
    st.write_at(&[0u8; 4096], 0).unwrap();
    assert!(!vhd_format::probe(&st));
}

/// A locator ending at the last byte of a (sparse) file as long as `u64` allows: rounding its
/// length up to whole sectors passes `u64::MAX`. Once an overflow panic in the metadata
/// overlap check; now an error.
#[test]
fn locator_at_the_end_of_u64() {
    let mut b = diff_bytes();
    let n = b.len();
    let entry = 512 + 576;
    be32(&mut b, entry + 8, 1); // data length
    b[entry + 16..entry + 24].copy_from_slice(&(u64::MAX - 1).to_be_bytes());
    fix_sums(&mut b);
    let st = MemStorage::new();
    st.write_at(&b[..n - 512], 0).unwrap();
    st.set_len(u64::MAX).unwrap();
    st.write_at(&b[n - 512..], u64::MAX - 512).unwrap();
    let e = VhdFile::open(st.clone(), &vhd_format::OpenOptions::new().read_only(true))
        .expect_err("locator at the end of u64");
    assert!(
        matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::Unsupported),
        "{e:?}"
    );
    let r = check_storage(&st).unwrap();
    assert!(!r.is_clean(), "check found nothing: {r:?}");
}
