//! A bounded pool of worker threads running blocking syscalls.

use super::{new_eventfd, signal_eventfd, Engine, Unsupported};
use crate::op::Op;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// An op on its way to a worker.
struct Job {
    token: u64,
    op: Op,
}

// SAFETY: the raw pointers inside Op refer to memory the submitter keeps alive
// until the completion is reaped (the Engine::push contract), so handing them
// to a worker thread is sound.
unsafe impl Send for Job {}

struct Shared {
    done: Mutex<Vec<(u64, i32)>>,
    efd: OwnedFd,
}

/// A fixed number of workers fed from one queue. Never one thread per request:
/// with every worker busy, further ops wait in the queue.
pub struct ThreadPoolEngine {
    tx: Option<Sender<Job>>,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    queued: Vec<Job>,
    in_flight: usize,
}

impl ThreadPoolEngine {
    /// Starts `threads` workers (at least one).
    pub fn new(threads: usize) -> io::Result<Self> {
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let shared = Arc::new(Shared {
            done: Mutex::new(Vec::new()),
            efd: new_eventfd()?,
        });
        let mut workers = Vec::new();
        for i in 0..threads.max(1) {
            let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
            let shared = shared.clone();
            workers.push(
                std::thread::Builder::new()
                    .name(format!("spindle-io-{i}"))
                    .spawn(move || worker(&rx, &shared))?,
            );
        }
        Ok(ThreadPoolEngine {
            tx: Some(tx),
            shared,
            workers,
            queued: Vec::new(),
            in_flight: 0,
        })
    }
}

fn worker(rx: &Mutex<Receiver<Job>>, shared: &Shared) {
    loop {
        let job = match rx.lock() {
            Ok(guard) => guard.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        // SAFETY: the Engine::push contract keeps the op's memory valid until reaped.
        let res = unsafe { job.op.run_blocking() };
        if let Ok(mut done) = shared.done.lock() {
            done.push((job.token, res));
        }
        signal_eventfd(shared.efd.as_raw_fd());
    }
}

impl Engine for ThreadPoolEngine {
    unsafe fn push(&mut self, token: u64, op: Op) -> Result<(), Unsupported> {
        self.queued.push(Job { token, op });
        self.in_flight += 1;
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        let Some(tx) = &self.tx else { return Ok(()) };
        for job in self.queued.drain(..) {
            tx.send(job)
                .map_err(|_| io::Error::other("I/O worker threads are gone"))?;
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        if let Ok(mut done) = self.shared.done.lock() {
            self.in_flight -= done.len();
            out.append(&mut done);
        }
    }

    fn event_fd(&self) -> RawFd {
        self.shared.efd.as_raw_fd()
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}

impl Drop for ThreadPoolEngine {
    fn drop(&mut self) {
        self.tx.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}
