//! Per-request buffers and the per-connection caps on what a client can
//! make the server hold.
//!
//! Buffers come from a pool per I/O thread (power-of-two size classes,
//! 4 KiB to 32 MiB, at most [`POOL_BYTES`] kept), so steady-state requests
//! allocate nothing. [`Credits`] bounds each connection: at most
//! [`MAX_IN_FLIGHT`] requests and [`MAX_BUFFERED`] payload bytes at once;
//! the connection stops reading requests until credits come back, so a
//! client that sends faster than the image (or than it reads replies)
//! waits on its own socket and costs other clients nothing.

use spindle_io::{AlignedBuf, SgList};
use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// Requests one connection may have in flight.
pub const MAX_IN_FLIGHT: usize = 64;
/// Payload bytes (read and write buffers) one connection may hold.
pub const MAX_BUFFERED: u64 = 64 << 20;
/// Bytes of free buffers an I/O thread keeps for reuse.
pub const POOL_BYTES: usize = 128 << 20;

const MIN_CLASS: usize = 12;
const CLASSES: usize = 26 - MIN_CLASS; // 4 KiB ..= 32 MiB

thread_local! {
    static POOL: RefCell<(usize, Vec<Vec<AlignedBuf>>)> = RefCell::new((0, (0..CLASSES).map(|_| Vec::new()).collect()));
}

fn class(len: usize) -> usize {
    len.max(1)
        .next_power_of_two()
        .trailing_zeros()
        .saturating_sub(MIN_CLASS as u32) as usize
}

/// A buffer of the pool, `len` bytes long (its class may be larger).
pub struct Buf {
    full: Option<SgList>,
    len: usize,
}

impl Buf {
    /// A buffer of `len` bytes (at most 32 MiB), from the pool when one is free.
    pub fn get(len: usize) -> Buf {
        let c = class(len).min(CLASSES - 1);
        let reused = POOL.with(|p| {
            let mut p = p.borrow_mut();
            let b = p.1[c].pop();
            if let Some(b) = &b {
                p.0 -= b.len();
            }
            b
        });
        let buf = reused.unwrap_or_else(|| AlignedBuf::new((1usize << (c + MIN_CLASS)).max(len), 4096));
        Buf {
            full: Some(SgList::owned(buf)),
            len,
        }
    }

    /// The buffer's `len` bytes as a list for I/O.
    pub fn sg(&self) -> SgList {
        self.full
            .as_ref()
            .map_or_else(|| SgList::zeroed(0), |f| f.slice(0, self.len))
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        let Some(full) = self.full.take() else { return };
        // Still shared (an abandoned op's slot holds it): let it go.
        let Ok(buf) = full.into_buf() else { return };
        let c = class(buf.len());
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if c < CLASSES && 1usize << (c + MIN_CLASS) == buf.len() && p.0 + buf.len() <= POOL_BYTES {
                p.0 += buf.len();
                p.1[c].push(buf);
            }
        });
    }
}

/// One connection's credits: request slots and buffered bytes. Only the
/// connection's reader waits for them; request tasks give them back.
pub struct Credits {
    requests: Cell<usize>,
    bytes: Cell<u64>,
    waiter: RefCell<Option<Waker>>,
}

impl Default for Credits {
    fn default() -> Self {
        Credits {
            requests: Cell::new(MAX_IN_FLIGHT),
            bytes: Cell::new(MAX_BUFFERED),
            waiter: RefCell::new(None),
        }
    }
}

impl Credits {
    /// Waits for a request slot and `bytes` (at most [`MAX_BUFFERED`]), then takes them.
    pub async fn take(&self, bytes: u64) {
        let bytes = bytes.min(MAX_BUFFERED);
        poll_fn(|cx| {
            if self.requests.get() > 0 && self.bytes.get() >= bytes {
                self.requests.set(self.requests.get() - 1);
                self.bytes.set(self.bytes.get() - bytes);
                Poll::Ready(())
            } else {
                *self.waiter.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// Gives back what [`Credits::take`] took.
    pub fn give(&self, bytes: u64) {
        self.requests.set(self.requests.get() + 1);
        self.bytes.set(self.bytes.get() + bytes.min(MAX_BUFFERED));
        if let Some(w) = self.waiter.borrow_mut().take() {
            w.wake();
        }
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        MAX_IN_FLIGHT - self.requests.get()
    }

    /// Waits until every request gave its credits back.
    pub async fn drained(&self) {
        poll_fn(|cx| {
            if self.requests.get() == MAX_IN_FLIGHT {
                Poll::Ready(())
            } else {
                *self.waiter.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_by_class() {
        let a = Buf::get(5000);
        assert_eq!(a.sg().len(), 5000);
        let ptr = a.sg().to_vec().len();
        drop(a);
        let b = Buf::get(8192);
        assert_eq!((b.sg().len(), ptr), (8192, 5000));
        let big = Buf::get(32 << 20);
        assert_eq!(big.sg().len(), 32 << 20);
    }

    #[test]
    fn credits_bound_requests_and_bytes() {
        let rt = spindle_io::Runtime::new(Default::default()).unwrap();
        rt.block_on(async {
            let c = std::rc::Rc::new(Credits::default());
            c.take(MAX_BUFFERED).await;
            let c2 = c.clone();
            let waiting = spindle_io::spawn(async move { c2.take(1).await });
            // The waiting task cannot get a byte until the first gives back.
            assert_eq!(c.in_flight(), 1);
            c.give(MAX_BUFFERED);
            waiting.await;
            assert_eq!(c.in_flight(), 1);
            c.give(1);
            c.drained().await;
        });
    }
}
