"""`pairsel report OUT_DIR`: what the curated data looks like, as one self-contained html file.

Everything is aggregated lazily by polars over OUT/data/*.parquet, so the report of a 10 GB output costs
a few small aggregates, not the output: candidate texts are never collected, and the delta-vs-length
scatter uses a seeded sample of at most `max_points` candidates. The figures are PNGs (matplotlib, Agg)
embedded as base64 data URIs in OUT/report.html. `run` returns the numbers behind every figure.

Every pair has one of three outcomes (stages/select.py): reason, direct, undecided (no valid candidate, so
reasoning was never tested). The report counts them apart per subset, with the pairs that the content-free
control turned from reason to direct. Every percentage (tables, figures, summary) is written by `percent`.

This module also holds the readers that show.py and export.py share: `data_files`, `scan_pairs`,
`read_manifest`.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Optional

import polars as pl

DEFAULT_MAX_POINTS = 20_000
HISTOGRAM_BINS = 30
OUTCOMES = (("need_reasoning", "reason", "tab:orange"), ("direct", "direct", "tab:blue"),
            ("undecided", "undecided", "0.7"))  # (count key, label, colour)
SAMPLE_SEED = 0
_HASH_RANGE = 1 << 32


# ----------------------------------------------------------------------------- readers


def _shard_files(folder: Path) -> list[Path]:
    # Readers ignore bookkeeping: names starting with "_" or "." (staging, temporary files of atomic writes).
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(("_", ".")))


def data_files(out_dir) -> list[Path]:
    """The committed output shards, OUT/data/shard-*.parquet, in shard order."""
    return _shard_files(Path(out_dir) / "data")


def quarantine_files(out_dir) -> list[Path]:
    return _shard_files(Path(out_dir) / "quarantine")


def check_schema_version(files: list[Path]) -> None:
    """The output tools read the current schema only: say so plainly for shards of another version (from the
    footers, no data read) instead of failing on a missing column."""
    import pyarrow.parquet as pq

    from schemas import SCHEMA_VERSION

    found = sorted({(pq.read_schema(f).metadata or {}).get(b"pairsel.schema_version", b"?").decode() for f in files})
    if found != [str(SCHEMA_VERSION)]:
        raise SystemExit(f"{files[0].parent}: shards of schema version {', '.join(found)}; this pairsel reads version "
                         f"{SCHEMA_VERSION} (README: output schema): rerun the job with --overwrite")


def scan_pairs(out_dir) -> pl.LazyFrame:
    """A lazy frame over every output row; nothing is read until it is collected."""
    files = data_files(out_dir)
    if not files:
        raise SystemExit(f"no output shards in {Path(out_dir) / 'data'} (is {out_dir} a pairsel output folder?)")
    check_schema_version(files)
    return pl.scan_parquet(files)


def read_manifest(out_dir) -> Optional[dict]:
    """manifest.json, or None while the job has not finished (it is written last)."""
    path = Path(out_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


# ----------------------------------------------------------------------------- numbers


def percent(x: Optional[float]) -> str:
    """The one way a share is written in the report: tables, figures and the summary alike."""
    return "n/a" if x is None else f"{x:.1%}"


def _stats(col: str) -> list[pl.Expr]:
    c = pl.col(col)
    return [
        c.count().alias(f"{col}:n"),
        c.null_count().alias(f"{col}:null"),
        c.min().alias(f"{col}:min"),
        c.quantile(0.25, interpolation="linear").alias(f"{col}:q1"),
        c.median().alias(f"{col}:median"),
        c.quantile(0.75, interpolation="linear").alias(f"{col}:q3"),
        c.max().alias(f"{col}:max"),
        c.mean().alias(f"{col}:mean"),
    ]


def _unpack_stats(row: dict, col: str) -> dict:
    return {k.split(":", 1)[1]: v for k, v in row.items() if k.startswith(f"{col}:")}


def _candidates(lf: pl.LazyFrame) -> pl.LazyFrame:
    """One row per candidate, numeric fields only (the texts stay on disk)."""
    fields = ("generator", "tokens", "finish_reason", "delta", "valid", "delta_control")
    return lf.select("candidates").explode("candidates").select(pl.col("candidates").struct.field(*fields))


def compute(out_dir, max_points: int = DEFAULT_MAX_POINTS, seed: int = SAMPLE_SEED) -> dict:
    """The numbers behind every figure (see module doc); only aggregates are collected."""
    from pipeline.manifest import outcome_counts, outcomes_by_subset, target_side_stats

    lf = scan_pairs(out_dir)
    manifest = read_manifest(out_dir)
    prov = lf.select(
        pl.col("provenance").struct.field("config_hash").unique().sort().implode().alias("config_hashes"),
        pl.col("provenance").struct.field("epsilon").max().alias("epsilon"),
        pl.col("scoring_mode").unique().sort().implode().alias("scoring_modes"),
        pl.col("s_control").list.len().max().alias("controls"),
    ).collect().to_dicts()[0]
    epsilon = prov["epsilon"] or 0.0

    cands = _candidates(lf)
    # One collect_all: polars runs the aggregates together and shares their scans of the shards.
    outcomes, per_subset, per_gen, chosen, n_scored = pl.collect_all([
        outcomes_by_subset(lf, epsilon),
        lf.group_by("subset").agg(*_stats("best_delta"), *_stats("s_direct")).sort("subset"),
        cands.group_by("generator")
        .agg(pl.len().alias("candidates"), pl.col("valid").sum().alias("valid"), pl.col("tokens").sum().alias("tokens"),
             pl.col("delta").filter(pl.col("valid")).mean().alias("mean_delta"))
        .sort("generator"),
        # A chosen rationale is one that will be used: the pair needs reasoning (best delta > epsilon).
        lf.filter(pl.col("need_reasoning")).group_by("chosen_generator").agg(pl.len().alias("n")).sort("chosen_generator"),
        cands.filter(pl.col("delta").is_not_null()).select(pl.len()),
    ])
    subsets = per_subset.to_dicts()
    keys = ("pairs", "need_reasoning", "direct", "undecided", "control_turned_direct")
    per_outcome = {r["subset"]: outcome_counts(*(int(r[k]) for k in keys)) for r in outcomes.to_dicts()}
    pairs = {s: o["pairs"] for s, o in per_outcome.items()}
    need = {s: o["need_reasoning"] for s, o in per_outcome.items()}
    total = sum(pairs.values())
    per_gen = per_gen.to_dicts()
    chosen_count = {r["chosen_generator"]: r["n"] for r in chosen.to_dicts()}
    n_chosen = sum(chosen_count.values())

    quarantine = {}
    if quarantine_files(out_dir):
        q = pl.scan_parquet(quarantine_files(out_dir)).group_by("reason").agg(pl.len().alias("n")).sort("reason")
        quarantine = {r["reason"]: r["n"] for r in q.collect().to_dicts()}

    return {
        "pairs": total,
        "pairs_per_subset": pairs,
        "need_reasoning_per_subset": need,
        "need_reasoning_rate": {s: need[s] / pairs[s] for s in pairs},
        "need_reasoning_overall": sum(need.values()) / total if total else 0.0,
        "outcomes_per_subset": per_outcome,
        "outcomes_overall": outcome_counts(*(sum(o[k] for o in per_outcome.values()) for k in keys)),
        "controls": int(prov["controls"] or 0),
        "best_delta": {r["subset"]: _unpack_stats(r, "best_delta") for r in subsets},
        "best_delta_histogram": _histograms(lf, list(pairs), epsilon),
        "s_direct": {r["subset"]: _unpack_stats(r, "s_direct") for r in subsets},
        "delta_vs_length": _sample_delta_vs_length(cands, n_scored.item(), max_points, seed),
        "candidates_per_generator": {r["generator"]: {k: r[k] for k in ("candidates", "valid", "tokens", "mean_delta")}
                                     for r in per_gen},
        "tokens_per_generator": {r["generator"]: int(r["tokens"] or 0) for r in per_gen},
        "chosen_count": chosen_count,
        "chosen_share": {g: n / n_chosen for g, n in chosen_count.items()},
        "quarantine_by_reason": quarantine,
        "provenance": _provenance(manifest, prov),
        # generators[].k_target > 0: the target side's outcomes and the joint choice's wins (else None)
        "target_side": target_side_stats(lf, epsilon),
    }


def _histograms(lf: pl.LazyFrame, subsets: list, epsilon: float, bins: int = HISTOGRAM_BINS) -> dict:
    """Per subset, the counts of best_delta (pairs with a chosen candidate) in `bins` equal bins over the
    range of all subsets (epsilon included, so that its line falls on the axis)."""
    scored = lf.filter(pl.col("best_delta").is_not_null())
    lo, hi = scored.select(pl.col("best_delta").min().alias("lo"), pl.col("best_delta").max().alias("hi")).collect().row(0)
    if lo is None:
        return {"edges": [], "counts": {s: [] for s in subsets}, "epsilon": epsilon}
    lo, hi = min(lo, epsilon), max(hi, epsilon)
    if hi <= lo:
        hi = lo + 1e-9
    width = (hi - lo) / bins
    index = ((pl.col("best_delta") - lo) / width).floor().cast(pl.Int64).clip(0, bins - 1).alias("bin")
    counted = scored.select("subset", index).group_by("subset", "bin").len().collect()
    counts = {s: [0] * bins for s in subsets}
    for r in counted.iter_rows(named=True):
        counts[r["subset"]][r["bin"]] = int(r["len"])
    return {"edges": [lo + i * width for i in range(bins + 1)], "counts": counts, "epsilon": epsilon}


def _sample_delta_vs_length(cands: pl.LazyFrame, n_scored: int, max_points: int, seed: int) -> dict:
    """A seeded sample of scored candidates (delta not null): at most max_points of them.

    LazyFrame has no sample(), so rows are kept where a seeded hash of their position falls under the
    wanted fraction; that streams, and the exact cap is applied to the (small) result."""
    scored = cands.filter(pl.col("delta").is_not_null())
    keep = min(1.0, max_points / n_scored) if n_scored else 1.0
    sample = scored.select("generator", "tokens", "delta", pl.col("valid").fill_null(False))
    if keep < 1.0:
        sample = sample.with_row_index("_i").filter(
            (pl.col("_i").hash(seed) % _HASH_RANGE) < int(keep * _HASH_RANGE)).drop("_i")
    df = sample.collect()
    if df.height > max_points:
        df = df.sample(n=max_points, seed=seed)
    valid = df.filter(pl.col("valid"))  # cut-off candidates pile up at the token cap: r is over valid ones
    r = valid.select(pl.corr("tokens", "delta")).item() if valid.height > 2 else None
    return {"n_scored": n_scored, "n_sampled": df.height,
            "pearson_r": None if r is None or not math.isfinite(r) else float(r),
            "generator": df["generator"].to_list(), "tokens": df["tokens"].to_list(), "delta": df["delta"].to_list(),
            "valid": df["valid"].to_list(), "n_sampled_valid": int(df["valid"].sum())}


def _provenance(manifest: Optional[dict], prov: dict) -> dict:
    out = {"manifest": manifest is not None, "config_hashes_in_data": prov["config_hashes"],
           "scoring_modes": prov["scoring_modes"], "epsilon": prov["epsilon"]}
    if manifest:
        out.update(
            status=manifest.get("status"), config_hash=manifest.get("config_hash"),
            pairsel_version=manifest.get("pairsel_version"), schema_version=manifest.get("schema_version"),
            started_at=manifest.get("started_at"), finished_at=manifest.get("finished_at"),
            wall_seconds=manifest.get("wall_seconds"),
            embedder=manifest.get("embedder"),
            generators={name: {"backend": g.get("backend"), "model": g.get("model")}
                        for name, g in (manifest.get("generators") or {}).items()},
        )
    return out


# ----------------------------------------------------------------------------- figures


def _fig_to_data_uri(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _height(n_rows: int) -> float:
    return max(2.6, 0.45 * n_rows + 1.4)


def _empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=12, color="0.4", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _fig_subsets(n: dict):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = list(n["pairs_per_subset"])
    out = n["outcomes_per_subset"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, _height(len(names))), sharey=True, layout="constrained")
    start = [0] * len(names)
    for key, label, colour in OUTCOMES:
        counts = [out[s][key] for s in names]
        left.barh(names, counts, left=start, color=colour, label=label)
        shares = [out[s][f"{key}_rate"] or 0.0 for s in names]
        right.barh(names, shares, left=[a / max(1, out[s]["pairs"]) for a, s in zip(start, names)], color=colour,
                   label=label)
        for y, (a, c, share) in enumerate(zip(start, counts, shares)):
            if c and share >= 0.08:  # the label fits its bar
                right.text((a + c / 2) / out[names[y]]["pairs"], y, percent(share), ha="center", va="center",
                           fontsize=8)
        start = [a + c for a, c in zip(start, counts)]
    for y, s in enumerate(names):
        turned = out[s]["control_turned_direct"]
        note = f" {out[s]['pairs']}" + (f" ({turned} turned direct by the control)" if turned else "")
        left.text(out[s]["pairs"], y, note, va="center", fontsize=8)
    left.set_title("Pairs per subset, by outcome")
    left.set_xlabel("pairs")
    left.set_ylabel("subset")
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=3, fontsize=8, frameon=False)
    left.margins(x=0.45)
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlim(0, 1)
    right.set_xticks([0, 0.25, 0.5, 0.75, 1.0], [percent(x) for x in (0, 0.25, 0.5, 0.75, 1.0)])
    right.set_title("Outcome shares per subset")
    right.set_xlabel("share of pairs: reason / direct / undecided (no valid candidate)")
    left.invert_yaxis()
    return fig


def _box(stats: dict) -> Optional[dict]:
    if not stats.get("n"):
        return None
    return {"med": stats["median"], "q1": stats["q1"], "q3": stats["q3"], "whislo": stats["min"],
            "whishi": stats["max"], "mean": stats["mean"], "fliers": []}


def _fig_distributions(n: dict, epsilon: Optional[float]):
    import matplotlib.pyplot as plt

    names = list(n["pairs_per_subset"])
    fig, axes = plt.subplots(1, 2, figsize=(11, _height(len(names))), sharey=True, layout="constrained")
    for ax, key, title in ((axes[0], "best_delta", "best delta per subset"), (axes[1], "s_direct", "s_direct per subset")):
        boxes, positions = [], []
        for y, s in enumerate(names):
            box = _box(n[key][s])
            if box is None:
                ax.text(0.02, y, "no valid candidates" if key == "best_delta" else "no scores", va="center",
                        color="0.4", transform=ax.get_yaxis_transform())
            else:
                boxes.append(box)
                positions.append(y)
        if boxes:
            ax.bxp(boxes, positions=positions, orientation="horizontal", showmeans=True, widths=0.6)
        ax.set_yticks(range(len(names)), names)
        ax.set_ylim(len(names) - 0.5, -0.5)
        ax.set_title(f"{title}\n(box: quartiles, whiskers: min-max, triangle: mean)", fontsize=10)
        ax.set_xlabel(key)
        ax.grid(axis="x", alpha=0.3)
    if epsilon is not None:
        axes[0].axvline(epsilon, color="tab:red", linestyle="--", label=f"epsilon = {epsilon:g}")
        axes[0].legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("subset")
    return fig


def _fig_delta_vs_length(n: dict, epsilon: Optional[float]):
    import matplotlib.pyplot as plt

    d = n["delta_vs_length"]
    fig, ax = plt.subplots(figsize=(9, 4.5), layout="constrained")
    if not d["n_sampled"]:
        _empty(ax, "no scored candidates")
    else:
        # invalid candidates (cut off at the token cap, echoed, ...) are never chosen: grey crosses behind
        invalid = [i for i, v in enumerate(d["valid"]) if not v]
        if invalid:
            ax.scatter([d["tokens"][i] for i in invalid], [d["delta"][i] for i in invalid], s=10, marker="x",
                       color="0.65", alpha=0.6, label=f"invalid (never chosen): {len(invalid):,}")
        for g in sorted(set(d["generator"])):
            idx = [i for i, (x, v) in enumerate(zip(d["generator"], d["valid"])) if x == g and v]
            if idx:
                ax.scatter([d["tokens"][i] for i in idx], [d["delta"][i] for i in idx], s=10, alpha=0.6,
                           label=f"{g}, valid: {len(idx):,}")
        ax.axhline(epsilon or 0.0, color="tab:red", linestyle="--", linewidth=1, label=f"epsilon = {epsilon or 0.0:g}")
        ax.legend(fontsize=8, markerscale=2)
        ax.set_xlabel("rationale length (generated tokens)")
        ax.set_ylabel("delta")
        ax.grid(alpha=0.3)
    r = "n/a" if d["pearson_r"] is None else f"{d['pearson_r']:+.2f}"
    ax.set_title(f"delta vs rationale length ({d['n_sampled']:,} of {d['n_scored']:,} scored candidates; "
                 f"r over valid ones = {r})")
    return fig


def _fig_best_delta_histogram(n: dict):
    import matplotlib.pyplot as plt

    h = n["best_delta_histogram"]
    names = list(n["pairs_per_subset"])
    fig, axes = plt.subplots(len(names), 1, figsize=(9, max(2.6, 1.5 * len(names) + 1)), sharex=True,
                             layout="constrained", squeeze=False)
    for ax, s in zip(axes[:, 0], names):
        counts = h["counts"].get(s) or []
        undecided = n["outcomes_per_subset"][s]["undecided"]
        if not h["edges"] or not sum(counts):
            # not _empty(): clearing this axis's ticks would clear the x ticks that all subsets share
            ax.text(0.5, 0.5, "no valid candidate: undecided", ha="center", va="center", color="0.4",
                    transform=ax.transAxes)
            ax.set_yticks([])
        else:
            ax.stairs(counts, h["edges"], fill=True, color="tab:orange", alpha=0.7)
            ax.axvline(h["epsilon"], color="tab:red", linestyle="--", linewidth=1, label=f"epsilon = {h['epsilon']:g}")
            ax.legend(fontsize=8, loc="upper right")
        ax.set_ylabel(s, rotation=0, ha="right", va="center")
        ax.set_title(f"{s}: {sum(counts):,} pairs with a valid candidate, {undecided:,} undecided "
                     f"({percent(n['outcomes_per_subset'][s]['undecided_rate'])}) not shown", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("best delta (the chosen candidate's)")
    fig.suptitle("Best delta per subset")
    return fig


def _fig_generators(n: dict):
    import matplotlib.pyplot as plt

    gens = list(n["candidates_per_generator"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, _height(len(gens))), layout="constrained")
    if n["chosen_count"]:
        names = list(n["chosen_count"])
        shares = [n["chosen_share"][g] for g in names]
        left.barh([str(g) for g in names], shares, color="tab:green")
        for y, g in enumerate(names):
            left.text(shares[y], y, f" {percent(shares[y])} ({n['chosen_count'][g]:,})", va="center")
        left.set_xlim(0, 1.3)
        left.set_xticks([0, 0.25, 0.5, 0.75, 1.0], [percent(x) for x in (0, 0.25, 0.5, 0.75, 1.0)])
        left.invert_yaxis()
        left.set_xlabel("share of chosen rationales (pairs that need reasoning)")
        left.set_ylabel("generator")
    else:
        _empty(left, "no pair needs reasoning: nothing chosen")
    left.set_title("Chosen rationales per generator")
    tokens = [n["tokens_per_generator"][g] for g in gens]
    right.barh(gens, tokens, color="tab:purple")
    for y, t in enumerate(tokens):
        right.text(t, y, f" {t:,}", va="center")
    right.margins(x=0.2)
    right.invert_yaxis()
    right.set_title("Tokens generated per generator")
    right.set_xlabel("generated tokens (all candidates)")
    return fig


def _fig_quarantine(n: dict):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    q = n["quarantine_by_reason"]
    fig, ax = plt.subplots(figsize=(9, _height(len(q))), layout="constrained")
    if not q:
        _empty(ax, "no quarantined rows")
    else:
        reasons = sorted(q, key=q.get, reverse=True)
        ax.barh(reasons, [q[r] for r in reasons], color="tab:red")
        for y, r in enumerate(reasons):
            ax.text(q[r], y, f" {q[r]:,}", va="center")
        ax.invert_yaxis()
        ax.margins(x=0.15)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("quarantined rows")
        ax.set_ylabel("reason")
    ax.set_title(f"Quarantined rows by reason ({sum(q.values()):,} in all)")
    return fig


FIGURES = ("subsets", "distributions", "best_delta_histogram", "delta_vs_length", "generators", "quarantine")


def figures(n: dict) -> dict:
    """{figure name: PNG data URI}, one per entry of FIGURES."""
    import matplotlib

    matplotlib.use("Agg")
    epsilon = n["provenance"].get("epsilon")
    return {
        "subsets": _fig_to_data_uri(_fig_subsets(n)),
        "distributions": _fig_to_data_uri(_fig_distributions(n, epsilon)),
        "best_delta_histogram": _fig_to_data_uri(_fig_best_delta_histogram(n)),
        "delta_vs_length": _fig_to_data_uri(_fig_delta_vs_length(n, epsilon)),
        "generators": _fig_to_data_uri(_fig_generators(n)),
        "quarantine": _fig_to_data_uri(_fig_quarantine(n)),
    }


# ----------------------------------------------------------------------------- html and text


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return "" if v is None else str(v)


def _table(header: list, rows: list) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def render_html(n: dict, figs: dict, out_dir) -> str:
    subsets = list(n["pairs_per_subset"])
    o = n["outcomes_per_subset"]
    subset_rows = [[s, o[s]["pairs"],
                    *(f"{o[s][k]} ({percent(o[s][f'{k}_rate'])})" for k in ("need_reasoning", "direct", "undecided")),
                    o[s]["control_turned_direct"],
                    n["best_delta"][s].get("median"), n["s_direct"][s].get("median")]
                   for s in subsets]
    gen_rows = [[g, c["candidates"], c["valid"], c["tokens"], c["mean_delta"], n["chosen_count"].get(g, 0),
                 percent(n["chosen_share"].get(g, 0.0))] for g, c in n["candidates_per_generator"].items()]
    prov_rows = [[k, v] for k, v in n["provenance"].items()]
    q_rows = [[r, c] for r, c in n["quarantine_by_reason"].items()] or [["(none)", 0]]

    def fig(name: str, alt: str) -> str:
        return f'<img src="{figs[name]}" alt="{html.escape(alt)}">'

    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>pairsel report: {html.escape(str(out_dir))}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1150px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; display: block; margin: 0.5em 0; }}
.summary {{ font-size: 1.1em; }}
</style></head><body>
<h1>pairsel report</h1>
<p class="summary">{html.escape(str(out_dir))}: <b>{n['pairs']:,}</b> pairs in {len(subsets)} subset(s),
<b>{percent(n['need_reasoning_overall'])}</b> need reasoning (reason),
{percent(n['outcomes_overall']['direct_rate'])} direct, {percent(n['outcomes_overall']['undecided_rate'])} undecided;
{sum(n['quarantine_by_reason'].values()):,} quarantined.</p>
<p>Outcomes: <b>reason</b> a rationale helps (delta &gt; epsilon{", and beats every content-free control" if n["controls"] else ""});
<b>direct</b> reasoning was tested and no rationale helps; <b>undecided</b> no valid candidate, so reasoning was
never tested (need_reasoning is null). {n["controls"]} control text(s); "turned direct by the control": pairs
with a rationale above epsilon that no rationale beats the control with.</p>
<h2>Subsets</h2>
{fig("subsets", "pairs per subset by outcome")}
{_table(["subset", "pairs", "reason", "direct", "undecided (no valid candidate)", "turned direct by the control", "median best_delta", "median s_direct"], subset_rows)}
{_target_section(n["target_side"])}
<h2>Distributions of best delta and s_direct</h2>
{fig("distributions", "best_delta and s_direct per subset")}
{fig("best_delta_histogram", "histogram of best delta per subset, epsilon marked")}
<h2>Delta vs rationale length</h2>
{fig("delta_vs_length", "delta against rationale length")}
<h2>Generators</h2>
{fig("generators", "chosen share and tokens per generator")}
{_table(["generator", "candidates", "valid", "tokens", "mean delta (valid)", "chosen", "chosen share"], gen_rows)}
<h2>Quarantine</h2>
{fig("quarantine", "quarantined rows by reason")}
{_table(["reason", "rows"], q_rows)}
<h2>Provenance</h2>
{_table(["key", "value"], prov_rows)}
</body></html>
"""


def _joint_cells(j: dict) -> list:
    den = j["pairs_with_joint"]
    return [den, *(f"{j[k]} ({percent(j[k] / den if den else None)})" for k in ("beats_query", "beats_target", "beats_both"))]


def _target_section(t: Optional[dict]) -> str:
    """The target side (generators[].k_target > 0): its three outcomes per subset, and how often the joint
    choice (k, j) beats each side alone, over the pairs with a valid candidate on both sides."""
    if not t:
        return ""
    rows = [[s, o["pairs"], *(f"{o[k]} ({percent(o[f'{k}_rate'])})" for k in ("need_reasoning", "direct", "undecided")),
             o["control_turned_direct"], *_joint_cells(o["joint"])] for s, o in t["subsets"].items()]
    c = t["counts"]
    rows.append(["(all)", c["pairs"], *(f"{c[k]} ({percent(c[f'{k}_rate'])})" for k in ("need_reasoning", "direct", "undecided")),
                 c["control_turned_direct"], *_joint_cells(c["joint"])])
    return ("<h2>Target side and the joint choice</h2>\n<p>Target side: the same three outcomes for rationales "
            "about the target (delta = score(q, t ⊕ r) − score(q, t)). Joint: the best (query rationale, target "
            "rationale) combination; it beats a side when its delta exceeds that side's choice (its chosen delta "
            "when the side reasons, else 0) by more than epsilon.</p>\n"
            + _table(["subset", "pairs", "target reason", "target direct", "target undecided",
                      "target turned direct by the control", "pairs with a joint choice", "joint beats query side",
                      "joint beats target side", "joint beats both"], rows))


def summary_text(n: dict) -> str:
    def outcomes(o: dict) -> str:
        turned = f", {o['control_turned_direct']:,} turned direct by the control" if o["control_turned_direct"] else ""
        return (f"reason {o['need_reasoning']:,} ({percent(o['need_reasoning_rate'])}), direct {o['direct']:,} "
                f"({percent(o['direct_rate'])}), undecided {o['undecided']:,} ({percent(o['undecided_rate'])}){turned}")

    lines = [f"{n['pairs']:,} pairs: {outcomes(n['outcomes_overall'])}"]
    for s, c in n["pairs_per_subset"].items():
        med = n["best_delta"][s].get("median")
        med = "n/a" if med is None else f"{med:+.4f}"
        lines.append(f"  {s:<24} {c:>8,} pairs  {outcomes(n['outcomes_per_subset'][s])}  median best_delta {med}")
    for g, share in n["chosen_share"].items():
        lines.append(f"  chosen from {g}: {percent(share)} ({n['chosen_count'][g]:,})")
    for g, t in n["tokens_per_generator"].items():
        lines.append(f"  tokens generated by {g}: {t:,}")
    t = n.get("target_side")
    if t:
        lines.append(f"  target side: {outcomes(t['counts'])}")
        j = t["counts"]["joint"]
        den = j["pairs_with_joint"]
        lines.append(f"  joint choice ({den:,} pairs with a valid candidate on both sides): beats the query side in "
                     f"{j['beats_query']:,} ({percent(j['beats_query'] / den if den else None)}), the target side in "
                     f"{j['beats_target']:,} ({percent(j['beats_target'] / den if den else None)}), both in "
                     f"{j['beats_both']:,} ({percent(j['beats_both'] / den if den else None)})")
    q = n["quarantine_by_reason"]
    lines.append(f"  quarantined: {sum(q.values()):,}" + (f" ({', '.join(f'{r} {c}' for r, c in q.items())})" if q else ""))
    hashes = n["provenance"]["config_hashes_in_data"]
    if len(hashes) > 1:
        lines.append(f"  WARNING: rows come from {len(hashes)} different configs: {', '.join(map(str, hashes))}")
    if not n["provenance"]["manifest"]:
        lines.append("  WARNING: no manifest.json: the job has not finished (or crashed); numbers cover committed shards")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `pairsel report`; their dests are run()'s keyword names."""
    parser.add_argument("out_dir", help="output folder of a pairsel job")
    parser.add_argument("--max-points", dest="max_points", type=int, default=DEFAULT_MAX_POINTS,
                        help="at most this many candidates in the delta-vs-length scatter (seeded sample)")


def run(out_dir: str, max_points: int = DEFAULT_MAX_POINTS) -> dict:
    """Write OUT/report.html, print a short summary, and return the numbers behind the figures
    (plus "html": the report's path and "figures": the names of the embedded figures)."""
    numbers = compute(out_dir, max_points=max_points)
    figs = figures(numbers)
    path = Path(out_dir) / "report.html"
    path.write_text(render_html(numbers, figs, out_dir), encoding="utf-8")
    print(summary_text(numbers))
    print(f"report: {path}")
    return {**numbers, "html": str(path), "figures": list(figs)}
