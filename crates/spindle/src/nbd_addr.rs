//! Where an NBD server listens (`spindle nbd -k/-b/-p`, `spindle serve
//! --nbd`), and the URIs and QEMU options that reach it.

use crate::error::{CliResult, Error};
use std::os::fd::OwnedFd;
use std::path::PathBuf;

fn invalid(msg: String) -> Error {
    Error::Usage(msg)
}

/// Where NBD clients connect.
#[derive(Debug, Clone)]
pub enum Addr {
    /// Host and port.
    Tcp(String, u16),
    /// A unix socket.
    Unix(PathBuf),
}

impl Addr {
    /// The NBD URI (`nbds…` with TLS).
    pub fn uri(&self, name: &str, tls: bool) -> String {
        let s = if tls { "s" } else { "" };
        match self {
            Addr::Tcp(h, p) if h.contains(':') => format!("nbd{s}://[{h}]:{p}/{name}"),
            Addr::Tcp(h, p) => format!("nbd{s}://{h}:{p}/{name}"),
            Addr::Unix(path) => format!("nbd{s}+unix:///{name}?socket={}", path.display()),
        }
    }
    pub fn blockdev(&self, name: &str) -> String {
        let server = match self {
            Addr::Tcp(h, p) => format!("server.type=inet,server.host={h},server.port={p}"),
            Addr::Unix(path) => format!("server.type=unix,server.path={}", path.display()),
        };
        let export = if name.is_empty() {
            String::new()
        } else {
            format!(",export={name}")
        };
        format!("-blockdev driver=nbd,node-name=nbd0,{server}{export}")
    }
}

impl Addr {
    /// Parses `--nbd`: `unix:PATH` or a path with a `/` (a unix socket),
    /// else `HOST:PORT` (`[V6]:PORT` for IPv6; port 0: any free port).
    pub fn parse(s: &str) -> CliResult<Addr> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Addr::Unix(PathBuf::from(p)));
        }
        if s.contains('/') {
            return Ok(Addr::Unix(PathBuf::from(s)));
        }
        let bad = || {
            invalid(format!(
                "--nbd {s}: expected HOST:PORT, [IPV6]:PORT, unix:PATH or a socket path"
            ))
        };
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if host.is_empty() || host.contains(':') && !s.starts_with('[') {
            return Err(bad());
        }
        Ok(Addr::Tcp(host.to_string(), port.parse().map_err(|_| bad())?))
    }

    /// The address as [`Addr::parse`] reads it back.
    pub fn spelling(&self) -> String {
        match self {
            Addr::Tcp(h, p) if h.contains(':') => format!("[{h}]:{p}"),
            Addr::Tcp(h, p) => format!("{h}:{p}"),
            Addr::Unix(path) => format!("unix:{}", path.display()),
        }
    }

    /// Binds and listens. A stale unix socket of a dead server is
    /// replaced; a live one is an error. The TCP port is the one bound
    /// (port 0 picks a free one).
    pub fn bind(&self) -> CliResult<(OwnedFd, Addr)> {
        match self {
            Addr::Unix(path) => {
                if path.exists() {
                    if std::os::unix::net::UnixStream::connect(path).is_ok() {
                        return Err(invalid(format!(
                            "{}: a server is listening there already",
                            path.display()
                        )));
                    }
                    std::fs::remove_file(path).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
                }
                let l = spindle_io::listen_unix(path)
                    .map_err(Error::system(format!("cannot listen on {}", path.display())))?;
                Ok((l.into(), self.clone()))
            }
            Addr::Tcp(host, port) => {
                let l = std::net::TcpListener::bind((host.as_str(), *port))
                    .map_err(Error::system(format!("cannot listen on {host}:{port}")))?;
                let bound = l.local_addr().map(|s| s.port()).unwrap_or(*port);
                Ok((l.into(), Addr::Tcp(host.clone(), bound)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Addr;

    #[test]
    fn nbd_addresses_parse_as_documented() {
        let tcp = |s: &str| match Addr::parse(s) {
            Ok(Addr::Tcp(h, p)) => Some((h, p)),
            _ => None,
        };
        assert_eq!(tcp("127.0.0.1:10809"), Some(("127.0.0.1".into(), 10809)));
        assert_eq!(tcp("[::1]:0"), Some(("::1".into(), 0)));
        assert_eq!(tcp("localhost:7"), Some(("localhost".into(), 7)));
        assert!(matches!(Addr::parse("unix:nbd.sock"), Ok(Addr::Unix(p)) if p.to_str() == Some("nbd.sock")));
        assert!(matches!(Addr::parse("/run/x.sock"), Ok(Addr::Unix(_))));
        for a in ["127.0.0.1:5", "[::1]:6", "unix:/x/y.sock"] {
            assert_eq!(Addr::parse(a).unwrap().spelling(), a);
        }
        for bad in ["10809", "host:", ":80", "host:99999", "::1:80", "h:x"] {
            assert!(Addr::parse(bad).is_err(), "{bad}");
        }
    }
}
