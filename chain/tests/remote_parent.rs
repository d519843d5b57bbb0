//! Local differencing children of parents on a web server (nginx on loopback, started here):
//! VHDX and VHD bases published over HTTP, a child created against the URL, the chain read
//! byte-exact against a model of the writes and against libvhdi's reading of a local copy of
//! the same chain (qemu has no VHDX differencing support), which also opens the child with
//! its extra `vdisk_url` locator key. Then the refusals: remote parents denied by default, a base replaced on the
//! server before the open (lineage mismatch) and while open (reads fail as changed).
//!
//! Oracle rule: without nginx (or python3-libvhdi for its part) the tests fail when `CI=true`, else
//! they print a loud SKIP and pass.
#![cfg(feature = "remote")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "support/nginx.rs"]
mod nginx;

use std::path::Path;

use block_io::{BlockDevice, ErrorKind, FileStorage};
use chain::remote::{open_object_layer, URL_KEY};
use chain::{ChainError, Disk, Identity, OpenOptions, RemoteParents};
use nginx::Nginx;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 48 * MIB;

/// Writes `(offset, len, byte)` runs to `dev` and to `model`.
fn write_runs(dev: &dyn BlockDevice, model: &mut [u8], runs: &[(u64, usize, u8)]) {
    for &(off, len, b) in runs {
        let buf = vec![b; len];
        dev.write_at(&buf, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&buf);
    }
    dev.flush().unwrap();
}

/// A base image (`fmt` "vhdx" or "vhd") at `path` with data near the start and at 40 MiB,
/// filled with `seed`-derived bytes; returns its model.
fn make_base(path: &Path, fmt: &str, seed: u8) -> Vec<u8> {
    let mut model = vec![0u8; SIZE as usize];
    let runs = [
        (0, 64 * 1024, seed),
        (3 * MIB, 1 << 20, seed.wrapping_add(1)),
        (40 * MIB, 512 * 1024, seed.wrapping_add(2)),
    ];
    if fmt == "vhdx" {
        let mut o = vhdx_format::CreateOptions::dynamic(SIZE);
        o.block_size = Some(MIB as u32);
        let f = vhdx_format::create_file(path, &o).unwrap();
        write_runs(&f, &mut model, &runs);
    } else {
        let mut o = vhd_format::CreateOptions::new(SIZE, vhd_format::Subformat::Dynamic);
        o.block_size = MIB as u32;
        let f = vhd_format::VhdFile::create(FileStorage::create(path).unwrap(), &o).unwrap();
        write_runs(&f, &mut model, &runs);
    }
    model
}

/// Creates a child of the image at `url` at `path`, recording the URL as `chain::remote`
/// documents (VHDX: `vdisk_url` locator key plus `relative_path` = the URL's file name; VHD:
/// the parent name).
fn make_child(path: &Path, url: &str, fmt: &str) {
    let parent = open_object_layer(url, None).unwrap();
    match (fmt, parent.identity) {
        (
            "vhdx",
            Identity::Vhdx {
                data_write_guid, ..
            },
        ) => {
            let pref = vhdx_format::ParentRef {
                data_write_guid,
                relative_path: chain::remote::url_file_name(url).unwrap(),
                absolute_path: None,
            };
            let mut f = vhdx_format::create_file(
                path,
                &vhdx_format::CreateOptions::differencing(SIZE, pref),
            )
            .unwrap();
            let mut entries = f.parent_locator().unwrap().entries.clone();
            entries.push((URL_KEY.to_string(), url.to_string()));
            f.set_parent_locator(&vhdx_format::locator::ParentLocator::new(entries))
                .unwrap();
        }
        ("vhd", Identity::Vhd { .. }) => {
            let (storage, _) = block_io::remote::open_url(url).unwrap();
            let details = vhd_format::read_details(storage).unwrap();
            let o =
                vhd_format::DifferencingOptions::for_parent(&details, url.to_string(), None, None);
            vhd_format::VhdFile::create_differencing(FileStorage::create(path).unwrap(), &o)
                .unwrap();
        }
        (f, id) => panic!("{f}: unexpected parent identity {id}"),
    }
}

fn allow() -> OpenOptions {
    OpenOptions::new().remote_parents(RemoteParents::Allow)
}

fn read_all(d: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; d.info().virtual_size as usize];
    for (i, c) in v.chunks_mut(4 * MIB as usize).enumerate() {
        d.read_at(c, i as u64 * 4 * MIB).unwrap();
    }
    v
}

fn chain_over_http(fmt: &str) {
    let Some(web) = Nginx::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let name = format!("base.{fmt}");
    let base = dir.path().join(&name);
    let mut model = make_base(&base, fmt, 0x40);
    web.publish(&base, &name);
    let url = web.url(&name);

    // The child lives in its own folder: no local base.* beside it.
    let cdir = dir.path().join("child");
    std::fs::create_dir(&cdir).unwrap();
    let child = cdir.join(format!("child.{fmt}"));
    make_child(&child, &url, fmt);

    // Denied by default: the URL is not fetched, and the local relative path finds nothing.
    match Disk::open(&child, &OpenOptions::new().read_only(true)) {
        Err(ChainError::PolicyRefused { path, rule, .. }) => {
            assert_eq!(path, Path::new(&url));
            assert!(rule.contains("remote parents"), "{rule}");
        }
        other => panic!("{fmt}: expected PolicyRefused, got {other:?}"),
    }

    // Denied, with a copy of the base beside the child (VHDX: its relative_path names the
    // URL's file name): the local copy is opened instead, lineage-checked.
    if fmt == "vhdx" {
        std::fs::copy(&base, cdir.join(&name)).unwrap();
        let disk = Disk::open(&child, &OpenOptions::new().read_only(true)).unwrap();
        assert_eq!(
            disk.layers()[1].path,
            std::fs::canonicalize(cdir.join(&name)).unwrap()
        );
        assert_eq!(disk.links(), &[chain::LinkCheck::Verified]);
        drop(disk);
        std::fs::remove_file(cdir.join(&name)).unwrap();
    }

    // Allowed: the child writes over the remote parent, partly overlapping its data.
    {
        let disk = Disk::open(&child, &allow()).unwrap();
        assert_eq!(disk.layers().len(), 2);
        assert_eq!(disk.layers()[1].path, Path::new(&url));
        assert_eq!(disk.links(), &[chain::LinkCheck::Verified]);
        write_runs(
            &disk,
            &mut model,
            &[(2 * MIB + 512, 4096, 0x77), (3 * MIB + 4096, 8192, 0x78)],
        );
    }
    let disk = Disk::open(&child, &allow().read_only(true)).unwrap();
    let got = read_all(&disk);
    assert_eq!(
        common::first_diff(&got, &model),
        None,
        "{fmt}: chain differs from model"
    );
    drop(disk);

    // libvhdi, the independent reader, flattens a local copy of the same chain (it opens
    // the child with the extra vdisk_url locator key; the parent is given to it).
    let ldir = dir.path().join("local");
    std::fs::create_dir(&ldir).unwrap();
    let (lbase, lchild) = (ldir.join(&name), ldir.join(format!("child.{fmt}")));
    std::fs::copy(&base, &lbase).unwrap();
    std::fs::copy(&child, &lchild).unwrap();
    if let Some(theirs) = common::libvhdi_read(&[lchild, lbase], SIZE) {
        assert_eq!(
            common::first_diff(&theirs, &got),
            None,
            "{fmt}: libvhdi differs"
        );
    }

    // Replaced while open: a read the cache cannot answer fails as changed (Corrupt), never
    // mixing old and new bytes.
    let disk = Disk::open(&child, &allow().read_only(true)).unwrap();
    let mut buf = vec![0u8; 4096];
    disk.read_at(&mut buf, 0).unwrap();
    let other = dir.path().join(format!("other.{fmt}"));
    make_base(&other, fmt, 0x90);
    web.publish(&other, &name);
    let e = disk.read_at(&mut buf, 40 * MIB).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{fmt}: {}", e.chain_string());
    assert!(
        block_io::remote::RemoteError::find(&e).is_some(),
        "{fmt}: {}",
        e.chain_string()
    );
    drop(disk);

    // Replaced before the open: the new base is another image, the lineage check refuses it.
    match Disk::open(&child, &allow().read_only(true)) {
        Err(ChainError::LineageMismatch { parent, .. }) => assert_eq!(parent, Path::new(&url)),
        other => panic!("{fmt}: expected LineageMismatch, got {other:?}"),
    }
}

#[test]
fn vhdx_child_of_an_http_parent() {
    chain_over_http("vhdx");
}

#[test]
fn vhd_child_of_an_http_parent() {
    chain_over_http("vhd");
}

#[test]
fn remote_tops_open_read_only_only() {
    let Some(web) = Nginx::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("b.vhdx");
    let model = make_base(&base, "vhdx", 0x11);
    web.publish(&base, "b.vhdx");
    let url = web.url("b.vhdx");
    let e = Disk::open(&url, &OpenOptions::new()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ReadOnly);
    let disk = Disk::open(&url, &OpenOptions::new().read_only(true)).unwrap();
    assert_eq!(common::first_diff(&read_all(&disk), &model), None);
    // A 404 is an open error naming the status.
    let e = Disk::open(web.url("nope.vhdx"), &OpenOptions::new().read_only(true)).unwrap_err();
    let s = block_io::Error::from(e).chain_string();
    assert!(s.contains("404"), "{s}");
}
