//! `spindle libvirt`: the elements it prints for a running daemon's
//! exports, put into a minimal `<domain>`, are valid libvirt XML
//! (`virt-xml-validate`), pass libvirt's own checks (`virsh define` with
//! the built-in test driver, and with the QEMU driver of a private,
//! unprivileged libvirtd), come back the same from `virsh dumpxml`, and
//! start a TCG guest whose QEMU connects to Spindle.

mod common;

use common::serve::{ctl_at, Serve};
use common::{ok, p, scratch};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Fails, naming the package, when `tool` is missing.
fn need(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || Path::new(tool).is_file();
    assert!(
        found,
        "{tool} is required for this test: install it with `apt-get install -y {package}`"
    );
}

fn need_tools() {
    need("virt-xml-validate", "libvirt-clients");
    // virt-xml-validate runs xmllint.
    need("xmllint", "libxml2-utils");
    need("virsh", "libvirt-clients");
}

/// A minimal domain around what `spindle libvirt --output json` printed.
fn domain(name: &str, printed: &Value) -> String {
    let memory = printed["memory_backing"].as_str().unwrap_or("");
    let disks: Vec<&str> = printed["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["xml"].as_str().unwrap())
        .collect();
    format!(
        "<domain type='qemu'>\n<name>{name}</name>\n<memory unit='MiB'>256</memory>\n<vcpu>1</vcpu>\n{memory}\n\
         <os><type arch='x86_64' machine='pc'>hvm</type></os>\n<devices>\n{}\n</devices>\n</domain>\n",
        disks.join("\n")
    )
}

fn libvirt_json(ctl: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["libvirt", "-c", p(ctl), "--output", "json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&ok("spindle", &args)).unwrap()
}

fn output_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn validate(file: &Path) -> Output {
    Command::new("virt-xml-validate")
        .arg(file)
        .arg("domain")
        .output()
        .unwrap()
}

/// `virsh -c test:///default define FILE`: libvirt's driver-independent
/// checks, with no daemon.
fn test_define(file: &Path) -> Output {
    Command::new("virsh")
        .args(["-c", "test:///default", "define"])
        .arg(file)
        .output()
        .unwrap()
}

/// The daemon: a qcow2 export with two I/O threads and a read-only raw
/// one with a serial of its own, both over NBD too.
struct Daemon {
    serve: Serve,
    ctl: PathBuf,
    socks: [PathBuf; 2],
}

fn daemon(d: &Path) -> Daemon {
    let (a, b) = (d.join("a.qcow2"), d.join("b.raw"));
    ok("spindle", &["img", "create", "-f", "qcow2", p(&a), "64M"]);
    std::fs::File::create(&b).unwrap().set_len(32 << 20).unwrap();
    let socks = [d.join("a.sock"), d.join("b.sock")];
    let (ctl, nbd) = (d.join("ctl.sock"), d.join("nbd.sock"));
    let cfg = d.join("spindle.toml");
    std::fs::write(
        &cfg,
        format!(
            "control = {:?}\nnbd = \"unix:{}\"\n\n[[export]]\nname = \"root\"\nimage = {:?}\nsocket = {:?}\niothreads = 2\n\n\
             [[export]]\nname = \"data.1\"\nimage = {:?}\nsocket = {:?}\nreadonly = true\nserial = \"SP-0001.a+b\"\n",
            p(&ctl),
            p(&nbd),
            p(&a),
            p(&socks[0]),
            p(&b),
            p(&socks[1])
        ),
    )
    .unwrap();
    let mut serve = Serve::start(d, &["--config", p(&cfg)], &[&socks[0], &socks[1]]);
    serve.use_control(&ctl);
    Daemon { serve, ctl, socks }
}

#[test]
fn the_printed_elements_validate_and_pass_libvirt_s_checks() {
    need_tools();
    let dir = scratch();
    let d = dir.path();
    let s = daemon(d);

    // vhost-user: the memory backing and both disks, in a domain.
    let v = libvirt_json(&s.ctl, &[]);
    assert!(
        v["memory_backing"]
            .as_str()
            .unwrap()
            .contains("<access mode='shared'/>"),
        "{v}"
    );
    let disks = v["disks"].as_array().unwrap();
    let names: Vec<&str> = disks.iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["data.1", "root"], "{v}");
    let root = disks[1]["xml"].as_str().unwrap();
    assert!(root.contains("<driver name='qemu' type='raw' queues='2'/>"), "{root}");
    assert!(
        root.contains(&format!("<source type='unix' path='{}'>", p(&s.socks[0]))),
        "{root}"
    );
    assert!(root.contains("<reconnect enabled='yes' timeout='1'/>"), "{root}");
    assert!(root.contains("<target dev='vdb' bus='virtio'/>"), "{root}");
    let data = disks[0]["xml"].as_str().unwrap();
    assert!(data.contains("<alias name='ua-spindle-data-1'/>"), "{data}");
    // libvirt refuses these on a vhostuser disk; Spindle gives them itself.
    assert!(!data.contains("<serial>") && !data.contains("<readonly/>"), "{data}");
    assert!(
        data.contains("serial 'SP-0001.a+b' and read-only from Spindle"),
        "{data}"
    );
    let vhost = d.join("vhost.xml");
    std::fs::write(&vhost, domain("spindle-vhost", &v)).unwrap();
    let o = validate(&vhost);
    assert!(o.status.success(), "virt-xml-validate:\n{}", output_text(&o));
    let o = test_define(&vhost);
    assert!(o.status.success(), "virsh define:\n{}", output_text(&o));

    // The same disks with what libvirt refuses there: the schema lets it
    // through, libvirt's checks do not, so `define` is the check that
    // matters (and it bites).
    let bad = d.join("bad.xml");
    let text = std::fs::read_to_string(&vhost).unwrap();
    std::fs::write(&bad, text.replacen("</disk>", "<serial>x</serial></disk>", 1)).unwrap();
    assert!(validate(&bad).status.success());
    let o = test_define(&bad);
    assert!(
        !o.status.success() && output_text(&o).contains("serial is not supported with vhostuser disk"),
        "{}",
        output_text(&o)
    );
    // Without shared memory the QEMU driver refuses vhost-user (below).
    let no_mem = d.join("nomem.xml");
    std::fs::write(
        &no_mem,
        domain("spindle-nomem", &serde_json::json!({"disks": v["disks"]})),
    )
    .unwrap();

    // NBD: no memory backing; QEMU's block layer takes serial, read-only,
    // cache and discard.
    let n = libvirt_json(&s.ctl, &["--nbd", "--target", "vdc", "root", "data.1"]);
    assert!(n["memory_backing"].is_null(), "{n}");
    let nd = n["disks"].as_array().unwrap();
    let (root, data) = (nd[0]["xml"].as_str().unwrap(), nd[1]["xml"].as_str().unwrap());
    assert!(root.contains("<source protocol='nbd' name='root'>"), "{root}");
    assert!(
        root.contains(&format!("<host transport='unix' socket='{}'/>", p(&d.join("nbd.sock")))),
        "{root}"
    );
    assert!(
        root.contains("discard='unmap'") && root.contains("<target dev='vdc'"),
        "{root}"
    );
    assert!(
        data.contains("<serial>SP-0001.a+b</serial>") && data.contains("<readonly/>"),
        "{data}"
    );
    assert!(
        data.contains("<target dev='vdd'") && !data.contains("discard="),
        "{data}"
    );
    let nbd = d.join("nbd.xml");
    std::fs::write(&nbd, domain("spindle-nbd", &n)).unwrap();
    let o = validate(&nbd);
    assert!(o.status.success(), "virt-xml-validate:\n{}", output_text(&o));
    let o = test_define(&nbd);
    assert!(o.status.success(), "virsh define:\n{}", output_text(&o));

    // A socket path libvirt cannot start a vhostuser disk on (libvirt 9.0
    // writes it back unescaped, then cannot parse its own XML): refused,
    // naming it; over NBD the export is fine.
    let odd = d.join("c&'d.sock");
    let img = d.join("c.raw");
    std::fs::File::create(&img).unwrap().set_len(1 << 20).unwrap();
    let r = ctl_at(
        &s.ctl,
        &serde_json::json!({"cmd": "add", "export": {"image": p(&img), "socket": p(&odd), "name": "odd&1",
                                                     "serial": "S&P<1>"}}),
    );
    assert_eq!(r["ok"], true, "{r}");
    let o = common::run("spindle", &["libvirt", "-c", p(&s.ctl), "odd&1"]);
    assert!(
        !o.status.success() && output_text(&o).contains("libvirt cannot start a vhostuser disk on"),
        "{}",
        output_text(&o)
    );
    // Over NBD: the name escaped, and no serial (libvirt takes none with
    // & or < in it).
    let x = libvirt_json(&s.ctl, &["--nbd", "odd&1"]);
    let xml = x["disks"][0]["xml"].as_str().unwrap();
    assert!(
        xml.contains("<source protocol='nbd' name='odd&amp;1'>") && !xml.contains("<serial>"),
        "{xml}"
    );
    let odd_nbd = d.join("odd.xml");
    std::fs::write(&odd_nbd, domain("spindle-odd", &x)).unwrap();
    let o = validate(&odd_nbd);
    assert!(o.status.success(), "virt-xml-validate:\n{}", output_text(&o));
    let o = test_define(&odd_nbd);
    assert!(o.status.success(), "virsh define:\n{}", output_text(&o));
    let r = ctl_at(&s.ctl, &serde_json::json!({"cmd": "remove", "name": "odd&1"}));
    assert_eq!(r["ok"], true, "{r}");

    // Refusals name the problem.
    let o = common::run("spindle", &["libvirt", "-c", p(&s.ctl), "nope"]);
    assert!(!o.status.success() && output_text(&o).contains("no running export named 'nope'"));
    let o = common::run("spindle", &["libvirt", "-c", p(&s.ctl), "--target", "sda"]);
    assert!(!o.status.success() && output_text(&o).contains("--target sda"));

    qemu_driver(d, &s, &vhost, &nbd, &no_mem);
    assert!(s.serve.stop().success());
}

/// A libvirtd of its own, unprivileged (session mode, as `nobody`, in a
/// scratch directory): no system state is touched, and its QEMUs run TCG.
struct Libvirtd {
    child: Option<Child>,
    home: PathBuf,
}

const NOBODY: &str = "65534";

impl Libvirtd {
    /// Starts it with `qemu_conf` lines added to its qemu.conf.
    fn start(dir: &Path, qemu_conf: &str) -> Libvirtd {
        need("/usr/sbin/libvirtd", "libvirt-daemon libvirt-daemon-driver-qemu");
        need(
            "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so",
            "libvirt-daemon-driver-qemu",
        );
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(euid, 0, "this test runs libvirtd as nobody: run it as root");
        let home = dir.join("libvirt-home");
        for sub in ["run", "config/libvirt", "cache"] {
            std::fs::create_dir_all(home.join(sub)).unwrap();
        }
        // QEMU's output into files (no virtlogd to start and stop).
        std::fs::write(
            home.join("config/libvirt/qemu.conf"),
            format!("stdio_handler = \"file\"\n{qemu_conf}"),
        )
        .unwrap();
        ok("chown", &["-R", "65534:65534", p(&home)]);
        ok("chmod", &["700", p(&home.join("run"))]);
        let log = std::fs::File::create(dir.join("libvirtd.log")).unwrap();
        let child = Libvirtd::as_nobody(&home, "/usr/sbin/libvirtd")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let l = Libvirtd {
            child: Some(child),
            home,
        };
        let start = Instant::now();
        while !l.home.join("run/libvirt/libvirt-sock").exists() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "libvirtd did not start:\n{}",
                std::fs::read_to_string(dir.join("libvirtd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        l
    }

    /// `cmd` as nobody with the session's environment only.
    fn as_nobody(home: &Path, cmd: &str) -> Command {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--"])
            .arg(cmd)
            .env_clear()
            .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
            .env("HOME", home)
            .env("XDG_RUNTIME_DIR", home.join("run"))
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env("XDG_CACHE_HOME", home.join("cache"));
        c
    }

    fn virsh(&self, args: &[&str]) -> Output {
        Libvirtd::as_nobody(&self.home, "virsh")
            .args(["-c", "qemu:///session"])
            .args(args)
            .output()
            .unwrap()
    }

    fn virsh_ok(&self, args: &[&str]) -> String {
        let o = self.virsh(args);
        assert!(o.status.success(), "virsh {args:?}:\n{}", output_text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// A file nobody can read: `text` in the session's home.
    fn file(&self, name: &str, text: &str) -> String {
        let f = self.home.join(name);
        std::fs::write(&f, text).unwrap();
        ok("chown", &["65534:65534", p(&f)]);
        p(&f).to_string()
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        // Its QEMUs first (a failed assertion may leave one running).
        for dom in ["spindle-vhost", "spindle-nbd", "spindle-tls"] {
            let _ = self.virsh(&["destroy", dom]);
        }
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the pid of a child this process spawned
            // (setpriv execs libvirtd in its own process).
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while c.try_wait().ok().flatten().is_none() && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The disk elements of a domain's XML (`<disk …>` to `</disk>`).
fn disk_elements(xml: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find("<disk ") {
        let end = rest[i..].find("</disk>").expect("a closed disk") + i + "</disk>".len();
        out.push(rest[i..end].to_string());
        rest = &rest[end..];
    }
    out
}

/// Waits until `list` says `want` of the daemon's exports.
fn wait_list(ctl: &Path, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let l = ctl_at(ctl, &serde_json::json!({"cmd": "list"}));
        if want(&l) {
            return l;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{what}: {l}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn qemu_driver(d: &Path, s: &Daemon, vhost: &Path, nbd: &Path, no_mem: &Path) {
    common::need("qemu-system-x86_64");
    // libvirtd and its QEMUs run as nobody: they must reach their home
    // and the sockets.
    ok("chmod", &["755", p(d)]);
    let lv = Libvirtd::start(d, "");
    for sock in s.socks.iter().chain([&d.join("nbd.sock")]) {
        ok("chmod", &["666", p(sock)]);
    }

    // The QEMU driver's own checks: vhost-user needs shared memory.
    let f = lv.file("nomem.xml", &std::fs::read_to_string(no_mem).unwrap());
    let o = lv.virsh(&["define", &f]);
    assert!(
        !o.status.success() && output_text(&o).contains("'vhostuser' requires shared memory"),
        "{}",
        output_text(&o)
    );

    for (file, dom) in [(vhost, "spindle-vhost"), (nbd, "spindle-nbd")] {
        let text = std::fs::read_to_string(file).unwrap();
        let f = lv.file(&format!("{dom}.xml"), &text);
        lv.virsh_ok(&["define", &f]);
        // Round trip: every element comes back with what was given (libvirt
        // adds a PCI address, and snapshot='no' to a vhostuser disk).
        let back = lv.virsh_ok(&["dumpxml", dom]);
        let (given, got) = (disk_elements(&text), disk_elements(&back));
        assert_eq!(given.len(), got.len(), "{back}");
        for (g, b) in given.iter().zip(&got) {
            for line in g
                .lines()
                .map(str::trim)
                .filter(|l| !l.starts_with("<disk ") && !l.is_empty())
            {
                assert!(b.contains(line), "{line:?} did not come back:\n{b}");
            }
        }
        if dom == "spindle-vhost" {
            assert!(
                back.contains("<memoryBacking>") && back.contains("<access mode='shared'/>"),
                "{back}"
            );
        }
    }

    // The vhost-user domain starts (TCG): its QEMU connects to both
    // exports and negotiates; then it goes.
    let before = wait_list(&s.ctl, "list", |_| true);
    lv.virsh_ok(&["start", "spindle-vhost"]);
    let l = wait_list(&s.ctl, "QEMU did not connect to both exports", |l| {
        l["exports"].as_array().unwrap().iter().all(|e| e["connected"] == true)
    });
    for (e, b) in l["exports"]
        .as_array()
        .unwrap()
        .iter()
        .zip(before["exports"].as_array().unwrap())
    {
        assert!(e["connections"].as_u64() > b["connections"].as_u64(), "{e}");
    }
    lv.virsh_ok(&["destroy", "spindle-vhost"]);
    wait_list(&s.ctl, "QEMU did not go", |l| {
        l["exports"].as_array().unwrap().iter().all(|e| e["connected"] == false)
    });

    // The NBD domain: its QEMU opens both exports over NBD.
    lv.virsh_ok(&["start", "spindle-nbd"]);
    wait_list(&s.ctl, "QEMU did not connect over NBD", |l| {
        l["exports"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["nbd_connections"].as_u64() >= Some(1))
    });
    lv.virsh_ok(&["destroy", "spindle-nbd"]);
    for dom in ["spindle-vhost", "spindle-nbd"] {
        lv.virsh_ok(&["undefine", dom]);
    }
}

/// An NBD disk on a daemon that listens on TCP and requires TLS: the
/// element names the host, the port bound and `tls='yes'`, validates, and
/// a QEMU that libvirt gives client certificates (qemu.conf's
/// `nbd_tls_x509_cert_dir`) opens the export through it.
#[test]
fn an_nbd_disk_over_tcp_with_tls_starts_under_libvirt() {
    need_tools();
    common::need("qemu-system-x86_64");
    let dir = scratch();
    let d = dir.path();
    let (_, server, client) = common::tls::pki(d, "lv");
    let img = d.join("t.raw");
    std::fs::File::create(&img).unwrap().set_len(16 << 20).unwrap();
    let (sock, ctl) = (d.join("t.sock"), d.join("ctl.sock"));
    let s = Serve::start(
        d,
        &[
            p(&img),
            "--vhost-user",
            p(&sock),
            "--control",
            p(&ctl),
            "--nbd",
            "127.0.0.1:0",
            "--nbd-tls-creds",
            p(&server),
        ],
        &[&sock],
    );
    let v = libvirt_json(&ctl, &["--nbd"]);
    let xml = v["disks"][0]["xml"].as_str().unwrap();
    let port = ctl_at(&ctl, &serde_json::json!({"cmd": "list"}))["nbd"]["port"]
        .as_u64()
        .unwrap();
    assert!(port > 0);
    assert!(xml.contains("<source protocol='nbd' name='t' tls='yes'>"), "{xml}");
    assert!(
        xml.contains(&format!("<host name='127.0.0.1' port='{port}'/>")),
        "{xml}"
    );
    let file = d.join("tls.xml");
    std::fs::write(&file, domain("spindle-tls", &v)).unwrap();
    let o = validate(&file);
    assert!(o.status.success(), "virt-xml-validate:\n{}", output_text(&o));
    let o = test_define(&file);
    assert!(o.status.success(), "virsh define:\n{}", output_text(&o));

    ok("chmod", &["755", p(d)]);
    let certs = d.join("libvirt-certs");
    std::fs::create_dir_all(&certs).unwrap();
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(client.join(f), certs.join(f)).unwrap();
    }
    ok("chown", &["-R", "65534:65534", p(&certs)]);
    let lv = Libvirtd::start(d, &format!("nbd_tls_x509_cert_dir = \"{}\"\n", p(&certs)));
    let f = lv.file("tls.xml", &std::fs::read_to_string(&file).unwrap());
    lv.virsh_ok(&["define", &f]);
    lv.virsh_ok(&["start", "spindle-tls"]);
    wait_list(&ctl, "QEMU did not connect over NBD with TLS", |l| {
        l["exports"][0]["nbd_connections"].as_u64() >= Some(1)
    });
    lv.virsh_ok(&["destroy", "spindle-tls"]);
    lv.virsh_ok(&["undefine", "spindle-tls"]);
    drop(lv);
    assert!(s.stop().success());
}
