//! `spindle img`: qemu-img's job with qemu-img's names and flags.

mod amend;
mod bench;
mod check;
mod commit;
mod compare;
mod convert;
mod create;
mod dd;
mod info;
mod map;
mod measure;
mod progress;
mod rebase;
mod resize;
pub mod snapshot;

use crate::error::{CliResult, Error};
use clap::{Args, Subcommand};
use spindle_block::formats::qcow2::Qcow2Options;
use spindle_block::{open_image, BlockError, Format, Node, OpenConfig, Sharing};
use spindle_io::{CacheMode, EngineKind, Runtime, RuntimeConfig};

/// Errors of the CLI: one line each.

#[derive(Args)]
pub struct ImgArgs {
    #[command(subcommand)]
    cmd: ImgCmd,
    /// I/O engine (io_uring, native, threads).
    #[arg(long, global = true, default_value = "io_uring")]
    aio: String,
    /// qcow2 L2 cache size in bytes (default: enough to map the whole disk, up to 32M).
    #[arg(long, global = true)]
    l2_cache_size: Option<String>,
    /// qcow2 L2 cache entry (slice) size, 512 up to the cluster size (default: one cluster).
    #[arg(long, global = true)]
    l2_cache_entry_size: Option<String>,
    /// Worker threads of the `threads` engine (1 to 256).
    #[arg(long, global = true, default_value_t = 8)]
    aio_threads: usize,
    /// Test only: fail a planned metadata write or flush of every qcow2
    /// image the command opens, like QEMU's blkdebug (see docs/testing.md).
    #[arg(long = "x-inject-error", global = true, hide = true)]
    inject_error: Option<String>,
}

#[derive(Subcommand)]
enum ImgCmd {
    /// Create an image.
    Create(create::Args),
    /// Show information about an image.
    Info(info::Args),
    /// Check an image's consistency (exit 0 clean, 1 failed, 2 corrupt, 3 leaks).
    Check(check::Args),
    /// Convert an image to another format.
    Convert(convert::Args),
    /// Compare two images' contents.
    Compare(compare::Args),
    /// Show how the image's ranges are stored.
    Map(map::Args),
    /// Estimate the file size an image needs.
    Measure(measure::Args),
    /// Change the virtual size.
    Resize(resize::Args),
    /// Change qcow2 options (compat, lazy_refcounts) in place.
    Amend(amend::Args),
    /// Change the backing file (safe: keeps the guest's view; -u: header only).
    Rebase(rebase::Args),
    /// Write the image's data into its backing file.
    Commit(commit::Args),
    /// Copy with dd-style operands.
    Dd(dd::Args),
    /// List, create, apply, delete snapshots; move VM state in and out.
    Snapshot(snapshot::Args),
    /// Run a simple I/O benchmark.
    Bench(bench::Args),
}

/// Runs an `img` subcommand; returns the process exit code.
pub fn run(a: ImgArgs) -> CliResult<u8> {
    let mut engine: EngineKind = a.aio.parse()?;
    if let ImgCmd::Bench(b) = &a.cmd {
        engine = b.engine()?.unwrap_or(engine);
    }
    NATIVE_AIO.store(engine == EngineKind::Native, std::sync::atomic::Ordering::Relaxed);
    let entry = a.l2_cache_entry_size.as_deref().map(size_arg).transpose()?;
    if let Some(e) = entry {
        if !e.is_power_of_two() || !(512..=(2 << 20)).contains(&e) {
            return Err(Error::Usage(format!(
                "--l2-cache-entry-size {e} must be a power of two from 512 to 2M"
            )));
        }
    }
    let _ = QCOW2_OPTIONS.set(Qcow2Options {
        l2_cache_size: a.l2_cache_size.as_deref().map(size_arg).transpose()?,
        l2_cache_entry_size: entry,
        repair: false,
        inject: a
            .inject_error
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(Error::Usage)?,
    });
    if !(1..=256).contains(&a.aio_threads) {
        return Err(Error::Usage(format!(
            "--aio-threads {} must be from 1 to 256",
            a.aio_threads
        )));
    }
    let rt = Runtime::new(RuntimeConfig {
        engine,
        depth: 256,
        threads: a.aio_threads,
    })?;
    match a.cmd {
        ImgCmd::Create(x) => rt.block_on(create::run(x)).map(|_| 0),
        ImgCmd::Info(x) => rt.block_on(info::run(x)).map(|_| 0),
        ImgCmd::Check(x) => rt.block_on(check::run(x)),
        ImgCmd::Convert(x) => rt.block_on(convert::run(x)).map(|_| 0),
        ImgCmd::Compare(x) => rt.block_on(compare::run(x)),
        ImgCmd::Map(x) => rt.block_on(map::run(x)).map(|_| 0),
        ImgCmd::Measure(x) => rt.block_on(measure::run(x)).map(|_| 0),
        ImgCmd::Resize(x) => rt.block_on(resize::run(x)).map(|_| 0),
        ImgCmd::Amend(x) => rt.block_on(amend::run(x)).map(|_| 0),
        ImgCmd::Rebase(x) => rt.block_on(rebase::run(x)).map(|_| 0),
        ImgCmd::Commit(x) => rt.block_on(commit::run(x)).map(|_| 0),
        ImgCmd::Dd(x) => rt.block_on(dd::run(x)).map(|_| 0),
        ImgCmd::Snapshot(x) => rt.block_on(snapshot::run(x)).map(|_| 0),
        ImgCmd::Bench(x) => rt.block_on(bench::run(x)).map(|_| 0),
    }
}

/// Parses a `-f`/`-O` format name.
pub fn format_arg(f: &Option<String>) -> CliResult<Option<Format>> {
    Ok(f.as_deref().map(str::parse).transpose()?)
}

/// Parses a `-t`/`-T` cache mode.
pub fn cache_arg(c: &Option<String>, default: CacheMode) -> CliResult<CacheMode> {
    Ok(match c {
        Some(c) => c.parse()?,
        None => default,
    })
}

/// L2 cache tunables given on the command line.
static QCOW2_OPTIONS: std::sync::OnceLock<Qcow2Options> = std::sync::OnceLock::new();

/// What a command does with an image, which decides the image locks it
/// takes: QEMU's, as the same qemu-img command takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads and writes: others may only read.
    Write,
    /// A look, for a command without `-U` (a rebase's new backing file).
    Read,
    /// Reads a consistent image, for a command with `-U` (convert's source).
    Copy {
        /// `-U`/`--force-share`: let writers in.
        force_share: bool,
    },
    /// A look, for a command with `-U` (map, compare, check, ...): a raw
    /// image may be written meanwhile, a qcow2 image only with `-U`.
    Look {
        /// `-U`/`--force-share`.
        force_share: bool,
    },
    /// A look at the metadata only (`info`), with `-U`.
    Metadata {
        /// `-U`/`--force-share`.
        force_share: bool,
    },
}

impl Access {
    /// A look when `read_only`, else writable; `-U` with writing is an
    /// error, as in qemu-img.
    pub fn of(read_only: bool, force_share: bool, image: &str) -> CliResult<Access> {
        match (read_only, force_share) {
            (true, _) => Ok(Access::Look { force_share }),
            (false, false) => Ok(Access::Write),
            (false, true) => Err(Error::Usage(format!(
                "{image}: force-share (-U) can only be used with read-only images"
            ))),
        }
    }

    /// `Some(given)` when the command takes `-U`.
    fn force_share(self) -> Option<bool> {
        match self {
            Access::Copy { force_share } | Access::Look { force_share } | Access::Metadata { force_share } => {
                Some(force_share)
            }
            Access::Write | Access::Read => None,
        }
    }
}

/// Open settings for a command's image, with the command line's qcow2 tunables.
pub fn open_config(format: Option<Format>, cache: CacheMode, access: Access) -> OpenConfig {
    OpenConfig {
        format,
        cache,
        read_only: access != Access::Write,
        qcow2: QCOW2_OPTIONS.get().copied().unwrap_or_default(),
        sharing: match access {
            _ if access.force_share() == Some(true) => Sharing::All,
            Access::Read | Access::Look { .. } | Access::Metadata { .. } => Sharing::Look,
            Access::Write | Access::Copy { .. } => Sharing::Readers,
        },
        metadata_only: matches!(access, Access::Metadata { .. }),
        ..Default::default()
    }
}

/// Set when the command runs on native AIO.
static NATIVE_AIO: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Opens an image for a command.
pub fn open(spec: &str, format: Option<Format>, cache: CacheMode, access: Access) -> CliResult<Node> {
    open_with(spec, &open_config(format, cache, access), access)
}

/// Opens an image with settings from [`open_config`] (adjusted by the caller).
pub fn open_with(spec: &str, cfg: &OpenConfig, access: Access) -> CliResult<Node> {
    let node = open_image(spec, cfg).map_err(|e| suggest_force_share(e, access))?;
    if NATIVE_AIO.load(std::sync::atomic::Ordering::Relaxed) && !cfg.read_only {
        warn_native_on_sparse(&node);
    }
    Ok(node)
}

/// An image in use by a writer can still be looked at with `-U`.
fn suggest_force_share(e: BlockError, access: Access) -> Error {
    match e {
        BlockError::Setup(spindle_io::Error::InUse { held: true, .. }) if access.force_share() == Some(false) => {
            Error::Usage(format!("{e}; use -U for a read-only look"))
        }
        e => e.into(),
    }
}

/// Linux AIO blocks in io_submit when a write must allocate blocks of a
/// sparse file (or without O_DIRECT), which stalls the I/O thread.
fn warn_native_on_sparse(node: &Node) {
    let Some(file) = node.file() else { return };
    let why = if !file.cache().direct() {
        "files opened without O_DIRECT"
    } else if file.is_sparse() {
        "sparse files (writes allocate synchronously)"
    } else {
        return;
    };
    tracing::warn!(
        "{}: aio=native blocks on {why}; preallocate the image or use --aio io_uring",
        file.path().display()
    );
}

/// Parses a size argument like `10G` or `+1G` (the sign is handled by callers).
pub fn size_arg(s: &str) -> CliResult<u64> {
    spindle_block::parse_size(s).ok_or_else(|| Error::Usage(format!("invalid size '{s}' (e.g. 512, 64k, 10G)")))
}

/// qemu-img's human size: the unit keeps the value under 1000, then three
/// significant digits ("1 GiB", "196 KiB", "1.5 MiB", "0.977 MiB", "50 MiB").
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n == 0 {
        return "0 B".into();
    }
    // frexp(n / (1000/1024)) exponent, as QEMU's size_to_str.
    let e = (n as f64 / (1000.0 / 1024.0)).log2().floor() as i32 + 1;
    let i = (((e - 1) / 10).max(0) as usize).min(UNITS.len() - 1);
    let v = n as f64 / (1u64 << (i * 10)) as f64;
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else if v >= 1.0 {
        2
    } else {
        3
    };
    let mut t = format!("{v:.digits$}");
    if t.contains('.') {
        t = t.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{t} {}", UNITS[i])
}

/// Parses `-o key=value,key=value`; several `-o` are joined.
pub fn parse_opts(opts: &[String]) -> CliResult<Vec<(String, String)>> {
    let mut v = Vec::new();
    for o in opts {
        for kv in o.split(',').filter(|s| !s.is_empty()) {
            let (k, val) = kv.split_once('=').unwrap_or((kv, "on"));
            v.push((k.trim().to_string(), val.trim().to_string()));
        }
    }
    Ok(v)
}

/// Opens with O_DIRECT, or with the page cache where the file system has no
/// O_DIRECT (tmpfs) or the spec is no file (null:).
pub fn open_direct_if_possible(spec: &str, fmt: Option<Format>, access: Access) -> CliResult<Node> {
    match open(spec, fmt, CacheMode::None, access) {
        Err(e) if e.as_block().is_some_and(direct_refused) => open(spec, fmt, CacheMode::Writeback, access),
        other => other,
    }
}

/// Whether opening failed only because the file system refuses O_DIRECT.
pub fn direct_refused(e: &BlockError) -> bool {
    matches!(e, BlockError::Setup(spindle_io::Error::Open { source, .. }) if source.raw_os_error() == Some(libc::EINVAL))
}

#[cfg(test)]
mod tests {
    use super::human_size;

    #[test]
    fn human_sizes_like_qemu() {
        assert_eq!(human_size(1 << 30), "1 GiB");
        assert_eq!(human_size(196 * 1024), "196 KiB");
        assert_eq!(human_size(1536 * 1024), "1.5 MiB");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(50 << 20), "50 MiB");
        assert_eq!(human_size(1000 << 10), "0.977 MiB");
        assert_eq!(human_size(100 << 20), "100 MiB");
        assert_eq!(human_size(0), "0 B");
    }
}
