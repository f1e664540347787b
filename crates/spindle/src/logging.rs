//! The process's log: `tracing` events on stderr, one line each, with the
//! journal's conventions, behind a filter the control socket can change
//! while the daemon runs (`spindle ctl trace`, docs/operations.md).
//!
//! - No colours and no time stamps (the journal, or whatever reads
//!   stderr, stamps lines itself); a line break inside an event is written
//!   as `\n`, so every event is exactly one line.
//! - When stderr is the journal (`JOURNAL_STREAM` names its device and
//!   inode, as systemd sets it), each line starts with its syslog priority
//!   (`<4>` for a warning; systemd-journald's `SyslogLevelPrefix=`).
//! - The filter is `SPINDLE_LOG` (`EnvFilter` directives, default `warn`)
//!   plus whatever `trace` added; `trace off` goes back to `SPINDLE_LOG`.
//!   A named trace event ([`spindle_io::trace`]) shows its target.

use std::sync::{Mutex, OnceLock};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// The variable with the start-up filter.
pub const ENV: &str = "SPINDLE_LOG";
/// The filter when `SPINDLE_LOG` is unset.
pub const DEFAULT: &str = "warn";

/// The reloadable filter and the directives it was built from.
struct Filter {
    handle: reload::Handle<EnvFilter, Registry>,
    /// `SPINDLE_LOG`, as it parsed (the default when unset or invalid).
    base: String,
    /// What `trace` added to it (empty: nothing).
    extra: Mutex<String>,
}

static FILTER: OnceLock<Filter> = OnceLock::new();

/// Whether file descriptor `fd` is the stream `JOURNAL_STREAM` names
/// (`DEVICE:INODE`, as systemd passes it).
fn is_journal(fd: i32) -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: `stat` is plain integers; all zeroes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes into the valid, writable `st`; a closed
    // descriptor fails, which is checked.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    st.st_dev as u64 == dev && st.st_ino as u64 == ino
}

/// Whether stdout is the journal: then `spindle serve` leaves out its
/// multi-line attach hints (`spindle libvirt` prints them on request).
pub fn stdout_is_journal() -> bool {
    is_journal(libc::STDOUT_FILENO)
}

/// The syslog priority of a level (journald reads it from a `<N>` prefix).
fn priority(l: &Level) -> u8 {
    match *l {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// One line per event: `tracing_subscriber`'s compact default (level,
/// then fields) for ordinary lines, the target too for named trace
/// events, a priority prefix for the journal.
struct Line {
    inner: format::Format<format::Full, ()>,
    journal: bool,
}

thread_local! {
    static BUF: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let meta = event.metadata();
        BUF.with(|b| {
            let mut b = b.borrow_mut();
            b.clear();
            let mut line = Writer::new(&mut *b);
            if spindle_io::trace::TARGETS.iter().any(|t| t.0 == meta.target()) {
                write!(line, "{:>5} {}: ", meta.level(), meta.target())?;
                ctx.format_fields(line.by_ref(), event)?;
            } else {
                self.inner.format_event(ctx, line.by_ref(), event)?;
            }
            let text = b.trim_end_matches('\n');
            if self.journal {
                write!(w, "<{}>", priority(meta.level()))?;
            }
            // One event, one line: breaks inside it are spelled out.
            for (i, part) in text.split('\n').enumerate() {
                if i > 0 {
                    w.write_str("\\n")?;
                }
                w.write_str(part)?;
            }
            w.write_char('\n')
        })
    }
}

/// Sets up the process's subscriber. Call once, first thing in `main`.
pub fn init() {
    use tracing_subscriber::prelude::*;
    let (filter, base) = match std::env::var(ENV) {
        Ok(s) => match EnvFilter::try_new(&s) {
            Ok(f) => (f, s),
            Err(e) => {
                eprintln!("spindle: {ENV}={s:?} is not a filter ({e}); using {DEFAULT:?}");
                (EnvFilter::new(DEFAULT), DEFAULT.to_string())
            }
        },
        Err(_) => (EnvFilter::new(DEFAULT), DEFAULT.to_string()),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .event_format(Line {
            inner: format::format().with_ansi(false).with_target(false).without_time(),
            journal: is_journal(libc::STDERR_FILENO),
        });
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        // The rust-vmm crates' lines (a frontend can trigger them) get the
        // same rate limit as the data plane's own.
        .with(spindle_export::LibraryLogs::default())
        .try_init();
    if installed.is_ok() {
        let _ = FILTER.set(Filter {
            handle,
            base,
            extra: Mutex::new(String::new()),
        });
    }
}

/// What the log filter is now: the start-up filter and what `trace` added.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Current {
    /// The whole filter in force.
    pub filter: String,
    /// `SPINDLE_LOG` (or the default).
    pub base: String,
    /// What was added at run time (empty: nothing).
    pub trace: String,
}

fn combined(base: &str, extra: &str) -> String {
    match (base.is_empty(), extra.is_empty()) {
        (_, true) => base.to_string(),
        (true, false) => extra.to_string(),
        (false, false) => format!("{base},{extra}"),
    }
}

/// The filter in force, if this process set one up ([`init`]).
pub fn current() -> Option<Current> {
    let f = FILTER.get()?;
    let extra = f.extra.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Some(Current {
        filter: combined(&f.base, &extra),
        base: f.base.clone(),
        trace: extra,
    })
}

/// Adds `directives` (`EnvFilter` syntax: `spindle::qcow2::alloc=debug`,
/// comma-separated) to the start-up filter, replacing what an earlier call
/// added; `off` (or nothing) goes back to the start-up filter. Takes effect
/// at once, on every thread.
pub fn set_trace(directives: &str) -> Result<Current, String> {
    let f = FILTER
        .get()
        .ok_or("this process's log filter cannot be changed (it did not set up its own log)")?;
    let d = directives.trim();
    let extra = if d.is_empty() || d == "off" { "" } else { d };
    if extra.chars().any(char::is_control) {
        return Err("a filter is one line of printable text".into());
    }
    let filter = EnvFilter::try_new(combined(&f.base, extra)).map_err(|e| format!("bad filter {extra:?}: {e}"))?;
    let mut held = f.extra.lock().unwrap_or_else(|e| e.into_inner());
    f.handle
        .reload(filter)
        .map_err(|e| format!("cannot change the log filter: {e}"))?;
    *held = extra.to_string();
    drop(held);
    current().ok_or_else(|| "no log filter".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_directives_are_added_to_the_start_up_filter() {
        assert_eq!(combined("warn", ""), "warn");
        assert_eq!(
            combined("warn", "spindle::qcow2::alloc=debug"),
            "warn,spindle::qcow2::alloc=debug"
        );
        assert_eq!(combined("", "x=debug"), "x=debug");
    }

    #[test]
    fn journal_priorities_are_syslog_s() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
        assert_eq!(priority(&Level::TRACE), 7);
    }

    #[test]
    fn a_stream_is_the_journal_only_when_journal_stream_names_it() {
        // The variable is this process's: set it only here.
        let f = tempfile::tempfile().unwrap();
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let m = f.metadata().unwrap();
        std::env::set_var("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()));
        assert!(is_journal(f.as_raw_fd()));
        std::env::set_var("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino() + 1));
        assert!(!is_journal(f.as_raw_fd()));
        std::env::set_var("JOURNAL_STREAM", "garbage");
        assert!(!is_journal(f.as_raw_fd()));
        std::env::remove_var("JOURNAL_STREAM");
        assert!(!is_journal(f.as_raw_fd()));
    }
}
