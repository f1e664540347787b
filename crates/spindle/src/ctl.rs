//! `spindle ctl`: a client of the control socket (docs/control.md).

use crate::img::CliResult;
use crate::serve::ExportArgs;
use clap::{Args as ClapArgs, Subcommand};
use serde_json::{json, Value};
use spindle_block::BlockError;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

#[derive(ClapArgs)]
pub struct Args {
    /// The control socket of `spindle serve --control`.
    #[arg(long, short = 'c', value_name = "PATH")]
    control: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List the exports.
    List,
    /// Serve another image (hot plug); IMAGE and --vhost-user are required.
    Add {
        #[command(flatten)]
        export: ExportArgs,
        /// Require it to be offered over NBD too (the daemon's --nbd
        /// listener; without this flag it is offered whenever there is one).
        #[arg(long)]
        nbd: bool,
    },
    /// Stop serving an export (hot unplug); its image is flushed and closed.
    Remove {
        /// Export name.
        name: String,
    },
    /// Request statistics: requests, bytes, latency percentiles per operation.
    Stats {
        /// Export name.
        name: String,
    },
    /// Set an export's I/O limits (QEMU's names: iops-total=1000,bps-write=50M,…; `none` clears
    /// them); they apply from its next request (docs/operations.md).
    Throttle {
        /// Export name.
        name: String,
        /// The limits.
        limits: String,
    },
    /// Set (or make) a named throttle group's limits; exports join it with --throttle-group.
    ThrottleGroup {
        /// Group name.
        name: String,
        /// The limits.
        limits: String,
    },
    /// List the named throttle groups.
    ThrottleGroups,
    /// Switch named trace events on or off while the daemon runs: FILTER is added to the
    /// start-up filter (SPINDLE_LOG), e.g. 'spindle::qcow2::alloc=debug' or 'spindle::vhost=debug';
    /// `off` removes what was added; without FILTER, shows the filter and the named targets
    /// (docs/operations.md, "Tracing a slow device").
    Trace {
        /// `EnvFilter` directives, comma-separated, or `off`.
        filter: Option<String>,
    },
    /// Change an export's size.
    Resize {
        /// Export name.
        name: String,
        /// New size (e.g. 20G).
        size: String,
        /// Allow shrinking (loses the data beyond the new end).
        #[arg(long)]
        shrink: bool,
    },
    /// Create a qcow2 overlay on top of a running export's image and serve
    /// it (a live external snapshot; docs/jobs.md).
    Overlay {
        /// Export name.
        name: String,
        /// The new image (must not exist).
        image: PathBuf,
    },
    /// Merge the active layer (or --top) down into its backing file (or
    /// --base) while the guest runs, then serve the base (a background job).
    Commit {
        /// Export name.
        name: String,
        /// The image to merge into (default: the top's backing file).
        #[arg(long)]
        base: Option<PathBuf>,
        /// The layer to merge (default: the active layer).
        #[arg(long)]
        top: Option<PathBuf>,
        /// Copy at most this many bytes per second (e.g. 64M).
        #[arg(long)]
        speed: Option<String>,
    },
    /// Copy the backing chain's data into the top image while the guest
    /// runs, then drop the backing file (or keep --base); a background job.
    Stream {
        /// Export name.
        name: String,
        /// Keep this image (and those below it) as the backing file.
        #[arg(long)]
        base: Option<PathBuf>,
        /// Copy at most this many bytes per second (e.g. 64M).
        #[arg(long)]
        speed: Option<String>,
    },
    /// List the background jobs: progress, state, rate.
    Jobs,
    /// Cancel a running job; the guest's disk stays as it was.
    JobCancel {
        /// Job id (from `jobs`).
        id: u64,
    },
}

/// A path as the daemon must see it: absolute (it may run elsewhere).
fn abs(p: PathBuf) -> PathBuf {
    std::path::absolute(&p).unwrap_or(p)
}

/// `--speed`, in bytes per second.
fn speed(s: Option<String>) -> CliResult<Option<u64>> {
    s.map(|s| crate::img::size_arg(&s)).transpose()
}

/// Sends one request; prints the reply as JSON. Exit 1 when it failed.
pub fn run(a: Args) -> CliResult<u8> {
    let req = match a.cmd {
        Cmd::List => json!({"cmd": "list"}),
        Cmd::Add { export: x, nbd } => {
            let (Some(image), Some(_)) = (x.image.clone(), &x.vhost_user) else {
                return Err(BlockError::Invalid(
                    "ctl add needs IMAGE and --vhost-user SOCKET".into(),
                ));
            };
            let mut spec = x.spec(image);
            spec.nbd = nbd.then_some(true);
            json!({"cmd": "add", "export": spec})
        }
        Cmd::Remove { name } => json!({"cmd": "remove", "name": name}),
        Cmd::Stats { name } => json!({"cmd": "stats", "name": name}),
        Cmd::Throttle { name, limits } => json!({"cmd": "throttle", "name": name, "limits": limits}),
        Cmd::ThrottleGroup { name, limits } => json!({"cmd": "throttle_group", "name": name, "limits": limits}),
        Cmd::ThrottleGroups => json!({"cmd": "throttle_groups"}),
        Cmd::Trace { filter } => match filter {
            Some(f) => json!({"cmd": "trace", "filter": f}),
            None => json!({"cmd": "trace"}),
        },
        Cmd::Resize { name, size, shrink } => json!({"cmd": "resize", "name": name, "size": size, "shrink": shrink}),
        Cmd::Overlay { name, image } => json!({"cmd": "overlay", "name": name, "image": abs(image)}),
        Cmd::Commit {
            name,
            base,
            top,
            speed: s,
        } => {
            json!({"cmd": "commit", "name": name, "base": base.map(abs), "top": top.map(abs), "speed": speed(s)?})
        }
        Cmd::Stream { name, base, speed: s } => {
            json!({"cmd": "stream", "name": name, "base": base.map(abs), "speed": speed(s)?})
        }
        Cmd::Jobs => json!({"cmd": "jobs"}),
        Cmd::JobCancel { id } => json!({"cmd": "job_cancel", "id": id}),
    };
    let reply = request(&a.control, &req)?;
    println!("{}", serde_json::to_string_pretty(&reply).unwrap_or_default());
    if reply["ok"] == json!(true) {
        Ok(0)
    } else {
        eprintln!("spindle: ctl: {}", reply["error"].as_str().unwrap_or("request failed"));
        Ok(1)
    }
}

/// How long `spindle ctl` waits for a reply: longer than the server's
/// longest wait (a remove waits up to 75 s for an export to stop).
pub const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// One request, one reply.
pub fn request(path: &std::path::Path, req: &Value) -> CliResult<Value> {
    let err = |e: std::io::Error| BlockError::Invalid(format!("control socket {}: {e}", path.display()));
    let mut s = UnixStream::connect(path).map_err(err)?;
    s.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(err)?;
    writeln!(s, "{req}").map_err(err)?;
    let mut line = String::new();
    match BufReader::new(&s).read_line(&mut line) {
        Ok(0) => {
            return Err(BlockError::Invalid(format!(
                "control socket {}: closed without a reply",
                path.display()
            )))
        }
        Ok(_) => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            return Err(BlockError::Invalid(format!(
                "control socket {}: no reply within {} s",
                path.display(),
                REPLY_TIMEOUT.as_secs()
            )))
        }
        Err(e) => return Err(err(e)),
    }
    serde_json::from_str(&line)
        .map_err(|e| BlockError::Invalid(format!("control socket {}: bad reply: {e}", path.display())))
}
