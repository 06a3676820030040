# Each target sets up what it needs on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch first, pinned: on these machines 2.13.0 is the CPU build that lies on disk; an unpinned torch
# would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: demo test models demo-data venv clean faults bench pool-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

venv: $(VENV)/.installed

models: venv
	$(PY) scripts/build_tiny_models.py --out models

demo-data: venv
	$(PY) scripts/make_demo_data.py --out data/demo

demo: models demo-data
	$(PY) -m pipeline run configs/demo.yaml --overwrite
	@echo "Shards: $(CURDIR)/out/demo/data/   (manifest: out/demo/manifest.json, card: out/demo/README.md)"

# The fault-injection tests take 4-9 minutes on 2 cores: they run under `make faults`, not here.
test: venv
	$(PY) -m pytest -q -m "not faults" tests

# Three generators pooled: two tiny local models and the tiny model served over HTTP (scripts/serve_openai.py).
pool-demo: models demo-data
	$(PY) scripts/pool_demo.py

# Fault-injection tests (kill -9 at each stage, lost actors and nodes): slow, so not part of `make test`.
faults: venv
	$(PY) -m pytest -q -m faults tests

# Throughput and memory benchmark: prints a table (see BENCHMARKS.md).
bench: venv
	$(PY) bench/bench.py

clean:
	rm -rf out models data/demo
