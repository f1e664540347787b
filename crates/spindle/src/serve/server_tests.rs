//! Unit tests of `Server`: stuck exports, concurrent changes of one export.

use super::*;
use std::sync::mpsc::RecvTimeoutError;

/// The error of an `add` that must fail.
fn add_err(server: &Server, spec: ExportSpec) -> String {
    match server.add(spec) {
        Ok(_) => panic!("the add must be refused"),
        Err(e) => e.to_string(),
    }
}

fn null(dir: &Path, name: &str, size: &str) -> ExportSpec {
    ExportSpec {
        image: format!("null:{size}"),
        socket: dir.join(format!("{name}.sock")),
        name: Some(name.into()),
        ..Default::default()
    }
}

/// Runs `f` on a thread; fails (instead of hanging) if it takes over `secs`.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(RecvTimeoutError::Timeout) => panic!("did not return within {secs} s"),
        Err(RecvTimeoutError::Disconnected) => panic!("panicked"),
    }
}

#[test]
fn a_stuck_export_neither_hangs_remove_nor_shutdown_and_keeps_its_name() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_owned();
    let server = Arc::new(Server::with_stop_timeout(Duration::from_millis(300)));
    server.add(null(&dir, "stuck", "1M")).unwrap();
    server.add(null(&dir, "fine", "1M")).unwrap();
    // Its stop waits for the gate, as behind a resize on a disk that
    // hangs: it does not end before the test does.
    let gate = server.gate("stuck");
    let _held = lock(&gate);
    let s = server.clone();
    let err = within(20, move || s.remove("stuck")).unwrap_err().to_string();
    assert!(err.contains("'stuck' has not stopped after"), "{err}");
    let list = server.list();
    assert_eq!(
        list.iter().find(|e| e.name == "stuck").map(|e| e.state),
        Some("stopping")
    );
    // The name and the socket stay taken while the old thread may run.
    let again = add_err(&server, null(&dir, "stuck", "1M"));
    assert!(again.contains("still being removed"), "{again}");
    let mut other = null(&dir, "other", "1M");
    other.socket = dir.join("stuck.sock");
    let again = add_err(&server, other);
    assert!(again.contains("already used by export 'stuck'"), "{again}");
    assert!(server
        .remove("stuck")
        .unwrap_err()
        .to_string()
        .contains("already being removed"));
    let s = server.clone();
    let err = within(20, move || s.remove_all()).unwrap_err().to_string();
    assert!(err.contains("'stuck' has not stopped"), "{err}");
    assert!(!dir.join("fine.sock").exists(), "the other export must be stopped");
    assert!(add_err(&server, null(&dir, "late", "1M")).contains("shutting down"));
}

#[test]
fn concurrent_resizes_and_a_remove_of_one_export_are_serialised() {
    let d = tempfile::tempdir().unwrap();
    let server = Arc::new(Server::default());
    server.add(null(d.path(), "e", "1M")).unwrap();
    let sizes: [&'static str; 8] = ["2M", "3M", "4M", "5M", "6M", "7M", "8M", "9M"];
    let threads: Vec<_> = sizes
        .into_iter()
        .map(|size| {
            let s = server.clone();
            std::thread::spawn(move || s.resize("e", size, true))
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    // The published capacity is the size of the last resize to run.
    let (export, _) = server.running("e").unwrap();
    assert_eq!(export.dev.capacity(), export.dev.node().unwrap().size());
    // Resizes racing a remove: each one either ran before it or is told.
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let s = server.clone();
            std::thread::spawn(move || s.resize("e", &format!("{}M", 10 + i), false))
        })
        .collect();
    let s = server.clone();
    within(20, move || s.remove("e")).unwrap();
    for t in threads {
        match t.join().unwrap() {
            Ok((n, _)) => assert!(n >= 10 << 20),
            Err(e) => assert!(
                ["being removed", "no export named 'e'", "pass shrink"]
                    .iter()
                    .any(|w| e.to_string().contains(w)),
                "{e}"
            ),
        }
    }
    assert!(server.list().is_empty());
}

#[test]
fn no_export_is_added_or_removed_while_a_handover_runs() {
    let d = tempfile::tempdir().unwrap();
    let server = Server::default();
    server.add(null(d.path(), "e", "1M")).unwrap();
    let running = server.close_for_handover();
    assert_eq!(running.len(), 1);
    let err = add_err(&server, null(d.path(), "f", "1M"));
    assert!(err.contains("a handover is in progress"), "{err}");
    let err = server.remove("e").unwrap_err().to_string();
    assert!(err.contains("a handover is in progress"), "{err}");
    assert_eq!(server.list().iter().map(|e| e.state).collect::<Vec<_>>(), ["running"]);
    // A handover that failed: both work again.
    server.reopen();
    server.add(null(d.path(), "f", "1M")).unwrap();
    server.remove("e").unwrap();
    server.remove("f").unwrap();
    assert!(server.list().is_empty());
}

#[test]
fn an_export_that_requires_nbd_is_refused_by_a_daemon_without_it() {
    let d = tempfile::tempdir().unwrap();
    let server = Server::default();
    let mut spec = null(d.path(), "n", "1M");
    spec.nbd = Some(true);
    let e = add_err(&server, spec);
    assert!(e.contains("serves no NBD") && e.contains("--nbd"), "{e}");
    assert!(server.list().is_empty(), "nothing was started");
}

#[test]
fn exports_are_offered_over_nbd_unless_they_say_no_and_not_once_it_stopped() {
    use crate::serve::nbd::{NbdFront, NbdOptions};
    let d = tempfile::tempdir().unwrap();
    let server = Server::default();
    let sock = d.path().join("nbd.sock");
    let front = Arc::new(
        NbdFront::start(&NbdOptions {
            addr: crate::nbd_addr::Addr::Unix(sock.clone()),
            tls_creds: None,
            iothreads: 1,
            poll_us: 64,
        })
        .unwrap(),
    );
    server.set_nbd(front.clone());
    let mut no = null(d.path(), "no", "1M");
    no.nbd = Some(false);
    server.add(no).unwrap();
    server.add(null(d.path(), "yes", "1M")).unwrap();
    let nbd_of = |name: &str| server.list().into_iter().find(|e| e.name == name).unwrap().nbd;
    assert_eq!(nbd_of("no"), None);
    assert_eq!(
        nbd_of("yes"),
        Some(format!("nbd+unix:///yes?socket={}", sock.display()))
    );
    // Stopped (a handover went ahead): nothing is offered any more.
    front.stop();
    assert_eq!(nbd_of("yes"), None);
    let mut must = null(d.path(), "must", "1M");
    must.nbd = Some(true);
    assert!(add_err(&server, must).contains("serves no NBD"));
    server.remove_all().unwrap();
}

#[test]
fn an_nbd_poll_window_over_a_second_is_refused_by_name() {
    use crate::serve::nbd::{NbdFront, NbdOptions};
    let d = tempfile::tempdir().unwrap();
    let e = NbdFront::start(&NbdOptions {
        addr: crate::nbd_addr::Addr::Unix(d.path().join("nbd.sock")),
        tls_creds: None,
        iothreads: 1,
        poll_us: 2_000_000,
    })
    .err()
    .expect("a 2 s poll window is refused");
    assert!(e.to_string().contains("nbd_poll_us 2000000"), "{e}");
    assert!(!d.path().join("nbd.sock").exists(), "refused before binding");
}
