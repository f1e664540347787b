//! `spindle serve` processes across planned handovers (SIGUSR2): each new
//! one is started by the one before, so the test process becomes a child
//! subreaper to be able to wait for them.
#![allow(dead_code)]

use super::serve::Serve;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Makes orphaned descendants (a handed-over server whose parent exited)
/// children of this process, so that they can be waited for.
pub fn become_subreaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(
        r,
        0,
        "prctl(PR_SET_CHILD_SUBREAPER): {}",
        std::io::Error::last_os_error()
    );
}

/// A server process known by pid (waited for with waitpid), killed on drop.
pub struct Pid {
    pub pid: i32,
    pub log: PathBuf,
    reaped: bool,
}

impl Pid {
    /// Starts `exe serve ARGS` in `dir`, output to `log`, with `env`.
    // Waited for with waitpid (`wait_within`, and on drop), as the
    // processes a handover starts are.
    #[allow(clippy::zombie_processes)]
    pub fn spawn(exe: &Path, dir: &Path, args: &[&str], log: &Path, env: &[(&str, &str)]) -> Pid {
        let f = std::fs::File::create(log).unwrap();
        let child = Command::new(exe)
            .arg("serve")
            .args(args)
            .current_dir(dir)
            .envs(env.iter().copied())
            .env("SPINDLE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("spawn spindle serve");
        // Waited for with waitpid below, not through `Child`.
        Pid {
            pid: child.id() as i32,
            log: log.to_owned(),
            reaped: false,
        }
    }

    /// A process this one may wait for (a handed-over server, adopted as
    /// an orphan once its parent exited).
    pub fn adopt(pid: i32, log: &Path) -> Pid {
        Pid {
            pid,
            log: log.to_owned(),
            reaped: false,
        }
    }

    /// Sends `sig`.
    pub fn signal(&self, sig: i32) {
        assert!(!self.reaped, "process {} has exited", self.pid);
        // SAFETY: kill(2) on a child (or adopted orphan) not yet reaped.
        unsafe { libc::kill(self.pid, sig) };
    }

    /// Waits at most `limit` for the exit: whether it exited 0.
    pub fn wait_within(&mut self, limit: Duration) -> Option<bool> {
        let start = Instant::now();
        loop {
            let mut status = 0;
            // SAFETY: waitpid on a pid this process may wait for; `status`
            // is a valid out pointer.
            let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
            if r == self.pid {
                self.reaped = true;
                return Some(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
            }
            assert!(r == 0, "waitpid {}: {}", self.pid, std::io::Error::last_os_error());
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        !self.reaped && self.wait_within(Duration::ZERO).is_none()
    }

    /// What the servers printed (a handed-over one writes to the same log).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Pid {
    fn drop(&mut self) {
        if !self.reaped {
            self.signal(libc::SIGKILL);
            let _ = self.wait_within(Duration::from_secs(10));
        }
    }
}

/// The pid named by the `n`th (from 1) "handed over to process N" line.
pub fn handed_to(log: &str, n: usize) -> Option<i32> {
    let line = log
        .lines()
        .filter(|l| l.contains("handed over to process "))
        .nth(n - 1)?;
    let rest = line.split("handed over to process ").nth(1)?;
    rest.split(';').next()?.trim().parse().ok()
}

/// The serving process: the first one (a [`Serve`]) or a later one.
pub enum Spindle {
    First(Serve),
    Next(Pid),
}

impl Spindle {
    pub fn pid(&self) -> i32 {
        match self {
            Spindle::First(s) => s.pid() as i32,
            Spindle::Next(p) => p.pid,
        }
    }

    pub fn signal(&self, sig: i32) {
        match self {
            Spindle::First(s) => s.signal(sig),
            Spindle::Next(p) => p.signal(sig),
        }
    }

    pub fn log_text(&self) -> String {
        match self {
            Spindle::First(s) => s.log_text(),
            Spindle::Next(p) => p.log_text(),
        }
    }

    /// Waits at most `limit` for the exit: whether it exited 0.
    pub fn wait_within(&mut self, limit: Duration) -> Option<bool> {
        match self {
            Spindle::First(s) => s.wait_within(limit).map(|st| st.success()),
            Spindle::Next(p) => p.wait_within(limit),
        }
    }

    /// SIGKILL, and waits for the end.
    pub fn kill(&mut self) {
        match self {
            Spindle::First(s) => s.kill(),
            Spindle::Next(p) => {
                p.signal(libc::SIGKILL);
                let _ = p.wait_within(Duration::from_secs(10));
            }
        }
    }

    /// SIGINT, then waits (at most 60 s): whether it exited 0.
    pub fn stop(&mut self) -> bool {
        self.signal(libc::SIGINT);
        let st = self.wait_within(Duration::from_secs(60));
        assert!(
            st.is_some(),
            "spindle serve did not exit within 60 s of SIGINT:\n{}",
            self.log_text()
        );
        st == Some(true)
    }

    fn log_path(&self) -> PathBuf {
        match self {
            Spindle::First(s) => s.log.clone(),
            Spindle::Next(p) => p.log.clone(),
        }
    }

    /// SIGUSR2, then waits for this process to exit 0 and becomes the new
    /// one. Returns how long the old one took to hand over and exit.
    pub fn hand_over(&mut self, limit: Duration) -> Duration {
        let done = self.log_text().matches("handed over to process ").count();
        let start = Instant::now();
        self.signal(libc::SIGUSR2);
        let st = self.wait_within(limit);
        let took = start.elapsed();
        let log = self.log_text();
        assert_eq!(
            st,
            Some(true),
            "the handover did not end the old process cleanly:\n{log}"
        );
        let pid = handed_to(&log, done + 1).unwrap_or_else(|| panic!("no new pid in the log:\n{log}"));
        *self = Spindle::Next(Pid::adopt(pid, &self.log_path()));
        took
    }
}
