//! `spindle doctor`: checks the host and the images for what makes VM
//! disks slow or unsafe, and prints each finding with its evidence and
//! the command that fixes it.
//!
//! Most slow VM disks are slow for reasons of configuration: the I/O
//! scheduler, `fs.aio-max-nr`, native AIO on a sparse file, a qcow2
//! cluster size or L2 cache that does not cover the disk, a cache mode the
//! file system refuses. Each check owns one of those rules: `host.rs`
//! (block devices under the images, AIO limits, memory, running QEMUs),
//! `image.rs` (each image's file system and format).
//!
//! Exit status: 0 when nothing needs doing (only `ok` and `info`
//! findings), 1 when some finding is a warning or an error.

mod host;
mod image;

use crate::error::{CliResult, Error};
use serde::Serialize;
use std::path::PathBuf;

/// `spindle doctor` arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Images to check (paths or `rbd:` specs); with none, the host only
    /// (and the exports of `--config`).
    images: Vec<String>,
    /// Also check the exports of a `spindle serve --config` file, with
    /// their settings (aio, iothreads, cache).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The I/O engine the images are (to be) served with, for the checks
    /// that depend on it: io_uring (default), native, threads.
    #[arg(long, default_value = "io_uring")]
    aio: String,
    /// Output: human or json.
    #[arg(long, default_value = "human")]
    output: String,
}

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Checked, fine.
    Ok,
    /// Worth knowing; nothing to fix.
    Info,
    /// Slower or riskier than it needs to be.
    Warning,
    /// Will not work, or loses data.
    Error,
}

/// One finding.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// How much it matters.
    pub severity: Severity,
    /// Which check (a stable name, for scripts).
    pub check: &'static str,
    /// What it is about: a device, an image, a setting.
    pub subject: String,
    /// What was found.
    pub message: String,
    /// What it was found from (values read, files looked at).
    pub evidence: String,
    /// The command that fixes it, if there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn new(severity: Severity, check: &'static str, subject: impl Into<String>, message: impl Into<String>) -> Finding {
        Finding {
            severity,
            check,
            subject: subject.into(),
            message: message.into(),
            evidence: String::new(),
            fix: None,
        }
    }
    fn evidence(mut self, e: impl Into<String>) -> Finding {
        self.evidence = e.into();
        self
    }
    fn fix(mut self, f: impl Into<String>) -> Finding {
        self.fix = Some(f.into());
        self
    }
}

/// An image to check, with how it is (to be) served.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) image: String,
    pub(crate) format: Option<String>,
    pub(crate) aio: String,
    pub(crate) iothreads: usize,
    pub(crate) cache: Option<String>,
}

fn targets(a: &Args) -> CliResult<Vec<Target>> {
    let mut out: Vec<Target> = a
        .images
        .iter()
        .map(|i| Target {
            image: i.clone(),
            format: None,
            aio: a.aio.clone(),
            iothreads: 1,
            cache: None,
        })
        .collect();
    if let Some(path) = &a.config {
        let cfg = crate::serve::spec::ConfigFile::load(path)?;
        for e in cfg.exports {
            let e = e.resolved()?;
            out.push(Target {
                image: e.image.clone(),
                format: e.format.clone(),
                aio: e.aio.clone().unwrap_or_else(|| "io_uring".into()),
                iothreads: e.iothreads.unwrap_or(1),
                cache: e.cache.clone(),
            });
        }
    }
    Ok(out)
}

/// Runs every check; returns the exit status.
pub fn run(a: Args) -> CliResult<u8> {
    if !matches!(a.output.as_str(), "human" | "json") {
        return Err(Error::Usage(format!(
            "--output must be human or json, not '{}'",
            a.output
        )));
    }
    a.aio.parse::<spindle_io::EngineKind>()?;
    let targets = targets(&a)?;
    let mut findings = host::check(&targets);
    for t in &targets {
        findings.extend(image::check(t));
    }
    let worst = findings.iter().map(|f| f.severity).max().unwrap_or(Severity::Ok);
    if a.output == "json" {
        let v = serde_json::json!({ "findings": findings, "worst": worst });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print!("{}", human(&findings));
    }
    Ok(u8::from(worst >= Severity::Warning))
}

fn human(findings: &[Finding]) -> String {
    let mut s = String::new();
    for f in findings {
        let tag = match f.severity {
            Severity::Ok => "ok",
            Severity::Info => "info",
            Severity::Warning => "WARNING",
            Severity::Error => "ERROR",
        };
        s += &format!("[{tag}] {}: {}\n", f.subject, f.message);
        if !f.evidence.is_empty() {
            s += &format!("    evidence: {}\n", f.evidence);
        }
        if let Some(fix) = &f.fix {
            s += &format!("    fix: {fix}\n");
        }
    }
    let count = |sev| findings.iter().filter(|f| f.severity == sev).count();
    s += &format!(
        "{} checks: {} ok, {} info, {} warnings, {} errors\n",
        findings.len(),
        count(Severity::Ok),
        count(Severity::Info),
        count(Severity::Warning),
        count(Severity::Error)
    );
    s
}

/// Reads a small text file from /proc or /sys, trimmed.
pub(crate) fn read(path: impl AsRef<std::path::Path>) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}
