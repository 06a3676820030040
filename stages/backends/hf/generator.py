"""The transformers generator: any image-text-to-text or causal LM, each
candidate sampled from its own seed."""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

from stages.backends.base import Generation, GenRequest
from stages.backends.hf.inputs import ModelInputs, device_for, dtype_for, load_model
from stages.faults import fault_point

log = logging.getLogger(__name__)


def _error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"[:500]


class _SeededSampler:
    """A logits processor that samples row i with its own generator, seeded by
    seeds[i], and hands greedy search a one-hot choice. So sample i depends on
    its seed and its own tokens only, not on its neighbours in the batch.
    Sampling runs on the CPU: the same seeds give the same draws on any device."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        import torch

        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids, scores):
        import torch

        probs = torch.softmax(scores.float().cpu() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > self.top_p  # the top token always stays
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        chosen = torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        one_hot = torch.full_like(scores, float("-inf"))
        return one_hot.scatter(-1, chosen.to(scores.device), 0.0)


class TransformersGenerator:
    """Rationale generator on transformers. One request is generated as a batch
    of its seeds (identical prompts, so no padding); requests run one by one,
    which keeps each result independent of the rest of the batch."""

    def __init__(self, model: str, trust_remote_code: bool = False, device: Optional[str] = None,
                 dtype: Optional[str] = None, **options):
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, GenerationConfig

        self.model_id = model
        self.device = device_for(device)
        self.inputs = ModelInputs(model, trust_remote_code)
        self.model = load_model(model, [AutoModelForImageTextToText, AutoModelForCausalLM],
                                 trust_remote_code, self.device, dtype_for(dtype, self.device))
        self.stop_ids = self._stop_ids()
        # Sampling settings come from the request alone: drop the model's
        # defaults (top_k, repetition_penalty, ...) that generate() would merge in.
        self.model.generation_config = GenerationConfig(
            eos_token_id=self.stop_ids, pad_token_id=self.inputs.pad_token_id,
            bos_token_id=self.model.generation_config.bos_token_id)

    def _stop_ids(self) -> list[int]:
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        ids = set(configured if isinstance(configured, list) else [configured])
        tokenizer = self.inputs.tokenizer
        ids.add(tokenizer.eos_token_id)
        ids.add(tokenizer.get_vocab().get("<|im_end|>"))
        return sorted(i for i in ids if i is not None)

    def generate(self, requests: list[GenRequest]) -> list[list[Generation]]:
        results = []
        for request in requests:
            try:
                results.append(self._generate_one(request))
            except Exception as e:  # one bad request must not sink the batch
                log.warning("generation failed for %r: %s", request.pair_id, _error_text(e))
                results.append([Generation(text="", tokens=0, finish_reason="error", error=_error_text(e))
                                for _ in request.seeds])
            fault_point("generate")
        return results

    def _generate_one(self, request: GenRequest) -> list[Generation]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        if not request.seeds:
            return []
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        greedy = request.temperature <= 0
        text = self.inputs.chat_prompt(request.prompt, request.image)
        row = self.inputs.encode(text, request.image, add_special_tokens=False)
        n_rows = 1 if greedy else len(request.seeds)  # greedy samples are all the same
        batch = {k: v.to(self.device) for k, v in self.inputs.collate([row] * n_rows, "left").items()}
        config = GenerationConfig(max_new_tokens=request.max_new_tokens, do_sample=False,
                                  eos_token_id=self.stop_ids, pad_token_id=self.inputs.pad_token_id)
        processors = LogitsProcessorList(
            [] if greedy else [_SeededSampler(request.seeds, request.temperature, request.top_p)])
        with torch.inference_mode():
            output = self.model.generate(**batch, generation_config=config, logits_processor=processors)
        new_tokens = output[:, batch["input_ids"].shape[1]:].cpu().tolist()
        generations = [self._generation(tokens) for tokens in new_tokens]
        if greedy:
            return [replace(generations[0]) for _ in request.seeds]
        return generations

    def _generation(self, tokens: list[int]) -> Generation:
        stop_at = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
        if stop_at is not None:
            tokens, reason = tokens[: stop_at + 1], "stop"
        else:
            reason = "length"
        text = self.inputs.tokenizer.decode(tokens, skip_special_tokens=True)
        return Generation(text=text.strip(), tokens=len(tokens), finish_reason=reason)
