//! `spindle serve`: serve images to VMs as vhost-user-blk devices.

pub mod activation;
pub mod control;
pub mod handover;
pub mod jobs;
pub mod metrics;
pub mod nbd;
pub mod request;
pub mod restart;
pub mod sd_notify;
pub mod server;
pub mod spec;
pub mod throttle;
pub mod vm;
pub mod vm_jobs;
pub mod vm_live;
pub mod vm_record;
pub mod vm_restore;
pub mod vm_stream;

use crate::error::{CliResult, Error};
use crate::img::human_size;
use clap::Args as ClapArgs;
use server::Server;
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR2};
use spec::{ConfigFile, ExportSpec};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Image served when `spindle serve` gets no arguments.
pub const DEFAULT_IMAGE: &str = "spindle-disk.qcow2";
const DEFAULT_SIZE: u64 = 8 << 30;

/// What describes one export on a command line (`serve` and `ctl add`).
#[derive(ClapArgs, Clone)]
pub struct ExportArgs {
    /// Image path or null:SIZE (default: ./spindle-disk.qcow2, created 8 GiB thin if missing).
    pub image: Option<String>,
    /// vhost-user socket path (default: the image's name with .sock).
    #[arg(long = "vhost-user", value_name = "SOCKET")]
    pub vhost_user: Option<PathBuf>,
    /// Image format: raw or qcow2 (default: probed).
    #[arg(long, short = 'f')]
    pub format: Option<String>,
    /// Cache mode: none (default), writeback, writethrough, directsync, unsafe.
    #[arg(long)]
    pub cache: Option<String>,
    /// I/O engine: io_uring (default), native, threads.
    #[arg(long)]
    pub aio: Option<String>,
    /// Worker threads of the threads engine.
    #[arg(long)]
    pub aio_threads: Option<usize>,
    /// I/O threads serving the device (queue N goes to thread N mod iothreads).
    #[arg(long)]
    pub iothreads: Option<usize>,
    /// Request queues offered to the guest (default 16; a frontend uses as many as it sets up).
    #[arg(long)]
    pub num_queues: Option<u16>,
    /// Largest virtqueue the frontend may set up (default 256).
    #[arg(long)]
    pub queue_size: Option<u16>,
    /// Refuse writes.
    #[arg(long)]
    pub readonly: bool,
    /// GET_ID serial (up to 20 bytes; default: the export name).
    #[arg(long)]
    pub serial: Option<String>,
    /// Export name (default: the image's file stem).
    #[arg(long)]
    pub name: Option<String>,
    /// Keep polling queues and completions this many microseconds after the last request (0: off).
    #[arg(long)]
    pub poll_us: Option<u64>,
    /// Live migration destination: hold only a shared lock on the image (or, in a daemon that
    /// serves it already, share its open image) until the frontend starts the device.
    #[arg(long)]
    pub incoming: bool,
    /// I/O limits, QEMU's names (or libvirt's): iops-total=1000,bps-write=50M,iops-total-max=2000,…
    /// (docs/operations.md).
    #[arg(long, value_name = "LIMITS")]
    pub throttle: Option<String>,
    /// Share the limits of a named throttle group with the other exports in it.
    #[arg(long, value_name = "NAME")]
    pub throttle_group: Option<String>,
}

#[derive(ClapArgs)]
pub struct Args {
    #[command(flatten)]
    export: ExportArgs,
    /// Serve the exports of a TOML file instead (see docs/serve.md).
    #[arg(long, conflicts_with_all = ["image", "vhost_user", "format", "name", "serial"])]
    config: Option<PathBuf>,
    /// Control socket for `spindle ctl` (add, remove, list, stats, resize).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Serve the exports over NBD too, by name: HOST:PORT, [IPV6]:PORT,
    /// unix:PATH or a socket path (see docs/nbd.md).
    #[arg(long, value_name = "ADDR")]
    nbd: Option<String>,
    /// Serve Prometheus metrics on HTTP at /metrics: HOST:PORT, [IPV6]:PORT,
    /// PORT (on 127.0.0.1), unix:PATH or a socket path (docs/operations.md).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// TLS for --nbd: a directory with server-cert.pem and server-key.pem
    /// (qemu-nbd's layout); every NBD client must then start TLS.
    #[arg(long = "nbd-tls-creds", value_name = "DIR")]
    nbd_tls_creds: Option<PathBuf>,
    /// I/O threads of the NBD server.
    #[arg(long = "nbd-iothreads", value_name = "N")]
    nbd_iothreads: Option<usize>,
    /// How long an NBD I/O thread polls for its clients' next requests
    /// before it sleeps, in microseconds (default 64; 0: off).
    #[arg(long = "nbd-poll-us", value_name = "N", value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    nbd_poll_us: Option<u64>,
    /// Test only: make every Nth request wait before it starts, so requests
    /// complete out of order (`OPS:N:MS`, see docs/hardening.md).
    #[arg(long = "x-delay-io", hide = true, value_name = "PLAN")]
    delay_io: Option<String>,
    /// Benchmarks only: every connection logs the guest pages it writes
    /// into a private dirty log, as during a live migration
    /// (bench/dirtylog.py). Not passed on by a handover.
    #[arg(long = "x-dirty-log", hide = true)]
    dirty_log: bool,
}

fn default_socket(image: &str) -> PathBuf {
    if image.starts_with("null:") {
        return PathBuf::from("spindle-null.sock");
    }
    if let Ok(r) = spindle_block::protocols::rbd::RbdSpec::parse(image) {
        return PathBuf::from(format!("spindle-{}.sock", r.image));
    }
    Path::new(image).with_extension("sock")
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

impl ExportArgs {
    /// The export these arguments describe, serving `image`.
    pub fn spec(&self, image: String) -> ExportSpec {
        ExportSpec {
            socket: absolute(&self.vhost_user.clone().unwrap_or_else(|| default_socket(&image))),
            image,
            rbd: None,
            name: self.name.clone(),
            format: self.format.clone(),
            cache: self.cache.clone(),
            aio: self.aio.clone(),
            aio_threads: self.aio_threads,
            iothreads: self.iothreads,
            num_queues: self.num_queues,
            queue_size: self.queue_size,
            readonly: self.readonly,
            serial: self.serial.clone(),
            poll_us: self.poll_us,
            incoming: self.incoming,
            inactive: false,
            nbd: None,
            throttle: self.throttle.clone(),
            throttle_group: self.throttle_group.clone(),
        }
    }

    /// Options given on the command line fill in what a config file's
    /// export leaves out.
    fn fill(&self, mut s: ExportSpec) -> ExportSpec {
        s.cache = s.cache.or(self.cache.clone());
        s.aio = s.aio.or(self.aio.clone());
        s.aio_threads = s.aio_threads.or(self.aio_threads);
        s.iothreads = s.iothreads.or(self.iothreads);
        s.num_queues = s.num_queues.or(self.num_queues);
        s.queue_size = s.queue_size.or(self.queue_size);
        s.poll_us = s.poll_us.or(self.poll_us);
        s.readonly |= self.readonly;
        s.incoming |= self.incoming;
        s.throttle = s.throttle.or(self.throttle.clone());
        s.throttle_group = s.throttle_group.or(self.throttle_group.clone());
        s
    }
}

/// Creates the default image when it does not exist yet.
fn ensure_default_image() -> CliResult<()> {
    let path = Path::new(DEFAULT_IMAGE);
    if path.exists() {
        return Ok(());
    }
    let rt = spindle_io::Runtime::new(Default::default())?;
    rt.block_on(spindle_block::formats::qcow2::create::create(
        path,
        &spindle_block::formats::qcow2::create::CreateOptions {
            size: DEFAULT_SIZE,
            ..Default::default()
        },
    ))?;
    eprintln!(
        "spindle: created {DEFAULT_IMAGE} (qcow2, {} thin)",
        human_size(DEFAULT_SIZE)
    );
    Ok(())
}

/// How to attach an export serving `image`, for QEMU and for libvirt
/// (the same element `spindle libvirt` prints).
pub fn attach_lines(e: &spindle_vhost::Export, image: &str) -> String {
    let sock = e.socket.display();
    let cfg = &e.dev.cfg;
    let q = crate::libvirt::queues(cfg.iothreads, cfg.num_queues);
    let id = format!(
        "spindle-{}",
        cfg.name.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
    );
    let disk = crate::libvirt::Disk {
        name: cfg.name.clone(),
        image: image.to_string(),
        format: e.dev.slot.info().format.to_string(),
        size: e.dev.capacity(),
        socket: sock.to_string(),
        queues: q,
        serial: cfg.serial.clone(),
        readonly: cfg.read_only,
    };
    let xml = crate::libvirt::vhostuser_disk(&disk, "vdb", &format!("ua-{id}"))
        .unwrap_or_else(|why| format!("(no libvirt element: {why})"));
    format!(
        "QEMU (guest RAM must be shared):\n  qemu-system-x86_64 ... \\\n    -object memory-backend-memfd,id=mem,size=<RAM>,share=on -numa node,memdev=mem \\\n    -chardev socket,id={id},path={sock},reconnect=1 \\\n    -device vhost-user-blk-pci,chardev={id},num-queues={q}\n\
libvirt (inside <domain>; needs <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>; \
`spindle libvirt -c CTL` prints the elements):\n  {}",
        xml.replace('\n', "\n  ")
    )
}

/// Runs `spindle serve` until SIGINT or SIGTERM, or until a handover to a
/// new process (SIGUSR2) succeeded.
pub fn run(a: Args) -> CliResult<u8> {
    handover::remember_exe();
    // Before any thread starts: a handover's channel, then the sockets
    // systemd (or the handing-over process) passed in, if any.
    let mut incoming = handover::Incoming::take_from_env().map_err(|e| Error::peer("handover", e))?;
    let passed = activation::take_from_env().map_err(|e| Error::usage(format!("socket activation: {e}")))?;
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR2])
        .map_err(Error::system("cannot install signal handlers"))?;
    if a.dirty_log {
        spindle_vhost::dirty::force_logging();
    }
    if let Some(plan) = &a.delay_io {
        spindle_block::fault::delay::set(plan.parse().map_err(Error::Usage)?).map_err(Error::Usage)?;
    }
    let mut nbd_tls = a.nbd_tls_creds.clone();
    let mut nbd_threads = a.nbd_iothreads;
    let mut nbd_poll = a.nbd_poll_us;
    let mut groups = std::collections::BTreeMap::new();
    let mut metrics_addr = a.metrics.clone();
    let (mut specs, control, nbd_addr): (Vec<ExportSpec>, _, _) = match &a.config {
        Some(path) => {
            let cfg = ConfigFile::load(path)?;
            for (name, limits) in &cfg.throttle_group {
                groups.insert(
                    name.clone(),
                    throttle::parse(&format!("throttle group '{name}'"), limits)?,
                );
            }
            let control = a.control.clone().or(cfg.control);
            let nbd = a.nbd.clone().or(cfg.nbd);
            metrics_addr = metrics_addr.or(cfg.metrics);
            nbd_tls = nbd_tls.or(cfg.nbd_tls_creds);
            nbd_threads = nbd_threads.or(cfg.nbd_iothreads);
            nbd_poll = nbd_poll.or(cfg.nbd_poll_us);
            (
                cfg.exports.into_iter().map(|s| a.export.fill(s)).collect(),
                control,
                nbd,
            )
        }
        None => {
            let image = match &a.export.image {
                Some(i) => i.clone(),
                None => {
                    ensure_default_image()?;
                    DEFAULT_IMAGE.to_string()
                }
            };
            (vec![a.export.spec(image)], a.control.clone(), a.nbd.clone())
        }
    };
    // Checked before anything is opened or handed over.
    let nbd_addr = nbd_addr.as_deref().map(crate::nbd_addr::Addr::parse).transpose()?;
    if let Some(m) = &metrics_addr {
        metrics::http::parse(m)?;
    }
    if let Some(i) = &mut incoming {
        // The old process stops its exports only now, and says the state
        // each one stopped in (or to quit: then no image is touched).
        match i.ready_and_wait().map_err(|e| Error::peer("handover", e))? {
            Some(states) if states.len() == specs.len() => {
                specs = specs.into_iter().zip(states).map(|(s, m)| s.in_state(m)).collect();
            }
            Some(_) => eprintln!("spindle: handover: the old process's export states do not match the configuration; using the configuration's"),
            None => {}
        }
    }
    // Active exports first: a second export of an image (a same-daemon
    // migration's other side) shares the image opened for serving.
    specs.sort_by_key(|s| s.state() != spindle_export::device::Migration::Active);
    let server = Arc::new(Server::default());
    for (name, limits) in groups {
        server.throttles().define(&name, limits)?;
    }
    if let Some(addr) = nbd_addr {
        let front = nbd::NbdFront::start(&nbd::NbdOptions {
            addr,
            tls_creds: nbd_tls,
            iothreads: nbd_threads.unwrap_or(1),
            poll_us: nbd_poll.unwrap_or(spec::DEFAULT_POLL_US),
        })?;
        server.set_nbd(Arc::new(front));
    }
    for spec in specs {
        // As `add` resolves it: `[export.rbd]` keys become an `rbd:` spec.
        let image = spec.clone().resolved().map_or_else(|_| spec.image.clone(), |s| s.image);
        let spec_incoming = spec.incoming;
        let export = match server.add(spec) {
            Ok(e) => e,
            Err(e) => {
                let _ = server.remove_all();
                // Most errors name the image already.
                let msg = e.to_string();
                return Err(if msg.contains(&image) {
                    e
                } else {
                    Error::Usage(format!("{image}: {msg}"))
                });
            }
        };
        let d = &export.dev;
        println!(
            "spindle: serving {} ({}, {}) as '{}' on {}{}{}",
            image,
            d.slot.info().format,
            human_size(d.capacity()),
            d.cfg.name,
            export.socket.display(),
            if d.cfg.read_only { ", read-only" } else { "" },
            if spec_incoming {
                ", incoming (migration destination)"
            } else {
                ""
            }
        );
        // The multi-line hints are for a terminal, not the journal (one
        // line per event there; `spindle libvirt` prints them on request).
        if !crate::logging::stdout_is_journal() {
            println!("{}", attach_lines(&export, &image));
            // Offered over NBD (not `nbd = false`): how to reach it there.
            if let Some(f) = server.nbd().filter(|f| f.connections(&d.cfg.name).is_some()) {
                println!("{}", f.lines(&d.cfg.name));
            }
        }
    }
    if passed > 0 && incoming.is_none() {
        println!("spindle: serving {passed} socket(s) passed in by the service manager");
    }
    if let Some(path) = &control {
        let path = absolute(path);
        if let Err(e) = control::listen(&path, server.clone()) {
            let _ = server.remove_all();
            return Err(Error::system(format!(
                "cannot listen on control socket {}",
                path.display()
            ))(e));
        }
        println!("spindle: control socket {}", path.display());
    }
    let mut metrics = match &metrics_addr {
        Some(m) => match metrics::listen::listen(m, server.clone()) {
            Ok(l) => {
                println!("spindle: metrics on {}", l.describe());
                Some(l)
            }
            Err(e) => {
                let _ = server.remove_all();
                return Err(e);
            }
        },
        None => None,
    };
    for s in activation::unclaimed() {
        eprintln!("spindle: warning: socket {s} was passed in but matches no export's socket or name");
    }
    use std::io::Write;
    // Before `serving`: the old process exits once it hears that, and
    // this one must be the main one by then.
    sd_notify::ready(server.list().len(), incoming.is_some());
    if let Some(i) = incoming {
        println!("spindle: took over {passed} socket(s) from the previous process");
        i.serving();
    }
    let _ = std::io::stdout().flush();
    let name = |sig| if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
    let sig = loop {
        let sig = signals.forever().next().unwrap_or(SIGTERM);
        if sig != SIGUSR2 {
            break sig;
        }
        eprintln!("spindle: SIGUSR2: handing the sockets over to a new process");
        sd_notify::reloading();
        match handover::hand_over(&server, a.delay_io.as_deref(), metrics.as_ref()) {
            Ok(pid) => {
                sd_notify::handed_over(pid);
                eprintln!("spindle: SIGUSR2: handed over to process {pid}; exiting");
                return Ok(0);
            }
            Err(e) => {
                eprintln!("spindle: SIGUSR2: the handover failed, still serving: {e}");
                if let Some(addr) = metrics.as_ref().filter(|m| m.stopped()).map(|m| m.addr.clone()) {
                    metrics = match metrics::listen::listen(&addr, server.clone()) {
                        Ok(l) => Some(l),
                        Err(e) => {
                            eprintln!("spindle: SIGUSR2: the metrics endpoint cannot listen again: {e}");
                            None
                        }
                    };
                }
                sd_notify::handover_failed(server.list().len());
            }
        }
    };
    eprintln!(
        "spindle: {}: finishing in-flight requests, flushing, exiting (again to exit at once)",
        name(sig)
    );
    sd_notify::stopping(name(sig));
    // Stopping waits for the exports (at most server::STOP_TIMEOUT); a
    // second signal ends the wait.
    let (tx, rx) = std::sync::mpsc::channel();
    let stopper = server.clone();
    let control_file = control.clone();
    std::thread::Builder::new()
        .name("shutdown".into())
        .spawn(move || {
            let _ = tx.send(stopper.remove_all());
        })
        .map_err(Error::system("cannot start the shutdown thread"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                eprintln!("spindle: {} again: exiting without waiting for the exports", name(sig));
                if let Some(path) = &control_file {
                    control::remove_socket_file(path);
                }
                std::process::exit(1);
            }
        })
        .map_err(Error::system("cannot start the signal thread"))?;
    let res = rx.recv().unwrap_or_else(|_| Err(Error::refused("shutdown failed")));
    if let Some(f) = server.nbd() {
        f.stop();
    }
    if let Some(path) = &control {
        control::remove_socket_file(path);
    }
    res.map(|_| 0)
}
