//! NBD URIs, in qemu-img's syntax: `nbd://HOST[:PORT]/NAME`,
//! `nbd+tcp://…` (the same) and `nbd+unix:///NAME?socket=PATH`.

use crate::error::{BlockError, Result};
use std::path::PathBuf;

/// NBD's IANA port, used when a URI names none.
pub const DEFAULT_PORT: u16 = 10809;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A TCP host (a name, an IPv4 address or a bracket-less IPv6 one) and port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix socket.
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where to connect.
    pub address: Address,
    /// The export's name (empty: the server's default export).
    pub export: String,
}

/// Whether `spec` is meant as an NBD URI (so it is never opened as a file).
pub fn is_nbd_spec(spec: &str) -> bool {
    spec.starts_with("nbd:") || spec.starts_with("nbds:") || spec.starts_with("nbd+") || spec.starts_with("nbds+")
}

fn bad(spec: &str, why: impl std::fmt::Display) -> BlockError {
    BlockError::Invalid(format!("'{spec}': {why}"))
}

/// Decodes `%XX` escapes.
fn percent_decode(spec: &str, s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| bad(spec, "a '%' escape needs two hex digits"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad(spec, "the URI decodes to invalid UTF-8"))
}

impl NbdUri {
    /// Parses an NBD URI; errors name the URI and what is wrong with it.
    pub fn parse(spec: &str) -> Result<NbdUri> {
        let (scheme, rest) = spec.split_once("://").ok_or_else(|| {
            bad(
                spec,
                "not an NBD URI (nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH)",
            )
        })?;
        let unix = match scheme {
            "nbd" | "nbd+tcp" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+tcp" | "nbds+unix" => {
                return Err(bad(spec, "TLS (nbds) is not supported by Spindle's NBD client"))
            }
            s => return Err(bad(spec, format!("unknown scheme '{s}' (nbd, nbd+tcp, nbd+unix)"))),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        if rest.contains('#') || query.is_some_and(|q| q.contains('#')) {
            return Err(bad(spec, "NBD URIs take no fragment"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(spec, path)?;
        let mut socket = None;
        for kv in query.into_iter().flat_map(|q| q.split('&')).filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("socket", v)) if unix => socket = Some(percent_decode(spec, v)?),
                _ => return Err(bad(spec, format!("unsupported query parameter '{kv}'"))),
            }
        }
        let address = if unix {
            if !authority.is_empty() {
                return Err(bad(spec, "nbd+unix:// takes no host (nbd+unix:///NAME?socket=PATH)"));
            }
            match socket {
                Some(s) if !s.is_empty() => Address::Unix(PathBuf::from(s)),
                _ => return Err(bad(spec, "nbd+unix:// needs ?socket=PATH")),
            }
        } else {
            Self::tcp(spec, authority)?
        };
        Ok(NbdUri { address, export })
    }

    fn tcp(spec: &str, authority: &str) -> Result<Address> {
        if authority.contains('@') {
            return Err(bad(spec, "NBD URIs take no user name"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| bad(spec, "an IPv6 host needs its closing ']'"))?;
            match after {
                "" => (h, None),
                p => (
                    h,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| bad(spec, "junk after the IPv6 host"))?,
                    ),
                ),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad(spec, "nbd:// needs a host (nbd://HOST[:PORT]/NAME)"));
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(bad(spec, format!("bad port '{p}' (1 to 65535)"))),
            },
        };
        Ok(Address::Tcp {
            host: host.to_string(),
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            address: Address::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    #[test]
    fn qemu_uri_forms_parse() {
        assert_eq!(
            NbdUri::parse("nbd://127.0.0.1:10810/vm1").unwrap(),
            tcp("127.0.0.1", 10810, "vm1")
        );
        assert_eq!(
            NbdUri::parse("nbd://localhost").unwrap(),
            tcp("localhost", DEFAULT_PORT, "")
        );
        assert_eq!(NbdUri::parse("nbd+tcp://h/").unwrap(), tcp("h", DEFAULT_PORT, ""));
        assert_eq!(
            NbdUri::parse("nbd://[::1]:99/a%20b/c").unwrap(),
            tcp("::1", 99, "a b/c")
        );
        assert_eq!(NbdUri::parse("nbd://[::1]/x").unwrap(), tcp("::1", DEFAULT_PORT, "x"));
        assert_eq!(
            NbdUri::parse("nbd+unix:///disk?socket=/run/s%3a.sock").unwrap(),
            NbdUri {
                address: Address::Unix("/run/s:.sock".into()),
                export: "disk".into()
            }
        );
        let u = NbdUri::parse("nbd+unix://?socket=/tmp/s").unwrap();
        assert_eq!((u.address, u.export.as_str()), (Address::Unix("/tmp/s".into()), ""));
    }

    #[test]
    fn bad_uris_say_what_is_wrong() {
        let err = |s: &str| NbdUri::parse(s).unwrap_err().to_string();
        assert!(err("http://x/y").contains("unknown scheme 'http'"));
        assert!(err("nbd+unix:///x").contains("needs ?socket=PATH"));
        assert!(err("nbd+unix:///x?socket=").contains("needs ?socket=PATH"));
        assert!(err("nbd+unix://host/x?socket=/s").contains("takes no host"));
        assert!(err("nbd://h:0/x").contains("bad port '0'"));
        assert!(err("nbd://h:70000/x").contains("bad port '70000'"));
        assert!(err("nbd://h:ab/x").contains("bad port 'ab'"));
        assert!(err("nbd://:10809/x").contains("needs a host"));
        assert!(err("nbd://h/x?socket=/s").contains("unsupported query parameter"));
        assert!(err("nbd://[::1/x").contains("closing ']'"));
        assert!(err("nbd://h/%zz").contains("two hex digits"));
        assert!(err("nbds://h/x").contains("TLS"));
        assert!(err("nbd:h:10809").contains("not an NBD URI"));
        assert!(is_nbd_spec("nbd+unix:///?socket=s") && !is_nbd_spec("disk.qcow2"));
    }
}
