//! `vdisk token read|write|inspect` as a user runs them: a token minted over a VHDX redeems
//! byte-exact into raw, VHD and VHDX images; a changed source, a tampered token and another
//! key are refused with a reason.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

fn key_args(dir: &tempfile::TempDir) -> [String; 2] {
    ["--key-file".to_string(), p(dir, "provider.key")]
}

fn token(dir: &tempfile::TempDir, args: &[&str]) -> std::process::Output {
    let k = key_args(dir);
    let mut a = vec!["token", k[0].as_str(), k[1].as_str()];
    a.extend_from_slice(args);
    vdisk(&a)
}

fn ok(o: std::process::Output, what: &str) -> String {
    assert_ok(o, what)
}

fn refused(o: std::process::Output, what: &str) -> String {
    assert!(!o.status.success(), "{what} succeeded");
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn tokens_copy_byte_exact_between_formats() {
    let dir = tempfile::tempdir().unwrap();
    let src = p(&dir, "src.vhdx");
    vdisk_ok(&["create", "-f", "vhdx", &src, "8M"]);
    vdisk_ok(&[
        "io",
        &src,
        "-c",
        "write -P 0x5a 0 1M",
        "-c",
        "write -P 0x17 3M 512k",
    ]);
    let tok = p(&dir, "t.tok");
    let out = ok(
        token(&dir, &["read", &src, "0", "4M", "--out", &tok]),
        "read",
    );
    assert!(out.contains("transfer length"), "{out}");
    assert_eq!(std::fs::metadata(&tok).unwrap().len(), 512);
    for fmt in ["raw", "vhd", "vhdx"] {
        let dst = p(&dir, &format!("dst.{fmt}"));
        vdisk_ok(&["create", "-f", fmt, &dst, "8M"]);
        ok(
            token(&dir, &["write", &dst, "0", "4M", "--token", &tok]),
            fmt,
        );
        vdisk_ok(&["compare", &src, &dst]);
    }
    let info = ok(token(&dir, &["inspect", &tok]), "inspect");
    assert!(info.contains("length: 4194304"), "{info}");
}

#[test]
fn changed_tampered_and_foreign_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = p(&dir, "src.raw");
    let dst = p(&dir, "dst.raw");
    vdisk_ok(&["create", &src, "4M"]);
    vdisk_ok(&["io", &src, "-c", "write -P 0x33 0 1M"]);
    vdisk_ok(&["create", &dst, "4M"]);
    let tok = p(&dir, "t.tok");
    ok(
        token(&dir, &["read", &src, "0", "1M", "--out", &tok]),
        "read",
    );
    // Tampered: one byte of the sealed body flipped.
    let mut bytes = std::fs::read(&tok).unwrap();
    bytes[100] ^= 1;
    let bad = p(&dir, "bad.tok");
    std::fs::write(&bad, &bytes).unwrap();
    let err = refused(
        token(&dir, &["write", &dst, "0", "1M", "--token", &bad]),
        "tampered",
    );
    assert!(!err.is_empty());
    // Another provider's key.
    let other = p(&dir, "other.key");
    let o = vdisk(&["token", "--key-file", &other, "read", &src, "0", "512"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = refused(
        vdisk(&[
            "token",
            "--key-file",
            &other,
            "write",
            &dst,
            "0",
            "1M",
            "--token",
            &tok,
        ]),
        "other key",
    );
    assert!(!err.is_empty());
    // The source changed after minting: the token no longer stands for its data.
    std::thread::sleep(std::time::Duration::from_millis(20));
    vdisk_ok(&["io", &src, "-c", "write -P 0x44 0 512"]);
    let err = refused(
        token(&dir, &["write", &dst, "0", "1M", "--token", &tok]),
        "changed",
    );
    assert!(err.contains("chang"), "{err}");
    // Nothing was written by any refused redeem.
    vdisk_ok(&["io", "-r", &dst, "-c", "read -P 0 0 1M"]);
}

/// A `vdisk provider serve` child process.
struct ProviderProc {
    child: std::process::Child,
    addr: String,
}

impl ProviderProc {
    fn start(root: &str, key: &str, extra: &[&str]) -> ProviderProc {
        use std::io::BufRead;
        std::fs::create_dir_all(root).unwrap();
        let mut args = vec![
            "provider",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--root",
            root,
            "--control-key",
            key,
        ];
        args.extend_from_slice(extra);
        let mut child = std::process::Command::new(vdisk_bin())
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("provider said {line:?}"))
            .to_string();
        ProviderProc { child, addr }
    }
}

impl Drop for ProviderProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn offload_copy_between_two_provider_processes() {
    let dir = tempfile::tempdir().unwrap();
    let (sroot, droot) = (p(&dir, "s"), p(&dir, "d"));
    let (skey, dkey) = (p(&dir, "s.key"), p(&dir, "d.key"));
    let s = ProviderProc::start(&sroot, &skey, &[]);
    let d = ProviderProc::start(&droot, &dkey, &[]);
    let src = p(&sroot, "src.vhdx");
    vdisk_ok(&["create", "-f", "vhdx", &src, "16M"]);
    vdisk_ok(&[
        "io",
        &src,
        "-c",
        "write -P 0x5a 1M 3M",
        "-c",
        "write -P 0x17 9M 512k",
    ]);
    let dst = p(&droot, "dst.vhd");
    vdisk_ok(&["create", "-f", "vhd", "-o", "force_size=on", &dst, "16M"]);
    let keys = ["--from-key", skey.as_str(), "--to-key", dkey.as_str()];
    let copy = |from: &str, to: &str, extra: &[&str]| {
        let mut a = vec!["offload", "copy", "--from", from, "--to", to];
        a.extend_from_slice(&keys);
        a.extend_from_slice(extra);
        vdisk(&a)
    };
    let from = format!("{}:src.vhdx", s.addr);
    let to = format!("{}:dst.vhd", d.addr);
    let out = ok(copy(&from, &to, &[]), "offload copy");
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(j["bytes_copied"], 16 << 20, "{out}");
    assert!(j["tokens"].as_u64().unwrap() >= 1, "{out}");
    assert!(j["seconds"].as_f64().is_some(), "{out}");
    let through = j["bytes_through_initiator"].as_u64().unwrap();
    assert!(through < 64 * 1024, "{out}");
    vdisk_ok(&["compare", &src, &dst]);

    // A range to an offset, relayed: the data now crosses the initiator.
    let from_range = format!("{}:src.vhdx@1M+2M", s.addr);
    let to_off = format!("{}:dst.vhd@8M", d.addr);
    let out = ok(copy(&from_range, &to_off, &["--relay"]), "relayed copy");
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(
        j["bytes_through_initiator"].as_u64().unwrap() >= 4 << 20,
        "{out}"
    );
    vdisk_ok(&["io", "-r", &dst, "-c", "read -P 0x5a 8M 2M"]);

    // Paths outside the root, and the wrong key, are refused.
    std::fs::write(p(&dir, "outside.raw"), vec![0u8; 1 << 20]).unwrap();
    for bad in ["../outside.raw", "/etc/passwd"] {
        let e = refused(copy(&format!("{}:{bad}", s.addr), &to, &[]), bad);
        assert!(e.contains("outside the provider's root"), "{bad}: {e}");
    }
    let mut a = vec!["offload", "copy", "--from", &from, "--to", &to];
    a.extend(["--control-key", dkey.as_str()]);
    let e = refused(vdisk(&a), "wrong key");
    assert!(!e.is_empty());

    // S killed mid-copy: the initiator says so and D's image stays valid.
    let mut slow = ProviderProc::start(&p(&dir, "s2"), &skey, &["--export-rate", "4M"]);
    let big = p(&dir, "s2/big.vhdx");
    vdisk_ok(&["create", "-f", "vhdx", &big, "16M"]);
    vdisk_ok(&["io", &big, "-c", "write -P 0x33 0 16M"]);
    let mut a: Vec<String> = ["offload", "copy", "--from"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.extend([format!("{}:big.vhdx", slow.addr), "--to".into(), to.clone()]);
    a.extend(keys.iter().map(|s| s.to_string()));
    let initiator = std::process::Command::new(vdisk_bin())
        .args(&a)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    slow.child.kill().unwrap();
    let o = initiator.wait_with_output().unwrap();
    let e = refused(o, "a copy from a killed source");
    assert!(!e.is_empty() && !e.contains("panicked"), "{e}");
    // D ends the transfer when the initiator leaves; then its image checks clean.
    let mut checked = vdisk(&["check", &dst]);
    for _ in 0..50 {
        if checked.status.success() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        checked = vdisk(&["check", &dst]);
    }
    assert_ok(checked, "check of D's image");
    drop(d);

    // D killed (SIGKILL) mid-copy: the initiator says so, and D's image still checks clean.
    let slow = ProviderProc::start(&p(&dir, "s3"), &skey, &["--export-rate", "4M"]);
    std::fs::copy(&big, p(&dir, "s3/big.vhdx")).unwrap();
    let mut d3 = ProviderProc::start(&p(&dir, "d3"), &dkey, &[]);
    let dst3 = p(&dir, "d3/dst.vhd");
    vdisk_ok(&["create", "-f", "vhd", "-o", "force_size=on", &dst3, "16M"]);
    let initiator = std::process::Command::new(vdisk_bin())
        .args(["offload", "copy", "--from"])
        .arg(format!("{}:big.vhdx", slow.addr))
        .arg("--to")
        .arg(format!("{}:dst.vhd", d3.addr))
        .args(keys)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    d3.child.kill().unwrap();
    let _ = d3.child.wait();
    let e = refused(
        initiator.wait_with_output().unwrap(),
        "a copy to a killed destination",
    );
    assert!(e.contains("closed the connection"), "{e}");
    vdisk_ok(&["check", &dst3]);
    vdisk_ok(&["info", &dst3]);
}

/// Rewrites a VHDX's region-table entry counts so neither table's checksum matches.
fn break_region_tables(path: &str) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    for table in [192u64 << 10, 256 << 10] {
        f.write_all_at(&5u32.to_le_bytes(), table + 8).unwrap();
    }
}

/// The files named `token.key` under `dir`, at any depth.
fn key_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if path.file_name().is_some_and(|n| n == "token.key") {
                found.push(path);
            }
        }
    }
    found
}

// `token read` on a malformed image created the default key file, then failed to open it.
#[test]
fn failed_read_leaves_no_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    // The default key path ($XDG_CONFIG_HOME/vdisk/token.key), inside the test's folder.
    let read = |args: &[&str]| {
        std::process::Command::new(vdisk_bin())
            .arg("token")
            .arg("read")
            .args(args)
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env_remove("VDISK_TOKEN_KEY")
            .output()
            .unwrap()
    };
    let bad = p(&dir, "b.vhdx");
    vdisk_ok(&["create", "-f", "vhdx", &bad, "4M"]);
    break_region_tables(&bad);
    let good = p(&dir, "g.raw");
    vdisk_ok(&["create", &good, "4M"]);
    vdisk_ok(&["io", &good, "-c", "write -P 0x42 0 64k"]);
    let missing = p(&dir, "missing.vhdx");
    for (args, why) in [
        (vec![bad.as_str(), "0", "4096"], "checksum mismatch"),
        (vec![missing.as_str(), "0", "4096"], "missing.vhdx"),
        (vec![good.as_str(), "100", "4096"], "offset"),
        (vec![good.as_str(), "0", "0"], "zero bytes"),
        (vec![good.as_str(), "8M", "4096"], "offset"),
    ] {
        let err = refused(read(&args), &format!("read {args:?}"));
        assert!(err.contains(why), "read {args:?}: {err}");
        assert!(!err.contains("token.key"), "read {args:?}: {err}");
        assert_eq!(
            key_files(dir.path()),
            Vec::<std::path::PathBuf>::new(),
            "{args:?}"
        );
    }
    // A read that mints creates it, and says so.
    let o = read(&[&good, "0", "4096"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_ok(o, "read");
    assert!(err.contains("created provider key file"), "{err}");
    assert_eq!(
        key_files(dir.path()),
        vec![home.join(".config/vdisk/token.key")]
    );
}
