#!/usr/bin/env bash
# Installs everything the tests need (Debian 12, as root, with apt) and
# runs every test: the README's second command. `.ci/run` is this script.
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
export PATH="$HOME/.cargo/bin:$PATH"
if [[ $(id -u) != 0 ]]; then
    echo "test.sh installs the test dependencies with apt: run it as root (sudo ./test.sh)" >&2
    exit 1
fi

apt-get update -qq
# qemu-img/qemu-io judge images; qemu-system-x86_64 loads and saves VM state.
# Two steps, as verified on this machine kind: installing qemu-system-x86
# (7.2) removes a preinstalled qemu-utils backport (10.x) and does not put
# Debian's qemu-utils in its place; the second step does.
apt-get install -y -qq qemu-system-x86 >/dev/null
apt-get install -y -qq qemu-utils >/dev/null
# The test guest: busybox for its initramfs, cpio to pack it, gcc and
# libc6-dev to build its disk workload (tests/guest/gio.c) statically.
apt-get install -y -qq busybox-static cpio gcc libc6-dev >/dev/null
# Block-device tests: loop devices (losetup, from mount) and blkdiscard
# (util-linux); both are in Debian's base system, named to be sure.
apt-get install -y -qq mount util-linux >/dev/null
# NBD peers: nbdinfo/nbdcopy/nbdsh, libnbd's Python module, nbdkit, fio;
# openssl makes the TLS tests' certificates.
apt-get install -y -qq libnbd-bin python3-libnbd nbdkit fio openssl >/dev/null
# The metrics tests parse the endpoint's exposition with Prometheus's own
# Python parsers (tests/metrics.rs).
apt-get install -y -qq python3-prometheus-client >/dev/null
# Ceph RBD (issue 14): the test cluster's monitor and OSD (tests/ceph/cluster.sh),
# the ceph/rbd tools and the client libraries Spindle loads at run time
# (librbd1, librados2: ceph-common pulls them in; named to be sure), and
# qemu-img's rbd driver (qemu-block-extra; after qemu-utils, above).
apt-get install -y -qq ceph-mon ceph-osd ceph-common librbd1 librados2 qemu-block-extra >/dev/null
# libvirt (tests/libvirt.rs): virt-xml-validate (libvirt-clients; it runs
# xmllint from libxml2-utils), virsh, and a private unprivileged libvirtd
# with the QEMU driver (no system service is used or needed).
apt-get install -y -qq --no-install-recommends libvirt-clients libxml2-utils libvirt-daemon libvirt-daemon-driver-qemu >/dev/null
# systemd-analyze and systemd-socket-activate (the unit tests); in
# Debian's base system, named to be sure.
apt-get install -y -qq systemd >/dev/null
qemu-img --version | head -1
qemu-system-x86_64 --version | head -1

# The README's test command, exactly:
cargo fmt --check && cargo clippy --all-targets -- -D warnings && cargo test --workspace
