//! Each thread's connections to the exports it uses: a
//! `spindle_io::net::Socket` belongs to the runtime of the thread that
//! made it, so a node keeps one connection per thread, made on that
//! thread's first request: the open-time connection for the first such
//! thread, and for any other a new one negotiated on a helper thread
//! when the server offers multi-conn (an error otherwise).

use super::conn::Conn;
use super::handshake::{self, Export};
use super::stream::Stream;
use super::wire::{self, cmd, tflag};
use super::{Nbd, NbdUri};
use crate::error::{BlockError, Result};
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Weak};

struct Entry {
    id: u64,
    alive: Weak<()>,
    conn: Rc<Conn>,
}

thread_local! {
    /// This thread's connections, by node.
    static CONNS: RefCell<Vec<Entry>> = const { RefCell::new(Vec::new()) };
}

pub(super) fn connect(uri: &NbdUri, spec: &str) -> Result<(Stream, Export)> {
    let mut s = Stream::connect(&uri.address).map_err(|source| BlockError::Io {
        path: spec.into(),
        context: "cannot connect to the NBD server",
        source,
    })?;
    let export = handshake::handshake(&mut s, uri, spec)?;
    Ok((s, export))
}

fn disc_on(s: &mut Stream) {
    use std::io::Write;
    let head = wire::Request {
        flags: 0,
        kind: cmd::DISC,
        cookie: 0,
        offset: 0,
        len: 0,
    };
    let _ = s.write_all(&head.encode());
}

impl Nbd {
    fn lookup(&self) -> Option<Rc<Conn>> {
        CONNS.with(|c| {
            let mut c = c.borrow_mut();
            c.retain(|e| e.alive.strong_count() > 0);
            c.iter().find(|e| e.id == self.id).map(|e| e.conn.clone())
        })
    }

    /// This thread's connection, made on first use.
    pub(super) async fn conn(&self) -> Result<Rc<Conn>> {
        if let Some(c) = self.lookup() {
            return Ok(c);
        }
        let spare = self.spare.lock().ok().and_then(|mut s| s.take());
        let (stream, export) = match spare {
            Some(s) => (s, self.export),
            None if self.export.has(tflag::CAN_MULTI_CONN) => self.connect_elsewhere().await?,
            None => return Err(handshake::refused(
                &self.spec_str(),
                "the NBD server offers no multi-conn, and the export's one connection is on another thread (or closed)",
            )),
        };
        if (export.size, export.flags) != (self.export.size, self.export.flags) {
            return Err(handshake::refused(
                &self.spec_str(),
                "the export changed between two connections (size or flags)",
            ));
        }
        let conn = Rc::new(Conn::new(stream, &self.spec_str(), export)?);
        if let Some(c) = self.lookup() {
            return Ok(c); // another task of this thread was quicker
        }
        CONNS.with(|c| {
            c.borrow_mut().push(Entry {
                id: self.id,
                alive: Arc::downgrade(&self.alive),
                conn: conn.clone(),
            })
        });
        Ok(conn)
    }

    /// A new connection, negotiated on a helper thread.
    async fn connect_elsewhere(&self) -> Result<(Stream, Export)> {
        let (tx, rx) = futures::channel::oneshot::channel();
        let (uri, spec) = (self.uri.clone(), self.spec_str());
        std::thread::Builder::new()
            .name("nbd-connect".into())
            .spawn(move || {
                let _ = tx.send(connect(&uri, &spec));
            })
            .map_err(|source| BlockError::Io {
                path: self.spec.clone(),
                context: "cannot start a thread to connect to the NBD server",
                source,
            })?;
        rx.await
            .unwrap_or_else(|_| Err(handshake::refused(&self.spec_str(), "the connecting thread died")))
    }

    pub(super) fn drop_connections(&self) {
        let _ = CONNS.try_with(|c| c.borrow_mut().retain(|e| e.id != self.id));
        if let Some(mut s) = self.spare.lock().ok().and_then(|mut s| s.take()) {
            disc_on(&mut s);
        }
    }
}
