"""In-shard negatives: the targets of other pairs of the same input shard, added to a pair's explicit
negatives so that pair-aware scoring (stages/score.py) has a softmax over more than the positive. Drawn with
a seed per shard, so a rerun or a resumed run draws the same ones. A drawn negative is a copy of the other
pair's target: its text, path and image reference (schemas IMAGE_REF), never bytes.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from stages.images import image_identity


def target_identity(text: Optional[str], path: Optional[str], ref: Optional[dict]) -> tuple:
    """What makes two targets (or a target and a negative) the same: the text and the image's identity (its
    digest counts only for a path-less image, as in the pair_id: stages/validate.py)."""
    return (text, image_identity(path, None if path or ref is None else ref["digest"]))


def add_in_shard_negatives(rows: list[dict], n: int, seed: int, shard_id: int) -> None:
    """Append up to n distinct targets of other valid rows of the same subset
    (same modality and task, so the negatives are not trivially easy), never
    the row's own target nor one of its explicit negatives."""
    if n <= 0:
        return
    rng = np.random.default_rng([int(seed) % (1 << 63), shard_id])
    valid = [r for r in rows if r["quarantine_reason"] is None]
    pools: dict[str, dict[tuple, dict]] = {}  # subset -> target key -> negative, first appearance order
    for r in valid:
        key = target_identity(r["target_text"], r["target_image_path"], r["target_image"])
        pools.setdefault(r["subset"], {}).setdefault(
            key, {"text": r["target_text"], "image_path": r["target_image_path"], "image": r["target_image"]}
        )
    pool_lists = {s: (list(p.values()), {k: i for i, k in enumerate(p)}) for s, p in pools.items()}
    for r in valid:
        pool, index_of = pool_lists[r["subset"]]
        own = [target_identity(r["target_text"], r["target_image_path"], r["target_image"])]
        own += [target_identity(x["text"], x["image_path"], x["image"]) for x in r["negatives"]]
        excluded = {index_of[k] for k in own if k in index_of}
        want = min(n, len(pool) - len(excluded))
        if want <= 0:
            continue
        # draw enough that `want` remain after removing the excluded ones
        draw = rng.choice(len(pool), size=min(len(pool), want + len(excluded)), replace=False)
        picks = [int(i) for i in draw if int(i) not in excluded][:want]
        r["negatives"] = r["negatives"] + [{**pool[i], "origin": "in_shard"} for i in picks]
