//! Crash sweep of the commit job on the fault-injecting backend: chains of two and three
//! layers (VHDX and VHD) committed into their root, each file on a `FaultStorage`, one op
//! counter over all of them. The
//! workload is the whole commit as `vdisk commit` does it — the child records the base's
//! next id (VHDX), the base's session starts with it, the job merges while a guest writes and
//! flushes through the `LiveDisk`, the pivot, guest writes on the base — and the power is cut
//! after the N-th write or sync (every N up to the clean run's count, or a sample of them;
//! the count varies a little between runs, as the guest runs beside the job), then each
//! file is rebuilt from its durable bytes plus a random fate for each pending write. Then:
//! if the job had completed, the new chain (the base alone) must open with lineage checks on;
//! otherwise the old chain (child over base) must; and either way it must hold every guest
//! write that was acknowledged and flushed (blocks written after the last good flush may read
//! either way).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod chains;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use block_io::{BlockDevice, ErrorKind, FaultStorage, MemStorage, Result as IoResult, Storage};
use chain::{Disk, Expected, Format, Identity, Layer, ParentLink};
use chains::Kind;
use meta_ops::{CommitOptions, Job, JobOptions, JobRunner, LiveDisk};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use uuid::Uuid;

const SIZE: u64 = 4 << 20;
const BLK: usize = 4096;

/// One power domain over several fault storages: the op counter is shared and a cut cuts all.
#[derive(Debug, Default)]
struct Power {
    ops: AtomicU64,
    cut_at: AtomicU64,
    disks: parking_lot::Mutex<Vec<Arc<FaultStorage>>>,
}

impl Power {
    fn new(cut_at: u64) -> Arc<Power> {
        let p = Power::default();
        p.cut_at.store(cut_at, Ordering::SeqCst);
        Arc::new(p)
    }

    fn tick(&self) -> IoResult<()> {
        let n = self.ops.fetch_add(1, Ordering::SeqCst);
        if n >= self.cut_at.load(Ordering::SeqCst) {
            for d in self.disks.lock().iter() {
                d.cut_now();
            }
            return Err(block_io::Error::new(ErrorKind::PowerCut, "power cut"));
        }
        Ok(())
    }
}

/// A file on the shared power domain.
#[derive(Debug, Clone)]
struct Disk0 {
    f: Arc<FaultStorage>,
    power: Arc<Power>,
}

impl Disk0 {
    fn new(mem: MemStorage, power: &Arc<Power>) -> Disk0 {
        let f = Arc::new(FaultStorage::new(mem));
        power.disks.lock().push(f.clone());
        Disk0 {
            f,
            power: power.clone(),
        }
    }
}

impl Storage for Disk0 {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> IoResult<()> {
        self.f.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> IoResult<()> {
        self.power.tick()?;
        self.f.write_at(buf, offset)
    }
    fn len(&self) -> IoResult<u64> {
        self.f.len()
    }
    fn set_len(&self, len: u64) -> IoResult<()> {
        self.power.tick()?;
        self.f.set_len(len)
    }
    fn sync_data(&self) -> IoResult<()> {
        self.power.tick()?;
        self.f.sync_data()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> IoResult<()> {
        self.power.tick()?;
        self.f.punch_hole(offset, len)
    }
}

/// A chain layer over `s` as `chain` would open it (identity and parent link).
fn layer(kind: Kind, s: Disk0, read_only: bool, name: &str) -> IoResult<Layer> {
    let path = std::path::PathBuf::from(name);
    Ok(match kind {
        Kind::Vhdx => {
            let f = vhdx_format::VhdxFile::open(
                s,
                &vhdx_format::OpenOptions::new().read_only(read_only),
            )?;
            let d = f.details();
            let parent = f.parent_locator().map(|l| ParentLink {
                candidates: Vec::new(),
                expected: Expected::Vhdx {
                    linkage: l.parent_linkage(),
                    linkage2: l.parent_linkage2(),
                },
                name: None,
            });
            Layer {
                path,
                format: Format::Vhdx,
                dev: Arc::new(f),
                identity: Identity::Vhdx {
                    data_write_guid: d.data_write_guid,
                    disk_id: d.disk_id,
                },
                parent,
            }
        }
        Kind::Vhd => {
            let f =
                vhd_format::VhdFile::open(s, &vhd_format::OpenOptions::new().read_only(read_only))?;
            let d = f.details();
            let parent = d.parent_unique_id.map(|u| ParentLink {
                candidates: Vec::new(),
                expected: Expected::Vhd {
                    unique_id: u,
                    timestamp: d.parent_timestamp.unwrap_or(0),
                },
                name: None,
            });
            Layer {
                path,
                format: Format::Vhd,
                dev: Arc::new(f),
                identity: Identity::Vhd {
                    unique_id: d.unique_id,
                    timestamp: d.timestamp,
                },
                parent,
            }
        }
    })
}

/// The chain's files (base first), made once (not on the fault backend) and copied per run,
/// and the model of what the top reads.
struct Images {
    files: Vec<Vec<u8>>,
    model: Vec<u8>,
}

fn images(kind: Kind, depth: usize, seed: u64) -> Images {
    let dir = tempfile::tempdir().unwrap();
    let (_, model) = chains::build(dir.path(), kind, depth, SIZE, seed);
    let files = (0..depth)
        .map(|i| std::fs::read(chains::layer_path(dir.path(), kind, i)).unwrap())
        .collect();
    Images { files, model }
}

/// A job's error as the device error under it (a power cut, here).
fn job_io(e: meta_ops::JobError) -> block_io::Error {
    use meta_ops::JobError as E;
    match e {
        E::Source { source, .. } | E::Destination { source, .. } | E::Prepare { source, .. } => {
            source
        }
        other => block_io::Error::new(ErrorKind::Io, other.to_string()),
    }
}

/// What the guest knows when the power goes.
struct Outcome {
    /// The job completed (the guest is on the base, which was flushed first).
    pivoted: bool,
    /// The disk as of the last flush that returned success.
    flushed: Vec<u8>,
    /// Blocks written after that flush (or by a write that failed).
    unsure: HashSet<usize>,
}

/// The workload with the power cut after `cut_at` ops: a commit of every layer above the
/// base into it. Returns what the guest knows and the storages (base first).
fn workload(
    runner: &JobRunner,
    kind: Kind,
    imgs: &Images,
    cut_at: u64,
    seed: u64,
) -> (Outcome, Arc<Power>, Vec<Disk0>) {
    let power = Power::new(cut_at);
    let stores: Vec<Disk0> = imgs
        .files
        .iter()
        .map(|f| Disk0::new(MemStorage::from_bytes(f), &power))
        .collect();
    let depth = stores.len();
    let base_s = stores[0].clone();
    // The base's child: the layer whose link the base's new id would break.
    let child_s = stores[1].clone();
    let mut out = Outcome {
        pivoted: false,
        flushed: imgs.model.clone(),
        unsure: HashSet::new(),
    };
    let mut model = imgs.model.clone();
    let mut live_slot: Option<Arc<LiveDisk>> = None;
    let r = (|| -> IoResult<()> {
        // (a) the child records the base's next id; (b) the base's session starts with it.
        let base_rw = match kind {
            Kind::Vhdx => {
                let probe = vhdx_format::VhdxFile::open(
                    base_s.clone(),
                    &vhdx_format::OpenOptions::new().read_only(true),
                )?;
                let now = probe.details().data_write_guid;
                drop(probe);
                let next = Uuid::new_v4();
                let mut c = vhdx_format::VhdxFile::open(
                    child_s.clone(),
                    &vhdx_format::OpenOptions::new().read_only(false),
                )?;
                meta_ops::set_vhdx_linkage(&mut c, now, next)?;
                c.close()?;
                drop(c);
                let b = vhdx_format::VhdxFile::open(
                    base_s.clone(),
                    &vhdx_format::OpenOptions::new().read_only(false),
                )?;
                b.begin_session_with(next)?;
                let d = b.details();
                Layer {
                    path: "base".into(),
                    format: Format::Vhdx,
                    dev: Arc::new(b),
                    identity: Identity::Vhdx {
                        data_write_guid: d.data_write_guid,
                        disk_id: d.disk_id,
                    },
                    parent: None,
                }
            }
            Kind::Vhd => layer(kind, base_s.clone(), false, "base")?,
        };
        let mut layers = Vec::new();
        for (i, st) in stores.iter().enumerate().rev() {
            // The top read-write, the others read-only as a chain opens them.
            layers.push(layer(kind, st.clone(), i + 1 < depth, &format!("l{i}"))?);
        }
        let disk = Arc::new(Disk::from_layers(layers, false).unwrap());
        let live = LiveDisk::new(disk.clone());
        live_slot = Some(live.clone());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut guest = |rng: &mut ChaCha8Rng, out: &mut Outcome| -> IoResult<()> {
            let b = rng.random_range(0..SIZE as usize / BLK);
            let data = vec![rng.random_range(1..=255u8); BLK];
            out.unsure.insert(b);
            live.write_at(&data, (b * BLK) as u64)?;
            model[b * BLK..(b + 1) * BLK].copy_from_slice(&data);
            if rng.random_bool(0.3) {
                live.flush()?;
                out.flushed.copy_from_slice(&model);
                out.unsure.clear();
            }
            Ok(())
        };
        for _ in 0..4 {
            guest(&mut rng, &mut out)?;
        }

        let job = Job::commit(
            disk.clone(),
            CommitOptions {
                base: Some(depth - 1),
                base_layer: Some(base_rw),
                ..CommitOptions::default()
            },
        )
        .map_err(job_io)?
        .options(JobOptions {
            granularity: 64 << 10,
            chunk: 256 << 10,
            ..JobOptions::default()
        });
        let h = runner.start(&live, job).map_err(job_io)?;
        while !h.is_finished() {
            if let Err(e) = guest(&mut rng, &mut out) {
                h.wait_timeout(std::time::Duration::from_secs(30));
                return Err(e);
            }
        }
        h.wait_blocking().map_err(job_io)?;
        out.pivoted = true;
        for _ in 0..6 {
            guest(&mut rng, &mut out)?;
        }
        live.flush()?;
        out.flushed.copy_from_slice(&model);
        out.unsure.clear();
        Ok(())
    })();
    if let Err(e) = r {
        // The guest may be the first to hear of it: when the job's write met the cut, the
        // device latched it (fail-stop) and refuses the guest's next write naming it.
        let latched_cut = e.kind() == ErrorKind::Failed
            && e.chain_string()
                .contains("earlier write or sync failed (power cut");
        assert!(
            e.kind() == ErrorKind::PowerCut || latched_cut,
            "cut {cut_at}: {e}"
        );
    }
    // The guest is on the base once the pivot is done (its flush came first), whether or
    // not the job's result was seen before the power went.
    out.pivoted = live_slot.is_some_and(|l| l.generation() >= 1);
    (out, power, stores)
}

/// Opens the chain the guest was on from the crash images (base first) and checks it.
fn check(kind: Kind, what: &str, out: &Outcome, files: Vec<MemStorage>) {
    let power = Power::new(u64::MAX);
    let n = if out.pivoted { 1 } else { files.len() };
    let mut layers = Vec::new();
    for (i, f) in files.into_iter().enumerate().take(n).rev() {
        let l = layer(kind, Disk0::new(f, &power), true, &format!("l{i}"))
            .unwrap_or_else(|e| panic!("{what}: layer {i}: {e}"));
        layers.push(l);
    }
    let disk = Disk::from_layers(layers, false)
        .unwrap_or_else(|e| panic!("{what}: chain (pivoted: {}), lineage: {e}", out.pivoted));
    let got = chains::read_all(&disk);
    for (i, (g, w)) in got.chunks(BLK).zip(out.flushed.chunks(BLK)).enumerate() {
        if g != w && !out.unsure.contains(&i) {
            panic!(
                "{what}: block {i} lost a flushed write (pivoted: {}): got {:?} want {:?}",
                out.pivoted,
                &g[..8],
                &w[..8]
            );
        }
    }
}

fn sweep(kind: Kind, depth: usize, seed: u64) {
    let runner = JobRunner::new().unwrap();
    let imgs = images(kind, depth, seed);
    let (clean, power, _) = workload(&runner, kind, &imgs, u64::MAX, seed);
    assert!(clean.pivoted);
    let total = power.ops.load(Ordering::SeqCst);
    let max_cuts: u64 = std::env::var("META_OPS_CRASH_CUTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    let step = total.div_ceil(max_cuts).max(1);
    let mut cuts = 0;
    let mut pivoted = 0;
    for n in (0..total + 8).step_by(step as usize) {
        let (out, _, stores) = workload(&runner, kind, &imgs, n, seed ^ n);
        for s in 0..2u64 {
            let what = format!("{kind:?} depth {depth} seed {seed} cut {n}/{total} image {s}");
            let files = stores
                .iter()
                .enumerate()
                .map(|(i, st)| st.f.crash_image(s * 7919 + n * 31 + i as u64))
                .collect();
            check(kind, &what, &out, files);
        }
        cuts += 1;
        pivoted += u64::from(out.pivoted);
    }
    eprintln!("{kind:?} depth {depth} seed {seed}: {cuts} cuts over {total} ops (every {step}), {pivoted} after the pivot");
    assert!(cuts >= 10);
}

#[test]
fn power_cuts_during_a_vhdx_commit() {
    sweep(Kind::Vhdx, 2, 1);
}

#[test]
fn power_cuts_during_a_vhd_commit() {
    sweep(Kind::Vhd, 2, 2);
}

/// Three layers committed into the root: the base's child is a read-only middle layer.
#[test]
fn power_cuts_during_a_two_layer_vhdx_commit() {
    sweep(Kind::Vhdx, 3, 3);
}

#[test]
fn power_cuts_during_a_two_layer_vhd_commit() {
    sweep(Kind::Vhd, 3, 4);
}
