//! Image locks through a chain (issue 10 item 3): a writable top excludes other writers,
//! parents refuse writers while a child is open on them, a read-only VHD/VHDX top refuses
//! writers (as `qemu-img info` does) while a read-only raw top shares them, and
//! `LockMode::Off` (`-U`) skips every lock. The oracle test checks the same against qemu-io
//! and qemu-img (a failure under CI=true when they are missing, a loud skip elsewhere).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use block_io::testing::oracle;
use block_io::{BlockDevice, ErrorKind, FileStorage, LockMode, OpenOptions as FileOptions};
use chain::{ChainError, Disk, LayerOptions, OpenOptions};
use common::{create_base, create_child, Fmt, SIZE};

fn two_deep(fmt: Fmt, dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = dir.join(format!("base.{}", fmt.ext()));
    let child = dir.join(format!("child.{}", fmt.ext()));
    let b = create_base(fmt, &base, SIZE);
    b.write_at(&[7; 4096], 0).unwrap();
    b.flush().unwrap();
    drop(b);
    drop(create_child(
        fmt,
        &child,
        &base,
        &format!(".\\base.{}", fmt.ext()),
    ));
    (base, child)
}

#[track_caller]
fn assert_locked<T: std::fmt::Debug>(r: Result<T, ChainError>, message: &str) {
    let e = r.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Locked, "{e:?}");
    let full = block_io::Error::from(e).chain_string();
    assert!(full.contains(message), "{full} lacks {message}");
}

#[track_caller]
fn assert_storage_locked(r: block_io::Result<FileStorage>, message: &str) {
    let e = r.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Locked, "{e:?}");
    assert!(e.to_string().contains(message), "{e} lacks {message}");
}

fn rw() -> FileOptions {
    FileOptions::new()
}

#[test]
fn writable_chain_excludes_writers_of_every_layer() {
    for fmt in [Fmt::Vhd, Fmt::Vhdx] {
        let d = tempfile::tempdir().unwrap();
        let (base, child) = two_deep(fmt, d.path());
        let disk = Disk::open(&child, &OpenOptions::new()).unwrap();
        // The top: a second writer, or a read-only look at its changing metadata, is refused.
        assert_locked(
            Disk::open(&child, &OpenOptions::new()),
            "failed to get \"write\" lock",
        );
        assert_locked(
            Disk::open(&child, &OpenOptions::new().read_only(true)),
            "failed to get shared \"write\" lock",
        );
        assert_storage_locked(FileStorage::open(&child, &rw()), "\"write\" lock");
        // The parent must not change under its child: no writer, no create over it.
        assert_storage_locked(
            FileStorage::open(&base, &rw()),
            "failed to get \"write\" lock",
        );
        assert_storage_locked(FileStorage::create(&base), "failed to get \"write\" lock");
        assert_locked(
            Disk::open(&base, &OpenOptions::new()),
            "failed to get \"write\" lock",
        );
        // Readers of the parent share it.
        let ro_base = Disk::open(&base, &OpenOptions::new().read_only(true)).unwrap();
        let mut b = [0u8; 4096];
        ro_base.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [7; 4096]);
        drop(ro_base);
        // -U: no lock taken or tested.
        let off = OpenOptions::new().read_only(true).lock(LockMode::Off);
        let forced = Disk::open(&child, &off).unwrap();
        disk.read_at(&mut b, 0).unwrap();
        forced.read_at(&mut b, 0).unwrap();
        drop(forced);
        drop(disk);
        // Everything is free again.
        drop(FileStorage::open(&base, &rw()).unwrap());
        drop(Disk::open(&child, &OpenOptions::new()).unwrap());
    }
}

#[test]
fn read_only_chain_keeps_parents_and_vhdx_top_from_changing() {
    let d = tempfile::tempdir().unwrap();
    let (base, child) = two_deep(Fmt::Vhdx, d.path());
    let ro = Disk::open(&child, &OpenOptions::new().read_only(true)).unwrap();
    assert_storage_locked(
        FileStorage::open(&base, &rw()),
        "failed to get \"write\" lock",
    );
    assert_storage_locked(
        FileStorage::open(&child, &rw()),
        "failed to get \"write\" lock",
    );
    // Two read-only chains share everything.
    let again = Disk::open(&child, &OpenOptions::new().read_only(true)).unwrap();
    drop((ro, again));
    // A parent in use by someone else's writer cannot be a parent.
    let w = FileStorage::open(&base, &rw()).unwrap();
    assert_locked(
        Disk::open(&child, &OpenOptions::new().read_only(true)),
        "failed to get shared \"write\" lock",
    );
    // Unless locks are off.
    let off = OpenOptions::new().read_only(true).lock(LockMode::Off);
    drop(Disk::open(&child, &off).unwrap());
    drop(w);
}

#[test]
fn read_only_raw_top_shares_writes() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("disk.raw");
    std::fs::write(&raw, vec![3u8; 1 << 20]).unwrap();
    let w = FileStorage::open(&raw, &rw()).unwrap();
    // Detected or named raw, a read-only top lets the writer be (as qemu-io -r -f raw).
    let ro = Disk::open(&raw, &OpenOptions::new().read_only(true)).unwrap();
    let named = OpenOptions::new()
        .read_only(true)
        .format(Some(chain::Format::Raw));
    let ro2 = Disk::open(&raw, &named).unwrap();
    drop((ro, ro2));
    // A writable raw top still excludes the writer.
    assert_locked(
        Disk::open(&raw, &OpenOptions::new()),
        "failed to get \"write\" lock",
    );
    drop(w);
    // As a layer opened to be a parent, raw refuses writers like any parent.
    let parent = LayerOptions {
        parent: true,
        ..LayerOptions::default()
    };
    let l = chain::open_layer_with(&raw, None, &parent).unwrap();
    assert_storage_locked(
        FileStorage::open(&raw, &rw()),
        "failed to get \"write\" lock",
    );
    drop(l);
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let o: Output = Command::new(cmd).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success() && !text.contains("Failed to get"), text)
}

#[test]
fn qemu_sees_the_chain_locks() {
    if !oracle("qemu-io") || !oracle("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (base, child) = two_deep(Fmt::Vhdx, d.path());
    let (base, child) = (base.to_str().unwrap(), child.to_str().unwrap());
    let disk = Disk::open(child, &OpenOptions::new()).unwrap();
    // The parent is readable by QEMU, not writable.
    let (ok, t) = run("qemu-io", &["-f", "vhdx", "-c", "write 0 512", base]);
    assert!(!ok && t.contains("Failed to get \"write\" lock"), "{t}");
    let (ok, t) = run("qemu-img", &["info", base]);
    assert!(ok, "{t}");
    // The top is ours: qemu-img info needs -U, as on an image a VM writes.
    let (ok, t) = run("qemu-img", &["info", child]);
    assert!(
        !ok && t.contains("Failed to get shared \"write\" lock"),
        "{t}"
    );
    // With -U it gets past the locks, to refuse the differencing VHDX it does not support.
    let (_, t) = run("qemu-img", &["info", "-U", child]);
    assert!(!t.contains("lock"), "{t}");
    drop(disk);
    let (ok, t) = run("qemu-io", &["-f", "vhdx", "-c", "write 0 512", base]);
    assert!(ok, "{t}");
}
