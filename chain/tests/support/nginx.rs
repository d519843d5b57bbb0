//! An nginx on loopback serving a temporary folder over plain HTTP (range requests on), for
//! the remote-parent tests of `chain` and the CLI. Started per test, stopped on drop.
//!
//! Oracle rule: without nginx the caller fails when `CI=true`, else prints a loud SKIP.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary `name` (PATH, /usr/sbin, /sbin), or `None` after the oracle rule.
pub fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{name} is missing (CI=true): run .ci/setup");
        }
        eprintln!("\n*** SKIP: {name} is not installed; this test did not run ***\n");
    }
    found
}

/// A free loopback TCP port (free when asked; a server started on it retries if it is taken).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An nginx serving [`Nginx::root`].
pub struct Nginx {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    /// The folder it serves.
    pub root: PathBuf,
}

impl Nginx {
    /// Starts one, or `None` (SKIP) without nginx.
    pub fn start() -> Option<Nginx> {
        let bin = tool("nginx")?;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let p = dir.path().display().to_string();
        // As root, the workers must stay root to read the private temp folder.
        // SAFETY: geteuid has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root;"
        } else {
            ""
        };
        for _ in 0..5 {
            let port = free_port();
            let conf = format!(
                r#"worker_processes 1;
{user}
error_log {p}/error.log;
pid {p}/nginx.pid;
events {{ worker_connections 256; }}
http {{
  access_log {p}/access.log;
  client_body_temp_path {p}/body;
  proxy_temp_path {p}/proxy;
  fastcgi_temp_path {p}/fastcgi;
  uwsgi_temp_path {p}/uwsgi;
  scgi_temp_path {p}/scgi;
  server {{
    listen 127.0.0.1:{port};
    root {root};
  }}
}}
"#,
                root = root.display()
            );
            let conf_path = dir.path().join("nginx.conf");
            std::fs::write(&conf_path, conf).unwrap();
            let mut child = Command::new(&bin)
                .arg("-c")
                .arg(&conf_path)
                .arg("-p")
                .arg(dir.path())
                .args(["-g", "daemon off;"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(Nginx {
                        child,
                        port,
                        dir,
                        root,
                    });
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("nginx would not start");
    }

    /// The URL of `name` under the root.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// Copies `src` into the root as `name`, replacing what was there (a new file: a new
    /// inode, so a new ETag and Last-Modified).
    pub fn publish(&self, src: &Path, name: &str) {
        // nginx's ETag is mtime and size: give every published file its own mtime, so that
        // a same-size replacement within a second still gets a new ETag.
        static PUBLISHED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = PUBLISHED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.root.join(format!(".{name}.tmp"));
        std::fs::copy(src, &tmp).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&tmp).unwrap();
        f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(10 * n))
            .unwrap();
        drop(f);
        std::fs::rename(&tmp, self.root.join(name)).unwrap();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
