//! Differencing chains we create, read through libvhdi (Debian's pyvhdi), an independent
//! reader that follows the chain: child over parent must equal the parent bytes overlaid with
//! the child's writes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use block_io::{BlockDevice, FileStorage, OpenOptions};
use common::{have_pyvhdi, pattern, s};
use vhd_format::{CreateOptions, DifferencingOptions, Subformat, VhdFile};

const SIZE: u64 = 9 * 1024 * 1024 + 3 * 512;

fn read_with_libvhdi(child: &str, parent: &str, len: u64) -> Vec<u8> {
    let script = format!(
        "import pyvhdi,sys\nf=pyvhdi.file(); f.open({child:?}); p=pyvhdi.file(); p.open({parent:?})\n\
         f.set_parent(p)\nsys.stdout.buffer.write(f.read_buffer_at_offset({len}, 0))\n"
    );
    let out = std::process::Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pyvhdi failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn info_with_libvhdi(path: &str) -> String {
    let script = format!(
        "import pyvhdi\nf=pyvhdi.file(); f.open({path:?})\n\
         print(f.get_media_size(), f.get_identifier(), f.get_parent_identifier(), f.get_parent_filename())\n"
    );
    let out = std::process::Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn chain_reads_identically_through_libvhdi() {
    if !have_pyvhdi() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ppath = dir.path().join("parent.vhd");
    let cpath = dir.path().join("child.vhd");
    let opts = OpenOptions::new().create(true);
    let parent = VhdFile::create(
        FileStorage::open(&ppath, &opts).unwrap(),
        &CreateOptions::new(SIZE, Subformat::Dynamic),
    )
    .unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let put = |dev: &VhdFile<FileStorage>, model: &mut Vec<u8>, off: u64, len: u64, tag: u64| {
        let d = pattern(tag, len as usize);
        dev.write_at(&d, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&d);
    };
    // Parent: whole blocks, partial blocks, single sectors.
    put(&parent, &mut model, 0, 2 << 20, 1);
    put(&parent, &mut model, 3 << 20, 4096, 2);
    put(&parent, &mut model, (5 << 20) + 512, 512, 3);
    put(&parent, &mut model, SIZE - 1024, 1024, 4);
    parent.flush().unwrap();
    let pd = parent.details();
    drop(parent);

    let d = DifferencingOptions::for_parent(
        &pd,
        s(&ppath),
        Some(s(&ppath).to_string()),
        Some("./parent.vhd".to_string()),
    );
    let child =
        VhdFile::create_differencing(FileStorage::open(&cpath, &opts).unwrap(), &d).unwrap();
    // Child: over parent data, over parent holes, partial blocks, single sectors.
    // libvhdi 20210425 decodes VHD bitmaps as `byte >> (7 - bit)` without `& 1`, so after a
    // set bit every later bit of the same byte reads as set. Our bitmaps are right (our model
    // test covers any pattern); here every child write ends on an 8-sector boundary so that
    // libvhdi's reading is exact.
    put(&child, &mut model, 4096 + 3584, 512, 10);
    put(&child, &mut model, (2 << 20) - 1024, 5120, 11);
    put(&child, &mut model, (3 << 20) + 1024, 3072, 12);
    put(&child, &mut model, (7 << 20) + 5 * 512, 3 * 512, 13);
    put(&child, &mut model, SIZE - 512, 512, 14);
    child.write_zeroes(100 * 512, 4 * 512, false).unwrap();
    model[100 * 512..104 * 512].fill(0);
    child.flush().unwrap();
    let cd = child.details();
    drop(child);

    let got = read_with_libvhdi(s(&cpath), s(&ppath), SIZE);
    assert_eq!(got.len(), model.len());
    let first_diff = got.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "libvhdi reads a different chain");
    let info = info_with_libvhdi(s(&cpath));
    assert!(info.contains(&SIZE.to_string()), "{info}");
    assert!(info.contains(&cd.unique_id.to_string()), "{info}");
    assert!(info.contains(&pd.unique_id.to_string()), "{info}");
    assert!(info.contains(s(&ppath)), "{info}");
}
