#!/usr/bin/env bash
# Set up (if needed) and run the offline demo: a tiny model built from scratch learns, with SFT and then PPO
# through a text environment, to use a calculator tool for multi-digit multiplication.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# One BLAS thread: tiny models gain nothing from more, and on small shared VMs thread hand-offs cost
# milliseconds per matmul. Override with OMP_NUM_THREADS=N.
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python recipes/calculator.py demo --out "${1:-runs/calculator}"
