"""Build small random-weight Qwen2-VL models for tests, the demo and benchmarks.

Everything is made here, offline and deterministically: a byte-level BPE
tokenizer trained on a generated English corpus, a Qwen-style chat template, a
Qwen2-VL image processor with a small pixel budget, and three models of the same
class with different seeds: a generator, a second generator (variant "-b", so a
job can pool candidates from two generators) and a VLM2Vec-style embedder.

    python scripts/build_tiny_models.py [--out models] [--preset tiny|small]

A folder counts as built only when its marker file holds the current build
spec; folders are built under a temporary name and renamed into place, so an
interrupted build never looks complete.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

BUILD_VERSION = 1
MARKER = "pairsel_build.json"

# Qwen2-VL's added tokens, in Qwen's order, so the config ids below follow it.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's template, trimmed to what pairsel sends: string or list content,
# images and text parts, a default system turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

PRESETS = {
    "tiny": {
        "vocab_size": 1536,
        # head dims of 32 (not 16) so that fused attention kernels (vLLM's) accept the model too
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, mrope_section=[4, 6, 6]),
        "vision": dict(depth=1, embed_dim=32, num_heads=1, mlp_ratio=2),
        # 64x64 -> 4 image tokens, 128x128 -> 9
        "min_pixels": 56 * 56,
        "max_pixels": 84 * 84,
        "max_position_embeddings": 4096,
    },
    "small": {
        "vocab_size": 1536,
        "text": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=4, mrope_section=[8, 12, 12]),
        "vision": dict(depth=4, embed_dim=256, num_heads=4, mlp_ratio=4),
        "min_pixels": 56 * 56,
        "max_pixels": 224 * 224,
        "max_position_embeddings": 8192,
    },
}

GENERATOR_SEED = 1234
EMBEDDER_SEED = 5678
# The second generator: same architecture and tokenizer, other weights. Its marker
# hash adds this seed to the spec, so the existing folders' markers stay valid.
GENERATOR_B_SEED = 2468
# Random weights at the usual 0.02 scale make every layer a near no-op and every
# next-token distribution near uniform, so outputs ignore the prompt and image.
# Unit-gain weights (std 1/sqrt(width)) and logits of this std fix that.
HEAD_LOGIT_STD = 2.5
# The fraction of sampled steps (temperature 1) that should end the answer, so
# random-weight generations stop early now and then, as real ones do.
TARGET_EOS_RATE = 0.02


def spec(preset: str) -> dict:
    """Everything that determines the built folders; its hash is the marker."""
    return {"version": BUILD_VERSION, "preset": preset, "config": PRESETS[preset],
            "seeds": [GENERATOR_SEED, EMBEDDER_SEED], "eos_rate": TARGET_EOS_RATE, "head_std": HEAD_LOGIT_STD,
            "template": CHAT_TEMPLATE,
            "corpus": hashlib.sha256("\n".join(corpus()).encode()).hexdigest()[:16]}


def spec_hash(preset: str) -> str:
    return hashlib.sha256(json.dumps(spec(preset), sort_keys=True).encode()).hexdigest()[:16]


def variant_hash(preset: str, seed: int) -> str:
    """The marker hash of an extra model built from the same spec with its own seed."""
    return hashlib.sha256(f"{spec_hash(preset)}|{seed}".encode()).hexdigest()[:16]


def is_complete(folder: Path, preset: str, marker_hash: str | None = None) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("hash") == (marker_hash or spec_hash(preset))


# --- corpus and tokenizer -------------------------------------------------

_SUBJECTS = ["a dog", "the cat", "two children", "a woman", "an old man", "the chef", "a red car",
             "a small boat", "the team", "a student", "the bird", "a horse", "my neighbour",
             "the doctor", "a tourist", "the pilot", "a farmer", "the painter"]
_VERBS = ["is standing near", "runs across", "looks at", "is sitting on", "walks past", "holds",
          "is parked beside", "floats under", "points to", "carries", "waits next to", "jumps over"]
_OBJECTS = ["a wooden bench", "the bridge", "a green field", "the kitchen table", "a tall building",
            "the river", "a bowl of fruit", "a snowy mountain", "the train station", "a busy street",
            "an open window", "the beach", "a stack of books", "a blue umbrella", "the old castle"]
_TAILS = ["in the morning", "at night", "during a storm", "on a sunny day", "in the city centre",
          "near the lake", "after lunch", "in winter", "under a clear sky", "before the game"]
_FIXED = [
    "Think step by step about what this query is looking for, then write a short rationale.",
    "Explain step by step why the target below is the right match for this query.",
    "Represent the given image with the following question.",
    "Find an image that matches the given caption.",
    "Retrieve the passage that answers the question.",
    "Query: what is shown in this picture?",
    "Candidate: a photo of a dog playing in the park.",
    "Reasoning: the query asks about the main object, its colour and where it is.",
    "The answer should mention the object, the place and the time of day.",
    "Which animal is in the image? How many people are there? What colour is the car?",
    "First, identify the key entities. Second, relate them. Finally, decide.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024. Punctuation: , . ; : ! ? ( ) \" ' - /",
]
_WORDS = (
    "about above across action activity address afternoon against airport almost along already always "
    "animal another answer apple area around arrive article autumn average background balance ball "
    "banana basket bathroom beautiful bedroom before behind believe below beside between bicycle "
    "birthday black blanket bottle bottom bread breakfast bright brother brown building butterfly "
    "camera candle capital careful carpet category ceiling century chair change chapter cheese "
    "chicken chocolate church circle classroom clock closed cloud coffee colour company computer "
    "concert corner country couple cover crowd culture cup curtain customer dance danger daughter "
    "decide describe desert design detail different dinner direction distance document door dress "
    "drink driver early earth eight elephant empty energy engine evening event evidence example "
    "exercise explain factory family famous father feature festival finger flower football forest "
    "fountain friend furniture garden giraffe glass golden government graph green guitar hand happy "
    "harbour hat heavy helmet history holiday hospital hotel house identify important include "
    "information inside island jacket journey kitchen knife ladder language laptop large leather "
    "letter library light little location machine market material meaning medicine meeting memory "
    "message middle minute mirror moment monkey morning mother motorcycle mountain museum music "
    "narrow nature newspaper number object ocean office orange outside painting paper parent party "
    "passenger pattern pencil people person phone picture plate player pocket question rabbit "
    "railway reason record region relation restaurant result rocket round sandwich school science "
    "season second sentence shadow shelf shirt shoulder signal silver simple sister smile soldier "
    "square stadium station statue story strong student summer surface table teacher temperature "
    "tennis theatre thousand ticket tiger tomato tower traffic travel triangle trouble truck umbrella "
    "uniform valley vegetable vehicle village visible volcano wall water weather wheel white window "
    "winter wooden yellow young zebra"
).split()
_QUESTIONS = ["What is the {} made of?", "Where is the {} in this picture?", "How many {}s can you see?",
              "Is the {} on the left or on the right?", "Describe the {} in one sentence.",
              "Find a photo of a {} near a {}.", "Which {} is bigger than the {}?"]


def corpus(n: int = 600) -> list[str]:
    """Template sentences and questions (fixed seed) plus the prompt phrases pairsel uses."""
    rng = random.Random(0)
    sentences = list(_FIXED)
    for _ in range(n):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
        sentences.append(s[0].upper() + s[1:])
        sentences.append(rng.choice(_QUESTIONS).format(rng.choice(_WORDS), rng.choice(_WORDS)))
        sentences.append(" ".join(rng.sample(_WORDS, 8)).capitalize() + ".")
    return sentences


def train_tokenizer(vocab_size: int):
    """A byte-level BPE (any text encodes) with Qwen's special tokens appended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )


def image_processor(cfg: dict):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=cfg["min_pixels"], max_pixels=cfg["max_pixels"],
                                    patch_size=14, temporal_patch_size=2, merge_size=2)


# --- models ---------------------------------------------------------------

def model_config(cfg: dict, tokenizer):
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(cfg["text"])
    mrope_section = text.pop("mrope_section")
    vision = cfg["vision"]
    return Qwen2VLConfig(
        text_config=dict(
            **text,
            vocab_size=len(tokenizer),
            max_position_embeddings=cfg["max_position_embeddings"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
            initializer_range=text["hidden_size"] ** -0.5,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            **vision,
            hidden_size=text["hidden_size"],  # the merger projects into the LM's width
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            initializer_range=vision["embed_dim"] ** -0.5,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def tune_eos(model, tokenizer) -> None:
    """Point the <|im_end|> output row along the mean final hidden state of
    sampled answers, scaled so that a sampled step ends the answer about
    TARGET_EOS_RATE of the time: random weights alone would almost never stop."""
    import torch

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": s}], tokenize=False,
                                             add_generation_prompt=True) for s in corpus(40)[-16:]]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=24, min_new_tokens=24, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id, output_hidden_states=True,
                             return_dict_in_generate=True)
    # the last layer's state (after the final norm) at each step's newest position
    hidden = torch.cat([step[-1][:, -1] for step in out.hidden_states])
    lm_head = model.get_output_embeddings().weight
    others = hidden @ lm_head.T
    others[:, eos] = float("-inf")
    log_rest = torch.logsumexp(others, dim=-1)
    direction = hidden.mean(0)
    direction = direction / direction.norm()
    projection = hidden @ direction

    def eos_rate(scale: float) -> float:
        return torch.sigmoid(scale * projection - log_rest).mean().item()

    low, high = 0.0, 1.0
    while eos_rate(high) < TARGET_EOS_RATE:
        high *= 2
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if eos_rate(mid) < TARGET_EOS_RATE else (low, mid)
    with torch.no_grad():
        lm_head[eos] = direction * high


def build_model(cfg: dict, tokenizer, seed: int, role: str):
    """The generator has an LM head (peaked enough that answers depend on the
    prompt, and tuned to stop now and then); the embedder is the bare
    Qwen2VLModel, which AutoModel loads without leftovers."""
    import torch
    from transformers import GenerationConfig, Qwen2VLForConditionalGeneration, Qwen2VLModel

    torch.manual_seed(seed)
    if role == "embedder":
        return Qwen2VLModel(model_config(cfg, tokenizer)).eval()
    model = Qwen2VLForConditionalGeneration(model_config(cfg, tokenizer)).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, HEAD_LOGIT_STD / cfg["text"]["hidden_size"] ** 0.5)
    tune_eos(model, tokenizer)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.generation_config = GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext)
    return model


def save_processor(folder: Path, tokenizer, img_proc) -> None:
    """Save the tokenizer and image processor, and the processor wrapper where it
    can be made: Qwen2VLProcessor needs a video processor, which needs torchvision.
    Without it, backends build inputs from the tokenizer and image processor."""
    tokenizer.save_pretrained(folder)
    img_proc.save_pretrained(folder)
    try:
        from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor

        video_proc = Qwen2VLVideoProcessor(size=dict(img_proc.size), patch_size=14,
                                           temporal_patch_size=2, merge_size=2)
        Qwen2VLProcessor(image_processor=img_proc, tokenizer=tokenizer, video_processor=video_proc,
                         chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    except ImportError:
        pass


def build_folder(final: Path, preset: str, tokenizer, img_proc, seed: int, role: str,
                 marker_hash: str | None = None) -> None:
    marker_hash = marker_hash or spec_hash(preset)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        model = build_model(PRESETS[preset], tokenizer, seed, role)
        model.save_pretrained(tmp)
        save_processor(tmp, tokenizer, img_proc)
        # the marker goes last: its presence means the rest is there
        (tmp / MARKER).write_text(json.dumps({"hash": marker_hash, "role": role, "seed": seed,
                                              **spec(preset)}, indent=1))
        tmp.chmod(0o755)
        if final.exists():
            if is_complete(final, preset, marker_hash):  # a concurrent build finished first
                return
            shutil.rmtree(final, ignore_errors=True)  # stale or half-built
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final, preset, marker_hash):  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build(out_dir: Path, preset: str = "tiny") -> dict:
    """Build (or find already built) the models of `preset` under out_dir; returns
    {"generator": Path, "embedder": Path, "generator_b": Path}."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    out_dir = Path(out_dir)
    paths = {"generator": out_dir / f"{preset}-qwen2vl", "embedder": out_dir / f"{preset}-embedder",
             "generator_b": out_dir / f"{preset}-qwen2vl-b"}
    hashes = {"generator_b": variant_hash(preset, GENERATOR_B_SEED)}
    todo = {role: p for role, p in paths.items() if not is_complete(p, preset, hashes.get(role))}
    if not todo:
        return paths

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = PRESETS[preset]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic float reductions while building
    try:
        tokenizer = train_tokenizer(cfg["vocab_size"])
        img_proc = image_processor(cfg)
        if "generator" in todo:
            build_folder(todo["generator"], preset, tokenizer, img_proc, GENERATOR_SEED, "generator")
        if "embedder" in todo:
            build_folder(todo["embedder"], preset, tokenizer, img_proc, EMBEDDER_SEED, "embedder")
        if "generator_b" in todo:
            build_folder(todo["generator_b"], preset, tokenizer, img_proc, GENERATOR_B_SEED, "generator",
                         marker_hash=hashes["generator_b"])
    finally:
        torch.set_num_threads(threads)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="models", type=Path, help="output folder (default: models)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    args = parser.parse_args(argv)
    for role, path in build(args.out, args.preset).items():
        print(f"{role}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
