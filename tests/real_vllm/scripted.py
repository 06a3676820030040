"""A vLLM logits processor that makes any model write a given text, token by token, then its end token.

With it, a random-weight model on the real vLLM engine writes what a thinking model writes (a `<think>`
block, then the answer), so the test sees vLLM's own tokenization, sampling and detokenization of such an
output. Set `ScriptedOutput.script` (token ids) before the engine starts; it runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor


class ScriptedOutput(LogitsProcessor):
    script: list[int] = []

    def __init__(self, vllm_config, device, is_pin_memory):
        self.outputs: dict[int, list[int]] = {}  # batch index -> the request's generated tokens (live list)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.outputs.pop(index, None)
        for index, _params, _prompt, output_ids in batch_update.added:
            self.outputs[index] = output_ids
        for a, b, direction in batch_update.moved:
            moved_a, moved_b = self.outputs.pop(a, None), self.outputs.pop(b, None)
            if moved_a is not None:
                self.outputs[b] = moved_a
            if moved_b is not None and direction.name == "SWAP":
                self.outputs[a] = moved_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, output_ids in self.outputs.items():
            n = len(output_ids)
            if index < logits.shape[0] and n < len(self.script):
                forced = self.script[n]
                logits[index] = float("-inf")
                logits[index, forced] = 0.0
        return logits
