"""`pairsel report OUT_DIR`: what the curated data looks like, as one self-contained html file.

Everything is aggregated lazily by polars over OUT/data/*.parquet, so the report of a 10 GB output costs
a few small aggregates, not the output: candidate texts are never collected, and the delta-vs-length
scatter uses a seeded sample of at most `max_points` candidates. The figures are PNGs (matplotlib, Agg)
embedded as base64 data URIs in OUT/report.html. `run` returns the numbers behind every figure.

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


def scan_pairs(out_dir) -> pl.LazyFrame:
    """A lazy frame over every output row; nothing is read until it is collected."""
    files = data_files(out_dir)
    if not files:
        raise SystemExit(f"no output shards in {Path(out_dir) / 'data'} (is {out_dir} a pairsel output folder?)")
    return pl.scan_parquet(files)


def read_manifest(out_dir) -> Optional[dict]:
    """manifest.json, or None while the job has not finished (it is written last)."""
    path = Path(out_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


# ----------------------------------------------------------------------------- numbers


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
    fields = ("generator", "tokens", "finish_reason", "delta", "valid")
    return lf.select("candidates").explode("candidates").select(pl.col("candidates").struct.field(*fields))


def compute(out_dir, max_points: int = DEFAULT_MAX_POINTS, seed: int = SAMPLE_SEED) -> dict:
    """The numbers behind every figure (see module doc); only aggregates are collected."""
    lf = scan_pairs(out_dir)
    manifest = read_manifest(out_dir)

    cands = _candidates(lf)
    # One collect_all: polars runs the aggregates together and shares their scans of the shards.
    per_subset, per_gen, chosen, prov, n_scored = pl.collect_all([
        lf.group_by("subset")
        .agg(pl.len().alias("pairs"), pl.col("need_reasoning").sum().alias("need_reasoning"),
             *_stats("best_delta"), *_stats("s_direct"))
        .sort("subset"),
        cands.group_by("generator")
        .agg(pl.len().alias("candidates"), pl.col("valid").sum().alias("valid"), pl.col("tokens").sum().alias("tokens"),
             pl.col("delta").filter(pl.col("valid")).mean().alias("mean_delta"))
        .sort("generator"),
        # A chosen rationale is one that will be used: the pair needs reasoning (best delta > epsilon).
        lf.filter(pl.col("need_reasoning")).group_by("chosen_generator").agg(pl.len().alias("n")).sort("chosen_generator"),
        lf.select(
            pl.col("provenance").struct.field("config_hash").unique().sort().implode().alias("config_hashes"),
            pl.col("provenance").struct.field("epsilon").max().alias("epsilon"),
            pl.col("scoring_mode").unique().sort().implode().alias("scoring_modes"),
        ),
        cands.filter(pl.col("delta").is_not_null()).select(pl.len()),
    ])
    subsets = per_subset.to_dicts()
    pairs = {r["subset"]: r["pairs"] for r in subsets}
    need = {r["subset"]: int(r["need_reasoning"] or 0) for r in subsets}
    total = sum(pairs.values())
    per_gen = per_gen.to_dicts()
    chosen_count = {r["chosen_generator"]: r["n"] for r in chosen.to_dicts()}
    n_chosen = sum(chosen_count.values())
    prov = prov.to_dicts()[0]

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
        "best_delta": {r["subset"]: _unpack_stats(r, "best_delta") for r in subsets},
        "s_direct": {r["subset"]: _unpack_stats(r, "s_direct") for r in subsets},
        "delta_vs_length": _sample_delta_vs_length(cands, n_scored.item(), max_points, seed),
        "candidates_per_generator": {r["generator"]: {k: r[k] for k in ("candidates", "valid", "tokens", "mean_delta")}
                                     for r in per_gen},
        "tokens_per_generator": {r["generator"]: int(r["tokens"] or 0) for r in per_gen},
        "chosen_count": chosen_count,
        "chosen_share": {g: n / n_chosen for g, n in chosen_count.items()},
        "quarantine_by_reason": quarantine,
        "provenance": _provenance(manifest, prov),
    }


def _sample_delta_vs_length(cands: pl.LazyFrame, n_scored: int, max_points: int, seed: int) -> dict:
    """A seeded sample of scored candidates (delta not null): at most max_points of them.

    LazyFrame has no sample(), so rows are kept where a seeded hash of their position falls under the
    wanted fraction; that streams, and the exact cap is applied to the (small) result."""
    scored = cands.filter(pl.col("delta").is_not_null())
    keep = min(1.0, max_points / n_scored) if n_scored else 1.0
    sample = scored.select("generator", "tokens", "delta")
    if keep < 1.0:
        sample = sample.with_row_index("_i").filter(
            (pl.col("_i").hash(seed) % _HASH_RANGE) < int(keep * _HASH_RANGE)).drop("_i")
    df = sample.collect()
    if df.height > max_points:
        df = df.sample(n=max_points, seed=seed)
    r = df.select(pl.corr("tokens", "delta")).item() if df.height > 2 else None
    return {"n_scored": n_scored, "n_sampled": df.height,
            "pearson_r": None if r is None or not math.isfinite(r) else float(r),
            "generator": df["generator"].to_list(), "tokens": df["tokens"].to_list(), "delta": df["delta"].to_list()}


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
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, _height(len(names))), sharey=True, layout="constrained")
    need = [n["need_reasoning_per_subset"][s] for s in names]
    direct = [n["pairs_per_subset"][s] - n["need_reasoning_per_subset"][s] for s in names]
    left.barh(names, need, color="tab:orange", label="need reasoning")
    left.barh(names, direct, left=need, color="tab:blue", label="direct")
    for y, s in enumerate(names):
        left.text(n["pairs_per_subset"][s], y, f" {n['pairs_per_subset'][s]}", va="center")
    left.set_title("Pairs per subset")
    left.set_xlabel("pairs")
    left.set_ylabel("subset")
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, fontsize=8, frameon=False)
    left.margins(x=0.15)
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    rates = [n["need_reasoning_rate"][s] for s in names]
    right.barh(names, rates, color="tab:orange")
    for y, r in enumerate(rates):
        right.text(r, y, f" {r:.0%}", va="center")
    right.set_xlim(0, 1.12)
    right.set_xticks([0, 0.25, 0.5, 0.75, 1.0], ["0%", "25%", "50%", "75%", "100%"])
    right.set_title("need_reasoning rate per subset")
    right.set_xlabel("share of pairs with best delta > epsilon")
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
        gens = sorted(set(d["generator"]))
        for g in gens:
            idx = [i for i, x in enumerate(d["generator"]) if x == g]
            ax.scatter([d["tokens"][i] for i in idx], [d["delta"][i] for i in idx], s=8, alpha=0.5, label=g)
        ax.axhline(epsilon or 0.0, color="tab:red", linestyle="--", linewidth=1, label=f"epsilon = {epsilon or 0.0:g}")
        ax.legend(fontsize=8, markerscale=2)
        ax.set_xlabel("rationale length (generated tokens)")
        ax.set_ylabel("delta")
        ax.grid(alpha=0.3)
    r = "n/a" if d["pearson_r"] is None else f"{d['pearson_r']:+.2f}"
    ax.set_title(f"delta vs rationale length ({d['n_sampled']:,} of {d['n_scored']:,} scored candidates, r = {r})")
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
            left.text(shares[y], y, f" {shares[y]:.0%} ({n['chosen_count'][g]:,})", va="center")
        left.set_xlim(0, 1.3)
        left.set_xticks([0, 0.25, 0.5, 0.75, 1.0], ["0%", "25%", "50%", "75%", "100%"])
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


FIGURES = ("subsets", "distributions", "delta_vs_length", "generators", "quarantine")


def figures(n: dict) -> dict:
    """{figure name: PNG data URI}, one per entry of FIGURES."""
    import matplotlib

    matplotlib.use("Agg")
    epsilon = n["provenance"].get("epsilon")
    return {
        "subsets": _fig_to_data_uri(_fig_subsets(n)),
        "distributions": _fig_to_data_uri(_fig_distributions(n, epsilon)),
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
    subset_rows = [[s, n["pairs_per_subset"][s], n["need_reasoning_per_subset"][s], n["need_reasoning_rate"][s],
                    n["best_delta"][s].get("median"), n["best_delta"][s].get("null"), n["s_direct"][s].get("median")]
                   for s in subsets]
    gen_rows = [[g, c["candidates"], c["valid"], c["tokens"], c["mean_delta"], n["chosen_count"].get(g, 0),
                 n["chosen_share"].get(g, 0.0)] for g, c in n["candidates_per_generator"].items()]
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
<b>{n['need_reasoning_overall']:.1%}</b> need reasoning;
{sum(n['quarantine_by_reason'].values()):,} quarantined.</p>
<h2>Subsets</h2>
{fig("subsets", "pairs and need_reasoning rate per subset")}
{_table(["subset", "pairs", "need_reasoning", "rate", "median best_delta", "pairs without valid candidate", "median s_direct"], subset_rows)}
<h2>Distributions of best delta and s_direct</h2>
{fig("distributions", "best_delta and s_direct per subset")}
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


def summary_text(n: dict) -> str:
    lines = [f"{n['pairs']:,} pairs, need_reasoning {n['need_reasoning_overall']:.1%}"]
    for s, c in n["pairs_per_subset"].items():
        med = n["best_delta"][s].get("median")
        med = "n/a" if med is None else f"{med:+.4f}"
        lines.append(f"  {s:<24} {c:>8,} pairs  need_reasoning {n['need_reasoning_rate'][s]:6.1%}  median best_delta {med}")
    for g, share in n["chosen_share"].items():
        lines.append(f"  chosen from {g}: {share:.1%} ({n['chosen_count'][g]:,})")
    for g, t in n["tokens_per_generator"].items():
        lines.append(f"  tokens generated by {g}: {t:,}")
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
