"""What both transformers backends share: loading a model folder onto a device, and
turning (text, image) into model tensors with one helper, ModelInputs.

ModelInputs uses the model's processor where that loads; where it does not
(Qwen-VL processors need torchvision for their video half), it builds the same
tensors from the tokenizer and the image processor, expanding the image
placeholder token to one token per merged image patch. On that path a row's
length is known before its image is processed (`lengths`), and an image shared
by several rows is processed once (`image_tensors`), so batches can be planned
first and their tensors built on another thread while the model runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Optional

from PIL import Image

from stages.backends.hf.batching import BATCHINGS
from stages.backends.options import BackendOptions, option
from stages.backends.prompt_text import chat_content, raw_text

log = logging.getLogger(__name__)

# Keys of processor output that hold one value per token (padded when rows are
# stacked); every other tensor holds per-image values and is concatenated.
_PER_TOKEN_PAD = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "mm_token_type_ids": 0}


@dataclasses.dataclass(frozen=True)
class DeviceOptions(BackendOptions):
    """The option of every backend that runs a torch model in the actor (each adds its own)."""

    device: Optional[str] = option(None, "the torch device the model runs on", label=True,
                                   shown="`cuda` with a GPU, else `cpu`")


@dataclasses.dataclass(frozen=True)
class TransformersOptions(DeviceOptions):
    """The options of both transformers backends (each adds its own)."""

    dtype: Optional[str] = option(None, "the model's dtype (a torch dtype name, or `auto`)", label=True,
                                  shown="`bfloat16` on a GPU, `float32` elsewhere")
    # exact and sorted batches give vectors and logits that differ in the last bits (BENCHMARKS.md)
    batching: Optional[str] = option(None, "how a call's rows become batches: `exact` (batch-invariant) or "
                                           "`sorted` (see below)", label=True, choices=BATCHINGS,
                                     shown="`sorted` on a GPU, `exact` elsewhere")
    # the attention kernels decide the last bits of every hidden state: kept in the labels
    attn_implementation: Optional[str] = option(
        None, "transformers' attention implementation (`sdpa`, `eager`, `flash_attention_2`, ...); "
              "`flash_attention_2`, where flash-attn is installed, runs a Qwen-VL vision tower's images in one call "
              "per layer", label=True, shown="transformers' choice")


def device_for(device: Optional[str]) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def dtype_for(dtype: Optional[str], device: str):
    import torch

    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


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

    @property
    def counts_image_tokens(self) -> bool:
        """Whether a row's length is known without processing its image: a Qwen-style image processor (one token
        per merged patch)."""
        return (self.takes_images and hasattr(self.image_processor, "merge_size")
                and hasattr(self.image_processor, "get_number_of_image_patches"))

    @property
    def encodes_with_processor(self) -> bool:
        """Whether `encode` hands a row to the model's processor: only where one loaded and decides its own image
        tokens. A Qwen-style model's rows are encoded here (tokenizer + image processor, the image tokens
        expanded from the image's grid) whether or not its processor loaded: the processor would process a row's
        image again for every row that holds it, on the caller's thread, where this path processes each image
        once per call on the embedder's preparing threads (and tests on machines without torchvision, where
        Qwen's processor does not load, run the path that GPU machines run)."""
        return self.processor is not None and not self.counts_image_tokens

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

    def check(self, text: str, image: Optional[Image.Image]) -> None:
        if image is not None and not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
        if image is not None and not self.takes_images:
            raise ValueError("this model takes no images (no image processor or image token)")
        if image is not None and self.image_placeholder not in text and self.image_token not in text:
            raise ValueError("text has no image placeholder for its image")

    def encode(self, text: str, image: Optional[Image.Image], add_special_tokens: bool,
               max_length: Optional[int] = None, vision: Optional[dict] = None) -> dict:
        """Tensors for one row (batch dimension 1). max_length caps the text
        tokens; image tokens are never cut (the model needs all of them).
        vision: the image's `image_tensors`, when the caller already has them."""
        self.check(text, image)
        if self.encodes_with_processor:
            row = dict(self.processor(text=[text], images=[image] if image is not None else None,
                                      add_special_tokens=add_special_tokens, return_tensors="pt"))
        else:
            row = self._encode_without_processor(text, image, add_special_tokens, vision)
        if max_length is not None:
            row = self._truncate(row, max_length)
        return row

    def image_tensors(self, image: Image.Image) -> dict:
        """The image processor's tensors for one image (tokenizer + image processor path)."""
        return dict(self.image_processor(images=[image], return_tensors="pt"))

    def lengths(self, texts: list[str], images: list[Optional[Image.Image]], add_special_tokens: bool,
                max_length: Optional[int] = None) -> list[int]:
        """The number of tokens `encode` gives each row, without processing any image (needs
        counts_image_tokens where a row has an image): one tokenizer call for all texts, and each image's
        token count from its size."""
        for text, image in zip(texts, images):
            self.check(text, image)
        out = []
        for ids, image in zip(self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"], images):
            n_text = len(ids) - (0 if self.image_token_id is None else ids.count(self.image_token_id))
            if max_length is not None:
                n_text = min(n_text, max_length)
            out.append(n_text + (0 if image is None else self._image_token_count(image)))
        return out

    def _image_token_count(self, image: Image.Image) -> int:
        width, height = image.size
        return self.image_processor.get_number_of_image_patches(height, width, {}) // self.image_processor.merge_size**2

    def _encode_without_processor(self, text: str, image: Optional[Image.Image], add_special_tokens: bool,
                                  vision: Optional[dict] = None) -> dict:
        import torch

        encoded = self.tokenizer(text, add_special_tokens=add_special_tokens)
        ids = list(encoded["input_ids"])
        row = {}
        if image is not None:
            vision = vision if vision is not None else self.image_tensors(image)
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


def pinned(batch: dict, device: str) -> dict:
    """The batch's CPU tensors in pinned (page-locked) memory when they go to a GPU, so that `to_device` copies
    them without blocking the host; elsewhere as they are. Called on the thread that prepares batches."""
    import torch

    if not device.startswith("cuda"):
        return batch
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@contextlib.contextmanager
def inference(device: str):
    """The context of every model call of these backends: inference mode, and on a GPU cuDNN held to
    deterministic convolution algorithms without autotuning. Left free, cuDNN may pick an algorithm whose
    reduction order follows the order its threads finish in, so the same input gives other bits from one run to
    the next (Qwen-VL's patch embedding is a Conv3d) and a twin run's shards differ. The cudnn flags are
    process-wide: set for the call and restored after it."""
    import torch

    cudnn = torch.backends.cudnn
    saved = cudnn.deterministic, cudnn.benchmark
    if device.startswith("cuda"):
        cudnn.deterministic, cudnn.benchmark = True, False
    try:
        with torch.inference_mode():
            yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved


def to_device(batch: dict, device: str) -> dict:
    """The batch's tensors on `device`, copied without waiting (from pinned memory the host goes on queueing
    work while the copy runs)."""
    import torch

    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def load_model(model: str, auto_classes: list, trust_remote_code: bool, device: str, dtype,
               attn_implementation: Optional[str] = None):
    """The first auto class that knows this model's config, moved to device."""
    errors = []
    extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    for auto_class in auto_classes:
        try:
            loaded = auto_class.from_pretrained(model, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
            return loaded.to(device).eval()
        except (ValueError, KeyError) as e:  # config not mapped to this auto class
            errors.append(f"{auto_class.__name__}: {e}")
    raise ValueError(f"cannot load {model}: " + "; ".join(errors))
