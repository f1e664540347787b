//! Requests about exports: list, hot plug and unplug, statistics, size,
//! I/O limits and tracing (docs/control.md, first table).

use crate::serve::spec::ExportSpec;
use crate::serve::ExportArgs;
use clap::{ArgAction, ArgMatches, Args, Command, FromArgMatches, Subcommand};
use serde::{Deserialize, Serialize};

/// A request about exports.
#[derive(Debug, Clone, Serialize, Deserialize, Subcommand)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum ExportRequest {
    /// List the exports.
    // A struct variant, so that unknown keys are refused.
    List {},
    /// Serve another image (hot plug); IMAGE and --vhost-user are required.
    Add(AddRequest),
    /// Stop serving an export (hot unplug); its image is flushed and closed.
    Remove {
        /// Export name.
        name: String,
    },
    /// Request statistics: requests, bytes, latency percentiles per operation.
    Stats {
        /// Export name.
        name: String,
    },
    /// Change an export's size.
    Resize {
        /// Export name.
        name: String,
        /// New size (e.g. 20G, or bytes).
        size: String,
        /// Allow shrinking (loses the data beyond the new end).
        #[arg(long)]
        #[serde(default)]
        shrink: bool,
    },
    /// Set an export's I/O limits (QEMU's names: iops-total=1000,bps-write=50M,…; `none` clears
    /// them); they apply from its next request (docs/operations.md).
    Throttle {
        /// Export name.
        name: String,
        /// The limits.
        limits: String,
    },
    /// Set (or make) a named throttle group's limits; exports join it with --throttle-group.
    ThrottleGroup {
        /// Group name.
        name: String,
        /// The limits.
        limits: String,
    },
    /// List the named throttle groups.
    ThrottleGroups {},
    /// Switch named trace events on or off while the daemon runs: FILTER is added to the
    /// start-up filter (SPINDLE_LOG), e.g. 'spindle::qcow2::alloc=debug' or 'spindle::vhost=debug';
    /// `off` removes what was added; without FILTER, shows the filter and the named targets
    /// (docs/operations.md, "Tracing a slow device").
    Trace {
        /// `EnvFilter` directives, comma-separated, or `off`.
        #[serde(default)]
        filter: Option<String>,
    },
}

/// `add`: what to serve. On the wire an export object with the config
/// file's keys; on `spindle ctl`'s command line the options of
/// `spindle serve` (an export's part of them) and `--nbd`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddRequest {
    /// The export (boxed: it is much larger than the other requests).
    pub export: Box<ExportSpec>,
}

impl FromArgMatches for AddRequest {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let x = ExportArgs::from_arg_matches(m)?;
        let (Some(image), Some(_)) = (x.image.clone(), &x.vhost_user) else {
            return Err(clap::Error::raw(
                clap::error::ErrorKind::MissingRequiredArgument,
                "ctl add needs IMAGE and --vhost-user SOCKET",
            ));
        };
        let mut export = x.spec(image);
        export.nbd = m.get_flag("nbd").then_some(true);
        Ok(AddRequest {
            export: Box::new(export),
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for AddRequest {
    fn augment_args(cmd: Command) -> Command {
        // A hot-plugged export has no config file to name them.
        ExportArgs::augment_args(cmd)
            .mut_arg("image", |a| {
                a.required(true).help("Image path, null:SIZE or an rbd: spec")
            })
            .mut_arg("vhost_user", |a| a.required(true).help("vhost-user socket path"))
            .arg(clap::Arg::new("nbd").long("nbd").action(ArgAction::SetTrue).help(
                "Require it to be offered over NBD too (the daemon's --nbd listener; without \
                     this flag it is offered whenever there is one)",
            ))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}
