//! Moving VM state between a byte stream and a snapshot at the device's
//! bandwidth.
//!
//! QEMU's savevm writes the VM state in small unaligned synchronous pieces.
//! Here a reader thread cuts the stream into cluster-aligned chunks (1 MiB
//! by default) and the I/O thread keeps several writes in flight (8 by
//! default); each chunk allocates its clusters as one run. Loading reads the
//! snapshot's VM state in order with read-ahead, and a writer thread drains
//! it into the destination. Blocking stream I/O stays off the I/O thread.

use super::meta::OFFSET_MASK;
use super::snapshot::Snapshot;
use super::{Piece, Qcow2};
use crate::error::{doing, fmt_err, io_err, BlockError, Result};
use crate::SgList;
use futures::channel::mpsc;
use futures::stream::{FuturesOrdered, FuturesUnordered, StreamExt};
use futures::SinkExt;
use spindle_io::AlignedBuf;
use std::io::{Read, Write};

/// Tunables of the VM-state path.
#[derive(Debug, Clone, Copy)]
pub struct VmStateOptions {
    /// Bytes per request (rounded up to the cluster size).
    pub chunk: usize,
    /// Writes in flight when saving.
    pub depth: usize,
    /// Chunks read ahead when extracting.
    pub read_ahead: usize,
}

impl Default for VmStateOptions {
    fn default() -> Self {
        // Measured on the project machine: 8 writes saturate the device;
        // reads keep up best with 16 chunks ahead.
        VmStateOptions {
            chunk: 1 << 20,
            depth: 8,
            read_ahead: 16,
        }
    }
}

type Chunk = std::io::Result<(AlignedBuf, usize)>;

/// Chunk buffers handed back and forth between the stream thread and the
/// I/O thread, so each byte is not preceded by a fresh zeroed allocation.
#[derive(Clone)]
struct BufPool {
    free: std::sync::Arc<std::sync::Mutex<Vec<AlignedBuf>>>,
    size: usize,
    keep: usize,
}

impl BufPool {
    fn new(size: usize, keep: usize) -> BufPool {
        BufPool {
            free: Default::default(),
            size,
            keep,
        }
    }
    fn get(&self) -> AlignedBuf {
        self.free
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .unwrap_or_else(|| AlignedBuf::new(self.size, 4096))
    }
    fn put(&self, b: AlignedBuf) {
        if let Ok(mut f) = self.free.lock() {
            if f.len() < self.keep {
                f.push(b);
            }
        }
    }
}

/// Reads `chunk`-sized pieces of `src` on its own thread.
fn spawn_reader(mut src: Box<dyn Read + Send>, pool: BufPool, depth: usize) -> mpsc::Receiver<Chunk> {
    let (mut tx, rx) = mpsc::channel::<Chunk>(depth);
    let chunk = pool.size;
    std::thread::spawn(move || loop {
        let mut buf = pool.get();
        let mut n = 0;
        let res = loop {
            match src.read(&mut buf[n..]) {
                Ok(0) => break Ok(()),
                Ok(k) => {
                    n += k;
                    if n == chunk {
                        break Ok(());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        let last = n < chunk || res.is_err();
        let item = res.map(|()| (buf, n));
        if futures::executor::block_on(tx.send(item)).is_err() || last {
            return;
        }
    });
    rx
}

impl Qcow2 {
    /// Streams `src` (QEMU's migration stream, or any bytes) into the VM
    /// state area and takes snapshot `name` with it. The snapshot exists
    /// fully, durable, or not at all.
    pub async fn save_vmstate(&self, name: &str, src: Box<dyn Read + Send>, opts: VmStateOptions) -> Result<Snapshot> {
        let r = self.save_vmstate_inner(name, src, opts).await;
        let r = match r {
            Err(e) if !matches!(e, BlockError::Corrupt { .. }) && self.check_writable().is_ok() => {
                // Give back the clusters the failed stream took (the next
                // save would drop them too; a crash here leaks them only).
                let base = self.vm_state_offset();
                if let Err(c) = async {
                    self.drop_vmstate_area(base).await?;
                    self.flush().await
                }
                .await
                {
                    tracing::warn!(
                        "{}: cannot free the VM state of a failed save: {c}",
                        self.path().display()
                    );
                }
                Err(e)
            }
            r => r,
        };
        self.guard(r).await
    }

    async fn save_vmstate_inner(
        &self,
        name: &str,
        src: Box<dyn Read + Send>,
        opts: VmStateOptions,
    ) -> Result<Snapshot> {
        self.check_writable()?;
        if self.snapshot_list().await.iter().any(|s| s.name == name) {
            return Err(fmt_err(
                self.path(),
                format!("a snapshot named '{name}' already exists"),
            ));
        }
        let cs = self.cluster_size() as usize;
        let chunk = opts.chunk.max(cs).div_ceil(cs) * cs;
        let base = self.vm_state_offset();
        // Leftovers of an interrupted save would otherwise be copied into this one.
        self.drop_vmstate_area(base).await?;
        let pool = BufPool::new(chunk, opts.depth.max(1) * 2 + 2);
        let mut rx = spawn_reader(src, pool.clone(), opts.depth.max(1));
        let mut inflight = FuturesUnordered::new();
        let mut total = 0u64;
        // On a failure, the writes in flight finish before the error is
        // returned: the caller then frees the area with nothing racing it.
        let mut failed = None;
        'stream: while let Some(item) = rx.next().await {
            let (buf, n) = match item.map_err(io_err(self.path(), "reading the VM state failed")) {
                Ok(x) => x,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            if n == 0 {
                break;
            }
            while inflight.len() >= opts.depth.max(1) {
                if let Some(Err(e)) = inflight.next().await {
                    failed = Some(e);
                    break 'stream;
                }
            }
            if let Err(e) = self.cover_l1(base + total + n as u64).await {
                failed = Some(e);
                break;
            }
            let off = base + total;
            let pool = &pool;
            inflight.push(async move {
                let sg = SgList::owned(buf);
                let r = self.write(off, &sg.slice(0, n), false).await;
                if let Ok(buf) = sg.into_buf() {
                    pool.put(buf);
                }
                r
            });
            total += n as u64;
        }
        while let Some(r) = inflight.next().await {
            if let Err(e) = r {
                failed.get_or_insert(e);
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let end = std::time::Instant::now();
        let ms = |t: std::time::Instant| t.elapsed().as_secs_f64() * 1e3;
        self.flush().await?;
        tracing::debug!(
            ms = ms(end),
            bytes = total,
            "VM state: the stream ended and its data is flushed"
        );
        // The VM state's L2 tables move to the snapshot: the active L1 no
        // longer maps them, so the next snapshot will not copy them on write.
        let sn = self.create_snapshot(name, total, 0, true).await?;
        tracing::debug!(ms = ms(end), "VM state: the snapshot is created");
        self.flush().await?;
        tracing::debug!(ms = ms(end), "VM state: flushed");
        Ok(sn)
    }

    /// Grows the active L1 so it maps up to `end` (VM state lies past the disk).
    async fn cover_l1(&self, end: u64) -> Result<()> {
        let mut m = self.lock_meta().await;
        let span = 1u64 << (self.cluster_bits + m.hdr.l2_bits());
        let need = end.div_ceil(span) as usize;
        if need > m.l1().len() {
            // Headroom so a long stream does not rewrite the L1 table per chunk.
            let want = need.max(m.l1().len() + m.l1().len() / 2).max(need + 4);
            m.resize_l1(&self.storage, want).await?;
        }
        Ok(())
    }

    /// Unmaps every cluster of the active L1 at or past `base`.
    async fn drop_vmstate_area(&self, base: u64) -> Result<()> {
        let mut m = self.lock_meta_clear_of(0, u64::MAX).await;
        let span_bits = self.cluster_bits + m.hdr.l2_bits();
        let first_l1 = (base >> span_bits) as usize;
        for l1i in first_l1..m.l1().len() {
            if m.l1()[l1i] & OFFSET_MASK == 0 {
                continue;
            }
            let first = (l1i as u64) << m.hdr.l2_bits();
            for gc in first..first + (1u64 << m.hdr.l2_bits()) {
                let (raw, _) = m.get_l2(&self.storage, gc).await?;
                if raw != 0 {
                    m.set_l2(&self.storage, gc, 0, 0).await?;
                    m.release_entry(&self.storage, raw).await?;
                }
            }
        }
        Ok(())
    }

    /// Writes the VM state of snapshot `id_or_name` to `dst`, returning the
    /// byte count and `dst` (so the caller can make it durable).
    pub async fn load_vmstate<W: Write + Send + 'static>(
        &self,
        id_or_name: &str,
        dst: W,
        opts: VmStateOptions,
    ) -> Result<(u64, W)> {
        let r = self.load_vmstate_inner(id_or_name, dst, opts).await;
        self.guard(r).await
    }

    async fn load_vmstate_inner<W: Write + Send + 'static>(
        &self,
        id_or_name: &str,
        dst: W,
        opts: VmStateOptions,
    ) -> Result<(u64, W)> {
        let snaps = self.snapshot_list().await;
        let sn = snaps
            .iter()
            .find(|s| s.id == id_or_name)
            .or_else(|| snaps.iter().find(|s| s.name == id_or_name))
            .cloned()
            .ok_or_else(|| self.not_found(id_or_name))?;
        self.check_snapshot_l1(&sn)?;
        let l1 = self
            .meta
            .lock()
            .await
            .read_l1(&self.storage, sn.l1_table_offset, sn.l1_size)
            .await?;
        let cs = self.cluster_size() as usize;
        let chunk = opts.chunk.max(cs).div_ceil(cs) * cs;
        let depth = opts.read_ahead.max(1);
        let (tx, rx) = std::sync::mpsc::sync_channel::<(AlignedBuf, usize)>(depth);
        let pool = BufPool::new(chunk, depth * 2 + 2);
        let back = pool.clone();
        let writer = std::thread::spawn(move || -> std::io::Result<W> {
            let mut dst = dst;
            for (buf, n) in rx {
                dst.write_all(&buf[..n])?;
                back.put(buf);
            }
            dst.flush()?;
            Ok(dst)
        });
        let base = self.vm_state_offset_for(&sn);
        let total = sn.vm_state_size;
        let mut pending = FuturesOrdered::new();
        let mut next = 0u64;
        let mut result = Ok(());
        loop {
            while pending.len() < depth && next < total {
                let n = (chunk as u64).min(total - next) as usize;
                let off = base + next;
                let (l1, pool) = (&l1, &pool);
                pending.push_back(async move {
                    let sg = SgList::owned(pool.get());
                    self.read_with_l1(l1, off, &sg.slice(0, n)).await?;
                    let buf = sg
                        .into_buf()
                        .map_err(|_| fmt_err(self.path(), "VM state buffer still in use"))?;
                    Ok((buf, n))
                });
                next += n as u64;
            }
            let Some(r) = pending.next().await else { break };
            match r {
                Ok(item) => {
                    // The writer thread drains as fast as the destination takes it.
                    if tx.send(item).is_err() {
                        result = Err(fmt_err(self.path(), "writing the VM state failed"));
                        break;
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        drop(tx);
        let dst = writer
            .join()
            .map_err(|_| fmt_err(self.path(), "VM state writer thread failed"))?
            .map_err(io_err(self.path(), "writing the VM state failed"))?;
        result?;
        Ok((total, dst))
    }

    /// The VM state offset for a snapshot (its disk size, not today's).
    fn vm_state_offset_for(&self, sn: &Snapshot) -> u64 {
        let l2_entry = if self.ext_l2 { 16 } else { 8 };
        let span = (1u64 << self.cluster_bits) * ((1u64 << self.cluster_bits) / l2_entry);
        sn.disk_size.unwrap_or_else(|| self.size()).div_ceil(span) * span
    }

    /// Reads through a snapshot's L1 table; unmapped and zero ranges read as
    /// zeroes (VM state never comes from a backing file).
    async fn read_with_l1(&self, l1: &[u64], off: u64, out: &SgList) -> Result<()> {
        let mut plan = Vec::new();
        {
            let mut m = self.lock_meta().await;
            let l2_bits = m.hdr.l2_bits();
            let mut pos = 0u64;
            while pos < out.len() as u64 {
                let g = off + pos;
                let gc = g >> self.cluster_bits;
                let l1e = l1.get((gc >> l2_bits) as usize).copied().unwrap_or(0);
                let (raw, bmp) = if l1e == 0 {
                    (0, 0)
                } else {
                    m.get_l2_for(&self.storage, l1e, gc).await?
                };
                let (piece, n) = self.piece_of(raw, bmp, g, out.len() as u64 - pos)?;
                plan.push((pos, n, piece));
                pos += n;
            }
        }
        // Host-contiguous plain clusters become one read; the rest is
        // zero-filled or inflated.
        let cs = 1u64 << self.cluster_bits;
        let mut reads: Vec<(u64, u64, u64)> = Vec::new(); // (pos, len, host)
        for (pos, n, piece) in plan {
            let part = out.slice(pos as usize, n as usize);
            match piece {
                Piece::Data(host) => match reads.last_mut() {
                    Some((p, l, h)) if *p + *l == pos && *h + *l == host => *l += n,
                    _ => reads.push((pos, n, host)),
                },
                Piece::Compressed(raw) => {
                    let data = self.read_compressed(raw).await?;
                    let in_cluster = ((off + pos) & (cs - 1)) as usize;
                    part.copy_from(&data[in_cluster..in_cluster + n as usize]);
                }
                Piece::Zero | Piece::Backing => part.fill_zero(),
            }
        }
        let jobs = reads.into_iter().map(|(pos, n, host)| {
            let part = out.slice(pos as usize, n as usize);
            async move { self.storage.read(host, &part).await.map_err(doing("read failed")) }
        });
        futures::future::try_join_all(jobs).await?;
        Ok(())
    }
}
