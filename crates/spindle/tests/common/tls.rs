//! Test certificates for NBD over TLS, made with openssl.

use super::{ok, p, run};
use std::path::{Path, PathBuf};

/// A CA in `dir/NAME-ca` and, signed by it, a server certificate (for
/// localhost and 127.0.0.1) in `dir/NAME-server` and a client certificate
/// in `dir/NAME-client`, each directory laid out as QEMU and libnbd want
/// it (ca-cert.pem, server-cert.pem/-key.pem, client-cert.pem/-key.pem).
pub fn pki(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    assert!(
        run("openssl", &["version"]).status.success(),
        "openssl is required for this test: apt-get install -y openssl"
    );
    let ca = dir.join(format!("{name}-ca"));
    let server = dir.join(format!("{name}-server"));
    let client = dir.join(format!("{name}-client"));
    for d in [&ca, &server, &client] {
        std::fs::create_dir_all(d).unwrap();
    }
    let cak = ca.join("ca-key.pem");
    let cac = ca.join("ca-cert.pem");
    ok(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            p(&cak),
            "-out",
            p(&cac),
            "-days",
            "2",
        ]
        .into_iter()
        .chain(["-subj", &format!("/CN=Spindle test CA {name}")])
        .collect::<Vec<_>>(),
    );
    let sign = |out: &Path, cn: &str, ext: &str| {
        let key = out.join(format!("{cn}-key.pem"));
        let csr = out.join(format!("{cn}.csr"));
        let extf = out.join(format!("{cn}.ext"));
        std::fs::write(&extf, ext).unwrap();
        ok(
            "openssl",
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                p(&key),
                "-out",
                p(&csr),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        ok(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                p(&csr),
                "-CA",
                p(&cac),
                "-CAkey",
                p(&cak),
                "-CAcreateserial",
                "-out",
                p(&out.join(format!("{cn}-cert.pem"))),
                "-days",
                "2",
                "-extfile",
                p(&extf),
            ],
        );
        std::fs::copy(&cac, out.join("ca-cert.pem")).unwrap();
    };
    sign(
        &server,
        "server",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    );
    sign(
        &client,
        "client",
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
    );
    (ca, server, client)
}
