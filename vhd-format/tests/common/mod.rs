//! Shared helpers of the integration tests: oracle discovery and models.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;

/// `true` if qemu-img and qemu-io are present ([`block_io::testing::oracle`]).
pub fn have_qemu() -> bool {
    block_io::testing::oracle("qemu-img") && block_io::testing::oracle("qemu-io")
}

/// `true` if Debian's python3 can import pyvhdi ([`block_io::testing::pyvhdi`]).
pub fn have_pyvhdi() -> bool {
    block_io::testing::pyvhdi()
}

/// Runs a command, panicking with its output on failure; returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Path as &str.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A deterministic pattern for a write identified by `tag`.
pub fn pattern(tag: u64, len: usize) -> Vec<u8> {
    let mut x = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub mod probe;
pub mod workload;
