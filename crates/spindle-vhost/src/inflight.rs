//! Inflight I/O tracking for split virtqueues (vhost-user, "Inflight I/O
//! tracking"): a buffer shared with the frontend in which the backend
//! records every descriptor chain it took and has not yet returned, so that
//! a backend started again after a crash resubmits exactly those, in the
//! order it took them, instead of the frontend guessing from ring indices.
//!
//! The backend allocates the buffer (`GET_INFLIGHT_FD`); the frontend keeps
//! it across reconnections and hands it back (`SET_INFLIGHT_FD`), so it
//! comes from a previous Spindle or from a hostile frontend alike: it is
//! validated before use ([`Region::adopt`]) and again against each ring when
//! the ring starts ([`Region::start`]).
//!
//! Layout (native byte order), one region per queue, each `QUEUE_ALIGN`
//! aligned:
//!
//! ```text
//! header  features u64 | version u16 | desc_num u16 | last_batch_head u16 | used_idx u16
//! desc[i] inflight u8 | padding [u8; 5] | next u16 | counter u64       (desc_num entries)
//! ```

use spindle_io::memfd;
use std::fmt;
use std::fs::File;
use std::sync::atomic::{fence, Ordering};
use vhost::vhost_user::message::VhostUserInflight;
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

#[cfg(test)]
mod tests;
pub(crate) mod track;

/// The only version of the split-ring layout; 0 marks a buffer never used.
pub const VERSION: u16 = 1;
const HEADER: usize = 16;
const DESC: usize = 16;
/// Each queue's region starts on a 64-byte boundary (as libvhost-user's).
const QUEUE_ALIGN: usize = 64;
const H_FEATURES: usize = 0;
const H_VERSION: usize = 8;
const H_DESC_NUM: usize = 10;
const H_LAST_BATCH_HEAD: usize = 12;
const H_USED_IDX: usize = 14;
const D_INFLIGHT: usize = 0;
const D_NEXT: usize = 6;
const D_COUNTER: usize = 8;

/// Bytes of one queue's region for queues of `queue_size` entries.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).next_multiple_of(QUEUE_ALIGN)
}

/// Bytes of the buffer for `queues` queues of `queue_size` entries.
pub fn region_size(queues: u16, queue_size: u16) -> u64 {
    u64::from(queues) * queue_region_size(queue_size) as u64
}

/// What a frontend may ask of this device.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// Queues the device offers.
    pub queues: u16,
    /// Largest queue size.
    pub queue_size: u16,
}

/// Why an inflight buffer is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// More queues than the device has, or none.
    Queues {
        /// Asked for.
        asked: u16,
        /// The device's.
        max: u16,
    },
    /// A queue size of 0 or above the device's maximum.
    QueueSize {
        /// Asked for.
        asked: u16,
        /// The device's maximum.
        max: u16,
    },
    /// The buffer's size is not the layout's.
    Size {
        /// Given.
        got: u64,
        /// The layout's for the queues and queue size given.
        want: u64,
    },
    /// The offset is not page-aligned.
    Offset(u64),
    /// The file ends before the buffer does.
    FileTooSmall {
        /// File length.
        len: u64,
        /// Where the buffer ends.
        end: u64,
    },
    /// The file can still be shrunk (a memfd without `F_SEAL_SHRINK`, as
    /// `GET_INFLIGHT_FD` hands out): a shrink would fault this process.
    NotSealed,
    /// A system call failed.
    Os(&'static str, String),
    /// A queue's header has feature bits this layout does not know.
    Features {
        /// Queue.
        queue: usize,
        /// Its features.
        features: u64,
    },
    /// A queue's header has an unknown version.
    Version {
        /// Queue.
        queue: usize,
        /// Its version.
        version: u16,
    },
    /// A queue's `desc_num` is not the queue size.
    DescNum {
        /// Queue.
        queue: usize,
        /// Its `desc_num`.
        desc_num: u16,
        /// The queue size.
        want: u16,
    },
    /// A descriptor index (`last_batch_head`, or a `next` link) is not a
    /// descriptor of the queue.
    Index {
        /// Queue.
        queue: usize,
        /// Which field ("last_batch_head" or "next").
        field: &'static str,
        /// Entry it belongs to (`None`: the header).
        entry: Option<u16>,
        /// Its value.
        value: u16,
        /// Entries.
        desc_num: u16,
    },
    /// An `inflight` flag other than 0 or 1.
    Flag {
        /// Queue.
        queue: usize,
        /// Entry.
        entry: u16,
        /// Its value.
        value: u8,
    },
    /// Two chains in flight share a counter: their order is unknown.
    Counter {
        /// Queue.
        queue: usize,
        /// The counter.
        counter: u64,
    },
    /// The ring set up has more entries than the buffer tracks, or a chain
    /// in flight is not one of its descriptors.
    RingSize {
        /// Queue.
        queue: usize,
        /// The ring's size.
        ring: u16,
        /// Entries tracked.
        desc_num: u16,
    },
    /// The used index of the ring is further from the buffer's than one
    /// ring: the buffer does not belong to this ring.
    Batch {
        /// Queue.
        queue: usize,
        /// The ring's used index.
        ring: u16,
        /// The buffer's `used_idx`.
        tracked: u16,
    },
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refused::Queues { asked, max } => write!(f, "{asked} queues asked for; the device has 1 to {max}"),
            Refused::QueueSize { asked, max } => write!(f, "queue size {asked} is not between 1 and {max}"),
            Refused::Size { got, want } => write!(f, "its size is {got} bytes; the layout needs {want}"),
            Refused::Offset(o) => write!(f, "its offset {o} is not page-aligned"),
            Refused::FileTooSmall { len, end } => write!(f, "its file has {len} bytes; the buffer ends at {end}"),
            Refused::NotSealed => write!(f, "its file is not a memfd sealed against shrinking"),
            Refused::Os(what, e) => write!(f, "{what}: {e}"),
            Refused::Features { queue, features } => write!(f, "queue {queue}: unknown features {features:#x}"),
            Refused::Version { queue, version } => {
                write!(f, "queue {queue}: version {version} (only {VERSION} is known)")
            }
            Refused::DescNum { queue, desc_num, want } => {
                write!(f, "queue {queue}: desc_num {desc_num} is not the queue size {want}")
            }
            Refused::Index {
                queue,
                field,
                entry,
                value,
                desc_num,
            } => match entry {
                Some(e) => write!(f, "queue {queue}: entry {e}: {field} {value} is not below {desc_num}"),
                None => write!(f, "queue {queue}: {field} {value} is not below {desc_num}"),
            },
            Refused::Flag { queue, entry, value } => write!(f, "queue {queue}: entry {entry}: inflight flag {value}"),
            Refused::Counter { queue, counter } => {
                write!(f, "queue {queue}: two chains in flight share counter {counter}")
            }
            Refused::RingSize { queue, ring, desc_num } => {
                write!(
                    f,
                    "queue {queue}: the ring has {ring} entries and the buffer tracks {desc_num}"
                )
            }
            Refused::Batch { queue, ring, tracked } => write!(
                f,
                "queue {queue}: the ring's used index {ring} is {} entries past the buffer's {tracked}",
                ring.wrapping_sub(*tracked)
            ),
        }
    }
}

/// What a ring resumes with after its start: the chains still in flight,
/// in the order they were taken, and the counter of the next one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// Heads to resubmit, oldest first.
    pub heads: Vec<u16>,
    /// Counter for the next chain taken.
    pub counter: u64,
}

/// An inflight buffer, mapped and validated.
pub struct Region {
    map: MmapRegion<()>,
    queues: u16,
    desc_num: u16,
    stride: usize,
}

fn check_request(msg: &VhostUserInflight, caps: Caps) -> Result<(), Refused> {
    if msg.num_queues == 0 || msg.num_queues > caps.queues {
        return Err(Refused::Queues {
            asked: msg.num_queues,
            max: caps.queues,
        });
    }
    if msg.queue_size == 0 || msg.queue_size > caps.queue_size {
        return Err(Refused::QueueSize {
            asked: msg.queue_size,
            max: caps.queue_size,
        });
    }
    Ok(())
}

/// A fresh buffer for the queues and queue size `msg` asks for
/// (`GET_INFLIGHT_FD`): a zeroed memfd (version 0 everywhere: never used)
/// sealed against shrinking and growing, and its description.
pub fn create(msg: &VhostUserInflight, caps: Caps) -> Result<(File, VhostUserInflight), Refused> {
    check_request(msg, caps)?;
    let size = region_size(msg.num_queues, msg.queue_size);
    let seals = memfd::SEAL_SHRINK | memfd::SEAL_GROW | memfd::SEAL_SEAL;
    let file =
        memfd::create_sized(c"spindle-inflight", size, seals).map_err(|e| Refused::Os("memfd", e.to_string()))?;
    Ok((file, VhostUserInflight::new(size, 0, msg.num_queues, msg.queue_size)))
}

impl Region {
    /// Maps and validates the buffer the frontend hands back
    /// (`SET_INFLIGHT_FD`): its size, offset and file, and each queue's
    /// header and entries. A queue never used (version 0) is initialized.
    pub fn adopt(file: File, msg: &VhostUserInflight, caps: Caps) -> Result<Region, Refused> {
        check_request(msg, caps)?;
        let want = region_size(msg.num_queues, msg.queue_size);
        if msg.mmap_size != want {
            return Err(Refused::Size {
                got: msg.mmap_size,
                want,
            });
        }
        if !msg.mmap_offset.is_multiple_of(4096) {
            return Err(Refused::Offset(msg.mmap_offset));
        }
        if !memfd::cannot_shrink(&file) {
            return Err(Refused::NotSealed);
        }
        let len = file.metadata().map_err(|e| Refused::Os("fstat", e.to_string()))?.len();
        let end = msg.mmap_offset.saturating_add(want);
        if len < end {
            return Err(Refused::FileTooSmall { len, end });
        }
        let map = MmapRegion::from_file(FileOffset::new(file, msg.mmap_offset), want as usize)
            .map_err(|e| Refused::Os("mmap", e.to_string()))?;
        let region = Region {
            map,
            queues: msg.num_queues,
            desc_num: msg.queue_size,
            stride: queue_region_size(msg.queue_size),
        };
        for q in 0..usize::from(region.queues) {
            region.validate(q)?;
        }
        Ok(region)
    }

    /// Queues tracked.
    pub fn queues(&self) -> u16 {
        self.queues
    }

    fn mem(&self) -> VolatileSlice<'_> {
        self.map.as_volatile_slice()
    }

    fn load<T: vm_memory::AtomicAccess + Default>(&self, q: usize, off: usize) -> T {
        self.mem()
            .load(q * self.stride + off, Ordering::Relaxed)
            .unwrap_or_default()
    }

    fn store<T: vm_memory::AtomicAccess>(&self, q: usize, off: usize, v: T) {
        // In bounds by construction (`stride` and `desc_num` fixed at
        // adoption, indices checked by the callers).
        let _ = self.mem().store(v, q * self.stride + off, Ordering::Relaxed);
    }

    fn desc(&self, head: u16, field: usize) -> usize {
        HEADER + usize::from(head) * DESC + field
    }

    fn validate(&self, q: usize) -> Result<(), Refused> {
        let version: u16 = self.load(q, H_VERSION);
        if version == 0 {
            return Ok(());
        }
        if version != VERSION {
            return Err(Refused::Version { queue: q, version });
        }
        let features: u64 = self.load(q, H_FEATURES);
        if features != 0 {
            return Err(Refused::Features { queue: q, features });
        }
        let desc_num: u16 = self.load(q, H_DESC_NUM);
        if desc_num != self.desc_num {
            return Err(Refused::DescNum {
                queue: q,
                desc_num,
                want: self.desc_num,
            });
        }
        let index = |field, entry, value| Refused::Index {
            queue: q,
            field,
            entry,
            value,
            desc_num,
        };
        let head: u16 = self.load(q, H_LAST_BATCH_HEAD);
        if head >= desc_num {
            return Err(index("last_batch_head", None, head));
        }
        let mut counters = Vec::new();
        for e in 0..desc_num {
            let next: u16 = self.load(q, self.desc(e, D_NEXT));
            if next >= desc_num {
                return Err(index("next", Some(e), next));
            }
            match self.load::<u8>(q, self.desc(e, D_INFLIGHT)) {
                0 => {}
                1 => counters.push(self.load::<u64>(q, self.desc(e, D_COUNTER))),
                value => {
                    return Err(Refused::Flag {
                        queue: q,
                        entry: e,
                        value,
                    })
                }
            }
        }
        counters.sort_unstable();
        if let Some(w) = counters.windows(2).find(|w| w[0] == w[1]) {
            return Err(Refused::Counter {
                queue: q,
                counter: w[0],
            });
        }
        Ok(())
    }

    /// Starts ring `q` of `ring_size` entries whose used index in guest
    /// memory is `ring_used` (the frontend set the ring up): initializes a
    /// queue never used; otherwise repairs the last batch (the chains the
    /// used index counts beyond `used_idx` were returned) and lists the
    /// chains still in flight, by counter. Call with nothing of `q` in
    /// flight in this process.
    pub fn start(&self, q: usize, ring_size: u16, ring_used: u16) -> Result<Resume, Refused> {
        if q >= usize::from(self.queues) || ring_size > self.desc_num {
            return Err(Refused::RingSize {
                queue: q,
                ring: ring_size,
                desc_num: if q >= usize::from(self.queues) {
                    0
                } else {
                    self.desc_num
                },
            });
        }
        if self.load::<u16>(q, H_VERSION) == 0 {
            for e in 0..self.desc_num {
                self.store(q, self.desc(e, D_INFLIGHT), 0u8);
                self.store(q, self.desc(e, D_NEXT), 0u16);
                self.store(q, self.desc(e, D_COUNTER), 0u64);
            }
            self.store(q, H_FEATURES, 0u64);
            self.store(q, H_DESC_NUM, self.desc_num);
            self.store(q, H_LAST_BATCH_HEAD, 0u16);
            self.store(q, H_USED_IDX, ring_used);
            fence(Ordering::Release);
            self.store(q, H_VERSION, VERSION);
            return Ok(Resume {
                heads: Vec::new(),
                counter: 1,
            });
        }
        // Validated at adoption, but the frontend shares the buffer: every
        // index read here is checked again.
        self.validate(q)?;
        let tracked: u16 = self.load(q, H_USED_IDX);
        let batch = ring_used.wrapping_sub(tracked);
        if batch > ring_size {
            return Err(Refused::Batch {
                queue: q,
                ring: ring_used,
                tracked,
            });
        }
        // The ring's used index counts `batch` entries the buffer does not
        // yet: the last batch reached the ring, its flags may not have
        // been cleared. The list from `last_batch_head` is in used-ring
        // order (see `complete`), so the first `batch` entries are those.
        let mut e: u16 = self.load(q, H_LAST_BATCH_HEAD);
        for _ in 0..batch {
            self.store(q, self.desc(e, D_INFLIGHT), 0u8);
            e = self.load(q, self.desc(e, D_NEXT));
            if e >= self.desc_num {
                break;
            }
        }
        fence(Ordering::Release);
        self.store(q, H_USED_IDX, ring_used);
        let mut inflight = Vec::new();
        for e in 0..self.desc_num {
            if self.load::<u8>(q, self.desc(e, D_INFLIGHT)) == 1 {
                if e >= ring_size {
                    return Err(Refused::RingSize {
                        queue: q,
                        ring: ring_size,
                        desc_num: self.desc_num,
                    });
                }
                inflight.push((self.load::<u64>(q, self.desc(e, D_COUNTER)), e));
            }
        }
        inflight.sort_unstable();
        let counter = inflight.last().map_or(1, |&(c, _)| c.wrapping_add(1));
        Ok(Resume {
            heads: inflight.into_iter().map(|(_, e)| e).collect(),
            counter,
        })
    }

    /// Records that chain `head` of queue `q` was taken, as the
    /// `counter`-th: false (nothing recorded) when it is already in flight
    /// or not a tracked descriptor.
    pub fn mark(&self, q: usize, head: u16, counter: u64) -> bool {
        if head >= self.desc_num || self.load::<u8>(q, self.desc(head, D_INFLIGHT)) != 0 {
            return false;
        }
        self.store(q, self.desc(head, D_COUNTER), counter);
        fence(Ordering::Release);
        self.store(q, self.desc(head, D_INFLIGHT), 1u8);
        true
    }

    /// Returns a batch of chains of queue `q` to the driver (`head` gives
    /// each one's head): `publish` puts them on the used ring in `batch` order (each entry, then the
    /// used index) and returns how many it published (all, unless the ring
    /// broke) and the ring's used index after them. The batch is linked
    /// first, in that order, from `last_batch_head`, so that a crash at any
    /// point leaves exactly the entries the used index counts for `start`
    /// to clear; then their flags are cleared and `used_idx` catches up.
    pub fn complete<T>(&self, q: usize, batch: &[T], head: impl Fn(&T) -> u16, publish: impl FnOnce() -> (usize, u16)) {
        let tracked = |h: &u16| *h < self.desc_num;
        let mut first: u16 = self.load(q, H_LAST_BATCH_HEAD);
        for h in batch.iter().rev().map(&head).filter(tracked) {
            self.store(q, self.desc(h, D_NEXT), first);
            first = h;
        }
        self.store(q, H_LAST_BATCH_HEAD, first);
        fence(Ordering::Release);
        let (published, used) = publish();
        fence(Ordering::Release);
        for h in batch[..published.min(batch.len())].iter().map(&head).filter(tracked) {
            self.store(q, self.desc(h, D_INFLIGHT), 0u8);
        }
        fence(Ordering::Release);
        self.store(q, H_USED_IDX, used);
    }
}
