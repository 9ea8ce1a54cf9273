#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for tests and for trying the launcher.
#
#   sudo bash slurm/local_cluster.sh start    install (Debian packages) if missing, start, wait
#   sudo bash slurm/local_cluster.sh status   sinfo / squeue
#   sudo bash slurm/local_cluster.sh stop     stop the daemons (state and logs stay)
#
# Two nodes, n1 and n2, each a slurmd on this host (ports 17001, 17002), both
# resolving to 127.0.0.1; one controller; a partition `debug`; no accounting.
# Everything lives under $SLURM_LOCAL_DIR (default /tmp/pimc-slurm): slurm.conf,
# state, spool, logs (log/slurmctld.log, log/slurmd-n1.log, ...). The config is
# linked to /etc/slurm/slurm.conf so that sbatch/srun/sinfo find it.
#
# Knobs (environment): SLURM_LOCAL_DIR, SLURM_LOCAL_CPUS (CPUs each node offers,
# default: this machine's core count; the nodes share the cores), SLURM_LOCAL_MEM_MB
# (memory each node offers, default: half of this machine's).
# Needs root (packages, /etc/hosts, /etc/slurm, daemons running as root).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/tmp/pimc-slurm}
HOST=$(hostname)
NODES=(n1 n2)
PORTS=(17001 17002)
CTLD_PORT=16817
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
MEM_MB=${SLURM_LOCAL_MEM_MB:-$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2))}
CONF=$DIR/slurm.conf
MARK="# written by pimc_dist slurm/local_cluster.sh"

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "run as root (it installs packages, edits /etc/hosts and starts daemons)"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return
    fi
    echo "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q slurmctld slurmd slurm-client munge
}

start_munge() {
    # munge authenticates every Slurm message; one daemon serves all slurmd and clients.
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.2
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

add_hosts() {
    # n1/n2 must resolve on this host: Slurm contacts them, and jobs use the first
    # node name as the rendezvous address.
    local name
    for name in "${NODES[@]}"; do
        grep -qE "^127\.0\.0\.1[[:space:]].*\b${name}\b" /etc/hosts || echo "127.0.0.1 ${name}" >>/etc/hosts
    done
}

write_config() {
    mkdir -p "$DIR"/{state,log,run} "${NODES[@]/#/$DIR/spool/}"
    cat >"$CONF" <<EOF
$MARK
ClusterName=pimc-local
SlurmctldHost=$HOST
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Credentials live 10 s instead of 120 s: a requeued job may start again after that
# long (Slurm waits out the old credential), which keeps requeue tests short.
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
# No cgroups: linuxproc tracks job processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Accounting off: no slurmdbd, so sacct does not work; scontrol/squeue do.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Both nodes offer this machine's cores; do not mark them invalid for that.
SlurmdParameters=config_overrides
ReturnToService=2
# Finished jobs stay visible to scontrol for 5 minutes (exit codes for --wait).
MinJobAge=300
KillWait=10
InactiveLimit=0
SlurmdTimeout=60
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
NodeName=n[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=${PORTS[0]}-${PORTS[1]} CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
    mkdir -p /etc/slurm
    if [ -e /etc/slurm/slurm.conf ] && [ ! -L /etc/slurm/slurm.conf ] \
        && ! grep -qF "$MARK" /etc/slurm/slurm.conf; then
        die "/etc/slurm/slurm.conf exists and is not ours; move it away first"
    fi
    ln -sfn "$CONF" /etc/slurm/slurm.conf
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    need_root
    install_packages
    start_munge
    add_hosts
    write_config
    if ! pid_alive "$DIR/run/slurmctld.pid"; then
        # -i: ignore state from an earlier run that no longer matches the config.
        slurmctld -f "$CONF" -i
    fi
    for name in "${NODES[@]}"; do
        pid_alive "$DIR/run/slurmd-$name.pid" || slurmd -f "$CONF" -N "$name"
    done
    # Nodes that were down (an earlier stop) come back once their slurmd registers.
    for _ in $(seq 120); do
        local idle
        idle=$(sinfo -h -N -p debug -t idle,mix,alloc -o "%N" 2>/dev/null | sort -u | tr '\n' ' ')
        if [ "$idle" = "n1 n2 " ]; then
            echo "local Slurm cluster up: nodes n1 n2 (partition debug), config $CONF, logs $DIR/log"
            sinfo -N
            return
        fi
        scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true
        sleep 1
    done
    sinfo -N >&2 || true
    tail -n 20 "$DIR"/log/*.log >&2 || true
    die "nodes n1 n2 did not become idle within 120 s (logs above, $DIR/log)"
}

stop_pidfile() {
    local pidfile=$1 pid
    pid_alive "$pidfile" || return 0
    pid=$(cat "$pidfile")
    kill "$pid"
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    need_root
    local name
    for name in "${NODES[@]}"; do
        stop_pidfile "$DIR/run/slurmd-$name.pid"
    done
    stop_pidfile "$DIR/run/slurmctld.pid"
    echo "local Slurm cluster stopped (state and logs kept in $DIR)"
}

status() {
    local up=0 name
    pid_alive "$DIR/run/slurmctld.pid" && echo "slurmctld: running" || { echo "slurmctld: stopped"; up=1; }
    for name in "${NODES[@]}"; do
        pid_alive "$DIR/run/slurmd-$name.pid" && echo "slurmd $name: running" \
            || { echo "slurmd $name: stopped"; up=1; }
    done
    if [ $up = 0 ]; then
        sinfo -N
        squeue
    fi
    return $up
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: bash slurm/local_cluster.sh start|stop|status" >&2
        exit 2
        ;;
esac
