//! Image locks shared with QEMU: open-file-description (OFD) byte-range locks in the protocol
//! of QEMU's file driver (`block/file-posix.c`, `raw_apply_lock_bytes`,
//! `raw_check_lock_bytes`, `raw_handle_perm_lock`, `raw_co_create`).
//!
//! Each permission of QEMU's block layer is a bit (`include/block/block-common.h`:
//! `BLK_PERM_CONSISTENT_READ` 0x01, `WRITE` 0x02, `WRITE_UNCHANGED` 0x04, `RESIZE` 0x08,
//! `BLK_PERM_ALL` 0x0f). A user of an image holds a shared (`F_RDLCK`) lock on byte
//! `100 + i` while it holds permission bit `i` and on byte `200 + i` while it refuses to
//! share it. Changing locks goes in QEMU's order: first take every byte wanted (keeping the
//! old ones), then test the other side's bytes with `F_OFD_GETLK` for a `F_WRLCK` (a byte
//! locked by any other open file description is a conflict; our own locks never are), then
//! drop the bytes no longer wanted. A failed test drops what was added, leaving the old set.
//! Two openers that race both take before they test, so at least one of them sees the other.
//!
//! Locks belong to the open file description: they are released when the last descriptor on
//! it is closed, and closing another descriptor on the same file (a POSIX-lock pitfall) does
//! not drop them. Two opens of one file in one process conflict like two processes.

use std::os::unix::io::RawFd;
use std::path::Path;

use crate::error::{Error, ErrorKind, Result};

/// `BLK_PERM_CONSISTENT_READ`: reads see consistent data.
const CONSISTENT_READ: u8 = 0x01;
/// `BLK_PERM_WRITE`: the visible content may change.
const WRITE: u8 = 0x02;
/// `BLK_PERM_RESIZE`: the size may change.
const RESIZE: u8 = 0x08;
/// `BLK_PERM_ALL` (QEMU 6.2 and later; 6.1 had a fifth bit, GRAPH_MOD, never set by us).
const ALL: u8 = 0x0f;
/// `RAW_LOCK_PERM_BASE`: byte `100 + i` is locked while permission `i` is held.
const PERM_BASE: i64 = 100;
/// `RAW_LOCK_SHARED_BASE`: byte `200 + i` is locked while permission `i` is not shared.
const SHARED_BASE: i64 = 200;

/// The permissions one open file description holds and refuses to share (QEMU's `perm` and
/// `~shared_perm`, restricted to `BLK_PERM_ALL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Perms {
    held: u8,
    refused: u8,
}

impl Perms {
    /// No locks.
    pub(crate) const NONE: Perms = Perms {
        held: 0,
        refused: 0,
    };
    /// A read-write image: what QEMU's file node takes under a VHD/VHDX (or qcow2) format
    /// node opened read-write (`bdrv_default_perms_for_storage`: the format writes and
    /// resizes its file and shares neither), bytes 100, 101, 103, 201, 203.
    pub(crate) const WRITER: Perms = Perms {
        held: CONSISTENT_READ | WRITE | RESIZE,
        refused: WRITE | RESIZE,
    };
    /// A read-only image that must not change under us: a backing file
    /// (`bdrv_default_perms_for_cow`) or a read-only VHD/VHDX (`qemu-img info`, `qemu-io -r`:
    /// format metadata must stay put), bytes 100, 201, 203.
    pub(crate) const READER: Perms = Perms {
        held: CONSISTENT_READ,
        refused: WRITE | RESIZE,
    };
    /// A read-only image that others may write: what `qemu-io -r -f raw` and every
    /// `-U`/`force-share` open take, byte 100.
    pub(crate) const SHARING_READER: Perms = Perms {
        held: CONSISTENT_READ,
        refused: 0,
    };

    fn union(self, other: Perms) -> Perms {
        Perms {
            held: self.held | other.held,
            refused: self.refused | other.refused,
        }
    }
}

/// The name QEMU's `bdrv_perm_names` gives permission `bit`.
fn perm_name(bit: u8) -> &'static str {
    match bit {
        CONSISTENT_READ => "consistent read",
        WRITE => "write",
        0x04 => "write unchanged",
        _ => "resize",
    }
}

/// The permission bits of `mask`, lowest first (QEMU's `PERM_FOREACH`).
fn bits(mask: u8) -> impl Iterator<Item = (i64, u8)> {
    (0..8)
        .map(|i| (i64::from(i), 1u8 << i))
        .filter(move |&(_, bit)| bit & ALL & mask != 0)
}

/// `fcntl(fd, cmd, &flock)` on the single byte `byte`, retried on EINTR; returns the flock
/// as the kernel left it.
fn fcntl_byte(fd: RawFd, cmd: libc::c_int, ty: libc::c_int, byte: i64) -> std::io::Result<i32> {
    // SAFETY: `flock` is plain old data; all-zero bytes are a valid value (and zero l_pid is
    // what F_OFD_* require).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    loop {
        // SAFETY: `fd` is a descriptor the caller owns and keeps open for the call; `fl` is a
        // live, initialised flock the kernel reads and (for GETLK) writes.
        let rc = unsafe { libc::fcntl(fd, cmd, &mut fl as *mut libc::flock) };
        if rc != -1 {
            return Ok(i32::from(fl.l_type));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// `true` if the kernel offers OFD locks on `fd` (QEMU's `qemu_has_ofd_lock`: without them,
/// `locking=auto` takes no locks).
pub(crate) fn ofd_supported(fd: RawFd) -> bool {
    !matches!(
        fcntl_byte(fd, libc::F_OFD_GETLK, libc::F_WRLCK, PERM_BASE),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL)
    )
}

fn in_use(path: &Path, what: String) -> Error {
    Error::new(
        ErrorKind::Locked,
        format!(
            "{what}: is another process using the image {}?",
            path.display()
        ),
    )
}

/// Locks or unlocks byte `byte` (`qemu_lock_fd`/`qemu_unlock_fd`: always a shared lock).
fn set(fd: RawFd, path: &Path, byte: i64, lock: bool) -> Result<()> {
    let ty = if lock { libc::F_RDLCK } else { libc::F_UNLCK };
    match fcntl_byte(fd, libc::F_OFD_SETLK, ty, byte) {
        Ok(_) => Ok(()),
        // Someone holds an exclusive lock on the byte (never QEMU, which only takes shared
        // ones; another tool that locks the whole file).
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
            Err(in_use(path, format!("failed to lock byte {byte}")))
        }
        Err(e) => {
            let what = if lock { "lock" } else { "unlock" };
            Err(Error::io(
                format!("cannot {what} byte {byte} of {}", path.display()),
                e,
            ))
        }
    }
}

/// `true` if another open file description holds a lock on `byte` (`qemu_lock_fd_test` with
/// `exclusive`).
fn held_elsewhere(fd: RawFd, path: &Path, byte: i64) -> Result<bool> {
    fcntl_byte(fd, libc::F_OFD_GETLK, libc::F_WRLCK, byte)
        .map(|ty| ty != libc::F_UNLCK)
        .map_err(|e| Error::io(format!("cannot test byte {byte} of {}", path.display()), e))
}

/// Takes every byte of `new` not in `old` and, if `unlock`, drops every byte of `old` not in
/// `new` (`raw_apply_lock_bytes`).
fn apply(fd: RawFd, path: &Path, old: Perms, new: Perms, unlock: bool) -> Result<()> {
    for (base, have, want) in [
        (PERM_BASE, old.held, new.held),
        (SHARED_BASE, old.refused, new.refused),
    ] {
        for (i, bit) in bits(ALL) {
            if want & bit != 0 && have & bit == 0 {
                set(fd, path, base + i, true)?;
            } else if unlock && have & bit != 0 && want & bit == 0 {
                set(fd, path, base + i, false)?;
            }
        }
    }
    Ok(())
}

/// Fails if another user refuses to share a permission `p` holds, or holds one `p` refuses
/// to share (`raw_check_lock_bytes`, with QEMU's messages and hint).
fn check(fd: RawFd, path: &Path, p: Perms) -> Result<()> {
    for (i, bit) in bits(p.held) {
        if held_elsewhere(fd, path, SHARED_BASE + i)? {
            return Err(in_use(
                path,
                format!("failed to get \"{}\" lock", perm_name(bit)),
            ));
        }
    }
    for (i, bit) in bits(p.refused) {
        if held_elsewhere(fd, path, PERM_BASE + i)? {
            return Err(in_use(
                path,
                format!("failed to get shared \"{}\" lock", perm_name(bit)),
            ));
        }
    }
    Ok(())
}

/// Moves the locks of `fd` from `old` to `new` (`raw_handle_perm_lock`: PREPARE takes the
/// union and checks `new`; COMMIT drops what `new` does not need; ABORT goes back to `old`).
/// On error the locks are `old` again.
pub(crate) fn change(fd: RawFd, path: &Path, old: Perms, new: Perms) -> Result<()> {
    let union = old.union(new);
    let prepared = apply(fd, path, old, union, false).and_then(|()| check(fd, path, new));
    match prepared {
        Ok(()) => apply(fd, path, union, new, true),
        Err(e) => {
            // Only unlocks, which do not fail on a descriptor that could lock; QEMU warns and
            // goes on too. The error that matters is the conflict.
            let _ = apply(fd, path, union, old, true);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_of_each_mode() {
        let bytes = |p: Perms| {
            let mut v: Vec<i64> = bits(p.held).map(|(i, _)| PERM_BASE + i).collect();
            v.extend(bits(p.refused).map(|(i, _)| SHARED_BASE + i));
            v
        };
        assert_eq!(bytes(Perms::WRITER), [100, 101, 103, 201, 203]);
        assert_eq!(bytes(Perms::READER), [100, 201, 203]);
        assert_eq!(bytes(Perms::SHARING_READER), [100]);
        assert_eq!(perm_name(WRITE), "write");
        assert_eq!(perm_name(RESIZE), "resize");
    }
}
