//! `-p` progress: a bar on a terminal, qemu-img's `    (NN.NN/100%)` lines
//! otherwise (so logs capture it as they capture qemu-img's).

use indicatif::{ProgressBar, ProgressStyle};
use std::cell::Cell;
use std::io::{IsTerminal, Write};

/// Progress of one operation over `total` bytes.
pub enum Progress {
    /// An indicatif bar.
    Bar(ProgressBar),
    /// Plain percentages on stdout, printed at each whole percent.
    Plain {
        /// Bytes to go through.
        total: u64,
        /// Bytes done.
        done: Cell<u64>,
        /// Last whole percent printed.
        shown: Cell<u64>,
    },
}

impl Progress {
    /// Progress over `total` bytes.
    pub fn new(total: u64) -> Progress {
        if std::io::stderr().is_terminal() {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "    ({percent:>3}.00/100%) {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            Progress::Bar(b)
        } else {
            print!("    (0.00/100%)\r");
            let _ = std::io::stdout().flush();
            Progress::Plain {
                total: total.max(1),
                done: Cell::new(0),
                shown: Cell::new(0),
            }
        }
    }

    /// Records `n` more bytes done.
    pub fn inc(&self, n: u64) {
        match self {
            Progress::Bar(b) => b.inc(n),
            Progress::Plain { total, done, shown } => {
                done.set(done.get() + n);
                let pct = done.get() * 100 / total;
                if pct > shown.get() {
                    shown.set(pct);
                    print!("    ({:.2}/100%)\r", pct as f64);
                    let _ = std::io::stdout().flush();
                }
            }
        }
    }

    /// Ends the display.
    pub fn finish(&self) {
        match self {
            Progress::Bar(b) => b.finish(),
            Progress::Plain { shown, .. } if shown.get() >= 100 => println!(),
            Progress::Plain { .. } => println!("    (100.00/100%)"),
        }
    }
}
