"""The two backend roles. A backend knows one model runtime and nothing of
Ray, Arrow or pairsel's records: stages/generate.py and stages/embed.py turn
rows into these requests and the answers back into columns.

Images travel as decoded PIL images. In text, the MMEB marker `<|image_1|>`
(IMAGE_MARKER) says where the image goes; every backend turns (text, image) into
its model's text with stages/backends/prompt_text.py, so all of them place the
image alike (first, on a line of its own, where the text has no marker).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np
from PIL import Image

from stages.backends.prompt_text import IMAGE_MARKER  # noqa: F401  (re-exported: stages import it from here)


@dataclass
class GenRequest:
    """One prompt, to be sampled len(seeds) times (one sample per seed)."""

    prompt: str  # the user turn; may contain IMAGE_MARKER
    image: Optional[Image.Image]
    seeds: list[int]
    temperature: float
    top_p: float
    max_new_tokens: int
    pair_id: str = ""  # for backends keyed by pair (precomputed)


@dataclass
class Generation:
    text: str
    tokens: int  # generated tokens
    finish_reason: str  # stop | length | error (the stage adds empty / echo)
    error: Optional[str] = None


class GeneratorBackend(Protocol):
    """Constructed once per actor: __init__(model: str, trust_remote_code: bool, **options), the options as its
    `Options` (a BackendOptions dataclass, stages/backends/options.py) declares them."""

    Options: type
    model_id: str

    def generate(self, requests: list[GenRequest]) -> list[list[Generation]]:
        """One list per request, one Generation per seed, in seed order. Must not
        raise for one bad request: a failure becomes Generation(finish_reason="error")."""
        ...


@dataclass
class EmbedInput:
    text: str  # instruction already applied; may contain IMAGE_MARKER
    image: Optional[Image.Image] = None


# embedder.pooling: the last token's state (VLM2Vec style) or the masked mean; every embedder backend offers both
# (pipeline/config.py takes its choices from here)
POOLINGS = ("last", "mean")


class EmbedderBackend(Protocol):
    """Constructed once per actor: __init__(model: str, pooling: str (one of POOLINGS), max_length: int,
    trust_remote_code: bool, **options), the options as its `Options` declares them."""

    Options: type
    model_id: str
    # what the backend decided on this machine where the config is silent and that moves vectors (device, dtype,
    # batching): the same config on a CPU and on a GPU embeds differently, so the embedding cache keys on it
    vector_settings: dict

    def embed(self, inputs: list[EmbedInput]) -> np.ndarray:
        """float32 array (len(inputs), dim), each row L2-normalised."""
        ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
