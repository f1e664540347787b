//! `spindle img bench`: like qemu-img bench.

use super::{cache_arg, format_arg, size_arg};
use crate::error::{CliResult, Error};
use spindle_block::{BlockError, SgList};
use spindle_io::{spawn, AlignedBuf, CacheMode, EngineKind};
use std::cell::Cell;
use std::rc::Rc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Look at an image another process writes (qemu-img's -U): skip the
    /// image lock's check against writers.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Number of requests.
    #[arg(short = 'c', default_value_t = 75000)]
    count: u64,
    /// Requests in flight.
    #[arg(short = 'd', default_value_t = 64)]
    depth: usize,
    /// Request size.
    #[arg(short = 's', default_value = "4k")]
    size: String,
    /// Step between request offsets (default: the request size).
    #[arg(short = 'S')]
    step: Option<String>,
    /// Start offset.
    #[arg(short = 'o', default_value = "0")]
    offset: String,
    /// Write instead of read.
    #[arg(short = 'w')]
    write: bool,
    /// Cache mode.
    #[arg(short = 't', default_value = "writeback")]
    cache: Option<String>,
    /// AIO engine (overrides --aio): threads, native, io_uring.
    #[arg(short = 'i')]
    aio: Option<String>,
    /// Byte pattern for writes.
    #[arg(long, default_value_t = 0xa5)]
    pattern: u8,
    /// Format (probed if not given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Image file.
    filename: String,
}

impl Args {
    /// The engine `-i` asks for, if any.
    pub fn engine(&self) -> CliResult<Option<EngineKind>> {
        Ok(match &self.aio {
            Some(i) => Some(i.parse()?),
            None => None,
        })
    }
}

pub async fn run(a: Args) -> CliResult<()> {
    bench(a).await
}

async fn bench(a: Args) -> CliResult<()> {
    let cache = cache_arg(&a.cache, CacheMode::Writeback)?;
    let access = super::Access::of(!a.write, a.force_share, &a.filename)?;
    let node = Rc::new(super::open(&a.filename, format_arg(&a.format)?, cache, access)?);
    let bs = size_arg(&a.size)?;
    let step = match &a.step {
        Some(s) => size_arg(s)?,
        None => bs,
    };
    let start = size_arg(&a.offset)?;
    if bs == 0 || bs > 64 << 20 || start + bs > node.size() {
        return Err(Error::Usage(format!(
            "request size {bs} at offset {start} does not fit the {}-byte image",
            node.size()
        )));
    }
    if a.depth == 0 || a.depth > 4096 {
        return Err(Error::Usage("-d takes a queue depth from 1 to 4096".into()));
    }
    println!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        a.count,
        if a.write { "write" } else { "read" },
        bs,
        a.depth,
        start,
        step
    );
    let next = Rc::new(Cell::new(0u64));
    let t0 = Instant::now();
    let workers: Vec<_> = (0..a.depth)
        .map(|_| {
            let (node, next) = (node.clone(), next.clone());
            let (count, write, pattern) = (a.count, a.write, a.pattern);
            spawn(async move {
                let mut b = AlignedBuf::new(bs as usize, 4096);
                b.fill(pattern);
                let buf = SgList::owned(b);
                let span = node.size() - start - bs + 1;
                loop {
                    let i = next.get();
                    if i >= count {
                        return Ok::<(), BlockError>(());
                    }
                    next.set(i + 1);
                    let off = start + (i * step) % span.max(1);
                    let sg = &buf;
                    let r = if write {
                        node.write(off, sg, false).await
                    } else {
                        node.read(off, sg).await
                    };
                    if r.is_err() {
                        next.set(count); // the others stop too
                        return r;
                    }
                }
            })
        })
        .collect();
    // Every worker ends before the first error is returned: no I/O may
    // still be in flight when the image is closed (and its locks go).
    let mut first = Ok(());
    for w in workers {
        first = first.and(w.await);
    }
    first?;
    if a.write {
        node.close().await?;
    }
    println!("Run completed in {:.3} seconds.", t0.elapsed().as_secs_f64());
    Ok(())
}
