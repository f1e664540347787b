#!/usr/bin/env bash
# Instructions per request of one spindle serve build: the server runs under
# callgrind for one `spindle bench` run (this tree's client), then the
# process's instruction count is divided by the requests done. Timing-free,
# so it shows a build's CPU cost per request where polling makes CPU time
# useless (a polling server is busy whatever it does per request).
# Usage: bench/callgrind.sh SPINDLE TARGET [RW] [IODEPTH] [serve options...]
#   e.g. bench/callgrind.sh target/release/spindle null:1G randread 32
#        bench/callgrind.sh /old/spindle /var/tmp/spindle-bench/bench.qcow2 randwrite 32 --format qcow2 --cache none
# env: RUNTIME=5 DIR=/var/tmp/spindle-bench OUT=DIR/callgrind.out (the profile)
# Prints the client's IOs, the server's instructions (Ir) and Ir per IO.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$1 TARGET=$2 RW=${3:-randread} QD=${4:-32}; shift $(($# < 4 ? $# : 4))
DIR=${DIR:-/var/tmp/spindle-bench} RUNTIME=${RUNTIME:-5}
command -v valgrind >/dev/null || { echo "valgrind missing: apt-get install -y valgrind" >&2; exit 1; }
mkdir -p "$DIR"; SOCK=$DIR/callgrind.sock; OUT=${OUT:-$DIR/callgrind.out}
rm -f "$SOCK"
valgrind --tool=callgrind --callgrind-out-file="$OUT" "$BIN" serve "$TARGET" --vhost-user "$SOCK" --iothreads 1 --num-queues 1 "$@" >"$OUT.log" 2>&1 &
V=$!
for _ in $(seq 600); do [ -S "$SOCK" ] && break; sleep 0.1; done
IOS=$(target/release/spindle bench "$SOCK" --rw "$RW" --iodepth "$QD" --runtime "$RUNTIME" --output json |
  python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["errors"] == 0, r; print(r["ios"])')
kill "$V"; wait "$V" || true
IR=$(grep -o 'Collected : [0-9]*' "$OUT.log" | awk '{print $3}')
echo "ios=$IOS Ir=$IR Ir/io=$((IR / IOS))  ($OUT; callgrind_annotate --inclusive=yes for per-function costs)"
