//! The image behind one or more exports, and its handover for live
//! migration.
//!
//! A [`NodeSlot`] holds the open image of an export, or nothing while the
//! export is *inactive*: then it holds no write lock and no cached
//! metadata, only (when it can) a read-only look at the image that takes
//! QEMU's shared "consistent read" lock and shares everything else, so
//! another process may write the image meanwhile.
//!
//! - [`NodeSlot::inactivate`] flushes and closes the image (qcow2 caches
//!   written back, dirty bit cleared, locks released). Call it only with no
//!   request in flight.
//! - [`NodeSlot::activate`] opens it afresh, which re-reads every piece of
//!   metadata and takes the write lock (one try, see [`Reopen`]). A device
//!   that starts while the image is closed does not call it: the slot's
//!   activation thread does, trying again until it succeeds
//!   (`activation.rs`).
//!
//! Two exports of one image in one daemon (the destination of a local
//! migration) share one slot; the image then stays open across the
//! handover, and only the export that stops is flushed. The slot's guard
//! lets only one of them have a running device at a time
//! (`activation::Guard`).
//!
//! The data path reads the node once per round of popped requests
//! ([`NodeSlot::current`], an `ArcSwap` load), never per request, and
//! takes no lock.

use crate::activation::{self, Guard, Start, Waker};
use arc_swap::ArcSwapOption;
use spindle_block::{BlockError, Node};
use spindle_io::{Runtime, RuntimeConfig};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// How an inactive image is opened again.
pub trait Reopen: Send + Sync {
    /// Opens the image to serve it (the write lock, unless read-only).
    /// One try: while another process still holds the lock this fails,
    /// and the slot's activation thread tries again a little later.
    fn open_active(&self) -> Result<Node, BlockError>;
    /// Opens the image to hold while inactive: it exists and its format is
    /// known, and only a shared lock is taken (read, sharing everything).
    fn open_inactive(&self) -> Result<Node, BlockError>;
}

/// What is known of the image without it being open.
#[derive(Debug, Clone, Copy)]
pub struct SlotInfo {
    /// Format name.
    pub format: &'static str,
}

/// An image that can be closed and opened again under its exports.
pub struct NodeSlot {
    node: ArcSwapOption<Node>,
    /// The look held while inactive; also serializes the handover.
    held: Mutex<Option<Node>>,
    /// How to open the image again; replaced with the image by
    /// [`NodeSlot::replace`] (always under `held`).
    reopen: Mutex<Option<Box<dyn Reopen>>>,
    engine: RuntimeConfig,
    info: Mutex<SlotInfo>,
    users: AtomicUsize,
    /// The last export id given out (`attach`).
    ids: AtomicU64,
    /// Which export's device runs, and who waits to start.
    guard: Guard,
}

fn poisoned() -> BlockError {
    BlockError::Invalid("image handover lock poisoned".into())
}

impl NodeSlot {
    /// A slot serving `node`, which cannot be reopened: inactivating it
    /// only flushes.
    pub fn fixed(node: Node, engine: RuntimeConfig) -> NodeSlot {
        NodeSlot {
            info: Mutex::new(SlotInfo {
                format: node.info().format,
            }),
            node: ArcSwapOption::new(Some(Arc::new(node))),
            held: Mutex::new(None),
            reopen: Mutex::new(None),
            engine,
            users: AtomicUsize::new(0),
            ids: AtomicU64::new(0),
            guard: Guard::default(),
        }
    }

    /// A slot serving `node`, closed and reopened through `reopen`.
    pub fn active(node: Node, reopen: Box<dyn Reopen>, engine: RuntimeConfig) -> NodeSlot {
        NodeSlot {
            reopen: Mutex::new(Some(reopen)),
            ..NodeSlot::fixed(node, engine)
        }
    }

    /// An inactive slot: `look` (from [`Reopen::open_inactive`]) is held
    /// until the first [`NodeSlot::activate`].
    pub fn inactive(look: Node, reopen: Box<dyn Reopen>, engine: RuntimeConfig) -> NodeSlot {
        NodeSlot {
            info: Mutex::new(SlotInfo {
                format: look.info().format,
            }),
            node: ArcSwapOption::new(None),
            held: Mutex::new(Some(look)),
            reopen: Mutex::new(Some(reopen)),
            engine,
            users: AtomicUsize::new(0),
            ids: AtomicU64::new(0),
            guard: Guard::default(),
        }
    }

    /// The open image, or `None` while inactive (one `ArcSwap` load).
    pub fn current(&self) -> Option<Arc<Node>> {
        self.node.load_full()
    }

    /// Whether the image is open.
    pub fn is_open(&self) -> bool {
        self.node.load().is_some()
    }

    /// What is known of the image.
    pub fn info(&self) -> SlotInfo {
        *self.info.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Serves `node` instead of the open image, and opens it again through
    /// `reopen` from now on (a live overlay, the end of a stream or a
    /// commit job). Call with no request in flight and none admitted (the
    /// device quiesced): the next round of popped requests loads `node`.
    /// Returns the image served before, for the caller to drop once done
    /// with it (its files close, and their locks go, with its last
    /// reference). Refused while the image is closed (live migration).
    pub fn replace(&self, node: Node, reopen: Option<Box<dyn Reopen>>) -> Result<Arc<Node>, BlockError> {
        let _held = self.held.lock().map_err(|_| poisoned())?;
        let Some(old) = self.current() else {
            return Err(BlockError::Invalid(
                "the image is closed (live migration); it cannot be replaced now".into(),
            ));
        };
        let format = node.info().format;
        self.node.store(Some(Arc::new(node)));
        *self.info.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = SlotInfo { format };
        if let Some(r) = reopen {
            *self.reopen.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(r);
        }
        Ok(old)
    }

    /// The image's guest size: of the open image, else of the look held.
    pub fn size(&self) -> Option<u64> {
        match self.current() {
            Some(n) => Some(n.size()),
            None => self.held.lock().ok()?.as_ref().map(Node::size),
        }
    }

    /// The device of export `id` asks to start (its first round since it
    /// last stopped): [`Start::Serve`] when no other export's device runs
    /// and the image is open. Otherwise `waker` is woken when that may
    /// have changed, and a closed image is opened meanwhile by the slot's
    /// activation thread (started here, one per slot; `name` is for its
    /// logs). Never blocks on the image: an I/O thread calls it.
    pub fn start(self: &Arc<Self>, id: u64, waker: &Arc<Waker>, name: &str) -> Start {
        let (start, spawn) = self.guard.start(id, waker, || self.current());
        if spawn {
            activation::spawn(self, name);
        }
        start
    }

    /// The one-writer guard of this slot.
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// What the activation thread tries: opens the image if some device
    /// still waits for it. `Ok(false)`: none waits, the thread ends;
    /// `Ok(true)`: the image is open.
    pub(crate) fn open_for_waiting(&self) -> Result<bool, BlockError> {
        // The waiting devices are checked under `held`, which the last
        // `detach` takes only after its export waits no longer: an image
        // opened here is closed by that `detach`, never left open.
        let held = self.held.lock();
        if !self.guard.keep_activating() {
            return Ok(false);
        }
        self.open(held.map_err(|_| poisoned())?).map(|_| true)
    }

    /// Opens the image when it is not open; returns it.
    pub fn activate(&self) -> Result<Arc<Node>, BlockError> {
        self.open(self.held.lock().map_err(|_| poisoned())?)
    }

    fn open(&self, mut held: std::sync::MutexGuard<'_, Option<Node>>) -> Result<Arc<Node>, BlockError> {
        if let Some(n) = self.current() {
            return Ok(n);
        }
        let reopen = self.reopen.lock().map_err(|_| poisoned())?;
        let reopen = reopen
            .as_ref()
            .ok_or_else(|| BlockError::Invalid("the image cannot be opened again".into()))?;
        let node = Arc::new(reopen.open_active()?);
        self.node.store(Some(node.clone()));
        // The look goes only now: the image was never without a lock.
        *held = None;
        Ok(node)
    }

    /// Flushes the image and, when it can be opened again, closes it
    /// (write-back, dirty bit cleared) and drops its locks, keeping only a
    /// look at it. Call with no request in flight. Returns whether it was
    /// closed.
    pub fn inactivate(&self) -> Result<bool, BlockError> {
        let mut held = self.held.lock().map_err(|_| poisoned())?;
        let Some(node) = self.current() else { return Ok(false) };
        let reopen = self.reopen.lock().map_err(|_| poisoned())?;
        let Some(reopen) = reopen.as_ref() else {
            self.flush()?;
            return Ok(false);
        };
        run(self.engine, node.clone(), true)?;
        self.node.store(None);
        // Dropped last: nothing else holds it now (no request in flight),
        // so its files close and their locks go.
        drop(node);
        *held = match reopen.open_inactive() {
            Ok(look) => Some(look),
            Err(e) => {
                tracing::warn!("inactive image: cannot keep a read lock on it: {e}");
                None
            }
        };
        Ok(true)
    }

    /// Flushes the open image (if open), from a control-plane thread.
    pub fn flush(&self) -> Result<(), BlockError> {
        match self.current() {
            Some(node) => run(self.engine, node, false),
            None => Ok(()),
        }
    }

    /// One more export serves this slot; returns its id here (for the
    /// one-writer guard, and [`NodeSlot::detach`]).
    pub fn attach(&self) -> u64 {
        self.users.fetch_add(1, Ordering::AcqRel);
        self.ids.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Export `id` stopped serving this slot; the last one closes the
    /// image and lets it go.
    pub fn detach(&self, id: u64) -> Result<(), BlockError> {
        self.guard.forget(id);
        if self.users.fetch_sub(1, Ordering::AcqRel) > 1 {
            return self.flush();
        }
        let mut held = self.held.lock().map_err(|_| poisoned())?;
        *held = None;
        match self.current() {
            Some(node) => {
                let res = run(self.engine, node, true);
                // Its files close (and their locks go) now, not when the
                // last reference to the device goes.
                self.node.store(None);
                res
            }
            None => Ok(()),
        }
    }

    /// Exports serving this slot.
    pub fn users(&self) -> usize {
        self.users.load(Ordering::Acquire)
    }
}

thread_local! {
    /// This thread's runtimes for [`run`], one per configuration, kept for
    /// the thread's life.
    static RUNTIMES: RefCell<Vec<(RuntimeConfig, Rc<Runtime>)>> = const { RefCell::new(Vec::new()) };
}

/// This thread's runtime for `engine`, made on its first use.
fn runtime(engine: RuntimeConfig) -> Result<Rc<Runtime>, BlockError> {
    let key = |c: &RuntimeConfig| (c.engine, c.depth, c.threads);
    RUNTIMES.with(|r| {
        let mut r = r.borrow_mut();
        if let Some((_, rt)) = r.iter().find(|(c, _)| key(c) == key(&engine)) {
            return Ok(rt.clone());
        }
        let rt = Rc::new(Runtime::new(engine).map_err(BlockError::Setup)?);
        r.push((engine, rt.clone()));
        Ok(rt)
    })
}

/// Flushes (or closes, with `close`) `node` on this thread's runtime for
/// `engine`, the same one at every call. A storage may keep state per
/// thread that belongs to the runtime it was made on: an NBD connection's
/// socket is registered with that runtime's reactor, so a flush on a new
/// runtime of a thread that flushed before waited for ever on the old one
/// (a device stopped twice on one connection, a guest paused and resumed
/// and then migrated, hung in `GET_VRING_BASE`); RBD keeps a queue per
/// runtime, which one runtime per thread makes once.
fn run(engine: RuntimeConfig, node: Arc<Node>, close: bool) -> Result<(), BlockError> {
    let rt = runtime(engine)?;
    rt.block_on(async move {
        if close {
            node.close().await
        } else {
            node.flush().await
        }
    })
}

#[cfg(test)]
#[path = "slot_tests.rs"]
mod tests;
