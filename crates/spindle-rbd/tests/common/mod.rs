//! One Ceph test cluster per test binary (tests/ceph/cluster.sh, with
//! cephx: its conf names the admin keyring), started by the first test
//! that asks for it and stopped when the binary exits
//! (an `atexit` handler; the script's `--owner` watcher stops it too if the
//! binary is killed).
#![allow(dead_code)] // Each test binary that includes it uses its own part.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use spindle_rbd::{Cluster, ClusterOptions};

/// A running test cluster.
pub struct TestCluster {
    /// Its directory (removed at exit).
    pub dir: PathBuf,
    /// Its ceph.conf.
    pub conf: PathBuf,
}

static CLUSTER: OnceLock<TestCluster> = OnceLock::new();

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/ceph/cluster.sh")
}

/// Fails (never skips) when a tool the tests need is missing.
fn require_tools() {
    let missing: Vec<&str> = [
        "ceph-mon",
        "ceph-osd",
        "ceph",
        "rbd",
        "monmaptool",
        "ceph-authtool",
        "python3",
    ]
    .into_iter()
    .filter(|t| {
        !Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
    .collect();
    assert!(
        missing.is_empty(),
        "the RBD tests need a Ceph test cluster: {} missing; apt-get install ceph-mon ceph-osd ceph-common \
         (.ci/run does)",
        missing.join(", ")
    );
}

extern "C" fn stop_at_exit() {
    if let Some(c) = CLUSTER.get() {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&c.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .status();
        let _ = std::fs::remove_dir_all(&c.dir);
    }
}

/// The binary's cluster, started on first use.
pub fn cluster() -> &'static TestCluster {
    CLUSTER.get_or_init(|| {
        require_tools();
        // Up to three tries: the monitor's two ports are picked free and
        // bound a moment later, so another cluster starting on this host
        // at the same time (another test run) can take one in between.
        let mut tries = 0;
        let (dir, out, started_in) = loop {
            tries += 1;
            let dir = tempfile::Builder::new()
                .prefix("spindle-ceph.")
                .tempdir()
                .expect("temp dir")
                .keep();
            let t = Instant::now();
            let out = Command::new("bash")
                .arg(script())
                .arg("start")
                .arg(&dir)
                .arg("--cephx")
                .arg("--owner")
                .arg(std::process::id().to_string())
                .stdin(Stdio::null())
                .output()
                .expect("run tests/ceph/cluster.sh");
            if out.status.success() || tries == 3 {
                break (dir, out, t.elapsed());
            }
            eprintln!(
                "tests/ceph/cluster.sh start {} failed (try {tries} of 3): {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let _ = Command::new("bash").arg(script()).arg("stop").arg(&dir).status();
        };
        assert!(
            out.status.success(),
            "tests/ceph/cluster.sh start {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let conf = PathBuf::from(String::from_utf8(out.stdout).expect("utf-8 path").trim());
        // SAFETY: registers a plain `extern "C" fn` with libc, which calls it
        // once at exit(3), after the tests (it only reads the OnceLock, set
        // by then, and runs the stop script).
        let r = unsafe { libc::atexit(stop_at_exit) };
        assert_eq!(r, 0, "atexit");
        eprintln!(
            "ceph test cluster up in {:.2} s: {}",
            started_in.as_secs_f64(),
            conf.display()
        );
        TestCluster { dir, conf }
    })
}

impl TestCluster {
    /// Connection options for this cluster.
    pub fn options(&self) -> ClusterOptions {
        ClusterOptions {
            conf: Some(self.conf.clone()),
            connect_timeout: Some(Duration::from_secs(20)),
            op_timeout: Some(Duration::from_secs(30)),
            ..Default::default()
        }
    }

    /// A new connection.
    pub fn connect(&self) -> Cluster {
        Cluster::connect(&self.options()).expect("connect to the test cluster")
    }

    /// The `rbd:` spec of `image` in pool `rbd` of this cluster.
    pub fn spec(&self, image: &str) -> String {
        format!("rbd:rbd/{image}:conf={}", self.conf.display())
    }

    /// Runs `rbd -c CONF ARGS…`; panics with its stderr on failure.
    pub fn rbd(&self, args: &[&str]) -> Output {
        self.tool("rbd", args)
    }

    /// Runs `ceph -c CONF ARGS…`; panics with its stderr on failure.
    pub fn ceph(&self, args: &[&str]) -> Output {
        self.tool("ceph", args)
    }

    /// The conf's `mon host` value.
    pub fn mon_host(&self) -> String {
        let conf = std::fs::read_to_string(&self.conf).expect("read ceph.conf");
        let line = conf
            .lines()
            .find_map(|l| l.trim().strip_prefix("mon host = "))
            .expect("mon host in ceph.conf");
        line.to_owned()
    }

    fn tool(&self, tool: &str, args: &[&str]) -> Output {
        let out = Command::new("timeout")
            .arg("60")
            .arg(tool)
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run rbd");
        assert!(
            out.status.success(),
            "rbd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

/// A name no other test of the run uses.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}
