//! `spindle img convert`: parallel, allocation-aware copy between images.

use super::progress::Progress;
use super::{cache_arg, format_arg, parse_opts, size_arg};
use crate::error::{CliResult, Error};
use spindle_block::formats::qcow2::CreateOptions;
use spindle_block::{Format, Node, SgList};
use spindle_io::{spawn, AlignedBuf, CacheMode};
use std::cell::Cell;
use std::rc::Rc;

#[derive(clap::Args)]
pub struct Args {
    /// Look at an image another process writes (qemu-img's -U): skip the
    /// image lock's check against writers.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Source format (probed if not given).
    #[arg(short = 'f')]
    src_format: Option<String>,
    /// Output format.
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Compress the output (qcow2).
    #[arg(short = 'c')]
    compress: bool,
    /// Output options (as for create).
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Show a progress bar.
    #[arg(short = 'p')]
    progress: bool,
    /// Parallel requests.
    #[arg(short = 'm', default_value_t = 8)]
    parallel: usize,
    /// Out-of-order writes. Always on: each 2 MiB chunk lands contiguously on
    /// the host, so parallel writes do not fragment the image.
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Output cache mode (default: none where the file system supports
    /// O_DIRECT, else writeback; the output is flushed before exit).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Source cache mode (default: none where supported, else writeback).
    #[arg(short = 'T')]
    src_cache: Option<String>,
    /// Minimum run of zeroes turned into holes (0 = write everything).
    #[arg(short = 'S', default_value = "4k")]
    sparse: String,
    /// Backing file of the output.
    #[arg(short = 'B')]
    backing: Option<String>,
    /// Use an existing output image; do not create it.
    #[arg(short = 'n')]
    no_create: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Source image.
    source: String,
    /// Output image.
    target: String,
}

const CHUNK: u64 = 2 << 20;

struct Job {
    src: Node,
    dst: Node,
    size: u64,
    chunk: u64,
    sparse: u64,
    /// Zero ranges may be skipped: the fresh target already reads as zeroes.
    target_zeroed: bool,
    compress: bool,
    next: Cell<u64>,
    bar: Option<Progress>,
}

pub async fn run(a: Args) -> CliResult<()> {
    let out_fmt: Format = a.out_format.parse()?;
    let src_fmt = format_arg(&a.src_format)?;
    let src_access = super::Access::Copy {
        force_share: a.force_share,
    };
    let src = match &a.src_cache {
        Some(_) => super::open(
            &a.source,
            src_fmt,
            cache_arg(&a.src_cache, CacheMode::Writeback)?,
            src_access,
        )?,
        None => super::open_direct_if_possible(&a.source, src_fmt, src_access)?,
    };
    let size = src.size();
    let pairs = parse_opts(&a.options)?;
    if a.compress && out_fmt != Format::Qcow2 {
        return Err(Error::Usage(format!(
            "-c needs an output format that supports compression (qcow2), not {}",
            out_fmt.name()
        )));
    }
    if a.parallel == 0 || a.parallel > 1024 {
        return Err(Error::Usage(
            "-m takes a number of parallel requests from 1 to 1024".into(),
        ));
    }
    let sparse = size_arg(&a.sparse)?;
    // An NBD export exists already: it is written, never created (as
    // qemu-img's convert to an NBD URI), and holds raw data.
    let nbd_target = spindle_block::protocols::nbd::is_nbd_spec(&a.target);
    if nbd_target && (out_fmt != Format::Raw || a.backing.is_some()) {
        return Err(Error::Usage(format!(
            "{}: an NBD target takes raw data (-O raw) and no backing file (-B)",
            a.target
        )));
    }
    if !a.no_create && !nbd_target {
        let mut base = CreateOptions {
            size,
            backing_file: a.backing.clone(),
            ..Default::default()
        };
        if let Some(b) = &a.backing {
            let bpath = spindle_block::backing_path(std::path::Path::new(&a.target), b)?;
            base.backing_format = Some(spindle_block::probe(&bpath)?.name().to_string());
        }
        super::create::create_image(&a.target, out_fmt, &pairs, base).await?;
    }
    let dst = match &a.cache {
        Some(_) => super::open(
            &a.target,
            Some(out_fmt),
            cache_arg(&a.cache, CacheMode::Writeback)?,
            super::Access::Write,
        )?,
        None => super::open_direct_if_possible(&a.target, Some(out_fmt), super::Access::Write)?,
    };
    if dst.size() < size {
        return Err(Error::Usage(format!(
            "{}: output image is smaller than the source",
            a.target
        )));
    }
    let chunk = match &dst {
        Node::Qcow2(q) => CHUNK.max(q.cluster_size()),
        _ => CHUNK,
    };
    let bar = (a.progress && !a.quiet).then(|| Progress::new(size));
    let job = Rc::new(Job {
        src,
        dst,
        size,
        chunk,
        sparse,
        target_zeroed: !a.no_create && !nbd_target && a.backing.is_none(),
        compress: a.compress,
        next: Cell::new(0),
        bar,
    });
    let workers: Vec<_> = (0..a.parallel).map(|_| spawn(worker(job.clone()))).collect();
    let mut result = Ok(());
    for w in workers {
        if let Err(e) = w.await {
            result = Err(e);
        }
    }
    if let Some(b) = &job.bar {
        b.finish();
    }
    result?;
    Ok(job.dst.close().await?)
}

async fn worker(job: Rc<Job>) -> CliResult<()> {
    // One buffer per worker: the I/O goes zero-copy into it (as an
    // SgList), and between its reads and writes the worker looks at it.
    let mut sg = SgList::owned(AlignedBuf::new(job.chunk as usize, 4096));
    loop {
        let start = job.next.get();
        if start >= job.size {
            return Ok(());
        }
        let len = job.chunk.min(job.size - start);
        job.next.set(start + len);
        let chunk = sg.slice(0, len as usize);
        let regions = read_chunk(&job, start, &chunk).await?;
        drop(chunk);
        let buf = sg
            .into_buf()
            .map_err(|_| Error::Usage("convert buffer still in use".into()))?;
        // Classify and compress from the bytes; no I/O uses them now.
        let regions = classify(&job, &buf[..len as usize], &regions);
        sg = SgList::owned(buf);
        write_chunk(&job, start, &sg.slice(0, len as usize), &regions).await?;
        if let Some(b) = &job.bar {
            b.inc(len);
        }
    }
}

/// Reads a chunk; returns (offset in chunk, length, is_hole) ranges: holes
/// of the source are zero-filled, not read.
async fn read_chunk(job: &Job, start: u64, data: &SgList) -> CliResult<Vec<(usize, usize, bool)>> {
    let len = data.len() as u64;
    let mut ranges = Vec::new();
    let mut pos = 0;
    while pos < len {
        let ext = job.src.map_extent(start + pos, len - pos).await?;
        let n = ext.len.min(len - pos).max(1);
        let part = data.slice(pos as usize, n as usize);
        if ext.zero && !ext.data {
            // The buffer holds the previous chunk: paths that write it whole
            // (compression) must see zeroes here.
            part.fill_zero();
            ranges.push((pos as usize, n as usize, true));
        } else {
            job.src.read(start + pos, &part).await?;
            ranges.push((pos as usize, n as usize, false));
        }
        pos += n;
    }
    Ok(ranges)
}

/// The data/zero regions to write: holes stay zero, read ranges are split
/// at `-S` granularity.
fn classify(job: &Job, data: &[u8], ranges: &[(usize, usize, bool)]) -> Vec<(usize, usize, bool)> {
    let mut regions = Vec::new();
    for &(off, n, hole) in ranges {
        if hole {
            regions.push((off, n, true));
        } else {
            split_sparse(&data[off..off + n], off, job.sparse as usize, &mut regions);
        }
    }
    regions
}

/// Splits data into data/zero regions at `sparse` granularity.
fn split_sparse(part: &[u8], base: usize, sparse: usize, out: &mut Vec<(usize, usize, bool)>) {
    if sparse == 0 {
        out.push((base, part.len(), false));
        return;
    }
    for (i, blk) in part.chunks(sparse).enumerate() {
        let zero = blk.iter().all(|&b| b == 0);
        let off = base + i * sparse;
        match out.last_mut() {
            Some((o, l, z)) if *z == zero && *o + *l == off => *l += blk.len(),
            _ => out.push((off, blk.len(), zero)),
        }
    }
}

async fn write_chunk(job: &Job, start: u64, data: &SgList, regions: &[(usize, usize, bool)]) -> CliResult<()> {
    if job.compress {
        if let Node::Qcow2(q) = &job.dst {
            let cs = q.cluster_size() as usize;
            let mut c = vec![0u8; cs];
            for i in 0..data.len().div_ceil(cs) {
                let n = cs.min(data.len() - i * cs);
                let part = data.slice(i * cs, n);
                let off = start + (i * cs) as u64;
                if job.target_zeroed && part.is_zero() {
                    continue;
                }
                if n == cs {
                    part.copy_to(&mut c);
                    q.write_compressed(off / cs as u64, &c).await?;
                } else {
                    job.dst.write(off, &part, false).await?;
                }
            }
            return Ok(());
        }
    }
    for &(off, len, zero) in regions {
        let pos = start + off as u64;
        if zero {
            if !job.target_zeroed {
                job.dst.write_zeroes(pos, len as u64, true).await?;
            }
        } else {
            job.dst.write(pos, &data.slice(off, len), false).await?;
        }
    }
    Ok(())
}
