"""How the transformers backends cut one call's rows into model batches, how large a batch may be, and the
worker threads that build the next batches' tensors while the model runs the current one.

Every plan here is a function of the call's rows (their lengths, in call order) and the options, never of
timing or of the machine's load, so a rerun of the same call runs the same batches.

The embedder has two plans (`embedder.options.batching`), and the generator pads prompts the same two ways:
- `exact_batches`: every forward pass has a shape that each of its rows alone decides: the row's length rounded
  up to a multiple of `length_bucket` (always at least one pad token) and exactly `batch_size` rows (a short batch
  filled up with copies). A row's vector is then the same bit for bit whatever else the call holds.
- `sorted_batches`: the rows sorted by length, longest first, cut into batches of at most `max_tokens` padded
  tokens (and `max_rows` rows), each padded only to its own longest row: no copies and little padding, so a GPU
  runs few, full batches. A row's vector depends on its batchmates in the last bits (float kernels pick their
  blocking by shape).
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, TypeVar

# `options.batching` of both transformers backends: how a call's rows become batches
BATCHINGS = ("exact", "sorted")

T = TypeVar("T")
R = TypeVar("R")

# The largest batch the memory-derived default allows, in padded tokens: a 2B model then spends ~0.1 s of an
# H200 per forward (kernel launches are noise), and a call still splits into several batches, so preparing the
# next one overlaps the current one.
MAX_DEFAULT_BATCH_TOKENS = 16384
MIN_DEFAULT_BATCH_TOKENS = 1024
# Off a GPU: enough rows to amortise per-call overhead, few enough that a batch stays in the CPU's caches.
CPU_BATCH_TOKENS = 8192
# The share of the GPU memory left after the weights that one batch's activations may take.
ACTIVATION_SHARE = 0.25


@dataclass
class Batch:
    members: list[int]  # indices into the call's rows
    length: int  # every row padded to this many tokens
    rows: int  # rows the model runs: the members, then copies of the first (exact batches only)


def padded_length(n: int, bucket: int) -> int:
    """n rounded up to the next multiple of bucket, with at least one pad: a row of a batch without pads could
    take another attention path (no mask) than the same row among padded ones."""
    return (n // bucket + 1) * bucket


def exact_batches(lengths: list[int], alone: list[bool], length_bucket: int, batch_size: int) -> list[Batch]:
    """Rows grouped by padded length (a row that must run alone is its own group), each group in batches of
    exactly `batch_size` rows (1 for a row alone), longest first."""
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, (n, solo) in enumerate(zip(lengths, alone)):
        groups.setdefault((padded_length(n, length_bucket), solo), []).append(i)
    out = []
    for (length, solo), members in sorted(groups.items(), reverse=True):
        size = 1 if solo else batch_size
        out += [Batch(members[s:s + size], length, size) for s in range(0, len(members), size)]
    return out


def sorted_batches(lengths: list[int], max_tokens: int, max_rows: Optional[int] = None,
                   copies: Optional[list[int]] = None) -> list[Batch]:
    """Items sorted by length, longest first (ties in call order), cut greedily: a batch takes items while its
    rows times its longest row stay within max_tokens and its rows within max_rows (an item over that runs
    alone). An item is one row, or `copies[i]` rows of the same length (a prompt sampled with several seeds)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[Batch] = []
    for i in order:
        n = 1 if copies is None else copies[i]
        last = out[-1] if out else None
        if (last is not None and (last.rows + n) * last.length <= max_tokens
                and (max_rows is None or last.rows + n <= max_rows)):
            last.members.append(i)
            last.rows += n
        else:
            out.append(Batch([i], lengths[i], n))
    return out


def default_batch_tokens(model, device: str, bytes_per_token: int, share: float = ACTIVATION_SHARE,
                         most: int = MAX_DEFAULT_BATCH_TOKENS, off_gpu: int = CPU_BATCH_TOKENS) -> int:
    """Tokens per batch from the GPU's memory: `share` of what the weights leave, over the bytes one token
    needs, between MIN_DEFAULT_BATCH_TOKENS and `most`. It reads the device's total memory (a property of the
    machine), not its free memory, so that it does not change from run to run. Off a GPU: `off_gpu`."""
    if not device.startswith("cuda"):
        return off_gpu
    import torch

    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    fits = int(share * max(0, total - weights) / max(1, bytes_per_token))
    return max(MIN_DEFAULT_BATCH_TOKENS, min(most, fits // 1024 * 1024))


def batching_for(option: Optional[str], device: str) -> str:
    """The `batching` option (its choices are checked with the options), or its default: sorted on a GPU, exact
    elsewhere."""
    return option or ("sorted" if device.startswith("cuda") else "exact")


def text_config(model):
    config = model.config
    return getattr(config, "text_config", None) or config


def preparing_threads(device: str) -> int:
    """Threads that build batches: one beside the model on a CPU (the model's threads need the cores), a few on
    a GPU machine (tokenising and image processing must keep up with the GPU)."""
    if not device.startswith("cuda"):
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0)) - 1))


def prefetched(items: Iterable[T], prepare: Callable[[T], R], threads: int = 1,
               ahead: int = 2) -> Iterator[tuple[T, R]]:
    """(item, prepare(item)) in the items' order, each prepared on a worker thread up to `ahead` + threads - 1
    items before the caller asks for it, so preparing the next batches overlaps the caller's work on this one.
    An exception in prepare reaches the caller when it asks for that item; the items not yet started are then
    dropped."""
    items = iter(items)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pairsel-prepare") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append((item, pool.submit(prepare, item)))
                if len(pending) >= ahead + threads - 1:
                    first, future = pending.popleft()
                    yield first, future.result()
            while pending:
                first, future = pending.popleft()
                yield first, future.result()
        finally:
            for _, future in pending:
                future.cancel()
