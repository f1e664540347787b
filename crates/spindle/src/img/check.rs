//! `spindle img check`: qemu-img's output and exit codes (0 clean, 1 check
//! failed, 2 corruptions, 3 leaks only).

use super::format_arg;
use crate::error::{CliResult, Error};
use serde_json::json;
use spindle_block::formats::qcow2::{check, CheckMode, Qcow2Options};
use spindle_block::{Node, OpenConfig};
use spindle_io::CacheMode;

#[derive(clap::Args)]
pub struct Args {
    /// Look at an image another process writes (qemu-img's -U): skip the
    /// image lock's check against writers.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Format (probed if not given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Repair: leaks or all.
    #[arg(short = 'r')]
    repair: Option<String>,
    /// Output format: human or json.
    #[arg(long, default_value = "human")]
    output: String,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Image file.
    filename: String,
}

pub async fn run(a: Args) -> CliResult<u8> {
    let mode = match a.repair.as_deref() {
        None => CheckMode::Report,
        Some("leaks") => CheckMode::Leaks,
        Some("all") => CheckMode::All,
        Some(r) => return Err(Error::Usage(format!("-r takes 'leaks' or 'all', not '{r}'"))),
    };
    let access = super::Access::of(mode == CheckMode::Report, a.force_share, &a.filename)?;
    let cfg = OpenConfig {
        open_backing: false,
        ..super::open_config(format_arg(&a.format)?, CacheMode::Writeback, access)
    };
    // Repair may open an image marked corrupt writable.
    let cfg = OpenConfig {
        qcow2: Qcow2Options {
            repair: mode != CheckMode::Report,
            ..cfg.qcow2
        },
        ..cfg
    };
    let node = super::open_with(&a.filename, &cfg, access)?;
    let Node::Qcow2(q) = &node else {
        eprintln!("spindle: {}: this image format does not support checks", a.filename);
        return Ok(63);
    };
    let r = match check(q, mode).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("spindle: {e}");
            return Ok(1);
        }
    };
    if a.output == "json" {
        // qemu-img leaves out counters that are zero.
        let mut v = json!({
            "image-end-offset": r.image_end_offset, "total-clusters": r.total_clusters,
            "check-errors": r.check_errors, "filename": a.filename, "format": "qcow2",
        });
        for (k, n) in [
            ("leaks", r.leaks),
            ("corruptions", r.corruptions),
            ("leaks-fixed", r.leaks_fixed),
            ("corruptions-fixed", r.corruptions_fixed),
            ("allocated-clusters", r.allocated_clusters),
            ("fragmented-clusters", r.fragmented_clusters),
            ("compressed-clusters", r.compressed_clusters),
        ] {
            if n > 0 {
                v[k] = json!(n);
            }
        }
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else if !a.quiet {
        for m in &r.messages {
            eprintln!("{m}");
        }
        if r.leaks_fixed + r.corruptions_fixed > 0 {
            println!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
                r.leaks_fixed, r.corruptions_fixed
            );
        }
        if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
            println!("No errors were found on the image.");
        }
        if r.corruptions > 0 {
            println!("\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.", r.corruptions);
        }
        if r.leaks > 0 {
            println!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.",
                r.leaks
            );
        }
        if r.total_clusters > 0 {
            let pct = |n: u64| n as f64 * 100.0 / r.total_clusters as f64;
            println!(
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                r.allocated_clusters,
                r.total_clusters,
                pct(r.allocated_clusters),
                if r.allocated_clusters > 0 {
                    r.fragmented_clusters as f64 * 100.0 / r.allocated_clusters as f64
                } else {
                    0.0
                },
                if r.allocated_clusters > 0 {
                    r.compressed_clusters as f64 * 100.0 / r.allocated_clusters as f64
                } else {
                    0.0
                },
            );
        }
        println!("Image end offset: {}", r.image_end_offset);
    }
    node.close().await?;
    Ok(if r.check_errors > 0 {
        1
    } else if r.corruptions > 0 {
        2
    } else if r.leaks > 0 {
        3
    } else {
        0
    })
}
