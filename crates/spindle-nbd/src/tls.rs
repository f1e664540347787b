//! TLS for NBD (`NBD_OPT_STARTTLS`, X.509): the server's credentials in
//! qemu-nbd's directory layout, and a connection's byte stream, plain or
//! through rustls, on the same per-thread runtime as everything else.
//!
//! The stream is [`Wire`]: the reader (the connection's one receiving
//! task) and the replies (under the connection's send lock) share one
//! rustls session in a `RefCell`, never borrowed across an `.await`;
//! records go to the socket under a lock of their own, so what the
//! reader's processing queues (alerts, key updates) never splits a
//! reply's records.

use crate::error::{NbdError, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use spindle_io::net::Socket;
use spindle_io::SgList;
use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

/// Ciphertext received at once.
const RECORDS: usize = 64 << 10;

/// The server's TLS setup (`--tls-creds DIR`).
#[derive(Clone)]
pub struct TlsConfig(Arc<ServerConfig>);

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig")
    }
}

fn setup(what: String) -> NbdError {
    NbdError::Setup(what)
}

impl TlsConfig {
    /// Reads `DIR/server-cert.pem` (the certificate, then its chain) and
    /// `DIR/server-key.pem`, as qemu-nbd's `tls-creds-x509` does. With
    /// `verify_clients`, a client must present a certificate signed by
    /// `DIR/ca-cert.pem`.
    pub fn from_dir(dir: &Path, verify_clients: bool) -> Result<TlsConfig> {
        let file = |name: &str| dir.join(name);
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(file("server-cert.pem"))
            .and_then(|i| i.collect::<std::result::Result<_, _>>())
            .map_err(|e| setup(format!("{}: {e}", file("server-cert.pem").display())))?;
        if certs.is_empty() {
            return Err(setup(format!(
                "{}: no certificate in it",
                file("server-cert.pem").display()
            )));
        }
        let key = PrivateKeyDer::from_pem_file(file("server-key.pem"))
            .map_err(|e| setup(format!("{}: {e}", file("server-key.pem").display())))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| setup(format!("TLS: {e}")))?;
        let builder = if verify_clients {
            let mut roots = RootCertStore::empty();
            let cas = CertificateDer::pem_file_iter(file("ca-cert.pem"))
                .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| setup(format!("{}: {e}", file("ca-cert.pem").display())))?;
            let (added, _) = roots.add_parsable_certificates(cas);
            if added == 0 {
                return Err(setup(format!(
                    "{}: no CA certificate in it",
                    file("ca-cert.pem").display()
                )));
            }
            let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| setup(format!("client verification: {e}")))?;
            builder.with_client_cert_verifier(v)
        } else {
            builder.with_no_client_auth()
        };
        let cfg = builder
            .with_single_cert(certs, key)
            .map_err(|e| setup(format!("{}: {e}", file("server-key.pem").display())))?;
        Ok(TlsConfig(Arc::new(cfg)))
    }
}

/// A connection's byte stream: the socket, or TLS over it.
pub(crate) enum Wire {
    Plain(Rc<Socket>),
    Tls(Box<Tls>),
}

pub(crate) struct Tls {
    sock: Rc<Socket>,
    conn: RefCell<ServerConnection>,
    records: SgList,
    /// Received ciphertext rustls has not taken yet (it takes only as much
    /// as its plaintext buffer has room for) and how much of it it took.
    pending: RefCell<(Vec<u8>, usize)>,
    out: futures::lock::Mutex<()>,
}

fn tls_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

impl Wire {
    /// The socket underneath.
    pub(crate) fn socket(&self) -> &Rc<Socket> {
        match self {
            Wire::Plain(s) => s,
            Wire::Tls(t) => &t.sock,
        }
    }

    /// Starts TLS on `sock` (after the `STARTTLS` ack) and runs the TLS
    /// handshake; `early` are bytes already received past the option.
    pub(crate) async fn start_tls(sock: Rc<Socket>, cfg: &TlsConfig, early: &[u8]) -> Result<Wire> {
        let conn = ServerConnection::new(cfg.0.clone()).map_err(|e| NbdError::Tls(e.to_string()))?;
        let t = Tls {
            sock,
            conn: RefCell::new(conn),
            records: SgList::zeroed(RECORDS),
            pending: RefCell::new((early.to_vec(), 0)),
            out: futures::lock::Mutex::new(()),
        };
        let tls = |e: io::Error| NbdError::Tls(e.to_string());
        loop {
            let fed = t.feed();
            // An alert for a bad record goes out before the error.
            t.flush().await?;
            fed.map_err(tls)?;
            if !t.conn.borrow().is_handshaking() {
                break;
            }
            if t.pending_empty() && !t.receive().await.map_err(tls)? {
                return Err(NbdError::Tls("the client left during the TLS handshake".into()));
            }
        }
        Ok(Wire::Tls(Box::new(t)))
    }

    /// Receives at most `sg.len()` bytes; 0 at the end of the stream.
    pub(crate) async fn recv(&self, sg: &SgList) -> io::Result<usize> {
        match self {
            Wire::Plain(s) => s.recv(sg).await,
            Wire::Tls(t) => t.recv(sg).await,
        }
    }

    /// Fills `sg`, or fails with `UnexpectedEof`.
    pub(crate) async fn recv_exact(&self, sg: &SgList) -> io::Result<()> {
        match self {
            Wire::Plain(s) => s.recv_exact(sg).await,
            Wire::Tls(t) => {
                let mut done = 0;
                while done < sg.len() {
                    let n = t.recv(&sg.slice(done, sg.len() - done)).await?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    done += n;
                }
                Ok(())
            }
        }
    }

    /// Sends all of `sg`.
    pub(crate) async fn send_all(&self, sg: &SgList) -> io::Result<()> {
        match self {
            Wire::Plain(s) => s.send_all(sg).await,
            Wire::Tls(t) => t.send_all(sg).await,
        }
    }

    /// Shuts the socket (ends the reader and every reply).
    pub(crate) fn shutdown(&self) {
        self.socket().shutdown(std::net::Shutdown::Both);
    }
}

impl Tls {
    fn pending_empty(&self) -> bool {
        let p = self.pending.borrow();
        p.1 == p.0.len()
    }

    /// Hands pending ciphertext to rustls, as much as it takes, and
    /// processes it.
    fn feed(&self) -> io::Result<()> {
        let mut c = self.conn.borrow_mut();
        let mut p = self.pending.borrow_mut();
        while p.1 < p.0.len() && c.wants_read() {
            let (buf, off) = &mut *p;
            let n = c.read_tls(&mut &buf[*off..])?;
            *off += n;
            c.process_new_packets().map_err(tls_err)?;
            if n == 0 {
                break;
            }
        }
        if p.1 == p.0.len() {
            *p = (Vec::new(), 0);
        }
        Ok(())
    }

    /// Receives ciphertext into the pending buffer; `false` at the end of
    /// the stream.
    async fn receive(&self) -> io::Result<bool> {
        let n = self.sock.recv(&self.records).await?;
        if n == 0 {
            return Ok(false);
        }
        let data = self.records.slice(0, n).to_vec();
        self.pending.borrow_mut().0.extend_from_slice(&data);
        Ok(true)
    }

    /// Sends what rustls has queued.
    async fn flush(&self) -> io::Result<()> {
        let _g = self.out.lock().await;
        loop {
            let mut buf = Vec::new();
            {
                let mut c = self.conn.borrow_mut();
                if !c.wants_write() {
                    return Ok(());
                }
                c.write_tls(&mut buf)?;
            }
            self.sock.send_all(&SgList::copy_unaligned(&buf)).await?;
        }
    }

    async fn recv(&self, sg: &SgList) -> io::Result<usize> {
        loop {
            let mut tmp = vec![0u8; sg.len().min(RECORDS)];
            let got = self.conn.borrow_mut().reader().read(&mut tmp);
            match got {
                Ok(n) => {
                    sg.slice(0, n).copy_from(&tmp[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            // At the end of the stream without close_notify: a truncation.
            if self.pending_empty() && !self.receive().await? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let fed = self.feed();
            self.flush().await?;
            fed?;
        }
    }

    async fn send_all(&self, sg: &SgList) -> io::Result<()> {
        let data = sg.to_vec();
        let mut done = 0;
        while done < data.len() {
            let n = self.conn.borrow_mut().writer().write(&data[done..])?;
            done += n;
            self.flush().await?;
        }
        Ok(())
    }
}
