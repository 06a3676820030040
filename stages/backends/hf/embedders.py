"""The transformers embedders: a transformers model with last-token or mean
pooling, and sentence-transformers for text-only encoders."""
from __future__ import annotations

import hashlib
import inspect
from typing import Optional

import numpy as np

from stages.backends.base import POOLINGS, EmbedInput, l2_normalise
from stages.backends.hf.inputs import ModelInputs, device_for, dtype_for, load_model
from stages.backends.prompt_text import raw_text
from stages.faults import fault_point


class TransformersEmbedder:
    """Embeddings from a transformers model's last hidden states: the last real
    token's state (VLM2Vec style, pooling="last") or the masked mean ("mean").

    Batch-invariant: an input's vector is the same, bit for bit, whatever else
    the call embeds, so a resumed or retried shard reproduces every score. Float
    kernels give results that depend on the shapes they run on (blocking,
    reduction order, kernel choice), so every forward pass has a shape that its
    rows alone decide: each row is right-padded to its own length rounded up to
    a multiple of `length_bucket` (always at least one pad token, so every row
    takes the masked-attention path), and rows of one length run `batch_size` at
    a time, a short micro-batch filled up with copies. With causal attention and
    right padding a real token never sees a pad, and every other op is row-wise.
    Images go through the vision tower one at a time (each distinct image once
    per call) and reach the language model as precomputed features
    (`mm_encoder_outputs`); a model that cannot take those embeds each row that
    has an image on its own."""

    def __init__(self, model: str, pooling: str = "last", max_length: int = 512, trust_remote_code: bool = False,
                 device: Optional[str] = None, dtype: Optional[str] = None, **options):
        from transformers import AutoModel

        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.model_id = model
        self.pooling = pooling
        self.max_length = max_length
        self.batch_size = int(options.get("batch_size", 16))
        self.length_bucket = int(options.get("length_bucket", 32))
        self.device = device_for(device)
        self.inputs = ModelInputs(model, trust_remote_code)
        self.model = load_model(model, [AutoModel], trust_remote_code, self.device, dtype_for(dtype, self.device))
        params = inspect.signature(self.model.forward).parameters
        # decoders would build a KV cache nobody reads; encoders take no such argument
        self.forward_options = {"use_cache": False} if "use_cache" in params else {}
        self.takes_image_features = "mm_encoder_outputs" in params and hasattr(self.model, "get_image_features")

    def embed(self, inputs: list[EmbedInput]) -> np.ndarray:
        rows = [self.inputs.encode(self.inputs.raw_text(x.text, x.image), x.image, add_special_tokens=True,
                                   max_length=self.max_length) for x in inputs]
        if not rows:
            return np.zeros((0, self._dim()), dtype=np.float32)
        features = self._image_features(rows)
        by_length: dict[tuple[int, bool], list[int]] = {}
        for i, row in enumerate(rows):
            alone = "pixel_values" in row and features[i] is None
            by_length.setdefault((self._padded_length(row), alone), []).append(i)
        vectors: list = [None] * len(rows)
        for (length, alone), members in sorted(by_length.items(), reverse=True):
            size = 1 if alone else self.batch_size
            for start in range(0, len(members), size):
                chunk = members[start:start + size]
                pooled = self._forward([rows[i] for i in chunk], [features[i] for i in chunk], length, size)
                for i, vector in zip(chunk, pooled):
                    vectors[i] = vector
        fault_point("embed", len(rows))
        return l2_normalise(np.stack(vectors))

    def _padded_length(self, row: dict) -> int:
        n = row["input_ids"].shape[1]
        return (n // self.length_bucket + 1) * self.length_bucket  # > n: at least one pad token

    def _image_features(self, rows: list[dict]) -> list:
        """Per row, the vision tower's output for its image alone (None: no
        image, or the model takes pixels only), each distinct image computed once."""
        import torch

        out, seen = [], {}
        for row in rows:
            grid = row.get("image_grid_thw")
            if "pixel_values" not in row or grid is None or not self.takes_image_features:
                out.append(None)
                continue
            pixels = row["pixel_values"]
            key = hashlib.sha256(pixels.numpy().tobytes() + grid.numpy().tobytes()).digest()
            if key not in seen:
                with torch.inference_mode():
                    seen[key] = self.model.get_image_features(pixels.to(self.device), grid.to(self.device),
                                                              return_dict=True)
            out.append(seen[key])
        return out

    @staticmethod
    def _join(per_image: list):
        """One vision output for several images, as get_image_features would give for them together: the
        per-image tuples end to end (pooler_output, and per layer deepstack_features for Qwen3-VL)."""
        first = per_image[0]
        joined = {"pooler_output": tuple(t for o in per_image for t in o.pooler_output)}
        if getattr(first, "deepstack_features", None) is not None:
            joined["deepstack_features"] = [tuple(t for o in per_image for t in o.deepstack_features[layer])
                                            for layer in range(len(first.deepstack_features))]
        return type(first)(**joined)

    def _forward(self, rows: list[dict], features: list, length: int, size: int):
        import torch

        n_real = len(rows)
        rows, features = rows + [rows[0]] * (size - n_real), features + [features[0]] * (size - n_real)
        batch = self.inputs.collate(rows, "right", length=length)
        if any(f is not None for f in features):
            batch.pop("pixel_values", None)
            batch["mm_encoder_outputs"] = {"image": self._join([f for f in features if f is not None])}
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.inference_mode():
            hidden = self.model(**batch, **self.forward_options).last_hidden_state.float()
        return self._pool(hidden, batch["attention_mask"]).cpu().numpy()[:n_real]

    def _pool(self, hidden, mask):
        if self.pooling == "last":
            last = mask.sum(dim=1) - 1  # right padding: the last real token
            return hidden[range(hidden.shape[0]), last]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)

    def _dim(self) -> int:
        config = self.model.config
        text_config = getattr(config, "text_config", None) or config
        return int(text_config.hidden_size)


class SentenceTransformersEmbedder:
    """A text-only sentence-transformers model; its own modules decide the
    pooling, so `pooling` is accepted for interface symmetry only."""

    def __init__(self, model: str, pooling: Optional[str] = None, max_length: int = 512,
                 trust_remote_code: bool = False, device: Optional[str] = None, **options):
        from sentence_transformers import SentenceTransformer

        self.model_id = model
        self.batch_size = int(options.get("batch_size", 16))
        self.model = SentenceTransformer(model, device=device_for(device), trust_remote_code=trust_remote_code)
        self.model.max_seq_length = max_length

    def embed(self, inputs: list[EmbedInput]) -> np.ndarray:
        if any(x.image is not None for x in inputs):
            raise ValueError(f"{self.model_id} is a text-only sentence-transformers model; it cannot embed images")
        texts = [raw_text(x.text, False, "") for x in inputs]
        vectors = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return l2_normalise(np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1))
