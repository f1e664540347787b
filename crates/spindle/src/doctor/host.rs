//! Host checks: the block devices under the images (I/O scheduler), the
//! kernel's AIO limit, huge pages and memlock, and the running QEMUs'
//! guest memory (vhost-user needs it shared).

use super::{read, Finding, Severity, Target};
use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Ops in flight each I/O thread's engine is sized for (RuntimeConfig).
const DEPTH: u64 = 256;

pub(super) fn check(targets: &[Target]) -> Vec<Finding> {
    let mut out = Vec::new();
    schedulers(targets, &mut out);
    aio(targets, &mut out);
    memory(&mut out);
    qemus(&mut out);
    out
}

fn is_local(image: &str) -> bool {
    !(image.starts_with("null:") || image.starts_with("rbd:") || image.starts_with("nbd:") || image.starts_with("nbd+"))
}

/// The block device (sysfs directory under /sys/block) that holds `dev`
/// (major:minor): a partition's disk, or the device itself.
fn sys_block(major: u64, minor: u64) -> Option<PathBuf> {
    let p = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    if p.join("partition").exists() {
        return p.parent().map(Path::to_path_buf);
    }
    Some(p)
}

/// The devices with a queue of their own under `dev`: itself, or for a
/// device-mapper device (LVM) the devices it maps to, recursively.
fn physical(dev: &Path, out: &mut BTreeSet<PathBuf>, depth: usize) {
    let slaves: Vec<PathBuf> = std::fs::read_dir(dev.join("slaves"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    if slaves.is_empty() || depth > 8 {
        out.insert(dev.to_path_buf());
        return;
    }
    for s in slaves {
        if let Ok(c) = std::fs::canonicalize(&s) {
            let c = if c.join("partition").exists() {
                c.parent().map(Path::to_path_buf).unwrap_or(c)
            } else {
                c
            };
            physical(&c, out, depth + 1);
        }
    }
}

fn name(dev: &Path) -> String {
    dev.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The scheduler a `queue/scheduler` line marks as chosen (`[mq-deadline]`).
fn chosen(line: &str) -> Option<&str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
}

fn schedulers(targets: &[Target], out: &mut Vec<Finding>) {
    let mut devices = BTreeSet::new();
    for t in targets.iter().filter(|t| is_local(&t.image)) {
        let Ok(meta) = std::fs::metadata(&t.image) else {
            continue;
        };
        let dev = if meta.file_type().is_block_device() {
            meta.rdev()
        } else {
            meta.dev()
        };
        let (major, minor) = (libc::major(dev) as u64, libc::minor(dev) as u64);
        match sys_block(major, minor) {
            Some(d) => physical(&d, &mut devices, 0),
            None => out.push(
                Finding::new(
                    Severity::Info,
                    "scheduler",
                    &t.image,
                    "not on a local block device (tmpfs, overlay, a network file system): no I/O scheduler to check",
                )
                .evidence(format!("st_dev {major}:{minor} has no /sys/dev/block entry")),
            ),
        }
    }
    for dev in &devices {
        let n = name(dev);
        let Some(line) = read(dev.join("queue/scheduler")) else {
            continue;
        };
        let sched = chosen(&line).unwrap_or("none").to_owned();
        let rotational = read(dev.join("queue/rotational")).as_deref() == Some("1");
        let kind = if rotational {
            "rotational"
        } else {
            "non-rotational (SSD/NVMe)"
        };
        let good: &[&str] = if rotational {
            &["mq-deadline", "bfq"]
        } else {
            &["none", "mq-deadline"]
        };
        let want = if rotational { "mq-deadline" } else { "none" };
        let evidence = format!(
            "/sys/block/{n}/queue/scheduler: {line}; queue/rotational: {}",
            u8::from(rotational)
        );
        let f = if good.contains(&sched.as_str()) || !line.contains(want) {
            Finding::new(
                Severity::Ok,
                "scheduler",
                format!("/dev/{n}"),
                format!("{kind}, scheduler {sched}"),
            )
        } else {
            Finding::new(
                Severity::Warning,
                "scheduler",
                format!("/dev/{n}"),
                format!("{kind} device with the {sched} scheduler: {want} suits it (less latency per request)"),
            )
            .fix(format!(
                "echo {want} > /sys/block/{n}/queue/scheduler  # and to keep it: echo 'ACTION==\"add|change\", KERNEL==\"{n}\", ATTR{{queue/scheduler}}=\"{want}\"' > /etc/udev/rules.d/60-spindle-scheduler.rules"
            ))
        };
        out.push(f.evidence(evidence));
    }
    if !devices.is_empty() {
        out.push(
            Finding::new(
                Severity::Info,
                "guest-scheduler",
                "guests",
                "inside the guests, virtio disks do best with the none scheduler: the host (Spindle and this device) already orders I/O",
            )
            .fix("in each guest: echo none > /sys/block/vda/queue/scheduler"),
        );
    }
}

fn aio(targets: &[Target], out: &mut Vec<Finding>) {
    let (Some(max), Some(used)) = (read("/proc/sys/fs/aio-max-nr"), read("/proc/sys/fs/aio-nr")) else {
        return;
    };
    let (max, used): (u64, u64) = (max.parse().unwrap_or(0), used.parse().unwrap_or(0));
    let native: Vec<&Target> = targets.iter().filter(|t| t.aio == "native").collect();
    let need: u64 = native.iter().map(|t| t.iothreads.max(1) as u64 * DEPTH).sum();
    let free = max.saturating_sub(used);
    let evidence = format!("fs.aio-max-nr = {max}, fs.aio-nr = {used} (in use now), --aio native needs {DEPTH} per I/O thread: {need} for the exports checked");
    let fix = || {
        let n = (max.max(used + need) * 2).next_power_of_two().max(1 << 20);
        format!("sysctl -w fs.aio-max-nr={n}  # and to keep it: echo fs.aio-max-nr={n} > /etc/sysctl.d/90-spindle.conf")
    };
    let f = if need > free {
        Finding::new(
            Severity::Error,
            "aio-max-nr",
            "fs.aio-max-nr",
            format!("only {free} AIO events are left; --aio native for these exports needs {need}: their I/O threads would fail to start (io_setup: EAGAIN)"),
        )
        .fix(fix())
    } else if need > 0 && need * 2 > free {
        Finding::new(
            Severity::Warning,
            "aio-max-nr",
            "fs.aio-max-nr",
            format!(
                "{free} AIO events left, {need} needed: little room for more exports or QEMU's own aio=native disks"
            ),
        )
        .fix(fix())
    } else {
        Finding::new(
            Severity::Ok,
            "aio-max-nr",
            "fs.aio-max-nr",
            format!("{free} AIO events free"),
        )
    };
    out.push(f.evidence(evidence));
}

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn memory(out: &mut Vec<Finding>) {
    let total = meminfo("HugePages_Total").unwrap_or(0);
    let free = meminfo("HugePages_Free").unwrap_or(0);
    let size_kb = meminfo("Hugepagesize").unwrap_or(2048);
    out.push(
        Finding::new(
            Severity::Info,
            "hugepages",
            "vm.nr_hugepages",
            if total == 0 {
                "no huge pages reserved: guests use memfd (share=on) for vhost-user; huge pages (memory-backend-file on hugetlbfs, share=on) cut TLB misses for large guests".to_owned()
            } else {
                format!("{total} huge pages of {size_kb} KiB reserved, {free} free")
            },
        )
        .evidence(format!("/proc/meminfo: HugePages_Total {total}, HugePages_Free {free}, Hugepagesize {size_kb} kB")),
    );
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into a valid struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } == 0 {
        let shown = |v: libc::rlim_t| {
            if v == libc::RLIM_INFINITY {
                "unlimited".to_owned()
            } else {
                format!("{} KiB", v / 1024)
            }
        };
        out.push(
            Finding::new(
                Severity::Info,
                "memlock",
                "RLIMIT_MEMLOCK",
                "Spindle locks no memory (io_uring rings are not charged to memlock since Linux 5.12); QEMU needs it for VFIO passthrough and mlock=on",
            )
            .evidence(format!("memlock limit {} (hard {})", shown(lim.rlim_cur), shown(lim.rlim_max))),
        );
    }
}

/// The running QEMUs with vhost-user disks: their guest RAM must be
/// shared with the backend.
fn qemus(out: &mut Vec<Finding>) {
    let Ok(dir) = std::fs::read_dir("/proc") else { return };
    for e in dir.flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let Some(exe) = args.first() else { continue };
        if !exe.contains("qemu-system") || !args.iter().any(|a| a.contains("vhost-user-blk")) {
            continue;
        }
        let shared = args
            .iter()
            .any(|a| a.contains("memory-backend-") && a.contains("share=on"));
        let subject = format!("QEMU pid {pid}");
        out.push(if shared {
            Finding::new(Severity::Ok, "shared-memory", subject, "vhost-user-blk disks with shared guest RAM")
        } else {
            Finding::new(
                Severity::Error,
                "shared-memory",
                subject,
                "vhost-user-blk disks but guest RAM is not shared: the backend cannot reach the guest's buffers and the disks stay dead",
            )
            .evidence("no memory-backend-memfd/-file with share=on on its command line")
            .fix("start QEMU with -object memory-backend-memfd,id=mem,size=<RAM>,share=on -numa node,memdev=mem (libvirt: <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>)")
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chosen_scheduler_is_the_bracketed_one() {
        assert_eq!(chosen("none [mq-deadline] kyber bfq"), Some("mq-deadline"));
        assert_eq!(chosen("[none] mq-deadline"), Some("none"));
        assert_eq!(chosen("none"), None);
    }
}
