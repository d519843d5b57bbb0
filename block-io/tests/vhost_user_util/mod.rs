//! Helpers shared by the vhost-user test files: an in-process server on a temporary socket,
//! and qemu-storage-daemon as an oracle.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use block_io::vhost_user::client::{Client, ClientOptions};
use block_io::vhost_user::{ConfigHandle, ServerOptions, StopHandle, VhostUserBlkServer};
use block_io::BlockDevice;

/// Our server running on a thread; stopped and joined on drop.
pub struct Served {
    pub path: PathBuf,
    /// Announces size changes of the served disk.
    pub config: ConfigHandle,
    stop: StopHandle,
    thread: Option<JoinHandle<(block_io::Result<()>, u64)>>,
    _dir: tempfile::TempDir,
}

impl Served {
    pub fn start(dev: Arc<dyn BlockDevice>, num_queues: u16) -> Served {
        Served::start_with(dev, num_queues, ServerOptions::default().aio)
    }

    /// [`Served::start`] with the queues' I/O engine `aio` (`None`: synchronous, each
    /// request on the queue's own thread).
    pub fn start_with(
        dev: Arc<dyn BlockDevice>,
        num_queues: u16,
        aio: Option<block_io::engine::Aio>,
    ) -> Served {
        let opts = ServerOptions {
            num_queues,
            aio,
            ..ServerOptions::default()
        };
        Served::start_opts(dev, &opts)
    }

    /// A server with options `opts`.
    pub fn start_opts(dev: Arc<dyn BlockDevice>, opts: &ServerOptions) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vub.sock");
        let mut server = VhostUserBlkServer::bind(&path, dev, opts).unwrap();
        let stop = server.stop_handle();
        let config = server.config_handle();
        let thread = std::thread::spawn(move || {
            let r = server.serve();
            (r, server.connections())
        });
        Served {
            path,
            config,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    pub fn client(&self, num_queues: u16) -> Client {
        connect(&self.path, num_queues, true)
    }

    /// Stops the server; returns how many connections it served.
    pub fn stop(mut self) -> u64 {
        self.stop.stop();
        let (r, n) = self.thread.take().unwrap().join().unwrap();
        r.unwrap();
        n
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.stop();
            let _ = t.join();
        }
    }
}

pub fn connect(path: &Path, num_queues: u16, event_idx: bool) -> Client {
    Client::connect(
        path,
        &ClientOptions {
            num_queues,
            event_idx,
            ..ClientOptions::default()
        },
    )
    .unwrap()
}

/// qemu-storage-daemon exporting a raw file over vhost-user-blk; killed on drop.
pub struct Qsd {
    pub path: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Qsd {
    pub fn start(image: &Path, writable: bool, num_queues: u16) -> Qsd {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qsd.sock");
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={},discard=unmap",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable={},num-queues={num_queues}",
                path.display(),
                if writable { "on" } else { "off" }
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        while !path.exists() {
            assert!(t0.elapsed() < Duration::from_secs(10), "qsd did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Qsd {
            path,
            child,
            _dir: dir,
        }
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic bytes for sector `s` (each 512-byte sector differs).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64 / 512 + seed).wrapping_mul(31) ^ (i as u64 % 251)) as u8)
        .collect()
}
