//! One connection in the transmission phase, on the runtime of the thread
//! that made it: one request at a time, its reply read and checked
//! (`reply`) before the next goes out.

use super::handshake::Export;
use super::reply::{self, Expect, Step};
use super::stream::Stream;
use super::wire::{be16, be32, be64, cmd, errno, Request, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};
use crate::error::{BlockError, Result};
use futures::lock::Mutex;
use spindle_io::net::Socket;
use spindle_io::SgList;
use std::cell::{Cell, RefCell};
use std::io::{Read, Write};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between requests.
    Idle,
    /// A request is under way (left so if its future is dropped midway).
    Busy,
    /// The stream is out of step with the server: no further requests.
    Broken,
    /// The server is shutting down.
    Closed,
    /// `NBD_CMD_DISC` went out.
    Disconnected,
}

/// What a request's reply fills in.
pub enum Sink<'a> {
    /// Nothing: a status-only reply.
    Nothing,
    /// A read's data.
    Read(&'a SgList),
    /// The first `base:allocation` extent: (flags, length).
    Status(&'a Cell<Option<(u32, u64)>>),
}

/// How a connection's bytes move.
enum Wire {
    /// On this thread's runtime.
    Socket(Socket),
    /// Setup-time: the handshake's blocking stream, with its timeouts;
    /// none once it went back (`Conn::into_stream`).
    Blocking(RefCell<Option<Stream>>),
}

impl Wire {
    async fn send_all(&self, sg: &SgList) -> std::io::Result<()> {
        match self {
            Wire::Socket(s) => s.send_all(sg).await,
            Wire::Blocking(s) => Self::stream(s)?.write_all(&sg.to_vec()),
        }
    }

    async fn recv_exact(&self, sg: &SgList) -> std::io::Result<()> {
        match self {
            Wire::Socket(s) => s.recv_exact(sg).await,
            Wire::Blocking(s) => {
                let mut v = vec![0; sg.len()];
                Self::stream(s)?.read_exact(&mut v)?;
                sg.copy_from(&v);
                Ok(())
            }
        }
    }

    fn stream(s: &RefCell<Option<Stream>>) -> std::io::Result<std::cell::RefMut<'_, Stream>> {
        std::cell::RefMut::filter_map(s.borrow_mut(), Option::as_mut)
            .map_err(|_| std::io::ErrorKind::NotConnected.into())
    }
}

/// A connection, registered with this thread's runtime (or, at setup, a
/// blocking one).
pub struct Conn {
    sock: Wire,
    /// The same descriptor (non-blocking once `sock` has it), to send
    /// `NBD_CMD_DISC` when the connection is dropped; none for a blocking
    /// connection, whose stream goes back to its owner.
    raw: RefCell<Option<Stream>>,
    turn: Mutex<()>,
    state: Cell<State>,
    cookie: Cell<u64>,
    uri: String,
    export: Export,
}

impl Conn {
    /// Takes a stream that finished its handshake (call from a task).
    pub fn new(stream: Stream, uri: &str, export: Export) -> Result<Conn> {
        let io = |source| BlockError::Io {
            path: uri.into(),
            context: "cannot set up the NBD connection",
            source,
        };
        stream.set_timeouts(None).map_err(io)?;
        let raw = stream.try_clone().map_err(io)?;
        let sock = Socket::new(stream.into_fd()).map_err(io)?;
        Ok(Conn::with(Wire::Socket(sock), Some(raw), uri, export))
    }

    /// A blocking connection on a stream that finished its handshake, for
    /// setup reads outside any runtime; [`Conn::into_stream`] gives the
    /// stream back.
    pub fn blocking(stream: Stream, uri: &str, export: Export) -> Conn {
        Conn::with(Wire::Blocking(RefCell::new(Some(stream))), None, uri, export)
    }

    fn with(sock: Wire, raw: Option<Stream>, uri: &str, export: Export) -> Conn {
        Conn {
            sock,
            raw: RefCell::new(raw),
            turn: Mutex::new(()),
            state: Cell::new(State::Idle),
            cookie: Cell::new(1),
            uri: uri.to_string(),
            export,
        }
    }

    /// The stream of a blocking connection, still in step with the
    /// server (between requests).
    pub fn into_stream(self) -> Option<Stream> {
        match &self.sock {
            Wire::Blocking(s) if self.state.get() == State::Idle => s.borrow_mut().take(),
            _ => None,
        }
    }

    /// The stream of an idle runtime connection, to serve another runtime
    /// of the thread (its own, on a new socket, is dropped: deregistered
    /// from the old runtime and closed, the stream's descriptor stays
    /// open, no `NBD_CMD_DISC` is sent). `None` unless idle and whole.
    pub fn reclaim(self) -> Option<Stream> {
        match (&self.sock, self.state.get()) {
            (Wire::Socket(_), State::Idle) if self.turn.try_lock().is_some() => self.raw.borrow_mut().take(),
            _ => None,
        }
    }

    fn remote(&self, msg: impl Into<String>, errno: i32) -> BlockError {
        BlockError::Remote {
            uri: self.uri.clone(),
            msg: msg.into(),
            errno,
        }
    }

    fn broken(&self, e: &Expect, why: String) -> BlockError {
        self.state.set(State::Broken);
        self.remote(
            format!("NBD protocol error in the reply to {}: {why}", reply::cmd_name(e.cmd)),
            libc::EIO,
        )
    }

    fn lost(&self, source: std::io::Error) -> BlockError {
        self.state.set(State::Broken);
        BlockError::Io {
            path: self.uri.clone().into(),
            context: "NBD connection lost",
            source,
        }
    }

    async fn recv(&self, n: usize) -> std::io::Result<Vec<u8>> {
        let sg = SgList::zeroed(n);
        self.sock.recv_exact(&sg).await?;
        Ok(sg.to_vec())
    }

    /// Sends a request (with `payload` for a write) and reads its reply.
    pub async fn call(
        &self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<&SgList>,
        sink: Sink<'_>,
    ) -> Result<()> {
        let _turn = self.turn.lock().await;
        match self.state.get() {
            State::Idle => {}
            State::Closed => return Err(self.remote("the NBD server is shutting down", libc::ESHUTDOWN)),
            State::Disconnected => return Err(self.remote("the NBD connection is closed", libc::ESHUTDOWN)),
            _ => return Err(self.remote("the NBD connection broke in an earlier request", libc::EIO)),
        }
        self.state.set(State::Busy);
        let cookie = self.cookie.get();
        self.cookie.set(cookie.wrapping_add(1));
        let e = Expect {
            cookie,
            cmd: kind,
            offset,
            len,
        };
        let r = self.exchange(&e, flags, payload, sink).await;
        if self.state.get() == State::Busy {
            self.state.set(State::Idle);
        }
        r
    }

    async fn exchange(&self, e: &Expect, flags: u16, payload: Option<&SgList>, sink: Sink<'_>) -> Result<()> {
        let lost = |e| self.lost(e);
        let head = Request {
            flags,
            kind: e.cmd,
            cookie: e.cookie,
            offset: e.offset,
            len: e.len,
        }
        .encode();
        self.sock.send_all(&SgList::copy_of(&head)).await.map_err(lost)?;
        if let Some(p) = payload {
            self.sock.send_all(p).await.map_err(lost)?;
        }
        let h = self.recv(16).await.map_err(lost)?;
        match be32(&h) {
            SIMPLE_REPLY_MAGIC => {
                if be64(&h[8..]) != e.cookie {
                    return Err(self.broken(e, format!("reply cookie {:#x} does not match", be64(&h[8..]))));
                }
                let code = be32(&h[4..]);
                if code != 0 {
                    return Err(self.failed(e, code, String::new()));
                }
                match sink {
                    Sink::Read(_) if self.export.structured => Err(self.broken(e, "a simple reply to READ".into())),
                    Sink::Read(buf) => self.sock.recv_exact(buf).await.map_err(lost),
                    Sink::Status(_) => Err(self.broken(e, "a simple reply to BLOCK_STATUS".into())),
                    Sink::Nothing => Ok(()),
                }
            }
            STRUCTURED_REPLY_MAGIC if self.export.structured => self.chunks(e, h, sink).await,
            m => Err(self.broken(e, format!("bad reply magic {m:#x}"))),
        }
    }

    /// The chunks of a structured reply, the first header in `h`.
    async fn chunks(&self, e: &Expect, mut h: Vec<u8>, sink: Sink<'_>) -> Result<()> {
        let lost = |e| self.lost(e);
        let (mut covered, mut others, mut error, mut status) = (0u64, 0usize, None, false);
        loop {
            h.extend(self.recv(4).await.map_err(lost)?);
            let (flags, kind, len) = (be16(&h[4..]), be16(&h[6..]), be32(&h[16..]));
            let step = reply::check_chunk(e, flags, kind, be64(&h[8..]), len).map_err(|w| self.broken(e, w))?;
            if !matches!(step, Step::Data(_) | Step::Hole) {
                others += 1;
                if others > reply::MAX_OTHER_CHUNKS {
                    return Err(self.broken(e, "too many chunks".into()));
                }
            }
            match (step, &sink) {
                (Step::Data(n), Sink::Read(buf)) => {
                    let off = be64(&self.recv(8).await.map_err(lost)?);
                    let (at, n) = reply::place(e, off, n.into(), covered).map_err(|w| self.broken(e, w))?;
                    self.sock.recv_exact(&buf.slice(at, n)).await.map_err(lost)?;
                    covered += n as u64;
                }
                (Step::Hole, Sink::Read(buf)) => {
                    let p: [u8; 12] = self.recv(12).await.map_err(lost)?.try_into().unwrap_or([0; 12]);
                    let (off, n) = reply::hole(&p);
                    let (at, n) = reply::place(e, off, n, covered).map_err(|w| self.broken(e, w))?;
                    buf.slice(at, n).fill_zero();
                    covered += n as u64;
                }
                (Step::Status(n), Sink::Status(out)) => {
                    let p = self.recv(n as usize).await.map_err(lost)?;
                    let ctx = self.export.context.unwrap_or(u32::MAX);
                    if let Some(ext) =
                        reply::first_extent(e, ctx, &p, self.export.min_block).map_err(|w| self.broken(e, w))?
                    {
                        if status {
                            return Err(self.broken(e, "two block status chunks for one context".into()));
                        }
                        out.set(Some(ext));
                        status = true;
                    }
                }
                (Step::Error(k, n), _) => {
                    let p = self.recv(n as usize).await.map_err(lost)?;
                    let (code, msg) = reply::error_chunk(k, &p).map_err(|w| self.broken(e, w))?;
                    error.get_or_insert((code, msg));
                }
                (Step::None, _) => {}
                _ => return Err(self.broken(e, format!("an unexpected chunk of type {kind}"))),
            }
            if flags & super::wire::reply::FLAG_DONE != 0 {
                break;
            }
            h = self.recv(16).await.map_err(lost)?;
            if be32(&h) != STRUCTURED_REPLY_MAGIC {
                return Err(self.broken(e, "a chunk without the structured reply magic".into()));
            }
        }
        if let Some((code, msg)) = error {
            return Err(self.failed(e, code, msg));
        }
        match sink {
            Sink::Read(_) if covered != u64::from(e.len) => {
                Err(self.broken(e, format!("the reply covered {covered} of {} bytes", e.len)))
            }
            Sink::Status(_) if !status => Err(self.broken(e, "no block status for base:allocation".into())),
            _ => Ok(()),
        }
    }

    /// The server's error for a request, as a block error.
    fn failed(&self, e: &Expect, code: u32, msg: String) -> BlockError {
        if code == errno::ESHUTDOWN {
            self.state.set(State::Closed);
        }
        let (errno, name) = reply::errno_of(code);
        let msg = if msg.is_empty() {
            String::new()
        } else {
            format!(": {msg}")
        };
        self.remote(
            format!(
                "NBD {} at offset {} length {} failed: {name}{msg}",
                reply::cmd_name(e.cmd),
                e.offset,
                e.len
            ),
            errno,
        )
    }

    /// Sends `NBD_CMD_DISC` (a soft disconnect) when between requests.
    pub fn disconnect(&self) {
        if matches!(self.state.get(), State::Idle | State::Closed) && self.turn.try_lock().is_some() {
            let head = Request {
                flags: 0,
                kind: cmd::DISC,
                cookie: 0,
                offset: 0,
                len: 0,
            }
            .encode();
            // Non-blocking (the descriptor is): 28 bytes fit an idle socket.
            if let Some(raw) = self.raw.borrow_mut().as_mut() {
                let _ = raw.write(&head);
                self.state.set(State::Disconnected);
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.disconnect();
    }
}
