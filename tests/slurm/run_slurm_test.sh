#!/usr/bin/env bash
# Test slurm/*.sbatch against a real Slurm started on this machine (a two-node cluster, both nodes on localhost).
#
#   bash tests/slurm/run_slurm_test.sh              # needs slurmctld, slurmd, sbatch, munged installed
#   bash tests/slurm/run_slurm_test.sh --install    # apt-get install them first (Debian/Ubuntu, as root)
#   options: --keep (keep the temp dir with logs)  --no-multi-node (only slurm/single_node.sbatch)
#            --one-node (one slurmd; multi_node.sbatch then runs with --nodes=1)
#
# What it does: writes a minimal slurm.conf for this machine (no cgroups, no accounting: containers usually
# have neither) with two nodes, node1 and node2, both served by slurmd daemons on localhost (one port each),
# starts its own munged, slurmctld and the slurmds on private ports and sockets (the system's munge and Slurm,
# if any, are left alone), waits for the nodes to be idle, and submits the real templates as CPU jobs
# (RLCLI_CPU=1) running the tiny SFT recipe for 5 steps (a checkpoint at step 4):
#   slurm/single_node.sbatch   1 node × 2 gloo processes
#   slurm/multi_node.sbatch    2 nodes × 1 process (srun + accelerate launch --machine_rank 0 / 1)
# It waits for them, checks that metrics.jsonl has steps 1..5, model.safetensors exists and the checkpoint holds
# the RNG states of 2 processes, and shuts everything down. About 35 s on 2 CPU cores (after the install).
# Exit status: 0 passed, 1 failed, 77 skipped (Slurm not installed and no --install, or not root).
# Environment: RLCLI_SLURM_PORT (slurmctld port, default 16817; the slurmds use the next two), PYTHON (the Python
# with rlcli installed; default: .venv/bin/python if present, else python3), RLCLI_SLURM_TIMEOUT (seconds a job
# may take, default 300).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
INSTALL=0 KEEP=0 MULTI=1 TWO=1
for arg in "$@"; do
    case "$arg" in
        --install) INSTALL=1 ;;
        --keep) KEEP=1 ;;
        --no-multi-node) MULTI=0 ;;
        --one-node) TWO=0 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "unknown option $arg" >&2; exit 2 ;;
    esac
done

say() { echo "[slurm-test $(date +%H:%M:%S)] $*"; }
skip() { say "SKIP: $*"; exit 77; }
START=$(date +%s)

if [ "$(id -u)" != 0 ]; then
    skip "needs root (slurmd starts job steps as the submitting user; munged and slurmd run here as root)"
fi
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    if [ "$INSTALL" = 1 ]; then
        say "installing slurmctld slurmd slurm-client munge (apt)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
    else
        skip "Slurm is not installed (slurmctld, slurmd, sbatch, munged); rerun with --install to apt-get it"
    fi
fi

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" -c "import rlcli, accelerate" || { say "FAIL: $PYTHON cannot import rlcli and accelerate"; exit 1; }
PYDIR=$(dirname "$PYTHON")

CTLD_PORT=${RLCLI_SLURM_PORT:-16817}
SLURMD_PORT=$((CTLD_PORT + 1))
TIMEOUT=${RLCLI_SLURM_TIMEOUT:-300}
D=$(mktemp -d /tmp/rlcli-slurm.XXXXXX)
chmod 755 "$D"
mkdir -p "$D/munge" "$D/state" "$D/spool" "$D/log" "$D/jobs"
chmod 711 "$D/munge"
PIDS=()

cleanup() {
    local rc=$?
    set +e
    if [ -n "${SLURM_CONF:-}" ] && scontrol ping >/dev/null 2>&1; then  # cancel what still runs, let slurmd clean up
        scancel --partition=debug >/dev/null 2>&1
        for _ in $(seq 30); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
    fi
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
    done
    # anything left from this cluster (a job step that ignored its signals): only processes carrying this test's SLURM_CONF
    for proc in /proc/[0-9]*; do
        pid=${proc#/proc/}
        if [ "$pid" != $$ ] && tr '\0' '\n' 2>/dev/null < "/proc/$pid/environ" | grep -qx "SLURM_CONF=$D/slurm.conf"; then
            kill -9 "$pid" 2>/dev/null && say "killed leftover process $pid"
        fi
    done
    if [ "$rc" != 0 ] && [ "$rc" != 77 ]; then
        say "logs in $D/log and $D/jobs:"
        tail -n 25 "$D"/log/*.log "$D"/jobs/*.out 2>/dev/null
    fi
    if [ "$KEEP" = 1 ] || { [ "$rc" != 0 ] && [ "$rc" != 77 ]; }; then
        say "kept $D"
    else
        rm -rf "$D"
    fi
    say "finished in $(( $(date +%s) - START ))s with status $rc"
}
trap cleanup EXIT

# --- munge: a private daemon with its own key and socket --------------------------------------------------------
mungekey --create --keyfile="$D/munge/munge.key" 2>/dev/null \
    || dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
chmod 600 "$D/munge/munge.key"
munged --foreground --force --key-file="$D/munge/munge.key" --socket="$D/munge/munge.socket" \
    --pid-file="$D/munge/munged.pid" --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed" \
    >>"$D/log/munged.stdout" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do [ -S "$D/munge/munge.socket" ] && break; sleep 0.1; done
[ -S "$D/munge/munge.socket" ] || { say "FAIL: munged did not start"; exit 1; }

# --- slurm.conf: two nodes served from localhost (or one with --one-node), one partition, no cgroups ----------
CPUS=$(nproc)
MEM=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
if [ "$TWO" = 1 ]; then
    # two slurmd daemons on one host: each its own port, spool dir, pid file and log (%n = node name)
    NODES=(node1 node2)
    SLURMD_FILES="SlurmdSpoolDir=$D/spool/%n
SlurmdPidFile=$D/slurmd-%n.pid
SlurmdLogFile=$D/log/slurmd-%n.log"
    NODE_LINES="NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$SLURMD_PORT CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + 1)) CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
    mkdir -p "$D/spool/node1" "$D/spool/node2"
else
    NODES=(localhost)
    SLURMD_FILES="SlurmdSpoolDir=$D/spool
SlurmdPidFile=$D/slurmd.pid
SlurmdLogFile=$D/log/slurmd.log"
    NODE_LINES="NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
fi
cat > "$D/slurm.conf" <<EOF
ClusterName=rlcli-test
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/munge.socket
StateSaveLocation=$D/state
SlurmctldPidFile=$D/slurmctld.pid
SlurmctldLogFile=$D/log/slurmctld.log
$SLURMD_FILES
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MinJobAge=600
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
$NODE_LINES
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
export SLURM_CONF=$D/slurm.conf

say "starting slurmctld (port $CTLD_PORT) and slurmd for ${NODES[*]} (ports from $SLURMD_PORT); temp dir $D"
slurmctld -D -i -f "$SLURM_CONF" >>"$D/log/slurmctld.stdout" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
scontrol ping | grep -q UP || { say "FAIL: slurmctld did not come up"; exit 1; }
for node in "${NODES[@]}"; do
    slurmd -D -N "$node" -f "$SLURM_CONF" >>"$D/log/slurmd-$node.stdout" 2>&1 &
    PIDS+=($!)
done
for node in "${NODES[@]}"; do
    state=""
    for _ in $(seq 150); do
        state=$(sinfo -h -n "$node" -o %T 2>/dev/null | head -n1)
        [ "$state" = idle ] && break
        sleep 0.2
    done
    [ "$state" = idle ] || { say "FAIL: node $node is '${state}', not idle"; exit 1; }
done
say "node(s) ${NODES[*]} idle ($CPUS CPUs each)"

# --- jobs ---------------------------------------------------------------------------------------------------------
submit() {  # submit TEMPLATE NAME [sbatch options...]: the real template, as a CPU job, tiny SFT for 5 steps
    local template=$1 name=$2; shift 2
    PATH="$PYDIR:$PATH" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 RLCLI_CPU=1 RLCLI_NPROC=${NPROC_PER_NODE:-2} \
        RLCLI_OUTPUT_DIR="$D/runs/$name" \
        sbatch --parsable --job-name="rlcli-$name" --gpus-per-node=0 --cpus-per-task="$CPUS" --time=00:20:00 \
        --chdir="$REPO" --output="$D/jobs/$name-%j.out" "$@" "$REPO/$template" \
        sft configs/tiny/sft.yaml train.max_steps=5 train.save_every=4 logging.progress=false
}

job_processes() {  # job_processes ID: what the job's processes are doing (for a job that does not finish)
    local proc pid
    echo "processes of job $1 (pid ppid state elapsed wchan command):"
    for proc in /proc/[0-9]*; do
        pid=${proc#/proc/}
        if tr '\0' '\n' 2>/dev/null < "/proc/$pid/environ" | grep -qx "SLURM_JOB_ID=$1"; then
            ps -o pid=,ppid=,stat=,etime=,wchan:20=,args= -p "$pid" 2>/dev/null | cut -c1-220
        fi
    done
}

wait_job() {  # wait_job ID -> prints the final state
    local id=$1 st="" t0
    t0=$(date +%s)
    while :; do
        st=$(scontrol show job "$id" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' | head -n1)
        case "$st" in
            COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE|PREEMPTED) break ;;
        esac
        if [ $(( $(date +%s) - t0 )) -gt "$TIMEOUT" ]; then
            job_processes "$id" >&2
            scancel "$id" 2>/dev/null; st="TIMEOUT(test)"; break
        fi
        sleep 1
    done
    echo "$st"
}

check_run() {  # check_run NAME: 5 steps in metrics.jsonl, a saved model, 2 processes
    local out="$D/runs/$1"
    "$PYTHON" - "$out" <<'PY' || return 1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
steps = [r["step"] for r in rows]
assert steps == [1, 2, 3, 4, 5], f"metrics.jsonl steps {steps}"
assert all(r["loss"] == r["loss"] for r in rows), "NaN loss"
assert (out / "model.safetensors").is_file(), "no model.safetensors"
assert (out / "recipe.yaml").is_file(), "no recipe.yaml"
# every process saves its RNG state in a checkpoint: two files = two processes really ran
rng = sorted(p.name for p in out.glob("checkpoints/step-*/rng-*.pt"))
assert rng == ["rng-0.pt", "rng-1.pt"], f"expected RNG states of 2 processes in the step-4 checkpoint, got {rng}"
print(f"  {out}: steps {steps}, final loss {rows[-1]['loss']:.3f}, model.safetensors "
      f"{(out / 'model.safetensors').stat().st_size} bytes, checkpoint RNG states {rng}")
PY
}

run_case() {  # run_case TEMPLATE NAME [sbatch options...]
    local template=$1 name=$2 id st t0 log
    t0=$(date +%s)
    id=$(submit "$@")
    say "submitted $template as job $id"
    st=$(wait_job "$id")
    log=$(ls "$D"/jobs/"$name"-"$id".out)
    say "job $id ($name): $st in $(( $(date +%s) - t0 ))s"
    sed 's/^/  | /' "$log" | tail -n 12
    [ "$st" = COMPLETED ] || { say "FAIL: job $id ended $st"; return 1; }
    check_run "$name"
}

run_case slurm/single_node.sbatch single
if [ "$MULTI" = 1 ] && [ "$TWO" = 1 ]; then
    # two (simulated) nodes × 1 process: srun starts accelerate launch on each with machine_rank 0 and 1
    NPROC_PER_NODE=1 run_case slurm/multi_node.sbatch multi --nodes=2
    grep -q "node 1 (" "$D"/jobs/multi-*.out || { say "FAIL: no task ran on node 1"; exit 1; }
elif [ "$MULTI" = 1 ]; then
    # one node, 2 processes: the same srun + accelerate launch --machine_rank path, with one machine
    run_case slurm/multi_node.sbatch multi --nodes=1
fi
say "PASSED"
