//! The CLI on remote images, against real servers on loopback started here: nginx (HTTP range
//! requests) and qemu-nbd (NBD), with qemu-img/qemu-io as oracles.
//!
//! - `info`, `convert`, `compare`, `map` and `io -r` of `http://` images; errors for an
//!   unreachable server, a 404 and a malformed URL name their cause;
//! - `info` and `convert` of an `nbd://` export; `convert` into an `nbd://` export over old
//!   data (zero runs overwritten too);
//! - a local differencing child of an HTTP parent (`create -b URL`, VHDX and VHD): written,
//!   read back, flattened byte-exact against qemu's flattening of the same data;
//! - the same with an NBD parent: `vdisk serve --nbd --read-only` of a VHDX and a VHD
//!   (verified by the identity it advertises; a restart with another image is refused), and
//!   qemu-nbd of a raw file (only with `--unverified-nbd-parents`, checked by fingerprint).
//!
//! Oracle rule: without nginx, qemu-img, qemu-io or qemu-nbd the tests fail when `CI=true`,
//! else they print a loud SKIP and pass.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "../../../chain/tests/support/nginx.rs"]
mod nginx;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{oracle, p, run, vdisk, vdisk_json, vdisk_ok};
use nginx::{free_port, Nginx};

const MIB: u64 = 1 << 20;

/// A VHDX (or VHD) of 16 MiB with data at 0, 5 MiB and 12 MiB (and a zeroed run), written by
/// vdisk itself.
fn base_image(dir: &Path, name: &str, fmt: &str) -> String {
    let path = p(dir, name);
    vdisk_ok(&["create", "-f", fmt, &path, "16M"]);
    vdisk_ok(&[
        "io",
        &path,
        "-c",
        "write -P 0x5a 0 1M",
        "-c",
        "write -P 0x33 5M 512k",
        "-c",
        "write -P 0xc1 12M 64k",
    ]);
    path
}

/// `qemu-img compare` of two images (formats detected), asserting equality.
fn assert_same(qemu_img: &Path, a: &str, b: &str) {
    let o = run(qemu_img, &["compare", a, b]);
    assert!(
        o.status.success(),
        "qemu-img compare {a} {b}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn stderr_of(args: &[&str]) -> String {
    let o = vdisk(args);
    assert!(!o.status.success(), "vdisk {args:?} should have failed");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

struct Oracles {
    qemu_img: std::path::PathBuf,
    qemu_io: std::path::PathBuf,
}

fn oracles() -> Option<Oracles> {
    Some(Oracles {
        qemu_img: oracle("qemu-img")?,
        qemu_io: oracle("qemu-io")?,
    })
}

#[test]
fn http_sources_info_convert_compare_map_io() {
    let (Some(o), Some(web)) = (oracles(), Nginx::start()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path(), "base.vhdx", "vhdx");
    web.publish(Path::new(&base), "base.vhdx");
    let url = web.url("base.vhdx");

    let info = vdisk_json(&["info", "--output", "json", &url]);
    assert_eq!(info["format"], "vhdx");
    assert_eq!(info["virtual_size"], 16 * MIB);
    assert_eq!(info["filename"], url.as_str());

    let out = p(dir.path(), "out.raw");
    vdisk_ok(&["convert", "-O", "raw", &url, &out]);
    assert_same(&o.qemu_img, &base, &out);
    let out_vhd = p(dir.path(), "out.vhd");
    vdisk_ok(&["convert", "-O", "vhd", &url, &out_vhd]);
    assert_same(&o.qemu_img, &base, &out_vhd);

    // compare: identical to the local file; one byte changed locally is a difference.
    assert_eq!(vdisk(&["compare", &base, &url]).status.code(), Some(0));
    let changed = p(dir.path(), "changed.raw");
    std::fs::copy(&out, &changed).unwrap();
    let w = run(
        &o.qemu_io,
        &["-f", "raw", "-c", "write -P 0x01 8M 512", &changed],
    );
    assert!(w.status.success());
    assert_eq!(vdisk(&["compare", &changed, &url]).status.code(), Some(1));

    // map: the same runs as the local file's.
    let runs = |img: &str| -> Vec<(u64, u64, bool, bool)> {
        vdisk_json(&["map", "--output", "json", img])
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["start"].as_u64().unwrap(),
                    r["length"].as_u64().unwrap(),
                    r["data"] == true,
                    r["zero"] == true,
                )
            })
            .collect()
    };
    let remote_runs = runs(&url);
    assert_eq!(remote_runs, runs(&base));
    assert!(remote_runs.iter().any(|r| r.2));

    // io -r reads and verifies the pattern; without -r an HTTP image is refused.
    vdisk_ok(&["io", "-r", &url, "-c", "read -P 0x33 5M 512k"]);
    let e = stderr_of(&["io", &url, "-c", "read -P 0x33 5M 512k"]);
    assert!(e.contains("read-only"), "{e}");
    // A wrong pattern fails the verification (so the read above really compared).
    let bad = vdisk(&["io", "-r", &url, "-c", "read -P 0x34 5M 4k"]);
    assert!(!bad.status.success());
}

#[test]
fn remote_errors_name_their_cause() {
    let Some(web) = Nginx::start() else {
        return;
    };
    // A 404.
    let missing = web.url("missing.vhdx");
    let e = stderr_of(&["info", &missing]);
    assert!(e.contains("404") && e.contains(&missing), "{e}");
    let e = stderr_of(&["convert", "-O", "raw", &missing, "/nonexistent/out.raw"]);
    assert!(e.contains("404"), "{e}");
    // Nobody listening.
    let port = free_port();
    let dead = format!("http://127.0.0.1:{port}/base.vhdx");
    let e = stderr_of(&["info", &dead]);
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    assert!(
        e.to_lowercase().contains("connect") || e.to_lowercase().contains("refused"),
        "{e}"
    );
    let e = stderr_of(&["info", &format!("nbd://127.0.0.1:{port}/x")]);
    assert!(
        e.to_lowercase().contains("connect") || e.to_lowercase().contains("refused"),
        "{e}"
    );
    // Malformed URLs.
    let e = stderr_of(&["info", "nbd://127.0.0.1:notaport/x"]);
    assert!(
        e.contains("notaport") || e.to_lowercase().contains("port"),
        "{e}"
    );
    let e = stderr_of(&["info", "nbds://127.0.0.1:1/x"]);
    assert!(e.contains("--nbd-tls-creds"), "{e}");
    // http images are never written.
    let dir = tempfile::tempdir().unwrap();
    let src = p(dir.path(), "s.raw");
    vdisk_ok(&["create", &src, "1M"]);
    let e = stderr_of(&["convert", "-O", "raw", &src, &web.url("out.raw")]);
    assert!(e.contains("read-only"), "{e}");
}

/// A qemu-nbd serving `image` (format `fmt`) on a free port, killed on drop.
struct QemuNbd {
    child: Child,
    port: u16,
}

impl QemuNbd {
    fn start(bin: &Path, image: &str, fmt: &str, read_only: bool) -> QemuNbd {
        for _ in 0..5 {
            let port = free_port();
            let mut cmd = Command::new(bin);
            cmd.args(["-f", fmt, "-b", "127.0.0.1", "-p", &port.to_string(), "-t"])
                .args(["-x", "", "--cache=writeback"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if read_only {
                cmd.arg("-r");
            }
            let mut child = cmd.arg(image).spawn().unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return QemuNbd { child, port };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("qemu-nbd would not start");
    }

    fn url(&self) -> String {
        format!("nbd://127.0.0.1:{}/", self.port)
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn nbd_sources_and_destinations() {
    let (Some(o), Some(qemu_nbd)) = (oracles(), oracle("qemu-nbd")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path(), "base.vhdx", "vhdx");

    // Source: qemu-nbd decodes the VHDX; we see its disk.
    let srv = QemuNbd::start(&qemu_nbd, &base, "vhdx", true);
    let url = srv.url();
    let info = vdisk_json(&["info", "--output", "json", &url]);
    assert_eq!(info["virtual_size"], 16 * MIB);
    assert_eq!(info["format"], "raw");
    let out = p(dir.path(), "from-nbd.vhdx");
    vdisk_ok(&["convert", "-O", "vhdx", &url, &out]);
    assert_same(&o.qemu_img, &base, &out);
    vdisk_ok(&["io", "-r", &url, "-c", "read -P 0xc1 12M 64k"]);
    assert_eq!(vdisk(&["compare", &base, &url]).status.code(), Some(0));
    srv.stop();

    // The same over a Unix socket (nbd+unix://).
    let sock = p(dir.path(), "nbd.sock");
    let mut unix = Command::new(&qemu_nbd)
        .args(["-f", "vhdx", "-r", "-t", "-x", "disk", "-k", &sock, &base])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !Path::new(&sock).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let unix_url = format!("nbd+unix:///disk?socket={sock}");
    let r = vdisk(&["compare", &base, &unix_url]);
    let _ = unix.kill();
    let _ = unix.wait();
    assert_eq!(r.status.code(), Some(0), "{r:?}");

    // Destination: an export full of old bytes is overwritten everywhere, zeros included.
    let target = p(dir.path(), "target.raw");
    let c = run(&o.qemu_img, &["create", "-f", "raw", &target, "16M"]);
    assert!(c.status.success());
    let w = run(
        &o.qemu_io,
        &["-f", "raw", "-c", "write -P 0xee 0 16M", &target],
    );
    assert!(w.status.success());
    let srv = QemuNbd::start(&qemu_nbd, &target, "raw", false);
    vdisk_ok(&["convert", "-O", "raw", &base, &srv.url()]);
    // Not a format an export takes.
    let e = stderr_of(&["convert", "-O", "vhdx", &base, &srv.url()]);
    assert!(e.contains("raw"), "{e}");
    srv.stop();
    assert_same(&o.qemu_img, &base, &target);
}

/// `vdisk serve --nbd` of `image` on a free port.
fn serve_nbd(image: &str) -> (Child, u16) {
    for _ in 0..5 {
        if let Some(served) = serve_nbd_on(image, free_port(), &[]) {
            return served;
        }
    }
    panic!("vdisk serve --nbd would not start");
}

/// `vdisk serve --nbd 127.0.0.1:PORT EXTRA.. IMAGE`, once it accepts connections.
fn serve_nbd_on(image: &str, port: u16, extra: &[&str]) -> Option<(Child, u16)> {
    let mut c = Command::new(common::vdisk_bin())
        .args(["serve", "--nbd", &format!("127.0.0.1:{port}")])
        .args(extra)
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((c, port));
        }
        if let Ok(Some(_)) = c.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = c.kill();
    let _ = c.wait();
    None
}

/// Stops a `vdisk serve` child with SIGTERM (it flushes and exits).
fn stop_served(mut child: Child) {
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
}

#[test]
fn convert_into_vdisk_serve_nbd() {
    let Some(o) = oracles() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path(), "base.vhd", "vhd");
    let target = p(dir.path(), "target.vhdx");
    vdisk_ok(&["create", "-f", "vhdx", &target, "16M"]);
    let (mut child, port) = serve_nbd(&target);
    let r = vdisk(&[
        "convert",
        "-O",
        "raw",
        &base,
        &format!("nbd://127.0.0.1:{port}/"),
    ]);
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
    common::assert_ok(r, "convert into vdisk serve --nbd");
    assert_same(&o.qemu_img, &base, &target);
}

#[test]
fn local_children_of_http_parents() {
    let (Some(o), Some(web)) = (oracles(), Nginx::start()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for fmt in ["vhdx", "vhd"] {
        let name = format!("base.{fmt}");
        let base = base_image(dir.path(), &name, fmt);
        web.publish(Path::new(&base), &name);
        let url = web.url(&name);
        let child = p(dir.path(), &format!("child.{fmt}"));
        vdisk_ok(&["create", "-f", fmt, "-b", &url, &child]);
        let info = vdisk_json(&["info", "--output", "json", &child]);
        let recorded = info.to_string();
        assert!(recorded.contains(&url), "{fmt}: {recorded}");
        let layers = vdisk_json(&["info", "--backing-chain", "--output", "json", &child]);
        assert_eq!(layers.as_array().unwrap().len(), 2, "{fmt}: {layers}");
        assert_eq!(layers[0]["link"]["verified"], true, "{fmt}: {layers}");
        assert_eq!(layers[1]["filename"], url.as_str());
        vdisk_ok(&[
            "io",
            &child,
            "-c",
            "write -P 0x77 512k 1M",
            "-c",
            "write -z 5M 4k",
        ]);
        vdisk_ok(&[
            "io",
            "-r",
            &child,
            "-c",
            "read -P 0x5a 0 512k",
            "-c",
            "read -P 0x77 512k 1M",
            "-c",
            "read -P 0 5M 4k",
            "-c",
            "read -P 0x33 5246976 4k",
        ]);
        // The oracle: the same writes by qemu-io on a raw copy of the base.
        let expected = p(dir.path(), &format!("expected-{fmt}.raw"));
        let c = run(&o.qemu_img, &["convert", "-O", "raw", &base, &expected]);
        assert!(c.status.success());
        let w = run(
            &o.qemu_io,
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x77 512k 1M",
                "-c",
                "write -z 5M 4k",
                &expected,
            ],
        );
        assert!(w.status.success());
        let flat = p(dir.path(), &format!("flat-{fmt}.raw"));
        vdisk_ok(&["convert", "-O", "raw", &child, &flat]);
        assert_same(&o.qemu_img, &expected, &flat);
        // The parent replaced on the server: the link no longer verifies.
        let other = base_image(dir.path(), &format!("other.{fmt}"), fmt);
        web.publish(Path::new(&other), &name);
        let e = stderr_of(&["convert", "-O", "raw", &child, &flat]);
        assert!(
            e.contains("DataWriteGuid") || e.contains("unique id"),
            "{fmt}: {e}"
        );
    }
}

/// An s3s-fs server (a bucket `vdisk` in a temporary folder) on a free port, killed on drop.
struct S3 {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl S3 {
    fn start() -> Option<S3> {
        let bin = nginx::tool("s3s-fs")?;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("vdisk")).unwrap();
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(&bin)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", "AKVDISKTEST", "--secret-key", "SKVDISKTEST"])
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(S3 { child, port, dir });
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("s3s-fs would not start");
    }

    /// `vdisk ARGS` with the S3 environment of this server.
    fn vdisk(&self, args: &[&str]) -> std::process::Output {
        Command::new(common::vdisk_bin())
            .args(args)
            .env(
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", self.port),
            )
            .env("AWS_ACCESS_KEY_ID", "AKVDISKTEST")
            .env("AWS_SECRET_ACCESS_KEY", "SKVDISKTEST")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ALLOW_HTTP", "true")
            .output()
            .unwrap()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn s3_upload_and_read_back() {
    let (Some(o), Some(s3)) = (oracles(), S3::start()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path(), "base.vhd", "vhd");
    let url = "s3://vdisk/images/up.vhdx";
    common::assert_ok(
        s3.vdisk(&["convert", "-O", "vhdx", &base, url]),
        "convert into s3",
    );
    // The object the server stored is the converted image.
    let stored = s3.dir.path().join("vdisk/images/up.vhdx");
    assert_same(&o.qemu_img, &base, &stored.display().to_string());
    // And it reads back through s3:// as a source.
    let info: serde_json::Value = serde_json::from_str(&common::assert_ok(
        s3.vdisk(&["info", "--output", "json", url]),
        "info s3",
    ))
    .unwrap();
    assert_eq!(info["format"], "vhdx");
    let out = p(dir.path(), "back.raw");
    common::assert_ok(
        s3.vdisk(&["convert", "-O", "raw", url, &out]),
        "convert from s3",
    );
    assert_same(&o.qemu_img, &base, &out);
    // A missing key names the object and the status.
    let r = s3.vdisk(&["info", "s3://vdisk/images/none.vhdx"]);
    assert!(!r.status.success());
    let e = String::from_utf8_lossy(&r.stderr);
    assert!(e.contains("none.vhdx"), "{e}");
}

/// A CA (PEM) and QEMU-layout credential folders signed by it: `server` (ca-cert.pem,
/// server-cert.pem, server-key.pem for 127.0.0.1) and `client` (ca-cert.pem only).
fn tls_creds(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "remote test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = rcgen::date_time_ymd(2020, 1, 1);
    ca.not_after = rcgen::date_time_ymd(2040, 1, 1);
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "vdisk test");
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = rcgen::date_time_ymd(2020, 1, 1);
    leaf.not_after = rcgen::date_time_ymd(2040, 1, 1);
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let server = dir.join("server");
    let client = dir.join("client");
    for d in [&server, &client] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("ca-cert.pem"), &ca_pem).unwrap();
    }
    std::fs::write(server.join("server-cert.pem"), cert.pem()).unwrap();
    std::fs::write(server.join("server-key.pem"), key.serialize_pem()).unwrap();
    (server, client)
}

#[test]
fn nbds_with_tls_creds() {
    use std::io::{BufRead, BufReader, Read};
    let Some(o) = oracles() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (server, client) = tls_creds(dir.path());
    let base = base_image(dir.path(), "base.vhdx", "vhdx");
    let target = p(dir.path(), "target.vhdx");
    vdisk_ok(&["create", "-f", "vhdx", &target, "16M"]);
    let mut child = Command::new(common::vdisk_bin())
        .args([
            "serve",
            "--nbd",
            "127.0.0.1:0",
            "--export",
            "disk",
            "--tls-creds",
        ])
        .arg(&server)
        .arg(&target)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    let port: u16 = line
        .split("nbds://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no nbds:// address in {line:?}"));
    let url = format!("nbds://127.0.0.1:{port}/disk");
    let creds = client.to_str().unwrap();
    let conv = vdisk(&[
        "--nbd-tls-creds",
        creds,
        "convert",
        "-O",
        "raw",
        &base,
        &url,
    ]);
    let info = vdisk(&["--nbd-tls-creds", creds, "info", "--output", "json", &url]);
    let no_creds = vdisk(&["info", &url]);
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut log = String::new();
    err.read_to_string(&mut log).unwrap();
    let _ = child.wait();
    common::assert_ok(conv, "convert into nbds://");
    let info: serde_json::Value =
        serde_json::from_str(&common::assert_ok(info, "info nbds://")).unwrap();
    assert_eq!(info["virtual_size"], 16 * MIB);
    assert!(!no_creds.status.success());
    assert!(
        String::from_utf8_lossy(&no_creds.stderr).contains("--nbd-tls-creds"),
        "{no_creds:?}"
    );
    assert_same(&o.qemu_img, &base, &target);
}

#[test]
fn local_children_of_nbd_parents() {
    let (Some(o), Some(qemu_nbd)) = (oracles(), oracle("qemu-nbd")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for fmt in ["vhdx", "vhd"] {
        let name = format!("base.{fmt}");
        let base = base_image(dir.path(), &name, fmt);
        let base_bytes = std::fs::read(&base).unwrap();
        let (served, port) = (0..5)
            .find_map(|_| serve_nbd_on(&base, free_port(), &["--read-only"]))
            .expect("vdisk serve --nbd would not start");
        let url = format!("nbd://127.0.0.1:{port}/");
        // A standard client reads the export with the identity line in its description.
        assert_same(&o.qemu_img, &base, &url);
        let child = p(dir.path(), &format!("child-nbd.{fmt}"));
        vdisk_ok(&["create", "-f", fmt, "-b", &url, &child]);
        let info = vdisk_json(&["info", "--output", "json", &child]);
        assert!(info.to_string().contains(&url), "{fmt}: {info}");
        let layers = vdisk_json(&["info", "--backing-chain", "--output", "json", &child]);
        assert_eq!(layers.as_array().unwrap().len(), 2, "{fmt}: {layers}");
        assert_eq!(layers[0]["link"]["verified"], true, "{fmt}: {layers}");
        assert_eq!(layers[1]["filename"], url.as_str());
        vdisk_ok(&[
            "io",
            &child,
            "-c",
            "write -P 0x77 512k 1M",
            "-c",
            "write -z 5M 4k",
        ]);
        vdisk_ok(&[
            "io",
            "-r",
            &child,
            "-c",
            "read -P 0x5a 0 512k",
            "-c",
            "read -P 0x77 512k 1M",
            "-c",
            "read -P 0 5M 4k",
            "-c",
            "read -P 0x33 5246976 4k",
            "-c",
            "read -P 0xc1 12M 64k",
        ]);
        // The oracle: the same writes by qemu-io on a raw copy of the base.
        let expected = p(dir.path(), &format!("expected-nbd-{fmt}.raw"));
        let c = run(&o.qemu_img, &["convert", "-O", "raw", &base, &expected]);
        assert!(c.status.success());
        let w = run(
            &o.qemu_io,
            &[
                "-f",
                "raw",
                "-c",
                "write -P 0x77 512k 1M",
                "-c",
                "write -z 5M 4k",
                &expected,
            ],
        );
        assert!(w.status.success());
        let flat = p(dir.path(), &format!("flat-nbd-{fmt}.raw"));
        vdisk_ok(&["convert", "-O", "raw", &child, &flat]);
        assert_same(&o.qemu_img, &expected, &flat);
        assert_eq!(
            vdisk(&["compare", &child, &expected]).status.code(),
            Some(0)
        );
        let map = vdisk_json(&["map", "--output", "json", &child]);
        let end = map
            .as_array()
            .unwrap()
            .last()
            .map(|r| r["start"].as_u64().unwrap() + r["length"].as_u64().unwrap());
        assert_eq!(end, Some(16 * MIB), "{fmt}: {map}");
        // Writes went to the child only.
        assert!(
            std::fs::read(&base).unwrap() == base_bytes,
            "{fmt}: base changed"
        );
        // The server restarted with another image: the child's parent is refused.
        stop_served(served);
        let other = base_image(dir.path(), &format!("other-nbd.{fmt}"), fmt);
        let (served, _) = serve_nbd_on(&other, port, &["--read-only"])
            .expect("vdisk serve --nbd would not restart on its port");
        let e = stderr_of(&["convert", "-O", "raw", &child, &flat]);
        assert!(
            e.contains("DataWriteGuid") || e.contains("unique id"),
            "{fmt}: {e}"
        );
        stop_served(served);
    }

    // qemu-nbd advertises no identity: a parent only with --unverified-nbd-parents.
    let raw = p(dir.path(), "base-nbd.raw");
    let base = base_image(dir.path(), "base-for-raw.vhdx", "vhdx");
    let c = run(&o.qemu_img, &["convert", "-O", "raw", &base, &raw]);
    assert!(c.status.success());
    let srv = QemuNbd::start(&qemu_nbd, &raw, "raw", true);
    let child = p(dir.path(), "child-qemu-nbd.vhdx");
    let e = stderr_of(&["create", "-f", "vhdx", "-b", &srv.url(), &child]);
    assert!(e.contains("advertises no identity"), "{e}");
    vdisk_ok(&[
        "create",
        "--unverified-nbd-parents",
        "-f",
        "vhdx",
        "-b",
        &srv.url(),
        &child,
    ]);
    let e = stderr_of(&["io", "-r", &child, "-c", "read -P 0x5a 0 4k"]);
    assert!(e.contains("advertises no identity"), "{e}");
    vdisk_ok(&[
        "io",
        "--unverified-nbd-parents",
        &child,
        "-c",
        "write -P 0x44 8M 64k",
    ]);
    vdisk_ok(&[
        "io",
        "--unverified-nbd-parents",
        "-r",
        &child,
        "-c",
        "read -P 0x5a 0 1M",
        "-c",
        "read -P 0x44 8M 64k",
        "-c",
        "read -P 0xc1 12M 64k",
    ]);
    srv.stop();
}
