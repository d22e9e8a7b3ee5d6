#!/usr/bin/env bash
# Count hangs at the end of two-process CPU runs: the literal `accelerate launch --cpu --num_processes 2` PPO
# command of tests/trainers/test_ppo_cli.py (24 steps, then --resume from step 12), TRIALS times, with LOAD
# busy-looping processes beside it (the hang this guards against is a race at process exit; load makes it likelier).
# A run counts as hung when it has not exited LIMIT seconds after it started; it is then killed with its workers.
#
#   bash bench/multiprocess_exit.sh               # TRIALS=15 LOAD=2 LIMIT=300
#   TRIALS=30 LOAD=2 bash bench/multiprocess_exit.sh
#
# Without rlcli.launch.release_distributed, 1 run in 8 and 1 in 15 hung (2 cores, LOAD=2).
set -uo pipefail
cd "$(dirname "$0")/.."
TRIALS=${TRIALS:-15} LOAD=${LOAD:-2} LIMIT=${LIMIT:-300}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1 COLUMNS=250 HF_HUB_OFFLINE=1
work=$(mktemp -d)
spinners=()
for _ in $(seq 1 "$LOAD"); do (while :; do :; done) & spinners+=($!); done
trap 'kill "${spinners[@]}" 2>/dev/null; rm -rf "$work"' EXIT

descendants() { local p; for p in $(pgrep -P "$1"); do echo "$p"; descendants "$p"; done; }

hangs=0 runs=0
for i in $(seq 1 "$TRIALS"); do
  for resume in "" "--resume"; do
    "$PY" -m accelerate.commands.launch --cpu --num_processes 2 --num_machines 1 --mixed_precision no \
      --dynamo_backend no -m rlcli ppo configs/tiny/ppo.yaml output_dir="$work/run$i" ppo.steps=24 \
      train.save_every=12 model.config.n_layer=2 model.config.n_embd=64 model.config.n_head=2 ppo.batch_size=32 \
      ppo.mini_batch_size=16 ppo.micro_batch_size=8 optim.learning_rate=1e-3 logging.progress=false \
      generation.max_new_tokens=24 $resume > "$work/log" 2>&1 &
    pid=$! start=$SECONDS
    while kill -0 "$pid" 2>/dev/null && (( SECONDS - start < LIMIT )); do sleep 1; done
    runs=$((runs + 1))
    if kill -0 "$pid" 2>/dev/null; then
      hangs=$((hangs + 1))
      echo "run $i ${resume:-(fresh)}: HUNG after $((SECONDS - start)) s; last line: $(tail -1 "$work/log")"
      kill -9 "$pid" $(descendants "$pid") 2>/dev/null
    else
      wait "$pid"; rc=$?
      echo "run $i ${resume:-(fresh)}: exit $rc in $((SECONDS - start)) s"
    fi
  done
done
echo "hung: $hangs of $runs runs (LOAD=$LOAD)"
