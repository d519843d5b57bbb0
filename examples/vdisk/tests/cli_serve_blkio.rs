//! `vdisk serve` (the command, not the library in-process) driven through libblkio's
//! virtio-blk-vhost-user driver (the `blkio` crate, as QEMU's blkio driver uses it): a VHDX
//! chain served with each cache/aio mode takes 32 writes in flight and reads them back, and
//! what lands is in the image afterwards (issue 10 item 10).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
use common::*;

use std::mem::MaybeUninit;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use blkio::{Blkio, Completion, ReqFlags};

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn serve(args: &[&str], sock: &str) -> Serve {
    let s = Serve(
        Command::new(vdisk_bin())
            .arg("serve")
            .args(args)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..300 {
        if Path::new(sock).exists() {
            return s;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("vdisk serve did not start");
}

#[test]
fn libblkio_drives_vdisk_serve() {
    let dir = tempfile::tempdir().unwrap();
    let base = p(&dir, "base.vhdx");
    let top = p(&dir, "top.vhdx");
    vdisk_ok(&["create", "-f", "vhdx", &base, "16M"]);
    vdisk_ok(&["io", &base, "-c", "write -P 0x11 0 16M"]);
    vdisk_ok(&["create", "-f", "vhdx", "-b", &base, &top]);
    const CHUNK: usize = 64 << 10;
    const DEPTH: usize = 32;
    for (round, mode) in [
        ["--cache", "writeback", "--aio", "io_uring"],
        ["--cache", "none", "--aio", "io_uring"],
        ["--cache", "writeback", "--aio", "threads"],
        ["--cache", "writeback", "--aio", "sync"],
    ]
    .iter()
    .enumerate()
    {
        let sock = p(&dir, &format!("s{round}.sock"));
        let mut args: Vec<&str> = mode.to_vec();
        args.extend(["--socket", &sock, &top]);
        let _s = serve(&args, &sock);
        let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
        b.set_str("path", &sock).unwrap();
        b.connect()
            .unwrap_or_else(|e| panic!("{mode:?}: libblkio cannot connect: {e}"));
        b.set_i32("num-queues", 1).unwrap();
        b.set_i32("queue-size", 64).unwrap();
        let started = b.start().unwrap();
        let mut q = started.queues.into_iter().next().unwrap();
        assert_eq!(b.get_u64("capacity").unwrap(), 16 << 20);
        let region = b.alloc_mem_region(2 * DEPTH * CHUNK).unwrap();
        b.map_mem_region(&region).unwrap();
        let ptr = |i: usize| (region.addr + i * CHUNK) as *mut u8;
        let fill = (round as u8 + 1) * 0x20;
        for i in 0..DEPTH {
            // SAFETY: inside the mapped region; no request uses it yet.
            unsafe { std::ptr::write_bytes(ptr(i), fill + i as u8, CHUNK) };
        }
        let run = |q: &mut blkio::Blkioq, n: usize| {
            let mut slots: Vec<MaybeUninit<Completion>> =
                (0..n).map(|_| MaybeUninit::uninit()).collect();
            let mut got = 0;
            while got < n {
                let mut t = Duration::from_secs(30);
                let k = q
                    .do_io(&mut slots[got..], n - got, Some(&mut t), None)
                    .unwrap();
                for s in &slots[got..got + k] {
                    // SAFETY: do_io initialised these slots.
                    assert_eq!(unsafe { s.assume_init_read() }.ret, 0, "{mode:?}");
                }
                got += k;
            }
        };
        // 32 writes in flight at a 256 KiB stride, then 32 reads of them into other buffers.
        for i in 0..DEPTH {
            q.write((i * 4 * CHUNK) as u64, ptr(i), CHUNK, i, ReqFlags::empty());
        }
        run(&mut q, DEPTH);
        for i in 0..DEPTH {
            q.read(
                (i * 4 * CHUNK) as u64,
                ptr(DEPTH + i),
                CHUNK,
                i,
                ReqFlags::empty(),
            );
        }
        run(&mut q, DEPTH);
        q.flush(0, ReqFlags::empty());
        run(&mut q, 1);
        for i in 0..DEPTH {
            let mut v = vec![0u8; CHUNK];
            // SAFETY: inside the region; the reads completed.
            unsafe { std::ptr::copy_nonoverlapping(ptr(DEPTH + i), v.as_mut_ptr(), CHUNK) };
            assert!(v.iter().all(|&x| x == fill + i as u8), "{mode:?}: read {i}");
        }
        drop(q);
        drop(b);
    }
    // The last round's data is in the chain's top; the base shows through elsewhere.
    vdisk_ok(&[
        "io",
        "-r",
        &top,
        "-c",
        "read -P 0x80 0 64k",
        "-c",
        "read -P 0x11 64k 192k",
    ]);
}
