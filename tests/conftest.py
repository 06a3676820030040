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
