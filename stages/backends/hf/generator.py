"""The transformers generator: any image-text-to-text or causal LM, each candidate sampled from its own seed.

One `generate` call runs many requests at once: every request's seeds become rows (one row for a greedy
request), left-padded, in batches cut from the call's requests sorted by prompt length, of at most
`max_batch_tokens` rows x (prompt + new tokens) each (default from the GPU's memory). Sampling runs on the device
(`DeviceSampler`), so a step never waits for a copy of the logits to the host, and a row's draws come from its
own seed whatever its batchmates.

How far prompts are padded (`batching`, as for the embedder; stages/backends/hf/batching.py):
- `exact` (default off a GPU): each prompt to its own length rounded up to `length_bucket` (at least one pad),
  one generate call per such length: a row then runs in the same shape whatever else the call holds, and its
  logits are the same bit for bit (on the CPU kernels measured, which do not depend on the number of rows), so a
  candidate's text is a function of its prompt, image and seed, in any batch, round or resumed run.
- `sorted` (default on a GPU): every prompt of a batch to the batch's longest, so all requests of a call run
  in one generate call; a row's logits then move in the last bits with its batchmates' lengths (a sampled token
  flips only where two choices are that close).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import replace
from typing import Optional

from stages.backends.base import Generation, GenRequest
from stages.backends.hf.batching import batching_for, default_batch_tokens, padded_length, sorted_batches, text_config
from stages.backends.hf.inputs import (ModelInputs, TransformersOptions, device_for, dtype_for, inference,
                                       load_model, to_device)
from stages.backends.options import option
from stages.faults import fault_point

log = logging.getLogger(__name__)

_M32 = 0xFFFFFFFF
# Rows x (prompt + new tokens) per generate call by default: the KV cache of half the memory the weights leave
# on a GPU, at most this many (a 2B model's 400 rows of a few hundred tokens fit in one call many times over).
MAX_GENERATE_TOKENS = 1 << 20
CPU_GENERATE_TOKENS = 1 << 16


def _error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def _mul32(x, c: int):
    """x * c mod 2**32 for int64 tensors x in [0, 2**32): in 16-bit halves of c, so no product leaves int64."""
    return ((((x * (c >> 16)) & 0xFFFF) << 16) + x * (c & 0xFFFF)) & _M32


def _mix32(x):
    """murmur3's 32-bit finaliser: a bijection of [0, 2**32) that mixes every input bit into every output bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def gumbel_noise(seed_keys, step: int, vocab_keys):
    """Gumbel(0, 1) noise for each row and vocabulary entry at one step, a function of (the row's seed, the step,
    the entry) only: integer hashing (exact on any device), then 24 bits of it as a uniform in (0, 1)."""
    import torch

    step_key = _mix32(torch.tensor((step + 1) * 0x9E3779B9 & _M32, device=seed_keys.device))
    bits = _mix32((_mix32(seed_keys ^ step_key)[:, None]) ^ vocab_keys[None, :])
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    return -torch.log(-torch.log(uniform))


class DeviceSampler:
    """A logits processor that samples each row from its own seed on the device, by Gumbel-max over the row's
    nucleus (top_p), and hands greedy search a one-hot choice. Row i's token at step s is the argmax of its
    logits / temperature plus noise from (seed_i, s, vocabulary index): it depends on its seed and its own
    tokens, never on its batchmates' draws or on how many rows run (up to the last bits that float kernels of
    other batch shapes can move its logits by). A row with temperature 0 takes its argmax (greedy)."""

    def __init__(self, seeds: list[int], temperatures: list[float], top_ps: list[float], prompt_width: int,
                 device: str):
        import torch

        self.prompt_width = prompt_width
        self.seed_keys = _mix32(torch.tensor([int(s) & _M32 for s in seeds], dtype=torch.int64, device=device))
        t = torch.tensor(temperatures, dtype=torch.float32, device=device)
        self.greedy = (t <= 0)[:, None]
        self.temperature = t.clamp(min=1e-6)[:, None]
        self.top_p = torch.tensor(top_ps, dtype=torch.float32, device=device)[:, None]
        self.nucleus = any(p < 1.0 for p, t_ in zip(top_ps, temperatures) if t_ > 0)
        self.vocab_keys = None

    def __call__(self, input_ids, scores):
        import torch

        if self.vocab_keys is None or self.vocab_keys.shape[0] != scores.shape[-1]:
            self.vocab_keys = _mix32(torch.arange(scores.shape[-1], device=scores.device, dtype=torch.int64)
                                     * 0x9E3779B1 & _M32)
        logits = scores.float() / self.temperature
        if self.nucleus:
            probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True, stable=True)
            outside = (probs.cumsum(-1) - probs > self.top_p) & (self.top_p < 1.0)  # the top token always stays
            logits = logits.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))
        noisy = logits + gumbel_noise(self.seed_keys, input_ids.shape[1] - self.prompt_width, self.vocab_keys)
        chosen = torch.where(self.greedy, scores.float(), noisy).argmax(dim=-1, keepdim=True)
        return torch.full_like(scores, float("-inf")).scatter(-1, chosen, 0.0)


@dataclasses.dataclass(frozen=True)
class TransformersGeneratorOptions(TransformersOptions):
    # a prompt's padded width is what its attention sums over: kept in the labels
    length_bucket: int = option(32, "`exact`: each prompt left-padded to its length rounded up to a multiple of "
                                    "this", label=True, at_least=1)
    # Speed only: `exact` rows meet in no sum, so it changes only how many rows one call runs; the demo's shards
    # are byte-identical at 1,024 and 65,536 (CPU, float32). `sorted` changes batchmates with it, as
    # resources.batch_size does.
    max_batch_tokens: Optional[int] = option(None, "the most rows x (prompt + new tokens) per `generate` call",
                                             label=False, shown="from the GPU's memory (at most 2^20); 65,536 "
                                                                "off a GPU")


class TransformersGenerator:
    """Rationale generator on transformers (its Options; the module says what they do)."""

    Options = TransformersGeneratorOptions

    def __init__(self, model: str, trust_remote_code: bool = False, **options):
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

        self.options = self.Options.parse(options, "transformers generator")
        self.model_id = model
        self.device = device_for(self.options.device)
        self.batching = batching_for(self.options.batching, self.device)
        self.length_bucket = self.options.length_bucket
        self.inputs = ModelInputs(model, trust_remote_code)
        self.model = load_model(model, [AutoModelForImageTextToText, AutoModelForCausalLM], trust_remote_code,
                                self.device, dtype_for(self.options.dtype, self.device),
                                self.options.attn_implementation)
        self.stop_ids = self._stop_ids()
        # Sampling settings come from the request alone: drop the model's
        # defaults (top_k, repetition_penalty, ...) that generate() would merge in.
        self.model.generation_config = GenerationConfig(
            eos_token_id=self.stop_ids, pad_token_id=self.inputs.pad_token_id,
            bos_token_id=self.model.generation_config.bos_token_id)
        # a token's KV cache over all layers, the memory a generated row grows by per token
        text = text_config(self.model)
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_bytes = 2 * text.num_hidden_layers * heads * head_dim * next(self.model.parameters()).element_size()
        self.max_batch_tokens = int(self.options.max_batch_tokens or default_batch_tokens(
            self.model, self.device, kv_bytes, share=0.5, most=MAX_GENERATE_TOKENS, off_gpu=CPU_GENERATE_TOKENS))

    def _stop_ids(self) -> list[int]:
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        ids = set(configured if isinstance(configured, list) else [configured])
        tokenizer = self.inputs.tokenizer
        ids.add(tokenizer.eos_token_id)
        ids.add(tokenizer.get_vocab().get("<|im_end|>"))
        return sorted(i for i in ids if i is not None)

    def generate(self, requests: list[GenRequest]) -> list[list[Generation]]:
        results: list = [None] * len(requests)
        rows: dict[int, dict] = {}  # request index -> its prompt's tensors
        for i, request in enumerate(requests):
            if not request.seeds:
                results[i] = []
                continue
            try:
                if request.max_new_tokens < 1:
                    raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
                text = self.inputs.chat_prompt(request.prompt, request.image)
                rows[i] = self.inputs.encode(text, request.image, add_special_tokens=False)
            except Exception as e:  # one bad request must not sink the batch
                results[i] = self._failed(request, e)
        groups: dict[tuple[int, int], list[int]] = {}  # (max_new_tokens, padded prompt width or 0) -> requests
        for i in rows:
            n = rows[i]["input_ids"].shape[1]
            width = padded_length(n, self.length_bucket) if self.batching == "exact" else 0
            groups.setdefault((requests[i].max_new_tokens, width), []).append(i)
        for (max_new, width), members in sorted(groups.items()):
            lengths = [(width or rows[i]["input_ids"].shape[1]) + max_new for i in members]
            copies = [self._n_rows(requests[i]) for i in members]
            for batch in sorted_batches(lengths, self.max_batch_tokens, copies=copies):
                chunk = [members[j] for j in sorted(batch.members)]
                self._generate_chunk(requests, rows, chunk, (max_new, width or None), results)
        for _ in requests:
            fault_point("generate")
        return results

    @staticmethod
    def _n_rows(request: GenRequest) -> int:
        return 1 if request.temperature <= 0 else len(request.seeds)  # greedy samples are all the same

    def _failed(self, request: GenRequest, e: Exception) -> list[Generation]:
        log.warning("generation failed for %r: %s", request.pair_id, _error_text(e))
        return [Generation(text="", tokens=0, finish_reason="error", error=_error_text(e)) for _ in request.seeds]

    def _generate_chunk(self, requests, rows, chunk: list[int], shape: tuple, results: list) -> None:
        """Fill results[i] for the requests of `chunk` from one generate call; if the call fails (out of memory,
        a request the model rejects), each request again on its own, so that a bad one fails alone."""
        try:
            for i, generations in zip(chunk, self._generate_rows([requests[i] for i in chunk],
                                                                 [rows[i] for i in chunk], *shape)):
                results[i] = generations
        except Exception as e:
            if len(chunk) == 1:
                results[chunk[0]] = self._failed(requests[chunk[0]], e)
                return
            # one generate call per request is many times slower on a GPU, and in `sorted` batching its rows run
            # in other shapes than a rerun whose batch succeeds: say so
            log.warning("a generate call over %d requests failed (%s); each of them again on its own",
                        len(chunk), _error_text(e))
            for i in chunk:
                self._generate_chunk(requests, rows, [i], shape, results)

    def _generate_rows(self, requests: list[GenRequest], prompts: list[dict], max_new: int,
                       width: Optional[int]) -> list[list[Generation]]:
        """One generate call: each request's rows left-padded to `width` (None: the longest prompt)."""
        from transformers import GenerationConfig, LogitsProcessorList

        counts = [self._n_rows(r) for r in requests]
        seeds = [s for r, n in zip(requests, counts) for s in r.seeds[:n]]
        temperatures = [r.temperature for r, n in zip(requests, counts) for _ in range(n)]
        top_ps = [r.top_p for r, n in zip(requests, counts) for _ in range(n)]
        batch = self.inputs.collate([p for p, n in zip(prompts, counts) for _ in range(n)], "left", length=width)
        width = batch["input_ids"].shape[1]
        batch = to_device(batch, self.device)
        config = GenerationConfig(max_new_tokens=max_new, do_sample=False,
                                  eos_token_id=self.stop_ids, pad_token_id=self.inputs.pad_token_id)
        sampler = DeviceSampler(seeds, temperatures, top_ps, width, self.device)
        with inference(self.device):
            output = self.model.generate(**batch, generation_config=config,
                                         logits_processor=LogitsProcessorList([sampler]))
        new_tokens = output[:, width:].cpu().tolist()
        out, at = [], 0
        for request, n in zip(requests, counts):
            generations = [self._generation(tokens) for tokens in new_tokens[at:at + n]]
            at += n
            out.append(generations if n == len(request.seeds) else [replace(generations[0]) for _ in request.seeds])
        return out

    def _generation(self, tokens: list[int]) -> Generation:
        stop_at = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
        if stop_at is not None:
            tokens, reason = tokens[: stop_at + 1], "stop"
        else:
            reason = "length"
        text = self.inputs.tokenizer.decode(tokens, skip_special_tokens=True)
        return Generation(text=text.strip(), tokens=len(tokens), finish_reason=reason)
