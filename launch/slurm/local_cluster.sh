#!/usr/bin/env bash
# A real two-node Slurm cluster on this machine (127.0.0.1), to try nucleo's Slurm path.
#
#   launch/slurm/local_cluster.sh start /tmp/slurm   # prints: export SLURM_CONF=/tmp/slurm/slurm.conf
#   export SLURM_CONF=/tmp/slurm/slurm.conf
#   sinfo                                            # debug  up  infinite  2  idle  n[1-2]
#   NUCLEO_GPUS_PER_NODE=1 sbatch --nodes=2 --gpus-per-node=0 --cpus-per-task=1 \
#       launch/slurm/pretrain.sbatch experiments/configs/demo.yaml --set train.max_steps=20
#   launch/slurm/local_cluster.sh stop /tmp/slurm
#
# Needs root and Debian's slurm-wlm and munge (`apt-get install slurm-wlm munge`; `install` does
# that). One munged, one slurmctld and two slurmd ("nodes" n1 and n2, one CPU each) run from
# FOLDER with their state, logs and pid files there; `stop` cancels the cluster's jobs and ends
# the daemons by those pids. Ports: slurmctld 16817, the slurmd 16831 and 16832, or the next
# hundred up whose three ports are free (SLURM_LOCAL_PORT=P: P, P+14, P+15), so that two
# clusters (a test's beside yours) can run at once. The nodes' NodeAddr is 127.0.0.1 while
# their names do not resolve: jobs must take the address from Slurm, as on clusters whose node
# names are not in DNS. tests/slurm/conftest.py runs the Slurm tests on such a cluster.
set -euo pipefail

# whether something listens on 127.0.0.1:PORT (a connection is accepted)
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

usage() { echo "usage: $0 install | start FOLDER [CPUS_PER_NODE] | stop FOLDER" >&2; exit 2; }
[ $# -ge 1 ] || usage

case "$1" in
install)
    if command -v slurmctld >/dev/null && command -v munged >/dev/null; then exit 0; fi
    [ "$(id -u)" = 0 ] || { echo "installing Slurm needs root (apt-get install slurm-wlm munge)" >&2; exit 1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null; }
    ;;
start)
    [ $# -ge 2 ] || usage
    dir="$(mkdir -p "$2" && cd "$2" && pwd)"
    cpus="${3:-1}"
    [ "$(id -u)" = 0 ] || { echo "a local Slurm cluster runs its daemons as root: run as root" >&2; exit 1; }
    for tool in munged slurmctld slurmd sinfo; do
        command -v "$tool" >/dev/null || { echo "$tool not found: $0 install (apt-get install slurm-wlm munge)" >&2; exit 1; }
    done
    host="$(hostname)"
    if [ -n "${SLURM_LOCAL_PORT:-}" ]; then
        port="$SLURM_LOCAL_PORT"
    else
        port=16817
        while listening "$port" || listening $((port + 14)) || listening $((port + 15)); do
            port=$((port + 100))
            [ $((port + 15)) -lt 20000 ] || { echo "no free ports for slurmctld/slurmd" >&2; exit 1; }
        done
    fi
    mkdir -p "$dir/state" "$dir/spool/n1" "$dir/spool/n2" "$dir/munge"
    # munge: its own key, socket and pid in the folder (the system's munged, if any, is left alone)
    [ -f "$dir/munge/munge.key" ] || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1 count=1024 status=none
    chmod 700 "$dir/munge" && chmod 400 "$dir/munge/munge.key"
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    # cred_expire=5: a requeued job may start again cred_expire + 1 s later (default 120 s);
    # sched_interval and bf_interval: pending jobs are looked at every second, not every 30-60 s;
    # FirstJobId: job ids (and so master ports, 20000 + id) apart from another cluster's here
    cat > "$dir/slurm.conf" <<EOF
ClusterName=nucleo-local
FirstJobId=$(( (port - 16817) / 100 * 1000 + 1 ))
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$port
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=5
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
KillWait=5
MinJobAge=300
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + 14)) CPUs=$cpus RealMemory=10000
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$((port + 15)) CPUs=$cpus RealMemory=10000
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF="$dir/slurm.conf"
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF" -N n1
    slurmd -f "$SLURM_CONF" -N n2
    for _ in $(seq 1 60); do
        if [ "$(sinfo -h -o '%t' 2>/dev/null | sort -u | tr -d '\n')" = "idle" ] \
            && [ "$(sinfo -h -N -o '%N' 2>/dev/null | wc -l)" = 2 ]; then
            echo "export SLURM_CONF=$SLURM_CONF"
            exit 0
        fi
        sleep 0.5
    done
    echo "the local Slurm cluster did not come up in 30 s; logs in $dir:" >&2
    sinfo >&2 || true
    tail -n 5 "$dir"/*.log >&2 || true
    exit 1
    ;;
stop)
    [ $# -ge 2 ] || usage
    dir="$2"
    # the cluster's jobs first (their steps outlive slurmd), KillWait=5 s to end them
    if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        export SLURM_CONF="$dir/slurm.conf"
        jobs="$(squeue -h -o %A 2>/dev/null || true)"
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel --quiet $jobs 2>/dev/null || true
            for _ in $(seq 1 30); do
                [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
                sleep 0.5
            done
        fi
    fi
    # all four at once (each takes a second or two to shut down), then wait for them
    pids=()
    for pidfile in "$dir"/slurmd-n{1,2}.pid "$dir"/slurmctld.pid "$dir"/munge/munged.pid; do
        [ -f "$pidfile" ] || continue
        pid="$(cat "$pidfile")"
        kill "$pid" 2>/dev/null && pids+=("$pid")
        rm -f "$pidfile"
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    ;;
*)
    usage
    ;;
esac
