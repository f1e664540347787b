//! `spindle ctl`: a client of the control socket (docs/control.md). Its
//! subcommands are the control requests themselves (`crate::protocol`).

use crate::error::{CliResult, Error};
use crate::protocol::Request;
use clap::Args as ClapArgs;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

#[derive(ClapArgs)]
pub struct Args {
    /// The control socket of `spindle serve --control`.
    #[arg(long, short = 'c', value_name = "PATH")]
    control: PathBuf,
    #[command(subcommand)]
    req: Request,
}

/// Sends one request; prints the reply as JSON. Exit 1 when it failed.
pub fn run(a: Args) -> CliResult<u8> {
    let reply = request(&a.control, &a.req)?;
    println!("{}", serde_json::to_string_pretty(&reply).unwrap_or_default());
    if reply["ok"] == Value::Bool(true) {
        Ok(0)
    } else {
        eprintln!("spindle: ctl: {}", reply["error"].as_str().unwrap_or("request failed"));
        Ok(1)
    }
}

/// How long `spindle ctl` waits for a reply: longer than the server's
/// longest wait (a remove waits up to 75 s for an export to stop).
pub const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// One request, one reply (whether it says `ok` or not).
pub fn request(path: &Path, req: &Request) -> CliResult<Value> {
    let peer = || format!("control socket {}", path.display());
    let err = |e: std::io::Error| Error::peer(peer(), e);
    let mut s = UnixStream::connect(path).map_err(err)?;
    s.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(err)?;
    writeln!(s, "{}", req.to_json()).map_err(err)?;
    let mut line = String::new();
    match BufReader::new(&s).read_line(&mut line) {
        Ok(0) => return Err(Error::peer(peer(), "closed without a reply")),
        Ok(_) => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            return Err(Error::peer(
                peer(),
                format!("no reply within {} s", REPLY_TIMEOUT.as_secs()),
            ))
        }
        Err(e) => return Err(err(e)),
    }
    serde_json::from_str(&line).map_err(|e| Error::peer(peer(), format!("bad reply: {e}")))
}
