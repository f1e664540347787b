//! Replies going out on one connection, several to a message.
//!
//! A request's task queues its reply and waits until the reply is on the
//! wire (so it keeps its credits, and a client that does not read holds
//! only its own budget). The task that finds no send running becomes the
//! sender: it sends everything queued as one message, then whatever was
//! queued meanwhile, until the queue is empty. Under load the replies of
//! a round of completions go out in one `sendmsg` instead of one each;
//! a lone reply goes out at once, as before.

use crate::tls::Wire;
use futures::channel::oneshot;
use spindle_io::SgList;
use std::cell::{Cell, RefCell};

/// The replies of one connection waiting to be sent.
#[derive(Default)]
pub(crate) struct Outbox {
    queue: RefCell<Vec<(SgList, oneshot::Sender<()>)>>,
    sending: Cell<bool>,
}

impl Outbox {
    /// Sends `reply` (whole, never interleaved with another) and returns
    /// once it is on the wire, or the connection failed. A failed send
    /// (the client went away) shuts the socket, which ends the reader.
    pub(crate) async fn send(&self, wire: &Wire, reply: SgList) {
        let (tx, rx) = oneshot::channel();
        self.queue.borrow_mut().push((reply, tx));
        if self.sending.get() {
            // The sender takes it with its next batch; a dropped sender
            // (a failed connection) ends the wait too.
            let _ = rx.await;
            return;
        }
        self.sending.set(true);
        loop {
            let batch = std::mem::take(&mut *self.queue.borrow_mut());
            if batch.is_empty() {
                break;
            }
            let (lists, done): (Vec<SgList>, Vec<_>) = batch.into_iter().unzip();
            let refs: Vec<&SgList> = lists.iter().collect();
            if wire.send_all(&SgList::concat(&refs)).await.is_err() {
                wire.shutdown();
            }
            for d in done {
                let _ = d.send(());
            }
        }
        self.sending.set(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spindle_io::net::Socket;
    use std::io::Read;
    use std::rc::Rc;

    #[test]
    fn replies_queued_together_go_out_whole_and_in_order() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let rt = spindle_io::Runtime::new(spindle_io::RuntimeConfig::default()).unwrap();
        rt.block_on(async move {
            let wire = Rc::new(Wire::Plain(Rc::new(Socket::new(a.into()).unwrap())));
            let out = Rc::new(Outbox::default());
            let tasks: Vec<_> = (0..20u8)
                .map(|i| {
                    let (wire, out) = (wire.clone(), out.clone());
                    spindle_io::spawn(
                        async move { out.send(&wire, SgList::copy_of(&vec![i; 1000 + i as usize])).await },
                    )
                })
                .collect();
            for t in tasks {
                t.await;
            }
        });
        let mut got = Vec::new();
        b.set_nonblocking(true).unwrap();
        let _ = b.read_to_end(&mut got);
        let mut pos = 0;
        for i in 0..20u8 {
            let n = 1000 + i as usize;
            assert!(
                got[pos..pos + n].iter().all(|&x| x == i),
                "reply {i} is not whole at {pos}"
            );
            pos += n;
        }
        assert_eq!(pos, got.len());
    }
}
