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
