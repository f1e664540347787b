#!/usr/bin/env bash
# A single-node Ceph test cluster in a directory: one monitor on 127.0.0.1,
# one memstore OSD, pool size 1, pool `rbd` created and initialised.
# Nothing system-wide is touched: every file (conf, keyrings, monitor store,
# sockets, logs, pid files) lives under DIR and every command takes
# `-c DIR/ceph.conf`.
#
#   cluster.sh start DIR [--cephx] [--owner PID]
#       Boots the cluster and prints the path of DIR/ceph.conf on stdout.
#       --cephx: cephx auth with generated keys; the admin keyring is
#                DIR/keyring (the conf names it, so `-c` alone suffices).
#       --owner PID: a watcher stops the cluster once PID has gone (a test
#                binary that dies without stopping it leaves nothing).
#   cluster.sh stop DIR
#       Stops the daemons (TERM, then KILL after 10 s) and waits for them.
#       DIR (logs) is left for the caller to remove.
#
# Needs: ceph-mon ceph-osd ceph-common (Debian 12: Ceph 16.2).
set -euo pipefail

die() { echo "cluster.sh: $*" >&2; exit 1; }

need_tools() {
    local t missing=()
    for t in ceph-mon ceph-osd ceph monmaptool ceph-authtool rbd; do
        command -v "$t" >/dev/null || missing+=("$t")
    done
    if ((${#missing[@]})); then
        die "missing ${missing[*]}: apt-get install ceph-mon ceph-osd ceph-common"
    fi
}

# Two distinct free TCP ports on 127.0.0.1 (the kernel picks them; a race
# with another process taking one before the monitor binds is possible and
# shows as a monitor that does not start).
free_ports() {
    python3 - <<'EOF'
import socket
socks = []
for _ in range(2):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# Runs a daemon in the foreground of its own session, output to its log,
# its pid recorded in DIR/pids.
spawn() {
    local name=$1
    shift
    setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 &
    echo "$! $name" >>"$DIR/pids"
}

ceph_() { timeout 30 ceph -c "$CONF" "$@"; }

# Waits (up to $2 tenths of a second) for a command to succeed.
wait_for() {
    local what=$1 tries=$2
    shift 2
    while ! "$@" >/dev/null 2>&1; do
        tries=$((tries - 1))
        ((tries > 0)) || die "$what did not come up; logs in $DIR/log"
        sleep 0.1
    done
}

osd_up() { ceph_ osd dump 2>/dev/null | grep -q '^osd\.0 up'; }

start() {
    need_tools
    local cephx=0 owner=""
    while (($#)); do
        case $1 in
            --cephx) cephx=1 ;;
            --owner) owner=$2; shift ;;
            *) die "unknown option $1" ;;
        esac
        shift
    done
    [[ -e $DIR/pids ]] && die "$DIR already holds a cluster (stop it first)"
    mkdir -p "$DIR"/{log,run,mon.a,osd.0}
    DIR=$(cd "$DIR" && pwd)
    CONF=$DIR/ceph.conf
    local fsid osd_uuid p1 p2 auth
    fsid=$(cat /proc/sys/kernel/random/uuid)
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    read -r p1 p2 < <(free_ports)
    if ((cephx)); then auth=cephx; else auth=none; fi

    cat >"$CONF" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$p2,v1:127.0.0.1:$p1]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv6 = false
auth cluster required = $auth
auth service required = $auth
auth client required = $auth
keyring = $DIR/keyring
run dir = $DIR/run
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
log file = $DIR/log/\$name.log
log to stderr = false
err to stderr = false
mon cluster log file = $DIR/log/cluster.log
crash dir = $DIR/crash
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon allow pool delete = true
osd crush chooseleaf type = 0
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 1
# A test cluster on a nearly full disk must still start (Ceph refuses
# below 5% free by default).
mon data avail crit = 0

[client]
# Many clients at once (each test's connections, the rbd tool): no admin
# socket, a log of their own.
admin socket =
log file = $DIR/log/\$name.\$pid.log

[mon]
mon data = $DIR/mon.\$id
paxos propose interval = 0.05
paxos min wait = 0.01

[osd]
osd data = $DIR/osd.\$id
keyring = $DIR/osd.\$id/keyring
osd objectstore = memstore
memstore device bytes = 4294967296
memstore page set = true
osd crush initial weight = 1
osd class update on start = false
osd max object name len = 460
osd max object namespace len = 64
EOF

    if ((cephx)); then
        ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. \
            --cap mon 'allow *' >/dev/null
        ceph-authtool "$DIR/keyring" --gen-key -n client.admin \
            --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
        ceph-authtool --create-keyring "$DIR/osd.0/keyring" --gen-key -n osd.0 >/dev/null
    else
        : >"$DIR/keyring"
        : >"$DIR/osd.0/keyring"
    fi

    monmaptool --create --addv a "[v2:127.0.0.1:$p2,v1:127.0.0.1:$p1]" \
        --fsid "$fsid" "$DIR/monmap" >/dev/null
    ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" \
        --keyring "$DIR/keyring" >>"$DIR/log/mkfs.out" 2>&1 \
        || die "ceph-mon --mkfs failed; see $DIR/log/mkfs.out"
    spawn mon.a ceph-mon -c "$CONF" -f -i a
    [[ -n $owner ]] && watch_owner "$owner"

    if ((cephx)); then
        # The OSD's key goes into the monitor's database with the new OSD.
        local key
        key=$(ceph-authtool -p -n osd.0 "$DIR/osd.0/keyring")
        printf '{"cephx_secret": "%s"}\n' "$key" >"$DIR/osd.0/secrets.json"
        ceph_ osd new "$osd_uuid" -i "$DIR/osd.0/secrets.json" >/dev/null \
            || die "ceph osd new failed; logs in $DIR/log"
    else
        ceph_ osd new "$osd_uuid" >/dev/null || die "ceph osd new failed; logs in $DIR/log"
    fi
    ceph-osd -c "$CONF" --mkfs -i 0 --osd-uuid "$osd_uuid" \
        >>"$DIR/log/mkfs.out" 2>&1 || die "ceph-osd --mkfs failed; see $DIR/log/mkfs.out"
    spawn osd.0 ceph-osd -c "$CONF" -f -i 0
    wait_for "osd.0" 600 osd_up

    ceph_ osd pool create rbd 8 8 >/dev/null 2>&1 || die "pool create failed"
    timeout 30 rbd -c "$CONF" pool init rbd || die "rbd pool init failed"
    echo "$CONF"
}

# A detached watcher that stops the cluster when the owner process is gone.
watch_owner() {
    local owner=$1 self
    self=$(readlink -f "$0")
    setsid bash -c '
        while kill -0 "$1" 2>/dev/null && [[ -e "$3/pids" ]]; do sleep 1; done
        [[ -e "$3/pids" ]] && exec "$2" stop "$3"
    ' watcher "$owner" "$self" "$DIR" </dev/null >>"$DIR/log/watcher.out" 2>&1 &
    echo "$! watcher" >>"$DIR/pids"
}

# Whether a process is running: a zombie has exited (its reaper, whoever
# inherited it, may take a while) and counts as gone.
running() {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z ]]
}

stop() {
    [[ -e $DIR/pids ]] || return 0
    local pid name tries
    # Newest first, each waited for before the next: the watcher, the OSD
    # (which tells the monitor it goes down: with the monitor gone first it
    # waits 5 s for it), then the monitor. Each runs in a session of its
    # own (setsid), so its process group is signalled. Only a process that
    # is still ours (its command line names DIR) is; the watcher that runs
    # this stop skips itself.
    while read -r pid name; do
        [[ $pid == "$$" ]] && continue
        grep -qs "$DIR" "/proc/$pid/cmdline" || continue
        kill -TERM -- "-$pid" 2>/dev/null || continue
        tries=100
        while running "$pid"; do
            tries=$((tries - 1))
            if ((tries <= 0)); then
                echo "cluster.sh: $name did not stop in 10 s; killed" >&2
                kill -KILL -- "-$pid" 2>/dev/null || true
            fi
            sleep 0.05
        done
    done < <(tac "$DIR/pids")
    rm -f "$DIR/pids"
}

cmd=${1:-}
[[ -n $cmd && -n ${2:-} ]] || die "usage: cluster.sh start|stop DIR [--cephx] [--owner PID]"
DIR=$2
shift 2
case $cmd in
    start) start "$@" ;;
    stop) DIR=$(cd "$DIR" 2>/dev/null && pwd) || exit 0; stop ;;
    *) die "unknown command $cmd" ;;
esac
