//! `vdisk serve --nbd ... --tls-creds DIR [--tls-verify-peer]` against qemu-io with a
//! `tls-creds-x509` object: TLS clients read and write, plain clients are refused, with
//! verify-peer only clients with a certificate of the CA get in, and SIGTERM still flushes
//! and exits 0. Certificates are made with rcgen in QEMU's directory layout.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "../../../block-io/tests/support/test_ca.rs"]
mod test_ca;
use common::*;
use test_ca::Ca;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Output, Stdio};

impl Ca {
    /// `dir/name` with ca-cert.pem and the `role`'s certificate and key (`server` or
    /// `client`), or only ca-cert.pem for `None`.
    fn creds(&self, dir: &Path, name: &str, role: Option<&str>) -> PathBuf {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("ca-cert.pem"), &self.pem).unwrap();
        if let Some(role) = role {
            let (cert, key) = self.leaf(role == "server", "vdisk test");
            std::fs::write(d.join(format!("{role}-cert.pem")), cert).unwrap();
            std::fs::write(d.join(format!("{role}-key.pem")), key).unwrap();
        }
        d
    }
}

/// `vdisk serve --nbd 127.0.0.1:0 ARGS`, once it listens: the child, its stderr, its port.
fn serve(args: &[&str]) -> (Child, BufReader<ChildStderr>, u16) {
    let mut child = Command::new(vdisk_bin())
        .args(["serve", "--nbd", "127.0.0.1:0"])
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    // "vdisk: serving IMG (..., TLS required) at nbds://127.0.0.1:PORT/NAME"
    let port = line
        .split("nbds://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no nbds:// address in {line:?}"));
    (child, err, port)
}

/// SIGTERM, then the exit status and the rest of stderr.
fn stop(mut child: Child, mut err: BufReader<ChildStderr>) -> (std::process::ExitStatus, String) {
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut log = String::new();
    err.read_to_string(&mut log).unwrap();
    (child.wait().unwrap(), log)
}

fn qemu_io(qemu_io: &Path, port: u16, creds: Option<&Path>, cmds: &[&str]) -> Output {
    let obj = creds.map(|d| format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", d.display()));
    let mut opts = format!("driver=nbd,host=127.0.0.1,port={port},export=disk");
    let mut args: Vec<&str> = Vec::new();
    if let Some(o) = &obj {
        args.extend(["--object", o]);
        opts.push_str(",tls-creds=tls0");
    }
    args.extend(["--image-opts", &opts]);
    for c in cmds {
        args.extend(["-c", c]);
    }
    run(qemu_io, &args)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn worked(o: &Output) -> bool {
    o.status.success() && !text(o).contains("Pattern verification failed")
}

#[test]
fn serve_nbd_with_tls_creds_to_qemu_io() {
    let Some(qemu_io_bin) = oracle("qemu-io") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cli test CA");
    let server = ca.creds(dir.path(), "server", Some("server"));
    let client = ca.creds(dir.path(), "client", None);
    let img = p(&dir, "d.vhdx");
    vdisk_ok(&["create", "-f", "vhdx", &img, "8M"]);
    let (child, err, port) = serve(&[
        "--export",
        "disk",
        "--tls-creds",
        server.to_str().unwrap(),
        &img,
    ]);
    let tls = qemu_io(
        &qemu_io_bin,
        port,
        Some(&client),
        &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"],
    );
    let plain = qemu_io(&qemu_io_bin, port, None, &["write -P 0x11 0 64k"]);
    let (status, log) = stop(child, err);
    assert!(worked(&tls), "qemu-io over TLS: {}", text(&tls));
    assert!(
        !plain.status.success(),
        "a plain client got in: {}",
        text(&plain)
    );
    assert!(text(&plain).contains("TLS"), "{}", text(&plain));
    assert!(status.success(), "serve exit {status:?}: {log}");
    assert!(log.contains("flushed"), "{log}");
    // The TLS client's data is in the image; the plain client's is not.
    vdisk_ok(&["io", "-r", &img, "-c", "read -P 0x5a 0 64k"]);
}

#[test]
fn serve_nbd_with_tls_verify_peer_wants_a_client_certificate() {
    let Some(qemu_io_bin) = oracle("qemu-io") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cli test CA");
    let server = ca.creds(dir.path(), "server", Some("server"));
    let with_cert = ca.creds(dir.path(), "with-cert", Some("client"));
    let without = ca.creds(dir.path(), "without", None);
    let img = p(&dir, "d.raw");
    vdisk_ok(&["create", &img, "4M"]);
    let (child, err, port) = serve(&[
        "--export",
        "disk",
        "--tls-creds",
        server.to_str().unwrap(),
        "--tls-verify-peer",
        &img,
    ]);
    let refused = qemu_io(&qemu_io_bin, port, Some(&without), &["write -P 0x22 0 4k"]);
    let accepted = qemu_io(
        &qemu_io_bin,
        port,
        Some(&with_cert),
        &["write -P 0x33 0 4k", "read -P 0x33 0 4k"],
    );
    let (status, log) = stop(child, err);
    assert!(
        !refused.status.success(),
        "no client certificate, yet served: {}",
        text(&refused)
    );
    assert!(worked(&accepted), "{}", text(&accepted));
    assert!(status.success(), "serve exit {status:?}: {log}");
    vdisk_ok(&["io", "-r", &img, "-c", "read -P 0x33 0 4k"]);
}

#[test]
fn serve_nbd_refuses_bad_tls_options() {
    let dir = tempfile::tempdir().unwrap();
    let img = p(&dir, "d.raw");
    vdisk_ok(&["create", &img, "1M"]);
    // A directory without credentials: an error naming the file, before anything listens.
    let empty = p(&dir, "empty");
    std::fs::create_dir(&empty).unwrap();
    let o = vdisk(&["serve", "--nbd", "127.0.0.1:0", "--tls-creds", &empty, &img]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("server-cert.pem"), "{e}");
    // verify-peer needs a CA certificate.
    let ca = Ca::new("cli test CA");
    let server = ca.creds(dir.path(), "server", Some("server"));
    std::fs::remove_file(server.join("ca-cert.pem")).unwrap();
    let s = server.to_str().unwrap();
    let o = vdisk(&[
        "serve",
        "--nbd",
        "127.0.0.1:0",
        "--tls-creds",
        s,
        "--tls-verify-peer",
        &img,
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("ca-cert.pem"), "{e}");
    // --tls-verify-peer alone, and TLS for vhost-user, are usage errors.
    let o = vdisk(&["serve", "--nbd", "127.0.0.1:0", "--tls-verify-peer", &img]);
    assert!(!o.status.success());
    let sock = p(&dir, "vhost.sock");
    let o = vdisk(&["serve", "--socket", &sock, "--tls-creds", s, &img]);
    assert!(!o.status.success());
}

#[test]
fn mirror_to_an_nbds_export_of_vdisk_serve() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cli test CA");
    let server = ca.creds(dir.path(), "server", Some("server"));
    let client = ca.creds(dir.path(), "client", Some("client"));
    let (top, b) = mirror_fixture(&dir, "b.raw");
    let (child, err, port) = serve(&[
        "--export",
        "disk",
        "--tls-creds",
        server.to_str().unwrap(),
        "--tls-verify-peer",
        &b,
    ]);
    let url = format!("nbds://127.0.0.1:{port}/disk");
    // Without credentials: refused before connecting, naming the flag.
    let o = vdisk(&["mirror", "--to", &url, &top]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("--nbd-tls-creds"), "{e}");
    // A plain connection to a server that requires TLS fails and says why.
    let o = vdisk(&[
        "mirror",
        "--to",
        &format!("nbd://127.0.0.1:{port}/disk"),
        &top,
    ]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("TLS"), "{e}");
    let v = vdisk_json(&[
        "--nbd-tls-creds",
        client.to_str().unwrap(),
        "mirror",
        "--to",
        &url,
        "--timing",
        "after",
        "--output",
        "json",
        &top,
    ]);
    assert!(v["data_bytes"].as_u64().unwrap() >= 4 << 20, "{v}");
    let (status, log) = stop(child, err);
    assert!(status.success(), "serve exit {status:?}: {log}");
    vdisk_ok(&["compare", &top, &b]);
}

#[test]
fn mirror_to_an_nbds_export_of_qemu_nbd() {
    let Some(qemu_nbd) = oracle("qemu-nbd") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("cli test CA");
    let server = ca.creds(dir.path(), "server", Some("server"));
    // qemu-nbd verifies its peers by default (tls-creds-x509 verify-peer=on).
    let client = ca.creds(dir.path(), "client", Some("client"));
    let (top, b) = mirror_fixture(&dir, "b.raw");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let obj = format!(
        "tls-creds-x509,id=tls0,endpoint=server,dir={}",
        server.display()
    );
    let mut nbd = std::process::Command::new(qemu_nbd)
        .args([
            "--object",
            &obj,
            "--tls-creds",
            "tls0",
            "-f",
            "raw",
            "-x",
            "disk",
        ])
        .args([
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-e",
            "8",
            "-t",
            &b,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("qemu-nbd.log")).unwrap())
        .spawn()
        .unwrap();
    assert!(
        block_io::testing::wait_for_port(port, std::time::Duration::from_secs(20)),
        "qemu-nbd never listened"
    );
    let o = vdisk(&[
        "--nbd-tls-creds",
        client.to_str().unwrap(),
        "mirror",
        "--to",
        &format!("nbds://127.0.0.1:{port}/disk"),
        &top,
    ]);
    let _ = nbd.kill();
    let _ = nbd.wait();
    assert!(
        o.status.success(),
        "{}; qemu-nbd: {}",
        text(&o),
        std::fs::read_to_string(dir.path().join("qemu-nbd.log")).unwrap_or_default()
    );
    vdisk_ok(&["compare", &top, &b]);
}
