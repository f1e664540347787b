//! `spindle nbd IMAGE`: serve one image over NBD, with qemu-nbd's names.
//!
//! The default listening address is 127.0.0.1:10809, not qemu-nbd's
//! 0.0.0.0: NBD has no authentication without TLS, so reaching beyond
//! this host takes an explicit `-b`. The image is locked as `spindle serve`
//! locks it (a write lock unless `-r`). See docs/nbd.md.

use crate::error::{CliResult, Error};
use crate::nbd_addr::Addr;
use spindle_block::{open_image, Node, OpenConfig, Sharing};
use spindle_export::{Device, DeviceConfig};
use spindle_io::{CacheMode, EngineKind, RuntimeConfig};
use spindle_nbd::{Catalog, DetectZeroes, Export, Server, ServerConfig, TlsConfig};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// `spindle nbd` arguments (qemu-nbd's names).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The image: a raw or qcow2 file, a block device, or null:SIZE.
    pub image: String,
    /// TCP port (0: any free port, printed at start).
    #[arg(short = 'p', long, default_value_t = 10809, conflicts_with = "socket")]
    pub port: u16,
    /// Address to listen on. Default loopback only (qemu-nbd: 0.0.0.0).
    #[arg(short = 'b', long, default_value = "127.0.0.1", conflicts_with = "socket")]
    pub bind: String,
    /// Listen on a unix socket instead of TCP.
    #[arg(short = 'k', long)]
    pub socket: Option<PathBuf>,
    /// Export name (default: the empty, default export).
    #[arg(short = 'x', long = "export-name", default_value = "")]
    pub export_name: String,
    /// Export description, shown by `nbdinfo`.
    #[arg(short = 'D', long)]
    pub description: Option<String>,
    /// Serve read-only (writes fail with EPERM; the image gets a shared lock).
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// Most clients at once (0: no limit, the default). With 1, no multi-conn.
    #[arg(short = 'e', long, value_name = "N")]
    pub shared: Option<usize>,
    /// Keep serving after the last client disconnected.
    #[arg(short = 't', long)]
    pub persistent: bool,
    /// Image format (raw, qcow2, null); probed when left out.
    #[arg(short = 'f', long)]
    pub format: Option<String>,
    /// Cache mode: none, writeback (default), writethrough, directsync, unsafe.
    #[arg(long)]
    pub cache: Option<String>,
    /// I/O engine: io_uring (default), native, threads.
    #[arg(long)]
    pub aio: Option<String>,
    /// TRIM and zero writes may free space: ignore (default) or unmap.
    #[arg(long, default_value = "ignore")]
    pub discard: String,
    /// Zero detection on writes: off (default), on, unmap (needs --discard=unmap).
    #[arg(long = "detect-zeroes", default_value = "off")]
    pub detect_zeroes: String,
    /// Serve internal snapshot ID_OR_NAME of a qcow2 image, read-only
    /// (also `snapshot.id=ID` or `snapshot.name=NAME`, as qemu-nbd).
    #[arg(short = 'l', long = "load-snapshot", value_name = "SNAPSHOT")]
    pub load_snapshot: Option<String>,
    /// Offer the qemu:allocation-depth metadata context.
    #[arg(short = 'A', long = "allocation-depth")]
    pub allocation_depth: bool,
    /// Write the server's pid here (removed at exit).
    #[arg(long = "pid-file")]
    pub pid_file: Option<PathBuf>,
    /// Go to the background once the socket listens.
    #[arg(long)]
    pub fork: bool,
    /// I/O threads serving the connections.
    #[arg(long, default_value_t = 2)]
    pub iothreads: usize,
    /// Seconds a client has to finish its handshake before it is
    /// disconnected (qemu-nbd's name and default).
    #[arg(long = "handshake-limit", value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub handshake_limit: u64,
    /// Microseconds an I/O thread polls for the clients' next requests
    /// and its completions before it sleeps (0: off). Polling saves the
    /// kernel's wake-up of a sleeping thread on every round trip.
    #[arg(long = "poll-us", value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub poll_us: u64,
    /// TLS credentials in qemu-nbd's layout: DIR/server-cert.pem,
    /// DIR/server-key.pem (and DIR/ca-cert.pem for --tls-verify-clients).
    /// With them every client must start TLS first.
    #[arg(long = "tls-creds", value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// Require a client certificate signed by DIR/ca-cert.pem.
    #[arg(long = "tls-verify-clients", requires = "tls_creds")]
    pub tls_verify_clients: bool,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::Usage(msg.into())
}

struct Settings {
    cache: CacheMode,
    engine: EngineKind,
    discard: bool,
    detect: DetectZeroes,
}

fn settings(a: &Args) -> CliResult<Settings> {
    if a.iothreads == 0 || a.iothreads > 64 {
        return Err(invalid(format!("--iothreads {} must be from 1 to 64", a.iothreads)));
    }
    if a.export_name.len() > 4096 || a.description.as_ref().is_some_and(|d| d.len() > 4096) {
        return Err(invalid("export names and descriptions are at most 4096 bytes"));
    }
    let cache = match &a.cache {
        Some(c) => c.parse().map_err(|e: spindle_io::Error| invalid(e.to_string()))?,
        None => CacheMode::Writeback,
    };
    let engine = match &a.aio {
        Some(e) => e.parse().map_err(|e: spindle_io::Error| invalid(e.to_string()))?,
        None => EngineKind::IoUring,
    };
    let discard = match a.discard.as_str() {
        "ignore" | "off" => false,
        "unmap" | "on" => true,
        d => return Err(invalid(format!("--discard {d}: expected ignore or unmap"))),
    };
    let detect = match a.detect_zeroes.as_str() {
        "off" => DetectZeroes::Off,
        "on" => DetectZeroes::On,
        "unmap" if discard => DetectZeroes::Unmap,
        "unmap" => return Err(invalid("--detect-zeroes=unmap needs --discard=unmap")),
        d => return Err(invalid(format!("--detect-zeroes {d}: expected off, on or unmap"))),
    };
    Ok(Settings {
        cache,
        engine,
        discard,
        detect,
    })
}

fn listen(a: &Args) -> CliResult<(OwnedFd, Addr)> {
    match &a.socket {
        Some(path) => Addr::Unix(path.clone()).bind(),
        None => Addr::Tcp(a.bind.clone(), a.port).bind(),
    }
}

fn print_start(a: &Args, node: &Node, addr: &Addr) {
    use std::io::Write;
    let name = &a.export_name;
    let tls = a.tls_creds.is_some();
    let uri = addr.uri(name, tls);
    let mode = if a.read_only { "read-only" } else { "writable" };
    let image = spindle_block::printable(&a.image);
    let text = if tls {
        // A client needs the CA's certificate (DIR/ca-cert.pem) in a
        // directory of its own (and its own certificate with --tls-verify-clients).
        let obj = "--object tls-creds-x509,id=tls0,dir=CLIENT-DIR,endpoint=client";
        format!(
            "spindle nbd: serving {image} ({}, {} bytes, {mode}, TLS only) at {uri}\n  qemu-img info {obj} --image-opts driver=nbd,{},tls-creds=tls0\n  nbdinfo '{uri}&tls-certificates=CLIENT-DIR'\n  qemu-system-x86_64 ... {obj} {},tls-creds=tls0 -device virtio-blk-pci,drive=nbd0\n",
            node.info().format,
            node.size(),
            addr.blockdev(name).trim_start_matches("-blockdev driver=nbd,node-name=nbd0,"),
            addr.blockdev(name)
        )
    } else {
        format!(
            "spindle nbd: serving {image} ({}, {} bytes, {mode}) at {uri}\n  qemu-img info '{uri}'\n  nbdinfo '{uri}'\n  qemu-system-x86_64 ... {} -device virtio-blk-pci,drive=nbd0\n",
            node.info().format,
            node.size(),
            addr.blockdev(name)
        )
    };
    // A closed stdout (a supervisor that read the first line) is no reason to stop.
    let mut out = std::io::stdout();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Goes to the background: the parent exits at once (the socket already
/// listens, so a client may connect as soon as it returned; the child
/// prints the start lines).
fn daemonize() -> CliResult<()> {
    // SAFETY: called before any thread of this process is started, so the
    // child is a full copy with nothing half-locked.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(Error::system("--fork")(std::io::Error::last_os_error()));
    }
    if pid > 0 {
        // SAFETY: the parent leaves without running destructors: the
        // image's files and locks now belong to the child.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: plain syscall in the child.
    unsafe { libc::setsid() };
    Ok(())
}

/// Runs `spindle nbd`.
pub fn run(a: Args) -> CliResult<u8> {
    let mut a = a;
    // As qemu-nbd: a snapshot is served read-only.
    a.read_only |= a.load_snapshot.is_some();
    let s = settings(&a)?;
    let format = a.format.as_deref().map(str::parse).transpose()?;
    let cfg = OpenConfig {
        format,
        cache: s.cache,
        read_only: a.read_only,
        sharing: Sharing::Readers,
        ..Default::default()
    };
    let tls = match &a.tls_creds {
        Some(dir) => {
            Some(TlsConfig::from_dir(dir, a.tls_verify_clients).map_err(|e| invalid(format!("--tls-creds: {e}")))?)
        }
        None => None,
    };
    let node = open_image(&a.image, &cfg)?;
    if let Some(sn) = &a.load_snapshot {
        load_snapshot(&node, sn)?;
    }
    // What the image allows (an NBD upstream: read-only, or one
    // connection only) is what is offered.
    a.read_only |= node.is_read_only();
    let single = node.is_single_threaded();
    if single && a.iothreads > 1 {
        eprintln!(
            "spindle nbd: {}: the upstream NBD server offers no multi-conn: one I/O thread, no multi-conn",
            a.image
        );
        a.iothreads = 1;
    }
    let (fd, addr) = listen(&a)?;
    if a.fork {
        daemonize()?;
    }
    if let Some(p) = &a.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id())).map_err(|e| invalid(format!("{}: {e}", p.display())))?;
    }
    // Printed once the pid file is there: whoever reads the line may use both.
    print_start(&a, &node, &addr);
    let shared = a.shared.filter(|&n| n > 0);
    let runtime = RuntimeConfig {
        engine: s.engine,
        ..Default::default()
    };
    let dev = Arc::new(Device::new(
        node,
        DeviceConfig {
            name: a.export_name.clone(),
            serial: String::new(),
            num_queues: 1,
            iothreads: 1,
            queue_size: 2,
            poll_ns: 0,
            engine: runtime,
            read_only: a.read_only,
        },
    ));
    let settings = spindle_nbd::Settings {
        name: a.export_name.clone(),
        description: a.description.clone().unwrap_or_default(),
        multi_conn: shared != Some(1) && !single,
        allocation_depth: a.allocation_depth,
        discard: s.discard,
        detect_zeroes: s.detect,
    };
    let catalog = Arc::new(Catalog::new(vec![Arc::new(Export::new(dev.clone(), settings))]));
    let server = Server::new(
        fd,
        catalog,
        ServerConfig {
            threads: a.iothreads,
            runtime,
            max_clients: shared,
            persistent: a.persistent,
            tls,
            handshake_limit: Duration::from_secs(a.handshake_limit),
            poll: Duration::from_micros(a.poll_us),
        },
    );
    let stop = server.stop_handle();
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM])
        .map_err(Error::system("cannot install signal handlers"))?;
    let sig_handle = signals.handle();
    let sig_thread = std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            stop.stop();
        }
    });
    let served = server.run();
    sig_handle.close();
    let _ = sig_thread.join();
    let closed = dev
        .close()
        .map_err(|e| invalid(format!("{}: cannot close the image: {e}", a.image)));
    cleanup(&a, &addr);
    served.map_err(|e| invalid(e.to_string()))?;
    closed?;
    Ok(0)
}

/// `-l`: serves snapshot `spec` (`ID_OR_NAME`, `snapshot.id=ID` or
/// `snapshot.name=NAME`) of the read-only image in `node`.
fn load_snapshot(node: &Node, spec: &str) -> CliResult<()> {
    let Node::Qcow2(q) = node else {
        return Err(invalid(format!(
            "-l {spec}: the image is {}, not qcow2",
            node.info().format
        )));
    };
    let want = spec
        .strip_prefix("snapshot.id=")
        .or_else(|| spec.strip_prefix("snapshot.name="))
        .unwrap_or(spec);
    let by_id = spec.starts_with("snapshot.id=");
    let by_name = spec.starts_with("snapshot.name=");
    let rt = spindle_io::Runtime::new(RuntimeConfig::default())?;
    let snaps = rt.block_on(q.snapshot_list());
    let found = snaps
        .iter()
        .find(|s| (!by_name && s.id == want) || (!by_id && s.name == want))
        .ok_or_else(|| invalid(format!("-l {spec}: {} has no such snapshot", q.path().display())))?;
    let id = found.id.clone();
    rt.block_on(q.view_snapshot(&id))?;
    Ok(())
}

fn cleanup(a: &Args, addr: &Addr) {
    if let Addr::Unix(p) = addr {
        let _ = std::fs::remove_file(p);
    }
    if let Some(p) = &a.pid_file {
        let _ = std::fs::remove_file(Path::new(p));
    }
}
