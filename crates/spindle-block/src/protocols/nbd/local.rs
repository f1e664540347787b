//! Each runtime's connections to the exports it uses: a
//! `spindle_io::net::Socket` belongs to the runtime that made it (its
//! reactor), so a node keeps one connection per runtime, made on that
//! runtime's first request: the open-time connection for the first one,
//! and for any other a new one negotiated on a helper thread when the
//! server offers multi-conn (an error otherwise). Kept per thread, by node
//! and runtime: a thread that runs one short-lived runtime after another
//! (a control thread's resize, snapshot or flush) makes a connection for
//! each instead of waiting on a dead runtime's socket for ever; making one
//! drops the thread's connections of other runtimes and closed nodes.

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
    /// The runtime whose reactor its socket is registered with.
    runtime: usize,
    alive: Weak<()>,
    conn: Rc<Conn>,
}

thread_local! {
    /// This thread's connections, by node and runtime.
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
    fn lookup(&self, runtime: usize) -> Option<Rc<Conn>> {
        CONNS.with(|c| {
            c.borrow()
                .iter()
                .find(|e| e.id == self.id && e.runtime == runtime)
                .map(|e| e.conn.clone())
        })
    }

    /// This runtime's connection, made on first use.
    pub(super) async fn conn(&self) -> Result<Rc<Conn>> {
        let Some(runtime) = spindle_io::current_key() else {
            return Err(BlockError::Invalid(format!(
                "{}: NBD I/O outside an I/O thread's runtime (a bug)",
                self.spec_str()
            )));
        };
        if let Some(c) = self.lookup(runtime) {
            return Ok(c);
        }
        let spare = self.spare.lock().ok().and_then(|mut s| s.take());
        let spare = spare.or_else(|| self.reclaim(runtime));
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
        if let Some(c) = self.lookup(runtime) {
            return Ok(c); // another task of this runtime was quicker
        }
        let stale: Vec<Entry> = CONNS.with(|c| {
            let mut c = c.borrow_mut();
            let (keep, stale) = c
                .drain(..)
                .partition(|e| e.runtime == runtime && e.alive.strong_count() > 0);
            *c = keep;
            c.push(Entry {
                id: self.id,
                runtime,
                alive: Arc::downgrade(&self.alive),
                conn: conn.clone(),
            });
            stale
        });
        // Closed outside the borrow: a task of another runtime nested in
        // this one may still hold its connection, which then ends with it.
        drop(stale);
        Ok(conn)
    }

    /// The stream of this thread's idle connection of another runtime (one
    /// that ended: a thread runs one runtime at a time), to move it to
    /// this one: a server without multi-conn gets no second connection.
    fn reclaim(&self, runtime: usize) -> Option<super::stream::Stream> {
        let old = CONNS.with(|c| {
            let mut c = c.borrow_mut();
            let i = c
                .iter()
                .position(|e| e.id == self.id && e.runtime != runtime && Rc::strong_count(&e.conn) == 1)?;
            Some(c.remove(i))
        })?;
        Rc::try_unwrap(old.conn).ok()?.reclaim()
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
