"""The one place that decides where an input's image goes in the text a model sees.

Every backend (transformers, vLLM, an OpenAI-compatible server) and every side (the generator's prompt, the
embedder's query, rationale-augmented query, target and negatives) goes through `image_parts`, so the same
(text, image) input reaches every runtime as the same token sequence, and the same embedding.

The rule: the image goes where the text has the MMEB marker `<|image_1|>` (IMAGE_MARKER); a text that comes
with an image but has no marker gets the image first, on a line of its own (IMAGE_MARKER + "\\n" + text, as
MMEB writes its queries); markers beyond the first, and every marker of a text without an image, are
removed. Image placeholder tokens typed into user text (e.g. Qwen-VL's `<|image_pad|>`) are removed too: they
would claim image features that do not exist.
"""
from __future__ import annotations

from typing import Iterable, Optional, Union

IMAGE_MARKER = "<|image_1|>"

# Where the image goes in image_parts' answer.
IMAGE = None


def with_image_marker(text: str, has_image: bool) -> str:
    """The text with exactly one IMAGE_MARKER where its image goes (none without an image)."""
    if not has_image:
        return text.replace(IMAGE_MARKER, "")
    if IMAGE_MARKER not in text:
        return f"{IMAGE_MARKER}\n{text}" if text else IMAGE_MARKER
    before, _, after = text.partition(IMAGE_MARKER)
    return before + IMAGE_MARKER + after.replace(IMAGE_MARKER, "")


def image_parts(text: str, has_image: bool, reserved: Iterable[str] = ()) -> list[Optional[str]]:
    """The text as the pieces a model sees, in order: strings, and IMAGE (None) where the image goes. Empty
    strings are left out; a text without an image is one string (or none, if empty). `reserved`: placeholder
    tokens of the model that may not appear in user text."""
    for token in reserved:
        text = text.replace(token, "")
    text = with_image_marker(text, has_image)
    if not has_image:
        return [text] if text else []
    before, _, after = text.partition(IMAGE_MARKER)
    return [p for p in (before, IMAGE, after) if p is IMAGE or p]


def raw_text(text: str, has_image: bool, placeholder: str, reserved: Iterable[str] = ()) -> str:
    """The text an embedder reads (no chat turn): the model's image placeholder where the image goes."""
    return "".join(placeholder if p is IMAGE else p for p in image_parts(text, has_image, reserved))


def chat_content(text: str, has_image: bool, reserved: Iterable[str] = (),
                 image_part: Optional[dict] = None) -> Union[str, list[dict]]:
    """A user turn's content for a chat template or a chat API: the plain string without an image (text-only
    templates expect one); with one, a list of parts with `image_part` (default {"type": "image"}, the Hugging
    Face convention) where the image goes."""
    if not has_image:
        return "".join(image_parts(text, False, reserved))
    image_part = image_part if image_part is not None else {"type": "image"}
    return [image_part if p is IMAGE else {"type": "text", "text": p} for p in image_parts(text, True, reserved)]
