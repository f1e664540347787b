//! The client's side of the fixed newstyle handshake, on a blocking
//! socket with timeouts: run at open time (and, for a further thread's
//! connection, on a helper thread), never on an I/O thread's runtime.
//!
//! Options sent: `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT
//! base:allocation` (when structured replies are on), then `NBD_OPT_GO`
//! asking for `NBD_INFO_BLOCK_SIZE` (`NBD_OPT_EXPORT_NAME` for a server
//! that does not know `GO`). Every length the server sends is capped.

use super::stream::Stream;
use super::wire::{self, be16, be32, be64, info, opt, rep, tflag};
use super::NbdUri;
use crate::error::{BlockError, Result};
use std::io::{self, Read, Write};

/// Longest option reply accepted (a string is at most 4096 bytes).
const MAX_OPTION_REPLY: u32 = 16 << 10;
/// Most replies accepted for one option.
const MAX_REPLIES: usize = 256;
/// `cliserv_magic` of the oldstyle handshake.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

/// What the handshake settled about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Export {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Requests are aligned to this (a power of two).
    pub min_block: u32,
    /// Largest `READ`/`WRITE` payload, a multiple of `min_block`.
    pub max_payload: u32,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The `base:allocation` context's id, when selected.
    pub context: Option<u32>,
}

impl Export {
    /// Whether the server offers a transmission flag.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// A handshake failure, named by the URI.
pub(super) fn refused(spec: &str, msg: impl Into<String>) -> BlockError {
    BlockError::Remote {
        uri: spec.to_string(),
        msg: msg.into(),
        errno: libc::EIO,
    }
}

fn io_failed(spec: &str) -> impl FnOnce(io::Error) -> BlockError + '_ {
    move |e| match e.kind() {
        io::ErrorKind::UnexpectedEof => refused(spec, "the server closed the connection during the NBD handshake"),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            refused(spec, "the server did not answer the NBD handshake in time")
        }
        _ => BlockError::Io {
            path: spec.into(),
            context: "NBD handshake failed",
            source: e,
        },
    }
}

struct Haggle<'a> {
    s: &'a mut Stream,
    spec: &'a str,
}

/// One option reply.
struct Reply {
    kind: u32,
    data: Vec<u8>,
}

impl Reply {
    /// The server's message of an error reply, made printable.
    fn message(&self) -> String {
        let m = String::from_utf8_lossy(&self.data);
        crate::printable(m.trim()).into_owned()
    }
}

impl Haggle<'_> {
    fn read<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.s.read_exact(&mut b).map_err(io_failed(self.spec))?;
        Ok(b)
    }

    fn send(&mut self, b: &[u8]) -> Result<()> {
        self.s.write_all(b).map_err(io_failed(self.spec))
    }

    fn option(&mut self, option: u32, data: &[u8]) -> Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b)
    }

    fn reply(&mut self, option: u32) -> Result<Reply> {
        let h: [u8; 20] = self.read()?;
        if be64(&h) != wire::REPLY_MAGIC {
            return Err(refused(self.spec, "bad option reply magic from the NBD server"));
        }
        if be32(&h[8..]) != option {
            return Err(refused(
                self.spec,
                format!("the NBD server answered option {} to option {option}", be32(&h[8..])),
            ));
        }
        let len = be32(&h[16..]);
        if len > MAX_OPTION_REPLY {
            return Err(refused(
                self.spec,
                format!("an option reply of {len} bytes is too long"),
            ));
        }
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).map_err(io_failed(self.spec))?;
        Ok(Reply {
            kind: be32(&h[12..]),
            data,
        })
    }

    /// An error reply that ends the handshake whatever the option.
    fn fatal(&self, r: &Reply) -> Option<BlockError> {
        match r.kind {
            rep::ERR_TLS_REQD => Some(refused(
                self.spec,
                "the NBD server requires TLS, which Spindle's NBD client does not support",
            )),
            rep::ERR_SHUTDOWN => Some(refused(self.spec, "the NBD server is shutting down")),
            _ => None,
        }
    }
}

fn name_field(name: &str) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b
}

/// Runs the handshake on a connected stream; on success the stream is in
/// the transmission phase.
pub fn handshake(s: &mut Stream, uri: &NbdUri, spec: &str) -> Result<Export> {
    if uri.export.len() > wire::MAX_STRING {
        return Err(BlockError::Invalid(format!(
            "'{spec}': the export name is longer than 4096 bytes"
        )));
    }
    let mut h = Haggle { s, spec };
    let head: [u8; 18] = h.read()?;
    if be64(&head) != wire::NBDMAGIC {
        return Err(refused(spec, "not an NBD server (no NBDMAGIC)"));
    }
    match be64(&head[8..]) {
        wire::IHAVEOPT => {}
        OLDSTYLE_MAGIC => return Err(refused(spec, "the server speaks oldstyle NBD, which is not supported")),
        _ => return Err(refused(spec, "bad NBD handshake magic")),
    }
    let sflags = be16(&head[16..]);
    if sflags & wire::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(refused(
            spec,
            "the NBD server does not speak fixed newstyle negotiation",
        ));
    }
    let no_zeroes = sflags & wire::FLAG_NO_ZEROES != 0;
    let cflags = wire::FLAG_C_FIXED_NEWSTYLE | if no_zeroes { wire::FLAG_C_NO_ZEROES } else { 0 };
    h.send(&cflags.to_be_bytes())?;
    let r = haggle(&mut h, uri, no_zeroes);
    if r.is_err() {
        // A soft disconnect, as the protocol asks; no reply is awaited.
        let _ = h.option(opt::ABORT, &[]);
    }
    r
}

/// The options, after the greeting.
fn haggle(h: &mut Haggle, uri: &NbdUri, no_zeroes: bool) -> Result<Export> {
    let spec = h.spec;
    h.option(opt::STRUCTURED_REPLY, &[])?;
    let r = h.reply(opt::STRUCTURED_REPLY)?;
    if let Some(e) = h.fatal(&r) {
        return Err(e);
    }
    let structured = r.kind == rep::ACK;
    let context = if structured {
        set_meta_context(h, &uri.export)?
    } else {
        None
    };
    let (size, flags, blocks) = go(h, &uri.export, no_zeroes)?;
    let (min_block, max_payload) = block_limits(spec, blocks)?;
    if size > i64::MAX as u64 {
        // As QEMU: offsets stay far from overflowing once aligned.
        return Err(refused(spec, format!("the NBD export's size {size} is too large")));
    }
    if flags & tflag::HAS_FLAGS == 0 {
        return Err(refused(spec, "the NBD server's transmission flags lack HAS_FLAGS"));
    }
    Ok(Export {
        size,
        flags,
        min_block,
        max_payload,
        structured,
        context,
    })
}

/// Selects `base:allocation`; its id, or `None` when the server has none.
fn set_meta_context(h: &mut Haggle, export: &str) -> Result<Option<u32>> {
    let mut data = name_field(export);
    data.extend_from_slice(&1u32.to_be_bytes());
    data.extend_from_slice(&name_field(wire::CONTEXT_BASE_ALLOCATION));
    h.option(opt::SET_META_CONTEXT, &data)?;
    let mut id = None;
    for _ in 0..MAX_REPLIES {
        let r = h.reply(opt::SET_META_CONTEXT)?;
        match r.kind {
            rep::ACK => return Ok(id),
            rep::META_CONTEXT if r.data.len() >= 4 => {
                if &r.data[4..] == wire::CONTEXT_BASE_ALLOCATION.as_bytes() {
                    id = Some(be32(&r.data));
                }
            }
            rep::META_CONTEXT => return Err(refused(h.spec, "a metadata context reply is too short")),
            _ => {
                if let Some(e) = h.fatal(&r) {
                    return Err(e);
                }
                // An error (unknown export included): GO says what is wrong.
                return Ok(None);
            }
        }
    }
    Err(refused(h.spec, "too many metadata context replies"))
}

/// `NBD_OPT_GO`: size, transmission flags and the block sizes if sent.
fn go(h: &mut Haggle, export: &str, no_zeroes: bool) -> Result<(u64, u16, Option<[u32; 3]>)> {
    let mut data = name_field(export);
    data.extend_from_slice(&1u16.to_be_bytes());
    data.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    h.option(opt::GO, &data)?;
    let (mut sizes, mut blocks) = (None, None);
    for _ in 0..MAX_REPLIES {
        let r = h.reply(opt::GO)?;
        let item = (r.data.len() >= 2).then(|| be16(&r.data));
        match (r.kind, item, r.data.len()) {
            (rep::ACK, ..) => {
                let (size, flags) = sizes.ok_or_else(|| refused(h.spec, "the NBD server sent no export size"))?;
                return Ok((size, flags, blocks));
            }
            (rep::INFO, Some(info::EXPORT), 12) => sizes = Some((be64(&r.data[2..]), be16(&r.data[10..]))),
            (rep::INFO, Some(info::BLOCK_SIZE), 14) => {
                blocks = Some([be32(&r.data[2..]), be32(&r.data[6..]), be32(&r.data[10..])])
            }
            (rep::INFO, Some(info::EXPORT | info::BLOCK_SIZE), n) => {
                return Err(refused(
                    h.spec,
                    format!("an NBD_INFO reply of {n} bytes has the wrong length"),
                ))
            }
            (rep::INFO, ..) => {} // names, descriptions: not needed
            (rep::ERR_UNSUP, ..) => return export_name(h, export, no_zeroes),
            (rep::ERR_UNKNOWN, ..) => {
                return Err(refused(
                    h.spec,
                    format!(
                        "the NBD server has no export '{}' ({})",
                        crate::printable(export),
                        r.message()
                    ),
                ))
            }
            (k, ..) if k & (1 << 31) != 0 => {
                return Err(h.fatal(&r).unwrap_or_else(|| {
                    refused(
                        h.spec,
                        format!("the NBD server refused the export (error {:#x}: {})", k, r.message()),
                    )
                }))
            }
            (k, ..) => return Err(refused(h.spec, format!("unexpected reply {k} to NBD_OPT_GO"))),
        }
    }
    Err(refused(h.spec, "too many replies to NBD_OPT_GO"))
}

/// The old way into transmission, for servers without `NBD_OPT_GO`.
fn export_name(h: &mut Haggle, export: &str, no_zeroes: bool) -> Result<(u64, u16, Option<[u32; 3]>)> {
    h.option(opt::EXPORT_NAME, export.as_bytes())?;
    let r: [u8; 10] = h.read()?;
    if !no_zeroes {
        let _: [u8; 124] = h.read()?;
    }
    Ok((be64(&r), be16(&r[8..]), None))
}

/// Checks the server's (minimum, preferred, maximum) block sizes; returns
/// the alignment and the largest payload to send.
pub fn block_limits(spec: &str, blocks: Option<[u32; 3]>) -> Result<(u32, u32)> {
    let Some([min, pref, max]) = blocks else {
        return Ok((1, wire::MAX_PAYLOAD));
    };
    let sane = min.is_power_of_two()
        && min <= 64 << 10
        && pref.is_power_of_two()
        && pref >= min
        && max >= min
        && (max % min == 0 || max == u32::MAX);
    if !sane {
        return Err(refused(
            spec,
            format!("the NBD server's block sizes (minimum {min}, preferred {pref}, maximum {max}) are invalid"),
        ));
    }
    let max = max.min(wire::MAX_PAYLOAD);
    Ok((min, max - max % min))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_are_checked_and_capped() {
        assert_eq!(block_limits("u", None).unwrap(), (1, 32 << 20));
        assert_eq!(block_limits("u", Some([512, 4096, u32::MAX])).unwrap(), (512, 32 << 20));
        assert_eq!(block_limits("u", Some([4096, 4096, 1 << 20])).unwrap(), (4096, 1 << 20));
        for bad in [
            [0, 4096, 1 << 20],
            [3, 4096, 1 << 20],
            [512, 256, 1 << 20],
            [4096, 4096, 6000],
            [1 << 20, 1 << 20, 1 << 20],
        ] {
            assert!(
                block_limits("u", Some(bad))
                    .unwrap_err()
                    .to_string()
                    .contains("invalid"),
                "{bad:?}"
            );
        }
    }
}
