#!/usr/bin/env bash
# Set up (if needed) and run the offline demo: a tiny model built from scratch is fine-tuned with rlcli sft.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec rlcli sft configs/tiny/sft.yaml output_dir="${1:-runs/demo-sft}" overwrite_output_dir=true
