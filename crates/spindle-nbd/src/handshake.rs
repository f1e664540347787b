//! The fixed newstyle handshake as a state machine over bytes: no socket
//! here. The connection feeds it each option (number and data) and sends
//! what it answers, so a fuzz target can drive it directly and TLS can
//! later wrap the stream underneath without touching it.

use crate::error::{NbdError, Result};
use crate::proto::{self, be16, be32, be64, info, opt, rep, tflag, MAX_STRING};

/// Longest option data read into memory (64 KiB: a name, a description
/// request or metadata queries fit many times). Longer options are
/// skipped unread and answered `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION: u32 = 64 << 10;

/// What the handshake knows of one export.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    /// Name (`""` is the default export).
    pub name: String,
    /// For humans (`NBD_INFO_DESCRIPTION`, `NBD_OPT_LIST`).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub multi_conn: bool,
    /// `qemu:allocation-depth` is offered.
    pub allocation_depth: bool,
    /// `NBD_CMD_FLAG_FAST_ZERO` is offered.
    pub fast_zero: bool,
}

impl ExportInfo {
    /// Transmission flags for a client with or without structured replies.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_FUA | tflag::SEND_CACHE;
        if self.read_only {
            f |= tflag::READ_ONLY;
        } else {
            f |= tflag::SEND_TRIM | tflag::SEND_WRITE_ZEROES;
            if self.fast_zero {
                f |= tflag::SEND_FAST_ZERO;
            }
        }
        if self.multi_conn {
            f |= tflag::CAN_MULTI_CONN;
        }
        if structured {
            f |= tflag::SEND_DF;
        }
        f
    }
}

/// Selected metadata contexts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Contexts {
    /// `base:allocation`.
    pub base: bool,
    /// `qemu:allocation-depth`.
    pub depth: bool,
}

impl Contexts {
    /// Context id of `base:allocation`.
    pub const BASE_ID: u32 = 1;
    /// Context id of `qemu:allocation-depth`.
    pub const DEPTH_ID: u32 = 2;

    /// Whether none is selected.
    pub fn is_empty(&self) -> bool {
        !self.base && !self.depth
    }
}

/// What the connection does after an option.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send these bytes and read the next option.
    Reply(Vec<u8>),
    /// Send these bytes, then close (`NBD_OPT_ABORT`).
    ReplyAndClose(Vec<u8>),
    /// Send these bytes and enter transmission.
    Transmission(Vec<u8>),
    /// Send these bytes (the `STARTTLS` ack), then run the TLS handshake;
    /// the negotiation goes on over TLS.
    StartTls(Vec<u8>),
}

/// Where the connection stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// The server has no credentials: `STARTTLS` is refused.
    Off,
    /// TLS is required and not started: only `STARTTLS` and `ABORT` are
    /// answered (`NBD_REP_ERR_TLS_REQD`), `EXPORT_NAME` disconnects.
    Required,
    /// TLS runs.
    Active,
}

/// The outcome of a finished handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Index of the chosen export.
    pub export: usize,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Metadata contexts selected for that export.
    pub contexts: Contexts,
}

/// The server's greeting: magic, `IHAVEOPT` and the handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&proto::NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Decodes an option header: the option and its data length.
pub fn option_header(b: &[u8; 16]) -> Result<(u32, u32)> {
    let magic = be64(b);
    if magic != proto::IHAVEOPT {
        return Err(NbdError::BadMagic {
            what: "option",
            got: magic,
        });
    }
    Ok((be32(&b[8..12]), be32(&b[12..16])))
}

/// One connection's negotiation.
#[derive(Debug)]
pub struct Negotiation {
    exports: Vec<ExportInfo>,
    no_zeroes: bool,
    structured: bool,
    /// Export name and contexts of the last `SET_META_CONTEXT`.
    meta: Option<(String, Contexts)>,
    done: Option<Negotiated>,
    tls: Tls,
}

/// A reader over option data that never reads past its end.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(be16)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(be32)
    }
    /// A u32-length-prefixed string of at most [`MAX_STRING`] bytes.
    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        self.take(n)
    }
}

fn err(option: u32, kind: u32, msg: &str) -> Step {
    Step::Reply(proto::option_reply(option, kind, msg.as_bytes()))
}

impl Negotiation {
    /// A negotiation over these exports, after the client sent `flags`.
    /// Unknown client flags end the connection, as the spec requires.
    pub fn new(exports: Vec<ExportInfo>, client_flags: u32) -> Result<Negotiation> {
        let known = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES;
        if client_flags & !known != 0 {
            return Err(NbdError::ClientFlags(client_flags));
        }
        Ok(Negotiation {
            exports,
            no_zeroes: client_flags & proto::FLAG_C_NO_ZEROES != 0,
            structured: false,
            meta: None,
            done: None,
            tls: Tls::Off,
        })
    }

    /// Requires TLS before anything else (the server has credentials).
    pub fn require_tls(&mut self) {
        self.tls = Tls::Required;
    }

    /// Where the negotiation stands with TLS.
    pub fn tls(&self) -> Tls {
        self.tls
    }

    /// The outcome, once a step said [`Step::Transmission`].
    pub fn negotiated(&self) -> Option<Negotiated> {
        self.done
    }

    /// The exports offered, as announced (in the order given).
    pub fn exports(&self) -> &[ExportInfo] {
        &self.exports
    }

    fn find(&self, name: &[u8]) -> Option<usize> {
        self.exports.iter().position(|e| e.name.as_bytes() == name)
    }

    /// The answer to an option whose data was too long to read
    /// (the connection skipped it).
    pub fn too_big(&self, option: u32) -> Step {
        err(option, rep::ERR_TOO_BIG, "option data too long")
    }

    /// Answers one option. An `Err` means a hard disconnect
    /// (`NBD_OPT_EXPORT_NAME` of an unknown export).
    pub fn option(&mut self, option: u32, data: &[u8]) -> Result<Step> {
        if self.tls == Tls::Required {
            return Ok(match option {
                opt::ABORT => Step::ReplyAndClose(proto::option_reply(option, rep::ACK, &[])),
                opt::STARTTLS if !data.is_empty() => err(option, rep::ERR_INVALID, "STARTTLS takes no data"),
                opt::STARTTLS => {
                    self.tls = Tls::Active;
                    Step::StartTls(proto::option_reply(option, rep::ACK, &[]))
                }
                // No reply is possible: the spec's answer is to disconnect.
                opt::EXPORT_NAME => {
                    return Err(NbdError::Protocol(
                        "EXPORT_NAME before STARTTLS on a TLS-only server".into(),
                    ))
                }
                _ => err(
                    option,
                    rep::ERR_TLS_REQD,
                    "this server requires TLS: send STARTTLS first",
                ),
            });
        }
        Ok(match option {
            opt::EXPORT_NAME => return self.export_name(data),
            opt::ABORT => Step::ReplyAndClose(proto::option_reply(option, rep::ACK, &[])),
            opt::LIST => self.list(data),
            opt::STARTTLS if self.tls == Tls::Active => err(option, rep::ERR_INVALID, "TLS is running already"),
            opt::STARTTLS => err(option, rep::ERR_POLICY, "TLS is not configured on this server"),
            opt::INFO | opt::GO => self.info(option, data),
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    err(option, rep::ERR_INVALID, "STRUCTURED_REPLY takes no data")
                } else {
                    self.structured = true;
                    Step::Reply(proto::option_reply(option, rep::ACK, &[]))
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => self.meta_context(option, data),
            _ => err(option, rep::ERR_UNSUP, "unknown option"),
        })
    }

    fn export_name(&mut self, data: &[u8]) -> Result<Step> {
        let Some(i) = self.find(data) else {
            return Err(NbdError::UnknownExport(String::from_utf8_lossy(data).into_owned()));
        };
        let e = &self.exports[i];
        let mut b = Vec::with_capacity(134);
        b.extend_from_slice(&e.size.to_be_bytes());
        b.extend_from_slice(&e.transmission_flags(self.structured).to_be_bytes());
        if !self.no_zeroes {
            b.extend_from_slice(&[0u8; 124]);
        }
        self.finish(i);
        Ok(Step::Transmission(b))
    }

    fn list(&self, data: &[u8]) -> Step {
        if !data.is_empty() {
            return err(opt::LIST, rep::ERR_INVALID, "LIST takes no data");
        }
        let mut out = Vec::new();
        for e in &self.exports {
            let mut d = Vec::new();
            d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
            d.extend_from_slice(e.name.as_bytes());
            d.extend_from_slice(e.description.as_bytes());
            out.extend(proto::option_reply(opt::LIST, rep::SERVER, &d));
        }
        out.extend(proto::option_reply(opt::LIST, rep::ACK, &[]));
        Step::Reply(out)
    }

    fn info(&mut self, option: u32, data: &[u8]) -> Step {
        let mut c = Cursor(data);
        let parsed = (|| {
            let name = c.string()?;
            let n = c.u16()? as usize;
            let items: Vec<u16> = (0..n).map(|_| c.u16()).collect::<Option<_>>()?;
            c.0.is_empty().then_some((name, items))
        })();
        let Some((name, items)) = parsed else {
            return err(option, rep::ERR_INVALID, "malformed INFO/GO data");
        };
        let Some(i) = self.find(name) else {
            return err(option, rep::ERR_UNKNOWN, "no such export");
        };
        let e = &self.exports[i];
        let mut out = Vec::new();
        let mut item = |kind: u16, body: &[u8]| {
            let mut d = kind.to_be_bytes().to_vec();
            d.extend_from_slice(body);
            out.extend(proto::option_reply(option, rep::INFO, &d));
        };
        let mut export = e.size.to_be_bytes().to_vec();
        export.extend_from_slice(&e.transmission_flags(self.structured).to_be_bytes());
        item(info::EXPORT, &export);
        if items.contains(&info::NAME) {
            item(info::NAME, e.name.as_bytes());
        }
        if items.contains(&info::DESCRIPTION) && !e.description.is_empty() {
            item(info::DESCRIPTION, e.description.as_bytes());
        }
        let mut bs = Vec::new();
        for v in [1, proto::PREFERRED_BLOCK, proto::MAX_PAYLOAD] {
            bs.extend_from_slice(&v.to_be_bytes());
        }
        item(info::BLOCK_SIZE, &bs);
        out.extend(proto::option_reply(option, rep::ACK, &[]));
        if option == opt::GO {
            self.finish(i);
            Step::Transmission(out)
        } else {
            Step::Reply(out)
        }
    }

    fn finish(&mut self, export: usize) {
        let name = &self.exports[export].name;
        let contexts = match &self.meta {
            Some((n, c)) if n == name => *c,
            _ => Contexts::default(),
        };
        self.done = Some(Negotiated {
            export,
            structured: self.structured,
            contexts,
        });
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) -> Step {
        if !self.structured {
            return err(option, rep::ERR_INVALID, "negotiate structured replies first");
        }
        let list = option == opt::LIST_META_CONTEXT;
        let mut c = Cursor(data);
        let parsed = (|| {
            let name = c.string()?;
            let n = c.u32()?;
            let mut queries = Vec::new();
            for _ in 0..n {
                queries.push(c.string()?);
            }
            c.0.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            return err(option, rep::ERR_INVALID, "malformed metadata context data");
        };
        let Some(i) = self.find(name) else {
            return err(option, rep::ERR_UNKNOWN, "no such export");
        };
        let depth_offered = self.exports[i].allocation_depth;
        let mut sel = Contexts::default();
        if list && queries.is_empty() {
            sel = Contexts {
                base: true,
                depth: depth_offered,
            };
        }
        for q in &queries {
            match *q {
                b"base:allocation" => sel.base = true,
                b"base:" if list => sel.base = true,
                b"qemu:allocation-depth" => sel.depth |= depth_offered,
                b"qemu:" if list => sel.depth |= depth_offered,
                _ => {}
            }
        }
        let mut out = Vec::new();
        let mut reply = |id: u32, name: &str| {
            let mut d = (if list { 0 } else { id }).to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            out.extend(proto::option_reply(option, rep::META_CONTEXT, &d));
        };
        if sel.base {
            reply(Contexts::BASE_ID, proto::CONTEXT_BASE_ALLOCATION);
        }
        if sel.depth {
            reply(Contexts::DEPTH_ID, proto::CONTEXT_ALLOCATION_DEPTH);
        }
        out.extend(proto::option_reply(option, rep::ACK, &[]));
        if !list {
            self.meta = Some((self.exports[i].name.clone(), sel));
        }
        Step::Reply(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export() -> ExportInfo {
        ExportInfo {
            name: "disk".into(),
            description: "a disk".into(),
            size: 1 << 20,
            read_only: false,
            multi_conn: true,
            allocation_depth: true,
            fast_zero: true,
        }
    }

    /// Splits concatenated option replies into (option, type, data).
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            assert_eq!(be64(b), proto::REPLY_MAGIC);
            let len = be32(&b[16..]) as usize;
            out.push((be32(&b[8..]), be32(&b[12..]), b[20..20 + len].to_vec()));
            b = &b[20 + len..];
        }
        out
    }

    #[test]
    fn a_tls_only_server_answers_only_starttls_and_abort_before_tls() {
        let mut n = Negotiation::new(vec![export()], proto::FLAG_C_FIXED_NEWSTYLE).unwrap();
        n.require_tls();
        for o in [
            opt::LIST,
            opt::INFO,
            opt::GO,
            opt::STRUCTURED_REPLY,
            opt::SET_META_CONTEXT,
            99,
        ] {
            let Ok(Step::Reply(b)) = n.option(o, &go_data("disk", &[])) else {
                panic!("option {o}: not a reply")
            };
            assert_eq!(replies(&b)[0].1, rep::ERR_TLS_REQD, "option {o}");
        }
        assert!(
            n.option(opt::EXPORT_NAME, b"disk").is_err(),
            "EXPORT_NAME before TLS must disconnect"
        );
        let Ok(Step::Reply(b)) = n.option(opt::STARTTLS, b"x") else {
            panic!()
        };
        assert_eq!(replies(&b)[0].1, rep::ERR_INVALID);
        assert!(matches!(n.option(opt::STARTTLS, &[]), Ok(Step::StartTls(_))));
        assert_eq!(n.tls(), Tls::Active);
        // Over TLS: a second STARTTLS is invalid; the rest works.
        let Ok(Step::Reply(b)) = n.option(opt::STARTTLS, &[]) else {
            panic!()
        };
        assert_eq!(replies(&b)[0].1, rep::ERR_INVALID);
        assert!(matches!(
            n.option(opt::GO, &go_data("disk", &[])),
            Ok(Step::Transmission(_))
        ));
        // A server without credentials refuses STARTTLS by policy.
        let mut n = Negotiation::new(vec![export()], proto::FLAG_C_FIXED_NEWSTYLE).unwrap();
        let Ok(Step::Reply(b)) = n.option(opt::STARTTLS, &[]) else {
            panic!()
        };
        assert_eq!(replies(&b)[0].1, rep::ERR_POLICY);
    }

    fn go_data(name: &str, items: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(items.len() as u16).to_be_bytes());
        items.iter().for_each(|i| d.extend_from_slice(&i.to_be_bytes()));
        d
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[test]
    fn unknown_client_flags_and_bad_option_magic_end_the_connection() {
        assert!(Negotiation::new(vec![export()], 4).is_err());
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(&proto::NBDMAGIC.to_be_bytes());
        assert!(option_header(&h).is_err());
    }

    #[test]
    fn unknown_options_get_unsup_and_parsing_goes_on() {
        let mut n = Negotiation::new(vec![export()], 3).unwrap();
        let Step::Reply(b) = n.option(99, b"whatever").unwrap() else {
            panic!()
        };
        assert_eq!(replies(&b)[0].1, rep::ERR_UNSUP);
        let Step::Transmission(b) = n.option(opt::GO, &go_data("disk", &[])).unwrap() else {
            panic!()
        };
        let r = replies(&b);
        assert_eq!(r[0].1, rep::INFO);
        assert_eq!(be16(&r[0].2), info::EXPORT);
        assert_eq!(be64(&r[0].2[2..]), 1 << 20);
        assert_eq!(r.last().unwrap().1, rep::ACK);
    }

    #[test]
    fn go_on_an_unknown_export_and_malformed_go_are_errors_not_disconnects() {
        let mut n = Negotiation::new(vec![export()], 1).unwrap();
        let Step::Reply(b) = n.option(opt::GO, &go_data("nope", &[])).unwrap() else {
            panic!()
        };
        assert_eq!(replies(&b)[0].1, rep::ERR_UNKNOWN);
        let mut bad = go_data("disk", &[1]);
        bad.push(0);
        let Step::Reply(b) = n.option(opt::GO, &bad).unwrap() else {
            panic!()
        };
        assert_eq!(replies(&b)[0].1, rep::ERR_INVALID);
        // A name length past the data.
        let Step::Reply(b) = n.option(opt::INFO, &[0, 0, 0x10, 0]).unwrap() else {
            panic!()
        };
        assert_eq!(replies(&b)[0].1, rep::ERR_INVALID);
        assert!(n.option(opt::EXPORT_NAME, b"nope").is_err());
    }

    #[test]
    fn meta_contexts_need_structured_replies_and_follow_the_export() {
        let mut n = Negotiation::new(vec![export()], 1).unwrap();
        let set = meta_data("disk", &["base:allocation", "qemu:allocation-depth", "x-y:z"]);
        let Step::Reply(b) = n.option(opt::SET_META_CONTEXT, &set).unwrap() else {
            panic!()
        };
        assert_eq!(replies(&b)[0].1, rep::ERR_INVALID);
        n.option(opt::STRUCTURED_REPLY, &[]).unwrap();
        let Step::Reply(b) = n.option(opt::LIST_META_CONTEXT, &meta_data("disk", &[])).unwrap() else {
            panic!()
        };
        let r = replies(&b);
        assert_eq!(r.len(), 3);
        assert_eq!(&r[1].2[4..], proto::CONTEXT_ALLOCATION_DEPTH.as_bytes());
        let Step::Reply(b) = n.option(opt::SET_META_CONTEXT, &set).unwrap() else {
            panic!()
        };
        let r = replies(&b);
        assert_eq!((r.len(), be32(&r[0].2)), (3, Contexts::BASE_ID));
        n.option(opt::GO, &go_data("disk", &[])).unwrap();
        let got = n.negotiated().unwrap();
        assert!(got.structured && got.contexts.base && got.contexts.depth);
    }

    #[test]
    fn export_name_answers_size_flags_and_maybe_zeroes() {
        for (flags, len) in [(1u32, 134), (3, 10)] {
            let mut n = Negotiation::new(vec![export()], flags).unwrap();
            let Step::Transmission(b) = n.option(opt::EXPORT_NAME, b"disk").unwrap() else {
                panic!()
            };
            assert_eq!(b.len(), len);
            assert_eq!(be64(&b), 1 << 20);
            assert_eq!(be16(&b[8..]) & tflag::SEND_DF, 0, "no DF without structured replies");
        }
    }
}
