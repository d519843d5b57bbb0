//! Helpers shared by the integration tests: oracle detection and small image utilities.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// The oracle rule (`true` if `tool` runs; else a panic under CI=true, a loud skip
/// elsewhere).
#[allow(unused_imports)] // not every test that includes this module has an oracle
pub use block_io::testing::oracle;

/// Runs a command, panicking with its stderr on failure; returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The path as &str.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Reads a whole block device.
pub fn read_all(dev: &dyn block_io::BlockDevice) -> Vec<u8> {
    let size = dev.info().virtual_size as usize;
    let mut out = vec![0u8; size];
    let chunk = 4 << 20;
    let mut pos = 0;
    while pos < size {
        let n = chunk.min(size - pos);
        dev.read_at(&mut out[pos..pos + n], pos as u64).unwrap();
        pos += n;
    }
    out
}
