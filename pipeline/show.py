"""`pairsel show OUT_DIR PAIR_ID`: one pair, its rationales and why it was labelled the way it was.

The pair is found with a lazy polars filter on pair_id, so only the row groups that may hold it are read
(predicate pushdown on the parquet statistics). An unknown pair_id raises `PairNotFound`, a SystemExit:
the CLI exits with status 1 and the message (which says whether the pair was quarantined, and why).
"""
from __future__ import annotations

import argparse
from collections import Counter
from typing import Optional

import polars as pl
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from pipeline.read_output import quarantine_files, scan_pairs
from stages.select import REASON, UNDECIDED

MARK_CHOSEN = "★ chosen"
MARK_REJECTED = "✗ rejected"
MARK_INVALID = "⊘ invalid"


class PairNotFound(SystemExit):
    """No output row has this pair_id. A SystemExit (status 1, message on stderr), so the CLI needs no
    handler; tests catch it by name."""


def find_pair(out_dir: str, pair_id: str) -> dict:
    """The output row of `pair_id` as a dict; PairNotFound if there is none."""
    rows = scan_pairs(out_dir).filter(pl.col("pair_id") == pair_id).collect()
    if rows.height:
        return rows.row(0, named=True)
    raise PairNotFound(_not_found_message(out_dir, pair_id))


def _not_found_message(out_dir: str, pair_id: str) -> str:
    files = quarantine_files(out_dir)
    if files:
        q = pl.scan_parquet(files).filter(pl.col("pair_id") == pair_id).select("reason", "detail").collect()
        if q.height:
            return f"pair {pair_id!r} was quarantined ({q['reason'][0]}: {q['detail'][0]}), so it has no output row"
    similar = (scan_pairs(out_dir).select("pair_id").filter(pl.col("pair_id").str.contains(pair_id, literal=True))
               .head(5).collect()["pair_id"].to_list())
    hint = f"; pair ids containing it: {', '.join(similar)}" if similar else ""
    return f"pair {pair_id!r} not found in {out_dir}/data{hint}"


def _num(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:+.4f}" if x == 0 or abs(x) >= 1e-3 else f"{x:+.2e}"


def _epsilon(row: dict) -> float:
    eps = (row.get("provenance") or {}).get("epsilon")
    return 0.0 if eps is None else eps


def decision(row: dict) -> str:
    """One line: the pair's outcome (reason / direct / undecided) and why."""
    eps = _epsilon(row)
    cands = row.get("candidates") or []
    controls = bool(row.get("s_control"))
    if row.get("decision") == UNDECIDED or row.get("chosen") is None:
        reasons = Counter(c.get("finish_reason") or "?" for c in cands if not c.get("valid"))
        detail = ", ".join(f"{r} x{n}" for r, n in reasons.most_common()) or "no candidates"
        return (f"no valid rationale among {len(cands)} candidates ({detail}) -> undecided: reasoning was not "
                f"tested (need_reasoning null)")
    k, best = row["chosen"], row["best_delta"]
    chosen = cands[k] if k < len(cands) else {}
    if row.get("decision") == REASON:
        beat = f", delta_control {_num(chosen.get('delta_control'))} > {eps:g}" if controls else ""
        return f"chosen #{k} (delta {_num(best)} > epsilon {eps:g}{beat}) -> reason, need_reasoning"
    if best is not None and best > eps and controls:
        best_control = max((x for x in row.get("control_delta") or [] if x is not None), default=None)
        return (f"no rationale beat the content-free control: best delta {_num(best)} > epsilon {eps:g}, but no "
                f"valid candidate has delta_control > {eps:g} (best control's delta {_num(best_control)}) "
                f"-> direct, no reasoning")
    return f"no rationale beat epsilon: best delta {_num(best)} <= {eps:g} (#{k}) -> direct, no reasoning"


def _marker(row: dict, k: int, cand: dict) -> Text:
    if k == row.get("chosen"):
        return Text(MARK_CHOSEN, style="bold green")
    if k in (row.get("rejected") or []):
        return Text(MARK_REJECTED, style="red")
    if not cand.get("valid"):
        return Text(MARK_INVALID, style="dim")
    return Text("")


def _side(label: str, text: Optional[str], image: Optional[str]) -> Text:
    out = Text()
    out.append(f"{label}: ", style="bold")
    out.append(text if text is not None else "(no text)")
    if image:
        out.append("\n  image: ", style="bold")
        out.append(image, style="cyan")
    return out


def _negatives(row: dict) -> Optional[Table]:
    negatives = row.get("negatives") or []
    if not negatives:
        return None
    scores = row.get("s_direct_neg") or []
    hardest = max(range(len(scores)), key=lambda j: scores[j]) if scores and None not in scores else None
    table = Table(title="negatives", title_justify="left", expand=True)
    for col, kw in (("#", {"justify": "right"}), ("origin", {}), ("s_direct_neg", {"justify": "right"}),
                    ("text", {"ratio": 3}), ("image", {"ratio": 1})):
        table.add_column(col, **kw)
    for j, neg in enumerate(negatives):
        score = scores[j] if j < len(scores) else None
        mark = " (hardest)" if j == hardest else ""
        table.add_row(str(j), neg.get("origin") or "", f"{_num(score)}{mark}", Text(neg.get("text") or ""),
                      Text(neg.get("image_path") or ""))
    return table


NUMERIC = ("#", "tokens", "s_k", "delta", "delta_control", "neg_delta", "lse")


def _candidates(row: dict, title: str = "rationales") -> Table:
    pair_aware = row.get("scoring_mode") == "pair_aware"
    controls = bool(row.get("s_control"))
    table = Table(title=title, title_justify="left", expand=True)
    columns = (["#", "generator", "tokens", "finish", "s_k", "delta"] + (["delta_control"] if controls else [])
               + ["neg_delta"] + (["lse"] if pair_aware else []) + ["mark"])
    names = [c.get("generator") or "" for c in row.get("candidates") or []]
    widths = {"mark": max(len(MARK_REJECTED), len(MARK_INVALID)), "generator": max(map(len, names), default=9)}
    for col in columns:
        # the mark and the generator never wrap or shorten (they are what a reader looks for in each row); on a
        # narrow terminal the long headers of the numbers fold onto two lines instead
        extra = ({"no_wrap": True, "min_width": widths[col]} if col in widths
                 else {"overflow": "fold"} if col in NUMERIC else {})
        table.add_column(col, justify="right" if col in NUMERIC else "left", **extra)
    for k, c in enumerate(row.get("candidates") or []):
        cells = [str(k), Text(c.get("generator") or ""), str(c.get("tokens") if c.get("tokens") is not None else "-"),
                 c.get("finish_reason") or "-", _num(c.get("s_k")), _num(c.get("delta"))]
        if controls:
            cells.append(_num(c.get("delta_control")))
        cells.append(_num(c.get("neg_delta")))
        if pair_aware:
            cells.append(_num(c.get("lse")))
        table.add_row(*cells, _marker(row, k, c))
    return table


def _controls(row: dict, side: str = "query") -> Optional[Table]:
    """The content-free controls' scores: what any text appended to the query (or target) does for this pair."""
    s_control = row.get("s_control") or []
    if not s_control:
        return None
    pair_aware = row.get("scoring_mode") == "pair_aware"
    table = Table(title=f"content-free controls on the {side} side (scoring.controls, in config order)",
                  title_justify="left", expand=True)
    for col in ["#", "s_control", "control_delta"] + (["lse_control"] if pair_aware else []):
        table.add_column(col, justify="right")
    deltas, lses = row.get("control_delta") or [], row.get("lse_control") or []
    for i, s in enumerate(s_control):
        cells = [str(i), _num(s), _num(deltas[i] if i < len(deltas) else None)]
        if pair_aware:
            cells.append(_num(lses[i] if i < len(lses) else None))
        table.add_row(*cells)
    return table


def _rationale_texts(row: dict) -> Group:
    parts = []
    for k, c in enumerate(row.get("candidates") or []):
        head = Text(f"#{k} {c.get('generator') or ''} ", style="bold")
        head.append_text(_marker(row, k, c))
        body = Text(c.get("text") or "(empty)", style=None if c.get("text") else "dim")
        if c.get("error"):
            body.append(f"\nerror: {c['error']}", style="red")
        parts += [head, body, Text("")]
    return Group(*parts)


TARGET_VIEW = {"candidates": "target_candidates", "chosen": "target_chosen", "rejected": "target_rejected",
               "decision": "target_decision", "best_delta": "target_best_delta", "s_control": "target_s_control",
               "control_delta": "target_control_delta", "lse_control": "target_lse_control"}


def target_view(row: dict) -> dict:
    """The target side in the query side's names, so that the same tables and decision line show it."""
    return {**row, **{name: row.get(column) for name, column in TARGET_VIEW.items()}}


def joint_line(row: dict) -> str:
    """One line: the joint choice and whether it beats each side alone."""
    if row.get("joint_delta") is None:
        return "joint: no valid candidate on both sides -> no joint choice"
    eps = _epsilon(row)

    def beats(flag) -> str:
        return "beats" if flag else "does not beat"
    return (f"joint: query #{row['joint_query']} with target #{row['joint_target']}, delta {_num(row['joint_delta'])}: "
            f"{beats(row.get('joint_beats_query'))} the query side's choice and {beats(row.get('joint_beats_target'))} "
            f"the target side's (by more than epsilon {eps:g})")


def _joint(row: dict) -> Table:
    """delta_joint of every (query rationale k, target rationale j)."""
    targets = row.get("target_candidates") or []
    table = Table(title="joint delta_joint (k: query rationale, j: target rationale)", title_justify="left", expand=True)
    table.add_column("k", justify="right")
    for j in range(len(targets)):
        table.add_column(f"j={j}", justify="right")
    for k, c in enumerate(row.get("candidates") or []):
        values = c.get("delta_joint") or [None] * len(targets)
        cells = [Text(_num(v), style="bold green" if (k, j) == (row.get("joint_query"), row.get("joint_target")) else None)
                 for j, v in enumerate(values)]
        table.add_row(str(k), *cells)
    return table


def _render_target_side(row: dict, console: Console) -> None:
    view = target_view(row)
    console.rule(Text("target side", style="bold"))
    controls = _controls(view, "target")
    if controls is not None:
        console.print(controls)
    console.print(_candidates(view, "target rationales (s_k = cos(E(q), E(t ⊕ r_t,j)))"))
    console.print(Panel(_rationale_texts(view), title="target rationale texts", title_align="left"))
    style = {REASON: "bold green", UNDECIDED: "bold magenta"}.get(view.get("decision"), "bold yellow")
    console.print(Text("target decision: " + decision(view), style=style))
    console.print(_joint(row))
    console.print(Text(joint_line(row), style="bold"))


def render(row: dict, console: Console) -> None:
    title = (f"{row['pair_id']}  subset {row.get('subset')}  "
             f"(shard {row.get('shard_id')}, row {row.get('row_index')}, {row.get('source')})")
    console.rule(Text(title, style="bold"))
    console.print(_side("query", row.get("query_text"), row.get("query_image_path")))
    console.print(_side("target", row.get("target_text"), row.get("target_image_path")))
    negatives = _negatives(row)
    if negatives is not None:
        console.print(negatives)
    scores = Text(f"scoring {row.get('scoring_mode')}   s_direct {_num(row.get('s_direct'))}")
    if row.get("scoring_mode") == "pair_aware":
        scores.append(f"   lse_direct {_num(row.get('lse_direct'))}   temperature {row.get('temperature')}")
    scores.append(f"   epsilon {_epsilon(row):g}   decision {row.get('decision')}")
    console.print(scores)
    controls = _controls(row)
    if controls is not None:
        console.print(controls)
    console.print(_candidates(row))
    console.print(Panel(_rationale_texts(row), title="rationale texts", title_align="left"))
    style = {REASON: "bold green", UNDECIDED: "bold magenta"}.get(row.get("decision"), "bold yellow")
    console.print(Text("decision: " + decision(row), style=style))
    if row.get("target_candidates"):
        _render_target_side(row, console)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `pairsel show`; their dests are run()'s keyword names."""
    parser.add_argument("out_dir", help="output folder of a pairsel job")
    parser.add_argument("pair_id", help="the pair to show")


def run(out_dir: str, pair_id: str, console: Optional[Console] = None) -> None:
    """Print the pair; raises PairNotFound (a SystemExit, status 1) for an unknown pair_id."""
    render(find_pair(out_dir, pair_id), console or Console())
