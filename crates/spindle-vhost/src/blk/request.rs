//! Parsing and validating virtio-blk requests (virtio 1.2, 5.2.6).
//!
//! A request is a descriptor chain: device-readable bytes (a 16-byte header,
//! then data for writes, discards and write-zeroes), then device-writable
//! bytes (data for reads and GET_ID), the last of which is the status byte.
//! Descriptor boundaries may fall anywhere (VIRTIO_F_ANY_LAYOUT), so the
//! parser reads the chain as two byte streams. Every size, count and address
//! comes from the guest and is checked against [`Limits`] and guest memory
//! before anything is read or written; a bad chain yields a status, never a
//! panic.

use smallvec::SmallVec;
use spindle_block::SgList;
use spindle_io::KeepAlive;
use std::ops::Deref;
use std::rc::Rc;
use std::sync::Arc;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::GuestMemoryMmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Device ID string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Discard.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Write zeroes.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error (also: malformed request).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: unsupported request.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Length of the GET_ID string.
pub const VIRTIO_BLK_ID_BYTES: u32 = 20;
const HEADER: usize = 16;
const SECTOR: u64 = 512;
const SEGMENT: usize = 16;
const UNMAP: u32 = 1;

/// What the device accepts; advertised to the driver in the config space.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Disk size in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Most data descriptors per request (VIRTIO_BLK_F_SEG_MAX).
    pub seg_max: u32,
    /// Largest data descriptor (VIRTIO_BLK_F_SIZE_MAX).
    pub size_max: u32,
    /// Largest read or write in bytes.
    pub max_request_bytes: u64,
    /// Most discard segments per request.
    pub max_discard_seg: u32,
    /// Most write-zeroes segments per request.
    pub max_write_zeroes_seg: u32,
    /// Most sectors in one discard or write-zeroes segment.
    pub max_segment_sectors: u32,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
}

impl Limits {
    /// Conservative limits for a disk of `capacity_sectors`.
    pub fn new(capacity_sectors: u64) -> Limits {
        Limits {
            capacity_sectors,
            seg_max: 254,
            size_max: 1 << 20,
            max_request_bytes: 32 << 20,
            max_discard_seg: 32,
            max_write_zeroes_seg: 32,
            max_segment_sectors: u32::MAX,
            read_only: false,
        }
    }
}

/// A discard or write-zeroes segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// First sector.
    pub sector: u64,
    /// Sectors.
    pub sectors: u32,
    /// Write-zeroes may deallocate.
    pub unmap: bool,
}

/// What the guest asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Read into the data buffers.
    Read,
    /// Write the data buffers.
    Write,
    /// Flush.
    Flush,
    /// Write the device ID into the data buffers.
    GetId,
    /// Discard ranges.
    Discard(Vec<Range>),
    /// Zero ranges.
    WriteZeroes(Vec<Range>),
}

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Kind.
    pub kind: RequestKind,
    /// Starting sector (reads and writes).
    pub sector: u64,
    /// Data buffers in guest memory, each inside one memory region, not
    /// overlapping each other.
    pub data: Vec<(GuestAddress, usize)>,
    /// Total data bytes.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// The result of parsing a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A request to execute.
    Request(Request),
    /// A request to fail at once with `status` written to `status_addr`.
    Fail {
        /// Where to write the status.
        status_addr: GuestAddress,
        /// `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP`.
        status: u8,
        /// Why, for the log.
        reason: &'static str,
    },
    /// No writable byte to put a status in: complete with length 0.
    Drop {
        /// Why, for the log.
        reason: &'static str,
    },
}

#[derive(Clone, Copy)]
struct Desc {
    addr: GuestAddress,
    len: u32,
    write: bool,
}

/// Reads and validates the request in `chain`.
pub fn parse<M>(chain: DescriptorChain<M>, mem: &M::Target, limits: &Limits) -> Parsed
where
    M: Deref,
    M::Target: GuestMemoryBackend,
{
    // virtio-queue bounds the walk by the queue size, so a looping chain ends.
    let max_descs = limits.seg_max as usize + 2;
    // On the stack for the usual chain (header, data, status): no
    // allocation per request.
    let mut descs: SmallVec<[Desc; 8]> = SmallVec::new();
    let mut too_many = false;
    // The status byte is the last byte of the last writable descriptor, so
    // the walk goes to the end even when there are too many to keep.
    let mut last_writable: Option<Desc> = None;
    for d in chain {
        let desc = Desc {
            addr: d.addr(),
            len: d.len(),
            write: d.is_write_only(),
        };
        if desc.write && desc.len > 0 {
            last_writable = Some(desc);
        }
        if descs.len() < max_descs {
            descs.push(desc);
        } else {
            too_many = true;
        }
    }
    let Some(last) = last_writable else {
        return Parsed::Drop {
            reason: "no writable byte for the status",
        };
    };
    let status_addr = match last.addr.checked_add(u64::from(last.len) - 1) {
        Some(a) if mem.check_address(a).is_some() => a,
        _ => {
            return Parsed::Drop {
                reason: "status byte outside guest memory",
            }
        }
    };
    let fail = |status, reason| Parsed::Fail {
        status_addr,
        status,
        reason,
    };
    if too_many {
        return fail(VIRTIO_BLK_S_IOERR, "more descriptors than seg_max allows");
    }
    let first_write = descs.iter().position(|d| d.write).unwrap_or(descs.len());
    if descs[first_write..].iter().any(|d| !d.write) {
        return fail(VIRTIO_BLK_S_IOERR, "device-readable descriptor after a writable one");
    }
    let (readable, writable) = descs.split_at(first_write);
    // Writable stream without the status byte.
    let mut writable: SmallVec<[Desc; 8]> = writable.iter().copied().collect();
    if let Some(d) = writable.iter_mut().rev().find(|d| d.len > 0) {
        d.len -= 1;
    }
    let readable_len: u64 = readable.iter().map(|d| u64::from(d.len)).sum();
    let writable_len: u64 = writable.iter().map(|d| u64::from(d.len)).sum();
    if readable_len < HEADER as u64 {
        return fail(VIRTIO_BLK_S_IOERR, "request header is shorter than 16 bytes");
    }
    let mut header = [0u8; HEADER];
    let Ok(()) = read_stream(mem, readable, 0, &mut header) else {
        return fail(VIRTIO_BLK_S_IOERR, "request header lies outside guest memory");
    };
    let kind = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let payload_in = readable_len - HEADER as u64;
    let mut req = Request {
        kind: RequestKind::Flush,
        sector,
        data: Vec::new(),
        data_len: 0,
        status: status_addr,
    };
    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let (data_len, src, skip) = if kind == VIRTIO_BLK_T_IN {
                if payload_in != 0 {
                    return fail(VIRTIO_BLK_S_IOERR, "read request carries device-readable data");
                }
                (writable_len, &writable[..], 0)
            } else {
                if writable_len != 0 {
                    return fail(
                        VIRTIO_BLK_S_IOERR,
                        "write request has writable bytes besides the status",
                    );
                }
                if limits.read_only {
                    return fail(VIRTIO_BLK_S_IOERR, "write to a read-only device");
                }
                (payload_in, readable, HEADER as u64)
            };
            if !data_len.is_multiple_of(SECTOR) {
                return fail(VIRTIO_BLK_S_IOERR, "data length is not a multiple of 512 bytes");
            }
            if data_len > limits.max_request_bytes {
                return fail(VIRTIO_BLK_S_IOERR, "request larger than the device's maximum");
            }
            if sector
                .checked_add(data_len / SECTOR)
                .is_none_or(|end| end > limits.capacity_sectors)
            {
                return fail(VIRTIO_BLK_S_IOERR, "request reaches past the end of the disk");
            }
            req.kind = if kind == VIRTIO_BLK_T_IN {
                RequestKind::Read
            } else {
                RequestKind::Write
            };
            match buffers(mem, src, skip, limits) {
                Ok(b) => req.data = b,
                Err(reason) => return fail(VIRTIO_BLK_S_IOERR, reason),
            }
            req.data_len = data_len;
        }
        VIRTIO_BLK_T_FLUSH => {}
        VIRTIO_BLK_T_GET_ID => {
            if writable_len < u64::from(VIRTIO_BLK_ID_BYTES) {
                return fail(VIRTIO_BLK_S_IOERR, "GET_ID buffer is shorter than 20 bytes");
            }
            req.kind = RequestKind::GetId;
            match buffers(mem, &writable, 0, limits) {
                Ok(b) => req.data = b,
                Err(reason) => return fail(VIRTIO_BLK_S_IOERR, reason),
            }
            req.data_len = u64::from(VIRTIO_BLK_ID_BYTES);
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = kind == VIRTIO_BLK_T_DISCARD;
            if limits.read_only {
                return fail(VIRTIO_BLK_S_IOERR, "discard or write-zeroes on a read-only device");
            }
            let max = if discard {
                limits.max_discard_seg
            } else {
                limits.max_write_zeroes_seg
            };
            if payload_in == 0 || !payload_in.is_multiple_of(SEGMENT as u64) {
                return fail(
                    VIRTIO_BLK_S_IOERR,
                    "segment list is not a whole number of 16-byte segments",
                );
            }
            let n = payload_in / SEGMENT as u64;
            if n > u64::from(max) {
                return fail(VIRTIO_BLK_S_IOERR, "more segments than the device allows");
            }
            let mut raw = vec![0u8; payload_in as usize];
            let Ok(()) = read_stream(mem, readable, HEADER as u64, &mut raw) else {
                return fail(VIRTIO_BLK_S_IOERR, "segment list lies outside guest memory");
            };
            let mut ranges = Vec::with_capacity(n as usize);
            for s in raw.chunks_exact(SEGMENT) {
                let sector = u64::from_le_bytes(s[0..8].try_into().unwrap_or_default());
                let sectors = u32::from_le_bytes(s[8..12].try_into().unwrap_or_default());
                let flags = u32::from_le_bytes(s[12..16].try_into().unwrap_or_default());
                if flags & !UNMAP != 0 || (discard && flags != 0) {
                    return fail(VIRTIO_BLK_S_UNSUPP, "unknown segment flags");
                }
                if sectors > limits.max_segment_sectors {
                    return fail(VIRTIO_BLK_S_IOERR, "segment larger than the device allows");
                }
                if sector
                    .checked_add(u64::from(sectors))
                    .is_none_or(|end| end > limits.capacity_sectors)
                {
                    return fail(VIRTIO_BLK_S_IOERR, "segment reaches past the end of the disk");
                }
                ranges.push(Range {
                    sector,
                    sectors,
                    unmap: flags & UNMAP != 0,
                });
            }
            req.kind = if discard {
                RequestKind::Discard(ranges)
            } else {
                RequestKind::WriteZeroes(ranges)
            };
        }
        _ => return fail(VIRTIO_BLK_S_UNSUPP, "unknown request type"),
    }
    Parsed::Request(req)
}

/// Fills `out` from `offset` of the byte stream the descriptors form.
fn read_stream<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    descs: &[Desc],
    mut offset: u64,
    out: &mut [u8],
) -> Result<(), ()> {
    let len = out.len();
    let mut pos = 0;
    for d in descs {
        if pos == len {
            break;
        }
        let dlen = u64::from(d.len);
        if offset >= dlen {
            offset -= dlen;
            continue;
        }
        let n = ((dlen - offset) as usize).min(len - pos);
        let addr = d.addr.checked_add(offset).ok_or(())?;
        mem.read_slice(&mut out[pos..pos + n], addr).map_err(|_| ())?;
        pos += n;
        offset = 0;
    }
    if pos == len {
        Ok(())
    } else {
        Err(())
    }
}

/// The data buffers of a stream after `skip` bytes, split at memory-region
/// boundaries, checked against the limits, guest memory and each other.
fn buffers<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    descs: &[Desc],
    mut skip: u64,
    limits: &Limits,
) -> Result<Vec<(GuestAddress, usize)>, &'static str> {
    let mut out: Vec<(GuestAddress, usize)> = Vec::new();
    let mut segments = 0;
    for d in descs {
        let dlen = u64::from(d.len);
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        if d.len > limits.size_max {
            return Err("a data descriptor is larger than size_max");
        }
        segments += 1;
        if segments > limits.seg_max {
            return Err("more data descriptors than seg_max");
        }
        let mut addr = d.addr.checked_add(skip).ok_or("data buffer address overflows")?;
        let mut left = dlen - skip;
        skip = 0;
        while left > 0 {
            let region = mem.find_region(addr).ok_or("data buffer lies outside guest memory")?;
            let end = region.start_addr().unchecked_add(region.len());
            let n = left.min(end.raw_value() - addr.raw_value());
            out.push((addr, n as usize));
            addr = addr.unchecked_add(n);
            left -= n;
        }
    }
    // Buffers must not overlap: each byte of guest memory belongs to one
    // I/O at a time (the block layer's SgList contract).
    if out.len() < 2 {
        return Ok(out);
    }
    let mut sorted: SmallVec<[(u64, u64); 8]> = out.iter().map(|(a, l)| (a.raw_value(), *l as u64)).collect();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
        return Err("data buffers overlap");
    }
    Ok(out)
}

/// Guest memory as a request sees it: the mapping, shared so that its
/// scatter-gather lists can keep it mapped until the kernel is done.
pub type SharedMemory<B> = Rc<Arc<GuestMemoryMmap<B>>>;

/// The request's data buffers as a scatter-gather list over guest memory,
/// which the list keeps mapped. `None` if guest memory changed under the
/// request (a region went away).
pub fn sg_list<B: Bitmap + 'static>(mem: &SharedMemory<B>, data: &[(GuestAddress, usize)]) -> Option<SgList> {
    let mut segs: SmallVec<[(*mut u8, usize); 8]> = SmallVec::new();
    for &(addr, len) in data {
        let slice = mem.get_slice(addr, len).ok()?;
        segs.push((slice.ptr_guard_mut().as_ptr(), len));
    }
    // SAFETY: guest memory boundary. Each segment lies inside one mapped
    // region of `mem`; the keep-alive is `mem` itself, and a
    // GuestMemoryMmap keeps its regions mapped for as long as it lives.
    // Rust never takes references into guest memory: the block layer hands
    // these segments to the kernel or copies them with raw copies, so the
    // guest changing them meanwhile only changes the data.
    Some(unsafe { SgList::from_raw(segs, mem.clone() as KeepAlive) })
}

#[cfg(test)]
mod tests;
