"""Transformers backends: a generator (any image-text-to-text or causal LM) and
two embedders (a transformers model with last-token or mean pooling, and
sentence-transformers for text-only encoders).

Both transformers backends turn (text, image) into model tensors with one
helper, ModelInputs. It uses the model's processor where that loads; where it
does not (Qwen-VL processors need torchvision for their video half), it builds
the same tensors from the tokenizer and the image processor, expanding the
image placeholder token to one token per merged image patch.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
from dataclasses import replace
from typing import Optional

import numpy as np
from PIL import Image

from stages.backends.base import EmbedInput, Generation, GenRequest, l2_normalise
from stages.backends.prompt_text import chat_content, raw_text
from stages.faults import fault_point

log = logging.getLogger(__name__)

# Keys of processor output that hold one value per token (padded when rows are
# stacked); every other tensor holds per-image values and is concatenated.
_PER_TOKEN_PAD = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "mm_token_type_ids": 0}


def _device(device: Optional[str]) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(dtype: Optional[str], device: str):
    import torch

    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"[:500]


class ModelInputs:
    """Prompt text and model tensors for one model folder, shared by the
    generator (chat-templated prompts) and the embedder (raw text)."""

    def __init__(self, model: str, trust_remote_code: bool = False):
        from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, ProcessorMixin

        self.processor = None
        try:
            processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
            if isinstance(processor, ProcessorMixin):  # text models give back their tokenizer
                self.processor = processor
        except Exception as e:  # e.g. ImportError: a Qwen-VL video processor without torchvision
            log.info("no full processor for %s (%s); using tokenizer + image processor", model, e)
        if self.processor is not None:
            self.tokenizer = self.processor.tokenizer
            self.image_processor = getattr(self.processor, "image_processor", None)
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
            try:
                self.image_processor = AutoImageProcessor.from_pretrained(
                    model, trust_remote_code=trust_remote_code)
            except Exception:
                self.image_processor = None  # a text-only model

        vocab = self.tokenizer.get_vocab()
        self.image_token = getattr(self.processor, "image_token", None) or "<|image_pad|>"
        self.image_token_id = vocab.get(self.image_token)
        # The text form of one image: Qwen wraps its pad token in vision start/end.
        if "<|vision_start|>" in vocab and "<|vision_end|>" in vocab:
            self.image_placeholder = f"<|vision_start|>{self.image_token}<|vision_end|>"
        else:
            self.image_placeholder = self.image_token
        # placeholder tokens typed into user text would claim image features that don't exist
        self.reserved_tokens = [t for t in (self.image_token, "<|video_pad|>") if t in vocab]
        self.chat_template_owner = next(
            (o for o in (self.processor, self.tokenizer) if o is not None and getattr(o, "chat_template", None)),
            None)
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id or 0

    @property
    def takes_images(self) -> bool:
        return self.image_processor is not None and self.image_token_id is not None

    # --- text -------------------------------------------------------------

    def chat_prompt(self, prompt: str, image: Optional[Image.Image]) -> str:
        """The generation prompt: one user turn with the image placed by prompt_text.chat_content, and the
        assistant turn opened."""
        if self.chat_template_owner is None:
            return self.raw_text(prompt, image)
        content = chat_content(prompt, image is not None, self.reserved_tokens)
        return self.chat_template_owner.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)

    def raw_text(self, text: str, image: Optional[Image.Image]) -> str:
        """Text as an embedder reads it (no chat turn), the image placed by prompt_text.raw_text."""
        return raw_text(text, image is not None, self.image_placeholder, self.reserved_tokens)

    # --- tensors ------------------------------------------------------------

    def encode(self, text: str, image: Optional[Image.Image], add_special_tokens: bool,
               max_length: Optional[int] = None) -> dict:
        """Tensors for one row (batch dimension 1). max_length caps the text
        tokens; image tokens are never cut (the model needs all of them)."""
        if image is not None and not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
        if image is not None and not self.takes_images:
            raise ValueError("this model takes no images (no image processor or image token)")
        if image is not None and self.image_placeholder not in text and self.image_token not in text:
            raise ValueError("text has no image placeholder for its image")
        if self.processor is not None:
            row = dict(self.processor(text=[text], images=[image] if image is not None else None,
                                      add_special_tokens=add_special_tokens, return_tensors="pt"))
        else:
            row = self._encode_without_processor(text, image, add_special_tokens)
        if max_length is not None:
            row = self._truncate(row, max_length)
        return row

    def _encode_without_processor(self, text: str, image: Optional[Image.Image], add_special_tokens: bool) -> dict:
        import torch

        encoded = self.tokenizer(text, add_special_tokens=add_special_tokens)
        ids = list(encoded["input_ids"])
        row = {}
        if image is not None:
            vision = self.image_processor(images=[image], return_tensors="pt")
            grid = vision.get("image_grid_thw")
            merge = getattr(self.image_processor, "merge_size", None)
            if grid is None or merge is None:
                raise ValueError("cannot expand image tokens for this model without its processor")
            n_tokens = int(grid[0].prod()) // merge**2
            at = ids.index(self.image_token_id)
            ids = ids[:at] + [self.image_token_id] * n_tokens + ids[at + 1:]
            row.update(vision)
            row["mm_token_type_ids"] = torch.tensor([[int(t == self.image_token_id) for t in ids]])
        row["input_ids"] = torch.tensor([ids])
        row["attention_mask"] = torch.ones_like(row["input_ids"])
        if "token_type_ids" in encoded:
            row["token_type_ids"] = torch.tensor([encoded["token_type_ids"]])
        return row

    def _truncate(self, row: dict, max_length: int) -> dict:
        ids = row["input_ids"][0]
        is_image = ids == self.image_token_id if self.image_token_id is not None else ids != ids
        text_rank = (~is_image).cumsum(0)  # 1-based rank of each text token
        keep = is_image | (text_rank <= max_length)
        if bool(keep.all()):
            return row
        length = ids.shape[0]
        return {k: v[:, keep] if k in _PER_TOKEN_PAD and v.shape[-1] == length else v for k, v in row.items()}

    def collate(self, rows: list[dict], padding_side: str, length: Optional[int] = None) -> dict:
        """Stack rows into one batch: pad per-token tensors to `length` (default:
        the longest row), concatenate per-image tensors in row order."""
        import torch

        length = length or max(r["input_ids"].shape[1] for r in rows)
        batch = {}
        keys = {k for r in rows for k in r}
        for key in keys:
            if key in _PER_TOKEN_PAD:
                fill = self.pad_token_id if key == "input_ids" else _PER_TOKEN_PAD[key]
                padded = []
                for r in rows:
                    n = r["input_ids"].shape[1]
                    value = r.get(key)
                    if value is None:  # e.g. mm_token_type_ids on a row without an image
                        value = torch.zeros(1, n, dtype=torch.long)
                    pad = torch.full((1, length - n), fill, dtype=value.dtype)
                    padded.append(torch.cat([pad, value] if padding_side == "left" else [value, pad], dim=1))
                batch[key] = torch.cat(padded)
            else:
                values = [r[key] for r in rows if key in r]
                batch[key] = torch.cat(values) if isinstance(values[0], torch.Tensor) else values
        return batch


def _load_model(model: str, auto_classes: list, trust_remote_code: bool, device: str, dtype):
    """The first auto class that knows this model's config, moved to device."""
    errors = []
    for auto_class in auto_classes:
        try:
            loaded = auto_class.from_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code)
            return loaded.to(device).eval()
        except (ValueError, KeyError) as e:  # config not mapped to this auto class
            errors.append(f"{auto_class.__name__}: {e}")
    raise ValueError(f"cannot load {model}: " + "; ".join(errors))


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
        self.device = _device(device)
        self.inputs = ModelInputs(model, trust_remote_code)
        self.model = _load_model(model, [AutoModelForImageTextToText, AutoModelForCausalLM],
                                 trust_remote_code, self.device, _dtype(dtype, self.device))
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

        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        self.model_id = model
        self.pooling = pooling
        self.max_length = max_length
        self.batch_size = int(options.get("batch_size", 16))
        self.length_bucket = int(options.get("length_bucket", 32))
        self.device = _device(device)
        self.inputs = ModelInputs(model, trust_remote_code)
        self.model = _load_model(model, [AutoModel], trust_remote_code, self.device, _dtype(dtype, self.device))
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
        self.model = SentenceTransformer(model, device=_device(device), trust_remote_code=trust_remote_code)
        self.model.max_seq_length = max_length

    def embed(self, inputs: list[EmbedInput]) -> np.ndarray:
        if any(x.image is not None for x in inputs):
            raise ValueError(f"{self.model_id} is a text-only sentence-transformers model; it cannot embed images")
        texts = [raw_text(x.text, False, "") for x in inputs]
        vectors = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                    normalize_embeddings=True, show_progress_bar=False)
        return l2_normalise(np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1))
