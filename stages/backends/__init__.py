"""Model backends, one small interface per role (see base.py). Backends are
imported by name only when a config asks for them, so optional extras (vllm)
are never needed to import pairsel."""
import importlib

from stages.backends.base import EmbedderBackend, GeneratorBackend  # noqa: F401

_GENERATORS = {
    "transformers": "stages.backends.hf:TransformersGenerator",
    "vllm": "stages.backends.vllm:VLLMGenerator",
    "openai": "stages.backends.openai_http:OpenAIGenerator",
    "precomputed": "stages.backends.precomputed:PrecomputedGenerator",
}
_EMBEDDERS = {
    "transformers": "stages.backends.hf:TransformersEmbedder",
    "sentence_transformers": "stages.backends.hf:SentenceTransformersEmbedder",
    "vllm": "stages.backends.vllm:VLLMEmbedder",
}


def _load(table: dict, backend: str):
    module, _, name = table[backend].partition(":")
    return getattr(importlib.import_module(module), name)


def generator_class(backend: str) -> type:
    return _load(_GENERATORS, backend)


def embedder_class(backend: str) -> type:
    return _load(_EMBEDDERS, backend)
