//! `spindle serve --nbd ADDR`: the daemon's exports, by name, over NBD as
//! well as vhost-user.
//!
//! One NBD server per daemon, on its own I/O threads (the same kind of
//! `spindle_io` runtime as the vhost-user ones). An export is offered to
//! NBD clients while it runs: `add` offers it (unless its spec says
//! `nbd = false`), `remove` withdraws it first, which disconnects its NBD
//! clients once their requests are done. NBD requests go through the
//! export's device: its quiesce gate (so `spindle vm snapshot`, overlays
//! and job pivots hold them too), its current image and its statistics.

use crate::error::{CliResult, Error};
use crate::nbd_addr::Addr;
use spindle_export::Device;
use spindle_io::RuntimeConfig;
use spindle_nbd::{Catalog, DetectZeroes, Export, Server, ServerConfig, Settings, StopHandle, TlsConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How `--nbd` serves.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// Where to listen.
    pub addr: Addr,
    /// TLS credentials directory (qemu-nbd's layout), if any.
    pub tls_creds: Option<std::path::PathBuf>,
    /// I/O threads of the NBD server.
    pub iothreads: usize,
    /// How long its I/O threads poll before they sleep, in microseconds.
    pub poll_us: u64,
}

/// The daemon's NBD server.
pub struct NbdFront {
    catalog: Arc<Catalog>,
    /// As started, with the port bound (for a handover's new process).
    options: NbdOptions,
    addr: Addr,
    tls: bool,
    stop: StopHandle,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Stopped (shutdown, or a handover that went ahead): it offers
    /// nothing any more.
    stopped: AtomicBool,
    /// Where each I/O thread's time goes.
    times: Vec<Arc<spindle_io::ThreadTimes>>,
}

/// Clients at once; more wait in the listen backlog (each connection is
/// a descriptor of this process, which the vhost-user side needs too).
pub const MAX_CLIENTS: usize = 512;

fn invalid(msg: String) -> Error {
    Error::Usage(msg)
}

impl NbdFront {
    /// Binds the address and starts serving (an empty catalog at first).
    pub fn start(o: &NbdOptions) -> CliResult<NbdFront> {
        if o.iothreads == 0 || o.iothreads > spindle_export::device::LANES {
            return Err(invalid(format!(
                "--nbd-iothreads {} must be from 1 to {}",
                o.iothreads,
                spindle_export::device::LANES
            )));
        }
        if o.poll_us > 1_000_000 {
            return Err(invalid(format!(
                "nbd_poll_us {} must be at most 1000000 (1 s)",
                o.poll_us
            )));
        }
        let tls = match &o.tls_creds {
            Some(dir) => Some(TlsConfig::from_dir(dir, false).map_err(|e| invalid(format!("--nbd-tls-creds: {e}")))?),
            None => None,
        };
        let (fd, addr) = o.addr.bind()?;
        let catalog = Arc::new(Catalog::default());
        let server = Server::new(
            fd,
            catalog.clone(),
            ServerConfig {
                threads: o.iothreads,
                runtime: RuntimeConfig::default(),
                max_clients: Some(MAX_CLIENTS),
                persistent: true,
                tls: tls.clone(),
                handshake_limit: spindle_nbd::server::HANDSHAKE_LIMIT,
                poll: std::time::Duration::from_micros(o.poll_us),
            },
        );
        let stop = server.stop_handle();
        let times = server.thread_times();
        let thread = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || {
                if let Err(e) = server.run() {
                    tracing::error!("NBD server: {e}");
                }
            })
            .map_err(Error::system("cannot start the NBD server"))?;
        Ok(NbdFront {
            catalog,
            options: NbdOptions {
                addr: addr.clone(),
                ..o.clone()
            },
            addr,
            tls: tls.is_some(),
            stop,
            thread: Mutex::new(Some(thread)),
            stopped: AtomicBool::new(false),
            times,
        })
    }

    /// Where each I/O thread spent its time, by thread.
    pub fn thread_times(&self) -> Vec<spindle_io::ThreadTimesSnapshot> {
        self.times.iter().map(|t| t.snapshot()).collect()
    }

    /// How it was started, with the port bound.
    pub fn options(&self) -> &NbdOptions {
        &self.options
    }

    /// Offers `dev` to NBD clients under its export name.
    pub fn offer(&self, dev: &Arc<Device>, image: &str) -> CliResult<()> {
        let settings = Settings {
            name: dev.cfg.name.clone(),
            description: spindle_block::printable(image).to_string(),
            // One process serves every connection: a flush covers them all.
            multi_conn: true,
            allocation_depth: true,
            // As the guest's discards: they reach the image.
            discard: true,
            detect_zeroes: DetectZeroes::Off,
        };
        self.catalog
            .insert(Arc::new(Export::new(dev.clone(), settings)))
            .map_err(invalid)
    }

    /// Whether it still listens (not stopped).
    pub fn is_listening(&self) -> bool {
        !self.stopped.load(Ordering::Acquire)
    }

    /// Withdraws export `name`: its clients take no more requests, those
    /// in flight finish (the device's close waits for them), and each
    /// connection ends; one whose client does not take its last replies
    /// within [`spindle_nbd::server::SHUTDOWN_GRACE`] is shut both ways.
    /// `false` if it was not offered.
    pub fn withdraw(&self, name: &str) -> bool {
        let Some(e) = self.catalog.remove(name) else {
            return false;
        };
        let deadline = Instant::now() + spindle_nbd::server::SHUTDOWN_GRACE;
        while e.connections() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        e.kill();
        true
    }

    /// NBD clients of export `name` now; `None` if it is not offered.
    pub fn connections(&self, name: &str) -> Option<usize> {
        self.catalog.get(name).map(|e| e.connections())
    }

    /// The URI of export `name`.
    pub fn uri(&self, name: &str) -> String {
        self.addr.uri(name, self.tls)
    }

    /// Where clients connect, for `list` (`spindle libvirt` builds its
    /// `<source protocol='nbd'>` from it): `{"transport":"unix","socket"}`
    /// (absolute) or `{"transport":"tcp","host","port"}`, and `tls`.
    pub fn describe(&self) -> serde_json::Value {
        match &self.addr {
            Addr::Unix(p) => serde_json::json!({"transport": "unix", "tls": self.tls,
                "socket": std::path::absolute(p).unwrap_or_else(|_| p.clone())}),
            Addr::Tcp(h, port) => serde_json::json!({"transport": "tcp", "tls": self.tls, "host": h, "port": port}),
        }
    }

    /// How to reach export `name`: its URI, and the qemu-img, nbdinfo and
    /// QEMU lines.
    pub fn lines(&self, name: &str) -> String {
        let uri = self.uri(name);
        let tls = if self.tls {
            " (TLS: clients need tls-creds with the CA's certificate)"
        } else {
            ""
        };
        format!(
            "NBD{tls}: {uri}\n  qemu-img info '{uri}'\n  nbdinfo '{uri}'\n  qemu-system-x86_64 ... {} -device virtio-blk-pci,drive=nbd0",
            self.addr.blockdev(name)
        )
    }

    /// Stops listening and disconnects every client (each finishes its
    /// requests first). For shutdown and for a handover, whose new
    /// process binds the address again.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        for e in self.catalog.list() {
            self.catalog.remove(&e.settings.name);
        }
        self.stop.stop();
        let t = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = t {
            let _ = t.join();
        }
        if let Addr::Unix(p) = &self.addr {
            let _ = std::fs::remove_file(p);
        }
    }
}
