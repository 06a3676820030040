"""Transformers backends, one module per job: inputs.py (loading a model folder,
(text, image) -> tensors, shared by both roles), generator.py
(TransformersGenerator), embedders.py (TransformersEmbedder,
SentenceTransformersEmbedder).

The backends are re-exported here because scripts/serve_openai.py and tests
import them from `stages.backends.hf`."""
from stages.backends.hf.embedders import SentenceTransformersEmbedder, TransformersEmbedder  # noqa: F401
from stages.backends.hf.generator import TransformersGenerator  # noqa: F401
