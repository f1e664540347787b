//! `spindle img snapshot`: qemu-img's snapshot command, plus VM state in and
//! out (`--vmstate`).

use super::format_arg;
use crate::error::{CliResult, Error};
use spindle_block::formats::qcow2::{snapshot::Snapshot, VmStateOptions};
use spindle_block::{BlockError, Node};
use spindle_io::CacheMode;
use std::io::{Read, Write};

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("op").required(true).args(["list", "create", "apply", "delete", "extract"])))]
pub struct Args {
    /// Look at an image another process writes (qemu-img's -U): skip the
    /// image lock's check against writers.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// List snapshots.
    #[arg(short = 'l')]
    list: bool,
    /// Create a snapshot.
    #[arg(short = 'c', value_name = "NAME")]
    create: Option<String>,
    /// Revert the disk to a snapshot (id or name).
    #[arg(short = 'a', value_name = "SNAPSHOT")]
    apply: Option<String>,
    /// Delete a snapshot (id or name).
    #[arg(short = 'd', value_name = "SNAPSHOT")]
    delete: Option<String>,
    /// Write a snapshot's VM state to --vmstate.
    #[arg(short = 'x', value_name = "SNAPSHOT")]
    extract: Option<String>,
    /// VM state source (with -c) or destination (with -x): a path, `-` for
    /// stdin/stdout, or `unix:PATH` to accept one connection (QEMU's
    /// `migrate unix:PATH`).
    #[arg(long, value_name = "PATH")]
    vmstate: Option<String>,
    /// VM state request size in bytes (rounded to the cluster size).
    #[arg(long, default_value_t = 1 << 20)]
    vmstate_chunk: usize,
    /// VM state writes in flight (saving).
    #[arg(long, default_value_t = 8)]
    vmstate_depth: usize,
    /// VM state chunks read ahead (extracting).
    #[arg(long, default_value_t = 16)]
    vmstate_read_ahead: usize,
    /// Cache mode (default: none where supported, else writeback).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Format (must be qcow2).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image file.
    filename: String,
}

/// qemu-img's list layout.
pub fn list(snaps: &[Snapshot]) -> String {
    let mut s = String::from("Snapshot list:\n");
    s += &format!(
        "{:<7} {:<17} {:>7} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for sn in snaps {
        let secs = sn.vm_clock_nsec / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (sn.vm_clock_nsec / 1_000_000) % 1000
        );
        let icount = match sn.icount {
            Some(u64::MAX) | None => "--".to_string(),
            Some(n) => n.to_string(),
        };
        s += &format!(
            "{:<7} {:<17} {:>7} {:>19} {:>15} {:>10}\n",
            spindle_block::printable(&sn.id),
            spindle_block::printable(&sn.name),
            super::human_size(sn.vm_state_size),
            local_time(sn.date_sec as i64),
            clock,
            icount
        );
    }
    s
}

/// `secs` since the epoch as local time, as qemu-img prints snapshot dates.
pub fn local_time(secs: i64) -> String {
    // SAFETY: localtime_r fills the tm we pass; time_t is i64 here.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&secs, &mut tm);
        tm
    };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// Opens the VM state source.
fn source(spec: &str) -> CliResult<Box<dyn Read + Send>> {
    let err = |e| BlockError::Io {
        path: spec.into(),
        context: "cannot open the VM state source",
        source: e,
    };
    Ok(match spec {
        "-" => Box::new(std::io::stdin()),
        s if s.starts_with("unix:") => Box::new(accept_one(&s[5..]).map_err(err)?),
        path => Box::new(std::fs::File::open(path).map_err(err)?),
    })
}

/// Listens on a unix socket and accepts one connection (QEMU connects to it
/// for `migrate unix:PATH`).
fn accept_one(path: &str) -> std::io::Result<std::os::unix::net::UnixStream> {
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path)?;
    let (s, _) = l.accept()?;
    let _ = std::fs::remove_file(path);
    Ok(s)
}

/// Where extracted VM state goes.
enum Sink {
    Stdout(std::io::Stdout),
    File(std::fs::File),
    Socket(std::os::unix::net::UnixStream),
}

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Stdout(s) => s.write(b),
            Sink::File(f) => f.write(b),
            Sink::Socket(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Stdout(s) => s.flush(),
            Sink::File(f) => f.flush(),
            Sink::Socket(s) => s.flush(),
        }
    }
}

fn sink(spec: &str) -> CliResult<Sink> {
    let err = |e| BlockError::Io {
        path: spec.into(),
        context: "cannot open the VM state destination",
        source: e,
    };
    Ok(match spec {
        "-" => Sink::Stdout(std::io::stdout()),
        s if s.starts_with("unix:") => Sink::Socket(accept_one(&s[5..]).map_err(err)?),
        path => Sink::File(std::fs::File::create(path).map_err(err)?),
    })
}

pub async fn run(a: Args) -> CliResult<()> {
    let read_only = a.list || a.extract.is_some();
    let access = super::Access::of(read_only, a.force_share, &a.filename)?;
    let fmt = format_arg(&a.format)?;
    let node = match &a.cache {
        Some(_) => super::open(&a.filename, fmt, super::cache_arg(&a.cache, CacheMode::None)?, access)?,
        None => super::open_direct_if_possible(&a.filename, fmt, access)?,
    };
    let Node::Qcow2(q) = &node else {
        return Err(Error::Usage(format!("{}: snapshots need a qcow2 image", a.filename)));
    };
    if a.vmstate_chunk == 0 || a.vmstate_chunk > 64 << 20 {
        return Err(Error::Usage("--vmstate-chunk must be from 1 byte to 64M".into()));
    }
    if !(1..=256).contains(&a.vmstate_depth) || !(1..=256).contains(&a.vmstate_read_ahead) {
        return Err(Error::Usage(
            "--vmstate-depth and --vmstate-read-ahead must be from 1 to 256".into(),
        ));
    }
    let opts = VmStateOptions {
        chunk: a.vmstate_chunk,
        depth: a.vmstate_depth,
        read_ahead: a.vmstate_read_ahead,
    };
    if a.vmstate.is_some() && a.create.is_none() && a.extract.is_none() {
        return Err(Error::Usage(
            "--vmstate goes with -c (source) or -x (destination)".into(),
        ));
    }
    if a.list {
        print!("{}", list(&q.snapshot_list().await));
        return Ok(());
    }
    if let Some(name) = &a.create {
        match &a.vmstate {
            Some(src) => {
                q.save_vmstate(name, source(src)?, opts).await?;
            }
            None => {
                q.snapshot_create(name, 0, 0).await?;
            }
        }
    } else if let Some(sn) = &a.apply {
        q.snapshot_apply(sn).await?;
    } else if let Some(sn) = &a.delete {
        q.snapshot_delete(sn).await?;
    } else if let Some(sn) = &a.extract {
        let Some(dst) = &a.vmstate else {
            return Err(Error::Usage(
                "-x needs --vmstate DST (a path, - for stdout, or unix:PATH)".into(),
            ));
        };
        let (_, out) = q.load_vmstate(sn, sink(dst)?, opts).await?;
        // Durable on exit when the destination is a regular file (devices
        // such as /dev/null cannot be synced).
        if let Sink::File(f) = &out {
            if f.metadata().map(|m| m.is_file()).unwrap_or(false) {
                f.sync_all().map_err(|e| BlockError::Io {
                    path: dst.into(),
                    context: "fsync failed",
                    source: e,
                })?;
            }
        }
        return Ok(());
    }
    Ok(node.close().await?)
}
