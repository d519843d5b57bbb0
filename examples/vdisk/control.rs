//! `vdisk serve --control PATH`: a control socket beside a served disk, through which the
//! online operations of `meta_ops` run while the VM keeps using the disk (what QEMU's monitor
//! does with `block_resize`, `block-commit`, `blockdev-mirror`, `block-job-*`), and
//! `vdisk control PATH COMMAND...`, its client.
//!
//! The protocol is one request per line, words separated by blanks, and one JSON object per
//! reply line, `{"ok":true,...}` or `{"ok":false,"error":"..."}`; any Unix-socket client
//! (`socat - UNIX-CONNECT:PATH`) can speak it. The socket is created mode 0600.
//!
//! | request | what it does |
//! |---|---|
//! | `info` | size, format, image, guest request counters, the job's progress |
//! | `resize [+\|-]SIZE [shrink] [force]` | online resize of the top image; the guest is told the new capacity (virtio config change) |
//! | `commit [rate=R]` | starts folding the top into its parent; the guest ends on the parent |
//! | `compact [rate=R]` | starts returning the top's unused space (VHD/VHDX, `--cache writeback`) |
//! | `convert FORMAT PATH [layers] [rate=R]` | starts an online convert into a new image; the guest moves to it at the pivot. With `layers` (VHD or VHDX) the chain keeps its layers: the parents are converted first (the request waits), named as `vdisk convert --keep-layers` names them, then the top's job copies only what the top holds |
//! | `backup FORMAT PATH [rate=R]` | starts a point-in-time copy into a new image; the guest stays |
//! | `mirror nbd://HOST:PORT/NAME [timing=before\|after\|split] [rate=R]` | starts moving the disk to an NBD export of the same size (another host); the guest ends on it |
//! | `stream [rate=R]` | starts pulling the rest of a remote base into its local replica (copy-on-read serves the guest meanwhile) |
//! | `job` | the job's progress, or its result once it ended |
//! | `job-wait` | waits for the job to end; its result |
//! | `job-pause`, `job-resume`, `job-cancel`, `job-rate R` | steer the running job |
//!
//! An image whose parent is remote (an HTTP/S3 object or an NBD export) is served writable
//! through the page cache over a copy-on-read parent (`meta_ops::stream`): what the guest
//! reads from the base is kept in a local replica beside the image, and `stream` pulls the
//! rest; once it completed, the replica becomes the image's local parent when serving ends
//! (`finish_stream`, lineage kept). Such a chain cannot be committed or compacted.
//!
//! One job runs at a time, and a resize waits for none (it is refused while a job runs).
//! After a commit or a convert the guest is on another chain, which `resize` and `commit` then
//! work on once the job has completed; compacting it needs `vdisk serve` started again on the
//! image the guest ended on (the reply of `job` names it). After a mirror the guest is on
//! another host's export: resize and commit are refused. A top committed into its parent is
//! stale afterwards: when serving ends, a VHDX one is unlinked from its parent
//! (`meta_ops::unlink_stale`), as `vdisk commit` does.
//!
//! A `convert ... layers` request converts the parents before it returns, and the socket
//! answers no other request meanwhile.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use vdisk::block_io::vhost_user::ConfigHandle;
use vdisk::block_io::BlockDevice;
use vdisk::chain::{Disk, Format};
use vdisk::meta_ops::stream::{
    finish_stream, open_streaming, CopyOnRead, StreamError, StreamOptions,
};
use vdisk::meta_ops::{
    CommitOptions, CompactTarget, Job, JobHandle, JobRunner, LiveDisk, MirrorTiming, Pivot, Retire,
};

use crate::{CliError, CliResult};

/// The longest request line accepted.
const MAX_LINE: u64 = 4096;

/// `Mutex::lock`, past a poisoned lock (a panicked connection thread leaves no half-made
/// state: every change is one assignment).
trait Lk<T> {
    fn lk(&self) -> MutexGuard<'_, T>;
}

impl<T> Lk<T> for Mutex<T> {
    fn lk(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A job started through the socket.
struct Running {
    name: &'static str,
    /// Taken when the job has ended and its result was read.
    handle: Option<JobHandle>,
    /// The result, once read.
    result: Option<Value>,
    /// Where the guest is after the job (convert, commit), for the reply.
    guest_on: Option<PathBuf>,
    /// The chain the guest is on after the job's switch (convert, commit), adopted as the
    /// chain `resize` and `commit` work on once the job completed.
    next_chain: Option<Arc<Disk>>,
}

struct State {
    /// The chain the guest is on (the one served from the start, or the one a resize, a
    /// commit or a convert left): what `resize` and `commit` work on. `None` after a mirror
    /// (the guest is on another host's export).
    chain: Option<Arc<Disk>>,
    /// The top opened for compaction (`--cache writeback`, a VHD or VHDX top).
    compact: Option<Arc<CompactTarget>>,
    job: Option<Running>,
    /// A commit completed: the old top is stale.
    committed: bool,
    /// The copy-on-read parent of a child of a remote base.
    cor: Option<Arc<CopyOnRead>>,
    /// A stream completed: the replica becomes the local parent when serving ends.
    streamed: bool,
}

/// What `vdisk serve` hands the control socket.
pub struct Control {
    live: Arc<LiveDisk>,
    config: ConfigHandle,
    runner: JobRunner,
    image: PathBuf,
    format: Format,
    /// `O_DIRECT` (`--cache none`): how a convert's destination is opened for the guest.
    direct: bool,
    state: Mutex<State>,
    stop: AtomicBool,
    /// Open connections, shut down and joined by [`Control::finish`].
    conns: Mutex<Vec<(UnixStream, std::thread::JoinHandle<()>)>>,
}

/// The chain `vdisk serve --control` serves: opened so that the control socket's operations
/// can run on it later.
pub struct Opened {
    /// The chain.
    pub disk: Arc<Disk>,
    /// The top, opened for compaction when it can be.
    pub compact: Option<Arc<CompactTarget>>,
    /// The copy-on-read parent, when the parent is remote.
    pub cor: Option<Arc<CopyOnRead>>,
    /// Opened with `O_DIRECT` (`--cache none`).
    pub direct: bool,
}

/// Opens `image` for `vdisk serve --control`: a child of a remote parent served writable
/// through the page cache over a copy-on-read parent; else a differencing VHDX top is first
/// prepared for a commit into its parent (`meta_ops::prepare_top`, which must run before anyone
/// opens it), and a VHD or VHDX top served writable through the page cache is opened as a
/// compaction target.
pub fn open(image: &Path, read_only: bool, direct: bool) -> Result<Opened, CliError> {
    if !read_only && !direct {
        match open_streaming(image, &stream_options()) {
            Ok(st) => {
                return Ok(Opened {
                    disk: Arc::new(st.disk),
                    compact: None,
                    cor: Some(st.cor),
                    direct,
                })
            }
            Err(StreamError::NotRemote { .. } | StreamError::NoParent { .. }) => {}
            Err(e) => return Err(CliError::new(crate::cause_chain(&e))),
        }
    }
    let opts = served_options(read_only, direct)?;
    if !read_only {
        if let Err(e) = vdisk::meta_ops::prepare_top(image, &opts.policy) {
            // The chain's own open below names what is wrong with it; only a commit needs this.
            eprintln!(
                "vdisk: a commit will not be possible: {}",
                crate::cause_chain(&e)
            );
        }
    }
    let disk = Disk::open(image, &opts)?;
    let compactable =
        !read_only && !direct && matches!(disk.layers()[0].format, Format::Vhd | Format::Vhdx);
    if !compactable {
        return Ok(Opened {
            disk: Arc::new(disk),
            compact: None,
            cor: None,
            direct,
        });
    }
    drop(disk);
    let (disk, target) =
        vdisk::meta_ops::open_chain_for_compact(image, &opts).map_err(crate::job_err)?;
    Ok(Opened {
        disk,
        compact: Some(target),
        cor: None,
        direct,
    })
}

/// How the guest's images are opened: as `vdisk serve` without a control socket, `O_DIRECT`
/// or through the page cache without host readahead (the guest reads ahead itself).
fn served_options(read_only: bool, direct: bool) -> Result<vdisk::chain::OpenOptions, CliError> {
    let mut opts = crate::image::chain_options(None, read_only)?;
    opts.direct = direct;
    opts.random_access = !direct;
    Ok(opts)
}

/// How `serve --control` opens a child over a remote parent, and finishes its stream.
fn stream_options() -> StreamOptions {
    StreamOptions {
        lock: crate::image::lock_mode(),
        ..StreamOptions::default()
    }
}

impl Control {
    /// The control of `live` (the guest's disk, over `opened`), announcing size changes
    /// through `config`.
    pub fn new(
        live: Arc<LiveDisk>,
        opened: Opened,
        config: ConfigHandle,
        image: &Path,
    ) -> Result<Arc<Control>, CliError> {
        let runner = JobRunner::new().map_err(crate::job_err)?;
        let format = opened.disk.layers()[0].format;
        Ok(Arc::new(Control {
            live,
            config,
            runner,
            image: image.to_path_buf(),
            format,
            direct: opened.direct,
            state: Mutex::new(State {
                chain: Some(opened.disk),
                compact: opened.compact,
                job: None,
                committed: false,
                cor: opened.cor,
                streamed: false,
            }),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        }))
    }

    /// Listens on `path` (a stale socket there is replaced; any other file is refused) and
    /// serves requests on a thread per connection until [`Control::finish`].
    pub fn listen(self: &Arc<Self>, path: &Path) -> Result<std::thread::JoinHandle<()>, CliError> {
        let cannot = |e: std::io::Error| {
            CliError::new(format!(
                "cannot listen on the control socket {}: {e}",
                path.display()
            ))
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(CliError::new(format!(
                    "the control socket {} exists and is not a socket",
                    path.display()
                )));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(CliError::new(format!(
                    "the control socket {} is in use by another process",
                    path.display()
                )));
            }
            std::fs::remove_file(path).map_err(cannot)?;
        }
        let listener = UnixListener::bind(path).map_err(cannot)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(cannot)?;
        let me = self.clone();
        let path = path.to_path_buf();
        Ok(std::thread::spawn(move || {
            for conn in listener.incoming() {
                if me.stop.load(Ordering::Acquire) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let Ok(kept) = conn.try_clone() else { continue };
                let me2 = me.clone();
                let t = std::thread::spawn(move || me2.serve_conn(conn));
                let mut conns = me.conns.lk();
                conns.retain(|(_, t)| !t.is_finished());
                conns.push((kept, t));
            }
            let _ = std::fs::remove_file(&path);
        }))
    }

    /// Stops listening (waking the accept loop through `path`), cancels a running job and
    /// waits for it, then, if a commit completed, unlinks the stale top (once the caller has
    /// dropped every other handle of it: call this after the server is gone).
    pub fn finish(
        self: Arc<Self>,
        path: &Path,
        listener: std::thread::JoinHandle<()>,
    ) -> CliResult {
        self.stop.store(true, Ordering::Release);
        let _ = UnixStream::connect(path);
        let _ = listener.join();
        let conns = std::mem::take(&mut *self.conns.lk());
        for (conn, t) in conns {
            let _ = conn.shutdown(std::net::Shutdown::Both);
            let _ = t.join();
        }
        let handle = self.state.lk().job.as_mut().and_then(|j| j.handle.take());
        if let Some(h) = handle {
            h.cancel();
            let _ = h.wait_blocking();
        }
        // What a cancelled job left (a compaction's last step) is made durable too.
        self.live
            .flush()
            .map_err(|e| CliError::new(format!("cannot flush the disk: {e}")))?;
        let (committed, streamed) = {
            let mut st = self.state.lk();
            // Drops the copy-on-read parent's handle here (it records what was fetched).
            st.cor = None;
            (st.committed, st.streamed)
        };
        let image = self.image.clone();
        // The last handles of the old top go with the control (its connection threads, which
        // held clones, are joined).
        drop(self);
        if committed {
            vdisk::meta_ops::unlink_stale(&image, crate::image::lock_mode())
                .map_err(crate::job_err)?;
        }
        if streamed {
            let f = finish_stream(&image, &stream_options())
                .map_err(|e| CliError::new(crate::cause_chain(&e)))?;
            eprintln!(
                "vdisk: {} streamed: its parent is now {}",
                image.display(),
                f.replica.display()
            );
        }
        Ok(0)
    }

    fn serve_conn(&self, conn: UnixStream) {
        let Ok(mut out) = conn.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(conn);
        loop {
            let mut line = String::new();
            match std::io::Read::take(&mut reader, MAX_LINE).read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let reply = if !line.ends_with('\n') && line.len() as u64 >= MAX_LINE {
                json!({"ok": false, "error": format!("a request is at most {MAX_LINE} bytes")})
            } else {
                let words: Vec<&str> = line.split_whitespace().collect();
                match self.request(&words) {
                    Ok(mut v) => {
                        v["ok"] = json!(true);
                        v
                    }
                    Err(e) => json!({"ok": false, "error": e}),
                }
            };
            if writeln!(out, "{reply}").is_err() {
                return;
            }
            if self.stop.load(Ordering::Acquire) {
                return;
            }
        }
    }

    /// Answers one request.
    pub fn request(&self, words: &[&str]) -> Result<Value, String> {
        let (&cmd, args) = words.split_first().ok_or("an empty request")?;
        match cmd {
            "info" => Ok(self.info()),
            "resize" => self.resize(args),
            "commit" | "compact" | "stream" => self.start(cmd, args, None),
            "mirror" => match args {
                [url, rest @ ..] => self.start(cmd, rest, Some((&"nbd", url))),
                _ => Err("usage: mirror nbd://HOST:PORT/NAME [timing=before|after|split] [rate=BYTES/S]".into()),
            },
            "convert" | "backup" => match args {
                [format, path, rest @ ..] => self.start(cmd, rest, Some((format, path))),
                _ => Err(format!(
                    "usage: {cmd} FORMAT PATH {}[rate=BYTES/S]",
                    if cmd == "convert" { "[layers] " } else { "" }
                )),
            },
            "job" => self.job_status(),
            "job-wait" => self.job_wait(),
            "job-pause" | "job-resume" | "job-cancel" | "job-rate" => self.steer(cmd, args),
            _ => Err(format!(
                "unknown request '{cmd}' (info, resize, commit, compact, convert, backup, mirror, stream, job, \
                 job-wait, job-pause, job-resume, job-cancel, job-rate)"
            )),
        }
    }

    fn info(&self) -> Value {
        let info = self.live.info();
        let stats = self.live.guest_stats();
        let job = self.job_status().ok();
        json!({
            "image": self.image.display().to_string(),
            "format": self.format.name(),
            "size": info.virtual_size,
            "capacity_shown": self.config.capacity() * 512,
            "read_only": info.read_only,
            "guest_requests": stats.requests,
            "guest_in_flight": stats.in_flight,
            "pivots": stats.generation,
            "job": job,
        })
    }

    fn resize(&self, args: &[&str]) -> Result<Value, String> {
        let (size, flags) = args
            .split_first()
            .ok_or("usage: resize [+|-]SIZE [shrink] [force]")?;
        let (mut shrink, mut force) = (false, false);
        for f in flags {
            match *f {
                "shrink" => shrink = true,
                "force" => force = true,
                other => return Err(format!("resize takes 'shrink' and 'force', not '{other}'")),
            }
        }
        let mut st = self.state.lk();
        self.settle(&mut st);
        if st.job.as_ref().is_some_and(|j| j.handle.is_some()) || self.live.job_running() {
            return Err("a job is running: resize after it ends".into());
        }
        let chain = st
            .chain
            .clone()
            .ok_or("the guest is on another host's export since a mirror: resize it there")?;
        let current = self.live.info().virtual_size;
        let new_size = crate::resize::new_size(current, size).map_err(|e| e.message)?;
        if new_size < current && !shrink {
            return Err(format!(
                "shrinking from {current} to {new_size} bytes needs 'shrink'"
            ));
        }
        let force = force || (self.format == Format::Raw && shrink);
        let r = vdisk::meta_ops::resize_live(&self.live, &chain, new_size, force)
            .map_err(|e| crate::cause_chain(&e))?;
        // The top was reopened: a compaction target of the old handle is stale.
        st.compact = None;
        st.chain = r.disk.clone();
        drop(st);
        let announced = self
            .config
            .refresh()
            .map_err(|e| format!("resized, but the frontend was not told: {e}"))?;
        Ok(json!({
            "old_size": r.old_size,
            "size": r.new_size,
            "pause_ms": r.pause.as_secs_f64() * 1e3,
            "announced": announced,
        }))
    }

    fn start(
        &self,
        cmd: &str,
        args: &[&str],
        dest: Option<(&&str, &&str)>,
    ) -> Result<Value, String> {
        let mut rate = 0;
        let mut timing = MirrorTiming::Before;
        let mut layers = false;
        for a in args {
            if let (Some(v), "mirror") = (a.strip_prefix("timing="), cmd) {
                timing = crate::mirror::parse_timing(v)?;
                continue;
            }
            if (*a, cmd) == ("layers", "convert") {
                layers = true;
                continue;
            }
            let v = a.strip_prefix("rate=").ok_or_else(|| {
                format!(
                    "{cmd} takes rate=BYTES/S{}, not '{a}'",
                    match cmd {
                        "mirror" => " and timing=T",
                        "convert" => " and layers",
                        _ => "",
                    }
                )
            })?;
            rate = crate::size::parse_size(v).map_err(|e| e.message)?;
        }
        let mut st = self.state.lk();
        self.settle(&mut st);
        if let Some(j) = &st.job {
            if j.handle.is_some() {
                return Err(format!("a {} job is running", j.name));
            }
        }
        let (name, job, guest_on, next_chain): (&'static str, Job, Option<PathBuf>, _) = match cmd {
            "stream" => {
                let cor = st
                    .cor
                    .clone()
                    .ok_or("the image's parent is not remote (or not served writable with --cache writeback): nothing to stream")?;
                let opts = vdisk::meta_ops::JobOptions {
                    rate,
                    ..Default::default()
                };
                let handle = self
                    .runner
                    .start_stream(&self.live, cor, opts)
                    .map_err(|e| crate::cause_chain(&e))?;
                st.job = Some(Running {
                    name: "stream",
                    handle: Some(handle),
                    result: None,
                    guest_on: None,
                    next_chain: None,
                });
                return Ok(json!({"job": "stream", "started": true}));
            }
            "commit" => {
                if st.cor.is_some() {
                    return Err("the parent is remote: stream it first, then serve again".into());
                }
                let chain = st
                    .chain
                    .clone()
                    .ok_or("the guest is on another host's export since a mirror")?;
                let base = chain
                    .layers()
                    .get(1)
                    .map(|l| l.path.clone())
                    .ok_or("the image has no parent to commit into")?;
                let job = Job::commit(chain, CommitOptions::new().retire(Retire::Keep))
                    .map_err(|e| crate::cause_chain(&e))?;
                let next = job.guest_chain();
                ("commit", job, Some(base), next)
            }
            "compact" => {
                let target = st.compact.clone().ok_or(
                    "compaction needs a VHD or VHDX top served writable with --cache writeback, \
                     and no resize, commit or convert since serving started",
                )?;
                ("compact", Job::compact(target), None, None)
            }
            "mirror" => {
                let (_, url) = dest.ok_or("a destination is needed")?;
                let size = self.live.info().virtual_size;
                let dev = crate::mirror::open_destination(url, size, "the served disk")
                    .map_err(|e| e.message)?;
                let job = Job::mirror(dev).timing(timing);
                ("mirror", job, Some(PathBuf::from(url)), None)
            }
            _ => {
                let (format, path) = dest.ok_or("a destination is needed")?;
                let format = crate::image::parse_format(format).map_err(|e| e.message)?;
                let path = PathBuf::from(path);
                if path.exists() {
                    return Err(format!(
                        "{} exists: the destination must be a new file",
                        path.display()
                    ));
                }
                let size = self.live.info().virtual_size;
                if layers {
                    let chain = st
                        .chain
                        .clone()
                        .ok_or("the guest is on another host's export since a mirror")?;
                    if st.cor.is_some() {
                        return Err(
                            "the parent is remote: stream it first, then serve again".into()
                        );
                    }
                    let dest = self.new_top(&chain, format, &path)?;
                    let job = Job::convert_top(chain, dest.clone())
                        .map_err(|e| crate::cause_chain(&e))?;
                    ("convert", job, Some(path), Some(dest))
                } else {
                    let img = crate::image::create(format, &path, size, &[], None)
                        .map_err(|e| e.message)?;
                    if cmd == "convert" {
                        // The guest moves to the new image: it is opened as a one-layer chain the
                        // way the served disk was (cache mode, no readahead), so that a resize or a
                        // commit can work on it after the switch.
                        drop(img);
                        let opts = served_options(false, self.direct).map_err(|e| e.message)?;
                        let disk = Arc::new(Disk::open(&path, &opts).map_err(|e| {
                            format!(
                                "cannot open the new {}: {}",
                                path.display(),
                                crate::cause_chain(&e)
                            )
                        })?);
                        let job = Job::convert(disk.clone()).pivot(Pivot::Switch);
                        ("convert", job, Some(path), Some(disk))
                    } else {
                        let job = Job::convert(img.dev).pivot(Pivot::Detach).dest_zeroed(true);
                        ("backup", job, None, None)
                    }
                }
            }
        };
        let handle = self
            .runner
            .start(&self.live, job.rate(rate))
            .map_err(|e| crate::cause_chain(&e))?;
        st.job = Some(Running {
            name,
            handle: Some(handle),
            result: None,
            guest_on,
            next_chain,
        });
        Ok(json!({"job": name, "started": true}))
    }

    /// For `convert FORMAT PATH layers`: converts the layers below the guest's top (read-only
    /// while the guest runs) into `PATH-STEM-1.EXT`, `-2`, ... as `vdisk convert --keep-layers`
    /// names them (the request waits for that), then makes PATH an empty child of the first
    /// and opens it as the guest's disk will be: the destination of [`Job::convert_top`].
    /// On an error nothing new is left.
    fn new_top(&self, chain: &Arc<Disk>, format: Format, path: &Path) -> Result<Arc<Disk>, String> {
        let depth = chain.layers().len();
        if depth < 2 {
            return Err("the image has no parent: convert it without 'layers'".into());
        }
        let finals = vdisk::meta_ops::layers::layer_paths(path, depth, format);
        let parents = Disk::from_layers(chain.layers()[1..].to_vec(), false)
            .map_err(|e| crate::cause_chain(&e))?;
        let opts = vdisk::meta_ops::LayersOptions::new(format);
        vdisk::meta_ops::convert_layers_to(&parents, &finals[1..], &opts)
            .map_err(|e| crate::cause_chain(&e))?;
        let made = || -> Result<Arc<Disk>, String> {
            let size = self.live.info().virtual_size;
            drop(
                crate::image::create(format, path, size, &[], Some(&finals[1]))
                    .map_err(|e| e.message)?,
            );
            let opts = served_options(false, self.direct).map_err(|e| e.message)?;
            Disk::open(path, &opts).map(Arc::new).map_err(|e| {
                format!(
                    "cannot open the new {}: {}",
                    path.display(),
                    crate::cause_chain(&e)
                )
            })
        };
        made().inspect_err(|_| {
            for f in &finals {
                let _ = std::fs::remove_file(f);
            }
        })
    }

    /// The job's progress, or its result once it has ended (read from its handle once).
    fn job_status(&self) -> Result<Value, String> {
        let mut st = self.state.lk();
        self.settle(&mut st);
        let j = st.job.as_ref().ok_or("no job was started")?;
        if let Some(h) = &j.handle {
            let p = h.progress();
            return Ok(json!({
                "job": j.name,
                "state": "running",
                "phase": p.phase.name(),
                "done": p.done,
                "total": p.total,
                "rate": p.rate.round(),
                "eta_s": p.eta.map(|d| d.as_secs_f64()),
                "rate_limit": h.rate(),
            }));
        }
        j.result.clone().ok_or_else(|| "no job result".into())
    }

    /// Reads the result of a job that has ended, once: the chain the guest ended on becomes the
    /// one `resize` and `commit` work on. Every request that depends on it settles first.
    fn settle(&self, st: &mut State) {
        let Some(j) = st.job.as_mut() else { return };
        let Some(h) = j.handle.take_if(|h| h.is_finished()) else {
            return;
        };
        let v = match h.wait_blocking() {
            Ok(r) => {
                let switched = matches!(j.name, "commit" | "convert" | "mirror");
                if switched {
                    // The guest is on another chain now (none of ours after a mirror);
                    // compaction needs a top opened for it, which only serving it again does.
                    st.chain = j.next_chain.take();
                    st.compact = None;
                }
                if j.name == "commit" {
                    st.committed = true;
                }
                if j.name == "stream" {
                    st.streamed = true;
                }
                json!({
                    "job": j.name,
                    "state": "completed",
                    "bytes": r.bytes,
                    "passes": r.passes,
                    "seconds": r.duration.as_secs_f64(),
                    "pivot_pause_ms": r.pivot_pause.as_secs_f64() * 1e3,
                    "max_guest_wait_ms": r.max_guest_wait.as_secs_f64() * 1e3,
                    "guest_on": if switched {
                        j.guest_on.as_ref().map(|p| p.display().to_string())
                    } else {
                        Some(self.image.display().to_string())
                    },
                })
            }
            Err(e) => json!({
                "job": j.name,
                "state": if e.is_cancelled() { "cancelled" } else { "failed" },
                "error": crate::cause_chain(&e),
            }),
        };
        j.result = Some(v);
    }

    fn job_wait(&self) -> Result<Value, String> {
        loop {
            let v = self.job_status()?;
            if v["state"] != "running" {
                return Ok(v);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn steer(&self, cmd: &str, args: &[&str]) -> Result<Value, String> {
        let st = self.state.lk();
        let h = st
            .job
            .as_ref()
            .and_then(|j| j.handle.as_ref())
            .filter(|h| !h.is_finished())
            .ok_or("no job is running")?;
        match (cmd, args) {
            ("job-pause", []) => h.pause(),
            ("job-resume", []) => h.resume(),
            ("job-cancel", []) => h.cancel(),
            ("job-rate", [r]) => h.set_rate(crate::size::parse_size(r).map_err(|e| e.message)?),
            ("job-rate", _) => return Err("usage: job-rate BYTES/S (0: unlimited)".into()),
            _ => return Err(format!("{cmd} takes no arguments")),
        }
        Ok(json!({}))
    }
}

/// `vdisk control` arguments.
#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// The control socket of a `vdisk serve --control` daemon.
    pub socket: PathBuf,
    /// The request and its arguments (`info`, `resize +1G`, `commit`, `job-wait`, ...).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    pub request: Vec<String>,
}

/// Sends one request, prints the reply; exit 0 when it says ok.
pub fn run_client(a: ControlArgs) -> CliResult {
    let mut conn = UnixStream::connect(&a.socket).map_err(|e| {
        CliError::new(format!(
            "cannot connect to the control socket {}: {e}",
            a.socket.display()
        ))
    })?;
    let line = a.request.join(" ");
    if line.contains('\n') {
        return Err(CliError::new("a request is one line"));
    }
    writeln!(conn, "{line}").map_err(|e| CliError::new(format!("cannot send: {e}")))?;
    let mut reply = String::new();
    BufReader::new(&conn)
        .read_line(&mut reply)
        .map_err(|e| CliError::new(format!("no reply: {e}")))?;
    let v: Value = serde_json::from_str(reply.trim())
        .map_err(|e| CliError::new(format!("a reply that is not JSON ({e}): {reply}")))?;
    println!("{v}");
    Ok(u8::from(v["ok"] != json!(true)))
}
