"""Model backends, one small interface per role (see base.py). Backends are
imported by name only when a config asks for them, so optional extras (vllm)
are never needed to import pairsel. Each backend class declares its options
(its `Options`, stages/backends/options.py)."""
import importlib

from stages.backends.base import EmbedderBackend, GeneratorBackend  # noqa: F401

_GENERATORS = {
    "transformers": "stages.backends.hf.generator:TransformersGenerator",
    "vllm": "stages.backends.vllm:VLLMGenerator",
    "openai": "stages.backends.openai_http:OpenAIGenerator",
    "precomputed": "stages.backends.precomputed:PrecomputedGenerator",
}
_EMBEDDERS = {
    "transformers": "stages.backends.hf.embedders:TransformersEmbedder",
    "sentence_transformers": "stages.backends.hf.embedders:SentenceTransformersEmbedder",
    "vllm": "stages.backends.vllm:VLLMEmbedder",
}

# The backend names a config may choose (pipeline/config.py validates against these).
GENERATOR_BACKENDS = tuple(_GENERATORS)
EMBEDDER_BACKENDS = tuple(_EMBEDDERS)

# Backends that load a model from a local folder or the Hugging Face hub (config checks that the folder exists
# before Ray starts); a served (openai) model's name belongs to its server, and precomputed rationales name no
# model at all.
LOCAL_MODEL_BACKENDS = ("transformers", "sentence_transformers", "vllm")


def _load(table: dict, backend: str):
    module, _, name = table[backend].partition(":")
    return getattr(importlib.import_module(module), name)


def generator_class(backend: str) -> type:
    return _load(_GENERATORS, backend)


def embedder_class(backend: str) -> type:
    return _load(_EMBEDDERS, backend)
