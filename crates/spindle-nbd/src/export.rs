//! What the server serves: exports of the export layer
//! ([`spindle_export::Device`]) with their NBD description, in a
//! [`Catalog`] that may change while the server runs (`spindle serve`'s
//! hot plug).
//!
//! A request goes through the device like a vhost-user one: the device's
//! quiesce gate admits it, the image is the device's current node (which
//! overlays, jobs and live migration may replace or close), and its
//! counts go into the device's statistics.

use crate::handshake::ExportInfo;
use spindle_block::Node;
use spindle_export::Device;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// QEMU's `detect-zeroes`: what a write of all zeroes becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// Written as data.
    #[default]
    Off,
    /// A zero write (no hole punched).
    On,
    /// A zero write that may unmap, when discards are honoured.
    Unmap,
}

/// How one export is described and served over NBD.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Export name (`""`: the default export).
    pub name: String,
    /// For humans (`nbdinfo`).
    pub description: String,
    /// `NBD_FLAG_CAN_MULTI_CONN` is offered.
    pub multi_conn: bool,
    /// `qemu:allocation-depth` is offered.
    pub allocation_depth: bool,
    /// `TRIM` and hole-punching zero writes reach the image (QEMU's
    /// `discard=unmap`); otherwise `TRIM` succeeds without effect.
    pub discard: bool,
    /// Zero detection on writes.
    pub detect_zeroes: DetectZeroes,
}

/// One export: the device every connection to it shares, and how NBD
/// describes it.
pub struct Export {
    /// Name, description and NBD options.
    pub settings: Settings,
    /// The exported disk.
    pub dev: Arc<Device>,
    /// Connected clients' sockets (for [`Export::disconnect`]).
    conns: Mutex<Vec<Weak<OwnedFd>>>,
    closed: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Export {
    /// An export of `dev`.
    pub fn new(dev: Arc<Device>, settings: Settings) -> Export {
        Export {
            settings,
            dev,
            conns: Mutex::default(),
            closed: AtomicBool::new(false),
        }
    }

    /// What the handshake announces, as of now (the size follows resizes;
    /// a client keeps the size it was told).
    pub fn info(&self) -> ExportInfo {
        let s = &self.settings;
        ExportInfo {
            name: s.name.clone(),
            description: s.description.clone(),
            size: self.dev.capacity(),
            read_only: self.dev.cfg.read_only,
            multi_conn: s.multi_conn,
            allocation_depth: s.allocation_depth,
            fast_zero: self.dev.node().is_some_and(|n| Export::zeroing_is_fast(&n)),
        }
    }

    /// Whether zeroing is always cheap on this node (`FAST_ZERO`): qcow2
    /// (zero clusters) and null; raw may fall back to writing zeroes.
    pub fn zeroing_is_fast(node: &Node) -> bool {
        matches!(node, Node::Qcow2(_)) || matches!(node.storage(), spindle_block::Storage::Null(_))
    }

    /// Clients connected now.
    pub fn connections(&self) -> usize {
        let mut c = lock(&self.conns);
        c.retain(|w| w.strong_count() > 0);
        c.len()
    }

    /// A client chose this export: `false` once it was removed.
    pub(crate) fn attach(&self, sock: Weak<OwnedFd>) -> bool {
        let mut c = lock(&self.conns);
        if self.is_closed() {
            return false;
        }
        c.retain(|w| w.strong_count() > 0);
        c.push(sock);
        true
    }

    /// Whether the export was withdrawn ([`Export::disconnect`]): its
    /// connections read no more requests, and a request admitted after
    /// that fails without touching the image.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Ends every connection to this export and refuses new ones: each
    /// client's socket is shut for reading and no further request is
    /// taken, so its connection finishes the requests it has, replies,
    /// and ends.
    pub fn disconnect(&self) {
        self.closed.store(true, Ordering::Release);
        self.shut(libc::SHUT_RD);
    }

    /// Shuts every connection both ways: replies still unsent fail, so a
    /// client that does not read cannot keep its connection (after
    /// [`Export::disconnect`] and a grace period).
    pub fn kill(&self) {
        self.closed.store(true, Ordering::Release);
        self.shut(libc::SHUT_RDWR);
    }

    fn shut(&self, how: libc::c_int) {
        let live: Vec<Arc<OwnedFd>> = {
            let mut c = lock(&self.conns);
            c.retain(|w| w.strong_count() > 0);
            c.iter().filter_map(Weak::upgrade).collect()
        };
        for fd in live {
            // SAFETY: shutdown on a descriptor kept open by the Arc just
            // upgraded; no memory involved.
            unsafe { libc::shutdown(fd.as_raw_fd(), how) };
        }
    }
}

/// The exports a server offers, by name; changed while it runs.
#[derive(Default)]
pub struct Catalog {
    exports: Mutex<Vec<Arc<Export>>>,
}

impl Catalog {
    /// A catalog of `exports`.
    pub fn new(exports: Vec<Arc<Export>>) -> Catalog {
        Catalog {
            exports: Mutex::new(exports),
        }
    }

    /// The exports as of now (what a new client may choose from).
    pub fn list(&self) -> Vec<Arc<Export>> {
        lock(&self.exports).clone()
    }

    /// The export named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        lock(&self.exports).iter().find(|e| e.settings.name == name).cloned()
    }

    /// Offers `export` to new clients; `Err` if the name is taken.
    pub fn insert(&self, export: Arc<Export>) -> Result<(), String> {
        let mut v = lock(&self.exports);
        if v.iter().any(|e| e.settings.name == export.settings.name) {
            return Err(format!("an NBD export named '{}' already exists", export.settings.name));
        }
        v.push(export);
        Ok(())
    }

    /// Withdraws `name` and disconnects its clients (they finish the
    /// requests they have first); returns it if it was there.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        let e = {
            let mut v = lock(&self.exports);
            let i = v.iter().position(|e| e.settings.name == name)?;
            v.remove(i)
        };
        e.disconnect();
        Some(e)
    }
}
