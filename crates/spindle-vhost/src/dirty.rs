//! Dirty-page logging for live migration (`VHOST_F_LOG_ALL` with
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`).
//!
//! While the frontend migrates, it gives a shared log (`SET_LOG_BASE`):
//! one bit per 4 KiB guest page, by guest physical address, and acks
//! `VHOST_F_LOG_ALL`. The backend sets the bit of every page it writes,
//! after the write, so the frontend copies the page again. Spindle writes
//! guest memory in three places, each marked here: request data (reads and
//! GET_ID, once the I/O completed), status bytes (`blk::exec::complete`),
//! and the used ring (in `worker.rs`: the whole ring after each batch of
//! entries, its flags and `avail_event` after notifications were turned
//! off and on).
//!
//! Guest memory keeps `Bitmap = ()`: vm-memory's own bitmap would put
//! every guest-memory access of the data path through it, logging or not.
//! Here a data path with logging off pays one atomic load per request and
//! per batch ([`DirtyLog::is_on`]); a mark takes no lock.

use arc_swap::ArcSwapOption;
use spindle_export::ratelimit::limited;
use spindle_io::memfd;
use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use vhost::vhost_user::message::VhostUserLog;
use virtio_queue::{Queue, QueueT};
use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;

/// Bytes of guest memory one bit of the log stands for (`VHOST_LOG_PAGE`).
pub const LOG_PAGE: u64 = 4096;

/// `VHOST_F_LOG_ALL`: the device logs every write to guest memory.
pub const VHOST_F_LOG_ALL: u64 = 1 << 26;

fn refused(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("dirty log refused: {why}"))
}

/// The frontend's log, mapped shared.
#[derive(Debug)]
pub struct LogMap {
    map: MmapRegion,
}

impl LogMap {
    /// Maps the log `msg` describes in `file` (`SET_LOG_BASE`). The file
    /// must be sealed against shrinking (QEMU seals its log memfd): a
    /// mapping past the end of a file that shrank would kill the process
    /// on its next mark.
    pub fn adopt(file: &File, msg: &VhostUserLog) -> io::Result<LogMap> {
        let (size, offset) = (msg.mmap_size, msg.mmap_offset);
        if size == 0 {
            return Err(refused("log size 0 (it covers no page)".into()));
        }
        if !offset.is_multiple_of(4096) {
            return Err(refused(format!("its offset {offset} is not page-aligned")));
        }
        if !spindle_io::memfd::cannot_shrink(file) {
            return Err(refused("its file is not a memfd sealed against shrinking".into()));
        }
        let len = file.metadata()?.len();
        let end = offset
            .checked_add(size)
            .ok_or_else(|| refused(format!("{size} bytes at {offset} overflow")))?;
        if len < end {
            return Err(refused(format!("its file has {len} bytes; the log ends at {end}")));
        }
        let size = usize::try_from(size).map_err(|_| refused(format!("{size} bytes cannot be mapped")))?;
        let map = MmapRegion::from_file(FileOffset::new(file.try_clone()?, offset), size)
            .map_err(|e| refused(format!("mmap: {e}")))?;
        Ok(LogMap { map })
    }

    /// Bytes of the log.
    pub fn len(&self) -> usize {
        self.map.size()
    }

    /// Whether the log has no byte (never: `adopt` refuses that).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sets the bit of every page that `len` bytes at guest address `gpa`
    /// touch. Pages past the end of the log are not marked (a frontend
    /// that gave a log too small for its memory): one rate-limited error.
    /// Returns whether every page was marked.
    pub fn mark(&self, gpa: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        let base = self.map.as_ptr();
        for page in first..=last {
            let byte = page / 8;
            if byte >= self.len() as u64 {
                limited!(
                    error,
                    gpa,
                    len,
                    log_bytes = self.len(),
                    "dirty log too small: guest page {page} is past its end; not marked"
                );
                return false;
            }
            // SAFETY: `byte` is inside the mapping, which lives as long as
            // `self`; an `AtomicU8` has the layout of a `u8`, and the
            // frontend reads and clears the log with atomic operations
            // too, so no access to this byte is a data race.
            let cell = unsafe { AtomicU8::from_ptr(base.add(byte as usize)) };
            cell.fetch_or(1 << (page % 8), Ordering::Relaxed);
        }
        true
    }

    /// Marks the used ring of `q`: flags, index, entries and
    /// `avail_event` (4 + 8 * size + 2 bytes at its guest address).
    pub fn mark_used_ring(&self, q: &Queue) {
        self.mark(q.used_ring(), 6 + 8 * u64::from(q.size()));
    }

    /// Marks what turning guest notifications off and on writes: the used
    /// ring's flags (without EVENT_IDX) and its `avail_event` (with).
    pub fn mark_used_event(&self, q: &Queue) {
        if q.event_idx_enabled() {
            self.mark(q.used_ring().saturating_add(4 + 8 * u64::from(q.size())), 2);
        } else {
            self.mark(q.used_ring(), 2);
        }
    }
}

#[derive(Debug, Default)]
struct State {
    log_all: bool,
    map: Option<Arc<LogMap>>,
}

/// Whether writes to guest memory are logged, and where: on while the
/// frontend acks `VHOST_F_LOG_ALL` and has given a log.
///
/// The data path takes no lock and, in steady state, makes one atomic load
/// ([`DirtyLog::is_on`] and each mark read `generation`): each I/O thread
/// keeps the log it marked last, with its generation, and loads the log
/// again from the `ArcSwap` only when the generation moved. Changes
/// (`SET_FEATURES`, `SET_LOG_BASE`, a reset) come from the connection's
/// message thread and are serialized among themselves by `state`'s lock,
/// which the data path never takes.
#[derive(Debug, Default)]
pub struct DirtyLog {
    /// 0 while logging is off; else the number of the last change, which
    /// no other change of any connection has.
    generation: AtomicU64,
    /// The log while logging is on (`state.map` then), else none.
    active: ArcSwapOption<LogMap>,
    state: Mutex<State>,
    /// `VHOST_USER_SET_LOG_FD`'s eventfd, kept and never signalled (see
    /// [`DirtyLog::set_log_fd`]).
    log_fd: Mutex<Option<OwnedFd>>,
    /// Benchmarks only: logging stays on whatever the frontend says.
    forced: bool,
}

/// The number of the next change of any [`DirtyLog`] (0 means off).
static GENERATION: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The log this thread marked last and its generation. It may keep a
    /// log that was replaced or turned off mapped until the thread marks
    /// again or ends (a connection's I/O threads end with it); a log is
    /// small (one bit per guest page).
    static LAST: RefCell<(u64, Option<Arc<LogMap>>)> = const { RefCell::new((0, None)) };
}

/// Set by [`force_logging`].
static FORCED: AtomicBool = AtomicBool::new(false);

/// Bytes of the private log of [`force_logging`]: one bit per page of a
/// 47-bit address space, since libblkio's "guest addresses" are its
/// process's virtual addresses. Sparse: only marked pages take memory.
const FORCED_LOG_BYTES: u64 = 1 << 32;

/// Benchmarks only (`spindle serve --x-dirty-log`, hidden): every
/// connection made from now on logs every page it writes into a private
/// log, as during a migration, whatever its frontend negotiates; so
/// `spindle bench` measures what logging costs the data path.
pub fn force_logging() {
    FORCED.store(true, Ordering::Release);
}

impl DirtyLog {
    /// Logging off.
    pub fn new() -> DirtyLog {
        DirtyLog::default()
    }

    /// The log of a new connection: off, unless [`force_logging`] was
    /// called (then on, into a private log, or off if that cannot be made).
    pub fn for_connection() -> DirtyLog {
        if !FORCED.load(Ordering::Acquire) {
            return DirtyLog::new();
        }
        let seals = memfd::SEAL_SHRINK | memfd::SEAL_GROW;
        let private = memfd::create_sized(c"spindle-dirty-log", FORCED_LOG_BYTES, seals)
            .and_then(|f| LogMap::adopt(&f, &VhostUserLog::new(FORCED_LOG_BYTES, 0)));
        match private {
            Ok(map) => {
                let d = DirtyLog {
                    forced: true,
                    ..DirtyLog::default()
                };
                d.update(|st| {
                    st.log_all = true;
                    st.map = Some(Arc::new(map));
                });
                d
            }
            Err(e) => {
                tracing::error!("--x-dirty-log: cannot make a private log: {e}");
                DirtyLog::new()
            }
        }
    }

    /// Runs `f` on the log if logging is on: one atomic load, and the
    /// thread's own copy of the log unless it changed since this thread
    /// last marked. Marks made while the log is replaced or logging turned
    /// off finish on the old log, which lives until they are done.
    fn with_log(&self, f: impl FnOnce(&LogMap)) {
        let generation = self.generation.load(Ordering::Acquire);
        if generation == 0 {
            return;
        }
        let mut f = Some(f);
        let cached = LAST.try_with(|last| {
            let mut last = last.borrow_mut();
            if last.0 != generation {
                // `active` was stored before `generation`: it is this
                // generation's log or a later one.
                *last = (generation, self.active.load_full());
            }
            if let (Some(m), Some(f)) = (&last.1, f.take()) {
                f(m);
            }
        });
        // Only while the thread's locals are being torn down: load it.
        if cached.is_err() {
            if let (Some(f), Some(m)) = (f, self.active.load_full()) {
                f(&m);
            }
        }
    }

    /// Whether logging is on: the data path's check (one atomic load),
    /// before it calls the marking functions below, kept out of line.
    #[inline]
    pub fn is_on(&self) -> bool {
        self.generation.load(Ordering::Acquire) != 0
    }

    /// Marks `len` bytes at `gpa` if logging is on.
    #[cold]
    #[inline(never)]
    pub fn mark(&self, gpa: u64, len: u64) {
        self.with_log(|m| {
            m.mark(gpa, len);
        });
    }

    /// Marks each `(gpa, len)` range and `len` bytes at `gpa` if logging
    /// is on (a request's data buffers and status byte).
    #[cold]
    #[inline(never)]
    pub fn mark_all(&self, ranges: &[(vm_memory::GuestAddress, usize)], status: Option<u64>) {
        self.with_log(|m| {
            for &(addr, len) in ranges {
                m.mark(addr.0, len as u64);
            }
            if let Some(gpa) = status {
                m.mark(gpa, 1);
            }
        });
    }

    /// [`LogMap::mark_used_ring`] if logging is on.
    #[cold]
    #[inline(never)]
    pub fn mark_used_ring(&self, q: &Queue) {
        self.with_log(|m| m.mark_used_ring(q));
    }

    /// [`LogMap::mark_used_event`] if logging is on.
    #[cold]
    #[inline(never)]
    pub fn mark_used_event(&self, q: &Queue) {
        self.with_log(|m| m.mark_used_event(q));
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut st);
        let on = st.log_all && st.map.is_some();
        // The log first, then its generation: a data path that sees the
        // generation finds that log (or a newer state's).
        self.active.store(if on { st.map.clone() } else { None });
        let generation = if on {
            GENERATION.fetch_add(1, Ordering::Relaxed)
        } else {
            0
        };
        self.generation.store(generation, Ordering::Release);
    }

    /// The features the frontend acked (`SET_FEATURES`). Clearing
    /// `VHOST_F_LOG_ALL` ends logging and drops the log (the frontend
    /// frees it; a new migration sends a new one).
    pub fn set_features(&self, features: u64) {
        if self.forced {
            return;
        }
        let log_all = features & VHOST_F_LOG_ALL != 0;
        self.update(|st| {
            if st.log_all && !log_all {
                st.map = None;
            }
            st.log_all = log_all;
        });
    }

    /// A new log (`SET_LOG_BASE`; again when the frontend resizes it).
    /// Marks already under way finish on the old one.
    pub fn set_base(&self, map: LogMap) {
        if self.forced {
            return;
        }
        self.update(|st| st.map = Some(Arc::new(map)));
    }

    /// Logging off and no log (a device reset). A `SET_LOG_FD` eventfd
    /// is closed too.
    pub fn reset(&self) {
        self.log_fd.lock().unwrap_or_else(|e| e.into_inner()).take();
        if self.forced {
            return;
        }
        self.update(|st| *st = State::default());
    }

    /// Keeps the eventfd of `VHOST_USER_SET_LOG_FD`, closing the one
    /// before. vhost-user allows a backend to signal it to tell the
    /// frontend that the log was written to; Spindle never does, and need
    /// not: it marks each page in the shared log itself, synchronously,
    /// right after the write, so the log always holds every write done so
    /// far. QEMU reads the log at each of its dirty-sync passes and a last
    /// time once the device stopped (`GET_VRING_BASE` returns only when
    /// every request of the ring completed and was marked), whatever the
    /// eventfd says. Kept rather than refused: refusing ends the connection,
    /// which would fail the migration of a frontend that sends it.
    pub fn set_log_fd(&self, fd: OwnedFd) {
        *self.log_fd.lock().unwrap_or_else(|e| e.into_inner()) = Some(fd);
    }

    /// Whether a `SET_LOG_FD` eventfd is held.
    pub fn has_log_fd(&self) -> bool {
        self.log_fd.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::driver::{log_pages, memfd};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    fn log(bytes: u64) -> (File, LogMap) {
        let f = memfd(bytes, true).unwrap();
        let m = LogMap::adopt(&f, &VhostUserLog::new(bytes, 0)).unwrap();
        (f, m)
    }

    fn marked(f: &File) -> Vec<u64> {
        log_pages(f).unwrap()
    }

    #[test]
    fn a_read_marks_every_page_it_touches_and_no_other() {
        let (f, m) = log(64);
        // 8 KiB starting 1 KiB into page 3: pages 3, 4 and 5.
        assert!(m.mark(3 * 4096 + 1024, 8192));
        assert_eq!(marked(&f), [3, 4, 5]);
        // One byte on the last byte of page 9; nothing for 0 bytes.
        assert!(m.mark(10 * 4096 - 1, 1));
        assert!(m.mark(20 * 4096, 0));
        assert_eq!(marked(&f), [3, 4, 5, 9]);
    }

    #[test]
    fn a_status_byte_marks_its_page() {
        let (f, m) = log(64);
        // Page 100 is byte 12, bit 4.
        m.mark(100 * 4096 + 4095, 1);
        assert_eq!(marked(&f), [100]);
    }

    #[test]
    fn a_used_ring_update_marks_the_whole_ring() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0x1000), 1024);
        let q: Queue = mock.create_queue().unwrap();
        let (f, m) = log(64);
        m.mark_used_ring(&q);
        let (first, last) = (q.used_ring() / 4096, (q.used_ring() + 6 + 8 * 1024 - 1) / 4096);
        assert!(last > first, "a 1024-entry used ring spans pages");
        assert_eq!(marked(&f), (first..=last).collect::<Vec<_>>());
        // Flags (no EVENT_IDX) on the first page, avail_event on the last.
        let (f, m) = log(64);
        m.mark_used_event(&q);
        assert_eq!(marked(&f), [first]);
        let mut q = q;
        q.set_event_idx(true);
        let (f, m) = log(64);
        m.mark_used_event(&q);
        assert_eq!(marked(&f), [last]);
    }

    #[test]
    fn pages_past_a_tiny_log_are_not_marked() {
        let (f, m) = log(1);
        assert!(m.mark(7 * 4096, 1));
        assert!(!m.mark(6 * 4096, 3 * 4096), "pages 6 to 8: 8 is past one byte");
        assert!(!m.mark(u64::MAX - 10, 100), "the last pages of the address space");
        assert_eq!(marked(&f), [6, 7]);
    }

    #[test]
    fn logs_that_cannot_be_mapped_safely_are_refused() {
        let f = memfd(4096, false).unwrap();
        let e = LogMap::adopt(&f, &VhostUserLog::new(4096, 0)).unwrap_err();
        assert!(e.to_string().contains("sealed"), "{e}");
        let f = memfd(4096, true).unwrap();
        for (size, off, what) in [
            (0, 0, "log size 0"),
            (8192, 0, "the log ends at 8192"),
            (4096, 4096, "the log ends at 8192"),
            (16, 100, "not page-aligned"),
            (u64::MAX, 4096, "overflow"),
        ] {
            let e = LogMap::adopt(&f, &VhostUserLog::new(size, off)).unwrap_err();
            assert!(e.to_string().contains(what), "{size} at {off}: {e}");
        }
    }

    #[test]
    fn logging_is_on_only_with_log_all_and_a_log() {
        let d = DirtyLog::new();
        let (f, m) = log(64);
        d.mark(0, 1);
        d.set_base(m);
        assert!(!d.is_on(), "a log without LOG_ALL");
        d.mark(4096, 1);
        d.set_features(VHOST_F_LOG_ALL | 1);
        assert!(d.is_on());
        d.mark(2 * 4096, 1);
        // LOG_ALL cleared: off, and the log is dropped.
        d.set_features(1);
        assert!(!d.is_on());
        d.mark(3 * 4096, 1);
        d.set_features(VHOST_F_LOG_ALL);
        assert!(!d.is_on(), "LOG_ALL again needs a new log");
        assert_eq!(marked(&f), [2]);
        // A new (resized) log replaces the old one; a reset ends it.
        let (g, m) = log(128);
        d.set_base(m);
        d.mark(600 * 4096, 1);
        d.reset();
        d.mark(601 * 4096, 1);
        assert!(!d.is_on());
        assert_eq!(marked(&g), [600]);
        assert_eq!(marked(&f), [2]);
    }

    #[test]
    fn a_log_fd_is_kept_until_replaced_or_reset() {
        use std::io::Read;
        use std::os::unix::net::UnixStream;
        // Each fd given is one end of a socket pair: the other end reads
        // EOF once Spindle closed it.
        let closed = |peer: &mut UnixStream| match peer.read(&mut [0u8; 1]) {
            Ok(0) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            r => panic!("{r:?}"),
        };
        let pair = || {
            let (ours, peer) = UnixStream::pair().unwrap();
            peer.set_nonblocking(true).unwrap();
            (OwnedFd::from(ours), peer)
        };
        let d = DirtyLog::new();
        assert!(!d.has_log_fd());
        let (a, mut pa) = pair();
        d.set_log_fd(a);
        assert!(d.has_log_fd());
        assert!(!closed(&mut pa), "kept");
        let (b, mut pb) = pair();
        d.set_log_fd(b);
        assert!(closed(&mut pa), "the previous one is closed");
        assert!(!closed(&mut pb));
        // Logging on and off leaves it alone; a reset closes it.
        let (_f, m) = log(64);
        d.set_base(m);
        d.set_features(VHOST_F_LOG_ALL);
        d.set_features(0);
        assert!(!closed(&mut pb));
        d.reset();
        assert!(closed(&mut pb));
        assert!(!d.has_log_fd());
    }

    #[test]
    fn two_logs_marked_from_one_thread_keep_to_their_own_pages() {
        // Each thread keeps the log it marked last: another connection's
        // log (or the same log set again) must not be taken for it.
        let (a, b) = (DirtyLog::new(), DirtyLog::new());
        let ((fa, ma), (fb, mb)) = (log(64), log(64));
        a.set_base(ma);
        a.set_features(VHOST_F_LOG_ALL);
        b.set_base(mb);
        b.set_features(VHOST_F_LOG_ALL);
        for page in 0..4 {
            a.mark(page * 2 * 4096, 1);
            b.mark((page * 2 + 1) * 4096, 1);
        }
        assert_eq!(marked(&fa), [0, 2, 4, 6]);
        assert_eq!(marked(&fb), [1, 3, 5, 7]);
        // Off and on again with a new log: the old one is not marked.
        a.set_features(0);
        a.mark(20 * 4096, 1);
        let (fc, mc) = log(64);
        a.set_features(VHOST_F_LOG_ALL);
        a.set_base(mc);
        a.mark(21 * 4096, 1);
        assert_eq!(marked(&fa), [0, 2, 4, 6]);
        assert_eq!(marked(&fc), [21]);
        // Another thread marks the same log.
        std::thread::scope(|s| {
            s.spawn(|| a.mark(22 * 4096, 1));
        });
        assert_eq!(marked(&fc), [21, 22]);
    }
}
