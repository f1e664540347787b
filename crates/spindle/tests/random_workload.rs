//! Randomised writes, zero writes, discards and flushes over a qcow2 with a
//! backing file, run concurrently, checked against an in-memory model and
//! then judged by qemu-img.

mod common;
use common::*;
use futures::future::join_all;
use rand::{Rng, SeedableRng};
use spindle_block::formats::qcow2::{create, CreateOptions, Qcow2Options};
use spindle_block::{open_image, Format, OpenConfig};
use spindle_io::{CacheMode, EngineKind, Runtime, RuntimeConfig};

#[derive(Clone, Copy, Debug)]
enum Op {
    Write(u64, usize, u8),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Flush,
}

fn workload(seed: u64, cluster_size: u64, extra: &str, engine: EngineKind, cache: CacheMode) {
    workload_with(seed, cluster_size, extra, engine, cache, Qcow2Options::default())
}

fn workload_with(seed: u64, cluster_size: u64, extra: &str, engine: EngineKind, cache: CacheMode, q: Qcow2Options) {
    need("qemu-img");
    let d = scratch();
    let size: u64 = 12 << 20;
    let base = at(&d, "base.raw");
    mixed_data(&base, size as usize, seed);
    let img = at(&d, "top.qcow2");
    let mut model = std::fs::read(&base).unwrap();
    let rt = Runtime::new(RuntimeConfig {
        engine,
        ..Default::default()
    })
    .unwrap();
    let ext_l2 = extra == "extended_l2";
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    rt.block_on(async {
        let opts = CreateOptions {
            size,
            cluster_size,
            extended_l2: ext_l2,
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            ..Default::default()
        };
        create(&img, &opts).await.unwrap();
        let cfg = OpenConfig {
            format: Some(Format::Qcow2),
            cache,
            qcow2: q,
            ..Default::default()
        };
        let node = open_image(p(&img), &cfg).unwrap();
        for round in 0..120 {
            // A batch of ops on disjoint byte ranges; neighbours often share clusters.
            let mut ops: Vec<Op> = Vec::new();
            let mut taken: Vec<(u64, u64)> = Vec::new();
            for _ in 0..rng.gen_range(1..10) {
                let len = match rng.gen_range(0..4) {
                    0 => rng.gen_range(1..1024),
                    1 => rng.gen_range(1..3 * cluster_size),
                    _ => rng.gen_range(1..300_000),
                }
                .min(size - 1);
                let off = rng.gen_range(0..size - len);
                if taken.iter().any(|&(a, b)| off < b && a < off + len) {
                    continue;
                }
                taken.push((off, off + len));
                ops.push(match rng.gen_range(0..10) {
                    0..=5 => Op::Write(off, len as usize, rng.gen_range(1..255)),
                    6 | 7 => Op::Zero(off, len, rng.gen()),
                    8 => Op::Discard(off, len),
                    _ => Op::Flush,
                });
            }
            let node = &node;
            let results = join_all(ops.iter().map(|&op| async move {
                match op {
                    Op::Write(off, len, v) => {
                        let b = vec![v; len];
                        node.write_from(off, &b, false).await
                    }
                    Op::Zero(off, len, unmap) => node.write_zeroes(off, len, unmap).await,
                    Op::Discard(off, len) => node.discard(off, len).await,
                    Op::Flush => node.flush().await,
                }
            }))
            .await;
            for (op, r) in ops.iter().zip(results) {
                r.unwrap_or_else(|e| panic!("seed {seed} round {round}: {op:?} failed: {e}"));
                match *op {
                    Op::Write(off, len, v) => model[off as usize..off as usize + len].fill(v),
                    Op::Zero(off, len, _) => model[off as usize..(off + len) as usize].fill(0),
                    Op::Discard(off, len) => {
                        // Whole clusters read as zeroes afterwards (a backing
                        // file is present); partial ones are untouched.
                        let cs = cluster_size;
                        let a = off.div_ceil(cs) * cs;
                        let b = if off + len == size { size } else { (off + len) / cs * cs };
                        if a < b {
                            model[a as usize..b as usize].fill(0);
                        }
                    }
                    Op::Flush => {}
                }
            }
            if round % 30 == 29 {
                let mut all = vec![0u8; size as usize];
                node.read_into(0, &mut all).await.unwrap();
                assert!(
                    all == model,
                    "seed {seed}: content differs from the model after round {round}"
                );
            }
        }
        node.close().await.unwrap();
    });
    assert_clean(&img);
    let out = at(&d, "out.raw");
    ok("qemu-img", &["convert", "-O", "raw", p(&img), p(&out)]);
    assert!(
        std::fs::read(&out).unwrap() == model,
        "seed {seed}: qemu-img reads something else than the model"
    );
}

#[test]
fn random_workload_4k_clusters_io_uring_direct() {
    workload(11, 4096, "", EngineKind::IoUring, CacheMode::None);
}

#[test]
fn random_workload_64k_clusters_native_aio() {
    workload(12, 65536, "", EngineKind::Native, CacheMode::None);
}

#[test]
fn random_workload_extended_l2_threads_writeback() {
    workload(13, 65536, "extended_l2", EngineKind::Threads, CacheMode::Writeback);
}

#[test]
fn random_workload_512b_clusters_writethrough() {
    workload(14, 512, "", EngineKind::IoUring, CacheMode::Writethrough);
}

/// A tiny L2 cache (four 512-byte slices) forces dirty slices out all the
/// time, through the refcounts-first write-back order.
#[test]
fn random_workload_tiny_l2_cache_evicts_dirty_slices() {
    let q = Qcow2Options {
        l2_cache_size: Some(2048),
        l2_cache_entry_size: Some(512),
        ..Default::default()
    };
    workload_with(15, 4096, "", EngineKind::IoUring, CacheMode::None, q);
}
