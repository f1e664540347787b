//! Which I/O thread serves which queue: the one rule, both ways.
//!
//! Thread T serves the queues N with N mod threads = T. vhost-user-backend
//! hands each thread its vrings in increasing queue order, so the queue's
//! index among its thread's vrings (its local index) is N / threads.

use spindle_export::device::DeviceConfig;

/// The map between device queues and (I/O thread, local index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueMap {
    threads: usize,
    queues: usize,
}

impl QueueMap {
    /// The map of a device with `cfg`'s queues and I/O threads.
    pub(crate) fn of(cfg: &DeviceConfig) -> QueueMap {
        QueueMap::new(cfg.num_queues as usize, cfg.iothreads)
    }

    fn new(queues: usize, threads: usize) -> QueueMap {
        QueueMap {
            threads: threads.max(1),
            queues,
        }
    }

    /// The device queue that is vring `local` of I/O thread `thread`.
    pub(crate) fn queue(&self, thread: usize, local: usize) -> usize {
        thread + local * self.threads
    }

    /// The I/O thread serving `queue` and the queue's index there.
    #[cfg(test)]
    fn locate(&self, queue: usize) -> (usize, usize) {
        (queue % self.threads, queue / self.threads)
    }

    /// For each I/O thread, the bit mask of its queues
    /// (`VhostUserBackend::queues_per_thread`).
    pub(crate) fn masks(&self) -> Vec<u64> {
        let mut masks = vec![0u64; self.threads];
        for (t, m) in masks.iter_mut().enumerate() {
            let mut local = 0;
            loop {
                let q = self.queue(t, local);
                if q >= self.queues || q >= 64 {
                    break;
                }
                *m |= 1 << q;
                local += 1;
            }
        }
        masks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_queue_has_one_thread_and_local_index_both_ways() {
        for queues in 1..=16 {
            for threads in 1..=queues {
                let m = QueueMap::new(queues, threads);
                let masks = m.masks();
                assert_eq!(masks.len(), threads);
                // The masks partition the queues.
                assert_eq!(masks.iter().fold(0, |a, m| a | m), (1u64 << queues) - 1);
                assert_eq!(masks.iter().map(|m| m.count_ones()).sum::<u32>(), queues as u32);
                for q in 0..queues {
                    let (t, local) = m.locate(q);
                    assert_eq!(m.queue(t, local), q);
                    // The library's local index: the rank of the queue
                    // among its thread's queues.
                    assert_ne!(masks[t] & (1 << q), 0, "{queues} queues, {threads} threads, queue {q}");
                    assert_eq!((masks[t] & ((1 << q) - 1)).count_ones() as usize, local);
                }
            }
        }
    }

    #[test]
    fn sixty_four_queues_fill_the_masks() {
        let m = QueueMap::new(64, 3);
        assert_eq!(m.masks().iter().fold(0, |a, m| a | m), u64::MAX);
    }
}
