"""vLLM backends (GPU only: vLLM has no CPU build here). `import vllm` happens
in the constructors, so this module imports without it.

Everything that does not need a running engine (prompts, sampling arguments,
reading outputs) is a pure function below and is tested without vLLM; the
classes only wire those to `vllm.LLM`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np

from stages.backends.base import IMAGE_MARKER, EmbedInput, GenRequest, Generation, l2_normalise

log = logging.getLogger(__name__)

INSTALL_HINT = "the vllm backend needs vLLM (GPU): pip install 'pairsel[vllm]'"


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
    """One user turn in the Hugging Face chat-template convention: plain text
    content without an image (text-only templates expect a string); with one, a
    list of parts with {"type": "image"} where IMAGE_MARKER was (or first)."""
    if not has_image:
        return [{"role": "user", "content": prompt.replace(IMAGE_MARKER, "").strip()}]
    before, marker, after = prompt.partition(IMAGE_MARKER)
    if not marker:
        before, after = "", prompt
    parts = [
        {"type": "text", "text": before.strip()},
        {"type": "image"},
        {"type": "text", "text": after.replace(IMAGE_MARKER, "").strip()},
    ]
    return [{"role": "user", "content": [p for p in parts if p["type"] == "image" or p["text"]]}]


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


class VLLMGenerator:
    def __init__(
        self,
        model: str,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        max_model_len: Optional[int] = None,
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        mm_processor_kwargs: Optional[dict] = None,
        limit_mm_per_prompt: Optional[dict] = None,
        chat_template: Optional[str] = None,
        **options,
    ):
        """`options` go to vllm.LLM as they are (dtype, enforce_eager, max_num_seqs, ...)."""
        LLM, SamplingParams, _ = _import_vllm()
        self.chat_template = load_chat_template(chat_template)
        self._sampling_params = SamplingParams
        self.llm = LLM(
            model=model,
            **engine_kwargs(
                trust_remote_code=trust_remote_code,
                tensor_parallel_size=tensor_parallel_size,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                enable_prefix_caching=enable_prefix_caching,
                mm_processor_kwargs=mm_processor_kwargs,
                limit_mm_per_prompt=limit_mm_per_prompt,
                **options,
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


def build_embed_prompts(inputs: list[EmbedInput], image_placeholder: str) -> list[dict]:
    """Raw prompts (embedders are not chatted with) with the image placeholder
    where IMAGE_MARKER was, or first when an image comes without a marker."""
    prompts = []
    for item in inputs:
        text = item.text
        if item.image is None:
            prompts.append({"prompt": text.replace(IMAGE_MARKER, "")})
            continue
        if IMAGE_MARKER in text:
            before, _, after = text.partition(IMAGE_MARKER)
            text = before + image_placeholder + after.replace(IMAGE_MARKER, "")
        else:
            text = image_placeholder + text
        prompts.append({"prompt": text, "multi_modal_data": {"image": item.image}})
    return prompts


def parse_embeddings(outputs: list) -> np.ndarray:
    """(len(outputs), dim) float32, L2-normalised, from EmbeddingRequestOutput-like
    objects (`.outputs.embedding`)."""
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return l2_normalise(np.asarray([o.outputs.embedding for o in outputs], dtype=np.float32))


POOLING_TYPES = {"last": "LAST", "mean": "MEAN"}


class VLLMEmbedder:
    def __init__(
        self,
        model: str,
        pooling: str = "last",
        max_length: int = 512,
        trust_remote_code: bool = False,
        image_placeholder: Optional[str] = None,
        tensor_parallel_size: int = 1,
        max_model_len: Optional[int] = None,
        gpu_memory_utilization: float = 0.9,
        mm_processor_kwargs: Optional[dict] = None,
        limit_mm_per_prompt: Optional[dict] = None,
        **options,
    ):
        """`image_placeholder`: the text standing for the image in the prompt;
        by default guessed from the vocabulary (default_image_placeholder).
        `options` go to vllm.LLM as they are (e.g. convert="embed" for a
        generative checkpoint vLLM does not convert by itself, dtype, ...)."""
        if pooling not in POOLING_TYPES:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_TYPES)}; got {pooling!r}")
        LLM, _, PoolerConfig = _import_vllm()
        self.max_length = max_length
        self.llm = LLM(
            model=model,
            runner="pooling",
            # we normalise ourselves; vLLM only picks the token(s) to pool
            pooler_config=PoolerConfig(pooling_type=POOLING_TYPES[pooling]),
            **engine_kwargs(
                trust_remote_code=trust_remote_code,
                tensor_parallel_size=tensor_parallel_size,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                mm_processor_kwargs=mm_processor_kwargs,
                limit_mm_per_prompt=limit_mm_per_prompt,
                **options,
            ),
        )
        self.image_placeholder = image_placeholder or default_image_placeholder(self.llm.get_tokenizer().get_vocab())
        self.model_id = f"vllm:{model}:{pooling}"

    def embed(self, inputs: list[EmbedInput]) -> np.ndarray:
        if not inputs:
            return np.zeros((0, 0), dtype=np.float32)
        outputs = self.llm.embed(
            build_embed_prompts(inputs, self.image_placeholder),
            use_tqdm=False,
            tokenization_kwargs={"truncation": True, "max_length": self.max_length},
        )
        return parse_embeddings(outputs)
