//! Image locks shared with QEMU (issue 10 item 3): `FileStorage` against itself (two opens in
//! one process conflict like two processes, since the locks are OFD locks), the exact bytes
//! each open mode holds (probed with `F_OFD_GETLK`, and compared with what `qemu-io` holds for
//! the same role), and `qemu-io`/`qemu-img` in both directions.
//!
//! The oracle tests need qemu-io and qemu-img: under `CI=true` a missing tool fails the test,
//! elsewhere it is skipped with a loud warning.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};

use block_io::testing::oracle;
use block_io::{ErrorKind, FileStorage, LockMode, OpenOptions, Storage};

fn writer() -> OpenOptions {
    OpenOptions::new()
}

/// A read-only open that must not change under it (a parent, `qemu-img info` on VHD/VHDX).
fn reader() -> OpenOptions {
    OpenOptions::new().read_only(true)
}

/// A read-only open that lets others write (an info-style look at a raw image, `-U`).
fn sharing_reader() -> OpenOptions {
    OpenOptions::new().read_only(true).share_writes(true)
}

fn image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, vec![0x5a; 1 << 20]).unwrap();
    p
}

fn open(p: &Path, o: &OpenOptions) -> block_io::Result<FileStorage> {
    FileStorage::open(p, o)
}

#[track_caller]
fn assert_locked(r: block_io::Result<FileStorage>, message: &str) {
    let e = r.expect_err("the open should have been refused by an image lock");
    assert_eq!(e.kind(), ErrorKind::Locked, "{e:?}");
    assert!(e.to_string().contains(message), "{e} lacks {message}");
    assert!(
        e.to_string().contains("is another process using the image"),
        "{e}"
    );
}

/// The bytes below 256 of `p` that some open file description holds an OFD lock on, found
/// as QEMU tests them: `F_OFD_GETLK` for a write lock from a description of our own (which
/// holds none). `/proc/locks` would do, but is not read atomically while other tests lock.
fn lock_bytes(p: &Path) -> BTreeSet<u64> {
    let probe = std::fs::File::open(p).unwrap();
    let mut out = BTreeSet::new();
    for byte in 0..256u64 {
        // SAFETY: flock is plain old data; all-zero is a valid value (l_pid 0, as F_OFD_*
        // requires).
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_WRLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = byte as libc::off_t;
        fl.l_len = 1;
        // SAFETY: `probe` is open for the call; `fl` is a live flock the kernel reads and
        // writes.
        let rc = unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        if i32::from(fl.l_type) != libc::F_UNLCK {
            assert_eq!(
                fl.l_pid, -1,
                "byte {byte} has a POSIX lock, not an OFD lock"
            );
            out.insert(byte);
        }
    }
    out
}

fn set(bytes: &[u64]) -> BTreeSet<u64> {
    bytes.iter().copied().collect()
}

#[test]
fn two_writers_second_is_locked() {
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path(), "a.raw");
    let first = open(&p, &writer()).unwrap();
    assert!(first.is_locked());
    assert_locked(open(&p, &writer()), "failed to get \"write\" lock");
    let e = open(&p, &writer()).unwrap_err();
    assert!(e.to_string().contains(&p.display().to_string()), "{e}");
    // The refused open left the holder's locks alone.
    assert_eq!(lock_bytes(&p), set(&[100, 101, 103, 201, 203]));
    first.write_at(b"still mine", 0).unwrap();
}

#[test]
fn writer_and_sharing_reader_coexist_in_either_order() {
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path(), "a.raw");
    let w = open(&p, &writer()).unwrap();
    let r = open(&p, &sharing_reader()).unwrap();
    w.write_at(b"new", 0).unwrap();
    let mut b = [0u8; 3];
    r.read_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"new");
    drop(w);
    // Reader first, then a writer.
    let _w = open(&p, &writer()).unwrap();
    drop(r);
}

#[test]
fn reader_that_must_not_change_and_writer_exclude_each_other() {
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path(), "base.raw");
    // A parent-style read-only open refuses writers...
    let parent = open(&p, &reader()).unwrap();
    assert_locked(open(&p, &writer()), "failed to get \"write\" lock");
    assert_locked(FileStorage::create(&p), "failed to get \"write\" lock");
    // ...but readers of every kind share it.
    let other = open(&p, &reader()).unwrap();
    let info = open(&p, &sharing_reader()).unwrap();
    drop((parent, other, info));
    // And it is refused while a writer has the file.
    let _w = open(&p, &writer()).unwrap();
    assert_locked(open(&p, &reader()), "failed to get shared \"write\" lock");
}

#[test]
fn lock_off_neither_takes_nor_tests() {
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path(), "a.raw");
    let w = open(&p, &writer()).unwrap();
    let forced = open(&p, &writer().lock(LockMode::Off)).unwrap();
    assert!(!forced.is_locked());
    let _ro = open(&p, &reader().lock(LockMode::Off)).unwrap();
    drop(w);
    // Only the unlocked opens remain: nothing is held, and a writer gets in.
    assert_eq!(lock_bytes(&p), set(&[]));
    let _w = open(&p, &writer()).unwrap();
}

#[test]
fn locks_go_with_the_storage_and_stay_when_another_fd_closes() {
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path(), "a.raw");
    let w = open(&p, &writer()).unwrap();
    // A POSIX lock would be dropped here: closing any descriptor of the file releases the
    // process's locks on it. OFD locks stay with their open file description.
    drop(std::fs::File::open(&p).unwrap());
    assert_locked(open(&p, &writer()), "failed to get \"write\" lock");
    // A clone of the descriptor shares the description and its locks while the storage
    // lives...
    let dup = w.file().try_clone().unwrap();
    assert_locked(open(&p, &writer()), "failed to get \"write\" lock");
    // ...and not after: dropping the storage unlocks the description, so a descriptor
    // someone else still holds (a child process forked by another thread that has not
    // exec'd yet) cannot keep the image locked.
    drop(w);
    assert_eq!(lock_bytes(&p), set(&[]));
    let w = open(&p, &writer()).unwrap();
    drop(dup);
    drop(w);
    let _w = open(&p, &writer()).unwrap();
}

#[test]
fn dropped_storage_is_unlocked_while_forked_children_start() {
    use std::sync::atomic::{AtomicBool, Ordering};
    /// Stops the spawning threads however the test ends.
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    // Other threads spawn processes while this one drops and reopens the same image: the
    // children briefly share every descriptor of the process (until exec closes them).
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path(), "a.raw");
    let stop = AtomicBool::new(false);
    std::thread::scope(|sc| {
        let _stop = Stop(&stop);
        for _ in 0..2 {
            sc.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    let _ = Command::new("true").status();
                }
            });
        }
        for _ in 0..1000 {
            let w = open(&p, &writer()).unwrap();
            drop(w);
        }
    });
}

#[test]
fn create_over_an_image_in_use_leaves_it_intact() {
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path(), "a.raw");
    let w = open(&p, &writer()).unwrap();
    assert_locked(FileStorage::create(&p), "failed to get \"write\" lock");
    assert_locked(
        open(&p, &writer().create(true).truncate(true)),
        "failed to get \"write\" lock",
    );
    assert_eq!(w.len().unwrap(), 1 << 20);
    assert_eq!(std::fs::read(&p).unwrap(), vec![0x5a; 1 << 20]);
    drop(w);
    let c = FileStorage::create(&p).unwrap();
    assert_eq!(c.len().unwrap(), 0);
    // A brand-new file works as before.
    let n = FileStorage::create(d.path().join("new.raw")).unwrap();
    assert!(n.is_locked());
}

#[test]
fn share_writes_switches_while_open() {
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path(), "a.vhdx");
    let mut r = open(&p, &sharing_reader()).unwrap();
    let w = open(&p, &writer()).unwrap();
    // A writer is there: refusing writers fails and keeps the sharing lock.
    let e = r.set_share_writes(false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Locked);
    assert!(e.to_string().contains("shared \"write\""), "{e}");
    drop(w);
    assert_eq!(lock_bytes(&p), set(&[100]));
    r.set_share_writes(false).unwrap();
    assert_eq!(lock_bytes(&p), set(&[100, 201, 203]));
    assert_locked(open(&p, &writer()), "failed to get \"write\" lock");
    r.set_share_writes(true).unwrap();
    assert_eq!(lock_bytes(&p), set(&[100]));
    let mut w = open(&p, &writer()).unwrap();
    // Nothing to switch on a writer.
    w.set_share_writes(true).unwrap();
    assert_locked(open(&p, &writer()), "failed to get \"write\" lock");
}

#[test]
fn bytes_held_per_mode() {
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path(), "a.raw");
    for (o, want) in [
        (writer(), set(&[100, 101, 103, 201, 203])),
        (reader(), set(&[100, 201, 203])),
        (sharing_reader(), set(&[100])),
        (writer().lock(LockMode::Off), set(&[])),
        (reader().lock(LockMode::Off), set(&[])),
    ] {
        let s = open(&p, &o).unwrap();
        assert_eq!(lock_bytes(&p), want, "{o:?}");
        drop(s);
        assert_eq!(lock_bytes(&p), set(&[]), "released after {o:?}");
    }
}

// ---- QEMU oracles -------------------------------------------------------------------------

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[track_caller]
fn assert_qemu_refused(o: &Output, message: &str) {
    // qemu-io reports a failed open on stderr and may still exit 0 (it goes on without a
    // file); what must not happen is the command running.
    let t = text(o);
    assert!(t.contains(message), "qemu was not refused: {t}");
    assert!(!t.contains("bytes at offset"), "the command ran: {t}");
}

#[track_caller]
fn assert_qemu_ran(o: &Output, what: &str) {
    let t = text(o);
    assert!(o.status.success() && t.contains(what), "qemu failed: {t}");
    assert!(!t.contains("Failed to get"), "{t}");
}

fn qemu_img_vhdx(dir: &Path) -> PathBuf {
    let p = dir.join("q.vhdx");
    let o = run("qemu-img", &["create", "-q", "-f", "vhdx", s(&p), "16M"]);
    assert!(o.status.success(), "{}", text(&o));
    p
}

/// `qemu-io` kept running in interactive mode with the image open, until dropped.
struct QemuIo {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl QemuIo {
    /// Starts `qemu-io ARGS IMG` and waits until a read through it has completed, so its
    /// locks are taken.
    fn hold(args: &[&str], img: &Path) -> QemuIo {
        let mut child = Command::new("qemu-io")
            .args(args)
            .arg(img)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut q = QemuIo {
            child,
            stdin,
            stdout,
        };
        q.command("read 0 512", "read 512/512 bytes");
        q
    }

    fn command(&mut self, cmd: &str, want: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{cmd}").unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stdout.read_line(&mut line).unwrap();
            assert!(n > 0, "qemu-io ended before answering {cmd}");
            assert!(!line.contains("no file open"), "qemu-io could not open");
            if line.contains(want) {
                return;
            }
        }
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        // End of input makes qemu-io quit, closing the image.
        drop(self.stdin.take());
        if self.child.wait().is_err() {
            let _ = self.child.kill();
        }
    }
}

#[test]
fn lock_bytes_match_qemu_io_for_each_role() {
    if !oracle("qemu-io") || !oracle("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let vhdx = qemu_img_vhdx(d.path());
    let raw = image(d.path(), "a.raw");
    // qemu-io -f vhdx: the file under a read-write VHDX; ours read-write.
    // qemu-io -r -f vhdx: under a read-only VHDX; ours read-only (must not change).
    // qemu-io -r -f raw: a read-only raw image; ours read-only sharing writes.
    for (args, img, ours) in [
        (&["-f", "vhdx"][..], &vhdx, writer()),
        (&["-r", "-f", "vhdx"][..], &vhdx, reader()),
        (&["-r", "-f", "raw"][..], &raw, sharing_reader()),
    ] {
        let q = QemuIo::hold(args, img);
        let theirs = lock_bytes(img);
        drop(q);
        assert_eq!(lock_bytes(img), set(&[]));
        let s = open(img, &ours).unwrap();
        assert_eq!(lock_bytes(img), theirs, "qemu-io {args:?} vs {ours:?}");
        drop(s);
    }
}

#[test]
fn qemu_io_holds_the_image_and_we_are_refused() {
    if !oracle("qemu-io") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path(), "a.raw");
    // qemu-io writing a raw image holds 100, 101 and shares everything, so ours fail on
    // refusing to share its write (byte 101), as a second QEMU writer of a VHDX would.
    let q = QemuIo::hold(&["-f", "raw"], &p);
    assert_locked(open(&p, &writer()), "failed to get shared \"write\" lock");
    assert_locked(
        FileStorage::create(&p),
        "failed to get shared \"write\" lock",
    );
    assert_locked(open(&p, &reader()), "failed to get shared \"write\" lock");
    // Readers that let others write, and force-share, get in.
    let _info = open(&p, &sharing_reader()).unwrap();
    let _forced = open(&p, &writer().lock(LockMode::Off)).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
    drop(q);
    let _w = open(&p, &writer()).unwrap();
}

#[test]
fn qemu_io_reading_a_vhdx_refuses_our_writer() {
    if !oracle("qemu-io") || !oracle("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = qemu_img_vhdx(d.path());
    let q = QemuIo::hold(&["-r", "-f", "vhdx"], &p);
    assert_locked(open(&p, &writer()), "failed to get \"write\" lock");
    // Readers share it.
    let _r = open(&p, &reader()).unwrap();
    drop(q);
}

#[test]
fn our_writer_refuses_qemu() {
    if !oracle("qemu-io") || !oracle("qemu-img") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path(), "a.raw");
    let w = open(&p, &writer()).unwrap();
    let o = run("qemu-io", &["-f", "raw", "-c", "write 0 512", s(&p)]);
    assert_qemu_refused(&o, "Failed to get \"write\" lock");
    // A read-only raw opener shares writes in QEMU too; -U forces it anyway.
    let o = run("qemu-io", &["-r", "-f", "raw", "-c", "read 0 512", s(&p)]);
    assert_qemu_ran(&o, "read 512/512");
    let o = run("qemu-img", &["info", "-U", "-f", "raw", s(&p)]);
    assert_qemu_ran(&o, "virtual size");
    drop(w);
    let o = run("qemu-io", &["-f", "raw", "-c", "write 0 512", s(&p)]);
    assert_qemu_ran(&o, "wrote 512/512");

    // qemu-img info on a VHDX we write fails without -U, as on one a VM writes.
    let v = qemu_img_vhdx(d.path());
    let w = open(&v, &writer()).unwrap();
    let o = run("qemu-img", &["info", s(&v)]);
    assert!(!o.status.success());
    assert_qemu_refused(&o, "Failed to get shared \"write\" lock");
    let o = run("qemu-img", &["info", "-U", s(&v)]);
    assert_qemu_ran(&o, "file format: vhdx");
    let o = run("qemu-io", &["-f", "vhdx", "-c", "write 0 512", s(&v)]);
    assert_qemu_refused(&o, "Failed to get \"write\" lock");
    drop(w);
    let o = run("qemu-img", &["info", s(&v)]);
    assert_qemu_ran(&o, "file format: vhdx");
}

#[test]
fn our_reader_refuses_qemu_writers_unless_it_shares() {
    if !oracle("qemu-io") {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path(), "base.raw");
    let r = open(&p, &reader()).unwrap();
    let o = run("qemu-io", &["-f", "raw", "-c", "write 0 512", s(&p)]);
    assert_qemu_refused(&o, "Failed to get \"write\" lock");
    let o = run("qemu-io", &["-r", "-f", "raw", "-c", "read 0 512", s(&p)]);
    assert_qemu_ran(&o, "read 512/512");
    drop(r);
    let r = open(&p, &sharing_reader()).unwrap();
    let o = run("qemu-io", &["-f", "raw", "-c", "write 0 512", s(&p)]);
    assert_qemu_ran(&o, "wrote 512/512");
    drop(r);
}
