#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for integration tests (see README.md here).
#
#   scripts/slurm/cluster.sh up DIR     start it under DIR; prints KEY=VALUE lines to export
#   scripts/slurm/cluster.sh down DIR   stop every daemon (and job process) it started; idempotent
#   scripts/slurm/cluster.sh env DIR    print the KEY=VALUE lines of a cluster that is up
#
# Everything lives under DIR: slurm.conf, a private munged (own key and socket), state, spool,
# logs, pid files. Nodes `brats-n1` and `brats-n2` are two slurmd (Slurm's multiple-slurmd mode,
# `slurmd -N`), each in its own UTS + mount namespace: `hostname` says brats-n1 / brats-n2 there,
# and a private /etc/hosts (a bind mount seen only by that slurmd and its jobs) maps brats-n1 ->
# 127.0.2.1, brats-n2 -> 127.0.2.2. The network stack is the host's: jobs reach each other and
# the host's loopback services. Must run as root (namespaces, munged, jobs run as root).
#
# Knobs (environment): BRATS_SLURM_CPUS (per node; default: nproc), BRATS_SLURM_MEMORY_MB (per
# node; default: half of MemTotal, at most 16384), BRATS_SLURM_PORT_BASE (first port tried;
# default 26817), BRATS_SLURM_UP_TIMEOUT_S (default 60).
set -euo pipefail

NODES=(brats-n1 brats-n2)
NODE_ADDRS=(127.0.2.1 127.0.2.2)
CTL_NAME=brats-ctl
PARTITION=debug

die() { echo "cluster.sh: $*" >&2; exit 1; }
say() { echo "cluster.sh: $*" >&2; }

usage() {
    echo "usage: $0 up|down|env DIR" >&2
    exit 2
}

[ $# -eq 2 ] || usage
CMD=$1
[ -n "$2" ] || usage
case "$2" in /*) DIR=$2 ;; *) DIR=$PWD/$2 ;; esac
DIR=${DIR%/}
CONF=$DIR/slurm.conf
RUN=$DIR/run
LOG=$DIR/log

# ---------------------------------------------------------------- processes and pid files

# The pid in FILE if that process is alive and its command line contains MARK (guards against a
# reused pid); empty otherwise.
live_pid() {
    local file=$1 mark=$2 pid
    [ -s "$file" ] || return 0
    pid=$(tr -dc '0-9' <"$file")
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 0
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$mark"; then
        echo "$pid"
    fi
}

ctl_pid() { live_pid "$RUN/slurmctld.pid" "$CONF"; }
node_pid() { live_pid "$RUN/slurmd-$1.pid" "-N $1"; }
munge_pid() { live_pid "$DIR/munge/munged.pid" "$DIR/munge/munge.socket"; }

# Pids of every live process in any of the UTS namespaces given (as "uts:[inode]" strings).
pids_in_ns() {
    [ $# -gt 0 ] || return 0
    find /proc -mindepth 3 -maxdepth 3 -path '/proc/[0-9]*/ns/uts' -printf '%l %h\n' 2>/dev/null |
        awk -v want=" $* " 'index(want, " " $1 " ") { split($2, a, "/"); print a[3] }'
}

# The UTS namespace recorded for NAME at `up`, if it still exists and still carries that
# hostname (namespace inodes can be reused once a namespace is gone).
recorded_ns() {
    local name=$1 ns p
    [ -s "$RUN/$name.uts" ] || return 0
    ns=$(cat "$RUN/$name.uts")
    for p in $(pids_in_ns "$ns"); do
        if [ "$(nsenter -t "$p" -u cat /proc/sys/kernel/hostname 2>/dev/null)" = "$name" ]; then
            echo "$ns"
            return 0
        fi
    done
}

# The UTS namespace of NAME (a daemon's, from its live PID or as recorded at `up`); never the
# host's own.
ns_of() {
    local name=$1 pid=$2 ns=""
    if [ -n "$pid" ]; then ns=$(readlink "/proc/$pid/ns/uts" 2>/dev/null || true); fi
    [ -n "$ns" ] || ns=$(recorded_ns "$name")
    if [ -n "$ns" ] && [ "$ns" != "$(readlink /proc/1/ns/uts)" ] && [ "$ns" != "$(readlink /proc/self/ns/uts)" ]; then
        echo "$ns"
    fi
}

alive() {
    local p line rest
    for p in "$@"; do
        read -r line 2>/dev/null <"/proc/$p/stat" || continue
        rest=${line##*) }
        [ "${rest%% *}" != Z ] && echo "$p"
    done
    return 0
}

# Stops every process in the namespaces NS... plus the pids PIDS... (lists separated by "--"):
# SIGTERM (also to any process that appears meanwhile, e.g. a job's trap handler), up to 5 s,
# then SIGKILL until none is left (10 s more at most).
stop_all() {
    local nss=() pids=() left i
    while [ $# -gt 0 ] && [ "$1" != -- ]; do nss+=("$1"); shift; done
    [ $# -gt 0 ] && shift
    pids=("$@")
    local termed=" " p t0 now
    t0=${EPOCHREALTIME//[!0-9]/}
    while :; do
        # shellcheck disable=SC2046
        left=$(alive $(pids_in_ns "${nss[@]}") "${pids[@]}")
        [ -n "$left" ] || return 0
        now=${EPOCHREALTIME//[!0-9]/}
        [ $((now - t0)) -lt 15000000 ] || break
        for p in $left; do
            if [ $((now - t0)) -ge 5000000 ]; then
                kill -KILL "$p" 2>/dev/null || true
            elif [[ "$termed" != *" $p "* ]]; then
                kill -TERM "$p" 2>/dev/null || true
                termed+="$p "
            fi
        done
        sleep 0.1
    done
    say "some processes survived SIGKILL: $left"
}

is_up() {
    [ -n "$(munge_pid)" ] && [ -n "$(ctl_pid)" ] || return 1
    local n
    for n in "${NODES[@]}"; do [ -n "$(node_pid "$n")" ] || return 1; done
}

anything_running() {
    [ -n "$(munge_pid)" ] || [ -n "$(ctl_pid)" ] && return 0
    local n
    for n in "${NODES[@]}"; do
        [ -n "$(node_pid "$n")" ] || [ -n "$(recorded_ns "$n")" ] && return 0
    done
    [ -n "$(recorded_ns "$CTL_NAME")" ] && return 0
    return 1
}

do_down() {
    [ -d "$DIR" ] || return 0
    local n nss=() extra=() ns pid
    # Nodes (slurmd, slurmstepd and every job process) and the controller (slurmctld,
    # slurmscriptd) together, by namespace; munged last.
    for n in "${NODES[@]}" "$CTL_NAME"; do
        if [ "$n" = "$CTL_NAME" ]; then pid=$(ctl_pid); else pid=$(node_pid "$n"); fi
        ns=$(ns_of "$n" "$pid")
        if [ -n "$ns" ]; then nss+=("$ns"); elif [ -n "$pid" ]; then extra+=("$pid"); fi
    done
    stop_all "${nss[@]}" -- "${extra[@]}"
    pid=$(munge_pid)
    [ -z "$pid" ] || stop_all -- "$pid"
    rm -f "$RUN"/*.pid "$RUN"/*.uts "$DIR/munge/munged.pid" 2>/dev/null || true
}

# ---------------------------------------------------------------- setup

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (namespaces, munged, jobs run as root)"; }

ensure_packages() {
    local missing=0 c
    for c in slurmctld slurmd sbatch srun sinfo scontrol munged munge unshare nsenter; do
        command -v "$c" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$c" >/dev/null 2>&1 || missing=1
    done
    [ $missing = 1 ] || return 0
    command -v apt-get >/dev/null || die "Slurm/munge missing and no apt-get to install them"
    say "installing slurm-wlm and munge (apt-get)..."
    local log
    log=$(mktemp /tmp/slurm-apt.XXXXXX)
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends slurm-wlm munge util-linux >"$log" 2>&1; then
        if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge util-linux; } >>"$log" 2>&1; then
            tail -n 20 "$log" >&2
            rm -f "$log"
            die "apt-get install slurm-wlm munge failed"
        fi
    fi
    rm -f "$log"
}

# Listening TCP ports (decimal), from /proc (no ss/netstat needed).
listening_ports() {
    local hex
    awk '$4 == "0A" { n = split($2, a, ":"); print a[n] }' /proc/net/tcp /proc/net/tcp6 2>/dev/null |
        while read -r hex; do echo $((16#$hex)); done
}

# N free ports from BRATS_SLURM_PORT_BASE up (below the ephemeral range), not listened on and
# not claimed by another cluster.sh cluster's slurm.conf that is up.
pick_ports() {
    local want=$1 base=${BRATS_SLURM_PORT_BASE:-26817} used p got=()
    used=" $(listening_ports | tr '\n' ' ') "
    # Ports of clusters that are starting (their daemons may not listen yet) are excluded by the
    # lock held around `up`; those that are up listen.
    for ((p = base; p < base + 2000 && ${#got[@]} < want; p++)); do
        case "$used" in *" $p "*) continue ;; esac
        got+=("$p")
    done
    [ ${#got[@]} -eq "$want" ] || die "no $want free TCP ports from $base"
    echo "${got[@]}"
}

print_env() {
    echo "SLURM_CONF=$CONF"
    echo "BRATS_SLURM_DIR=$DIR"
    echo "BRATS_SLURM_NODES=$(IFS=,; echo "${NODES[*]}")"
    echo "BRATS_SLURM_PARTITION=$PARTITION"
    # Slurm's commands live in /usr/bin; the daemons in /usr/sbin (not needed by clients).
    case ":$PATH:" in *:/usr/bin:*) ;; *) echo "PATH=/usr/bin:$PATH" ;; esac
}

tail_logs() {
    local f
    for f in "$DIR/munge/munged.log" "$LOG"/*.log "$LOG"/*.out; do
        [ -s "$f" ] || continue
        echo "---- $f (last 15 lines)" >&2
        tail -n 15 "$f" >&2
    done
}

write_conf() {
    local ctl_port=$1 n1_port=$2 n2_port=$3 cpus mem
    cpus=${BRATS_SLURM_CPUS:-$(nproc)}
    if [ -n "${BRATS_SLURM_MEMORY_MB:-}" ]; then
        mem=$BRATS_SLURM_MEMORY_MB
    else
        mem=$(awk '/^MemTotal:/ { m = int($2 / 1024 / 2); if (m > 16384) m = 16384; print m }' /proc/meminfo)
    fi
    cat >"$CONF.tmp" <<EOF
# Written by scripts/slurm/cluster.sh up $DIR: a two-node test cluster on one machine.
ClusterName=brats
SlurmctldHost=$CTL_NAME(127.0.0.1)
SlurmctldPort=$ctl_port
SlurmdPort=$n1_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
MailProg=/bin/true
NodeName=${NODES[0]} NodeHostname=${NODES[0]} NodeAddr=${NODE_ADDRS[0]} Port=$n1_port CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=${NODES[1]} NodeHostname=${NODES[1]} NodeAddr=${NODE_ADDRS[1]} Port=$n2_port CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    # The nodes' /etc/hosts: the host's own lines, then the cluster's names.
    {
        grep -v -E '(^|[[:space:]])(brats-n[0-9]+|brats-ctl)([[:space:]]|$)' /etc/hosts || true
        echo "# scripts/slurm/cluster.sh: the test cluster's names (seen by its nodes only)"
        echo "127.0.0.1 $CTL_NAME"
        local i
        for i in "${!NODES[@]}"; do echo "${NODE_ADDRS[$i]} ${NODES[$i]}"; done
    } >"$DIR/etc/hosts"
}

start_munged() {
    if [ ! -s "$DIR/munge-key/munge.key" ]; then
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$DIR/munge-key/munge.key" >/dev/null 2>&1 || true
        fi
        [ -s "$DIR/munge-key/munge.key" ] || dd if=/dev/urandom of="$DIR/munge-key/munge.key" bs=1024 count=1 status=none
        chmod 0400 "$DIR/munge-key/munge.key"
    fi
    rm -f "$DIR/munge/munge.socket" "$DIR/munge/munge.socket.lock"
    # --force: munged otherwise refuses a socket whose directory or an ancestor is not
    # executable by all (e.g. a 0700 temp dir) or is group/world-writable; only root uses it.
    if ! munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge-key/munge.key" \
        --log-file="$DIR/munge/munged.log" --pid-file="$DIR/munge/munged.pid" \
        --seed-file="$DIR/munge-key/munged.seed" </dev/null >"$LOG/munged.out" 2>&1 9<&-; then
        cat "$LOG/munged.out" >&2
        die "munged did not start"
    fi
}

start_ctl() {
    # Own UTS namespace, hostname brats-ctl: SlurmctldHost then matches whatever this machine is
    # called.
    # shellcheck disable=SC2016
    unshare --uts -- sh -c 'echo "$1" > /proc/sys/kernel/hostname && exec slurmctld -f "$2"' sh "$CTL_NAME" "$CONF" \
        </dev/null >"$LOG/slurmctld.out" 2>&1 9<&- || { tail_logs; die "slurmctld did not start"; }
}

start_node() {
    local name=$1
    # Own UTS + mount namespace: hostname = node name, and /etc/hosts = DIR/etc/hosts (private
    # bind mount: the host's /etc/hosts is untouched). slurmd daemonizes; slurmstepd and the jobs
    # inherit both namespaces.
    # shellcheck disable=SC2016
    unshare --uts --mount --propagation private -- sh -c \
        'mount --bind "$2" /etc/hosts && echo "$1" > /proc/sys/kernel/hostname && exec slurmd -f "$3" -N "$1"' \
        sh "$name" "$DIR/etc/hosts" "$CONF" </dev/null >"$LOG/slurmd-$name.out" 2>&1 9<&- || { tail_logs; die "slurmd $name did not start"; }
}

record_ns() {
    local name=$1 pidfn=$2 i pid=""
    for ((i = 0; i < 50; i++)); do
        pid=$($pidfn "${@:3}")
        [ -n "$pid" ] && break
        sleep 0.1
    done
    [ -n "$pid" ] || return 1
    readlink "/proc/$pid/ns/uts" >"$RUN/$name.uts"
}

wait_ready() {
    local timeout=${BRATS_SLURM_UP_TIMEOUT_S:-60} start now states
    start=$(date +%s)
    while :; do
        states=$(SLURM_CONF=$CONF sinfo -h -N -p "$PARTITION" -o '%N %T' 2>/dev/null | sort -u || true)
        if [ "$(echo "$states" | grep -cE '^brats-n[12] idle$')" = "${#NODES[@]}" ]; then
            return 0
        fi
        now=$(date +%s)
        if [ $((now - start)) -ge "$timeout" ]; then
            say "nodes not idle after ${timeout}s; sinfo says:"
            echo "${states:-<nothing>}" >&2
            tail_logs
            return 1
        fi
        sleep 0.5
    done
}

do_up() {
    need_root
    ensure_packages
    mkdir -p "$DIR"
    if is_up; then
        say "cluster in $DIR is already up"
        print_env
        return 0
    fi
    # Serialize `up`s (port choice until the daemons listen) with a lock on this script itself.
    exec 9<"${BASH_SOURCE[0]}"
    flock -w 120 9 || die "another cluster.sh up holds the lock"
    if anything_running; then
        say "a partial cluster is running in $DIR; stopping it first"
        do_down
    fi
    local t0
    t0=$(date +%s.%N)
    rm -rf "$DIR/state" "$DIR/spool" "$RUN"
    mkdir -p "$DIR/state" "$RUN" "$LOG" "$DIR/etc" "$DIR/munge" "$DIR/munge-key"
    local n
    for n in "${NODES[@]}"; do mkdir -p "$DIR/spool/$n"; done
    chmod 0700 "$DIR/munge-key"
    : >"$DIR/jobcomp.txt"

    local ports
    read -r -a ports <<<"$(pick_ports 3)"
    write_conf "${ports[0]}" "${ports[1]}" "${ports[2]}"

    start_munged
    start_ctl
    record_ns "$CTL_NAME" ctl_pid || { tail_logs; do_down; die "slurmctld exited at start"; }
    for n in "${NODES[@]}"; do
        start_node "$n"
        record_ns "$n" node_pid "$n" || { tail_logs; do_down; die "slurmd $n exited at start"; }
    done
    if ! wait_ready; then
        do_down
        die "cluster in $DIR did not come up"
    fi
    flock -u 9
    say "up in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')s: nodes ${NODES[*]}, slurmctld port ${ports[0]}, slurmd ports ${ports[1]} ${ports[2]}"
    print_env
}

case "$CMD" in
up) do_up ;;
down)
    need_root
    do_down
    ;;
env)
    is_up || die "no cluster is up in $DIR"
    print_env
    ;;
*) usage ;;
esac
