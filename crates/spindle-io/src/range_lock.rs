//! Serialisation of block-level read-modify-write against other writes.
//!
//! An unaligned O_DIRECT write reads the blocks at its edges, patches them
//! and writes them back. Another write to those blocks in between would be
//! undone, so such a write holds its blocks exclusively; aligned writes hold
//! theirs shared and only wait for an overlapping read-modify-write.

use std::future::poll_fn;
use std::sync::Mutex;
use std::task::{Poll, Waker};

#[derive(Default)]
struct State {
    held: Vec<(u64, u64, bool, u64)>, // start, end, exclusive, id
    waiters: Vec<Waker>,
    next_id: u64,
}

/// Byte-range locks for one file.
#[derive(Default)]
pub struct RangeLocks {
    state: Mutex<State>,
}

/// Releases its range on drop.
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    id: u64,
}

impl RangeLocks {
    /// Waits until `[start, end)` can be held (exclusively or shared).
    pub async fn lock(&self, start: u64, end: u64, exclusive: bool) -> RangeGuard<'_> {
        let id = poll_fn(|cx| {
            let Ok(mut st) = self.state.lock() else {
                return Poll::Ready(None);
            };
            let conflict = st
                .held
                .iter()
                .any(|&(s, e, x, _)| s < end && start < e && (x || exclusive));
            if conflict {
                st.waiters.push(cx.waker().clone());
                return Poll::Pending;
            }
            st.next_id += 1;
            let id = st.next_id;
            st.held.push((start, end, exclusive, id));
            Poll::Ready(Some(id))
        })
        .await;
        RangeGuard {
            locks: self,
            id: id.unwrap_or(0),
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let waiters = match self.locks.state.lock() {
            Ok(mut st) => {
                st.held.retain(|h| h.3 != self.id);
                std::mem::take(&mut st.waiters)
            }
            Err(_) => return,
        };
        for w in waiters {
            w.wake();
        }
    }
}
