"""Batching in the transformers backends (stages/backends/hf/batching.py) on the tiny models: a batch plan is a
function of the rows' lengths and the options; exact embedder batches have fixed shapes (batch-invariant) and
sorted ones are few, full, within their budget and reproducible; the generator samples on the device from
(seed, step, vocabulary index) alone, with the right distribution, and with exact batching a row's logits do not
depend on its batchmates; bench/gpu.py --smoke runs the stages without Ray."""
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.backends.base import IMAGE_MARKER, EmbedInput, GenRequest
from stages.backends.hf.batching import exact_batches, padded_length, prefetched, sorted_batches
from stages.backends.hf.embedders import TransformersEmbedder
from stages.backends.hf.generator import DeviceSampler, TransformersGenerator, _mul32, gumbel_noise

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def picture(seed: int, size=(96, 128)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def mixed_inputs() -> list[EmbedInput]:
    shared = picture(1)
    words = "a red square on a blue sky over snow with two boats and one tree".split()
    out = []
    for i in range(24):
        text = "Query: " + " ".join(words[j % len(words)] for j in range(i * 5 % 41 + 1))
        image = (shared, picture(2 + i % 3, (64 + 16 * (i % 4), 96)), None)[i % 3]
        out.append(EmbedInput(f"{IMAGE_MARKER} {text}" if image is not None else text, image))
    return out


# --- plans ---------------------------------------------------------------------------------------------------

def test_plans_are_functions_of_lengths_and_options():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(1, 200, 60)]
    alone = [i % 7 == 0 for i in range(60)]
    exact = exact_batches(lengths, alone, 32, 8)
    assert sorted(i for b in exact for i in b.members) == list(range(60))
    for b in exact:
        assert b.rows == (1 if alone[b.members[0]] else 8) and len(b.members) <= b.rows
        assert {padded_length(lengths[i], 32) for i in b.members} == {b.length} and b.length % 32 == 0
        assert all(lengths[i] < b.length for i in b.members)  # at least one pad
    plan = sorted_batches(lengths, 1000, max_rows=12)
    assert plan == sorted_batches(list(lengths), 1000, max_rows=12)
    assert sorted(i for b in plan for i in b.members) == list(range(60))
    order = [lengths[i] for b in plan for i in b.members]
    assert order == sorted(lengths, reverse=True)
    for b in plan:
        assert b.length == max(lengths[i] for i in b.members) and b.rows == len(b.members) <= 12
        assert b.rows * b.length <= 1000 or b.rows == 1
    assert len(plan) < len(exact)
    copies = sorted_batches([50, 40, 30], 350, copies=[4, 4, 2])
    assert [(b.members, b.rows) for b in copies] == [([0], 4), ([1, 2], 6)]


def test_prefetched_keeps_order_prepares_ahead_and_raises_at_the_item():
    started = {i: threading.Event() for i in range(5)}

    def prepare(i):
        started[i].set()
        if i == 3:
            raise ValueError("bad item 3")
        return i * 10

    seen = []
    with pytest.raises(ValueError, match="bad item 3"):
        for item, prepared in prefetched(range(5), prepare):
            assert started[item + 1].wait(5), "the next item was not being prepared meanwhile"
            seen.append((item, prepared))
    assert seen == [(0, 0), (1, 10), (2, 20)]


# --- the embedder --------------------------------------------------------------------------------------------

class Forwards:
    """The shapes of an embedder's forward passes and the images of its vision tower calls."""

    def __init__(self, embedder):
        self.shapes, self.images = [], []
        embedder.model.register_forward_hook(self._forward, with_kwargs=True)
        vision = embedder.model.get_image_features

        def counted(pixels, grid, **kwargs):
            self.images.append(int(grid.shape[0]))
            return vision(pixels, grid, **kwargs)

        embedder.model.get_image_features = counted

    def _forward(self, module, args, kwargs, output):
        self.shapes.append((tuple(kwargs["input_ids"].shape), kwargs["attention_mask"].sum(1).tolist()))

    def clear(self):
        self.shapes.clear()
        self.images.clear()


@pytest.fixture(scope="module")
def embedders(tiny_models):
    exact = TransformersEmbedder(str(tiny_models["embedder"]), batching="exact", batch_size=4)
    sorted_ = TransformersEmbedder(str(tiny_models["embedder"]), batching="sorted", max_batch_tokens=256)
    return {"exact": (exact, Forwards(exact)), "sorted": (sorted_, Forwards(sorted_))}


def test_lengths_are_known_before_the_images_are_processed(embedders):
    embedder, _ = embedders["exact"]
    inputs = mixed_inputs() + [EmbedInput(f"{IMAGE_MARKER} tall", picture(9, (300, 40))), EmbedInput("x " * 900),
                               EmbedInput(f"{IMAGE_MARKER} " + "y " * 900, picture(10))]
    texts = [embedder.inputs.raw_text(x.text, x.image) for x in inputs]
    images = [x.image for x in inputs]
    planned = embedder.inputs.lengths(texts, images, add_special_tokens=True, max_length=embedder.max_length)
    encoded = [embedder.inputs.encode(t, im, add_special_tokens=True, max_length=embedder.max_length)
               for t, im in zip(texts, images)]
    assert planned == [row["input_ids"].shape[1] for row in encoded]
    assert max(planned) > embedder.max_length  # cut text, every image token kept


def test_exact_batches_have_fixed_shapes_and_one_image_per_vision_call(embedders):
    embedder, seen = embedders["exact"]
    seen.clear()
    inputs = mixed_inputs()
    embedder.embed(inputs)
    assert {rows for (rows, _), _ in seen.shapes} == {4}  # short batches filled up with copies
    assert all(length % embedder.length_bucket == 0 and max(real) < length for (_, length), real in seen.shapes)
    assert seen.images and set(seen.images) == {1}
    assert len(seen.images) == len({id(x.image) for x in inputs if x.image is not None})


def test_sorted_batches_are_few_full_and_within_their_budget(embedders):
    embedder, seen = embedders["sorted"]
    seen.clear()
    inputs = mixed_inputs()
    embedder.embed(inputs)
    assert sum(rows for (rows, _), _ in seen.shapes) == len(inputs)  # no copies
    for (rows, length), real in seen.shapes:
        assert rows * length <= 256 or rows == 1
        assert max(real) == length  # padded only to its own longest row
    assert len(seen.shapes) < len(embedders["exact"][1].shapes)
    distinct = len({id(x.image) for x in inputs if x.image is not None})
    assert sum(seen.images) == distinct and max(seen.images) > 1  # several images per vision tower call


def test_sorted_batching_is_reproducible_and_close_to_exact(embedders):
    inputs = mixed_inputs()
    first, again = embedders["sorted"][0].embed(inputs), embedders["sorted"][0].embed(inputs)
    assert np.array_equal(first, again)
    np.testing.assert_allclose(first, embedders["exact"][0].embed(inputs), rtol=0, atol=1e-5)
    # one input alone or among others: the same up to float rounding
    np.testing.assert_allclose(embedders["sorted"][0].embed(inputs[5:6])[0], first[5], rtol=0, atol=1e-5)


# --- sampling on the device ----------------------------------------------------------------------------------

def test_hash_arithmetic_is_exact_32_bit():
    import torch

    rng = np.random.default_rng(0)
    xs = [0, 1, (1 << 32) - 1] + [int(x) for x in rng.integers(0, 1 << 32, 200, dtype=np.uint64)]
    for c in (0x85EBCA6B, 0xC2B2AE35, 0x9E3779B1, 1):
        got = _mul32(torch.tensor(xs, dtype=torch.int64), c).tolist()
        assert got == [x * c % (1 << 32) for x in xs]


def test_noise_depends_on_seed_step_and_entry_only():
    import torch

    from stages.backends.hf.generator import _mix32

    vocab = _mix32(torch.arange(50, dtype=torch.int64))
    keys = lambda seeds: _mix32(torch.tensor(seeds, dtype=torch.int64))  # noqa: E731
    both = gumbel_noise(keys([5, 7]), 3, vocab)
    assert torch.equal(both[1], gumbel_noise(keys([7]), 3, vocab)[0])
    assert torch.equal(both[0], gumbel_noise(keys([9, 5, 11]), 3, vocab)[1])
    assert not torch.equal(both[0], both[1]) and not torch.equal(both[0], gumbel_noise(keys([5]), 4, vocab)[0])


def test_device_sampler_draws_from_the_softmax_and_its_nucleus():
    import torch

    logits = torch.log(torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    n = 20000
    scores = logits.repeat(n, 1)
    ids = torch.zeros(n, 7, dtype=torch.long)  # step 2 of a 5-token prompt

    def draws(top_p, temperature=1.0):
        sampler = DeviceSampler(list(range(n)), [temperature] * n, [top_p] * n, prompt_width=5, device="cpu")
        chosen = sampler(ids, scores.clone()).argmax(-1)
        return torch.bincount(chosen, minlength=6).float() / n

    np.testing.assert_allclose(draws(1.0), [0.4, 0.25, 0.15, 0.1, 0.06, 0.04], atol=0.015)
    nucleus = draws(0.7)  # 0.4 + 0.25 < 0.7: the third token is the last one kept
    np.testing.assert_allclose(nucleus, [0.5, 0.3125, 0.1875, 0, 0, 0], atol=0.015)
    assert draws(1.0, temperature=0.0)[0] == 1.0  # greedy


# --- the generator -------------------------------------------------------------------------------------------

def request(prompt, seeds, image=None, temperature=1.0) -> GenRequest:
    return GenRequest(prompt=prompt, image=image, seeds=list(seeds), temperature=temperature, top_p=0.95,
                      max_new_tokens=12)


def counting_generate_calls(generator) -> list:
    calls, generate = [], generator.model.generate

    def counted(**kwargs):
        calls.append(tuple(kwargs["input_ids"].shape))
        return generate(**kwargs)

    generator.model.generate = counted
    return calls


@pytest.fixture(scope="module")
def generators(tiny_models):
    return {b: TransformersGenerator(str(tiny_models["generator"]), batching=b) for b in ("exact", "sorted")}


def generator_requests():
    sampled = [request("Describe a red car." + " More words here." * (i % 5), range(i, i + 3),
                       picture(i, (64, 64)) if i % 2 else None) for i in range(8)]
    return sampled + [request("Greedy.", [1, 2], None, 0.0)]


def test_exact_generation_pads_each_prompt_to_its_bucket_and_a_rows_logits_do_not_depend_on_batchmates(generators):
    import torch

    generator = generators["exact"]
    inputs = generator.inputs
    reqs = generator_requests()
    rows = [inputs.encode(inputs.chat_prompt(r.prompt, r.image), r.image, add_special_tokens=False) for r in reqs]
    width = padded_length(rows[1]["input_ids"].shape[1], generator.length_bucket)
    same_width = [r for r in rows if padded_length(r["input_ids"].shape[1], generator.length_bucket) == width]
    assert len(same_width) >= 3

    def last_logits(batch_rows):
        with torch.inference_mode():
            return generator.model(**inputs.collate(batch_rows, "left", length=width)).logits[:, -1]

    alone = last_logits([rows[1]])[0]
    others = same_width[::-1]
    assert torch.equal(last_logits(others)[next(j for j, r in enumerate(others) if r is rows[1])], alone)
    calls = counting_generate_calls(generator)
    generator.generate(reqs)
    widths = {padded_length(r["input_ids"].shape[1], generator.length_bucket) for r in rows}
    assert sorted(shape[1] for shape in calls) == sorted(widths)  # one generate call per padded prompt length
    assert sum(shape[0] for shape in calls) == sum(len(r.seeds) for r in reqs[:-1]) + 1  # greedy: one row


def test_sorted_generation_is_one_call_and_reproducible(generators):
    generator = generators["sorted"]
    calls = counting_generate_calls(generator)
    reqs = generator_requests()
    first = generator.generate(reqs)
    assert len(calls) == 1
    assert [[g.text for g in r] for r in first] == [[g.text for g in r] for r in generator.generate(reqs)]
    alone = generator.generate([reqs[3]])[0]
    assert [g.text for g in alone] == [g.text for g in first[3]]
    assert len({g.text for g in first[-1]}) == 1


# --- the GPU benchmark, here on the CPU ----------------------------------------------------------------------

def test_gpu_bench_smoke_runs_the_stages_without_ray(tmp_path):
    """bench/gpu.py --smoke with Ray made unimportable: the stages through run_local, the twin run identical."""
    code = ("import runpy, sys; sys.modules['ray'] = None; "
            f"sys.argv = ['bench/gpu.py', '--smoke', '--out', {str(tmp_path)!r}]; "
            "runpy.run_path('bench/gpu.py', run_name='__main__')")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.perf_counter() - t0 < 120
    table = (tmp_path / "table-smoke.md").read_text()
    assert "| twin run: rows identical (labels, texts, similarities) | yes |" in table
    assert "Ray imported: False" in table
    assert "| generation, tokens/s |" in table and "| embedding, inputs/s |" in table
