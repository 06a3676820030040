"""`pairsel report OUT_DIR`: what the curated data looks like, as one self-contained html file.

The numbers come from report_numbers.py (lazy polars aggregates over the output shards; `run` returns them),
the figures from report_figures.py (PNGs embedded as data URIs); this module writes OUT/report.html and the
short summary that `pairsel report` prints.
"""
from __future__ import annotations

import argparse
import html
import json
from pathlib import Path
from typing import Optional

from pipeline.report_figures import figures
from pipeline.report_numbers import DEFAULT_MAX_POINTS, compute, percent
from stages import layout


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
                    o[s]["control_turned_direct"], o[s]["null_turned_direct"],
                    n["best_delta"][s].get("median"), n["s_direct"][s].get("median")]
                   for s in subsets]
    gen_rows = [[g, c["candidates"], c["valid"], c["tokens"], c["mean_delta"], n["chosen_count"].get(g, 0),
                 percent(n["chosen_share"].get(g, 0.0))] for g, c in n["candidates_per_generator"].items()]
    prov_rows = [[k, v] for k, v in n["provenance"].items()]
    rule = n["decision"]
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
<p>Outcomes: <b>reason</b> a rationale helps (its delta &gt; the pair's help_threshold); <b>direct</b> reasoning
was tested and no rationale helps; <b>undecided</b> reasoning was never tested (no valid candidate, or too few
decoys): need_reasoning is null. {n["controls"]} control text(s); "turned direct by the control": pairs with a
rationale above epsilon that does not beat the controls; "by the decoys": pairs with a rationale above that bar that
does not beat the pair's decoys by the calibrated margin.</p>
{_decision_section(rule)}
<h2>Subsets</h2>
{fig("subsets", "pairs per subset by outcome")}
{_table(["subset", "pairs", "reason", "direct", "undecided", "turned direct by the control", "turned direct by the decoys", "median best_delta", "median s_direct"], subset_rows)}
{_target_section(n["target_side"])}
<h2>Distributions of best delta and s_direct</h2>
{fig("distributions", "best_delta and s_direct per subset")}
{fig("best_delta_histogram", "histogram of best delta per subset, epsilon marked")}
{fig("over_threshold_histogram", "histogram of best delta minus help_threshold per subset")}
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


def _decision_section(rule: dict) -> str:
    """The rule the labels were decided by, and under the decoy rule each calibration group's margin, estimated
    false-discovery rate and where the tested pairs' best rationale lies against its threshold."""
    if not rule:
        return "<h2>Decision rule</h2><p>No manifest: the rule is not known.</p>"
    head = f"<h2>Decision rule: {html.escape(str(rule.get('rule')))}</h2><p>{html.escape(str(rule.get('promise', '')))}</p>"
    over = rule.get("over_threshold", {})
    if rule.get("rule") != "decoys":
        return head
    rows = [[c["side"], c["group"], c["pairs"], c["wins"], c["losses"], c["reason"],
             "none (no pair reason)" if c["margin"] is None else c["margin"], percent(c["fdr_estimate"]),
             *(over.get(c["side"], {}).get(c["group"], {}).get(k) for k in ("p5", "median", "p95"))]
            for c in rule.get("calibration", [])]
    return head + _table(["side", "group", "tested pairs", "candidate wins", "decoy wins", "reason",
                          "margin", "estimated FDR", "best - threshold p5", "median", "p95"], rows)


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
        turned = "".join(f", {o[f'{by}_turned_direct']:,} turned direct by the {name}"
                         for by, name in (("control", "control"), ("null", "decoys")) if o[f"{by}_turned_direct"])
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
    rule = n["decision"]
    if rule.get("rule") == "decoys":
        for c in rule.get("calibration", []):
            what = ("labels no pair reason" if c["margin"] is None else
                    f"margin {c['margin']:.4g}, {c['reason']:,} reason, estimated FDR {percent(c['fdr_estimate'])}")
            lines.append(f"  decoy rule ({c['side']} side, {c['group']}): {what} "
                         f"[{c['wins']:,} candidate wins, {c['losses']:,} decoy wins]")
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
    path = Path(out_dir) / layout.REPORT
    path.write_text(render_html(numbers, figs, out_dir), encoding="utf-8")
    print(summary_text(numbers))
    print(f"report: {path}")
    return {**numbers, "html": str(path), "figures": list(figs)}
