#!/usr/bin/env bash
# Soak test (not CI): DURATION seconds (default 1800) of guest random
# read/write over vhost-user, snapshots, converts and control operations
# on one qcow2 image, then qemu-img check and a verify.
#
# Usage: DURATION=1800 PHASE=60 bench/soak.sh [DIR]
#   DIR defaults to /var/tmp/spindle-soak (needs ~1 GiB; not tmpfs).
#   DURATION=60 PHASE=20 is a smoke run; SPINDLE=target/debug/spindle skips
#   the release build.
#
# Each phase:
#   1. offline: `spindle img snapshot -c pN`, then `spindle img convert` of
#      the image; the snapshot's contents (qemu-img convert -l pN) must equal
#      that copy; its checksum is kept;
#   2. `spindle serve --control` exports the image; `spindle bench --verify
#      --rw randrw` drives it (every read of a written block is checked, and
#      everything written is read back at the end), while `spindle ctl`
#      lists, takes stats, resizes the export (+1 MiB) and adds and removes
#      a second export (a fresh qcow2 image);
#   3. the server stops (SIGTERM); `qemu-img check` must call the image clean.
# At the end every snapshot, read by qemu-img, must still match its checksum
# (later guest writes never reached it), and `spindle img check` and
# `qemu-img check` must agree the image is clean.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/var/tmp/spindle-soak}
DURATION=${DURATION:-1800}
PHASE=${PHASE:-60}
SIZE=${SIZE:-256M}
for t in qemu-img sha256sum; do
  command -v $t >/dev/null || { echo "$t missing: apt-get install -y qemu-utils coreutils" >&2; exit 1; }
done
# SPINDLE=path uses a binary already built (e.g. target/debug/spindle).
if [ -z "${SPINDLE:-}" ]; then cargo build --release -q; fi
SP=${SPINDLE:-$PWD/target/release/spindle}
rm -rf "$DIR"; mkdir -p "$DIR"
IMG=$DIR/disk.qcow2 SOCK=$DIR/disk.sock CTL=$DIR/ctl.sock
$SP img create -f qcow2 -o cluster_size=64k "$IMG" "$SIZE" >/dev/null
declare -A SUMS
start=$(date +%s) phase=0 ops=0
log() { echo "[$(( $(date +%s) - start ))s] $*"; }
die() { echo "SOAK FAILED: $*" >&2; exit 1; }
SERVER=
stop_server() {
  [ -n "$SERVER" ] || return 0
  kill -TERM "$SERVER" 2>/dev/null || true
  wait "$SERVER" || die "spindle serve exited with $? in phase $phase"
  SERVER=
}
trap 'stop_server; [ -n "${SERVER:-}" ] && kill -9 "$SERVER" 2>/dev/null; true' EXIT

while [ $(( $(date +%s) - start )) -lt "$DURATION" ]; do
  phase=$((phase + 1))
  # 1. Offline: snapshot, convert, compare.
  $SP img snapshot -c "p$phase" "$IMG"
  $SP img convert -O raw "$IMG" "$DIR/active.raw"
  qemu-img convert -l "p$phase" -O raw "$IMG" "$DIR/snap.raw"
  cmp -s "$DIR/active.raw" "$DIR/snap.raw" || die "snapshot p$phase differs from the image it was taken of"
  # With its size: qemu-img convert -l reads a snapshot at the current
  # virtual size, which the resizes grow (the tail reads as zeroes).
  SUMS[p$phase]="$(stat -c %s "$DIR/snap.raw") $(sha256sum < "$DIR/snap.raw" | cut -d' ' -f1)"
  rm -f "$DIR/active.raw" "$DIR/snap.raw"
  # Every other phase, delete an old snapshot (keeps the table changing).
  if [ $((phase % 2)) = 0 ] && [ $phase -gt 2 ]; then
    old=p$((phase - 2)); $SP img snapshot -d "$old" "$IMG"; unset "SUMS[$old]"
  fi
  # 2. Serve, load, control operations.
  rm -f "$SOCK" "$CTL"
  $SP serve "$IMG" --vhost-user "$SOCK" --control "$CTL" --name disk --cache none &
  SERVER=$!
  for _ in $(seq 100); do [ -S "$CTL" ] && [ -S "$SOCK" ] && break; sleep 0.1; done
  [ -S "$CTL" ] || die "the server did not open its control socket"
  left=$(( DURATION - ($(date +%s) - start) ))
  run=$(( left < PHASE ? (left > 5 ? left : 5) : PHASE ))
  $SP bench "$SOCK" --rw randrw --verify --bs 4k --iodepth 16 --size 128M --flush-every 64 \
    --runtime "$run" > "$DIR/bench.out" 2>&1 &
  BENCH=$!
  end=$(( $(date +%s) + run - 2 ))
  while [ "$(date +%s)" -lt "$end" ]; do
    $SP ctl -c "$CTL" stats disk >/dev/null || die "ctl stats failed"
    $SP ctl -c "$CTL" list >/dev/null || die "ctl list failed"
    $SP img create -f qcow2 "$DIR/second.qcow2" 64M >/dev/null
    $SP ctl -c "$CTL" add "$DIR/second.qcow2" --vhost-user "$DIR/second.sock" --name second >/dev/null \
      || die "ctl add failed"
    $SP ctl -c "$CTL" remove second >/dev/null || die "ctl remove failed"
    rm -f "$DIR/second.qcow2"
    ops=$((ops + 4))
    sleep 1
  done
  cur=$(qemu-img info -U --output json "$IMG" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p')
  $SP ctl -c "$CTL" resize disk $((cur + (1 << 20))) >/dev/null || die "ctl resize failed"
  ops=$((ops + 1))
  wait "$BENCH" || { cat "$DIR/bench.out"; die "spindle bench --verify failed in phase $phase"; }
  # 3. Stop, check.
  stop_server
  qemu-img check -q "$IMG" || die "qemu-img check after phase $phase"
  log "phase $phase: $(grep -m1 -i 'iops' "$DIR/bench.out" | tr -s ' ' | cut -c1-100); ${#SUMS[@]} snapshots"
done

# Verify: every snapshot still reads as when it was taken.
for s in "${!SUMS[@]}"; do
  qemu-img convert -l "$s" -O raw "$IMG" "$DIR/snap.raw"
  len=${SUMS[$s]%% *}
  [ "$(head -c "$len" "$DIR/snap.raw" | sha256sum | cut -d' ' -f1)" = "${SUMS[$s]#* }" ] || die "snapshot $s changed"
  rm -f "$DIR/snap.raw"
done
qemu-img check "$IMG" >/dev/null || die "final qemu-img check"
$SP img check "$IMG" >/dev/null || die "final spindle img check"
log "SOAK OK: $phase phases, $ops control operations, ${#SUMS[@]} snapshots verified, image clean"
