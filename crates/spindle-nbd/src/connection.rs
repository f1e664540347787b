//! One client connection: the handshake's socket I/O, then the
//! transmission loop that reads requests and spawns one task per request.
//!
//! The reader owns the receive side; replies go out under one send lock
//! (a reply's chunks are one `sendmsg` each, never interleaved with
//! another reply's bytes). A request is admitted only with credits
//! ([`crate::pool::Credits`]): a client can have at most 64 requests and
//! 64 MiB of payload buffered at once, then its socket simply is not read.

use crate::error::{NbdError, Result};
use crate::export::{Catalog, Export};
use crate::handshake::{self, Negotiation, Step, MAX_OPTION};
use crate::outbox::Outbox;
use crate::pool::{Buf, Credits};
use crate::proto::{Request, REQUEST_LEN};
use crate::tls::{TlsConfig, Wire};
use crate::transmission::{self as tx, Command, Limits};
use spindle_io::net::Socket;
use spindle_io::SgList;
use std::io;
use std::rc::Rc;
use std::sync::Arc;

/// Bytes the reader receives at once (several request headers per call).
const INBOX: usize = 64 << 10;

/// A connection in transmission.
pub(crate) struct Conn {
    pub(crate) wire: Rc<Wire>,
    pub(crate) export: Arc<Export>,
    pub(crate) limits: Limits,
    /// The device statistics lane of this connection's I/O thread.
    pub(crate) lane: usize,
    outbox: Outbox,
    pub(crate) credits: Credits,
}

impl Conn {
    /// Sends the lists back to back as one reply, never interleaved with
    /// another (`outbox`: replies that complete together share a
    /// message). A failed send (the client went away) shuts the socket,
    /// which ends the reader; the other replies then fail the same way.
    pub(crate) async fn send(&self, parts: &[&SgList]) {
        self.outbox.send(&self.wire, SgList::concat(parts)).await
    }

    /// The error reply the negotiated replies allow.
    pub(crate) async fn reply_error(&self, cookie: u64, errno: u32, why: &str) {
        let b = tx::error_reply(cookie, self.limits.structured, errno, why);
        self.send(&[&SgList::copy_unaligned(&b)]).await
    }
}

/// Received bytes not yet consumed, over one buffer.
struct Inbox {
    buf: SgList,
    start: usize,
    end: usize,
}

impl Inbox {
    fn new() -> Inbox {
        Inbox {
            buf: SgList::zeroed(INBOX),
            start: 0,
            end: 0,
        }
    }

    fn available(&self) -> usize {
        self.end - self.start
    }

    /// Receives more; `Ok(false)` at the end of the stream.
    async fn fill(&mut self, sock: &Wire) -> io::Result<bool> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.end == INBOX {
            let rest = self.buf.slice(self.start, self.available()).to_vec();
            self.buf.copy_from(&rest);
            (self.start, self.end) = (0, rest.len());
        }
        let n = sock.recv(&self.buf.slice(self.end, INBOX - self.end)).await?;
        self.end += n;
        Ok(n > 0)
    }

    /// Fills `out`; `Ok(false)` when the stream ended before its first byte.
    async fn read(&mut self, sock: &Wire, out: &mut [u8]) -> io::Result<bool> {
        let mut done = 0;
        while done < out.len() {
            if self.available() == 0 && !self.fill(sock).await? {
                if done == 0 {
                    return Ok(false);
                }
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let n = self.available().min(out.len() - done);
            self.buf.slice(self.start, n).copy_to(&mut out[done..done + n]);
            self.start += n;
            done += n;
        }
        Ok(true)
    }

    /// Fills `sg`: what is here already by copy, the rest straight from the socket.
    async fn read_into(&mut self, sock: &Wire, sg: &SgList) -> io::Result<()> {
        let n = self.available().min(sg.len());
        if n > 0 {
            sg.copy_from(&self.buf.slice(self.start, n).to_vec());
            self.start += n;
        }
        sock.recv_exact(&sg.slice(n, sg.len() - n)).await
    }

    /// Reads and drops `n` bytes (a refused payload), through this buffer.
    async fn skip(&mut self, sock: &Wire, mut n: u64) -> io::Result<()> {
        while n > 0 {
            if self.available() == 0 && !self.fill(sock).await? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let k = (self.available() as u64).min(n);
            self.start += k as usize;
            n -= k;
        }
        Ok(())
    }
}

/// How a connection is served.
#[derive(Clone)]
pub(crate) struct Setup {
    /// What a client may choose from.
    pub(crate) catalog: Arc<Catalog>,
    /// With credentials, TLS is required before anything else.
    pub(crate) tls: Option<TlsConfig>,
    /// The statistics lane (the I/O thread's number).
    pub(crate) lane: usize,
    /// The handshake must be over within this time.
    pub(crate) handshake_limit: std::time::Duration,
}

/// Serves one connection to its end: handshake, then transmission.
pub(crate) async fn serve(sock: Rc<Socket>, setup: Setup) -> Result<()> {
    let mut inbox = Inbox::new();
    let weak = sock.weak_fd();
    let mut wire = Wire::Plain(sock);
    let limit = setup.handshake_limit;
    let exports = setup.catalog.list();
    let negotiated = spindle_io::time::timeout(limit, negotiate(&mut wire, &mut inbox, &exports, setup.tls.as_ref()))
        .await?
        .ok_or_else(|| NbdError::Protocol(format!("handshake not finished within {} s", limit.as_secs_f64())))??;
    let Some((export, limits)) = negotiated else {
        return Ok(());
    };
    if !export.attach(weak) {
        return Err(NbdError::Protocol(format!(
            "export '{}' was removed during the handshake",
            export.settings.name
        )));
    }
    let conn = Rc::new(Conn {
        wire: Rc::new(wire),
        export,
        limits,
        lane: setup.lane,
        outbox: Outbox::default(),
        credits: Credits::default(),
    });
    let r = transmission(&conn, &mut inbox).await;
    // Every request still running finishes and replies (if it can) first.
    conn.credits.drained().await;
    r
}

async fn negotiate(
    wire: &mut Wire,
    inbox: &mut Inbox,
    exports: &[Arc<Export>],
    tls: Option<&TlsConfig>,
) -> Result<Option<(Arc<Export>, Limits)>> {
    wire.send_all(&SgList::copy_unaligned(&handshake::greeting())).await?;
    let mut flags = [0u8; 4];
    if !inbox.read(wire, &mut flags).await? {
        return Ok(None);
    }
    let infos: Vec<_> = exports.iter().map(|e| e.info()).collect();
    let mut neg = Negotiation::new(infos, u32::from_be_bytes(flags))?;
    if tls.is_some() {
        neg.require_tls();
    }
    loop {
        let sock = &*wire;
        let mut hdr = [0u8; 16];
        if !inbox.read(sock, &mut hdr).await? {
            return Ok(None);
        }
        let (option, len) = handshake::option_header(&hdr)?;
        let step = if len > MAX_OPTION {
            inbox.skip(sock, len as u64).await?;
            neg.too_big(option)
        } else {
            let mut data = vec![0u8; len as usize];
            if len > 0 && !inbox.read(sock, &mut data).await? {
                return Ok(None);
            }
            neg.option(option, &data)?
        };
        match step {
            Step::Reply(b) => sock.send_all(&SgList::copy_unaligned(&b)).await?,
            Step::ReplyAndClose(b) => {
                // The client may have gone already (it need not wait for this ACK).
                let _ = sock.send_all(&SgList::copy_unaligned(&b)).await;
                return Ok(None);
            }
            Step::StartTls(b) => {
                sock.send_all(&SgList::copy_unaligned(&b)).await?;
                let cfg = tls.ok_or_else(|| NbdError::Tls("STARTTLS without credentials".into()))?;
                // Bytes past the option already received are the client's
                // first TLS records.
                let early = inbox.buf.slice(inbox.start, inbox.available()).to_vec();
                inbox.start = inbox.end;
                let plain = wire.socket().clone();
                *wire = Wire::start_tls(plain, cfg, &early).await?;
            }
            Step::Transmission(b) => {
                sock.send_all(&SgList::copy_unaligned(&b)).await?;
                let n = neg
                    .negotiated()
                    .ok_or_else(|| NbdError::Protocol("no export chosen".into()))?;
                let export = exports[n.export].clone();
                let info = &neg.exports()[n.export];
                let limits = Limits {
                    size: info.size,
                    read_only: info.read_only,
                    structured: n.structured,
                    contexts: n.contexts,
                    fast_zero: info.fast_zero,
                };
                return Ok(Some((export, limits)));
            }
        }
    }
}

async fn transmission(conn: &Rc<Conn>, inbox: &mut Inbox) -> Result<()> {
    let sock = conn.wire.clone();
    loop {
        // A withdrawn export takes no more requests, even those already
        // received (its clients are being disconnected).
        if conn.export.is_closed() {
            return Ok(());
        }
        let mut hdr = [0u8; REQUEST_LEN];
        match inbox.read(&sock, &mut hdr).await {
            Ok(true) => {}
            // The client left (between requests, or in the middle of one).
            Ok(false) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let Some(req) = Request::decode(&hdr) else {
            // Out of sync: nothing after this can be trusted. Hard disconnect.
            spindle_export::limited!(warn, "NBD client sent a bad request magic; disconnecting");
            sock.shutdown();
            return Err(NbdError::BadMagic {
                what: "request",
                got: u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]) as u64,
            });
        };
        let cmd = match tx::validate(&req, &conn.limits) {
            Ok(c) => c,
            Err(refusal) => {
                // The payload is skipped through the inbox: never held whole.
                if refusal.skip > 0 {
                    if let Err(e) = inbox.skip(&sock, refusal.skip as u64).await {
                        return if e.kind() == io::ErrorKind::UnexpectedEof {
                            Ok(())
                        } else {
                            Err(e.into())
                        };
                    }
                }
                conn.credits.take(0).await;
                conn.reply_error(req.cookie, refusal.errno, refusal.why).await;
                conn.credits.give(0);
                continue;
            }
        };
        let bytes = match cmd {
            Command::Read { len, .. } | Command::Write { len, .. } | Command::Cache { len, .. } => len as u64,
            Command::Disconnect => return Ok(()),
            _ => 0,
        };
        conn.credits.take(bytes).await;
        let payload = match cmd {
            Command::Write { len, .. } => {
                let buf = Buf::get(len as usize);
                if let Err(e) = inbox.read_into(&sock, &buf.sg()).await {
                    conn.credits.give(bytes);
                    return if e.kind() == io::ErrorKind::UnexpectedEof {
                        Ok(())
                    } else {
                        Err(e.into())
                    };
                }
                Some(buf)
            }
            _ => None,
        };
        let c = conn.clone();
        spindle_io::spawn(async move {
            crate::exec::run(c.clone(), req.cookie, cmd, payload).await;
            c.credits.give(bytes);
        })
        .detach();
    }
}
