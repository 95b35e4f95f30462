#!/usr/bin/env bash
# `make eval [DRAFT=<checkpoint dir>]`: evaluate a draft with the eval stage's defaults.
# The draft is $1 (or $DRAFT); without it, the most recently written runs/train/*/final or
# runs/*/train/final (what `make demo` writes) checkpoint.
# Extra Hydra overrides go in $EVAL_ARGS, e.g. EVAL_ARGS="prompts=shared-eval temperature=1.0".
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:-.venv}/bin/python"
draft="${1:-${DRAFT:-}}"
if [[ -z "$draft" ]]; then
  draft="$(ls -td runs/train/*/final runs/*/train/final 2>/dev/null | head -n 1 || true)"
  if [[ -z "$draft" ]]; then
    echo "eval: no trained draft found under runs/train/*/final; train one first (make demo) or pass DRAFT=<checkpoint dir>" >&2
    exit 2
  fi
fi
if [[ "$draft" != "random" && ! -f "$draft/config.json" ]]; then
  echo "eval: $draft is not a draft checkpoint (no config.json); pass DRAFT=<checkpoint dir>" >&2
  exit 2
fi
echo "eval: evaluating $draft"
# shellcheck disable=SC2086  # EVAL_ARGS is a list of overrides
exec "$PY" -m eval "draft=$draft" ${EVAL_ARGS:-}
