//! `spindle nbd --tls-creds DIR`: NBD over TLS (STARTTLS, X.509) with
//! libnbd's nbdinfo and QEMU's qemu-img/qemu-io as clients. A client with
//! the CA connects over unix and TCP, reads and writes; a client without
//! TLS, one with another CA, and (with --tls-verify-clients) one without a
//! client certificate are refused. Certificates come from openssl.

mod common;

use common::nbd::{need_tool, NbdServer};
use common::tls::pki;
use common::{ok, p, run, scratch};
use serde_json::Value;
use std::path::Path;

fn nbdinfo(uri: &str) -> std::process::Output {
    run("nbdinfo", &["--json", uri])
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn nbd_over_tls_serves_clients_with_the_ca_and_refuses_the_others() {
    need_tool("nbdinfo");
    need_tool("qemu-io");
    let d = scratch();
    let dir = d.path();
    let (ca, server, client) = pki(dir, "good");
    let (other_ca, _, _) = pki(dir, "other");
    let img = dir.join("disk.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "16M"]);
    ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x3c 0 2M", p(&img)]);

    // Unix socket: libnbd with the CA reads; without TLS, or with another CA, it is refused.
    let sock = dir.join("tls.sock");
    let srv = NbdServer::start(&["-t", "-k", p(&sock), "--tls-creds", p(&server), "-f", "qcow2", p(&img)]);
    assert!(srv.uri.starts_with("nbds+unix://"), "{}", srv.uri);
    let good = format!("nbds+unix:///?socket={}&tls-certificates={}", p(&sock), p(&ca));
    let o = nbdinfo(&good);
    assert!(o.status.success(), "nbdinfo over TLS: {}", text(&o));
    let info: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["exports"][0]["export-size"], 16 << 20, "{info}");
    let o = nbdinfo(&format!("nbd+unix:///?socket={}", p(&sock)));
    assert!(
        !o.status.success() && text(&o).to_lowercase().contains("tls"),
        "a plain client: {}",
        text(&o)
    );
    // A client that trusts another CA refuses the server's certificate
    // (QEMU's client: libnbd 1.14 does not check a unix socket's peer).
    let unix = |ca: &Path| {
        let obj = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", p(ca));
        let opts = format!(
            "driver=nbd,server.type=unix,server.path={},tls-creds=tls0,tls-hostname=localhost",
            p(&sock)
        );
        run("qemu-img", &["info", "--object", &obj, "--image-opts", &opts])
    };
    let o = unix(&ca);
    assert!(o.status.success(), "qemu-img over TLS: {}", text(&o));
    let o = unix(&other_ca);
    assert!(
        !o.status.success() && text(&o).contains("issuer"),
        "a client with another CA connected: {}",
        text(&o)
    );
    // The server keeps serving good clients after the refusals.
    assert!(nbdinfo(&good).status.success());
    assert!(srv.stop(), "spindle nbd did not exit 0");

    // TCP: QEMU's client with tls-creds reads the image and writes to it.
    let srv = NbdServer::start(&["-t", "-p", "0", "--tls-creds", p(&server), "-f", "qcow2", p(&img)]);
    assert!(srv.uri.starts_with("nbds://"), "{}", srv.uri);
    let addr = srv.tcp_addr();
    let (host, port) = addr.rsplit_once(':').unwrap();
    let obj = format!("tls-creds-x509,id=tls0,dir={},endpoint=client", p(&ca));
    let opts = format!("driver=nbd,server.type=inet,server.host={host},server.port={port},tls-creds=tls0");
    let raw = dir.join("copy.raw");
    ok(
        "qemu-img",
        &["convert", "--object", &obj, "--image-opts", &opts, "-O", "raw", p(&raw)],
    );
    ok(
        "qemu-io",
        &[
            "--object",
            &obj,
            "--image-opts",
            &opts,
            "-c",
            "write -P 0x5e 4M 1M",
            "-c",
            "flush",
        ],
    );
    let o = run(
        "qemu-img",
        &[
            "info",
            "--image-opts",
            &format!("driver=nbd,server.type=inet,server.host={host},server.port={port}"),
        ],
    );
    assert!(!o.status.success(), "qemu-img without TLS connected: {}", text(&o));
    assert!(srv.stop());
    // The copy read over TLS is the image as it was before the write.
    ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x3c 0 2M",
            "-c",
            "read -P 0 2M 14M",
            p(&raw),
        ],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x5e 4M 1M",
            "-c",
            "read -P 0x3c 0 2M",
            p(&img),
        ],
    );

    // Client certificates: required with --tls-verify-clients.
    let sock = dir.join("mtls.sock");
    let srv = NbdServer::start(&[
        "-t",
        "-k",
        p(&sock),
        "--tls-creds",
        p(&server),
        "--tls-verify-clients",
        "-r",
        "-f",
        "qcow2",
        p(&img),
    ]);
    let o = nbdinfo(&format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        p(&sock),
        p(&ca)
    ));
    assert!(
        !o.status.success(),
        "a client without a certificate connected: {}",
        text(&o)
    );
    let o = nbdinfo(&format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        p(&sock),
        p(&client)
    ));
    assert!(o.status.success(), "a client with its certificate: {}", text(&o));
    assert!(srv.stop());

    // Bad credentials are refused at start, by name.
    let o = run(
        "spindle",
        &["nbd", "-k", p(&dir.join("x.sock")), "--tls-creds", p(&ca), p(&img)],
    );
    assert!(
        !o.status.success() && text(&o).contains("server-cert.pem"),
        "{}",
        text(&o)
    );
}

#[test]
fn serve_nbd_tls_creds_requires_tls_of_every_nbd_client() {
    need_tool("nbdinfo");
    let d = scratch();
    let dir = d.path();
    let (ca, server, _) = pki(dir, "good");
    let img = dir.join("a.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p(&img), "16M"]);
    let (vsock, nsock) = (dir.join("a.sock"), dir.join("nbd.sock"));
    let nbd = format!("unix:{}", p(&nsock));
    let srv = common::serve::Serve::start(
        dir,
        &[
            p(&img),
            "--vhost-user",
            p(&vsock),
            "--nbd",
            &nbd,
            "--nbd-tls-creds",
            p(&server),
        ],
        &[&vsock, &nsock],
    );
    let good = format!("nbds+unix:///a?socket={}&tls-certificates={}", p(&nsock), p(&ca));
    // The sockets exist before the lines naming them are printed: wait.
    let start = std::time::Instant::now();
    while !srv.log_text().contains(&format!("nbds+unix:///a?socket={}", p(&nsock))) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "{}",
            srv.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let o = nbdinfo(&good);
    assert!(o.status.success(), "nbdinfo over TLS: {}", text(&o));
    let o = nbdinfo(&format!("nbd+unix:///a?socket={}", p(&nsock)));
    assert!(
        !o.status.success() && text(&o).to_lowercase().contains("tls"),
        "a plain client: {}",
        text(&o)
    );
    assert!(srv.stop().success());
}
