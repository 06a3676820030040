"""`pairsel export OUT_DIR --format {preference,contrastive,gate} --out DIR`: training files for trainers.

Each format is one lazy polars query over the output shards; input shards are grouped into parts of about
`rows_per_part` pairs and each part is streamed to `DIR/part-NNNNN.parquet` (or `.jsonl` with jsonl=True)
by polars' sink, so no export holds more than one part's rows in memory. Filters (all optional, combined
with AND): subsets (subset is one of them; an unknown subset is an error that lists the known ones),
min_delta (best_delta >= min_delta; undecided pairs have no best_delta and are dropped by it), need_reasoning
(equals the given value; undecided pairs, whose need_reasoning is null, never match).
Earlier part files in DIR are replaced; DIR/README.md says what was exported and how to load it.

What each format holds, and the query that builds its rows: export_formats.py.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import polars as pl
import pyarrow.parquet as pq

from pipeline.errors import ConfigError
from pipeline.export_formats import (
    DOCS, FORMATS, GATE_SIDES, PREFERENCE_STYLES, RATIONALE_MODES, RATIONALE_SIDES, SIDES,
    as_side, format_rows, preference_pairs)
from pipeline.read_output import check_schema_version, data_files, read_manifest
from stages.side import QUERY

DEFAULT_ROWS_PER_PART = 100_000


def _check_subsets(files: list[Path], subsets) -> None:
    """An unknown subset is a user error (exit 2), not an empty export: say which subsets there are."""
    if not subsets:
        return
    known = pl.scan_parquet(files).select(pl.col("subset").unique().sort()).collect()["subset"].to_list()
    unknown = [s for s in subsets if s not in known]
    if unknown:
        raise ConfigError(f"--subset: no subset {', '.join(map(repr, unknown))} in this output; "
                          f"its subsets are: {', '.join(known)}")


def _filters(lf: pl.LazyFrame, subsets, min_delta, need_reasoning) -> pl.LazyFrame:
    if subsets:
        lf = lf.filter(pl.col("subset").is_in(list(subsets)))
    if min_delta is not None:
        lf = lf.filter(pl.col("best_delta") >= min_delta)
    if need_reasoning is not None:
        lf = lf.filter(pl.col("need_reasoning") == need_reasoning)
    return lf


# ----------------------------------------------------------------------------- writing


def _parts(files: list[Path], rows_per_part: int) -> list[list[Path]]:
    """Consecutive shards grouped to about rows_per_part input rows (read from parquet footers)."""
    groups, current, rows = [], [], 0
    for f in files:
        n = pq.read_metadata(f).num_rows
        if current and rows + n > rows_per_part:
            groups.append(current)
            current, rows = [], 0
        current.append(f)
        rows += n
    if current:
        groups.append(current)
    return groups


def _count(path: Path, jsonl: bool) -> int:
    if jsonl:
        with open(path, "rb") as f:
            return sum(1 for line in f if line.strip())
    return pq.read_metadata(path).num_rows


def _readme(fmt: str, out_dir: str, filters: dict, result: dict) -> str:
    manifest = read_manifest(out_dir) or {}
    return (f"# pairsel export: {fmt}\n\nFrom `{out_dir}` (config_hash {manifest.get('config_hash', 'unknown')}), "
            f"filters {json.dumps(filters)}: {result['rows']} rows from {result['pairs']} pairs in "
            f"{len(result['files'])} file(s).\n\n```text\n{DOCS[fmt]}```\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `pairsel export`; their dests are run()'s keyword names (`--format` -> fmt,
    `--subset` -> subsets)."""
    parser.add_argument("out_dir", help="output folder of a pairsel job")
    parser.add_argument("--format", dest="fmt", required=True, choices=FORMATS)
    parser.add_argument("--out", dest="out", required=True, help="folder to write the export into")
    parser.add_argument("--subset", dest="subsets", nargs="+", action="extend", metavar="S",
                        help="keep only these subsets (repeatable)")
    parser.add_argument("--min-delta", dest="min_delta", type=float, help="keep pairs with best_delta >= X")
    parser.add_argument("--need-reasoning", dest="need_reasoning", type=_bool, metavar="{true,false}",
                        help="keep pairs whose need_reasoning equals this (undecided pairs never match)")
    parser.add_argument("--min-gap", dest="min_gap", type=float, default=0.0,
                        help="preference: keep rows with delta_chosen - delta_rejected >= X")
    parser.add_argument("--text-only", dest="text_only", action="store_true",
                        help="preference: drop the rows whose query has an image (no images column)")
    parser.add_argument("--include-undecided", dest="include_undecided", action="store_true",
                        help="gate: keep undecided pairs (no valid candidate; need_reasoning null)")
    parser.add_argument("--rationale-mode", dest="rationale_mode", choices=RATIONALE_MODES, default="append",
                        help="contrastive: append the chosen rationale to qry, or put it in a `rationale` column")
    parser.add_argument("--preference-style", dest="preference_style", choices=PREFERENCE_STYLES,
                        default="conversational", help="preference: TRL conversational (vision) or standard rows")
    parser.add_argument("--side", dest="side", choices=SIDES, default="query",
                        help="preference: rationales about the query (default) or the target (k_target > 0)")
    parser.add_argument("--rationale-side", dest="rationale_side", choices=RATIONALE_SIDES, default="query",
                        help="contrastive: attach the chosen rationale to qry (default), pos_text, or both")
    parser.add_argument("--sides", dest="gate_sides", choices=GATE_SIDES, default="query",
                        help="gate: one row per pair (query side), or one per (pair, side) with a side column")
    parser.add_argument("--rows-per-part", dest="rows_per_part", type=int, default=DEFAULT_ROWS_PER_PART,
                        help="about this many input pairs per output file")
    parser.add_argument("--jsonl", action="store_true", help="write JSON lines instead of Parquet")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")
    return value == "true"


def run(
    out_dir: str,
    fmt: str,
    out: str,
    subsets: Optional[Sequence[str]] = None,
    min_delta: Optional[float] = None,
    need_reasoning: Optional[bool] = None,
    rationale_mode: str = "append",
    jsonl: bool = False,
    preference_style: str = "conversational",
    rows_per_part: int = DEFAULT_ROWS_PER_PART,
    min_gap: float = 0.0,
    text_only: bool = False,
    include_undecided: bool = False,
    side: str = "query",
    rationale_side: str = "query",
    gate_sides: str = "query",
) -> dict:
    """Write the export; return {"format", "out", "files", "rows", "pairs", "filters"}."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    files = data_files(out_dir)
    if not files:
        raise SystemExit(f"no output shards in {Path(out_dir) / 'data'}")
    check_schema_version(files)
    _check_subsets(files, subsets)
    opts = {"rationale_mode": rationale_mode, "preference_style": preference_style, "min_gap": min_gap,
            "text_only": text_only, "include_undecided": include_undecided, "images": False, "side": side,
            "rationale_side": rationale_side, "gate_sides": gate_sides}
    if fmt == "preference" and not text_only:
        # one pass over a single column: does any exported query have an image? (then every part has images)
        pairs = preference_pairs(_filters(as_side(pl.scan_parquet(files), side), subsets, min_delta, need_reasoning))
        opts["images"] = bool(pairs.select(pl.col("query_image_path").is_not_null().any()).collect().item())
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    ext = "jsonl" if jsonl else "parquet"
    for old in list(dest.glob("part-*.parquet")) + list(dest.glob("part-*.jsonl")):
        old.unlink()

    written = []
    for i, group in enumerate(_parts(files, rows_per_part)):
        lf = pl.scan_parquet(group)
        # preference --side target: --min-delta and --need-reasoning filter on the target side's label
        lf = _filters(as_side(lf, side) if fmt == "preference" else lf, subsets, min_delta, need_reasoning)
        lf = format_rows(fmt, lf, opts)
        path = dest / f"part-{i:05d}.{ext}"
        if jsonl:
            lf.sink_ndjson(path)
        else:
            lf.sink_parquet(path)
        written.append((path, _count(path, jsonl)))
    # Empty parts only clutter the folder; one is kept when all are empty so the export still has a schema.
    kept = [p for p, n in written if n] or [written[0][0]]
    for p, n in written:
        if p not in kept:
            p.unlink()

    scan = pl.scan_ndjson if jsonl else pl.scan_parquet
    rows = sum(n for _, n in written)
    pairs = scan(kept).select(pl.col("pair_id").n_unique()).collect().item() if rows else 0
    filters = {"subsets": list(subsets) if subsets else None, "min_delta": min_delta, "need_reasoning": need_reasoning}
    # an option that picks a side is recorded where it is not the query side (the default of each)
    sides = {"contrastive": ("rationale_side", rationale_side), "preference": ("side", side),
             "gate": ("sides", gate_sides)}
    if fmt == "contrastive":
        filters["rationale_mode"] = rationale_mode
    if fmt == "preference":
        filters.update(preference_style=preference_style, min_gap=min_gap, text_only=text_only,
                       images=opts["images"])
    if fmt == "gate":
        filters["include_undecided"] = include_undecided
    if fmt in sides and sides[fmt][1] != QUERY.name:
        filters[sides[fmt][0]] = sides[fmt][1]
    result = {"format": fmt, "out": str(dest), "files": [str(p) for p in kept], "rows": rows, "pairs": pairs,
              "filters": filters}
    (dest / "README.md").write_text(_readme(fmt, out_dir, filters, result))
    print(f"{fmt}: {rows} rows from {pairs} pairs -> {dest} ({len(kept)} file(s))")
    return result
