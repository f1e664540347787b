//! The daemon's throttle groups: named groups from the config file
//! (`[throttle_group]`), from exports (`throttle_group = "NAME"`) and from
//! the control socket (`throttle-group NAME LIMITS`), and each export's
//! own group otherwise. Limits are QEMU's (docs/operations.md).

use super::spec::ExportSpec;
use crate::error::{CliResult, Error};
use serde_json::{json, Value};
use spindle_export::throttle::{Group, Limits};
use spindle_export::Device;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Longest group name.
const MAX_NAME: usize = 64;

fn invalid(msg: String) -> Error {
    Error::Usage(msg)
}

/// Parses limits, naming what they were for in the error.
pub fn parse(what: &str, s: &str) -> CliResult<Limits> {
    Limits::parse(s).map_err(|e| invalid(format!("{what}: {e}")))
}

fn check_name(name: &str) -> CliResult<()> {
    if name.is_empty() || name.len() > MAX_NAME || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(invalid(format!(
            "throttle group name '{}' must be 1 to {MAX_NAME} letters, digits, '-', '_' or '.'",
            spindle_block::printable(name)
        )));
    }
    Ok(())
}

/// The named groups.
#[derive(Default)]
pub struct Groups {
    named: Mutex<BTreeMap<String, Arc<Group>>>,
}

impl Groups {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Group>>> {
        self.named.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets a named group's limits, making the group if it is new.
    pub fn define(&self, name: &str, limits: Limits) -> CliResult<Arc<Group>> {
        check_name(name)?;
        let mut named = self.lock();
        let g = named
            .entry(name.to_owned())
            .or_insert_with(|| Group::new(name, Limits::default()))
            .clone();
        g.set_limits(limits);
        Ok(g)
    }

    /// The limits an export's spec asks for, checked before it starts.
    pub fn check(spec: &ExportSpec) -> CliResult<Option<Limits>> {
        if let Some(g) = &spec.throttle_group {
            check_name(g)?;
        }
        spec.throttle
            .as_deref()
            .map(|s| parse(&format!("export '{}': throttle", spec.name()), s))
            .transpose()
    }

    /// Puts a started export into its group: the named one (its
    /// `throttle` limits, if given, become the group's, as QEMU's
    /// per-drive limits with a group name do), or its own group with its
    /// limits.
    pub fn apply(&self, spec: &ExportSpec, limits: Option<Limits>, dev: &Device) -> CliResult<()> {
        match &spec.throttle_group {
            Some(name) => {
                let g = match limits {
                    Some(l) => self.define(name, l)?,
                    None => {
                        let existing = self.lock().get(name).cloned();
                        match existing {
                            Some(g) => g,
                            None => self.define(name, Limits::default())?,
                        }
                    }
                };
                dev.join_throttle_group(&g);
            }
            None => {
                if let Some(l) = limits {
                    dev.throttle_group().set_limits(l);
                }
            }
        }
        Ok(())
    }

    /// What `throttle_groups` reports: each named group with its limits
    /// and members.
    pub fn list(&self) -> Value {
        let named = self.lock();
        Value::Array(
            named
                .iter()
                .map(|(n, g)| json!({"name": n, "limits": g.limits().to_string(), "members": g.members()}))
                .collect(),
        )
    }
}

/// An export's throttle, for `list` and `stats`.
pub fn describe(dev: &Device) -> Value {
    let g = dev.throttle_group();
    let (requests, seconds) = dev.throttled();
    json!({
        "group": g.name(),
        "limits": g.limits().to_string(),
        "throttled_requests": requests,
        "throttled_seconds": seconds,
    })
}
