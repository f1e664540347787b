//! `spindle bench`: a load generator on libblkio's `blkio` crate.
//!
//! A vhost-user socket is driven through blkio's `virtio-blk-vhost-user`
//! driver (an independent virtio-blk driver in user space); a file or
//! block device through blkio's `io_uring` driver with O_DIRECT. Each
//! queue runs on its own thread with `--iodepth` requests in flight.

mod job;
mod pattern;

use crate::error::{CliResult, Error};
use crate::img::size_arg;
use blkio::Blkio;
use clap::Args as ClapArgs;
use job::{Job, QueueResult, Rw};
use serde_json::json;
use spindle_export::stats::Histogram;
use std::os::unix::fs::FileTypeExt;
use std::time::{Duration, Instant};

#[derive(ClapArgs)]
pub struct Args {
    /// A vhost-user-blk socket, or a file or block device.
    target: String,
    /// randread, randwrite, read, write or randrw (50% reads).
    #[arg(long, default_value = "randread")]
    rw: String,
    /// Request size.
    #[arg(long, default_value = "4k")]
    bs: String,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32)]
    iodepth: usize,
    /// Queues, each on its own thread.
    #[arg(long, default_value_t = 1)]
    queues: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    runtime: f64,
    /// Stop each queue once N reads and writes completed, or at
    /// `--runtime`, whichever comes first (fio's `number_ios`): the same
    /// amount of work however fast the target is.
    #[arg(long)]
    number_ios: Option<u64>,
    /// Only use the first SIZE bytes of the device.
    #[arg(long)]
    size: Option<String>,
    /// Write a pattern, check every read of a written block, then read back
    /// and check every block written.
    #[arg(long)]
    verify: bool,
    /// Issue a flush every N writes (0: never).
    #[arg(long, default_value_t = 0)]
    flush_every: u64,
    /// Submit the replacements for everything that completed together as
    /// one batch (default: each request as soon as its slot frees, as fio).
    #[arg(long)]
    batch_submit: bool,
    /// Busy-poll for completions instead of sleeping until the server's
    /// interrupt (libblkio poll queues; vhost-user sockets only). Like fio's
    /// `hipri`: shows what the server delivers without the client's
    /// wake-up cost, at the price of one busy CPU per queue.
    #[arg(long)]
    poll: bool,
    /// human or json.
    #[arg(long, default_value = "human")]
    output: String,
}

fn err(msg: String) -> Error {
    Error::Usage(msg)
}

fn blkio_err(what: &str, target: &str, e: blkio::Error) -> Error {
    Error::peer(target, format!("{what}: {}", e.message()))
}

/// Runs the benchmark; exit code 1 when a request failed or data did not verify.
pub fn run(a: Args) -> CliResult<u8> {
    let rw: Rw = a.rw.parse().map_err(err)?;
    let bs = size_arg(&a.bs)?;
    if bs == 0 || bs % 512 != 0 || bs > 16 << 20 {
        return Err(err(format!("--bs {bs} must be a multiple of 512 up to 16M")));
    }
    if !(1..=1024).contains(&a.iodepth) {
        return Err(err(format!("--iodepth {} must be from 1 to 1024", a.iodepth)));
    }
    if !(1..=64).contains(&a.queues) {
        return Err(err(format!("--queues {} must be from 1 to 64", a.queues)));
    }
    if !(a.runtime > 0.0 && a.runtime <= 86400.0) {
        return Err(err(format!("--runtime {} must be from 0 to 86400 seconds", a.runtime)));
    }
    let json = match a.output.as_str() {
        "human" => false,
        "json" => true,
        o => return Err(err(format!("--output {o}: use human or json"))),
    };
    let is_socket = std::fs::metadata(&a.target)
        .map_err(|e| err(format!("{}: {e}", a.target)))?
        .file_type()
        .is_socket();
    let driver = if is_socket { "virtio-blk-vhost-user" } else { "io_uring" };
    let t = &a.target;
    let mut b = Blkio::new(driver).map_err(|e| blkio_err("cannot create driver", t, e))?;
    b.set_str("path", t).map_err(|e| blkio_err("path", t, e))?;
    if !is_socket {
        b.set_bool("direct", true).map_err(|e| blkio_err("direct", t, e))?;
    }
    if rw.reads_only() && !a.verify {
        let _ = b.set_bool("read-only", true);
    }
    if a.poll && !is_socket {
        return Err(err(format!(
            "{t}: --poll needs a vhost-user socket (a file's io_uring cannot poll here)"
        )));
    }
    b.connect().map_err(|e| blkio_err("cannot connect", t, e))?;
    // All queues are interrupt-driven, or all are poll queues.
    let (irq, poll) = if a.poll { (0, a.queues) } else { (a.queues, 0) };
    for (prop, n) in [("num-queues", irq), ("num-poll-queues", poll)] {
        b.set_i32(prop, n as i32).map_err(|e| blkio_err(prop, t, e))?;
    }
    let capacity = b.get_u64("capacity").map_err(|e| blkio_err("capacity", t, e))?;
    let size = match &a.size {
        Some(s) => size_arg(s)?.min(capacity),
        None => capacity,
    };
    let blocks = size / bs;
    if blocks < (a.queues * a.iodepth) as u64 {
        return Err(err(format!(
            "{t}: {size} bytes hold {blocks} blocks of {bs}; need at least queues x iodepth"
        )));
    }
    let started = b.start().map_err(|e| blkio_err("cannot start", t, e))?;
    let align = b.get_u64("mem-region-alignment").unwrap_or(4096).max(4096);
    let runtime = Duration::from_secs_f64(a.runtime);
    let max_ios = a.number_ios.unwrap_or(u64::MAX);
    if max_ios == 0 {
        return Err(err("--number-ios must be at least 1".into()));
    }
    let mut jobs = Vec::new();
    let queues = if a.poll { started.poll_queues } else { started.queues };
    for (i, q) in queues.into_iter().enumerate() {
        let len = (a.iodepth as u64 * bs).div_ceil(align) * align;
        let region = b
            .alloc_mem_region(len as usize)
            .map_err(|e| blkio_err("cannot allocate buffers", t, e))?;
        b.map_mem_region(&region)
            .map_err(|e| blkio_err("cannot map buffers", t, e))?;
        jobs.push(Job::new(
            q,
            region,
            i,
            a.queues,
            rw,
            bs,
            a.iodepth,
            blocks,
            a.verify,
            a.flush_every,
            a.batch_submit,
        ));
    }
    let start = Instant::now();
    let results: Vec<QueueResult> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|j| s.spawn(move || j.run(runtime, max_ios)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| QueueResult {
                    errors: 1,
                    first_error: Some("a queue thread panicked".into()),
                    ..Default::default()
                })
            })
            .collect()
    });
    let elapsed = results
        .iter()
        .map(|r| r.elapsed)
        .fold(Duration::ZERO, Duration::max)
        .max(start.elapsed().min(runtime));
    let mut hist = Histogram::default();
    let (mut ios, mut bytes, mut errors, mut checked, mut failures, mut flushes) = (0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut reads = 0u64;
    let mut first_error = None;
    for r in &results {
        hist.merge(&r.hist);
        ios += r.ios;
        bytes += r.bytes;
        reads += r.reads;
        errors += r.errors;
        checked += r.checked;
        failures += r.failures;
        flushes += r.flushes;
        first_error = first_error.or(r.first_error.clone());
    }
    let secs = elapsed.as_secs_f64().max(1e-9);
    let iops = ios as f64 / secs;
    let bw = bytes as f64 / secs;
    let us = |p| hist.percentile(p) as f64 / 1000.0;
    if json {
        println!(
            "{}",
            json!({
                "target": t, "driver": driver, "rw": a.rw, "bs": bs, "iodepth": a.iodepth,
                "queues": a.queues, "runtime_s": secs, "ios": ios, "iops": iops,
                "reads": reads, "writes": ios - reads, "read_bytes": reads * bs, "written_bytes": bytes - reads * bs,
                "bw_bytes": bw, "lat_us": {"p50": us(50.0), "p99": us(99.0), "p999": us(99.9)},
                "errors": errors, "flushes": flushes, "first_error": first_error,
                "verify": {"enabled": a.verify, "checked": checked, "failures": failures},
            })
        );
    } else {
        println!(
            "{} bs={} iodepth={} queues={} {:.1}s on {} ({driver})",
            a.rw, bs, a.iodepth, a.queues, secs, t
        );
        println!(
            "  IOPS {:.0}   bandwidth {:.1} MiB/s   latency us p50 {:.1}  p99 {:.1}  p99.9 {:.1}   errors {}",
            iops,
            bw / (1 << 20) as f64,
            us(50.0),
            us(99.0),
            us(99.9),
            errors
        );
        if a.verify {
            println!("  verify: {checked} blocks checked, {failures} wrong");
        }
        if flushes > 0 {
            println!("  flushes: {flushes}");
        }
    }
    if let Some(e) = first_error {
        eprintln!("spindle: bench: first failed request: {e}");
    }
    Ok(u8::from(errors > 0 || failures > 0))
}
