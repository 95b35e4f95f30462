# Thin wrappers: each target runs one documented command. `make setup` is idempotent.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test test-slow lint demo eval benchmark gpu-check clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	bash scripts/setup_venv.sh $(VENV)
	touch $(STAMP)

# pytest exits 5 when no test was collected: not a failure of the suite.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	bash scripts/demo.sh

eval: $(STAMP)
	bash scripts/eval_latest.sh $(DRAFT)

# The CPU reference benchmark (DSpark vs DFlash vs EAGLE-3 on SmolLM2, ~2.8 h on 2 cores, resumable): BENCHMARKS.md.
benchmark: $(STAMP)
	$(PY) benchmarks/reference.py

# Under 8 minutes on a CUDA GPU machine: bf16 training, NCCL with 2 GPUs, lossless eval; a JSON summary.
gpu-check: $(STAMP)
	bash scripts/gpu_check.sh

clean-venv:
	rm -rf $(VENV)
