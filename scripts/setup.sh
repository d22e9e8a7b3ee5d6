#!/usr/bin/env bash
# Create .venv (if needed) and install rlcli with its test extras. CPU-only torch is installed first, so that
# no dependency pulls a multi-GB CUDA build; on a GPU machine install your CUDA torch before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==${RLCLI_TORCH_VERSION:-2.13.0}"
fi
python -m pip install -q -e ".[test,plot]"
