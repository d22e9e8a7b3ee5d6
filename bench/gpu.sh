#!/usr/bin/env bash
# The GPU work of rlcli in one command, for a CUDA machine available for a short while:
# the GPU tests, then the GPU benchmarks, each under its own time limit, all under one overall budget.
#
#   bash bench/gpu.sh [OUTDIR]        # on the GPU machine, in the repository root
#   bash bench/gpu.sh --fetch-wheels  # BEFOREHAND, on a machine that reaches PyPI: writes .whl/
#
# The GPU machine has no network at all. The script uses `python` from PATH (else `python3`; or $PYTHON) and
# expects torch with CUDA, transformers, accelerate, peft, rich, typer and pyyaml to be there already. What rlcli
# needs beyond that (pydantic, datasets and their small dependencies) it installs from the wheels in .whl/
# (or $RLCLI_WHEELS) into /tmp/rlcli-site, without network; `--fetch-wheels` downloads them, at the versions of the
# environment it runs in, for CPython 3.12 (WHEEL_PYTHON) on x86-64 Linux. rlcli itself and the tests are imported from the
# checkout (PYTHONPATH), nothing is installed into the system.
#
# Output goes to OUTDIR (default: $OUT if set, else runs/gpu), at most 8 files:
#   gpu.log      everything printed, in order
#   summary.txt      one line per step: exit status and seconds
#   sft.json, sft_gc.json, ppo_tiny.json, ppo_big.json, ppo_big_bf16.json   the benchmarks' --json output
#
# Steps (in order; a failing or timed-out step does not stop the others; the exit status is 1 if any failed):
#   1. environment: torch version and CUDA, GPU, library versions; stop here if rlcli cannot be imported
#   2. python -m pytest tests/gpu                                     (limit 240 s)
#   3. bench/sft_throughput.py, Qwen2-0.5B shape, seq 1024, micro 8, bf16             (limit 150 s)
#   4. the same with --gradient-checkpointing                          (limit 150 s)
#   5. bench/ppo_step.py --device cuda on configs/tiny/ppo.yaml        (limit 120 s)
#   6. the same, n_embd 1024, 12 layers, 16 heads (~150 M parameters)  (limit 150 s)
#   7. the same with train.mixed_precision=bf16                        (limit 120 s)
# Overall budget GPU_BUDGET_S (default 540 s): a step gets at most what is left of it, and a step with
# under 30 s left is skipped, so the whole script ends inside a 10-minute command. Expected on an H100: 3-5 min.

set -uo pipefail  # no -e: a failing step is recorded and the next one runs
cd "$(dirname "$0")/.." || exit 1

WHEELS=${RLCLI_WHEELS:-.whl}
# what a bare CUDA PyTorch image lacks; pydantic wants typing_extensions>=4.16
WHEEL_PACKAGES=(pydantic pydantic_core annotated-types typing-inspection typing_extensions datasets dill multiprocess)

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  PY=${PYTHON:-python}
  specs=()
  for pkg in "${WHEEL_PACKAGES[@]}"; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$pkg") || {
      echo "error: $pkg is not installed here; run this in rlcli's environment (. .venv/bin/activate)" >&2; exit 1; }
    specs+=("$pkg==$version")
  done
  mkdir -p "$WHEELS"
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version "${WHEEL_PYTHON:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$WHEELS" "${specs[@]}" || exit 1
  du -sh "$WHEELS"
  echo "done: $WHEELS holds ${specs[*]}"
  echo "git ignores $WHEELS: name it in the device run's carry, e.g. carry=[\".whl\"]"
  exit 0
fi

# step NAME LIMIT_S CMD...: run CMD under `timeout`, capped by what is left of the budget; record status and time
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  if ((left < 30)); then
    echo "== $name: SKIPPED, ${left}s of the budget left"
    echo "$name: skipped (budget)" >>"$SUMMARY"
    return
  fi
  ((limit > left)) && limit=$left
  echo
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@"
  local rc=$?
  local status="rc=$rc"
  ((rc == 124 || rc == 137)) && status="TIMED OUT after ${limit}s"
  echo "== $name: $status, $((SECONDS - t0))s"
  echo "$name: $status, $((SECONDS - t0))s" >>"$SUMMARY"
  ((rc == 0)) || FAILED=$((FAILED + 1))
}

main() {
  if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
  elif command -v python >/dev/null 2>&1; then PY=python
  else PY=python3
  fi
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  FAILED=0
  BUDGET_S=${GPU_BUDGET_S:-540}
  DEADLINE=$((SECONDS + BUDGET_S))

  echo "== bench/gpu.sh: $(date -u '+%Y-%m-%dT%H:%M:%SZ'), output in $OUTDIR, budget ${BUDGET_S}s, python $(command -v "$PY")"
  "$PY" -c 'import torch; print(torch.__version__, torch.cuda.is_available())'

  # step 1: the packages the image lacks, from carried wheels; then the versions the run uses
  wheels=("$WHEELS"/*.whl)
  if [[ -e "${wheels[0]}" ]]; then
    echo "== installing ${#wheels[@]} wheel(s) from $WHEELS into /tmp/rlcli-site (no network, no deps)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rlcli-site \
      "${wheels[@]}" && export PYTHONPATH="/tmp/rlcli-site:$PYTHONPATH"
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "(no nvidia-smi)"
  "$PY" - <<'EOF'
import importlib.metadata as m
import torch
versions = []
for name in ("transformers", "accelerate", "peft", "datasets", "pydantic", "safetensors", "tokenizers", "pytest"):
    try:
        versions.append(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        versions.append(f"{name} MISSING")
print(f"torch {torch.__version__}  " + "  ".join(versions))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
EOF
  if ! "$PY" -c 'import rlcli.cli, rlcli.trainers.ppo, rlcli.trainers.sft' ; then
    echo "== STOP: rlcli does not import (traceback above). Missing packages: run 'bash bench/gpu.sh --fetch-wheels'"
    echo "   on a machine with PyPI and carry .whl/ along; nothing else was run."
    echo "setup: rlcli import failed" >>"$SUMMARY"
    exit 3
  fi
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "== note: torch sees no CUDA device; the GPU tests will skip and the benchmarks will fail"
  fi

  step pytest-gpu 240 "$PY" -m pytest tests/gpu -q -rA -p no:cacheprovider
  step sft-throughput 150 "$PY" bench/sft_throughput.py --json "$OUTDIR/sft.json"
  step sft-throughput-gc 150 "$PY" bench/sft_throughput.py --gradient-checkpointing --json "$OUTDIR/sft_gc.json"
  step ppo-step-tiny 120 "$PY" bench/ppo_step.py configs/tiny/ppo.yaml --device cuda --json "$OUTDIR/ppo_tiny.json"
  BIG=(model.config.n_embd=1024 model.config.n_layer=12 model.config.n_head=16)
  step ppo-step-big 150 "$PY" bench/ppo_step.py configs/tiny/ppo.yaml "${BIG[@]}" --device cuda --json "$OUTDIR/ppo_big.json"
  step ppo-step-big-bf16 120 "$PY" bench/ppo_step.py configs/tiny/ppo.yaml "${BIG[@]}" train.mixed_precision=bf16 \
    --device cuda --json "$OUTDIR/ppo_big_bf16.json"

  echo
  echo "== summary ($SECONDS s in all, $FAILED step(s) failed)"
  cat "$SUMMARY"
  ((FAILED == 0))
}

OUTDIR=${1:-${OUT:-runs/gpu}}
mkdir -p "$OUTDIR"
SUMMARY="$OUTDIR/summary.txt"
: >"$SUMMARY"
main 2>&1 | tee "$OUTDIR/gpu.log"
exit "${PIPESTATUS[0]}"
