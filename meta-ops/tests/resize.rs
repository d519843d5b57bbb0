//! Online resize (`meta_ops::resize_live`): VHD and VHDX tops, alone or over a parent, grown
//! while guest threads write and read 4 KiB blocks across the *new* size through the
//! `LiveDisk`. Requests past the old size are refused before the switch and served after it;
//! every read matches the model; the reopened image holds what the guest wrote, zeros in the
//! new space, and the old data. A refused shrink leaves the guest on a working disk.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod chains;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use block_io::{BlockDevice, ErrorKind};
use chain::{Disk, OpenOptions};
use chains::Kind;
use meta_ops::{resize_live, LiveDisk};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BLK: u64 = 4096;
const OLD: u64 = 6 << 20;
const NEW: u64 = 10 << 20;
const THREADS: u64 = 3;

#[derive(Default)]
struct Counts {
    refused_before: AtomicU64,
    served_after: AtomicU64,
    mismatches: AtomicU64,
    errors: AtomicU64,
}

fn pattern(block: u64, seed: u64) -> Vec<u8> {
    (0..BLK)
        .map(|i| (i as u8).wrapping_mul(31) ^ (block as u8) ^ (seed as u8).rotate_left(3))
        .collect()
}

/// One guest thread on blocks `b % THREADS == t` of the new size; returns what it wrote.
fn guest(
    live: Arc<LiveDisk>,
    initial: Arc<Vec<u8>>,
    t: u64,
    new: u64,
    stop: Arc<AtomicBool>,
    resized: Arc<AtomicBool>,
    counts: Arc<Counts>,
) -> HashMap<u64, Vec<u8>> {
    let mut rng = ChaCha8Rng::seed_from_u64(t + 99);
    let mut written: HashMap<u64, Vec<u8>> = HashMap::new();
    let blocks = new / BLK;
    let mut buf = vec![0u8; BLK as usize];
    let mut seq = 0u64;
    while !stop.load(Ordering::Acquire) {
        let b = rng.random_range(0..blocks / THREADS) * THREADS + t;
        let off = b * BLK;
        let beyond = off >= OLD;
        let after = resized.load(Ordering::Acquire);
        let expect = |written: &HashMap<u64, Vec<u8>>| {
            written.get(&b).cloned().unwrap_or_else(|| {
                if beyond {
                    vec![0u8; BLK as usize]
                } else {
                    initial[off as usize..(off + BLK) as usize].to_vec()
                }
            })
        };
        let r = if rng.random_bool(0.5) {
            seq += 1;
            let data = pattern(b, seq + (t << 32));
            match live.write_at_gen(&data, off) {
                Ok(gen) => {
                    if beyond && gen == 0 {
                        eprintln!("write past the old end accepted before the resize");
                        counts.mismatches.fetch_add(1, Ordering::Relaxed);
                    }
                    written.insert(b, data);
                    Ok(())
                }
                Err(e) => Err(e),
            }
        } else {
            live.read_at(&mut buf, off).map(|()| {
                if buf != expect(&written) {
                    eprintln!("block {b} differs from the model");
                    counts.mismatches.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        match r {
            Ok(()) if beyond => {
                counts.served_after.fetch_add(1, Ordering::Relaxed);
            }
            Ok(()) => {}
            Err(e) if beyond && !after && e.kind() == ErrorKind::OutOfRange => {
                counts.refused_before.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                eprintln!("block {b}: {e}");
                counts.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        if rng.random_range(0..20) == 0 && live.flush().is_err() {
            counts.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    written
}

fn grow_case(kind: Kind, depth: usize, new: u64) {
    let dir = tempfile::tempdir().unwrap();
    let (top, initial) = chains::build(dir.path(), kind, depth, OLD, depth as u64 * 7);
    let initial = Arc::new(initial);
    let disk = Arc::new(Disk::open(&top, &OpenOptions::new()).unwrap());
    let live = LiveDisk::new(disk.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let resized = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (live, initial, stop, resized, counts) = (
                live.clone(),
                initial.clone(),
                stop.clone(),
                resized.clone(),
                counts.clone(),
            );
            std::thread::spawn(move || guest(live, initial, t, new, stop, resized, counts))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(live.info().virtual_size, OLD);
    let t0 = Instant::now();
    let r = resize_live(&live, &disk, new, false).unwrap();
    resized.store(true, Ordering::Release);
    assert_eq!((r.old_size, r.new_size), (OLD, new));
    assert!(r.pause <= t0.elapsed());
    assert_eq!(live.info().virtual_size, new);
    assert_eq!(live.generation(), 1);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Release);
    let written: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let c = &counts;
    assert_eq!(c.mismatches.load(Ordering::Relaxed), 0, "{kind:?}");
    assert_eq!(c.errors.load(Ordering::Relaxed), 0, "{kind:?}");
    assert!(c.refused_before.load(Ordering::Relaxed) > 0, "{kind:?}");
    assert!(c.served_after.load(Ordering::Relaxed) > 0, "{kind:?}");
    live.flush().unwrap();
    drop((live, disk, r));
    // The reopened chain (lineage checks on) reads the model.
    let d = Disk::open(&top, &OpenOptions::new()).unwrap();
    assert_eq!(d.info().virtual_size, new);
    let mut model = initial.to_vec();
    model.resize(new as usize, 0);
    for w in written {
        for (b, data) in w {
            model[(b * BLK) as usize..((b + 1) * BLK) as usize].copy_from_slice(&data);
        }
    }
    let mut got = vec![0u8; new as usize];
    d.read_at(&mut got, 0).unwrap();
    assert!(
        got == model,
        "{kind:?} depth {depth}: the reopened image differs"
    );
}

#[test]
fn grow_vhd_under_guest_io() {
    grow_case(Kind::Vhd, 1, NEW);
}

/// 200 blocks of 1 MiB: the VHD's BAT outgrows its sector and moves to the end of the file
/// while the guests run.
#[test]
fn grow_vhd_past_its_bat_under_guest_io() {
    grow_case(Kind::Vhd, 1, 200 << 20);
}

#[test]
fn grow_vhdx_under_guest_io() {
    grow_case(Kind::Vhdx, 1, NEW);
}

#[test]
fn grow_vhdx_child_past_its_parent_under_guest_io() {
    grow_case(Kind::Vhdx, 2, NEW);
}

#[test]
fn refusals_leave_the_guest_on_a_working_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (top, _) = chains::build(dir.path(), Kind::Vhdx, 1, OLD, 3);
    let disk = Arc::new(Disk::open(&top, &OpenOptions::new()).unwrap());
    let live = LiveDisk::new(disk.clone());
    live.write_at(&[7; 4096], OLD - 4096).unwrap();
    let e = resize_live(&live, &disk, 2 << 20, false).unwrap_err();
    assert!(e.would_cut_data(), "{e:?}");
    // The guest goes on, on a fresh handle of the same image.
    assert_eq!(live.info().virtual_size, OLD);
    live.write_at(&[8; 4096], 0).unwrap();
    let mut b = [0u8; 4096];
    live.read_at(&mut b, OLD - 4096).unwrap();
    assert_eq!(b, [7; 4096]);
    // The chain handed in is no longer the guest's.
    assert!(matches!(
        resize_live(&live, &disk, NEW, false).unwrap_err(),
        meta_ops::ResizeError::NotLive
    ));
    live.flush().unwrap();
    drop(live);
    drop(disk);
    let d = Disk::open(&top, &OpenOptions::new()).unwrap();
    d.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [8; 4096]);

    // A VHD child cannot outgrow its parent.
    let (top, _) = chains::build(dir.path(), Kind::Vhd, 2, OLD, 4);
    let disk = Arc::new(Disk::open(&top, &OpenOptions::new()).unwrap());
    let live = LiveDisk::new(disk.clone());
    assert!(matches!(
        resize_live(&live, &disk, NEW, false).unwrap_err(),
        meta_ops::ResizeError::ParentSmaller { parent } if parent == OLD
    ));
    live.write_at(&[9; 4096], 0).unwrap();
}

/// The whole path: a guest behind the vhost-user backend serving the `LiveDisk` sees the
/// online resize (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG, then the new capacity) and can use the
/// new space; a request there was refused before.
#[test]
fn a_vhost_user_frontend_sees_the_online_resize() {
    use block_io::vhost_user::client::{Client, ClientOptions};
    use block_io::vhost_user::request::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
    use block_io::vhost_user::{ServerOptions, VhostUserBlkServer};

    let dir = tempfile::tempdir().unwrap();
    let (top, _) = chains::build(dir.path(), Kind::Vhdx, 1, OLD, 5);
    let disk = Arc::new(Disk::open(&top, &OpenOptions::new()).unwrap());
    let live = LiveDisk::new(disk.clone());
    let sock = dir.path().join("vub.sock");
    let mut server =
        VhostUserBlkServer::bind(&sock, live.clone(), &ServerOptions::default()).unwrap();
    let (stop, config) = (server.stop_handle(), server.config_handle());
    let serving = std::thread::spawn(move || server.serve());
    let mut c = Client::connect(&sock, &ClientOptions::default()).unwrap();
    c.watch_config_changes().unwrap();
    assert_eq!(c.config().capacity, OLD / 512);
    assert_eq!(c.read(OLD / 512, 4096).unwrap().0, VIRTIO_BLK_S_IOERR);

    let r = resize_live(&live, &disk, NEW, false).unwrap();
    let announce = std::thread::spawn(move || config.refresh());
    assert_eq!(c.wait_config_change(Duration::from_secs(10)).unwrap(), 1);
    assert!(announce.join().unwrap().unwrap());
    assert_eq!(c.read_config().unwrap().capacity, NEW / 512);
    let data = vec![0x3C; 4096];
    assert_eq!(c.write(OLD / 512, &data).unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(c.flush().unwrap(), VIRTIO_BLK_S_OK);
    assert_eq!(
        c.read(OLD / 512, 4096).unwrap(),
        (VIRTIO_BLK_S_OK, data.clone())
    );
    c.close();
    stop.stop();
    serving.join().unwrap().unwrap();
    drop((live, disk, r));
    let d = Disk::open(&top, &OpenOptions::new()).unwrap();
    let mut b = vec![0u8; 4096];
    d.read_at(&mut b, OLD).unwrap();
    assert_eq!(b, data);
}

/// A forced VHDX shrink under a guest writing and reading the part that stays: every read
/// matches, requests past the new end are refused afterwards, the reopened image has the new
/// size and the guest's data.
#[test]
fn forced_shrink_vhdx_under_guest_io() {
    const KEEP: u64 = 4 << 20;
    let dir = tempfile::tempdir().unwrap();
    let (top, initial) = chains::build(dir.path(), Kind::Vhdx, 1, OLD, 11);
    let disk = Arc::new(Disk::open(&top, &OpenOptions::new()).unwrap());
    let live = LiveDisk::new(disk.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let guest = {
        let (live, stop) = (live.clone(), stop.clone());
        let mut model = initial[..KEEP as usize].to_vec();
        std::thread::spawn(move || {
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            let mut buf = vec![0u8; BLK as usize];
            let mut bad = 0u64;
            let mut seq = 0u8;
            while !stop.load(Ordering::Acquire) {
                let off = rng.random_range(0..KEEP / BLK) * BLK;
                let r = off as usize..(off + BLK) as usize;
                if rng.random_bool(0.5) {
                    seq = seq.wrapping_add(1);
                    let data = vec![seq; BLK as usize];
                    live.write_at(&data, off).unwrap();
                    model[r].copy_from_slice(&data);
                } else {
                    live.read_at(&mut buf, off).unwrap();
                    bad += u64::from(buf[..] != model[r]);
                }
            }
            live.flush().unwrap();
            (bad, model)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let r = resize_live(&live, &disk, KEEP, true).unwrap();
    assert_eq!((r.old_size, r.new_size), (OLD, KEEP));
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Release);
    let (bad, model) = guest.join().unwrap();
    assert_eq!(bad, 0);
    let mut b = vec![0u8; 4096];
    assert_eq!(
        live.read_at(&mut b, KEEP).unwrap_err().kind(),
        ErrorKind::OutOfRange
    );
    drop((live, disk, r));
    let d = Disk::open(&top, &OpenOptions::new()).unwrap();
    assert_eq!(d.info().virtual_size, KEEP);
    let mut got = vec![0u8; KEEP as usize];
    d.read_at(&mut got, 0).unwrap();
    assert!(
        got == model,
        "the reopened image differs from the guest's model"
    );
}
