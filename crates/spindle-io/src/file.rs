//! Image files and block devices, opened with a QEMU cache mode.

use crate::buf::AlignedBuf;
use crate::cache::CacheMode;
use crate::error::{Error, Result};
use crate::lock::{self, Locking};
use crate::op::Op;
use crate::range_lock::RangeLocks;
use crate::runtime::{submit, OpMem};
use crate::sg::SgList;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Alignment O_DIRECT needs for memory addresses and for offsets/lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alignment {
    /// Buffer address alignment.
    pub mem: usize,
    /// File offset and length alignment.
    pub req: usize,
}

/// How to open a [`File`].
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    /// Cache mode.
    pub cache: CacheMode,
    /// Open read-only.
    pub read_only: bool,
    /// Create the file if missing (and truncate it, once the lock is taken).
    pub create: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            cache: CacheMode::Writeback,
            read_only: false,
            create: false,
        }
    }
}

/// An open image file or block device.
#[derive(Debug)]
pub struct File {
    fd: Arc<OwnedFd>,
    path: PathBuf,
    cache: CacheMode,
    align: Alignment,
    block_device: bool,
    /// A block device's logical block size (512 for files).
    sector: u64,
    read_only: bool,
    /// Write ordering around read-modify-write (O_DIRECT only).
    ranges: RangeLocks,
    /// Restore the exact length after a padded O_DIRECT write past the end.
    exact_length: bool,
}

impl Drop for File {
    fn drop(&mut self) {
        lock::release(std::os::fd::AsFd::as_fd(&self.fd));
    }
}

impl std::fmt::Debug for RangeLocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RangeLocks")
    }
}

const MAX_IOV: usize = 1024;

impl File {
    /// Opens `path` with QEMU's image locks for the access: a reader, a
    /// writer, or a creator ([`Locking`]). Setup-time only: this blocks.
    pub fn open(path: &Path, opts: OpenOptions) -> Result<File> {
        let locking = if opts.create {
            Locking::CREATE
        } else {
            Locking::for_access(opts.read_only)
        };
        Self::open_with_lock(path, opts, locking)
    }

    /// Opens `path` holding `locking` for the File's lifetime; fails with
    /// [`Error::InUse`] when another user of the image conflicts.
    pub fn open_with_lock(path: &Path, opts: OpenOptions, locking: Locking) -> Result<File> {
        Self::open_locked(path, opts, locking, true)
    }

    /// Opens `path` taking `locking`'s locks without testing for conflicts:
    /// for reopening an image whose locks another open of this process
    /// already holds (a superset of them), so the image is never unlocked
    /// in between. Anyone else was kept out by that open.
    pub fn open_inheriting(path: &Path, opts: OpenOptions, locking: Locking) -> Result<File> {
        Self::open_locked(path, opts, locking, false)
    }

    /// Sets this open's image locks to exactly `locking`'s, without
    /// testing for conflicts (see `open_inheriting`): to give up
    /// permissions or sharing, or to take back what another open of this
    /// process still holds.
    pub fn set_locks(&self, locking: Locking) -> Result<()> {
        lock::set(std::os::fd::AsFd::as_fd(&self.fd), &self.path, locking)
    }

    fn open_locked(path: &Path, opts: OpenOptions, locking: Locking, check: bool) -> Result<File> {
        let err = |context: &str, source| Error::Open {
            path: path.to_path_buf(),
            context: context.into(),
            source,
        };
        let mut o = fs::OpenOptions::new();
        o.read(true).write(!opts.read_only);
        if opts.create {
            o.create(true).truncate(false);
        }
        let mut flags = libc::O_CLOEXEC;
        if opts.cache.direct() {
            flags |= libc::O_DIRECT;
        }
        o.custom_flags(flags);
        let f = o.open(path).map_err(|e| {
            if opts.cache.direct() && e.raw_os_error() == Some(libc::EINVAL) {
                err(
                    "this file system does not support O_DIRECT (cache=none/directsync); use --cache writeback",
                    e,
                )
            } else {
                err("cannot open", e)
            }
        })?;
        if check {
            lock::acquire(std::os::fd::AsFd::as_fd(&f), path, locking)?;
        } else {
            lock::set(std::os::fd::AsFd::as_fd(&f), path, locking)?;
        }
        let meta = f.metadata().map_err(|e| err("cannot stat", e))?;
        if opts.create && meta.is_file() {
            // Only now that nobody else uses it.
            f.set_len(0).map_err(|e| err("cannot truncate", e))?;
        }
        let block_device = meta.file_type().is_block_device();
        let fd: Arc<OwnedFd> = Arc::new(f.into());
        let sector = if block_device { logical_block(&fd) } else { 512 };
        let align = if opts.cache.direct() {
            probe_alignment(&fd, block_device)
        } else {
            Alignment { mem: 1, req: 1 }
        };
        Ok(File {
            fd,
            path: path.to_path_buf(),
            cache: opts.cache,
            align,
            block_device,
            sector,
            read_only: opts.read_only,
            ranges: RangeLocks::default(),
            exact_length: false,
        })
    }

    /// Keep the file's length exact: an unaligned O_DIRECT write at the end
    /// pads to the block size and would grow the file; with this set the
    /// padding is cut off again. For raw images, whose size is the file's
    /// length and whose writes never race past the end. Formats that
    /// allocate past the end concurrently (qcow2) must leave it unset.
    pub fn keep_exact_length(&mut self) {
        self.exact_length = true;
    }

    /// The path it was opened as.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The cache mode.
    pub fn cache(&self) -> CacheMode {
        self.cache
    }
    /// The O_DIRECT alignment (1/1 without O_DIRECT).
    pub fn alignment(&self) -> Alignment {
        self.align
    }
    /// Whether it is a block device.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }
    /// Whether it was opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    /// The raw descriptor.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Current size in bytes.
    pub fn len(&self) -> io::Result<u64> {
        if self.block_device {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 into `size`.
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            return Ok(size);
        }
        let mut st: libc::stat = zeroed_stat();
        // SAFETY: fstat fills `st`.
        if unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st.st_size as u64)
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Bytes actually allocated on the host.
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        let mut st: libc::stat = zeroed_stat();
        // SAFETY: fstat fills `st`.
        if unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st.st_blocks as u64 * 512)
    }

    /// Truncates or extends the file (setup/resize path; blocks briefly).
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        // SAFETY: plain syscall on our descriptor.
        if unsafe { libc::ftruncate(self.fd.as_raw_fd(), len as i64) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads into `buf` at `offset` with blocking `pread`s, through an
    /// aligned buffer of its own (O_DIRECT needs one): for setup time,
    /// such as reading an image's header and tables at open, never on an
    /// I/O thread's runtime. Returns the bytes read, fewer than
    /// `buf.len()` only at the end of the file; the rest is left as it was.
    pub fn read_blocking(&self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let (start, len) = self.bounce_range(offset, buf.len());
        let mut bounce = AlignedBuf::new(len, self.align.mem);
        let req = self.align.req.max(1);
        let mut done = 0;
        while done < len {
            let rest = &mut bounce[done..];
            // SAFETY: pread writes at most `rest.len()` bytes into `rest`,
            // memory this function owns for the call.
            let r = unsafe {
                libc::pread(
                    self.raw_fd(),
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                    (start + done as u64) as i64,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            done += r as usize;
            // End of file (a block cut short ends it too: O_DIRECT cannot
            // go on from an unaligned offset).
            if r == 0 || !(r as usize).is_multiple_of(req) {
                break;
            }
        }
        let pos = (offset - start) as usize;
        let n = done.saturating_sub(pos).min(buf.len());
        buf[..n].copy_from_slice(&bounce[pos..pos + n]);
        Ok(n)
    }

    fn aligned(&self, offset: u64, sg: &SgList) -> bool {
        let Alignment { mem, req } = self.align;
        if mem == 1 && req == 1 {
            return true;
        }
        offset.is_multiple_of(req as u64)
            && sg
                .segments()
                .all(|(p, l)| p.is_multiple_of(mem) && l.is_multiple_of(req))
    }

    /// Reads exactly `sg.len()` bytes at `offset` into `sg`, zero-copy when
    /// the alignment allows it. Bytes past the end of the file read as
    /// zeroes.
    pub async fn read_sg(&self, offset: u64, sg: &SgList) -> io::Result<()> {
        if sg.is_empty() {
            return Ok(());
        }
        if !self.aligned(offset, sg) {
            // Boxed: the rare path's state would make every aligned read's
            // future (and its task's allocation) bigger.
            return Box::pin(self.read_bounced(offset, sg)).await;
        }
        self.transfer(offset, sg, false, false).await
    }

    /// Writes all of `sg` at `offset`; with `fua` the data is durable on
    /// return.
    pub async fn write_sg(&self, offset: u64, sg: &SgList, fua: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        if sg.is_empty() {
            return Ok(());
        }
        let aligned = self.aligned(offset, sg);
        // With O_DIRECT, keep read-modify-writes of a block apart from other
        // writes to it.
        let _guard = if self.align.req > 1 {
            let (start, len) = self.bounce_range(offset, sg.len());
            Some(self.ranges.lock(start, start + len as u64, !aligned).await)
        } else {
            None
        };
        if !aligned {
            // Boxed, as in `read_sg`.
            return Box::pin(self.write_bounced(offset, sg, fua)).await;
        }
        self.transfer(offset, sg, true, fua).await
    }

    /// Reads `len` bytes at `offset` into a new buffer, aligned for this
    /// file.
    pub async fn read_buf(&self, offset: u64, len: usize) -> io::Result<AlignedBuf> {
        let sg = SgList::owned(AlignedBuf::new(len, self.align.mem.max(512)));
        self.read_sg(offset, &sg).await?;
        Ok(sg.into_buf().expect("no I/O holds a finished read's buffer"))
    }

    /// Reads into `buf` (through a buffer of its own: the borrowed slice
    /// is never handed to the kernel).
    pub async fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let b = self.read_buf(offset, buf.len()).await?;
        buf.copy_from_slice(&b);
        Ok(())
    }

    /// Writes `buf` at `offset` (through a copy of its own).
    pub async fn write_at(&self, offset: u64, buf: &[u8], fua: bool) -> io::Result<()> {
        let mut b = AlignedBuf::new(buf.len(), self.align.mem.max(512));
        b.copy_from_slice(buf);
        // Straight to `write_sg`, not through `write_buf`: one list held
        // across the await instead of two nested futures' worth.
        self.write_sg(offset, &SgList::owned(b), fua).await
    }

    /// Writes the buffer at `offset` and hands it back.
    pub async fn write_buf(&self, offset: u64, buf: AlignedBuf, fua: bool) -> io::Result<AlignedBuf> {
        let sg = SgList::owned(buf);
        self.write_sg(offset, &sg, fua).await?;
        Ok(sg.into_buf().expect("no I/O holds a finished write's buffer"))
    }

    /// What an op without memory still needs kept: the descriptor.
    fn no_mem(&self) -> OpMem {
        OpMem {
            iov: Vec::new(),
            keep: Default::default(),
            fd: Some(self.fd.clone()),
        }
    }

    /// Moves data for an aligned request, resubmitting after short transfers.
    async fn transfer(&self, mut offset: u64, sg: &SgList, write: bool, fua: bool) -> io::Result<()> {
        let flags = if fua || self.cache.write_through() {
            libc::RWF_DSYNC
        } else {
            0
        };
        let mut done = 0usize;
        while done < sg.len() {
            // Built in a block: no list or iovec array is held across the
            // await, only the op's future, which keeps this future (and
            // each one that awaits it, up to a request's task) small.
            let (op, mem) = {
                // The whole list the first time (no copy of it to make).
                let rest;
                let part = if done == 0 {
                    sg
                } else {
                    rest = sg.slice(done, sg.len() - done);
                    &rest
                };
                let mut iov = part.iovecs();
                iov.truncate(MAX_IOV);
                let (ptr, cnt) = (iov.as_ptr(), iov.len() as u32);
                let op = if write {
                    Op::Writev {
                        fd: self.raw_fd(),
                        iov: ptr,
                        iovcnt: cnt,
                        offset,
                        flags,
                    }
                } else {
                    Op::Readv {
                        fd: self.raw_fd(),
                        iov: ptr,
                        iovcnt: cnt,
                        offset,
                    }
                };
                let mem = OpMem {
                    iov,
                    keep: part.keep_alives(),
                    fd: Some(self.fd.clone()),
                };
                (op, mem)
            };
            // SAFETY: the op points at `mem.iov` (its heap block does not
            // move with the Vec), whose entries point into memory that the
            // keep-alives in `mem` keep valid.
            let res = unsafe { submit(op, Some(mem)) }.await;
            if res == -libc::EINTR || res == -libc::EAGAIN {
                continue;
            }
            if res < 0 {
                return Err(io::Error::from_raw_os_error(-res));
            }
            if res == 0 {
                if write {
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "device accepted no data"));
                }
                // End of file: the rest reads as zeroes.
                sg.slice(done, sg.len() - done).fill_zero();
                return Ok(());
            }
            offset += res as u64;
            done += res as usize;
        }
        Ok(())
    }

    fn bounce_range(&self, offset: u64, len: usize) -> (u64, usize) {
        let req = self.align.req as u64;
        let start = offset / req * req;
        let end = (offset + len as u64).div_ceil(req) * req;
        (start, (end - start) as usize)
    }

    /// Reads an aligned range into a new aligned buffer.
    async fn read_aligned(&self, offset: u64, len: usize) -> io::Result<AlignedBuf> {
        let sg = SgList::owned(AlignedBuf::new(len, self.align.mem));
        self.transfer(offset, &sg, false, false).await?;
        Ok(sg.into_buf().expect("no I/O holds a finished read's buffer"))
    }

    async fn read_bounced(&self, offset: u64, sg: &SgList) -> io::Result<()> {
        let (start, len) = self.bounce_range(offset, sg.len());
        let bounce = self.read_aligned(start, len).await?;
        let pos = (offset - start) as usize;
        sg.copy_from(&bounce[pos..pos + sg.len()]);
        Ok(())
    }

    async fn write_bounced(&self, offset: u64, sg: &SgList, fua: bool) -> io::Result<()> {
        let total = sg.len();
        let (start, len) = self.bounce_range(offset, total);
        let mut bounce = AlignedBuf::new(len, self.align.mem);
        let req = self.align.req;
        let end = offset + total as u64;
        let head_partial = offset != start;
        let tail_partial = end != start + len as u64;
        // Read-modify-write of the partially covered first and last blocks.
        if head_partial {
            bounce[..req].copy_from_slice(&self.read_aligned(start, req).await?);
        }
        if tail_partial && !(head_partial && len == req) {
            let tail = start + (len - req) as u64;
            bounce[len - req..].copy_from_slice(&self.read_aligned(tail, req).await?);
        }
        let pos = (offset - start) as usize;
        sg.copy_to(&mut bounce[pos..pos + total]);
        let old_len = if self.block_device || !self.exact_length {
            u64::MAX
        } else {
            self.len()?
        };
        self.transfer(start, &SgList::owned(bounce), true, fua).await?;
        // With an exact length, the padding must not grow the file past the write.
        if start + len as u64 > old_len.max(end) {
            self.set_len(old_len.max(end))?;
        }
        Ok(())
    }

    /// Makes written data durable (no-op with cache=unsafe).
    pub async fn flush(&self) -> io::Result<()> {
        if self.cache.ignore_flush() || self.read_only {
            return Ok(());
        }
        let op = Op::Fsync {
            fd: self.raw_fd(),
            datasync: true,
        };
        // SAFETY: the op references no memory; `mem` keeps the descriptor.
        check(unsafe { submit(op, Some(self.no_mem())) }.await)
    }

    async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let op = Op::Fallocate {
            fd: self.raw_fd(),
            mode,
            offset,
            len,
        };
        // SAFETY: the op references no memory; `mem` keeps the descriptor.
        check(unsafe { submit(op, Some(self.no_mem())) }.await)
    }

    /// A block device's discard granularity and largest discard in bytes
    /// (sysfs `queue/discard_granularity`, `queue/discard_max_bytes`, of
    /// the disk for a partition); `None` for files or when unknown. Setup
    /// and configuration only: it reads sysfs.
    pub fn discard_limits(&self) -> Option<(u64, u64)> {
        if !self.block_device {
            return None;
        }
        let mut st: libc::stat = zeroed_stat();
        // SAFETY: fstat fills `st`.
        if unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) } < 0 {
            return None;
        }
        let (major, minor) = (libc::major(st.st_rdev), libc::minor(st.st_rdev));
        let mut dev = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
        if dev.join("partition").exists() {
            dev = dev.parent()?.to_path_buf();
        }
        let read = |f: &str| -> Option<u64> {
            std::fs::read_to_string(dev.join("queue").join(f))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        Some((read("discard_granularity")?, read("discard_max_bytes")?))
    }

    /// Discards a range of a block device, shrunk to whole logical
    /// blocks (a discard is advisory): the device's own discard, without
    /// blocking the thread (`BLOCK_URING_CMD_DISCARD` under io_uring,
    /// `BLKDISCARD` on a worker thread under the other engines). Where the
    /// kernel has no such io_uring command, or the device cannot discard,
    /// the range is zeroed with unmapping allowed (`fallocate`
    /// `PUNCH_HOLE`); where that fails too, nothing is done.
    pub async fn discard_device(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.block_device {
            return self.punch_hole(offset, len).await;
        }
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        let block = self.sector.max(512);
        let start = offset.div_ceil(block) * block;
        let end = (offset + len) / block * block;
        if end <= start {
            return Ok(());
        }
        let op = Op::Discard {
            fd: self.raw_fd(),
            offset: start,
            len: end - start,
        };
        // SAFETY: the op references no memory; `mem` keeps the descriptor.
        match check(unsafe { submit(op, Some(self.no_mem())) }.await) {
            Err(e) if unsupported(&e) => {}
            r => return r,
        }
        match self.punch_hole(start, end - start).await {
            Err(e) if unsupported(&e) => Ok(()),
            r => r,
        }
    }

    /// Deallocates a range (discard). Reads of it return zeroes afterwards.
    pub async fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
            .await
    }

    /// Makes a range read as zeroes: ZERO_RANGE, then hole punching (when
    /// `may_unmap`), then writing zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        // A block device zeroes with unmapping allowed on PUNCH_HOLE (the
        // device's write-zeroes with unmap, no fallback to writing), which
        // gives thin volumes their space back.
        if may_unmap && self.block_device && self.punch_hole(offset, len).await.is_ok() {
            return Ok(());
        }
        if self
            .fallocate(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
            .await
            .is_ok()
        {
            return Ok(());
        }
        if may_unmap && !self.block_device && self.punch_hole(offset, len).await.is_ok() {
            return Ok(());
        }
        const CHUNK: u64 = 1 << 20;
        let zeroes = SgList::owned(AlignedBuf::new(CHUNK as usize, self.align.mem.max(4096)));
        let mut pos = offset;
        while pos < offset + len {
            let n = CHUNK.min(offset + len - pos) as usize;
            self.write_sg(pos, &zeroes.slice(0, n), false).await?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Preallocates a range (fallocate mode 0).
    pub async fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(0, offset, len).await
    }

    /// Whether the file has holes (sparse). Native AIO blocks on those.
    pub fn is_sparse(&self) -> bool {
        match (self.len(), self.allocated_bytes()) {
            (Ok(len), Ok(alloc)) => !self.block_device && alloc < len,
            _ => false,
        }
    }
}

fn check(res: i32) -> io::Result<()> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(())
    }
}

fn zeroed_stat() -> libc::stat {
    // SAFETY: libc::stat is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

/// Finds O_DIRECT alignment: statx(STATX_DIOALIGN), the logical block size of
/// a device, or a safe 4 KiB.
fn probe_alignment(fd: &OwnedFd, block_device: bool) -> Alignment {
    let mut stx: libc::statx = {
        // SAFETY: statx is plain old data.
        unsafe { std::mem::zeroed() }
    };
    // SAFETY: statx fills stx for our descriptor with AT_EMPTY_PATH.
    let r = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        return Alignment {
            mem: (stx.stx_dio_mem_align as usize).max(1),
            req: stx.stx_dio_offset_align as usize,
        };
    }
    if block_device {
        let mut ssz: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int.
        if unsafe { libc::ioctl(fd.as_raw_fd(), BLKSSZGET, &mut ssz as *mut libc::c_int) } == 0 && ssz > 0 {
            return Alignment {
                mem: ssz as usize,
                req: ssz as usize,
            };
        }
    }
    Alignment { mem: 4096, req: 4096 }
}

/// A block device's logical block size (BLKSSZGET), 512 if unknown.
fn logical_block(fd: &OwnedFd) -> u64 {
    let mut ssz: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), BLKSSZGET, &mut ssz as *mut libc::c_int) } == 0 && ssz > 0 {
        ssz as u64
    } else {
        512
    }
}

/// Errors that mean "this kernel or device cannot do that" rather than
/// a failure of the device.
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOTTY) | Some(libc::ENOSYS)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineKind;
    use crate::runtime::{Runtime, RuntimeConfig};

    fn rt(kind: EngineKind) -> Runtime {
        Runtime::new(RuntimeConfig {
            engine: kind,
            ..Default::default()
        })
        .unwrap()
    }

    /// Unaligned reads and writes through every engine and cache mode match a
    /// plain std::fs view of the file.
    #[test]
    fn unaligned_io_round_trips_in_every_mode() {
        let dir =
            tempfile::tempdir_in(std::env::var("SPINDLE_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into())).unwrap();
        for kind in [EngineKind::IoUring, EngineKind::Native, EngineKind::Threads] {
            for cache in [
                CacheMode::None,
                CacheMode::Writeback,
                CacheMode::Directsync,
                CacheMode::Unsafe,
            ] {
                let path = dir.path().join(format!("f-{kind}-{cache}"));
                std::fs::write(&path, vec![0xAAu8; 65536]).unwrap();
                let mut f = File::open(
                    &path,
                    OpenOptions {
                        cache,
                        ..Default::default()
                    },
                )
                .unwrap();
                f.keep_exact_length();
                rt(kind).block_on(async {
                    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
                    f.write_at(1234, &data, false).await.unwrap();
                    f.write_at(4096, &data[..4096], true).await.unwrap();
                    f.flush().await.unwrap();
                    let mut back = vec![0u8; 10_000];
                    f.read_at(1234, &mut back).await.unwrap();
                    let mut expect = data.clone();
                    expect[4096 - 1234..8192 - 1234].copy_from_slice(&data[..4096]);
                    assert_eq!(back, expect, "{kind} {cache}");
                    // Past EOF reads zeroes.
                    let mut tail = vec![1u8; 8192];
                    f.read_at(65536 - 4096, &mut tail).await.unwrap();
                    assert!(tail[4096..].iter().all(|&b| b == 0));
                    f.write_zeroes(0, 8192, true).await.unwrap();
                    let mut z = vec![1u8; 8192];
                    f.read_at(0, &mut z).await.unwrap();
                    assert!(z.iter().all(|&b| b == 0));
                });
                assert_eq!(std::fs::metadata(&path).unwrap().len(), 65536);
                let disk = std::fs::read(&path).unwrap();
                assert!(disk[..8192].iter().all(|&b| b == 0));
                assert_eq!(disk[8192], (((8192 - 1234) as u32 * 7) % 251) as u8);
            }
        }
    }

    /// Far more ops in flight than the completion ring holds: completions
    /// parked in the kernel's overflow list must still be reaped.
    #[test]
    fn completion_queue_overflow_is_reaped() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let f = File::open(&path, OpenOptions::default()).unwrap();
        // Every engine, sized for 8 ops: AIO queues the rest for free slots,
        // io_uring for a free submission queue.
        for kind in [EngineKind::IoUring, EngineKind::Native, EngineKind::Threads] {
            let rt = Runtime::new(RuntimeConfig {
                engine: kind,
                depth: 8,
                threads: 1,
            })
            .unwrap();
            let sum: u64 = rt.block_on(async {
                let reads = (0..4096u64).map(|i| {
                    let f = &f;
                    async move {
                        let mut b = [0u8; 16];
                        f.read_at(i * 256, &mut b).await.unwrap();
                        b.iter().map(|&x| x as u64).sum::<u64>()
                    }
                });
                futures::future::join_all(reads).await.into_iter().sum()
            });
            assert_eq!(sum, 4096 * 16 * 7, "{kind}");
        }
    }

    /// Concurrent unaligned writes into the same O_DIRECT block each do a
    /// read-modify-write; none may undo another's bytes.
    #[test]
    fn concurrent_unaligned_writes_to_one_block_all_land() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 1 << 16]).unwrap();
        let f = File::open(
            &path,
            OpenOptions {
                cache: CacheMode::None,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(f.alignment().req > 1, "test needs O_DIRECT alignment");
        for kind in [EngineKind::IoUring, EngineKind::Threads] {
            rt(kind).block_on(async {
                let writes = (0..40u64).map(|i| {
                    let f = &f;
                    async move {
                        let b = [(i + 1) as u8; 100];
                        f.write_at(i * 100, &b, false).await.unwrap();
                    }
                });
                futures::future::join_all(writes).await;
            });
            let disk = std::fs::read(&path).unwrap();
            for i in 0..40usize {
                assert!(
                    disk[i * 100..i * 100 + 100].iter().all(|&b| b == (i + 1) as u8),
                    "{kind}: write {i} was lost"
                );
            }
        }
    }

    /// A padded unaligned write at the end of the file, racing with a write
    /// further out (what qcow2 allocation does), must not cut the latter off.
    #[test]
    fn padded_write_at_eof_does_not_truncate_a_concurrent_extension() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 65536]).unwrap();
        let f = File::open(
            &path,
            OpenOptions {
                cache: CacheMode::None,
                ..Default::default()
            },
        )
        .unwrap();
        rt(EngineKind::IoUring).block_on(async {
            for round in 0..32u64 {
                let end = f.len().unwrap();
                let far = end + (1 << 20);
                let mut big = AlignedBuf::new(65536, 4096);
                big.fill(round as u8 + 1);
                let small = [0xEEu8; 100];
                let (a, b) = futures::join!(f.write_at(end + 10, &small, false), f.write_at(far, &big, false));
                a.unwrap();
                b.unwrap();
                let mut back = AlignedBuf::new(65536, 4096);
                f.read_at(far, &mut back).await.unwrap();
                assert!(
                    back.iter().all(|&x| x == round as u8 + 1),
                    "round {round}: extension was cut off"
                );
            }
        });
    }

    #[test]
    fn many_concurrent_ops_complete() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 4 << 20]).unwrap();
        for kind in [EngineKind::IoUring, EngineKind::Native, EngineKind::Threads] {
            let f = std::rc::Rc::new(
                File::open(
                    &path,
                    OpenOptions {
                        cache: CacheMode::None,
                        ..Default::default()
                    },
                )
                .unwrap(),
            );
            rt(kind).block_on(async {
                let tasks: Vec<_> = (0..1000u64)
                    .map(|i| {
                        let f = f.clone();
                        crate::runtime::spawn(async move {
                            let off = (i % 1024) * 4096;
                            let mut b = AlignedBuf::new(4096, 4096);
                            b.fill((i % 1024) as u8);
                            f.write_at(off, &b, false).await.unwrap();
                            let mut r = AlignedBuf::new(4096, 4096);
                            f.read_at(off, &mut r).await.unwrap();
                            r[0]
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await;
                }
            });
        }
    }

    /// Leaking the future of an I/O in flight (safe Rust) and freeing the
    /// caller's buffer must not let the kernel write into memory that has
    /// been handed out again.
    #[test]
    fn a_leaked_read_never_writes_into_freed_memory() {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0x5au8; 1 << 20]).unwrap();
        for kind in [EngineKind::IoUring, EngineKind::Native, EngineKind::Threads] {
            let f = File::open(&path, OpenOptions::default()).unwrap();
            let rt = rt(kind);
            let fresh: Vec<Vec<u8>> = rt.block_on(async {
                let mut buf = vec![0u8; 65536];
                let mut fut = Box::pin(f.read_at(0, &mut buf));
                let mut cx = Context::from_waker(Waker::noop());
                // Queued, not yet submitted: the kernel sees it only after
                // the buffer is gone.
                assert!(matches!(fut.as_mut().poll(&mut cx), Poll::Pending));
                std::mem::forget(fut);
                drop(buf);
                // Same-size allocations: the allocator hands the freed block out again.
                (0..8).map(|_| vec![0u8; 65536]).collect()
            });
            // Let every op complete.
            while rt.run_ready() > 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            for v in &fresh {
                assert!(v.iter().all(|&b| b == 0), "{kind}: the kernel wrote into reused memory");
            }
        }
    }

    /// The discard op itself (not a fallback) works on a block device
    /// under every engine: a loop device, whose backing file loses the
    /// discarded blocks. Needs root (losetup), as the CI has.
    #[test]
    fn the_discard_op_reaches_a_loop_device_under_every_engine() {
        use std::os::unix::fs::MetadataExt;
        for kind in [EngineKind::IoUring, EngineKind::Native, EngineKind::Threads] {
            let dir = tempfile::tempdir_in("/var/tmp").unwrap();
            let backing = dir.path().join("b.raw");
            std::fs::write(&backing, vec![0xaau8; 4 << 20]).unwrap();
            let out = std::process::Command::new("losetup")
                .args(["-f", "--show"])
                .arg(&backing)
                .output()
                .expect("losetup (util-linux) is required");
            assert!(
                out.status.success(),
                "losetup: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let dev = String::from_utf8(out.stdout).unwrap().trim().to_owned();
            let rt = rt(kind);
            let res = rt.block_on(async {
                let f = File::open(Path::new(&dev), OpenOptions::default()).unwrap();
                assert!(f.is_block_device());
                let op = Op::Discard {
                    fd: f.raw_fd(),
                    offset: 1 << 20,
                    len: 2 << 20,
                };
                // SAFETY: the op references no memory; `mem` keeps the descriptor.
                unsafe { submit(op, Some(f.no_mem())) }.await
            });
            let _ = std::process::Command::new("losetup").args(["-d", &dev]).status();
            assert_eq!(res, 0, "{kind:?}: discard op");
            let allocated = std::fs::metadata(&backing).unwrap().blocks() * 512;
            assert_eq!(allocated, 2 << 20, "{kind:?}: the discard reached the device");
        }
    }
}
