//! The HTTP range storage against a real nginx on loopback, started here with a generated
//! configuration: VHDX and VHD images made by qemu-img/qemu-io read byte-exact through
//! vhdx-format/vhd-format over HTTP (against qemu-img's own raw conversion), an object replaced
//! on the server mid-use, a server that ignores ranges, bounded retries of a failing server,
//! and read-ahead counted in nginx's access log.
//!
//! Oracle rule: without nginx or qemu-img/qemu-io the tests fail when `CI=true`, else they print
//! a loud SKIP and pass. `bench_http_vs_curl` (ignored; `.ci/bench-remote-http` runs it in
//! release mode) compares sequential reads of a 1 GiB file with curl's.
#![cfg(feature = "remote")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use block_io::remote::{open_url, RemoteError, RemoteOptions, RemoteStorage};
use block_io::{BlockDevice, ErrorKind, Storage};

/// The binary `name` (looked up in PATH and /usr/sbin), or `None` after the oracle rule.
fn tool(name: &str) -> Option<PathBuf> {
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An nginx serving `root` on a free loopback port, stopped on drop. Besides the plain root:
/// `/norange/…` serves the same files ignoring Range (`max_ranges 0`), `/fail/…` answers 503,
/// `/moved/…` redirects (302) to the same file at the root.
struct Nginx {
    child: Child,
    port: u16,
    /// The same root over TLS, with a certificate for 127.0.0.1 signed by `ca_pem`.
    tls_port: u16,
    ca_pem: String,
    dir: tempfile::TempDir,
    root: PathBuf,
}

/// A fresh CA (PEM) and a server certificate and key (PEM) for 127.0.0.1 signed by it.
fn tls_material() -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "vdisk test CA");
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2040, 1, 1);
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = p.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(p, ca_key);
    let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    p.distinguished_name
        .push(DnType::CommonName, "image server");
    p.use_authority_key_identifier_extension = true;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2040, 1, 1);
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    (ca_pem, cert.pem(), key.serialize_pem())
}

impl Nginx {
    fn start() -> Option<Nginx> {
        let bin = tool("nginx")?;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(root.join("norange")).unwrap();
        let p = dir.path().display().to_string();
        // As root, the workers must stay root to read the private temp folder.
        // SAFETY: geteuid has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root;"
        } else {
            ""
        };
        let (ca_pem, cert_pem, key_pem) = tls_material();
        std::fs::write(dir.path().join("server.pem"), cert_pem).unwrap();
        std::fs::write(dir.path().join("server.key"), key_pem).unwrap();
        for _ in 0..5 {
            let port = free_port();
            let tls_port = free_port();
            let conf = format!(
                r#"worker_processes 1;
{user}
error_log {p}/error.log;
pid {p}/nginx.pid;
events {{ worker_connections 512; }}
http {{
  log_format rlog '$request_method $uri $status "$http_range" $msec $request_time b$body_bytes_sent c$connection';
  access_log {p}/access.log rlog;
  client_body_temp_path {p}/body;
  proxy_temp_path {p}/proxy;
  fastcgi_temp_path {p}/fastcgi;
  uwsgi_temp_path {p}/uwsgi;
  scgi_temp_path {p}/scgi;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  # Short, so that a test can see a kept-alive connection closed by the server.
  keepalive_timeout 2s;
  server {{
    listen 127.0.0.1:{port};
    root {root};
    location /norange/ {{ max_ranges 0; }}
    location /fail/ {{ return 503; }}
    location /moved/ {{ rewrite ^/moved/(.*)$ /$1 redirect; }}
  }}
  server {{
    listen 127.0.0.1:{tls_port} ssl;
    ssl_certificate {p}/server.pem;
    ssl_certificate_key {p}/server.key;
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
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok()
                    && TcpStream::connect(("127.0.0.1", tls_port)).is_ok()
                {
                    return Some(Nginx {
                        child,
                        port,
                        tls_port,
                        ca_pem,
                        dir,
                        root,
                    });
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port taken meanwhile, or a bad config: try again
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!(
                "nginx did not start: {}",
                std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
            );
        }
        panic!("nginx would not start");
    }

    fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    fn tls_url(&self, name: &str) -> String {
        format!("https://127.0.0.1:{}/{name}", self.tls_port)
    }

    /// The access log: one `METHOD URI STATUS "RANGE" MSEC TIME bBYTES cCONN` line per request.
    /// The access log's lines, once it has stopped growing for 25 ms (at most 1 s): nginx
    /// writes a request's line after the response has gone out, so a client can be done
    /// before its last line is there (a retry count once read 2 lines of 3).
    fn log(&self) -> Vec<String> {
        let read = || {
            std::fs::read_to_string(self.dir.path().join("access.log"))
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let mut last = read();
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(25));
            let now = read();
            if now.len() == last.len() {
                return now;
            }
            last = now;
        }
        last
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An image of `fmt` (`vhdx` or `vpc`) at `path`, 64 MiB, written by qemu-io in a few places
/// (crossing block boundaries, a partial block, a zeroed range), and its flattened raw copy made
/// by qemu-img. `None` without qemu (oracle rule).
fn make_image(fmt: &str, path: &Path) -> Option<Vec<u8>> {
    let qemu_img = tool("qemu-img")?;
    let qemu_io = tool("qemu-io")?;
    let mut create = Command::new(&qemu_img);
    create.args(["create", "-q", "-f", fmt]);
    if fmt == "vhdx" {
        create.args(["-o", "subformat=dynamic,block_size=1M"]);
    } else {
        create.args(["-o", "subformat=dynamic"]);
    }
    run(create.arg(path).arg("64M"));
    run(Command::new(&qemu_io).args(["-f", fmt]).arg(path).args([
        "-c",
        "write -P 0x5a 0 3M",
        "-c",
        "write -P 0xa5 3145216 70000",
        "-c",
        "write -P 0x11 10M 1536k",
        "-c",
        "write -P 0x22 33M 4096",
        "-c",
        "write -P 0x33 40000000 3000000",
        "-c",
        "write -z 1M 512k",
        "-c",
        "write -P 0x44 67043328 65536",
    ]));
    let raw = path.with_extension("raw");
    run(Command::new(&qemu_img)
        .args(["convert", "-f", fmt, "-O", "raw"])
        .arg(path)
        .arg(&raw));
    Some(std::fs::read(&raw).unwrap())
}

/// Reads the whole of `dev` in `chunk`-sized reads.
fn read_all(dev: &dyn BlockDevice, chunk: usize) -> Vec<u8> {
    let size = dev.info().virtual_size as usize;
    let mut out = vec![0u8; size];
    for (i, c) in out.chunks_mut(chunk).enumerate() {
        dev.read_at(c, (i * chunk) as u64).unwrap();
    }
    out
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i}");
    }
}

#[test]
fn vhdx_and_vhd_over_http_read_byte_exact() {
    let Some(ng) = Nginx::start() else { return };
    let Some(vhdx_raw) = make_image("vhdx", &ng.root.join("base.vhdx")) else {
        return;
    };
    let Some(vhd_raw) = make_image("vpc", &ng.root.join("base.vhd")) else {
        return;
    };

    let (st, id) = open_url(&ng.url("base.vhdx")).unwrap();
    let local_len = std::fs::metadata(ng.root.join("base.vhdx")).unwrap().len();
    assert_eq!(id.size, local_len);
    assert_eq!(st.len().unwrap(), local_len);
    assert!(id.etag.is_some() && id.last_modified.is_some(), "{id}");
    let vhdx =
        vhdx_format::VhdxFile::open(st.clone(), &vhdx_format::OpenOptions::new().read_only(true))
            .unwrap();
    assert_same(&read_all(&vhdx, 1 << 20), &vhdx_raw, "vhdx, 1 MiB reads");
    assert_same(&read_all(&vhdx, 12288 + 512), &vhdx_raw, "vhdx, odd reads");
    // The container bytes themselves, too.
    let local = std::fs::read(ng.root.join("base.vhdx")).unwrap();
    let mut remote = vec![0u8; local.len()];
    st.read_at(&mut remote, 0).unwrap();
    assert_same(&remote, &local, "vhdx container");
    assert_eq!(
        st.write_at(b"x", 0).unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    assert!(vhdx.write_at(&[0u8; 512], 0).is_err());

    let (st, _) = open_url(&ng.url("base.vhd")).unwrap();
    let vhd =
        vhd_format::VhdFile::open(st, &vhd_format::OpenOptions::new().read_only(true)).unwrap();
    assert_same(&read_all(&vhd, 1 << 20), &vhd_raw, "vhd, 1 MiB reads");
    assert_same(&read_all(&vhd, 4096 * 3), &vhd_raw, "vhd, 12 KiB reads");

    // Every request after the opening HEADs was a ranged GET answered 206.
    for line in ng.log() {
        assert!(
            line.starts_with("HEAD ") && line.contains(" 200 ")
                || line.starts_with("GET ") && line.contains(" 206 \"bytes="),
            "{line}"
        );
    }
}

fn set_mtime(path: &Path, t: SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[test]
fn an_object_replaced_on_the_server_is_detected() {
    let Some(ng) = Nginx::start() else { return };
    let Some(raw) = make_image("vhdx", &ng.root.join("img.vhdx")) else {
        return;
    };
    let path = ng.root.join("img.vhdx");
    let opts = {
        let mut o = RemoteOptions::default();
        o.readahead = 0;
        o
    };
    let st = Arc::new(RemoteStorage::open(&ng.url("img.vhdx"), &opts).unwrap());
    let vhdx =
        vhdx_format::VhdxFile::open(st.clone(), &vhdx_format::OpenOptions::new().read_only(true))
            .unwrap();
    let mut buf = vec![0u8; 65536];
    vhdx.read_at(&mut buf, 0).unwrap();
    assert_same(&buf, &raw[..65536], "before the change");

    // Replace it with another image of the same size, as a deployment would (write, rename).
    let new = ng.root.join("img.new");
    std::fs::copy(&path, &new).unwrap();
    {
        let mut f = std::fs::File::options().write(true).open(&new).unwrap();
        f.write_all(&[0xeeu8; 4096]).unwrap();
    }
    set_mtime(
        &new,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000),
    );
    std::fs::rename(&new, &path).unwrap();

    // A read that needs the server fails with the typed error...
    // (The last block qemu-io wrote is the file's last: neither open nor the read above
    // touched it, so it is not cached.)
    let e = vhdx.read_at(&mut buf, 67043328).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:?}");
    match RemoteError::find(&e) {
        Some(RemoteError::Changed { url, .. }) => assert!(url.ends_with("img.vhdx")),
        other => panic!("wrong error {other:?} in {e:?}"),
    }
    // ... and so does every later one, even one the cache could answer.
    let e = vhdx.read_at(&mut buf, 0).unwrap_err();
    assert!(matches!(
        RemoteError::find(&e),
        Some(RemoteError::Changed { .. })
    ));
    // A fresh open sees the new version.
    let (_, id2) = open_url(&ng.url("img.vhdx")).unwrap();
    assert_ne!(id2.etag, st.identity().etag);

    // A shorter replacement (a different size) is caught the same way on a fresh storage.
    let st = RemoteStorage::open(&ng.url("img.vhdx"), &opts).unwrap();
    let mut b = [0u8; 16];
    st.read_at(&mut b, 0).unwrap();
    std::fs::write(&new, vec![1u8; 400 * 1024]).unwrap();
    std::fs::rename(&new, &path).unwrap();
    let e = st.read_at(&mut b, 2 << 20).unwrap_err();
    assert!(
        matches!(RemoteError::find(&e), Some(RemoteError::Changed { .. })),
        "{e:?}"
    );
}

#[test]
fn https_with_a_private_ca() {
    let Some(ng) = Nginx::start() else { return };
    let Some(raw) = make_image("vpc", &ng.root.join("tls.vhd")) else {
        return;
    };
    // Not signed by a CA the system trusts: refused.
    let e = RemoteStorage::open(&ng.tls_url("tls.vhd"), &RemoteOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e:?}");
    assert!(
        matches!(RemoteError::find(&e), Some(RemoteError::Transport { .. })),
        "{e:?}"
    );
    // With the CA: the image reads byte-exact over TLS.
    let mut opts = RemoteOptions::default();
    opts.ca_pem = Some(ng.ca_pem.clone().into_bytes());
    let st = Arc::new(RemoteStorage::open(&ng.tls_url("tls.vhd"), &opts).unwrap());
    let vhd =
        vhd_format::VhdFile::open(st.clone(), &vhd_format::OpenOptions::new().read_only(true))
            .unwrap();
    assert_same(&read_all(&vhd, 1 << 20), &raw, "vhd over https");
    assert!(st.stats().requests > 0);
    // TLS is read through the cache: direct streams are for plain http:// only.
    assert_eq!(st.stats().stream_requests, 0);
    // Garbage for a CA is a configuration error.
    opts.ca_pem =
        Some(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n".to_vec());
    let e = RemoteStorage::open(&ng.tls_url("tls.vhd"), &opts).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e:?}");
}

#[test]
fn a_server_that_ignores_ranges_is_refused() {
    let Some(ng) = Nginx::start() else { return };
    std::fs::write(ng.root.join("norange/x.raw"), vec![7u8; 3 << 20]).unwrap();
    // Sanity: the plain location serves it by ranges.
    std::fs::copy(ng.root.join("norange/x.raw"), ng.root.join("x.raw")).unwrap();
    let (st, _) = open_url(&ng.url("x.raw")).unwrap();
    let mut b = [0u8; 10];
    st.read_at(&mut b, 2 << 20).unwrap();
    assert_eq!(b, [7u8; 10]);

    let e = match open_url(&ng.url("norange/x.raw")) {
        Err(e) => e,
        Ok((st, _)) => st.read_at(&mut b, 0).unwrap_err(),
    };
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e:?}");
    assert!(
        matches!(
            RemoteError::find(&e),
            Some(RemoteError::RangesIgnored { status: 200, .. })
        ),
        "{e:?}"
    );
    assert!(e.chain_string().contains("ignores range requests"));
}

#[test]
fn failures_are_retried_a_bounded_number_of_times() {
    let Some(ng) = Nginx::start() else { return };
    let mut opts = RemoteOptions::default();
    opts.retries = 2;
    opts.retry_delay = Duration::from_millis(5);
    let e = RemoteStorage::open(&ng.url("fail/x.raw"), &opts).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    assert!(matches!(
        RemoteError::find(&e),
        Some(RemoteError::Status { status: 503, .. })
    ));
    let tries = ng.log().iter().filter(|l| l.contains("/fail/")).count();
    assert_eq!(tries, 3, "{:?}", ng.log());

    let e = RemoteStorage::open(&ng.url("missing.vhdx"), &opts).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e:?}");
    for bad in [
        "httpx://127.0.0.1/a",
        "ftp://127.0.0.1/a",
        "not a url",
        "/srv/a.vhdx",
    ] {
        let e = RemoteStorage::open(bad, &opts).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad}: {e:?}");
        assert!(matches!(
            RemoteError::find(&e),
            Some(RemoteError::BadUrl { .. })
        ));
    }
    // Nothing listens there: a transport error after the bounded retries.
    let e = RemoteStorage::open(&format!("http://127.0.0.1:{}/a", free_port()), &opts);
    assert!(matches!(
        RemoteError::find(&e.unwrap_err()),
        Some(RemoteError::Transport { .. })
    ),);
}

/// A TCP relay to `port` standing for a flaky link: while `cuts` is above zero, a connection
/// whose answer passes 64 KiB is cut there (both sides closed) and `cuts` counts down.
fn flaky_relay(port: u16, cuts: Arc<std::sync::atomic::AtomicU32>) -> u16 {
    use std::io::Read;
    use std::sync::atomic::Ordering;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in l.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(("127.0.0.1", port)) else {
                return;
            };
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut s_out);
                let _ = s_out.shutdown(std::net::Shutdown::Write);
            });
            let cuts = cuts.clone();
            std::thread::spawn(move || {
                let (mut s_in, mut c_out) = (server, client);
                let mut buf = vec![0u8; 16384];
                let mut passed = 0usize;
                loop {
                    let n = match s_in.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    passed += n;
                    if passed > 65536
                        && cuts
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
                            .is_ok()
                    {
                        break;
                    }
                    if c_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = c_out.shutdown(std::net::Shutdown::Both);
                let _ = s_in.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    relay_port
}

#[test]
fn responses_cut_mid_body_are_retried() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let Some(ng) = Nginx::start() else { return };
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i * 13 % 241) as u8).collect();
    std::fs::write(ng.root.join("cut.raw"), &data).unwrap();
    let cuts = Arc::new(AtomicU32::new(0));
    let relay = flaky_relay(ng.port, cuts.clone());
    let url = format!("http://127.0.0.1:{relay}/cut.raw");
    let mut opts = RemoteOptions::default();
    opts.readahead = 0;
    opts.retry_delay = Duration::from_millis(5);
    // The cache's retries are tested here; direct streams in `direct_streams_...`.
    opts.stream_reads = false;
    let st = RemoteStorage::open(&url, &opts).unwrap();

    // Two answers cut short in a row: the third try delivers the rest, byte-exact.
    cuts.store(2, Ordering::SeqCst);
    let mut buf = vec![0u8; 1 << 20];
    st.read_at(&mut buf, 1 << 20).unwrap();
    assert_same(&buf, &data[1 << 20..2 << 20], "after two cuts");
    assert_eq!(cuts.load(Ordering::SeqCst), 0);
    // Each retry asked only for what had not arrived yet.
    let tries: Vec<(u64, u64)> = ng
        .log()
        .iter()
        .filter(|l| l.starts_with("GET /cut.raw"))
        .filter_map(|l| range_of(l.as_str()))
        .collect();
    assert_eq!(tries.len(), 3, "{:?}", ng.log());
    assert_eq!(tries[0], (1 << 20, (2 << 20) - 1));
    assert!(
        tries
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[1].1 == (2 << 20) - 1),
        "{tries:?}"
    );

    // More cuts than retries: a clean error, and nothing cached from the broken answers.
    opts.retries = 1;
    let st = RemoteStorage::open(&url, &opts).unwrap();
    cuts.store(5, Ordering::SeqCst);
    let e = st.read_at(&mut buf, 2 << 20).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io, "{e:?}");
    assert!(
        matches!(
            RemoteError::find(&e),
            Some(RemoteError::Truncated { .. } | RemoteError::Transport { .. })
        ),
        "{e:?}"
    );
    cuts.store(0, Ordering::SeqCst);
    st.read_at(&mut buf, 2 << 20).unwrap();
    assert_same(&buf, &data[2 << 20..3 << 20], "after the failure");
}

/// Parses a log line's `"bytes=A-B"` into (A, B).
fn range_of(line: &str) -> Option<(u64, u64)> {
    let r = line.split("\"bytes=").nth(1)?.split('"').next()?;
    let (a, b) = r.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[test]
fn sequential_reads_are_read_ahead() {
    let Some(ng) = Nginx::start() else { return };
    const MIB: u64 = 1 << 20;
    let data: Vec<u8> = (0..32 * MIB).map(|i| (i * 31 % 253) as u8).collect();
    std::fs::write(ng.root.join("seq.raw"), &data).unwrap();
    let mut opts = RemoteOptions::default();
    opts.block_size = MIB as usize;
    opts.readahead = 4;
    opts.request_blocks = 4;
    // The cache's read-ahead is tested here (its 256 KiB reads would take direct streams).
    opts.stream_reads = false;
    let st = RemoteStorage::open(&ng.url("seq.raw"), &opts).unwrap();

    // 16 reads of 256 KiB: the first 4 MiB.
    let mut buf = vec![0u8; 256 << 10];
    for i in 0..16u64 {
        st.read_at(&mut buf, i * (256 << 10)).unwrap();
        assert_same(
            &buf,
            &data[(i * (256 << 10)) as usize..][..buf.len()],
            "seq",
        );
    }
    // Block 0 came on demand; once the reads had covered a block, blocks 1-4 were fetched
    // ahead in one request (`request_blocks` 4); the window is topped up 4 blocks at a time,
    // so blocks 2-3 cost nothing more. Let the read-ahead land.
    let deadline = Instant::now() + Duration::from_secs(10);
    while st.stats().bytes < 5 * MIB && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = st.stats();
    assert_eq!(
        (s.fetches, s.requests, s.readahead, s.misses),
        (5, 2, 4, 1),
        "{s:?}"
    );
    let mut ranges: Vec<(u64, u64)> = ng
        .log()
        .iter()
        .filter(|l| l.starts_with("GET /seq.raw 206"))
        .filter_map(|l| range_of(l.as_str()))
        .collect();
    ranges.sort();
    assert_eq!(ranges, [(0, MIB - 1), (MIB, 5 * MIB - 1)]);

    // Reading on through the prefetched blocks needs no demand fetch.
    let misses = st.stats().misses;
    for i in 16..64u64 {
        st.read_at(&mut buf, i * (256 << 10)).unwrap();
        assert_same(
            &buf,
            &data[(i * (256 << 10)) as usize..][..buf.len()],
            "seq",
        );
    }
    assert_eq!(st.stats().misses, misses);
    let s = st.stats();
    assert!(s.requests * 3 <= s.fetches, "{s:?}");

    // Random reads fetch only what they touch.
    let st = RemoteStorage::open(&ng.url("seq.raw"), &opts).unwrap();
    for blk in [20u64, 3, 27, 11] {
        st.read_at(&mut buf, blk * MIB + 4096).unwrap();
        assert_same(
            &buf,
            &data[(blk * MIB + 4096) as usize..][..buf.len()],
            "rnd",
        );
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(st.stats().fetches, 4);
    assert_eq!(st.stats().readahead, 0);
}

/// The body bytes nginx sent for the requests of `uri`, once it has logged `n` of them.
fn bytes_sent(ng: &Nginx, uri: &str, n: usize) -> u64 {
    let prefix = format!("GET {uri} ");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<String> = ng
            .log()
            .into_iter()
            .filter(|l| l.starts_with(&prefix))
            .collect();
        if lines.len() >= n || Instant::now() > deadline {
            assert_eq!(lines.len(), n, "{lines:?}");
            return lines
                .iter()
                .filter_map(|l| l.split(" b").nth(1)?.split(' ').next()?.parse::<u64>().ok())
                .sum();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn large_sequential_reads_stream_past_the_cache() {
    let Some(ng) = Nginx::start() else { return };
    const MIB: u64 = 1 << 20;
    let data: Vec<u8> = (0..40 * MIB).map(|i| (i * 29 % 251) as u8).collect();
    std::fs::write(ng.root.join("dir.raw"), &data).unwrap();
    let st = RemoteStorage::open(&ng.url("dir.raw"), &RemoteOptions::default()).unwrap();

    // 1 MiB reads from 0 to the end. The first goes through the cache; the second continues
    // it, so the run takes a direct stream: ranges of 4, 8, 16 MiB, then the 11 MiB left.
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..40u64 {
        st.read_at(&mut buf, i * MIB).unwrap();
        assert_same(&buf, &data[(i * MIB) as usize..][..buf.len()], "sequential");
    }
    let s = st.stats();
    assert_eq!((s.fetches, s.readahead), (1, 0), "{s:?}");
    assert_eq!((s.stream_requests, s.stream_bytes), (4, 39 * MIB), "{s:?}");
    bytes_sent(&ng, "/dir.raw", 5);
    let ranges: Vec<(u64, u64)> = ng
        .log()
        .iter()
        .filter(|l| l.starts_with("GET /dir.raw 206"))
        .filter_map(|l| range_of(l.as_str()))
        .collect();
    assert_eq!(
        ranges,
        [
            (0, MIB - 1),
            (MIB, 5 * MIB - 1),
            (5 * MIB, 13 * MIB - 1),
            (13 * MIB, 29 * MIB - 1),
            (29 * MIB, 40 * MIB - 1)
        ]
    );
    // The ranges of a run share one kept-alive connection (after the HEAD and the first GET).
    let conns: std::collections::BTreeSet<String> = ng
        .log()
        .iter()
        .skip(2)
        .filter_map(|l| l.rsplit(' ').next().map(str::to_owned))
        .collect();
    assert_eq!(conns.len(), 1, "{:?}", ng.log());

    // Two interleaved readers, one of them through scattered raw buffers, 192 KiB a read:
    // each run goes through the cache until it spans a block (five reads), then gets its own
    // stream, byte-exact.
    let st = RemoteStorage::open(&ng.url("dir.raw"), &RemoteOptions::default()).unwrap();
    let (mut a, mut b1, mut b2) = (
        vec![0u8; 192 << 10],
        vec![0u8; 100 << 10],
        vec![0u8; 92 << 10],
    );
    let step = 192u64 << 10;
    for i in 0..40u64 {
        let (oa, ob) = (i * step, 20 * MIB + i * step);
        st.read_at(&mut a, oa).unwrap();
        assert_same(&a, &data[oa as usize..][..a.len()], "reader A");
        let bufs = [
            block_io::RawBuf {
                ptr: b1.as_mut_ptr(),
                len: b1.len(),
            },
            block_io::RawBuf {
                ptr: b2.as_mut_ptr(),
                len: b2.len(),
            },
        ];
        // SAFETY: both buffers are ours and live across the call.
        unsafe { st.read_raw_at(&bufs, ob) }.unwrap();
        assert_same(
            &b1,
            &data[ob as usize..][..b1.len()],
            "reader B, first buffer",
        );
        assert_same(
            &b2,
            &data[ob as usize + b1.len()..][..b2.len()],
            "reader B, second",
        );
    }
    let s = st.stats();
    assert_eq!(s.fetches, 2, "{s:?}");
    assert_eq!(s.stream_bytes, 2 * 35 * step, "{s:?}");

    // Turned off, the same reads go through the cache.
    let mut opts = RemoteOptions::default();
    opts.stream_reads = false;
    let st = RemoteStorage::open(&ng.url("dir.raw"), &opts).unwrap();
    for i in 0..8u64 {
        st.read_at(&mut buf, i * MIB).unwrap();
        assert_same(&buf, &data[(i * MIB) as usize..][..buf.len()], "cached");
    }
    assert_eq!(st.stats().stream_requests, 0);
}

#[test]
fn random_reads_fetch_little_more_than_they_read() {
    let Some(ng) = Nginx::start() else { return };
    const MIB: u64 = 1 << 20;
    let data: Vec<u8> = (0..64 * MIB).map(|i| (i * 37 % 247) as u8).collect();
    std::fs::write(ng.root.join("rnd.raw"), &data).unwrap();
    let st = RemoteStorage::open(&ng.url("rnd.raw"), &RemoteOptions::default()).unwrap();
    // 48 reads of 256 KiB at scattered offsets (a fixed LCG), none continuing another.
    let mut buf = vec![0u8; 256 << 10];
    let mut x = 12345u64;
    let mut read = 0u64;
    for _ in 0..48 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 20) % (64 * MIB - buf.len() as u64);
        st.read_at(&mut buf, off).unwrap();
        assert_same(&buf, &data[off as usize..][..buf.len()], "random");
        read += buf.len() as u64;
    }
    let s = st.stats();
    assert_eq!((s.readahead, s.stream_requests), (0, 0), "{s:?}");
    drop(st);
    // Each read fetched its 1 MiB block (or two), some already cached: at most 8x what it
    // read, and no read-ahead or stream on top.
    assert!(s.fetches <= 2 * 48, "{s:?}");
    let sent = bytes_sent(&ng, "/rnd.raw", s.requests as usize);
    assert!(sent <= 8 * read, "{sent} bytes sent for {read} read");
    assert_eq!(sent, s.bytes, "{s:?}");

    // A run that stops after two reads: its stream asked for 4 MiB, and nginx sent no more.
    let st = RemoteStorage::open(&ng.url("rnd.raw"), &RemoteOptions::default()).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for off in [10 * MIB, 11 * MIB] {
        st.read_at(&mut buf, off).unwrap();
        assert_same(&buf, &data[off as usize..][..buf.len()], "short run");
    }
    assert_eq!(st.stats().stream_requests, 1);
    drop(st);
    // Its two GETs: block 10 for the first read, the stream's range for the second.
    let sent = bytes_sent(&ng, "/rnd.raw", s.requests as usize + 2) - s.bytes;
    assert!(sent <= 5 * MIB, "{sent}");
}

/// `threads` readers taking `chunk`-sized pieces of `data` (served as `name`) in order from a
/// shared counter, as a copy with several requests in flight reads; each piece is checked.
fn parallel_read(st: &RemoteStorage, data: &[u8], threads: usize, chunk: usize) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; chunk];
                loop {
                    let off = next.fetch_add(chunk, Ordering::Relaxed);
                    if off >= data.len() {
                        break;
                    }
                    let n = chunk.min(data.len() - off);
                    st.read_at(&mut buf[..n], off as u64).unwrap();
                    assert_same(&buf[..n], &data[off..off + n], "parallel");
                }
            });
        }
    });
}

#[test]
fn readers_with_several_requests_in_flight_fetch_each_byte_about_once() {
    let Some(ng) = Nginx::start() else { return };
    const MIB: usize = 1 << 20;
    let data: Vec<u8> = (0..64 * MIB).map(|i| (i * 13 % 251) as u8).collect();
    std::fs::write(ng.root.join("par.raw"), &data).unwrap();
    let mut gets = 0;
    for (threads, chunk) in [(8, 4 * MIB), (8, MIB), (4, 256 << 10)] {
        let st = RemoteStorage::open(&ng.url("par.raw"), &RemoteOptions::default()).unwrap();
        parallel_read(&st, &data, threads, chunk);
        let s = st.stats();
        drop(st);
        // Every GET of this round logged: streams dropped mid-range are logged once nginx sees
        // their connections closed, so wait for the log to settle.
        let mut lines: Vec<String> = Vec::new();
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(100));
            let now: Vec<String> = ng
                .log()
                .into_iter()
                .filter(|l| l.starts_with("GET /par.raw "))
                .collect();
            if now.len() == lines.len() {
                break;
            }
            lines = now;
        }
        let sent: u64 = lines[gets..]
            .iter()
            .filter_map(|l| l.split(" b").nth(1)?.split(' ').next()?.parse::<u64>().ok())
            .sum();
        gets = lines.len();
        eprintln!("{threads} x {chunk}: {s:?}, nginx sent {sent}");
        // Direct streams are for readers with one read at a time; these share the cache,
        // which fetches each block once (a stream may start before the reads overlap).
        assert!(
            sent <= data.len() as u64 * 3 / 2,
            "{threads} x {chunk}: {sent} sent, {s:?}"
        );
    }
}

#[test]
fn a_kept_alive_stream_closed_by_the_server_reconnects() {
    let Some(ng) = Nginx::start() else { return };
    const MIB: u64 = 1 << 20;
    let data: Vec<u8> = (0..12 * MIB).map(|i| (i * 17 % 241) as u8).collect();
    std::fs::write(ng.root.join("idle.raw"), &data).unwrap();
    let st = RemoteStorage::open(&ng.url("idle.raw"), &RemoteOptions::default()).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    // Reads 0-4: the stream's first range (1-5 MiB) is read to its end.
    for i in 0..5u64 {
        st.read_at(&mut buf, i * MIB).unwrap();
    }
    assert_eq!(st.stats().stream_requests, 1);
    // nginx closes the idle connection after 2 s; the next range goes on a new one.
    std::thread::sleep(Duration::from_millis(3000));
    for i in 5..12u64 {
        st.read_at(&mut buf, i * MIB).unwrap();
        assert_same(
            &buf,
            &data[(i * MIB) as usize..][..buf.len()],
            "after idling",
        );
    }
    let s = st.stats();
    assert_eq!((s.stream_requests, s.fetches), (2, 1), "{s:?}");
    bytes_sent(&ng, "/idle.raw", 3);
    let conns: std::collections::BTreeSet<String> = ng
        .log()
        .iter()
        .skip(2)
        .filter_map(|l| l.rsplit(' ').next().map(str::to_owned))
        .collect();
    assert_eq!(conns.len(), 2, "{:?}", ng.log());
}

#[test]
fn a_redirecting_url_turns_direct_streams_off() {
    let Some(ng) = Nginx::start() else { return };
    const MIB: u64 = 1 << 20;
    let data: Vec<u8> = (0..8 * MIB).map(|i| (i * 11 % 239) as u8).collect();
    std::fs::write(ng.root.join("moved.raw"), &data).unwrap();
    // reqwest follows the redirect; the direct stream's request is answered 302, which that
    // small client does not follow: the cache serves the read and the storage from then on.
    let st = RemoteStorage::open(&ng.url("moved/moved.raw"), &RemoteOptions::default()).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..8u64 {
        st.read_at(&mut buf, i * MIB).unwrap();
        assert_same(&buf, &data[(i * MIB) as usize..][..buf.len()], "redirected");
    }
    let s = st.stats();
    assert_eq!((s.stream_requests, s.stream_bytes), (1, 0), "{s:?}");
    assert!(s.readahead > 0, "{s:?}");
}

#[test]
fn direct_streams_cut_mid_body_fall_back_to_the_cache() {
    use std::sync::atomic::{AtomicU32, Ordering};
    let Some(ng) = Nginx::start() else { return };
    const MIB: u64 = 1 << 20;
    let data: Vec<u8> = (0..16 * MIB).map(|i| (i * 19 % 239) as u8).collect();
    std::fs::write(ng.root.join("cut.raw"), &data).unwrap();
    let cuts = Arc::new(AtomicU32::new(0));
    let relay = flaky_relay(ng.port, cuts.clone());
    let mut opts = RemoteOptions::default();
    opts.retry_delay = Duration::from_millis(5);
    let st = RemoteStorage::open(&format!("http://127.0.0.1:{relay}/cut.raw"), &opts).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    st.read_at(&mut buf, 0).unwrap();
    // The stream of the second read is cut after 64 KiB: the cache (whose own first try is
    // cut too) serves the rest of the read, byte-exact; the next read streams again.
    cuts.store(2, Ordering::SeqCst);
    for i in 1..16u64 {
        st.read_at(&mut buf, i * MIB).unwrap();
        assert_same(
            &buf,
            &data[(i * MIB) as usize..][..buf.len()],
            "after a cut",
        );
    }
    assert_eq!(cuts.load(Ordering::SeqCst), 0);
    let s = st.stats();
    assert!(
        s.stream_requests >= 2 && s.stream_bytes >= 12 * MIB,
        "{s:?}"
    );
}

#[test]
fn an_object_replaced_under_a_direct_stream_is_detected() {
    let Some(ng) = Nginx::start() else { return };
    const MIB: u64 = 1 << 20;
    let path = ng.root.join("swap.raw");
    let data: Vec<u8> = (0..16 * MIB).map(|i| (i * 23 % 233) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let st = RemoteStorage::open(&ng.url("swap.raw"), &RemoteOptions::default()).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..3u64 {
        st.read_at(&mut buf, i * MIB).unwrap();
    }
    assert_eq!(st.stats().stream_requests, 1);
    let new = ng.root.join("swap.new");
    std::fs::write(&new, vec![0xeeu8; 16 * MIB as usize]).unwrap();
    set_mtime(
        &new,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000),
    );
    std::fs::rename(&new, &path).unwrap();
    // The range in flight (bytes 1-5 MiB) is nginx's open file, the old version; the next
    // range is refused by If-Match. No read returns new bytes.
    let mut failed = None;
    for i in 3..16u64 {
        match st.read_at(&mut buf, i * MIB) {
            Ok(()) => assert_same(&buf, &data[(i * MIB) as usize..][..buf.len()], "old bytes"),
            Err(e) => {
                failed = Some((i, e));
                break;
            }
        }
    }
    let (i, e) = failed.expect("the change went unnoticed");
    assert_eq!(i, 5, "{e:?}");
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e:?}");
    assert!(matches!(
        RemoteError::find(&e),
        Some(RemoteError::Changed { .. })
    ));
    // Latched: even a read the cache could answer fails.
    assert_eq!(
        st.read_at(&mut buf, 0).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
}

/// User plus system CPU seconds of `who` (`RUSAGE_SELF` or `RUSAGE_CHILDREN`).
fn cpu_seconds(who: libc::c_int) -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `who` is one of the two documented values.
    unsafe { libc::getrusage(who, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Minor page faults of this process so far.
fn minor_faults() -> i64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_minflt
}

/// The median of `v` (not empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Sequential reads of a 1 GiB file through the HTTP storage against `curl -o /dev/null` of the
/// same URL, in one run; prints the ratios (target: at least 0.7x curl). Run by
/// `.ci/bench-remote-http` (release mode). Cases: `direct` (the default options: large
/// sequential reads stream straight into the reader's buffer), `cached` (`stream_reads` off:
/// the block cache with read-ahead) and `https` (TLS, which always goes through the cache;
/// curl checks the same private CA). Each repetition runs curl and then ours, alternating, so
/// both see the same load; best and median are printed. `VDISK_BENCH_REPS` (or `BENCH_REPS`,
/// default 3) sets the repetitions, `VDISK_BENCH_CASES` (e.g. `direct,cached`) the cases,
/// `VDISK_BENCH_MIB` the size, `VDISK_BENCH_BLOCK_KIB`, `VDISK_BENCH_READAHEAD`,
/// `VDISK_BENCH_REQUEST_BLOCKS` and `VDISK_BENCH_READ_KIB` the geometry.
#[test]
#[ignore]
fn bench_http_vs_curl() {
    let Some(ng) = Nginx::start() else { return };
    let Some(curl) = tool("curl") else { return };
    let env = |k: &str| std::env::var(k).ok().and_then(|s| s.parse::<usize>().ok());
    let mib = env("VDISK_BENCH_MIB").unwrap_or(1024) as u64;
    let reps = env("VDISK_BENCH_REPS")
        .or_else(|| env("BENCH_REPS"))
        .unwrap_or(3)
        .max(1);
    let cases = std::env::var("VDISK_BENCH_CASES").unwrap_or("direct,cached,https".into());
    let size = mib << 20;
    {
        let f = std::fs::File::create(ng.root.join("big.raw")).unwrap();
        let mut w = std::io::BufWriter::with_capacity(4 << 20, f);
        let mut block = vec![0u8; 1 << 20];
        for i in 0..mib {
            block.iter_mut().enumerate().for_each(|(j, b)| {
                *b = (j as u64 ^ i.wrapping_mul(0x9e37_79b9)) as u8;
            });
            w.write_all(&block).unwrap();
        }
        w.flush().unwrap();
    }
    // Warm the page cache so both readers see the same server.
    {
        let mut f = std::fs::File::open(ng.root.join("big.raw")).unwrap();
        let mut b = vec![0u8; 1 << 20];
        while std::io::Read::read(&mut f, &mut b).unwrap() > 0 {}
    }
    let ca_path = ng.dir.path().join("ca.pem");
    std::fs::write(&ca_path, &ng.ca_pem).unwrap();
    let mut base = RemoteOptions::default();
    if let Some(kib) = env("VDISK_BENCH_BLOCK_KIB") {
        base.block_size = kib << 10;
    }
    if let Some(n) = env("VDISK_BENCH_READAHEAD") {
        base.readahead = n;
    }
    if let Some(n) = env("VDISK_BENCH_REQUEST_BLOCKS") {
        base.request_blocks = n;
    }
    let read_kib = env("VDISK_BENCH_READ_KIB").unwrap_or(1024);
    let rate = |s: f64| size as f64 / s / (1u64 << 20) as f64;
    for case in cases.split(',') {
        let mut opts = base.clone();
        let (url, curl_args) = match case {
            "direct" => (ng.url("big.raw"), vec![]),
            "cached" => {
                opts.stream_reads = false;
                (ng.url("big.raw"), vec![])
            }
            "https" => {
                opts.ca_pem = Some(ng.ca_pem.clone().into_bytes());
                let ca = ca_path.display().to_string();
                (ng.tls_url("big.raw"), vec!["--cacert".to_string(), ca])
            }
            other => panic!("unknown case {other}"),
        };
        let log_before = ng.log().len();
        let (mut curl_t, mut ours_t, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let (mut curl_cpu, mut ours_cpu, mut faults) = (f64::MAX, f64::MAX, i64::MAX);
        let mut stats = None;
        for _ in 0..reps {
            let c0 = cpu_seconds(libc::RUSAGE_CHILDREN);
            let t = Instant::now();
            run(Command::new(&curl)
                .args(["-s", "-f", "-o", "/dev/null"])
                .args(&curl_args)
                .arg(&url));
            let ct = t.elapsed().as_secs_f64();
            curl_cpu = curl_cpu.min(cpu_seconds(libc::RUSAGE_CHILDREN) - c0);
            let c0 = cpu_seconds(libc::RUSAGE_SELF);
            let f0 = minor_faults();
            let t = Instant::now();
            let st = RemoteStorage::open(&url, &opts).unwrap();
            let mut buf = vec![0u8; read_kib << 10];
            let mut off = 0;
            while off < size {
                let n = buf.len().min((size - off) as usize);
                st.read_at(&mut buf[..n], off).unwrap();
                off += n as u64;
            }
            let ot = t.elapsed().as_secs_f64();
            ours_cpu = ours_cpu.min(cpu_seconds(libc::RUSAGE_SELF) - c0);
            faults = faults.min(minor_faults() - f0);
            stats = Some(st.stats());
            curl_t.push(ct);
            ours_t.push(ot);
            ratios.push(ct / ot);
        }
        let log = ng.log();
        let gets: Vec<&String> = log[log_before..]
            .iter()
            .filter(|l| l.starts_with("GET /big.raw 206"))
            .collect();
        let conns: std::collections::BTreeSet<&str> =
            gets.iter().filter_map(|l| l.rsplit(' ').next()).collect();
        if std::env::var_os("VDISK_BENCH_LOG").is_some() {
            for l in log.iter().rev().take(40).rev() {
                println!("{l}");
            }
        }
        let best = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
        let ratio_list: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        println!(
            "remote-http {case}: {mib} MiB sequential, {read_kib} KiB reads, {reps} reps: \
             curl {:.0} MiB/s, ours {:.0} MiB/s (best); ratio per rep {} => median {:.2}x curl \
             (target >= 0.70); CPU (least) curl {curl_cpu:.3} s, ours {ours_cpu:.3} s, \
             {faults} page faults; {} ranged GETs over {} connections; last {:?}",
            rate(best(&curl_t)),
            rate(best(&ours_t)),
            ratio_list.join(" "),
            median(ratios.clone()),
            gets.len(),
            conns.len(),
            stats.unwrap_or_default(),
        );
    }
}
