#!/usr/bin/env bash
# Set up (if needed) and run the test suite: offline, CPU, tiny models, a few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q "$@"
