"""Draw each pair's decoys: rationales the same generator wrote for other pairs of the same input shard, to be
appended to this pair's query (target side: its target) in the reasoned template and scored as candidates are
(stages/embed.py, stages/score.py). They look like the pair's candidates (same generator, prompt, length and
style) and carry nothing about this pair: the null that the decoy rule (stages/select.py, stages/calibrate.py)
is calibrated against. They cost embeddings only: no generation.

For each pair, side and generator: `count` texts drawn without replacement from that generator's valid candidates
(finish_reason in scoring.valid_finish_reasons) of the round-1 generation of the other pairs of the shard and
subset, never from a pair that shares this pair's target, whose target is one of this pair's negatives, or
that has this pair's target among its negatives (their rationales are about this pair's answers). The draw is
seeded by (scoring.seed, pair_id, side, generator) over the shard's rows in row order, so a rerun and a resumed run
draw the same decoys. Each decoy keeps its identity: the generator, the donor's pair_id and candidate index.

The draw needs the whole shard, so this stage runs over whole input shards (Ray Data: batch_size None, each batch
one or more whole blocks, and the read gives one block per shard that the model stages before this one keep
whole); it checks that every shard in a batch is complete and refuses a batch that is not.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import ClassVar, Mapping, Optional

import numpy as np
import pyarrow as pa

from stages.contract import Contract
from stages.negatives import target_identity
from stages.score import VALID_FINISH
from stages.side import BY_NAME, SIDES
from stages.spec import StageSpec


def _seed(seed: int, pair_id: str, side: str, generator: str) -> list[int]:
    digest = hashlib.sha256(f"{seed}|{pair_id}|{side}|{generator}".encode()).digest()
    return [int.from_bytes(digest[:8], "little")]


def _eligibility(live: list[dict]):
    """pos -> a boolean mask over `live`: the rows pair `pos` may draw decoys from (same subset, another target, not
    one of its negatives' targets, not a row that has its target among its negatives). Vectorised, for shards of
    thousands of rows."""
    ids: dict[tuple, int] = {}

    def key(text, path, ref) -> int:
        return ids.setdefault(target_identity(text, path, ref), len(ids))

    targets = np.array([key(r.get("target_text"), r.get("target_image_path"), r.get("target_image")) for r in live])
    negatives = [{key(n.get("text"), n.get("image_path"), n.get("image")) for n in r.get("negatives") or []}
                 for r in live]
    subsets = np.unique([str(r.get("subset")) for r in live], return_inverse=True)[1]
    has_negative: dict[int, list[int]] = {}  # target id -> the rows that hold it as a negative
    for pos, negs in enumerate(negatives):
        for t in negs:
            has_negative.setdefault(t, []).append(pos)

    def eligible(pos: int) -> np.ndarray:
        mask = (subsets == subsets[pos]) & (targets != targets[pos])
        if negatives[pos]:
            mask &= ~np.isin(targets, list(negatives[pos]))
        mask[has_negative.get(int(targets[pos]), [])] = False
        return mask
    return eligible


def draw_decoys(rows: list[dict], counts: dict[str, dict[str, int]], seed: int,
                valid_finish=VALID_FINISH) -> None:
    """Fill each valid row's decoys (per side in `counts`: generator name -> how many) from the other rows, which
    must be one whole shard, in place."""
    live = [r for r in sorted(rows, key=lambda r: r["row_index"]) if not r.get("quarantine_reason")]
    eligible = _eligibility(live)
    masks = [eligible(pos) for pos in range(len(live))]
    for side_name, per_generator in counts.items():
        side = BY_NAME[side_name]
        cand_field, decoy_field = side.candidates, side.decoys
        # per generator: every usable text of the shard, as (donor position in `live`, candidate index, text)
        pools: dict[str, list[tuple[int, int, str]]] = {g: [] for g in per_generator}
        for pos, donor in enumerate(live):
            for k, cand in enumerate(donor.get(cand_field) or []):
                g = cand.get("generator")
                if g in pools and cand.get("text") and cand.get("finish_reason") in valid_finish:
                    pools[g].append((pos, k, cand["text"]))
        donors = {g: np.array([entry[0] for entry in pool], dtype=np.int64) for g, pool in pools.items()}
        for pos, row in enumerate(live):
            decoys = []
            for generator, count in per_generator.items():
                pool = np.flatnonzero(masks[pos][donors[generator]]) if len(donors[generator]) else np.array([], int)
                rng = np.random.default_rng(_seed(seed, row["pair_id"], side.name, generator))
                picks = np.sort(rng.choice(pool, size=min(count, len(pool)), replace=False)) if len(pool) else []
                decoys += [{"generator": generator, "donor_pair_id": live[pools[generator][i][0]]["pair_id"],
                            "donor_candidate": pools[generator][i][1], "text": pools[generator][i][2]}
                           for i in (int(i) for i in picks)]
            row[decoy_field] = decoys


def check_whole_shards(rows: list[dict]) -> None:
    sizes: dict[int, int] = {}
    counts: dict[int, int] = {}
    for row in rows:
        sizes[row["shard_id"]] = row["shard_size"]
        counts[row["shard_id"]] = counts.get(row["shard_id"], 0) + 1
    partial = {s: (counts[s], sizes[s]) for s in sizes if counts[s] != sizes[s]}
    if partial:
        shard, (have, size) = min(partial.items())
        raise RuntimeError(f"decoys: shard {shard} arrived in part ({have} of {size} rows): the stage draws from "
                           "whole shards and must run with batch_size None right after the model stages")


@dataclass(frozen=True)
class DecoysSpec(StageSpec):
    """The decoy draw: counts per side name (generator name -> decoys per pair), over whole shards."""

    counts: Mapping[str, Mapping[str, int]]
    seed: int = 0
    valid_finish_reasons: tuple[str, ...] = VALID_FINISH
    whole_shards: ClassVar[bool] = True

    def contract(self) -> Contract:
        reads = ["quarantine_reason", "pair_id", "subset", "shard_id", "shard_size", "row_index", "target_text",
                 "target_image_path", "target_image", "negatives.text", "negatives.image_path", "negatives.image"]
        writes = []
        for name in self.counts:
            side = BY_NAME[name]
            reads += [f"{side.candidates}.{field}" for field in ("generator", "text", "finish_reason")]
            writes.append(side.decoys)
        return Contract("decoys", tuple(reads), tuple(writes))


class Decoys:
    """Ray Data task over whole shards: draw_decoys on the columns its contract names (no model)."""

    def __init__(self, spec: DecoysSpec):
        self.spec = spec
        self._contract = spec.contract()

    def _draw(self, rows: list[dict]) -> None:
        check_whole_shards(rows)
        by_shard: dict[int, list[dict]] = {}
        for row in rows:
            by_shard.setdefault(row["shard_id"], []).append(row)
        counts = {name: dict(c) for name, c in self.spec.counts.items()}
        for shard_rows in by_shard.values():
            draw_decoys(shard_rows, counts, self.spec.seed, self.spec.valid_finish_reasons)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self._contract.apply(batch, self._draw)


DecoysSpec.stage = Decoys


def decoy_counts(generators: list[dict], per_candidate: float) -> dict[str, dict[str, int]]:
    """Per side, generator name -> decoys per pair: per_candidate (a whole number, pipeline/config.py checks it)
    decoys for each of the generator's candidate slots (k, k_target), one group of slots per decoy_groups group."""
    counts: dict[str, dict[str, int]] = {side.name: {} for side in SIDES}
    for g in generators:
        for side in SIDES:
            slots = g.get(side.count_key, 0)
            if slots:
                counts[side.name][g["name"]] = int(per_candidate) * slots
    return {name: c for name, c in counts.items() if c}


def required(counts: Optional[dict]) -> Optional[dict]:
    """Per side, the decoys a pair must have to be tested (select's decoys_required); None without decoys."""
    return None if counts is None else {side: sum(c.values()) for side, c in counts.items()}


def decoy_groups(decoys: list[dict], groups: int) -> list[list[int]]:
    """The positions of a pair's decoys (as draw_decoys stores them) in `groups` groups that each mirror the pair's
    candidates: per generator, its i-th decoy goes to group i % groups, so each group holds as many of a generator's
    decoys as the generator has candidate slots (decoy_counts draws that many per group)."""
    out: list[list[int]] = [[] for _ in range(groups)]
    seen: dict[str, int] = {}
    for pos, decoy in enumerate(decoys):
        i = seen.get(decoy.get("generator"), 0)
        seen[decoy.get("generator")] = i + 1
        out[i % groups].append(pos)
    return out
