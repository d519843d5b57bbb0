//! Helpers for the workspace's tests (feature `testing`).
//!
//! Oracle tests compare our results with other programs (qemu-img, qemu-io, qemu-nbd,
//! nbdkit, pyvhdi, ...). The rule every crate follows: when the oracle is missing, a test
//! fails under `CI=true` (CI must install it) and elsewhere skips its checks after a loud
//! warning on stderr.

use std::process::Command;
use std::time::{Duration, Instant};

/// `true` if `tool --version` runs and succeeds; else, by the oracle rule (see the module
/// docs), a panic under `CI=true` naming `tool`, or a loud warning and `false`.
pub fn oracle(tool: &str) -> bool {
    oracle_probe(tool, tool, &["--version"])
}

/// `true` if `cmd args` runs and succeeds (a probe for the oracle `what`, such as a Python
/// module); else, as [`oracle`], a panic under `CI=true` naming `what`, or a loud warning
/// and `false`.
#[allow(clippy::panic)]
pub fn oracle_probe(what: &str, cmd: &str, args: &[&str]) -> bool {
    let ok = Command::new(cmd)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("oracle {what} is missing under CI");
        }
        eprintln!("!!! WARNING: oracle {what} is missing; the checks against it are SKIPPED !!!");
    }
    ok
}

/// The pyvhdi oracle (libvhdi's Python bindings under Debian's python3), by the rule of
/// [`oracle`].
pub fn pyvhdi() -> bool {
    oracle_probe("pyvhdi", "/usr/bin/python3", &["-c", "import pyvhdi"])
}

/// Waits until something accepts TCP connections on `127.0.0.1:port` (a server the test
/// started); `false` if nothing did within `timeout`.
pub fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// The first `len` bytes of the VHD/VHDX chain `layers` (base first) as libvhdi reads it
/// (pyvhdi under Debian's python3; each layer's parent set by hand, as libvhdi does not
/// resolve parent locators). Check [`pyvhdi`] first.
///
/// # Errors
/// What python printed, when it fails (a layer libvhdi cannot open, say).
pub fn pyvhdi_read(layers: &[&std::path::Path], len: u64) -> Result<Vec<u8>, String> {
    let mut script = String::from("import pyvhdi,sys\nfs=[]\n");
    for (i, l) in layers.iter().enumerate() {
        script += &format!(
            "f=pyvhdi.file(); f.open({:?})\n",
            l.to_string_lossy().into_owned()
        );
        if i > 0 {
            script += "f.set_parent(fs[-1])\n";
        }
        script += "fs.append(f)\n";
    }
    script += &format!("sys.stdout.buffer.write(fs[-1].read_buffer_at_offset({len}, 0))\n");
    let out = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    if !out.status.success() {
        return Err(format!("pyvhdi: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(out.stdout)
}
