//! The NBD client: an export of any NBD server as a raw node, opened from
//! `nbd://HOST[:PORT]/NAME` or `nbd+unix:///NAME?socket=PATH`.
//!
//! Connections are per thread, since a `spindle_io::net::Socket` belongs
//! to the runtime of the thread that made it. [`Nbd::open`] connects and
//! runs the handshake on the opening thread (a blocking socket with
//! timeouts, like the blocking reads that open an image file) and keeps
//! that connection for the first thread that does I/O. A further thread
//! gets its own connection, made and negotiated on a helper thread, so no
//! I/O thread ever blocks on the network. That is only done when the
//! server offers `NBD_FLAG_CAN_MULTI_CONN` (so a flush on one connection
//! covers them all); without it the export keeps to its one connection,
//! on the first thread that used it. Each connection carries one request
//! at a time. No TLS.

mod conn;
#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod local;
mod reply;
mod stream;
pub mod uri;
pub mod wire;

pub use handshake::Export;
pub use uri::{is_nbd_spec, Address, NbdUri};

use crate::error::Result;
use crate::status::Allocation;
use conn::{Conn, Sink};
use spindle_io::SgList;
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use stream::Stream;
use wire::{cflag, cmd, state, tflag};

/// Longest `TRIM`, `WRITE_ZEROES` or `BLOCK_STATUS` request sent (a
/// multiple of every valid minimum block size).
const MAX_RANGE: u64 = 1 << 30;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// An NBD export.
pub struct Nbd {
    id: u64,
    spec: PathBuf,
    uri: NbdUri,
    export: Export,
    read_only: Option<&'static str>,
    /// The open-time connection, until a thread takes it.
    spare: Mutex<Option<Stream>>,
    /// Read-modify-write of unaligned writes, one at a time.
    rmw: futures::lock::Mutex<()>,
    /// Something was written since the last flush.
    dirty: AtomicBool,
    alive: Arc<()>,
}

impl Nbd {
    /// Connects to the server and negotiates the export; `read_only` opens
    /// it read-only even when the server allows writes.
    pub fn open(spec: &str, read_only: bool) -> Result<Nbd> {
        let uri = NbdUri::parse(spec)?;
        let (stream, export) = local::connect(&uri, spec)?;
        let read_only = if export.has(tflag::READ_ONLY) {
            Some("the NBD server exports it read-only")
        } else if read_only {
            Some("opened read-only")
        } else {
            None
        };
        Ok(Nbd {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            spec: spec.into(),
            uri,
            export,
            read_only,
            spare: Mutex::new(Some(stream)),
            rmw: futures::lock::Mutex::new(()),
            dirty: AtomicBool::new(false),
            alive: Arc::new(()),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.export.size
    }

    /// The URI it was opened from.
    pub fn path(&self) -> &Path {
        &self.spec
    }

    /// What the handshake settled.
    pub fn export(&self) -> &Export {
        &self.export
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.read_only.is_some()
    }

    fn spec_str(&self) -> String {
        self.spec.display().to_string()
    }

    /// Refuses writes to a read-only export, saying why.
    pub fn check_writable(&self) -> Result<()> {
        crate::error::writable(&self.spec, self.read_only)
    }

    /// The aligned range around `[offset, offset + len)`.
    fn align_out(&self, offset: u64, len: u64) -> (u64, u64) {
        let m = u64::from(self.export.min_block);
        let end = (offset + len).div_ceil(m) * m;
        (offset - offset % m, end.min(self.size()).max(offset + len))
    }

    /// `kind` over `[offset, offset + len)` in requests of at most `max`.
    async fn ranges(&self, c: &Conn, kind: u16, flags: u16, offset: u64, len: u64, max: u64) -> Result<()> {
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(max);
            c.call(kind, flags, offset + pos, n as u32, None, Sink::Nothing).await?;
            pos += n;
        }
        Ok(())
    }

    async fn read_aligned(&self, c: &Conn, offset: u64, buf: &SgList) -> Result<()> {
        let max = self.export.max_payload as usize;
        for at in (0..buf.len()).step_by(max) {
            let part = buf.slice(at, max.min(buf.len() - at));
            c.call(
                cmd::READ,
                0,
                offset + at as u64,
                part.len() as u32,
                None,
                Sink::Read(&part),
            )
            .await?;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` (in range: the caller checked).
    pub async fn read(&self, offset: u64, buf: &SgList) -> Result<()> {
        let c = self.conn().await?;
        self.read_on(&c, offset, buf).await
    }

    /// Setup-time read (opening a format on the export): the open-time
    /// connection's blocking socket carries it, before any thread takes
    /// that connection for its I/O. `buf` is in range (the caller checked).
    pub fn read_blocking(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        let stream = spare.take().ok_or_else(|| {
            handshake::refused(
                &self.spec_str(),
                "a setup read after the export's connection went to an I/O thread",
            )
        })?;
        let c = Conn::blocking(stream, &self.spec_str(), self.export);
        let sg = SgList::zeroed(buf.len());
        let r = futures::executor::block_on(self.read_on(&c, offset, &sg));
        // Back for the first I/O thread, unless the read broke it.
        *spare = c.into_stream();
        r?;
        sg.copy_to(buf);
        Ok(())
    }

    async fn read_on(&self, c: &Conn, offset: u64, buf: &SgList) -> Result<()> {
        let (a0, a1) = self.align_out(offset, buf.len() as u64);
        if (a0, a1) == (offset, offset + buf.len() as u64) {
            return self.read_aligned(c, offset, buf).await;
        }
        let bounce = SgList::zeroed((a1 - a0) as usize);
        self.read_aligned(c, a0, &bounce).await?;
        buf.copy_from(&bounce.slice((offset - a0) as usize, buf.len()).to_vec());
        Ok(())
    }

    async fn write_aligned(&self, c: &Conn, offset: u64, buf: &SgList, fua: bool) -> Result<()> {
        let fua_flag = fua && self.export.has(tflag::SEND_FUA);
        let max = self.export.max_payload as usize;
        for at in (0..buf.len()).step_by(max) {
            let part = buf.slice(at, max.min(buf.len() - at));
            let flags = if fua_flag { cflag::FUA } else { 0 };
            c.call(
                cmd::WRITE,
                flags,
                offset + at as u64,
                part.len() as u32,
                Some(&part),
                Sink::Nothing,
            )
            .await?;
        }
        if fua && !fua_flag {
            self.dirty.store(true, Ordering::Release);
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes `buf` at `offset`; with `fua` it is durable on return.
    /// Unaligned edges are read, patched and written back.
    pub async fn write(&self, offset: u64, buf: &SgList, fua: bool) -> Result<()> {
        self.check_writable()?;
        let r = self.write_any(offset, buf, fua).await;
        self.dirty.store(true, Ordering::Release);
        r
    }

    async fn write_any(&self, offset: u64, buf: &SgList, fua: bool) -> Result<()> {
        let c = self.conn().await?;
        let (a0, a1) = self.align_out(offset, buf.len() as u64);
        if (a0, a1) == (offset, offset + buf.len() as u64) {
            return self.write_aligned(&c, offset, buf, fua).await;
        }
        let _rmw = self.rmw.lock().await;
        let bounce = SgList::zeroed((a1 - a0) as usize);
        self.read_aligned(&c, a0, &bounce).await?;
        bounce.slice((offset - a0) as usize, buf.len()).copy_from(&buf.to_vec());
        self.write_aligned(&c, a0, &bounce, fua).await
    }

    /// `NBD_CMD_FLUSH`, when the server has it, the export is writable
    /// and something was written since the last flush. It goes out on
    /// this thread's connection: the only one, or (multi-conn) one whose
    /// flush covers every connection's writes.
    pub async fn flush(&self) -> Result<()> {
        if self.read_only.is_some() || !self.export.has(tflag::SEND_FLUSH) {
            return Ok(());
        }
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let r = match self.conn().await {
            Ok(c) => c.call(cmd::FLUSH, 0, 0, 0, None, Sink::Nothing).await,
            Err(e) => Err(e),
        };
        if r.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        r
    }

    /// `NBD_CMD_TRIM` of the aligned part (advisory: nothing without it).
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let m = u64::from(self.export.min_block);
        let (start, end) = (offset.div_ceil(m) * m, (offset + len) / m * m);
        if !self.export.has(tflag::SEND_TRIM) || start >= end {
            return Ok(());
        }
        let c = self.conn().await?;
        let r = self.ranges(&c, cmd::TRIM, 0, start, end - start, MAX_RANGE).await;
        self.dirty.store(true, Ordering::Release);
        r
    }

    /// `NBD_CMD_WRITE_ZEROES` (`NO_HOLE` unless `may_unmap`), or zeroes
    /// written where the server lacks it or for unaligned edges.
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        let m = u64::from(self.export.min_block);
        let end = offset + len;
        let (start, stop) = (offset.div_ceil(m) * m, end / m * m);
        if !self.export.has(tflag::SEND_WRITE_ZEROES) || start >= stop {
            return self.write_zero_data(offset, len).await;
        }
        self.write_zero_data(offset, start - offset).await?;
        let c = self.conn().await?;
        let flags = if may_unmap { 0 } else { cflag::NO_HOLE };
        let r = self
            .ranges(&c, cmd::WRITE_ZEROES, flags, start, stop - start, MAX_RANGE)
            .await;
        self.dirty.store(true, Ordering::Release);
        r?;
        self.write_zero_data(stop, end - stop).await
    }

    async fn write_zero_data(&self, offset: u64, len: u64) -> Result<()> {
        let zeroes = SgList::zeroed(len.min(1 << 20) as usize);
        let mut pos = 0;
        while pos < len {
            let n = (len - pos).min(zeroes.len() as u64);
            self.write(offset + pos, &zeroes.slice(0, n as usize), false).await?;
            pos += n;
        }
        Ok(())
    }

    /// `base:allocation` flags of the first extent at `offset` (at most
    /// `len` long, `len` > 0) and its length; everything is data when the
    /// server has no such context.
    async fn status(&self, offset: u64, len: u64) -> Result<(u32, u64)> {
        if self.export.context.is_none() {
            return Ok((0, len));
        }
        let c = self.conn().await?;
        let (a0, a1) = self.align_out(offset, len.min(MAX_RANGE));
        let out = Cell::new(None);
        let n = (a1 - a0) as u32;
        c.call(cmd::BLOCK_STATUS, cflag::REQ_ONE, a0, n, None, Sink::Status(&out))
            .await?;
        let (flags, n) = out.get().unwrap_or((0, u64::from(n)));
        match (a0 + n).checked_sub(offset).filter(|&k| k > 0) {
            Some(k) => Ok((flags, k.min(len))),
            // The server described less than the unaligned start: data.
            None => Ok((0, (a0 + u64::from(self.export.min_block) - offset).min(len))),
        }
    }

    /// Whether the range at `offset` (at most `len` long, `len` > 0) holds
    /// data (not a hole) and reads as zeroes, and how far that holds.
    pub async fn allocation(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        let (flags, n) = self.status(offset, len).await?;
        let a = Allocation {
            data: flags & state::HOLE == 0,
            zero: flags & state::ZERO != 0,
        };
        Ok((a, n))
    }

    /// Flushes, then disconnects this thread's connection (`NBD_CMD_DISC`).
    pub async fn close(&self) -> Result<()> {
        let r = self.flush().await;
        self.drop_connections();
        r
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        self.drop_connections();
    }
}

#[cfg(test)]
mod tests;
