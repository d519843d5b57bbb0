//! Many threads reading and writing one image at once: allocating writes, overwrites and
//! reads of distinct regions from several threads, flushes in between; everything reads back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use block_io::{BlockDevice, MemStorage};
use common::read_all;
use vhdx_format::{check_image, create, CreateOptions, ParentRef, VhdxFile};

fn hammer(dev: Arc<VhdxFile<Arc<MemStorage>>>, size: u64) -> Vec<u8> {
    let threads = 4u64;
    let per = size / threads;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let base = t * per;
                for round in 0..3u8 {
                    let mut off = base;
                    while off < base + per {
                        let len = (4096 * (1 + (off / 4096) % 7)).min(base + per - off);
                        let fill = (t as u8) << 4 | round;
                        dev.write_at(&vec![fill; len as usize], off).unwrap();
                        let mut back = vec![0u8; len as usize];
                        dev.read_at(&mut back, off).unwrap();
                        assert!(back.iter().all(|&b| b == fill));
                        off += len + 8192;
                    }
                    if t == 0 {
                        dev.flush().unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut model = vec![0u8; size as usize];
    for t in 0..threads {
        let base = t * per;
        let mut off = base;
        while off < base + per {
            let len = (4096 * (1 + (off / 4096) % 7)).min(base + per - off);
            model[off as usize..(off + len) as usize].fill((t as u8) << 4 | 2);
            off += len + 8192;
        }
    }
    model
}

#[test]
fn parallel_writers_and_readers() {
    let size = 8 << 20;
    for diff in [false, true] {
        let mem = Arc::new(MemStorage::new());
        let mut o = if diff {
            CreateOptions::differencing(
                size,
                ParentRef {
                    data_write_guid: uuid::Uuid::from_u128(1),
                    relative_path: "p".into(),
                    absolute_path: None,
                },
            )
        } else {
            CreateOptions::dynamic(size)
        };
        o.block_size = Some(1 << 20);
        let dev = Arc::new(create(mem.clone(), &o).unwrap());
        let model = hammer(dev.clone(), size);
        assert!(read_all(dev.as_ref()) == model);
        dev.close().unwrap();
        drop(dev);
        let r = check_image(mem.clone()).unwrap();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let again = VhdxFile::open(mem, &vhdx_format::OpenOptions::new().read_only(true)).unwrap();
        assert!(read_all(&again) == model);
    }
}
