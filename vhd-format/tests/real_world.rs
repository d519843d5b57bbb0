//! The dfvfs sample images in /work/shared/testdata/real-world/ (see its README.md).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use block_io::{BlockDevice, ErrorKind, FileStorage, MemStorage, OpenOptions, Storage};
use vhd_format::{check_storage, probe, repair_storage, DiskType, FooterSource, VhdFile};

/// CI lays `shared/` beside the clone (two levels above this crate); sessions have it at
/// /work/shared.
fn dir() -> String {
    let beside = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/testdata/real-world"
    );
    if std::path::Path::new(beside).exists() {
        beside.to_string()
    } else {
        "/work/shared/testdata/real-world".to_string()
    }
}

fn load(name: &str) -> Option<MemStorage> {
    let path = format!("{}/{name}", dir());
    match std::fs::read(&path) {
        Ok(b) => Some(MemStorage::from_bytes(&b)),
        Err(e) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("missing test data {path}: {e}");
            }
            eprintln!("WARNING: missing test data {path}: {e}; skipping");
            None
        }
    }
}

#[test]
fn ext2_opens_and_reads_a_superblock() {
    let Some(st) = load("ext2.vhd") else { return };
    assert!(probe(&st));
    let f = VhdFile::open(st, &vhd_format::OpenOptions::new().read_only(true)).unwrap();
    let d = f.details();
    assert_eq!(d.disk_type, DiskType::Dynamic);
    assert_eq!(d.virtual_size, 4_212_736);
    assert_eq!(d.creator_app, "qemu");
    assert_eq!(d.chs_size, 4_212_736);
    assert_eq!(d.block_size, Some(2 << 20));
    assert_eq!(d.footer_source, FooterSource::End);
    // ext2 superblock magic 0xEF53 at byte 1024 + 56.
    let mut sb = vec![0u8; 1024];
    f.read_at(&mut sb, 1024).unwrap();
    assert_eq!(&sb[56..58], &[0x53, 0xEF]);
    let r = f.check().unwrap();
    assert!(r.is_clean(), "{r:?}");
}

#[test]
fn fat_differential_gives_details_without_its_parent() {
    let Some(st) = load("fat-differential.vhd") else {
        return;
    };
    let f = VhdFile::open(st, &vhd_format::OpenOptions::new().read_only(true)).unwrap();
    let d = f.details();
    assert_eq!(d.disk_type, DiskType::Differencing);
    assert_eq!(d.virtual_size, 4 << 20);
    assert_eq!(d.creator_app, "win ");
    assert_eq!(d.creator_version, (10, 0));
    assert_eq!(
        d.parent_unique_id.unwrap().to_string(),
        "5fa21a55-f394-aa4d-9958-1951a67d5540"
    );
    assert_eq!(
        d.parent_name.as_deref(),
        Some(r"C:\Projects\dfvfs\test_data\fat-parent.vhd")
    );
    let locs: Vec<_> = d
        .locators
        .iter()
        .map(|l| (l.platform_code.as_str(), l.path.clone().unwrap()))
        .collect();
    assert_eq!(
        locs,
        vec![
            (
                "W2ku",
                r"C:\Projects\dfvfs\test_data\fat-parent.vhd".to_string()
            ),
            ("W2ru", r".\fat-parent.vhd".to_string()),
        ]
    );
    // Hyper-V writes the data space in bytes.
    assert_eq!(d.locators[1].entry.data_space, 0x10000);
    assert_eq!(d.locators[1].entry.reserved_bytes(), 0x10000);
    // Some sectors are in this layer, the rest is the parent's.
    let mut seen_data = false;
    let mut seen_parent = false;
    let mut off = 0;
    while off < d.virtual_size {
        let run = f.block_status(off, d.virtual_size - off).unwrap();
        match run.status {
            block_io::BlockStatus::Data => seen_data = true,
            block_io::BlockStatus::Unallocated => seen_parent = true,
            block_io::BlockStatus::Zero => {}
        }
        off += run.len;
    }
    assert!(seen_data && seen_parent);
    assert!(f.check().unwrap().is_clean());
}

/// Decision: a strict open refuses a footer with a wrong checksum unless the copy at 0 is
/// valid (it is not in image.vhd: both copies carry the same wrong checksum), and always
/// refuses a dynamic header with a wrong checksum.
#[test]
fn wrong_checksums_are_refused_as_corrupt() {
    for name in ["image.vhd", "image-differential.vhd"] {
        let Some(st) = load(name) else { return };
        assert!(probe(&st), "{name}");
        let e =
            VhdFile::open(st.clone(), &vhd_format::OpenOptions::new().read_only(true)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{name}: {e:?}");
        assert!(e.chain_string().contains("checksum"), "{name}: {e:?}");
        let r = check_storage(&st).unwrap();
        assert!(
            !r.footer_ok && r.footer_copy_ok == Some(false),
            "{name}: {r:?}"
        );
        assert!(!r.is_clean());
        // Neither copy is valid, so repair may not touch the footer.
        let r = repair_storage(&st).unwrap();
        assert!(!r.is_clean());
    }
    let Some(st) = load("image-differential.vhd") else {
        return;
    };
    assert_eq!(check_storage(&st).unwrap().header_ok, Some(false));
}

#[test]
fn opens_through_file_storage() {
    let path = format!("{}/ext2.vhd", dir());
    if !std::path::Path::new(&path).exists() {
        return;
    }
    let st = FileStorage::open(&path, &OpenOptions::new().read_only(true)).unwrap();
    assert!(st.len().unwrap() > 0);
    let f = VhdFile::open(st, &vhd_format::OpenOptions::new().read_only(true)).unwrap();
    assert!(f.info().read_only);
    let e = f.write_at(&[0u8; 512], 0).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
}
