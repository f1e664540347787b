#!/usr/bin/env bash
# spindle img vs qemu-img on one 2 GiB random image, same file system, one run.
# Usage: bench/img.sh [DIR]   (DIR defaults to /var/tmp/spindle-bench; needs ~10 GiB)
# Prints a markdown table of seconds (median of 3, tools alternating) and ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/var/tmp/spindle-bench}
REPS=${REPS:-3}
SIZE_MB=${SIZE_MB:-2048}
mkdir -p "$DIR"
cargo build --release -q
SP=$PWD/target/release/spindle
command -v qemu-img >/dev/null || { echo "qemu-img missing: apt-get install -y qemu-utils" >&2; exit 1; }

SRC=$DIR/src.raw
if [ ! -f "$SRC" ] || [ "$(stat -c %s "$SRC")" != $((SIZE_MB << 20)) ]; then
  head -c $((SIZE_MB << 20)) /dev/urandom > "$SRC"
fi
qemu-img convert -O qcow2 "$SRC" "$DIR/src.qcow2"
sync

drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
# time_cmd CMD... -> seconds until the output is durable: the command plus a
# sync, because qemu-img convert's default output cache is "unsafe" (no
# fsync) while spindle flushes before it exits. Page cache dropped first.
time_cmd() {
  drop
  local t0 t1
  t0=$(date +%s.%N); "$@" >/dev/null 2>&1 || { echo "FAILED: $*" >&2; exit 1; }; sync; t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc -l
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }

row() { # name, qemu args..., --, spindle args...
  local name=$1; shift
  local qargs=() sargs=()
  while [ "$1" != "--" ]; do qargs+=("$1"); shift; done; shift
  sargs=("$@")
  local qs=() ss=()
  for _ in $(seq "$REPS"); do
    rm -f "$DIR/out.img"; qs+=("$(time_cmd qemu-img "${qargs[@]}")")
    rm -f "$DIR/out.img"; ss+=("$(time_cmd "$SP" img "${sargs[@]}")")
  done
  local q s
  q=$(median "${qs[@]}"); s=$(median "${ss[@]}")
  printf '| %s | %.2f | %.2f | %.2fx |\n' "$name" "$q" "$s" "$(echo "$q / $s" | bc -l)"
}

OUT=$DIR/out.img
BEST=(-t none -T none -W -m 8)
echo "| operation (${SIZE_MB} MiB random) | qemu-img s | spindle s | speed-up |"
echo "|---|---|---|---|"
row "convert raw→qcow2, default flags" convert -O qcow2 "$SRC" "$OUT" -- convert -O qcow2 "$SRC" "$OUT"
row "convert raw→qcow2, -t none -T none -W -m 8" convert "${BEST[@]}" -O qcow2 "$SRC" "$OUT" -- convert "${BEST[@]}" -O qcow2 "$SRC" "$OUT"
row "convert qcow2→raw, default flags" convert -O raw "$DIR/src.qcow2" "$OUT" -- convert -O raw "$DIR/src.qcow2" "$OUT"
row "convert qcow2→raw, -t none -T none -W -m 8" convert "${BEST[@]}" -O raw "$DIR/src.qcow2" "$OUT" -- convert "${BEST[@]}" -O raw "$DIR/src.qcow2" "$OUT"
echo "| spindle default vs qemu-img best, raw→qcow2 | $(median $(for _ in $(seq $REPS); do rm -f $OUT; time_cmd qemu-img convert "${BEST[@]}" -O qcow2 "$SRC" "$OUT"; done)) | $(median $(for _ in $(seq $REPS); do rm -f $OUT; time_cmd "$SP" img convert -O qcow2 "$SRC" "$OUT"; done)) | |"
B=(-c 200000 -d 64 -s 4k)
row "bench 4k read QD64, qcow2, cache=none, io_uring" bench "${B[@]}" -t none -i io_uring "$DIR/src.qcow2" -- bench "${B[@]}" -t none -i io_uring "$DIR/src.qcow2"
row "bench 4k read QD64, raw, cache=none, native" bench "${B[@]}" -t none -i native -f raw "$SRC" -- bench "${B[@]}" -t none -i native -f raw "$SRC"
cp "$DIR/src.qcow2" "$DIR/w.qcow2"
row "bench 4k write QD64, qcow2, cache=none, io_uring" bench "${B[@]}" -w -t none -i io_uring "$DIR/w.qcow2" -- bench "${B[@]}" -w -t none -i io_uring "$DIR/w.qcow2"
row "bench 64k read QD8, raw, cache=writeback, threads" bench -c 50000 -d 8 -s 64k -t writeback -i threads -f raw "$SRC" -- bench -c 50000 -d 8 -s 64k -t writeback -i threads -f raw "$SRC"
rm -f "$OUT" "$DIR/w.qcow2"
