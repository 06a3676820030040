"""The cluster example's vLLM generator against vLLM's own classes (no engine: runs in seconds)."""
import dataclasses
from pathlib import Path

import vllm
from PIL import Image

from pipeline import config
from stages.backends.base import GenRequest
from stages.backends.vllm import build_generate_requests, engine_kwargs
from stages.generate import candidate_seed

REPO = Path(__file__).resolve().parent.parent.parent


def test_cluster_generator_requests_are_what_vllm_takes():
    """The cluster config's generator, as the Generate stage hands it to the vLLM backend, checked against
    vLLM's own SamplingParams and EngineArgs (here, where vllm imports, rather than skipped in .venv)."""
    cfg = config.load(REPO / "configs" / "cluster-qwen25vl-7b.yaml", ["input.path=/x", "output.dir=/y"])
    (gen,) = cfg.generators
    seeds = [candidate_seed(gen.seed, gen.name, "pair-1", k) for k in range(gen.k)]
    request = GenRequest("Query: <|image_1|> what is this?", Image.new("RGB", (32, 32)), seeds,
                         gen.sampling.temperature, gen.sampling.top_p, gen.sampling.max_new_tokens)
    batch = build_generate_requests([request], lambda messages: "rendered")
    params = [vllm.SamplingParams(**kw) for kw in batch.params]
    assert [p.seed for p in params] == seeds and {p.max_tokens for p in params} == {256}
    assert set(engine_kwargs(**dict(gen.options))) <= {f.name for f in dataclasses.fields(vllm.EngineArgs)}
    assert batch.prompts[0]["multi_modal_data"]["image"].size == (32, 32)
