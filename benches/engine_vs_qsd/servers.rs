//! The backends under test, each a child process serving one image on a unix socket:
//! `vdisk serve` (ours) and qemu-storage-daemon's vhost-user-blk export (the peer).

use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Who serves, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `vdisk serve --cache none|writeback --aio io_uring|threads`.
    Ours { direct: bool, uring: bool },
    /// qemu-storage-daemon, `cache.direct=on|off`, `aio=io_uring|threads`.
    Qsd { direct: bool, uring: bool },
}

impl Backend {
    /// A short key for tables and JSON.
    pub fn key(self) -> &'static str {
        match self {
            Backend::Ours { .. } => "ours",
            Backend::Qsd { uring: true, .. } => "qsd_io_uring",
            Backend::Qsd { uring: false, .. } => "qsd_threads",
        }
    }

    /// The flags it runs with, as a user would type them.
    pub fn describe(self) -> String {
        match self {
            Backend::Ours { direct, uring } => format!(
                "vdisk serve --cache {} --aio {}",
                if direct { "none" } else { "writeback" },
                if uring { "io_uring" } else { "threads" }
            ),
            Backend::Qsd { direct, uring } => format!(
                "qemu-storage-daemon cache.direct={},aio={}",
                if direct { "on" } else { "off" },
                if uring { "io_uring" } else { "threads" }
            ),
        }
    }
}

/// What a backend serves: one image, or (qsd) a chain of qcow2 layers given bottom first.
#[derive(Debug, Clone)]
pub enum Target {
    /// One file, opened with the format driver named (qsd: raw, vhdx, vpc; ours detects it).
    Image { path: PathBuf, qemu_driver: String },
    /// qcow2 layers, base first, each the backing of the next (qsd only).
    Qcow2Chain(Vec<PathBuf>),
}

/// A running backend; stopped (SIGTERM, then SIGKILL after a while) when dropped.
pub struct Server {
    child: Child,
    log: PathBuf,
}

impl Server {
    /// Starts `backend` on `target` with `queues` queues, listening on `sock`.
    pub fn start(
        vdisk: &Path,
        backend: Backend,
        target: &Target,
        queues: usize,
        sock: &Path,
        log: &Path,
    ) -> Result<Server, String> {
        let _ = std::fs::remove_file(sock);
        let mut cmd = match (backend, target) {
            (Backend::Ours { direct, uring }, Target::Image { path, .. }) => {
                let mut c = Command::new(vdisk);
                c.arg("serve")
                    .arg("--socket")
                    .arg(sock)
                    .arg("--queues")
                    .arg(queues.to_string())
                    .arg("--cache")
                    .arg(if direct { "none" } else { "writeback" })
                    .arg("--aio")
                    .arg(if uring { "io_uring" } else { "threads" });
                if let Ok(w) = std::env::var("ENGINE_BENCH_OURS_WORKERS") {
                    c.arg("--workers").arg(w);
                }
                c.arg(path);
                c
            }
            (Backend::Qsd { direct, uring }, t) => {
                let file_opts = format!(
                    "cache.direct={},aio={}",
                    if direct { "on" } else { "off" },
                    if uring { "io_uring" } else { "threads" }
                );
                let mut c = Command::new("qemu-storage-daemon");
                match t {
                    Target::Image { path, qemu_driver } => {
                        c.arg("--blockdev").arg(format!(
                            "driver=file,node-name=f,filename={},{file_opts}",
                            path.display()
                        ));
                        c.arg("--blockdev")
                            .arg(format!("driver={qemu_driver},node-name=d,file=f"));
                    }
                    Target::Qcow2Chain(layers) => {
                        // Every layer explicitly, so that the lower ones get the same cache and
                        // aio options (a backing file QEMU opens by itself would not inherit
                        // aio=).
                        let last = layers.len().saturating_sub(1);
                        for (i, l) in layers.iter().enumerate() {
                            let top = i == last;
                            let ro = if top { "" } else { ",read-only=on" };
                            let node = if top {
                                "d".to_string()
                            } else {
                                format!("d{i}")
                            };
                            c.arg("--blockdev").arg(format!(
                                "driver=file,node-name=f{i},filename={},{file_opts}{ro}",
                                l.display()
                            ));
                            // The base has no backing file; each layer above names its parent.
                            let backing = match i {
                                0 => String::new(),
                                _ => format!(",backing=d{}", i - 1),
                            };
                            c.arg("--blockdev").arg(format!(
                                "driver=qcow2,node-name={node},file=f{i}{backing}{ro}"
                            ));
                        }
                    }
                }
                c.arg("--export").arg(format!(
                    "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={},\
                     writable=on,num-queues={queues}",
                    sock.display()
                ));
                c
            }
            (Backend::Ours { .. }, Target::Qcow2Chain(_)) => {
                return Err("vdisk does not open qcow2".to_string());
            }
        };
        let out = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", backend.describe()))?;
        let mut s = Server {
            child,
            log: log.to_path_buf(),
        };
        let t0 = Instant::now();
        while !sock.exists() {
            if let Ok(Some(st)) = s.child.try_wait() {
                return Err(format!(
                    "{} exited ({st}): {}",
                    backend.describe(),
                    s.log_tail()
                ));
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "{} made no socket in 30 s: {}",
                    backend.describe(),
                    s.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(s)
    }

    /// The backend's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of the backend's output.
    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// Asks the backend to exit (SIGTERM: both flush the disk) and waits. `Ok(Some(note))`
    /// when it died of SIGPIPE (a `vdisk serve` whose SIGPIPE action is the default dies so
    /// when it writes to a socket whose peer is gone): the measurement stands, the note says
    /// when the exit was not clean.
    pub fn stop(mut self) -> Result<Option<String>, String> {
        let died = |st: std::process::ExitStatus, when: &str, log: String| {
            if st.signal() == Some(libc::SIGPIPE) {
                Ok(Some(format!("the backend died of SIGPIPE {when}: {log}")))
            } else {
                Err(format!("the backend exited with {st} {when}: {log}"))
            }
        };
        if let Ok(Some(st)) = self.child.try_wait() {
            return died(st, "when the client left", self.log_tail());
        }
        let pid = libc::pid_t::try_from(self.child.id()).map_err(|e| e.to_string())?;
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) if st.success() => return Ok(None),
                Ok(Some(st)) => return died(st, "after SIGTERM", self.log_tail()),
                Ok(None) if t0.elapsed() > Duration::from_secs(120) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err("the backend did not exit within 120 s; killed".to_string());
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
