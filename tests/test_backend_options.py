"""Backend options (stages/backends/options.py): the README's tables are the declarations; a backend built in
Python checks its options as the config does (tests/test_config.py: at load); the speed-only claims, measured:
the transformers embedder's vectors do not depend on batch_size, nor the generator's texts on max_batch_tokens;
and through the CLI, a resume that changes only speed-only options goes on and writes the same shards."""
import hashlib
import shutil

import numpy as np
import pytest

from stages.backends import EMBEDDER_BACKENDS, GENERATOR_BACKENDS, embedder_class, generator_class
from stages.backends.base import GenRequest
from stages.backends.options import OptionError, options_table
from tests import job_runs
from tests.job_runs import assert_same_output, job_args, run_pipeline
from tests.test_bad_inputs import corpus, reference  # noqa: F401  (fixtures: the shared corpus and its clean run)
from tests.test_hf_batching import mixed_inputs

ENTRIES = [("generators.0", b, generator_class(b)) for b in GENERATOR_BACKENDS] + \
          [("embedder", b, embedder_class(b)) for b in EMBEDDER_BACKENDS]


@pytest.mark.parametrize("prefix, backend, cls", ENTRIES, ids=[f"{p}-{b}" for p, b, _ in ENTRIES])
def test_the_readme_tables_are_the_declarations(prefix, backend, cls):
    table = options_table(cls.Options)
    assert table in (job_runs.REPO / "README.md").read_text(), \
        f"README.md lacks the options table of the {backend} backend ({prefix}); from its declaration:\n{table}"


def test_a_backend_built_in_python_checks_its_options_too(tiny_models, tmp_path):
    from stages.backends.hf import TransformersEmbedder
    from stages.backends.openai_http import OpenAIGenerator
    from stages.backends.precomputed import PrecomputedGenerator

    with pytest.raises(OptionError, match=r"^batch_sise: not an option .*\(did you mean batch_size\?\)$"):
        TransformersEmbedder(str(tiny_models["embedder"]), batch_sise=4)
    with pytest.raises(OptionError, match=r"^max_in_flight: must be >= 1; got 0$"):
        OpenAIGenerator("served", max_in_flight=0)
    with pytest.raises(OptionError, match=r"^paht: .*\(did you mean path\?\)$"):
        PrecomputedGenerator("ignored", paht=str(tmp_path / "rationales.jsonl"))


# ------------------------------------------------------------------ speed-only, measured

def test_exact_embedder_vectors_do_not_depend_on_batch_size(tiny_models, device):
    """On the CPU, where this was measured, and on a GPU (conftest's `device`: batch shapes can choose other
    kernels there). `exact` fills batches up to batch_size rows: a different batch_size changes only how many
    rows a forward runs, and must leave every vector the same, bit for bit (or batch_size would be a label
    option)."""
    from stages.backends.hf import TransformersEmbedder

    inputs = mixed_inputs()
    vectors = [TransformersEmbedder(str(tiny_models["embedder"]), device=device, batching="exact",
                                    batch_size=size).embed(inputs) for size in (3, 16)]
    assert np.array_equal(*vectors)


def test_exact_generator_texts_do_not_depend_on_max_batch_tokens(tiny_models, device):
    from stages.backends.hf import TransformersGenerator

    requests = [GenRequest(prompt="Query: " + "a red boat on the sea " * (i % 5 + 1), image=None, seeds=[i, i + 9],
                           temperature=1.0, top_p=0.95, max_new_tokens=12) for i in range(6)]
    texts = [[[g.text for g in gens] for gens in TransformersGenerator(
        str(tiny_models["generator"]), device=device, batching="exact", max_batch_tokens=most).generate(requests)]
        for most in (64, 1 << 16)]  # 64: one request per generate call
    assert texts[0] == texts[1]


# ------------------------------------------------------------------ through the CLI: a resume

def sha256s(out) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "data").glob("*.parquet"))}


@pytest.mark.slow
def test_a_resume_that_changes_only_speed_options_goes_on_and_writes_the_same_shards(corpus, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = sha256s(out)
    speed = ["embedder.options.batch_size=4", "generators.0.options.max_batch_tokens=1024"]
    resumed = run_pipeline(job_args(corpus, out, *speed))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"{len(before)} shards planned, {len(before)} already committed, 0 to do" in resumed.stderr
    assert sha256s(out) == before

    (out / "data" / "shard-000001.parquet").unlink()  # a shard redone with other speed options
    redone = run_pipeline(job_args(corpus, out, "embedder.options.batch_size=5"))
    assert redone.returncode == 0, redone.stdout[-3000:] + redone.stderr[-3000:]
    assert "shard 1 is redone: data/shard-000001.parquet: missing" in redone.stderr
    assert_same_output(out, reference)  # every shard file has the reference's sha256

    refused = run_pipeline(job_args(corpus, out, "embedder.options.length_bucket=16"), timeout=120)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "holds a run made with a different label config" in refused.stderr
    assert "embedder.options.length_bucket: '<unset>' -> 16" in refused.stderr
    assert sha256s(out) == before
