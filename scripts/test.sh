#!/usr/bin/env bash
# Set up (if needed) and run the test suite: offline, CPU, tiny models, a few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# One BLAS thread: tiny models gain nothing from more, and on small shared VMs thread hand-offs cost
# milliseconds per matmul. Override with OMP_NUM_THREADS=N.
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Two worker processes (pytest-xdist) by default: the tests run one BLAS thread each, so a 2-core machine runs two at
# once. RLCLI_TEST_WORKERS=N for more, 0 for a single process (CI's second step: its tests start 2 processes each).
exec python -m pytest -q -n "${RLCLI_TEST_WORKERS:-2}" "$@"
