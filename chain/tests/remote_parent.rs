//! Local differencing children of remote parents.
//!
//! On a web server (nginx on loopback, started here): VHDX and VHD bases published over
//! HTTP, a child created against the URL, the chain read byte-exact against a model of the
//! writes and against libvhdi's reading of a local copy of the same chain (qemu has no VHDX
//! differencing support), which also opens the child with its extra `vdisk_url` locator key.
//! Then the refusals: remote parents denied by default, a base replaced on the server before
//! the open (lineage mismatch) and while open (reads fail as changed).
//!
//! On an NBD export: our server exporting a VHDX and a VHD base read-only advertises their
//! identity; a child made against the URL reads byte-exact against the model and libvhdi's
//! reading of the local chain, writes go to the child only, a server restarted with the same
//! image is reconnected transparently and one restarted with another image is detected
//! (`ClientError::ExportChanged`, then a lineage mismatch). qemu-nbd exporting a raw base
//! advertises nothing: it is a parent only with `RemoteParents::AllowUnverified`, checked by
//! content fingerprint, and a restart over changed content is detected.
//!
//! Oracle rule: without nginx, qemu-nbd (or python3-libvhdi for its part) the tests fail when
//! `CI=true`, else they print a loud SKIP and pass.
#![cfg(feature = "remote")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "support/nginx.rs"]
mod nginx;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_io::nbd::{ClientError, Export, NbdServer, StopHandle};
use block_io::{BlockDevice, ErrorKind, FileStorage};
use chain::remote::{open_nbd_parent, open_object_layer, AdvertisedIdentity, URL_KEY};
use chain::{ChainError, Disk, Format, Identity, OpenOptions, RemoteParents};
use nginx::{free_port, Nginx};

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

/// Our NBD server on 127.0.0.1 exporting an image (with its chain) as `base`, on a thread;
/// stopped (connections closed, port released) on drop.
struct OurServer {
    port: u16,
    stop: StopHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OurServer {
    /// Serves `image` on `port` (0: any), read-only or not, with the identity line our
    /// server advertises (`vdisk serve --nbd` does the same), if any.
    fn start(image: &Path, port: u16, read_only: bool) -> OurServer {
        let disk = Arc::new(Disk::open(image, &OpenOptions::new().read_only(read_only)).unwrap());
        let mut description = format!("{} (test)", image.display());
        if let Some(id) = AdvertisedIdentity::of(&disk) {
            description = format!("{description}\n{}", id.to_line());
        }
        let export = Export::new("base", disk)
            .read_only(read_only)
            .description(description);
        let server = NbdServer::bind_tcp(("127.0.0.1", port), vec![export]).unwrap();
        let port = server.local_addr().unwrap().port();
        let stop = server.stop_handle();
        let thread = std::thread::spawn(move || {
            server.serve().unwrap();
        });
        OurServer {
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("nbd://127.0.0.1:{}/base", self.port)
    }
}

impl Drop for OurServer {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn format_of(fmt: &str) -> Format {
    Format::from_name(fmt).unwrap()
}

/// Creates a child of the NBD export at `url` at `path` as the CLI does: VHDX with
/// `parent_linkage` = the identity's DataWriteGuid (advertised or fingerprint) and the URL
/// under `vdisk_url`; VHD with the URL as parent name and the unique id and timestamp.
fn make_nbd_child(path: &Path, url: &str, fmt: &str, allow: RemoteParents) {
    let parent = open_nbd_parent(path, url, format_of(fmt), allow).unwrap();
    let size = parent.dev.info().virtual_size;
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
                &vhdx_format::CreateOptions::differencing(size, pref),
            )
            .unwrap();
            let mut entries = f.parent_locator().unwrap().entries.clone();
            entries.push((URL_KEY.to_string(), url.to_string()));
            f.set_parent_locator(&vhdx_format::locator::ParentLocator::new(entries))
                .unwrap();
        }
        (
            "vhd",
            Identity::Vhd {
                unique_id,
                timestamp,
            },
        ) => {
            let o = vhd_format::DifferencingOptions {
                size,
                block_size: 2 << 20,
                parent_unique_id: unique_id,
                parent_timestamp: timestamp,
                parent_name: url.to_string(),
                absolute_path: None,
                relative_path: None,
                unique_id: None,
                timestamp: None,
                creator: vhd_format::Creator::default(),
            };
            vhd_format::VhdFile::create_differencing(FileStorage::create(path).unwrap(), &o)
                .unwrap();
        }
        (f, id) => panic!("{f}: unexpected parent identity {id}"),
    }
}

fn client_error(e: &block_io::Error) -> Option<&ClientError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(ce) = c.downcast_ref::<ClientError>() {
            return Some(ce);
        }
        cur = c.source();
    }
    None
}

fn chain_over_our_nbd(fmt: &str) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join(format!("base.{fmt}"));
    let mut model = make_base(&base, fmt, 0x50);
    let base_bytes = std::fs::read(&base).unwrap();

    // A writable export advertises no identity: not a parent under Allow.
    {
        let srv = OurServer::start(&base, 0, false);
        let child = dir.path().join("refused.vhdx");
        match open_nbd_parent(&child, &srv.url(), format_of(fmt), RemoteParents::Allow) {
            Err(ChainError::PolicyRefused { rule, .. }) => {
                assert!(rule.contains("AllowUnverified"), "{rule}")
            }
            other => panic!("{fmt}: expected PolicyRefused, got {other:?}"),
        }
    }

    let srv = OurServer::start(&base, 0, true);
    let url = srv.url();
    let port = srv.port;
    let child = dir.path().join(format!("child.{fmt}"));
    make_nbd_child(&child, &url, fmt, RemoteParents::Allow);

    // Denied by default.
    match Disk::open(&child, &OpenOptions::new().read_only(true)) {
        Err(ChainError::PolicyRefused { path, .. }) => assert_eq!(path, Path::new(&url)),
        other => panic!("{fmt}: expected PolicyRefused, got {other:?}"),
    }

    // Allowed: verified by the advertised identity; writes go to the child only.
    {
        let disk = Disk::open(&child, &allow()).unwrap();
        assert_eq!(disk.layers().len(), 2);
        assert_eq!(disk.layers()[1].path, Path::new(&url));
        assert_eq!(disk.links(), &[chain::LinkCheck::Verified]);
        assert!(disk.layers()[1].dev.info().read_only);
        write_runs(
            &disk,
            &mut model,
            &[
                (2 * MIB + 512, 4096, 0x77),
                (3 * MIB + 4096, 8192, 0x78),
                (47 * MIB, 64 * 1024, 0x79),
            ],
        );
    }
    let disk = Disk::open(&child, &allow().read_only(true)).unwrap();
    let got = read_all(&disk);
    assert_eq!(
        common::first_diff(&got, &model),
        None,
        "{fmt}: chain differs"
    );
    assert!(
        std::fs::read(&base).unwrap() == base_bytes,
        "{fmt}: the base changed"
    );

    // libvhdi flattens a local copy of the same chain.
    let ldir = dir.path().join("local");
    std::fs::create_dir(&ldir).unwrap();
    let (lbase, lchild) = (ldir.join("base"), ldir.join(format!("child.{fmt}")));
    std::fs::copy(&base, &lbase).unwrap();
    std::fs::copy(&child, &lchild).unwrap();
    if let Some(theirs) = common::libvhdi_read(&[lchild, lbase], SIZE) {
        assert_eq!(
            common::first_diff(&theirs, &got),
            None,
            "{fmt}: libvhdi differs"
        );
    }

    // The server restarted with the same image: the client reconnects, reads go on.
    drop(srv);
    let srv = OurServer::start(&base, port, true);
    let mut buf = vec![0u8; 64 * 1024];
    disk.read_at(&mut buf, 40 * MIB).unwrap();
    assert_eq!(&buf[..], &model[40 * MIB as usize..][..buf.len()]);

    // Restarted with another image of the same size: detected, no byte of it is returned.
    drop(srv);
    let other = dir.path().join(format!("other.{fmt}"));
    make_base(&other, fmt, 0x90);
    let srv = OurServer::start(&other, port, true);
    buf.fill(0xee);
    let e = disk.read_at(&mut buf, 40 * MIB).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{fmt}: {}", e.chain_string());
    assert!(
        matches!(client_error(&e), Some(ClientError::ExportChanged(_))),
        "{fmt}: {}",
        e.chain_string()
    );
    assert!(buf.iter().all(|&b| b == 0xee), "{fmt}: bytes came through");
    drop(disk);

    // Opened anew: the lineage check refuses the other image.
    match Disk::open(&child, &allow().read_only(true)) {
        Err(ChainError::LineageMismatch { parent, .. }) => assert_eq!(parent, Path::new(&url)),
        other => panic!("{fmt}: expected LineageMismatch, got {other:?}"),
    }
    drop(srv);
}

#[test]
fn vhdx_child_of_our_nbd_export() {
    chain_over_our_nbd("vhdx");
}

#[test]
fn vhd_child_of_our_nbd_export() {
    chain_over_our_nbd("vhd");
}

/// qemu-nbd exporting a raw file read-only on `port`, persistent; killed on drop.
struct QemuNbd(Child);

impl QemuNbd {
    fn start(bin: &Path, file: &Path, port: u16) -> QemuNbd {
        let mut child = Command::new(bin)
            .args(["-f", "raw", "-r", "-t", "-x", "base", "-b", "127.0.0.1"])
            .args(["-p", &port.to_string()])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return QemuNbd(child);
            }
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("qemu-nbd would not start on port {port}");
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn raw_base_over_qemu_nbd_only_with_the_opt_in() {
    let Some(qemu_nbd) = nginx::tool("qemu-nbd") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("base.raw");
    let mut base_model = vec![0u8; SIZE as usize];
    for (i, b) in base_model.iter_mut().enumerate() {
        *b = (i / 4096) as u8 ^ 0x3c;
    }
    std::fs::write(&raw, &base_model).unwrap();
    let port = free_port();
    let srv = QemuNbd::start(&qemu_nbd, &raw, port);
    let url = format!("nbd://127.0.0.1:{port}/base");

    for fmt in ["vhdx", "vhd"] {
        let child = dir.path().join(format!("child.{fmt}"));
        // No identity advertised: refused without the opt-in.
        match open_nbd_parent(&child, &url, format_of(fmt), RemoteParents::Allow) {
            Err(ChainError::PolicyRefused { .. }) => {}
            other => panic!("{fmt}: expected PolicyRefused, got {other:?}"),
        }
        make_nbd_child(&child, &url, fmt, RemoteParents::AllowUnverified);
        match Disk::open(&child, &allow().read_only(true)) {
            Err(ChainError::PolicyRefused { .. }) => {}
            other => panic!("{fmt}: expected PolicyRefused, got {other:?}"),
        }
        let unverified = OpenOptions::new().remote_parents(RemoteParents::AllowUnverified);
        let mut model = base_model.clone();
        {
            let disk = Disk::open(&child, &unverified).unwrap();
            assert_eq!(disk.links(), &[chain::LinkCheck::Verified]);
            write_runs(
                &disk,
                &mut model,
                &[(MIB + 512, 4096, 0x61), (30 * MIB, 3 * MIB as usize, 0x62)],
            );
        }
        let disk = Disk::open(&child, &unverified.clone().read_only(true)).unwrap();
        assert_eq!(
            common::first_diff(&read_all(&disk), &model),
            None,
            "{fmt}: chain differs"
        );
        assert!(
            std::fs::read(&raw).unwrap() == base_model,
            "{fmt}: base changed"
        );
    }

    // Restarted over the same bytes: reconnected and confirmed; then over changed bytes
    // (one sampled byte): the next read fails as changed.
    let disk = Disk::open(
        dir.path().join("child.vhdx"),
        &OpenOptions::new()
            .remote_parents(RemoteParents::AllowUnverified)
            .read_only(true),
    )
    .unwrap();
    drop(srv);
    let srv = QemuNbd::start(&qemu_nbd, &raw, port);
    let mut buf = vec![0u8; 4096];
    disk.read_at(&mut buf, 20 * MIB).unwrap();
    assert_eq!(&buf[..], &base_model[20 * MIB as usize..][..4096]);
    drop(srv);
    let mut changed = base_model.clone();
    changed[100] ^= 0xff;
    std::fs::write(&raw, &changed).unwrap();
    let _srv = QemuNbd::start(&qemu_nbd, &raw, port);
    buf.fill(0xee);
    let e = disk.read_at(&mut buf, 20 * MIB).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{}", e.chain_string());
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    let mut found = false;
    while let Some(c) = cur {
        found |= c
            .downcast_ref::<chain::remote::FingerprintChanged>()
            .is_some();
        cur = c.source();
    }
    assert!(found, "{}", e.chain_string());
    // The read failed after the fact: what it had read is zeroed.
    assert!(buf.iter().all(|&b| b == 0), "bytes came through");
    drop(disk);
    // Opened anew: the fingerprint no longer matches what the children recorded.
    for fmt in ["vhdx", "vhd"] {
        match Disk::open(
            dir.path().join(format!("child.{fmt}")),
            &OpenOptions::new().remote_parents(RemoteParents::AllowUnverified),
        ) {
            Err(ChainError::LineageMismatch { .. }) => {}
            other => panic!("{fmt}: expected LineageMismatch, got {other:?}"),
        }
    }
}
