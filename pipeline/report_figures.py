"""The figures of `pairsel report`: PNGs (matplotlib, Agg) of `report_numbers.compute`'s numbers, returned
as base64 data URIs so that OUT/report.html is one self-contained file."""
from __future__ import annotations

import base64
import io
from typing import Optional

from pipeline.report_numbers import percent

OUTCOMES = (("need_reasoning", "reason", "tab:orange"), ("direct", "direct", "tab:blue"),
            ("undecided", "undecided", "0.7"))  # (count key, label, colour)


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
        turned = [f"{out[s][f'{by}_turned_direct']} by the {name}" for by, name in (("control", "control"),
                                                                                    ("null", "decoys"))
                  if out[s][f"{by}_turned_direct"]]
        note = f" {out[s]['pairs']}" + (f" (turned direct {', '.join(turned)})" if turned else "")
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
    right.set_xlabel("share of pairs: reason / direct / undecided")
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


def _fig_histogram(n: dict, key: str, marker: str, xlabel: str, title: str):
    """One panel per subset of the histogram n[key] (report_numbers._histograms), its marker as a dashed line."""
    import matplotlib.pyplot as plt

    h = n[key]
    names = list(n["pairs_per_subset"])
    fig, axes = plt.subplots(len(names), 1, figsize=(9, max(2.6, 1.5 * len(names) + 1)), sharex=True,
                             layout="constrained", squeeze=False)
    for ax, s in zip(axes[:, 0], names):
        counts = h["counts"].get(s) or []
        undecided = n["outcomes_per_subset"][s]["undecided"]
        if not h["edges"] or not sum(counts):
            # not _empty(): clearing this axis's ticks would clear the x ticks that all subsets share
            ax.text(0.5, 0.5, "no tested pair", ha="center", va="center", color="0.4", transform=ax.transAxes)
            ax.set_yticks([])
        else:
            ax.stairs(counts, h["edges"], fill=True, color="tab:orange", alpha=0.7)
            ax.axvline(h["marker"], color="tab:red", linestyle="--", linewidth=1, label=f"{marker} = {h['marker']:g}")
            ax.legend(fontsize=8, loc="upper right")
        ax.set_ylabel(s, rotation=0, ha="right", va="center")
        ax.set_title(f"{s}: {sum(counts):,} pairs, {undecided:,} undecided "
                     f"({percent(n['outcomes_per_subset'][s]['undecided_rate'])}) not shown", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel(xlabel)
    fig.suptitle(title)
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


FIGURES = ("subsets", "distributions", "best_delta_histogram", "over_threshold_histogram", "delta_vs_length",
           "generators", "quarantine")


def figures(n: dict) -> dict:
    """{figure name: PNG data URI}, one per entry of FIGURES."""
    import matplotlib

    matplotlib.use("Agg")
    epsilon = n["provenance"].get("epsilon")
    return {
        "subsets": _fig_to_data_uri(_fig_subsets(n)),
        "distributions": _fig_to_data_uri(_fig_distributions(n, epsilon)),
        "best_delta_histogram": _fig_to_data_uri(_fig_histogram(
            n, "best_delta_histogram", "epsilon", "best delta (the chosen candidate's)", "Best delta per subset")),
        "over_threshold_histogram": _fig_to_data_uri(_fig_histogram(
            n, "over_threshold_histogram", "reason above", "best delta - help_threshold",
            "How far the best rationale is above (reason) or below what it had to beat")),
        "delta_vs_length": _fig_to_data_uri(_fig_delta_vs_length(n, epsilon)),
        "generators": _fig_to_data_uri(_fig_generators(n)),
        "quarantine": _fig_to_data_uri(_fig_quarantine(n)),
    }
