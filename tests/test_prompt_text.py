"""One function places the image in the text every backend sees (stages/backends/prompt_text.py): the
transformers generator and embedder, the vLLM generator and embedder and the OpenAI-compatible client
build the same text from the same (text, image) input."""
import pytest
from PIL import Image

from stages.backends.base import IMAGE_MARKER, EmbedInput
from stages.backends.openai_http import build_content
from stages.backends.prompt_text import IMAGE, chat_content, image_parts, raw_text, with_image_marker
from stages.backends.vllm import QWEN_VL_IMAGE, build_embed_prompts, chat_messages, render_chat
from stages.generate import render_prompt

IMG = Image.new("RGB", (56, 56), (200, 10, 10))

CASES = [
    f"Query: {IMAGE_MARKER}\nwhat is this?",       # MMEB style
    "Query: what is this?",                         # no marker: the image first, on its own line
    f"{IMAGE_MARKER}{IMAGE_MARKER} two markers",    # the second is dropped
    f"see {IMAGE_MARKER}",                          # the image last
    "typed <|image_pad|> token",                    # a placeholder token in user text is removed
    "",
]


def test_image_parts():
    assert image_parts(f"a {IMAGE_MARKER} b", True) == ["a ", IMAGE, " b"]
    assert image_parts("a b", True) == [IMAGE, "\na b"]
    assert image_parts(f"{IMAGE_MARKER}x{IMAGE_MARKER}", True) == [IMAGE, "x"]
    assert image_parts(f"a {IMAGE_MARKER} b", False) == ["a  b"]
    assert image_parts("", True) == [IMAGE] and image_parts("", False) == []
    assert image_parts("a <|image_pad|>b", True, reserved=["<|image_pad|>"]) == [IMAGE, "\na b"]
    assert with_image_marker("q", True) == f"{IMAGE_MARKER}\nq"
    assert with_image_marker(f"q {IMAGE_MARKER}", True) == f"q {IMAGE_MARKER}"
    assert raw_text("q", True, "<IMG>") == "<IMG>\nq"
    assert chat_content("q", False) == "q"
    assert chat_content("q", True) == [{"type": "image"}, {"type": "text", "text": "\nq"}]


def test_the_generator_prompt_keeps_the_querys_image_where_the_query_is():
    row = {"query_text": "what is this?", "query_image": b"png", "target_text": "a dog"}
    assert render_prompt("Think.\nQuery: {query}", row) == f"Think.\nQuery: {IMAGE_MARKER}\nwhat is this?"
    row["query_text"] = f"{IMAGE_MARKER}\nwhat is this?"
    assert render_prompt("Think.\nQuery: {query}", row) == f"Think.\nQuery: {IMAGE_MARKER}\nwhat is this?"


@pytest.fixture(scope="module")
def model_inputs(tiny_models):
    from stages.backends.hf.inputs import ModelInputs

    return {role: ModelInputs(str(tiny_models[role])) for role in ("generator", "embedder")}


@pytest.mark.parametrize("text", CASES)
@pytest.mark.parametrize("with_image", [True, False])
def test_every_backend_sees_the_same_text(model_inputs, text, with_image):
    image = IMG if with_image else None
    if not with_image and "image_pad" not in text:
        text = text.replace(IMAGE_MARKER, "")  # the reader quarantines a marker without an image
    # generator prompt: transformers vs vLLM (same chat template), and the served model's content parts
    gen = model_inputs["generator"]
    hf_prompt = gen.chat_prompt(text, image)
    assert render_chat(gen.tokenizer, chat_messages(text, with_image)) == hf_prompt
    # a served model gets the same parts; the server removes its own model's placeholder tokens
    content, expected = build_content(text, image), chat_content(text, with_image)
    if with_image:
        assert [p["type"] for p in content] == ["image_url" if p["type"] == "image" else "text" for p in expected]
        assert [p.get("text") for p in content] == [p.get("text") for p in expected]
    else:
        assert content == expected
    # embedder text: transformers vs vLLM
    emb = model_inputs["embedder"]
    assert build_embed_prompts([EmbedInput(text, image)], QWEN_VL_IMAGE)[0]["prompt"] == emb.raw_text(text, image)
    assert emb.raw_text(text, image).count("<|image_pad|>") == (1 if with_image else 0)
