//! Executing validated virtio-blk requests against a block node.

use super::request::{
    sg_list, Parsed, Request, RequestKind, SharedMemory, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use crate::dirty::DirtyLog;
use spindle_block::Node;
use vm_memory::bitmap::Bitmap;
use vm_memory::Bytes;

const SECTOR: u64 = 512;

/// How a request ended: the status written and the bytes the device wrote
/// into guest buffers (the used-ring length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// `VIRTIO_BLK_S_*`, or `None` when no status could be written.
    pub status: Option<u8>,
    /// Bytes written to device-writable buffers, status included.
    pub used_len: u32,
}

/// Device settings a request needs.
#[derive(Debug, Clone)]
pub struct Device {
    /// The GET_ID string (zero-padded to 20 bytes).
    pub serial: [u8; 20],
    /// The guest turned its write cache off (CONFIG_WCE): every write is
    /// made durable before it completes.
    pub write_through: bool,
}

impl Device {
    /// A device with `serial` (truncated to 20 bytes) and a write-back cache.
    pub fn new(serial: &str) -> Device {
        let mut s = [0u8; 20];
        let n = serial.len().min(20);
        s[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Device {
            serial: s,
            write_through: false,
        }
    }
}

/// Runs a parsed chain: executes a request, or writes the failure status.
/// While `log` is on, every guest page written (data of reads and GET_ID,
/// the status byte) is marked in it once written.
pub async fn complete<B: Bitmap + 'static>(
    node: &Node,
    mem: &SharedMemory<B>,
    dev: &Device,
    log: &DirtyLog,
    parsed: Parsed,
) -> Completion {
    match parsed {
        Parsed::Drop { .. } => Completion {
            status: None,
            used_len: 0,
        },
        Parsed::Fail {
            status_addr, status, ..
        } => {
            let ok = mem.write_obj(status, status_addr).is_ok();
            if ok && log.is_on() {
                log.mark(status_addr.0, 1);
            }
            Completion {
                status: ok.then_some(status),
                used_len: u32::from(ok),
            }
        }
        Parsed::Request(req) => {
            let (status, data_written) = execute(node, mem, dev, &req).await;
            let ok = mem.write_obj(status, req.status).is_ok();
            if log.is_on() {
                // The device may have written the data buffers even when
                // the request failed: they are marked all the same.
                let data = match req.kind {
                    RequestKind::Read | RequestKind::GetId => &req.data[..],
                    _ => &[],
                };
                log.mark_all(data, ok.then_some(req.status.0));
            }
            Completion {
                status: ok.then_some(status),
                used_len: if ok { data_written + 1 } else { 0 },
            }
        }
    }
}

/// Executes one request; returns the status and the data bytes written
/// into guest memory. Each node operation is boxed so the request's task
/// stays small: the spawned future is moved once per request, and the
/// largest operation (a qcow2 allocating write) is kilobytes.
async fn execute<B: Bitmap + 'static>(node: &Node, mem: &SharedMemory<B>, dev: &Device, req: &Request) -> (u8, u32) {
    let ioerr = (VIRTIO_BLK_S_IOERR, 0);
    let off = req.sector.saturating_mul(SECTOR);
    match &req.kind {
        RequestKind::Read => {
            let Some(sg) = sg_list(mem, &req.data) else {
                return ioerr;
            };
            match Box::pin(node.read(off, &sg)).await {
                Ok(()) => (VIRTIO_BLK_S_OK, req.data_len as u32),
                Err(e) => {
                    spindle_export::ratelimit::limited!(warn, "read of {} bytes at {off}: {e}", req.data_len);
                    ioerr
                }
            }
        }
        RequestKind::Write => {
            let Some(sg) = sg_list(mem, &req.data) else {
                spindle_export::ratelimit::limited!(warn, "write at {off}: data buffers outside guest memory");
                return ioerr;
            };
            match Box::pin(node.write(off, &sg, dev.write_through)).await {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    spindle_export::ratelimit::limited!(warn, "write of {} bytes at {off}: {e}", req.data_len);
                    ioerr
                }
            }
        }
        RequestKind::Flush => match Box::pin(node.flush()).await {
            Ok(()) => (VIRTIO_BLK_S_OK, 0),
            Err(_) => ioerr,
        },
        RequestKind::GetId => {
            let Some(sg) = sg_list(mem, &req.data) else {
                return ioerr;
            };
            let mut id = vec![0u8; sg.len()];
            let n = (VIRTIO_BLK_ID_BYTES as usize).min(id.len());
            id[..n].copy_from_slice(&dev.serial[..n]);
            sg.copy_from(&id);
            (VIRTIO_BLK_S_OK, sg.len() as u32)
        }
        RequestKind::Discard(ranges) | RequestKind::WriteZeroes(ranges) => {
            let zero = matches!(req.kind, RequestKind::WriteZeroes(_));
            for r in ranges {
                let (o, l) = (r.sector * SECTOR, u64::from(r.sectors) * SECTOR);
                let res = if zero {
                    Box::pin(node.write_zeroes(o, l, r.unmap)).await
                } else {
                    Box::pin(node.discard(o, l)).await
                };
                if res.is_err() {
                    return ioerr;
                }
            }
            (VIRTIO_BLK_S_OK, 0)
        }
    }
}
