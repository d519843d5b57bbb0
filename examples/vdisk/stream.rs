//! `vdisk stream IMG [--rate BYTES/S] [-p]`: pull the remote base of the differencing image
//! IMG (an HTTP/S3 object or an NBD export, see `chain::remote`) into a local replica beside
//! it (`IMG.base`), then make that replica IMG's local parent, lineage kept: the stream job of
//! `meta_ops::stream` with no guest here (the job has the disk to itself), then
//! `meta_ops::stream::finish_stream`. Interrupted (a failure, a dropped link), it keeps what
//! it fetched: running it again continues. An NBD parent that advertises no identity needs
//! `--unverified` (see `chain::remote`).
//!
//! `vdisk stress IMG --job stream` uses [`stress_setup`]: IMG is served read-only by our NBD
//! server in this process, a temporary child of the export is the guest's disk, and the
//! stream job runs under the guest's I/O.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vdisk::block_io::nbd::{Export, NbdServer};
use vdisk::block_io::{BlockDevice, FileStorage};
use vdisk::chain::remote::{open_nbd_parent, AdvertisedIdentity, URL_KEY};
use vdisk::chain::{Disk, Format, Identity, RemoteParents};
use vdisk::meta_ops::stream::{
    finish_stream, open_streaming, StreamError, StreamOptions, Streaming,
};
use vdisk::meta_ops::{JobOptions, JobRunner, LiveDisk};

use crate::cmds::{wait_job, BarEnd};
use crate::nbd_serve::ServedTemp;
use crate::{job_err, CliError, CliResult};

/// `vdisk stream` arguments.
#[derive(Debug, clap::Args)]
pub struct StreamArgs {
    /// Rate limit in bytes per second (K/M/G suffixes; default: unlimited).
    #[arg(long)]
    pub rate: Option<String>,
    /// Show a progress bar.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Fetches in flight at once.
    #[arg(short = 'm', default_value_t = 4)]
    pub parallel: usize,
    /// Bytes per remote request of the job (K/M suffixes; whole granules of 1 MiB).
    #[arg(long, default_value = "4M")]
    pub chunk: String,
    /// Accept an NBD parent that advertises no identity, checked by content fingerprint.
    #[arg(long)]
    pub unverified: bool,
    /// The differencing image whose parent is remote.
    pub image: PathBuf,
}

fn stream_err(e: StreamError) -> CliError {
    CliError::new(crate::cause_chain(&e))
}

/// Runs the verb; exit 0 when IMG's parent is local.
pub fn run(a: StreamArgs) -> CliResult {
    let rate = crate::size::parse_rate(a.rate.as_deref())?;
    let so = StreamOptions {
        remote_parents: if a.unverified {
            RemoteParents::AllowUnverified
        } else {
            RemoteParents::Allow
        },
        lock: crate::image::lock_mode(),
        ..StreamOptions::default()
    };
    let Streaming { disk, cor, .. } = match open_streaming(&a.image, &so) {
        Ok(s) => s,
        Err(e @ StreamError::NotRemote { .. }) => {
            // A finish cut after the repoint: only the sidecar is left to delete.
            return match finish_stream(&a.image, &so) {
                Ok(f) => {
                    println!(
                        "The parent of {} was already local ({}); removed the leftover sidecar.",
                        a.image.display(),
                        f.replica.display()
                    );
                    Ok(0)
                }
                Err(_) => Err(stream_err(e)),
            };
        }
        Err(e) => return Err(stream_err(e)),
    };
    let url = cor.url().display().to_string();
    let live = LiveDisk::new(Arc::new(disk));
    let runner = JobRunner::new().map_err(job_err)?;
    let chunk = crate::size::parse_size(&a.chunk)?;
    let opts = JobOptions {
        rate,
        chunk,
        parallel: a.parallel.max(1),
        ..JobOptions::default()
    };
    let h = runner
        .start_stream(&live, cor.clone(), opts)
        .map_err(job_err)?;
    let report = wait_job(h, a.progress, BarEnd::Keep).map_err(job_err)?;
    let stats = cor.stats();
    drop(live);
    drop(cor);
    drop(runner);
    let f = finish_stream(&a.image, &so).map_err(stream_err)?;
    let secs = report.duration.as_secs_f64().max(1e-9);
    println!(
        "Streamed {} MiB of data from {url} in {:.2} s ({:.1} MiB/s, {} requests; {} MiB of \
         holes skipped); the parent of {} is now {}.",
        report.buffered_bytes >> 20,
        secs,
        report.buffered_bytes as f64 / secs / (1 << 20) as f64,
        stats.remote_reads,
        report.skipped_bytes >> 20,
        a.image.display(),
        f.replica.display()
    );
    Ok(0)
}

/// What `vdisk stress --job stream` runs on: IMG served read-only over NBD in this process, a
/// temporary child of the export (the guest's disk) opened over a copy-on-read parent. Drop
/// it to stop the server and delete the temporary files.
pub struct StressSetup {
    /// The guest's disk: the child over its copy-on-read parent.
    pub disk: Arc<Disk>,
    /// The copy-on-read parent, for [`JobRunner::start_stream`].
    pub cor: Arc<vdisk::chain::cor::CopyOnRead>,
    /// Dropped last: the server and the temporary folder.
    _server: ServedTemp,
}

fn server_err(e: impl std::fmt::Display) -> CliError {
    CliError::new(format!("cannot start the NBD server: {e}"))
}

/// Serves `img` (a VHD or VHDX) read-only on a loopback port and opens a new child of it for
/// streaming (see [`StressSetup`]).
pub fn stress_setup(img: &Path) -> Result<StressSetup, CliError> {
    let base = Disk::open(img, &crate::image::chain_options(None, true)?)?;
    let id = AdvertisedIdentity::of(&base).ok_or_else(|| {
        CliError::new(format!(
            "{} is not a VHD or VHDX: a streamed base needs an identity",
            img.display()
        ))
    })?;
    let export = Export::new("base", Arc::new(base))
        .read_only(true)
        .description(format!(
            "{} (vdisk stress)\n{}",
            img.display(),
            id.to_line()
        ));
    let server = NbdServer::bind_tcp(("127.0.0.1", 0), vec![export]).map_err(server_err)?;
    let port = server
        .local_addr()
        .ok_or_else(|| server_err("no TCP address"))?
        .port();
    let dir = std::env::temp_dir().join(format!("vdisk-stress-stream-{}", std::process::id()));
    let guard = ServedTemp::start(server, dir.clone());
    std::fs::create_dir_all(&dir)
        .map_err(|e| CliError::new(format!("cannot create {}: {e}", dir.display())))?;
    let url = format!("nbd://127.0.0.1:{port}/base");
    let child = dir.join(match id.format() {
        Format::Vhd => "child.vhd",
        _ => "child.vhdx",
    });
    make_child(&child, &url, id.format())?;
    // Small granules: the guests' reads fetch only part of the base before the job runs.
    let so = StreamOptions {
        lock: crate::image::lock_mode(),
        granule: 64 << 10,
        ..StreamOptions::default()
    };
    let Streaming { disk, cor, .. } = open_streaming(&child, &so).map_err(stream_err)?;
    Ok(StressSetup {
        disk: Arc::new(disk),
        cor,
        _server: guard,
    })
}

/// Creates a differencing child of the NBD export `url` at `path`, recording the export's
/// advertised identity and the URL as `chain::remote` documents.
fn make_child(path: &Path, url: &str, format: Format) -> Result<(), CliError> {
    let parent = open_nbd_parent(path, url, format, RemoteParents::Allow)?;
    let size = parent.dev.info().virtual_size;
    let err =
        |e: vdisk::block_io::Error| CliError::new(format!("cannot create {}: {e}", path.display()));
    match parent.identity {
        Identity::Vhdx {
            data_write_guid, ..
        } => {
            let pref = vdisk::vhdx_format::ParentRef {
                data_write_guid,
                relative_path: "base".into(),
                absolute_path: None,
            };
            let mut f = vdisk::vhdx_format::create_file(
                path,
                &vdisk::vhdx_format::CreateOptions::differencing(size, pref),
            )
            .map_err(err)?;
            let mut entries = f
                .parent_locator()
                .map(|l| l.entries.clone())
                .unwrap_or_default();
            entries.push((URL_KEY.to_string(), url.to_string()));
            f.set_parent_locator(&vdisk::vhdx_format::locator::ParentLocator::new(entries))
                .map_err(err)?;
            f.close().map_err(err)?;
        }
        Identity::Vhd {
            unique_id,
            timestamp,
        } => {
            let o = vdisk::vhd_format::DifferencingOptions {
                size,
                block_size: 2 << 20,
                parent_unique_id: unique_id,
                parent_timestamp: timestamp,
                parent_name: url.to_string(),
                absolute_path: None,
                relative_path: None,
                unique_id: None,
                timestamp: None,
                creator: vdisk::vhd_format::Creator::default(),
            };
            let f = vdisk::vhd_format::VhdFile::create_differencing(
                FileStorage::create(path).map_err(err)?,
                &o,
            )
            .map_err(err)?;
            f.flush().map_err(err)?;
        }
        Identity::Raw => return Err(CliError::new("the export advertises no identity")),
    }
    Ok(())
}
