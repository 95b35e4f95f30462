#!/usr/bin/env bash
# `make gpu-check`: under 8 minutes on one CUDA GPU, through the real command lines: bf16 training steps on the
# tiny random target and on the embedded SmolLM2-135M target, a 2-process NCCL (ZeRO-2) run when two GPUs are
# visible, and lossless speculative decoding on the GPU with timing; prints a JSON summary (scripts/gpu_check.py
# has the stages). Refuses with one line when no CUDA GPU is visible. Options: scripts/gpu_check.sh --help.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
exec "$PY" scripts/gpu_check.py --python "$PY" "$@"
