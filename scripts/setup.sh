#!/usr/bin/env bash
# Create .venv (if needed) and install rlcli with its test extras. CPU-only torch is installed first, so that
# no dependency pulls a multi-GB CUDA build; on a GPU machine install your CUDA torch before running this.
# pip's own output (build-backend notices included) goes to .venv/install.log and is shown only when pip fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
LOG=.venv/install.log
: >"$LOG"
pip_install() {
  if ! python -m pip install "$@" >>"$LOG" 2>&1; then
    tail -n 40 "$LOG" >&2
    echo "setup: pip install $* failed; the whole log is in $LOG" >&2
    exit 1
  fi
}
echo "setup: installing rlcli and its dependencies into .venv (log: $LOG)"
pip_install --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  pip_install "torch==${RLCLI_TORCH_VERSION:-2.13.0}"
fi
pip_install -e ".[test,plot]"
