//! The qcow2 read path: mapping guest ranges to host clusters, and reads.

use super::entry::Entry;
use super::meta::Meta;
use super::{compress, compressed_extent, tlb, Piece, Qcow2};
use crate::error::{corrupt, doing, fmt_err, Result};
use crate::status::BlockStatus;
use futures::future::try_join_all;
use spindle_io::SgList;
use std::sync::atomic::Ordering;

/// Appends a piece, merging it into the last one when they continue.
fn push_piece(out: &mut Vec<(u64, u64, Piece)>, pos: u64, n: u64, p: Piece) {
    match (out.last_mut(), p) {
        (Some((_, l, Piece::Data(h))), Piece::Data(h2)) if *h + *l == h2 => *l += n,
        (Some((_, l, Piece::Zero)), Piece::Zero) | (Some((_, l, Piece::Backing)), Piece::Backing) => *l += n,
        _ => out.push((pos, n, p)),
    }
}

impl Qcow2 {
    /// How the range starting at `off` (at most `len`) is stored: one piece
    /// and its length, within one cluster.
    pub(super) async fn map_piece(&self, m: &mut Meta, off: u64, len: u64) -> Result<(Piece, u64)> {
        let (raw, bmp) = m.get_l2(&self.storage, off >> self.cluster_bits).await?;
        self.piece_of(raw, bmp, off, len)
    }

    /// Decodes the L2 entry of the guest cluster at `off`, refusing what
    /// QEMU refuses (see entry.rs) as a corruption of this image.
    pub(super) fn entry_at(&self, off: u64, raw: u64, bmp: u64) -> Result<Entry> {
        self.layout().decode(raw, bmp).map_err(|m| {
            corrupt(
                self.path(),
                format!(
                    "L2 entry for guest offset 0x{:x}: {m}",
                    off & !((1u64 << self.cluster_bits) - 1)
                ),
            )
        })
    }

    /// The piece at `off` (at most `len`) given its cluster's L2 entry.
    pub(super) fn piece_of(&self, raw: u64, bmp: u64, off: u64, len: u64) -> Result<(Piece, u64)> {
        let e = self.entry_at(off, raw, bmp)?;
        let cs = 1u64 << self.cluster_bits;
        let in_cluster = off & (cs - 1);
        if let Some(raw) = e.compressed {
            return Ok((Piece::Compressed(raw), (cs - in_cluster).min(len)));
        }
        // Standard L2 entries are one subcluster as large as the cluster.
        let sub = 1u64 << self.sub_bits;
        let subclusters = (cs >> self.sub_bits) as u32;
        let kind = |si: u32| -> u8 {
            if e.alloc >> si & 1 != 0 {
                1
            } else if e.zero >> si & 1 != 0 {
                2
            } else {
                0
            }
        };
        let mut si = (in_cluster >> self.sub_bits) as u32;
        let k = kind(si);
        let mut n = sub - (in_cluster & (sub - 1));
        while si + 1 < subclusters && n < len && kind(si + 1) == k {
            si += 1;
            n += sub;
        }
        let piece = match k {
            1 => Piece::Data(e.host + in_cluster),
            2 => Piece::Zero,
            _ => Piece::Backing,
        };
        Ok((piece, n.min(len)))
    }

    /// Maps `[off, off+len)` into pieces, merging neighbours of the same kind.
    /// Served from this thread's L2 entry cache when every cluster hits;
    /// otherwise under the metadata lock, filling the cache.
    pub(super) async fn map_range(&self, off: u64, len: u64) -> Result<Vec<(u64, u64, Piece)>> {
        let gen = self.map_gen.load(Ordering::SeqCst);
        let mut out: Vec<(u64, u64, Piece)> = Vec::new();
        let mut pos = off;
        let mut hits = 0;
        while pos < off + len {
            let Some((raw, bmp)) = tlb::get(self.tlb_id, gen, pos >> self.cluster_bits) else {
                break;
            };
            let (p, n) = self.piece_of(raw, bmp, pos, off + len - pos)?;
            push_piece(&mut out, pos, n, p);
            pos += n;
            hits += 1;
        }
        let missed = pos != off + len;
        self.counters.thread_lookup(hits, missed);
        if !missed {
            return Ok(out);
        }
        out.clear();
        let mut m = self.meta.lock().await;
        // Lookups do not bump the generation; this one was current while
        // the entries below are read under the lock.
        let gen = self.map_gen.load(Ordering::SeqCst);
        let mut pos = off;
        while pos < off + len {
            let gc = pos >> self.cluster_bits;
            let (raw, bmp) = m.get_l2(&self.storage, gc).await?;
            let (p, n) = self.piece_of(raw, bmp, pos, off + len - pos)?;
            tlb::put(self.tlb_id, gen, gc, (raw, bmp));
            push_piece(&mut out, pos, n, p);
            pos += n;
        }
        Ok(out)
    }

    /// Reads guest data.
    pub(crate) async fn read(&self, off: u64, buf: &SgList) -> Result<()> {
        let pieces = self.map_range(off, buf.len() as u64).await?;
        let reads = pieces.into_iter().map(|(pos, n, p)| {
            let part = buf.slice((pos - off) as usize, n as usize);
            async move { self.read_piece(pos, p, &part).await }
        });
        try_join_all(reads).await?;
        Ok(())
    }

    pub(super) async fn read_piece(&self, pos: u64, p: Piece, part: &SgList) -> Result<()> {
        match p {
            Piece::Data(host) => self.storage.read(host, part).await.map_err(doing("read failed")),
            Piece::Zero => {
                part.fill_zero();
                Ok(())
            }
            Piece::Backing => self.read_backing(pos, part).await,
            Piece::Compressed(raw) => {
                let data = self.read_compressed(raw).await?;
                let cs = 1u64 << self.cluster_bits;
                let start = (pos & (cs - 1)) as usize;
                part.copy_from(&data[start..start + part.len()]);
                Ok(())
            }
        }
    }

    pub(super) async fn read_backing(&self, pos: u64, part: &SgList) -> Result<()> {
        let Some(b) = &self.backing else {
            part.fill_zero();
            return Ok(());
        };
        let bsize = b.size();
        let n = part.len() as u64;
        if pos >= bsize {
            part.fill_zero();
            return Ok(());
        }
        let inside = n.min(bsize - pos) as usize;
        if inside < part.len() {
            part.slice(inside, part.len() - inside).fill_zero();
        }
        Box::pin(b.read(pos, &part.slice(0, inside))).await
    }

    pub(super) async fn read_compressed(&self, raw: u64) -> Result<Vec<u8>> {
        // At most two clusters by the descriptor's format; bytes past the
        // end of the file read as zeroes (no fstat on the I/O thread).
        let (off, len) = compressed_extent(raw, self.cluster_bits);
        let mut cbuf = vec![0u8; len as usize];
        self.storage
            .read_at(off, &mut cbuf)
            .await
            .map_err(doing("compressed cluster read failed"))?;
        compress::decompress(self.compression, &cbuf, 1 << self.cluster_bits)
            .map_err(|e| fmt_err(self.path(), format!("compressed cluster at 0x{off:x}: {e}")))
    }

    /// Allocation status of this image alone.
    pub(crate) async fn block_status(&self, off: u64, len: u64) -> Result<(BlockStatus, u64)> {
        let mut m = self.meta.lock().await;
        let (first, mut n) = self.map_piece(&mut m, off, len).await?;
        // Extend over following clusters of the same kind.
        while n < len {
            let (p, k) = self.map_piece(&mut m, off + n, len - n).await?;
            let same = match (first, p) {
                (Piece::Data(h), Piece::Data(h2)) => h + n == h2,
                (Piece::Zero, Piece::Zero) | (Piece::Backing, Piece::Backing) => true,
                _ => false,
            };
            if !same {
                break;
            }
            n += k;
        }
        let st = match first {
            Piece::Data(h) => BlockStatus::Data {
                offset: Some(h),
                compressed: false,
            },
            Piece::Compressed(_) => BlockStatus::Data {
                offset: None,
                compressed: true,
            },
            Piece::Zero => BlockStatus::Zero,
            Piece::Backing => BlockStatus::Unallocated,
        };
        Ok((st, n))
    }
}
