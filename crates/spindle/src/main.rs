//! `spindle`: the command-line entry point.

use spindle::error::CliResult;
use spindle::{bench, ctl, doctor, img, libvirt, nbd, serve, vm};

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Spindle: a virtual-disk data plane for KVM/QEMU guests.
#[derive(Parser)]
#[command(name = "spindle", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Image tools with qemu-img's names and flags.
    Img(img::ImgArgs),
    /// Serve images to VMs as vhost-user-blk devices.
    Serve(serve::Args),
    /// Serve an image over NBD (qemu-nbd's job, with its names).
    Nbd(nbd::Args),
    /// Load generator for vhost-user sockets, files and devices.
    Bench(bench::Args),
    /// Send a control request to a running `spindle serve --control` (docs/control.md).
    Ctl(ctl::Args),
    /// Snapshots of a running VM whose disks `spindle serve` serves (through its QMP socket).
    Vm(vm::Args),
    /// Check the host and images for slow or unsafe settings, with the fix for each.
    Doctor(doctor::Args),
    /// Print the libvirt <disk> (and <memoryBacking>) elements of a running daemon's exports.
    Libvirt(libvirt::Args),
}

fn main() -> ExitCode {
    spindle::logging::init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 1 } else { 0 });
        }
    };
    match cli.cmd {
        Cmd::Img(a) => exit(img::run(a)),
        Cmd::Serve(a) => exit(serve::run(a)),
        Cmd::Nbd(a) => exit(nbd::run(a)),
        Cmd::Bench(a) => exit(bench::run(a)),
        Cmd::Ctl(a) => exit(ctl::run(a)),
        Cmd::Vm(a) => exit(vm::run(a)),
        Cmd::Doctor(a) => exit(doctor::run(a)),
        Cmd::Libvirt(a) => exit(libvirt::run(a)),
    }
}

fn exit(r: CliResult<u8>) -> ExitCode {
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // Errors may quote names read from an image: no control bytes
            // reach the terminal.
            eprintln!("spindle: {}", spindle_block::printable(&e.to_string()));
            ExitCode::from(1)
        }
    }
}
