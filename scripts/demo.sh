#!/usr/bin/env bash
# Set up (if needed) and run the offline demo: a tiny model built from scratch is fine-tuned with rlcli sft.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# One BLAS thread: tiny models gain nothing from more, and on small shared VMs thread hand-offs cost
# milliseconds per matmul. Override with OMP_NUM_THREADS=N.
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec rlcli sft configs/tiny/sft.yaml output_dir="${1:-runs/demo-sft}" overwrite_output_dir=true
