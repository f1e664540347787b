//! QEMU-compatible cache modes.

use crate::error::Error;
use std::fmt;
use std::str::FromStr;

/// How the host page cache and flushes are used, with QEMU's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// O_DIRECT; writeback semantics, flushes reach the disk.
    None,
    /// Host page cache; flushes reach the disk.
    Writeback,
    /// Host page cache; every write is durable before it completes.
    Writethrough,
    /// O_DIRECT and every write durable before it completes.
    Directsync,
    /// Host page cache; flushes are ignored. Only for throw-away data.
    Unsafe,
}

impl CacheMode {
    /// Whether the file is opened with O_DIRECT.
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }
    /// Whether every write must be durable when it completes (FUA on every write).
    pub fn write_through(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::Directsync)
    }
    /// Whether flush requests are dropped.
    pub fn ignore_flush(self) -> bool {
        matches!(self, CacheMode::Unsafe)
    }
    /// QEMU's name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::None => "none",
            CacheMode::Writeback => "writeback",
            CacheMode::Writethrough => "writethrough",
            CacheMode::Directsync => "directsync",
            CacheMode::Unsafe => "unsafe",
        }
    }
}

impl FromStr for CacheMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "none" | "off" => CacheMode::None,
            "writeback" => CacheMode::Writeback,
            "writethrough" => CacheMode::Writethrough,
            "directsync" => CacheMode::Directsync,
            "unsafe" => CacheMode::Unsafe,
            _ => {
                return Err(Error::UnknownName {
                    what: "cache mode",
                    value: s.to_string(),
                    expected: "none, writeback, writethrough, directsync, unsafe",
                })
            }
        })
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_names_and_rejects_others() {
        for m in ["none", "writeback", "writethrough", "directsync", "unsafe"] {
            assert_eq!(m.parse::<CacheMode>().unwrap().name(), m);
        }
        let err = "fast".parse::<CacheMode>().unwrap_err().to_string();
        assert!(err.contains("unknown cache mode 'fast'"), "{err}");
        assert!(CacheMode::None.direct() && !CacheMode::None.write_through());
        assert!(CacheMode::Directsync.direct() && CacheMode::Directsync.write_through());
        assert!(CacheMode::Unsafe.ignore_flush());
    }
}
