"""The transformers embedders: a transformers model with last-token or mean
pooling, and sentence-transformers for text-only encoders."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

import numpy as np

from stages.backends.base import POOLINGS, EmbedInput, l2_normalise
from stages.backends.hf.batching import (Batch, batching_for, default_batch_tokens, exact_batches, prefetched,
                                         preparing_threads, sorted_batches, text_config)
from stages.backends.hf.inputs import (DeviceOptions, ModelInputs, TransformersOptions, device_for, dtype_for,
                                       inference, load_model, pinned, to_device)
from stages.backends.options import option
from stages.backends.prompt_text import raw_text
from stages.faults import fault_point


@dataclasses.dataclass(frozen=True)
class TransformersEmbedderOptions(TransformersOptions):
    # Speed only: `exact` fills a batch up to batch_size rows with copies; no sum runs across rows, so the size
    # changes only the height of the per-token layers' matrices. The demo's shards are byte-identical at 4, 7
    # and 16 rows (CPU, float32; tests/test_backend_options.py). `sorted` changes batchmates with it, as
    # resources.batch_size does.
    batch_size: int = option(16, "`exact`: rows per forward, a short batch filled up with copies; `sorted`: the "
                                 "most rows of a batch, only where set", label=False, at_least=1)
    # the length a row is padded to is the length its attention sums over: kept in the labels
    length_bucket: int = option(32, "`exact`: each row padded to its length rounded up to a multiple of this",
                                label=True, at_least=1)
    # `exact` does not read it; in `sorted` it changes batchmates only, as resources.batch_size does
    max_batch_tokens: Optional[int] = option(None, "`sorted`: the most padded tokens per forward", label=False,
                                             shown="from the GPU's memory (at most 16,384); 8,192 off a GPU")


@dataclasses.dataclass(frozen=True)
class SentenceTransformersOptions(DeviceOptions):
    # sentence-transformers pads each batch to its longest row: vectors move by ~1e-7 with batch_size (MiniLM)
    batch_size: int = option(16, "rows per `encode` batch", label=True, at_least=1)


class TransformersEmbedder:
    """Embeddings from a transformers model's last hidden states: the last real
    token's state (VLM2Vec style, pooling="last") or the masked mean ("mean").

    A call's rows are planned into batches first (stages/backends/hf/batching.py), from their lengths alone
    (no image processed yet); worker threads then tokenise, process images and collate the next batches (in
    pinned memory for a GPU) while the model runs the current one; pooling runs on the device, and the pooled
    vectors come back in one copy at the end of the call. Right padding: with causal attention a real token
    never sees a pad.

    `batching` (option; default `sorted` on a GPU, `exact` elsewhere) chooses the plan:
    - `exact` is batch-invariant: an input's vector is the same, bit for bit, whatever else the call embeds, so a
      resumed or retried shard reproduces every score whoever embedded an input first. Float kernels give results
      that depend on the shapes they run on, so every forward pass has a shape that its rows alone decide: each
      row right-padded to its own length rounded up to a multiple of `length_bucket` (always at least one pad
      token, so every row takes the masked-attention path), `batch_size` rows at a time, a short batch filled up
      with copies; images go through the vision tower one at a time (each distinct image once per call) and
      reach the language model as precomputed features (`mm_encoder_outputs`); a model that cannot take those
      embeds each row that has an image on its own.
    - `sorted` keeps a GPU busy: rows sorted by length, batches of at most `max_batch_tokens` padded tokens
      (default from the GPU's memory) padded to their own longest row, each batch's new images through the
      vision tower together. A vector then depends on its batchmates in the last bits."""

    Options = TransformersEmbedderOptions

    def __init__(self, model: str, pooling: str = "last", max_length: int = 512, trust_remote_code: bool = False,
                 **options):
        from transformers import AutoModel

        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.options = self.Options.parse(options, "transformers embedder")
        self.model_id = model
        self.pooling = pooling
        self.max_length = max_length
        self.device = device_for(self.options.device)
        self.batching = batching_for(self.options.batching, self.device)
        self.batch_size = self.options.batch_size
        self.length_bucket = self.options.length_bucket
        self.inputs = ModelInputs(model, trust_remote_code)
        dtype = dtype_for(self.options.dtype, self.device)
        self.model = load_model(model, [AutoModel], trust_remote_code, self.device, dtype,
                                self.options.attn_implementation)
        self.vector_settings = {"device": self.device, "dtype": str(dtype), "batching": self.batching}
        params = inspect.signature(self.model.forward).parameters
        # decoders would build a KV cache nobody reads; encoders take no such argument
        self.forward_options = {"use_cache": False} if "use_cache" in params else {}
        self.takes_image_features = "mm_encoder_outputs" in params and hasattr(self.model, "get_image_features")
        # images through the vision tower apart from the rows (Qwen-style: a grid per image, one token per merged
        # patch); other models get each image's pixels with its row
        self.image_features = self.takes_image_features and hasattr(self.inputs.image_processor, "merge_size")
        text = text_config(self.model)
        bytes_per_token = next(self.model.parameters()).element_size() * (
            4 * text.hidden_size + 3 * getattr(text, "intermediate_size", 4 * text.hidden_size))
        self.max_batch_tokens = (self.options.max_batch_tokens or
                                 default_batch_tokens(self.model, self.device, bytes_per_token))
        # sorted batching: a cap only where the config sets one
        self.max_batch_rows = self.batch_size if "batch_size" in options else None
        self.threads = preparing_threads(self.device)

    def embed(self, inputs: list[EmbedInput]) -> np.ndarray:
        if not inputs:
            return np.zeros((0, self._dim()), dtype=np.float32)
        texts = [self.inputs.raw_text(x.text, x.image) for x in inputs]
        images = [x.image for x in inputs]
        if not self.inputs.encodes_with_processor and (self.inputs.counts_image_tokens
                                                       or all(im is None for im in images)):
            rows = None  # encoded batch by batch, on the preparing threads
            lengths = self.inputs.lengths(texts, images, add_special_tokens=True, max_length=self.max_length)
        else:  # a processor decides how many tokens its text and images take: encode every row now
            rows = [self.inputs.encode(t, image, add_special_tokens=True, max_length=self.max_length)
                    for t, image in zip(texts, images)]
            lengths = [row["input_ids"].shape[1] for row in rows]
        vision: dict[int, dict] = {}  # id(image) -> its image tensors (pinned for a GPU), processed once per call
        for row, image in zip(rows or [], images):
            if image is not None and id(image) not in vision:
                vision[id(image)] = pinned({k: row[k] for k in ("pixel_values", "image_grid_thw") if k in row},
                                           self.device)
        if self.batching == "exact":
            alone = [image is not None and not self.image_features for image in images]
            plan = exact_batches(lengths, alone, self.length_bucket, self.batch_size)
        else:
            plan = sorted_batches(lengths, self.max_batch_tokens, self.max_batch_rows)

        def prepare(batch: Batch) -> dict:
            members = [rows[i] if rows is not None else self._encode(texts[i], images[i], lengths[i], vision)
                       for i in batch.members]
            members += [members[0]] * (batch.rows - len(members))
            tensors = self.inputs.collate(members, "right", length=batch.length)
            if self.image_features:  # the language model gets features (and the grids, for its positions)
                tensors.pop("pixel_values", None)
                tensors["new_images"] = {id(images[i]): vision[id(images[i])] for i in batch.members
                                         if images[i] is not None}
            return pinned(tensors, self.device)

        features: dict[int, object] = {}  # id(image) -> the vision tower's output for it
        pooled = []
        for batch, tensors in prefetched(plan, prepare, self.threads):
            new = {k: v for k, v in tensors.pop("new_images", {}).items() if k not in features}
            if new:
                self._add_features(features, new)
            image_rows = [images[i] for i in batch.members if images[i] is not None] if self.image_features else []
            if image_rows and images[batch.members[0]] is not None:  # the copies that fill an exact batch up
                image_rows += [images[batch.members[0]]] * (batch.rows - len(batch.members))
            pooled.append(self._forward(tensors, [features[id(im)] for im in image_rows], len(batch.members)))
        order = np.argsort(np.concatenate([b.members for b in plan]), kind="stable")
        vectors = torch_cat_cpu(pooled)[order]
        fault_point("embed", len(inputs))
        return l2_normalise(vectors)

    def _encode(self, text: str, image, length: int, vision: dict) -> dict:
        if image is not None and id(image) not in vision:
            vision[id(image)] = pinned(self.inputs.image_tensors(image), self.device)
        row = self.inputs.encode(text, image, add_special_tokens=True, max_length=self.max_length,
                                 vision=None if image is None else vision[id(image)])
        if row["input_ids"].shape[1] != length:
            raise RuntimeError(f"planned {length} tokens for a row that has {row['input_ids'].shape[1]}")
        return row

    def _add_features(self, features: dict, new: dict) -> None:
        """The vision tower's output for each new image: all of the batch's new images in one call (sorted
        batching), or one image at a time (exact batching, so that an image's features never depend on other
        images; also for a model whose output holds more than its per-image pooler_output, e.g. Qwen3-VL's
        per-layer deepstack features)."""
        import torch

        keys = list(new)
        with inference(self.device):
            if self.batching == "sorted" and len(keys) > 1:
                both = to_device({"pixel_values": torch.cat([new[k]["pixel_values"] for k in keys]),
                                  "image_grid_thw": torch.cat([new[k]["image_grid_thw"] for k in keys])}, self.device)
                out = self.model.get_image_features(both["pixel_values"], both["image_grid_thw"], return_dict=True)
                if getattr(out, "deepstack_features", None) is None:
                    features.update({key: type(out)(pooler_output=(part,))
                                     for key, part in zip(keys, out.pooler_output)})
                    return
            for key in keys:
                one = to_device(new[key], self.device)
                features[key] = self.model.get_image_features(one["pixel_values"], one["image_grid_thw"],
                                                              return_dict=True)

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

    def _forward(self, tensors: dict, image_features: list, n_real: int):
        """The batch's pooled rows, float32, on the device (no copy back yet)."""
        batch = to_device(tensors, self.device)
        if image_features:
            batch["mm_encoder_outputs"] = {"image": self._join(image_features)}
        with inference(self.device):
            hidden = self.model(**batch, **self.forward_options).last_hidden_state
            return self._pool(hidden, batch["attention_mask"])[:n_real]

    def _pool(self, hidden, mask):
        if self.pooling == "last":
            last = mask.sum(dim=1) - 1  # right padding: the last real token
            return hidden[range(hidden.shape[0]), last].float()
        hidden = hidden.float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)

    def _dim(self) -> int:
        return int(text_config(self.model).hidden_size)


def torch_cat_cpu(parts: list) -> np.ndarray:
    """The pooled rows of every batch, copied to the host in one go (the only wait for the device per call)."""
    import torch

    return torch.cat(parts).cpu().numpy()


class SentenceTransformersEmbedder:
    """A text-only sentence-transformers model; its own modules decide the
    pooling, so `pooling` is accepted for interface symmetry only."""

    Options = SentenceTransformersOptions

    def __init__(self, model: str, pooling: Optional[str] = None, max_length: int = 512,
                 trust_remote_code: bool = False, **options):
        from sentence_transformers import SentenceTransformer

        self.options = self.Options.parse(options, "sentence_transformers embedder")
        self.model_id = model
        self.batch_size = self.options.batch_size
        device = device_for(self.options.device)
        self.model = SentenceTransformer(model, device=device, trust_remote_code=trust_remote_code)
        self.vector_settings = {"device": device}
        self.model.max_seq_length = max_length

    def embed(self, inputs: list[EmbedInput]) -> np.ndarray:
        if any(x.image is not None for x in inputs):
            raise ValueError(f"{self.model_id} is a text-only sentence-transformers model; it cannot embed images")
        texts = [raw_text(x.text, False, "") for x in inputs]
        vectors = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return l2_normalise(np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1))
