//! `spindle libvirt`: the libvirt domain XML that attaches a running
//! daemon's exports (docs/operations.md, "libvirt").
//!
//! It asks the daemon (`list`, through its control socket) and prints, for
//! each export, a `<disk type='vhostuser'>` element with the
//! `<memoryBacking>` the domain needs, or with `--nbd` a `<disk
//! type='network'>` whose `<source protocol='nbd'>` is the daemon's NBD
//! listener. What goes into them is what libvirt accepts for each kind:
//!
//! - vhostuser: `queues` (one per I/O thread, at most the queues offered),
//!   the unix socket with a reconnect timer of 1 s (so a restarted Spindle
//!   is reconnected to), the target, a user alias. libvirt refuses
//!   `cache`, `io`, `iothread`, `discard`, `detect_zeroes`, `<serial>`,
//!   `<readonly/>`, `<iotune>` and more on a vhostuser disk ("... is not
//!   supported with vhostuser disk", checked at `virsh define`): those are
//!   the backend's business, and Spindle already gives the guest the
//!   export's serial (GET_ID), read-only flag, cache mode and limits.
//! - NBD: the disk goes through QEMU's block layer, so `<serial>`,
//!   `<readonly/>`, `cache='none'` and `discard='unmap'` (not read-only)
//!   apply; `tls='yes'` when the daemon requires TLS (QEMU's client
//!   certificates are libvirt's `nbd_tls_x509_cert_dir`, qemu.conf).

use crate::error::{CliResult, Error};
use crate::img::human_size;
use clap::Args as ClapArgs;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(ClapArgs)]
pub struct Args {
    /// The control socket of `spindle serve --control`.
    #[arg(long, short = 'c', value_name = "PATH")]
    control: PathBuf,
    /// The exports, in this order (default: every export, by name).
    names: Vec<String>,
    /// NBD disks (`<disk type='network'>` on the daemon's --nbd listener)
    /// instead of vhost-user ones.
    #[arg(long)]
    nbd: bool,
    /// The first disk's target device; the next ones follow (vdb, vdc, …).
    #[arg(long, default_value = "vda", value_name = "DEV")]
    target: String,
    /// xml, or json (each element as a string, for management tools).
    #[arg(long, default_value = "xml")]
    output: String,
}

fn invalid(msg: String) -> Error {
    Error::Usage(msg)
}

/// What an export's element is built from.
#[derive(Debug, Clone)]
pub struct Disk {
    /// Export name.
    pub name: String,
    /// Image (for the comment).
    pub image: String,
    /// Format (for the comment).
    pub format: String,
    /// Size in bytes (for the comment).
    pub size: u64,
    /// vhost-user socket.
    pub socket: String,
    /// Queues the guest should use.
    pub queues: usize,
    /// GET_ID serial.
    pub serial: String,
    /// Writes refused.
    pub readonly: bool,
}

/// The daemon's NBD listener, as `list` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdServer {
    /// A unix socket (absolute path).
    Unix {
        /// Its path.
        socket: String,
        /// Clients must start TLS.
        tls: bool,
    },
    /// Host and port.
    Tcp {
        /// Host.
        host: String,
        /// Port.
        port: u16,
        /// Clients must start TLS.
        tls: bool,
    },
}

/// The queues a guest should use: one per I/O thread, at most the
/// queues offered, at least one.
pub fn queues(iothreads: usize, num_queues: u16) -> usize {
    iothreads.min(usize::from(num_queues)).max(1)
}

/// `s` for an XML attribute value or text; characters XML 1.0 cannot
/// carry at all are refused.
fn esc(what: &str, s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            '\t' | '\n' | '\r' => {
                let _ = write!(out, "&#{};", c as u32);
            }
            c if (c as u32) < 0x20 || matches!(c, '\u{fffe}' | '\u{ffff}') => {
                return Err(format!("{what} {s:?} has a character XML cannot carry"));
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Text for an XML comment: printable, and never `--`.
fn comment(s: &str) -> String {
    let mut out: String = spindle_block::printable(s)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    while out.contains("--") {
        out = out.replace("--", "-\u{2010}");
    }
    out.trim_end_matches('-').to_string()
}

/// A user alias (`ua-…`, letters, digits, `_` and `-` only) for export
/// `name`, unique among `taken`.
fn alias(name: &str, taken: &mut Vec<String>) -> String {
    let base: String = format!(
        "ua-spindle-{}",
        name.chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            })
            .collect::<String>()
    );
    let mut a = base.clone();
    let mut n = 2;
    while taken.contains(&a) {
        a = format!("{base}-{n}");
        n += 1;
    }
    taken.push(a.clone());
    a
}

/// The `n`th target after `first` (`vda` + 2 = `vdc`; `vdz` + 1 = `vdaa`),
/// as Linux names virtio disks.
pub fn nth_target(first: &str, n: usize) -> Result<String, String> {
    let letters = first
        .strip_prefix("vd")
        .filter(|l| !l.is_empty() && l.len() <= 3 && l.bytes().all(|b| b.is_ascii_lowercase()))
        .ok_or_else(|| format!("--target {first}: want vd followed by letters (vda, vdb, …, vdaa)"))?;
    // Bijective base 26: a = 1, z = 26, aa = 27.
    let index = letters.bytes().fold(0usize, |v, b| v * 26 + usize::from(b - b'a' + 1)) + n;
    let mut i = index;
    let mut out = Vec::new();
    while i > 0 {
        let r = (i - 1) % 26;
        out.push(b'a' + r as u8);
        i = (i - 1) / 26;
    }
    out.reverse();
    Ok(format!("vd{}", String::from_utf8(out).unwrap_or_default()))
}

/// What the domain needs for vhost-user disks: guest RAM QEMU can share.
pub const MEMORY_BACKING: &str =
    "<memoryBacking>\n  <source type='memfd'/>\n  <access mode='shared'/>\n</memoryBacking>";

fn about(d: &Disk) -> String {
    comment(&format!(
        "spindle export '{}': {} ({}, {}){}",
        d.name,
        d.image,
        d.format,
        human_size(d.size),
        if d.readonly { ", read-only" } else { "" }
    ))
}

/// The `<disk type='vhostuser'>` element of `d` at `target`.
pub fn vhostuser_disk(d: &Disk, target: &str, alias: &str) -> Result<String, String> {
    let sock = esc("socket", &d.socket)?;
    // Spindle gives the guest the serial and read-only flag itself.
    let by_spindle = comment(&format!(
        "serial '{}'{} from Spindle (libvirt takes no serial, readonly, cache or io on a vhostuser disk)",
        d.serial,
        if d.readonly { " and read-only" } else { "" }
    ));
    Ok(format!(
        "<!-- {} -->\n<!-- {by_spindle} -->\n<disk type='vhostuser' device='disk'>\n  <driver name='qemu' type='raw' queues='{}'/>\n  <source type='unix' path='{sock}'>\n    <reconnect enabled='yes' timeout='1'/>\n  </source>\n  <target dev='{}' bus='virtio'/>\n  <alias name='{}'/>\n</disk>",
        about(d),
        d.queues,
        esc("target", target)?,
        esc("alias", alias)?,
    ))
}

/// The `<disk type='network'>` element of `d` on the daemon's NBD
/// listener `server`, at `target`.
pub fn nbd_disk(d: &Disk, server: &NbdServer, target: &str, alias: &str) -> Result<String, String> {
    let (host, tls) = match server {
        NbdServer::Unix { socket, tls } => (
            format!("<host transport='unix' socket='{}'/>", esc("socket", socket)?),
            *tls,
        ),
        NbdServer::Tcp { host, port, tls } => (format!("<host name='{}' port='{port}'/>", esc("host", host)?), *tls),
    };
    // libvirt's schema takes only these in a serial (diskSerial).
    let serial = match !d.serial.is_empty()
        && d.serial
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.+- ".contains(c))
    {
        true => format!("\n  <serial>{}</serial>", esc("serial", &d.serial)?),
        false => format!(
            "\n  <!-- no serial: libvirt takes only letters, digits and _.+- in one, not '{}' -->",
            comment(&d.serial)
        ),
    };
    let (driver, readonly) = match d.readonly {
        true => ("<driver name='qemu' type='raw' cache='none'/>", "\n  <readonly/>"),
        false => ("<driver name='qemu' type='raw' cache='none' discard='unmap'/>", ""),
    };
    Ok(format!(
        "<!-- {} -->\n<disk type='network' device='disk'>\n  {driver}\n  <source protocol='nbd' name='{}'{}>\n    {host}\n  </source>\n  <target dev='{}' bus='virtio'/>{serial}{readonly}\n  <alias name='{}'/>\n</disk>",
        about(d),
        esc("export name", &d.name)?,
        if tls { " tls='yes'" } else { "" },
        esc("target", target)?,
        esc("alias", alias)?,
    ))
}

/// An export of `list`'s reply as a [`Disk`].
fn disk_of(e: &Value) -> Result<Disk, String> {
    let s = |k: &str| {
        e[k].as_str()
            .map(str::to_string)
            .ok_or(format!("`list` gave no {k}: {e}"))
    };
    let n = |k: &str| e[k].as_u64().ok_or(format!("`list` gave no {k}: {e}"));
    Ok(Disk {
        name: s("name")?,
        image: s("image")?,
        format: s("format")?,
        size: n("size")?,
        socket: s("socket")?,
        queues: queues(
            n("iothreads")? as usize,
            n("num_queues")?.min(u64::from(u16::MAX)) as u16,
        ),
        // A daemon from before `serial` was listed: the name is its default.
        serial: s("serial").or_else(|_| s("name"))?,
        readonly: e["readonly"].as_bool().unwrap_or(false),
    })
}

/// `list`'s `nbd`, if the daemon serves NBD.
fn nbd_of(v: &Value) -> Result<Option<NbdServer>, String> {
    let n = &v["nbd"];
    if n.is_null() {
        return Ok(None);
    }
    let tls = n["tls"].as_bool().unwrap_or(false);
    match n["transport"].as_str() {
        Some("unix") => Ok(Some(NbdServer::Unix {
            socket: n["socket"]
                .as_str()
                .ok_or(format!("`list` gave an NBD socket without a path: {n}"))?
                .into(),
            tls,
        })),
        Some("tcp") => Ok(Some(NbdServer::Tcp {
            host: n["host"]
                .as_str()
                .ok_or(format!("`list` gave an NBD address without a host: {n}"))?
                .into(),
            port: n["port"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or(format!("`list` gave an NBD address without a port: {n}"))?,
            tls,
        })),
        _ => Err(format!("`list` gave an NBD listener this spindle does not know: {n}")),
    }
}

/// One export's `<disk>`.
#[derive(Debug, Clone)]
pub struct Element {
    /// The export.
    pub name: String,
    /// Its target device.
    pub target: String,
    /// The element (with a comment before it).
    pub xml: String,
}

/// What `spindle libvirt` prints.
#[derive(Debug, Clone)]
pub struct Elements {
    /// `<memoryBacking>` (vhost-user disks need it).
    pub memory_backing: Option<&'static str>,
    /// The disks.
    pub disks: Vec<Element>,
}

/// libvirt (9.0, Debian 12) writes a vhostuser disk's socket path back
/// without escaping it, in single quotes (`virsh dumpxml`, the domain's
/// saved configuration, and the XML it parses again at `virsh start`),
/// which is no XML with one of these in it: such a domain is defined but
/// never starts (`xmlParseEntityRef: no name`).
const UNESCAPED_BY_LIBVIRT: [char; 3] = ['&', '<', '\''];

/// What `spindle libvirt` prints for `list`'s reply `v`: the memory
/// backing (vhost-user only) and one element per export, in `names`'
/// order (empty: every running export).
pub fn elements(v: &Value, names: &[String], nbd: bool, first: &str) -> Result<Elements, String> {
    let exports = v["exports"].as_array().ok_or(format!("`list` gave no exports: {v}"))?;
    let running: Vec<&Value> = exports.iter().filter(|e| e["state"] == "running").collect();
    let chosen: Vec<&Value> = if names.is_empty() {
        running.clone()
    } else {
        names
            .iter()
            .map(|n| {
                running
                    .iter()
                    .copied()
                    .find(|e| e["name"] == n.as_str())
                    .ok_or_else(|| {
                        let all: Vec<&str> = running.iter().filter_map(|e| e["name"].as_str()).collect();
                        format!("no running export named '{n}' (the daemon serves: {})", all.join(", "))
                    })
            })
            .collect::<Result<_, _>>()?
    };
    if chosen.is_empty() {
        return Err("the daemon serves no export".into());
    }
    let server = match nbd {
        true => Some(nbd_of(v)?.ok_or("the daemon serves no NBD (start it with --nbd ADDR)")?),
        false => None,
    };
    let mut aliases = Vec::new();
    let mut out = Vec::new();
    for (i, e) in chosen.into_iter().enumerate() {
        let d = disk_of(e)?;
        let target = nth_target(first, i)?;
        let a = alias(&d.name, &mut aliases);
        let xml = match &server {
            Some(s) => {
                if !matches!(e.get("nbd"), Some(u) if !u.is_null()) {
                    return Err(format!("export '{}' is not offered over NBD (nbd = false)", d.name));
                }
                nbd_disk(&d, s, &target, &a)?
            }
            None => {
                if d.socket.contains(UNESCAPED_BY_LIBVIRT) {
                    return Err(format!(
                        "export '{}': libvirt cannot start a vhostuser disk on {} (it writes the path back \
                         unescaped: no & < or ' in it); serve the export on another socket, or use --nbd",
                        d.name, d.socket
                    ));
                }
                vhostuser_disk(&d, &target, &a)?
            }
        };
        out.push(Element {
            name: d.name,
            target,
            xml,
        });
    }
    Ok(Elements {
        memory_backing: (!nbd).then_some(MEMORY_BACKING),
        disks: out,
    })
}

/// Runs `spindle libvirt`.
pub fn run(a: Args) -> CliResult<u8> {
    if !matches!(a.output.as_str(), "xml" | "json") {
        return Err(invalid(format!("--output {}: want xml or json", a.output)));
    }
    nth_target(&a.target, 0).map_err(invalid)?;
    let v = crate::ctl::request(&a.control, &crate::protocol::ExportRequest::List {}.into())?;
    if v["ok"] != json!(true) {
        return Err(invalid(format!(
            "control socket {}: {}",
            a.control.display(),
            v["error"].as_str().unwrap_or("list failed")
        )));
    }
    let all = elements(&v, &a.names, a.nbd, &a.target).map_err(invalid)?;
    let mut out = String::new();
    if a.output == "json" {
        let disks: Vec<Value> = all
            .disks
            .iter()
            .map(|d| json!({"name": d.name, "target": d.target, "xml": d.xml}))
            .collect();
        let v = json!({"memory_backing": all.memory_backing, "disks": disks});
        out = serde_json::to_string_pretty(&v).unwrap_or_default();
        out.push('\n');
    } else {
        if let Some(m) = all.memory_backing {
            out.push_str(
                "<!-- in <domain>: guest RAM QEMU shares with Spindle (or <hugepages/> with the same <access>) -->\n",
            );
            out.push_str(m);
            out.push('\n');
        }
        out.push_str("<!-- in <devices>: -->\n");
        for d in &all.disks {
            out.push_str(&d.xml);
            out.push('\n');
        }
    }
    // A reader that goes away early (`| head`) is no error of ours.
    use std::io::Write;
    let _ = std::io::stdout().write_all(out.as_bytes());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk() -> Disk {
        Disk {
            name: "vm1".into(),
            image: "/i/vm1.qcow2".into(),
            format: "qcow2".into(),
            size: 8 << 30,
            socket: "/run/spindle/vm1.sock".into(),
            queues: 2,
            serial: "vm1".into(),
            readonly: false,
        }
    }

    #[test]
    fn targets_count_on_as_linux_names_virtio_disks() {
        assert_eq!(nth_target("vda", 0).unwrap(), "vda");
        assert_eq!(nth_target("vda", 2).unwrap(), "vdc");
        assert_eq!(nth_target("vdz", 1).unwrap(), "vdaa");
        assert_eq!(nth_target("vdb", 26).unwrap(), "vdab");
        assert_eq!(nth_target("vdzz", 1).unwrap(), "vdaaa");
        for bad in ["sda", "vd", "vdA", "vd1", "vdabcd"] {
            assert!(nth_target(bad, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn queues_follow_the_io_threads_within_what_is_offered() {
        assert_eq!(queues(2, 16), 2);
        assert_eq!(queues(8, 4), 4);
        assert_eq!(queues(0, 16), 1);
    }

    #[test]
    fn values_are_escaped_and_comments_never_end_early() {
        let mut d = disk();
        d.socket = "/run/a'b&<c>\".sock".into();
        d.image = "/x--y-->z-".into();
        let x = vhostuser_disk(&d, "vda", "ua-x").unwrap();
        assert!(x.contains("path='/run/a&apos;b&amp;&lt;c&gt;&quot;.sock'"), "{x}");
        let comments: Vec<&str> = x.lines().filter(|l| l.starts_with("<!--")).collect();
        for c in comments {
            let inner = c.strip_prefix("<!--").unwrap().strip_suffix("-->").unwrap();
            assert!(!inner.contains("--") && !inner.ends_with('-'), "{c}");
        }
        d.socket = "/run/\u{1}.sock".into();
        assert!(vhostuser_disk(&d, "vda", "ua-x").is_err());
    }

    #[test]
    fn aliases_are_libvirt_user_aliases_and_unique() {
        let mut taken = Vec::new();
        assert_eq!(alias("vm1", &mut taken), "ua-spindle-vm1");
        assert_eq!(alias("vm.1", &mut taken), "ua-spindle-vm-1");
        assert_eq!(alias("vm-1", &mut taken), "ua-spindle-vm-1-2");
        assert_eq!(alias("vm1", &mut taken), "ua-spindle-vm1-2");
    }

    #[test]
    fn an_nbd_disk_carries_what_qemu_s_block_layer_takes() {
        let mut d = disk();
        let unix = NbdServer::Unix {
            socket: "/run/nbd.sock".into(),
            tls: true,
        };
        let x = nbd_disk(&d, &unix, "vdb", "ua-spindle-vm1").unwrap();
        assert!(x.contains("<source protocol='nbd' name='vm1' tls='yes'>"), "{x}");
        assert!(x.contains("<host transport='unix' socket='/run/nbd.sock'/>"), "{x}");
        assert!(
            x.contains("discard='unmap'") && x.contains("<serial>vm1</serial>"),
            "{x}"
        );
        assert!(!x.contains("<readonly/>"));
        d.readonly = true;
        let tcp = NbdServer::Tcp {
            host: "127.0.0.1".into(),
            port: 10809,
            tls: false,
        };
        d.serial = "a&b".into();
        let x = nbd_disk(&d, &tcp, "vdb", "ua-spindle-vm1").unwrap();
        assert!(x.contains("<host name='127.0.0.1' port='10809'/>"), "{x}");
        assert!(
            !x.contains("<serial>") && x.contains("no serial: libvirt takes only"),
            "{x}"
        );
        assert!(
            x.contains("<readonly/>") && !x.contains("discard") && !x.contains("tls="),
            "{x}"
        );
    }

    #[test]
    fn the_list_reply_picks_exports_by_name_in_order() {
        let e = |name: &str, state: &str| {
            json!({"name": name, "state": state, "image": "/i", "format": "raw", "size": 1u64 << 30,
                   "socket": format!("/run/{name}.sock"), "iothreads": 1, "num_queues": 16,
                   "serial": name, "readonly": false})
        };
        let v = json!({"ok": true, "exports": [e("a", "running"), e("b", "running"), e("c", "stopping")]});
        let all = elements(&v, &[], false, "vda").unwrap();
        assert_eq!(all.memory_backing, Some(MEMORY_BACKING));
        let got: Vec<(&str, &str)> = all.disks.iter().map(|d| (d.name.as_str(), d.target.as_str())).collect();
        assert_eq!(got, [("a", "vda"), ("b", "vdb")]);
        let some = elements(&v, &["b".into(), "a".into()], false, "vdc").unwrap().disks;
        assert_eq!(
            some.iter().map(|d| d.target.as_str()).collect::<Vec<_>>(),
            ["vdc", "vdd"]
        );
        assert!(some[0].xml.contains("path='/run/b.sock'"));
        let err = elements(&v, &["c".into()], false, "vda").unwrap_err();
        assert!(
            err.contains("no running export named 'c'") && err.contains("a, b"),
            "{err}"
        );
        let err = elements(&v, &[], true, "vda").unwrap_err();
        assert!(err.contains("serves no NBD"), "{err}");
    }
}
