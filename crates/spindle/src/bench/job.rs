//! One queue's share of a benchmark: its own blocks, its own thread.

use super::pattern;
use blkio::{Blkioq, Completion, MemoryRegion, ReqFlags};
use rand::{rngs::SmallRng, Rng, SeedableRng};
use spindle_export::stats::Histogram;
use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

/// A request that takes longer than this is a failure (a dead server
/// must not hang the client).
const STALL: Duration = Duration::from_secs(30);

/// The access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)]
pub enum Rw {
    /// Random reads.
    RandRead,
    /// Random writes.
    RandWrite,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random, half reads and half writes.
    RandRw,
}

impl std::str::FromStr for Rw {
    type Err = String;
    fn from_str(s: &str) -> Result<Rw, String> {
        Ok(match s {
            "randread" => Rw::RandRead,
            "randwrite" => Rw::RandWrite,
            "read" => Rw::Read,
            "write" => Rw::Write,
            "randrw" => Rw::RandRw,
            _ => return Err(format!("--rw {s}: use randread, randwrite, read, write or randrw")),
        })
    }
}

impl Rw {
    /// No writes are issued.
    pub fn reads_only(self) -> bool {
        matches!(self, Rw::RandRead | Rw::Read)
    }
}

/// What one queue measured.
#[derive(Debug, Default)]
pub struct QueueResult {
    /// Requests completed in the timed phase (flushes excluded).
    pub ios: u64,
    /// Bytes moved in the timed phase.
    pub bytes: u64,
    /// Of `ios`, the reads (the rest are writes).
    pub reads: u64,
    /// Failed requests.
    pub errors: u64,
    /// Blocks whose contents were checked.
    pub checked: u64,
    /// Blocks with wrong contents.
    pub failures: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Latencies of reads and writes.
    pub hist: Histogram,
    /// Length of the timed phase.
    pub elapsed: Duration,
    /// The first failure, for the error line.
    pub first_error: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Read,
    Write,
    Flush,
    VerifyRead,
}

#[derive(Clone, Copy)]
struct Slot {
    kind: Kind,
    block: u64,
    gen: u32,
    start: Instant,
}

/// Marks the block of `s` as having a request in flight (or not). A flush
/// has no block and leaves the marks alone.
fn set_busy(busy: &mut [bool], s: &Slot, on: bool) {
    if s.kind != Kind::Flush {
        if let Some(b) = busy.get_mut(s.block as usize) {
            *b = on;
        }
    }
}

/// A queue and its buffers.
pub struct Job {
    q: Blkioq,
    region: MemoryRegion,
    index: u64,
    stride: u64,
    rw: Rw,
    bs: u64,
    depth: usize,
    own_blocks: u64,
    verify: bool,
    flush_every: u64,
    batch_submit: bool,
}

impl Job {
    /// Queue `index` of `queues` serves blocks `index, index + queues, ...`
    /// of the `blocks` in the target.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        q: Blkioq,
        region: MemoryRegion,
        index: usize,
        queues: usize,
        rw: Rw,
        bs: u64,
        depth: usize,
        blocks: u64,
        verify: bool,
        flush_every: u64,
        batch_submit: bool,
    ) -> Job {
        let stride = queues as u64;
        Job {
            q,
            region,
            index: index as u64,
            stride,
            rw,
            bs,
            depth,
            own_blocks: (blocks - index as u64).div_ceil(stride),
            verify,
            flush_every,
            batch_submit,
        }
    }

    fn buf(&self, slot: usize) -> *mut u8 {
        (self.region.addr + slot * self.bs as usize) as *mut u8
    }

    fn buf_slice(&mut self, slot: usize) -> &mut [u8] {
        // SAFETY: the region was allocated and mapped by blkio for this
        // job alone, is `depth * bs` bytes long or more, and slot < depth;
        // no request on this slot is in flight while the slice is used.
        unsafe { std::slice::from_raw_parts_mut(self.buf(slot), self.bs as usize) }
    }

    fn submit(&mut self, slot: usize, s: Slot) {
        let off = (s.block * self.stride + self.index) * self.bs;
        match s.kind {
            Kind::Read | Kind::VerifyRead => {
                self.q
                    .read(off, self.buf(slot), self.bs as usize, slot, ReqFlags::empty())
            }
            Kind::Write => {
                if self.verify {
                    pattern::fill(self.buf_slice(slot), s.block, s.gen);
                }
                self.q
                    .write(off, self.buf(slot), self.bs as usize, slot, ReqFlags::empty())
            }
            Kind::Flush => self.q.flush(slot, ReqFlags::empty()),
        }
    }

    /// Hands the requests queued so far to the driver without waiting.
    /// Unless `--batch-submit`, the timed phase calls it after each
    /// replacement request, as fio does by default (iodepth_batch_submit=1):
    /// the device gets each request as soon as its slot is free instead of
    /// in batches of everything that completed together. Batching cost 12%
    /// on O_DIRECT raw at QD32 (91k against fio's 104k on the same file;
    /// 106k without it).
    fn push(&mut self) {
        // Errors of the submission show up in the completions it reaps.
        let _ = self.q.do_io(&mut [], 0, None, None);
    }

    /// Waits for at least one completion (at most `STALL`) and moves each
    /// finished request out of `slots` into `done` as (slot, request, result).
    fn reap(
        &mut self,
        comps: &mut [MaybeUninit<Completion>],
        slots: &mut [Option<Slot>],
        done: &mut Vec<(usize, Slot, i32)>,
    ) -> Result<(), String> {
        done.clear();
        let mut limit = STALL;
        let n = self
            .q
            .do_io(comps, 1, Some(&mut limit), None)
            .map_err(|e| format!("do_io: {}", e.message()))?;
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_read() };
            if let Some(s) = slots.get_mut(c.user_data).and_then(Option::take) {
                done.push((c.user_data, s, c.ret));
            }
        }
        Ok(())
    }

    /// Runs the timed phase (until `runtime` passed or `max_ios` reads and
    /// writes completed), then (with verify) the read-back phase.
    pub fn run(mut self, runtime: Duration, max_ios: u64) -> QueueResult {
        let mut r = QueueResult::default();
        let mut rng = SmallRng::seed_from_u64(0x5EED ^ self.index);
        let mut gens = vec![0u32; if self.verify { self.own_blocks as usize } else { 0 }];
        let mut busy = vec![false; gens.len()];
        let mut slots: Vec<Option<Slot>> = vec![None; self.depth];
        let mut cursor = 0u64;
        let mut writes = 0u64;
        let mut comps: Vec<MaybeUninit<Completion>> = (0..self.depth).map(|_| MaybeUninit::uninit()).collect();
        let mut done = Vec::with_capacity(self.depth);
        let start = Instant::now();
        let deadline = start + runtime;
        let (rw, flush_every, own_blocks) = (self.rw, self.flush_every, self.own_blocks);
        let mut next = |rng: &mut SmallRng, busy: &[bool], gens: &mut [u32], writes: &mut u64| -> Slot {
            let write = match rw {
                Rw::RandRead | Rw::Read => false,
                Rw::RandWrite | Rw::Write => true,
                Rw::RandRw => rng.gen_bool(0.5),
            };
            if write && flush_every > 0 && *writes >= flush_every {
                *writes = 0;
                return Slot {
                    kind: Kind::Flush,
                    block: 0,
                    gen: 0,
                    start: Instant::now(),
                };
            }
            let block = loop {
                let b = match rw {
                    Rw::Read | Rw::Write => {
                        cursor = (cursor + 1) % own_blocks;
                        cursor
                    }
                    _ => rng.gen_range(0..own_blocks),
                };
                if busy.get(b as usize) != Some(&true) {
                    break b;
                }
            };
            let gen = if write && !gens.is_empty() {
                gens[block as usize] = gens[block as usize].wrapping_add(1).max(1);
                gens[block as usize]
            } else {
                gens.get(block as usize).copied().unwrap_or(0)
            };
            if write {
                *writes += 1;
            }
            Slot {
                kind: if write { Kind::Write } else { Kind::Read },
                block,
                gen,
                start: Instant::now(),
            }
        };
        #[allow(clippy::needless_range_loop)]
        for slot in 0..self.depth {
            let s = next(&mut rng, &busy, &mut gens, &mut writes);
            set_busy(&mut busy, &s, true);
            slots[slot] = Some(s);
            self.submit(slot, s);
        }
        let mut in_flight = self.depth;
        let mut timed_out = false;
        while in_flight > 0 {
            if let Err(e) = self.reap(&mut comps, &mut slots, &mut done) {
                r.errors += in_flight as u64;
                r.first_error.get_or_insert(e);
                break;
            }
            let now = Instant::now();
            timed_out |= now >= deadline || r.ios >= max_ios;
            if timed_out && r.elapsed.is_zero() {
                r.elapsed = now - start;
            }
            for &(slot, s, ret) in &done {
                set_busy(&mut busy, &s, false);
                if ret < 0 {
                    r.errors += 1;
                    r.first_error.get_or_insert_with(|| {
                        format!(
                            "{:?} of block {}: {}",
                            s.kind as u8,
                            s.block,
                            std::io::Error::from_raw_os_error(-ret)
                        )
                    });
                } else if s.kind == Kind::Flush {
                    r.flushes += 1;
                } else {
                    r.ios += 1;
                    r.bytes += self.bs;
                    r.reads += u64::from(s.kind == Kind::Read);
                    r.hist.add((now - s.start).as_nanos() as u64);
                    if s.kind == Kind::Read && self.verify && s.gen > 0 {
                        r.checked += 1;
                        if !pattern::check(self.buf_slice(slot), s.block, s.gen) {
                            r.failures += 1;
                        }
                    }
                }
                if !timed_out && r.ios >= max_ios {
                    timed_out = true;
                    r.elapsed = now - start;
                }
                if timed_out {
                    in_flight -= 1;
                    continue;
                }
                let s = next(&mut rng, &busy, &mut gens, &mut writes);
                set_busy(&mut busy, &s, true);
                slots[slot] = Some(s);
                self.submit(slot, s);
                if !self.batch_submit {
                    self.push();
                }
            }
        }
        if r.elapsed.is_zero() {
            r.elapsed = start.elapsed();
        }
        if self.verify && r.errors == 0 {
            self.read_back(&gens, &mut r, &mut comps);
        }
        r
    }

    /// Reads every block written in the timed phase and checks it.
    fn read_back(&mut self, gens: &[u32], r: &mut QueueResult, comps: &mut [MaybeUninit<Completion>]) {
        let mut todo = gens
            .iter()
            .enumerate()
            .filter(|(_, g)| **g > 0)
            .map(|(b, g)| (b as u64, *g));
        let mut slots: Vec<Option<Slot>> = vec![None; self.depth];
        let mut done = Vec::with_capacity(self.depth);
        let mut in_flight = 0;
        #[allow(clippy::needless_range_loop)]
        for slot in 0..self.depth {
            let Some((block, gen)) = todo.next() else { break };
            let s = Slot {
                kind: Kind::VerifyRead,
                block,
                gen,
                start: Instant::now(),
            };
            slots[slot] = Some(s);
            self.submit(slot, s);
            in_flight += 1;
        }
        while in_flight > 0 {
            if self.reap(comps, &mut slots, &mut done).is_err() {
                r.errors += 1;
                return;
            }
            for &(slot, s, ret) in &done {
                r.checked += 1;
                if ret < 0 || !pattern::check(self.buf_slice(slot), s.block, s.gen) {
                    r.failures += 1;
                    r.first_error.get_or_insert_with(|| {
                        format!(
                            "block {} does not hold what was written",
                            s.block * self.stride + self.index
                        )
                    });
                }
                match todo.next() {
                    Some((block, gen)) => {
                        let s = Slot {
                            kind: Kind::VerifyRead,
                            block,
                            gen,
                            start: Instant::now(),
                        };
                        slots[slot] = Some(s);
                        self.submit(slot, s);
                    }
                    None => in_flight -= 1,
                }
            }
        }
    }
}
