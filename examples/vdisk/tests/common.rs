//! Helpers shared by the CLI tests: find the `vdisk` example binary and the oracles.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `vdisk` example binary, built once per test process with the same cargo and profile
/// as this test (cargo builds examples as test harnesses under `cargo test`, not as programs).
pub fn vdisk_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().unwrap();
            let profile_dir = exe.parent().unwrap().parent().unwrap();
            let release = profile_dir.file_name().is_some_and(|n| n == "release");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--quiet", "--example", "vdisk"])
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().unwrap();
            assert!(status.success(), "building the vdisk example failed");
            let p = profile_dir.join("examples").join("vdisk");
            assert!(p.exists(), "{} missing after the build", p.display());
            p
        })
        .clone()
}

/// Runs `vdisk ARGS`.
pub fn vdisk(args: &[&str]) -> Output {
    Command::new(vdisk_bin()).args(args).output().unwrap()
}

/// The path of `name` in `dir`, as a string for command lines.
pub fn p(dir: impl AsRef<Path>, name: &str) -> String {
    dir.as_ref().join(name).display().to_string()
}

/// Asserts that the run `what` succeeded, returning its stdout.
pub fn assert_ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Runs `vdisk ARGS` and asserts success, returning stdout.
pub fn vdisk_ok(args: &[&str]) -> String {
    assert_ok(vdisk(args), &format!("vdisk {args:?}"))
}

/// Runs `vdisk ARGS` (a `--output json` command), asserts success and parses stdout.
pub fn vdisk_json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&vdisk_ok(args)).unwrap()
}

/// Creates a raw image of `size` at `path` and runs the `vdisk io` commands `cmds` on it.
pub fn raw_image_with(path: &str, size: &str, cmds: &[&str]) {
    vdisk_ok(&["create", path, size]);
    let mut args = vec!["io", path];
    for c in cmds {
        args.extend(["-c", c]);
    }
    vdisk_ok(&args);
}

/// The path of an oracle program, or `None` (with a loud warning) when it is missing.
/// Under CI (`CI=true`) a missing oracle fails the test instead.
pub fn oracle(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("oracle {name} is not installed; CI must install it");
        }
        eprintln!("!!! WARNING: oracle {name} not found; this oracle test is SKIPPED !!!");
    }
    found
}

/// Runs a program and returns its output.
pub fn run(prog: &Path, args: &[&str]) -> Output {
    Command::new(prog).args(args).output().unwrap()
}

/// A chain and the image `vdisk mirror` moves it into: a VHDX base with data, a child over
/// it with its own writes and a zeroed range, and host B's raw disk full of junk (so holes
/// must be written), named `b_name`. Returns (top, b).
pub fn mirror_fixture(dir: &tempfile::TempDir, b_name: &str) -> (String, String) {
    let base = p(dir, "base.vhdx");
    let top = p(dir, "top.vhdx");
    vdisk_ok(&["create", "-f", "vhdx", &base, "16M"]);
    vdisk_ok(&[
        "io",
        &base,
        "-c",
        "write -P 7 0 3M",
        "-c",
        "write -P 8 12M 1M",
    ]);
    vdisk_ok(&["create", "-f", "vhdx", "-b", &base, &top]);
    vdisk_ok(&[
        "io",
        &top,
        "-c",
        "write -P 9 1M 1M",
        "-c",
        "write -z 12M 64k",
    ]);
    let b = p(dir, b_name);
    std::fs::write(&b, vec![0xA5u8; 16 << 20]).unwrap();
    (top, b)
}
