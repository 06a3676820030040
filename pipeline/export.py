"""`pairsel export OUT_DIR --format {preference,contrastive,gate} --out DIR`: training files for trainers.

Each format is one lazy polars query over the output shards; input shards are grouped into parts of about
`rows_per_part` pairs and each part is streamed to `DIR/part-NNNNN.parquet` (or `.jsonl` with jsonl=True)
by polars' sink, so no export holds more than one part's rows in memory. Filters (all optional, combined
with AND): subsets (subset is one of them; an unknown subset is an error that lists the known ones),
min_delta (best_delta >= min_delta; undecided pairs have no best_delta and are dropped by it), need_reasoning
(equals the given value; undecided pairs, whose need_reasoning is null, never match).
Earlier part files in DIR are replaced; DIR/README.md says what was exported and how to load it.

Each format treats the three outcomes (stages/select.py) on purpose: preference rows come only from pairs
whose decision is reason (the chosen rationale helps); the gate export leaves undecided pairs out unless
include_undecided (their label is null: reasoning was never tested); the contrastive export keeps every pair
(the pair itself is good training data), attaches a rationale only where the decision is reason, and carries
`decision` so that a trainer can tell undecided pairs apart.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import polars as pl
import pyarrow.parquet as pq

from pipeline.config import ConfigError
from pipeline.report import check_schema_version, data_files, read_manifest
from stages.select import REASON, UNDECIDED

FORMATS = ("preference", "contrastive", "gate")
RATIONALE_MODES = ("append", "column")
SIDES = ("query", "target")  # preference --side: whose rationales the rows are about
RATIONALE_SIDES = ("query", "target", "both")  # contrastive --rationale-side: which side gets its rationale
GATE_SIDES = ("query", "both")  # gate --sides: the query's row per pair, or one row per (pair, side)
PREFERENCE_STYLES = ("conversational", "standard")
IMAGE_MARKER = "<|image_1|>"  # MMEB's image placeholder (stages/backends/base.py); kept in contrastive/gate text
# How a chosen rationale is appended to the query in contrastive exports (rationale_mode="append"): the same
# shape as the embedder's default reasoned_query_instruction, "Query: {text}\nReasoning: {rationale}".
RATIONALE_SEPARATOR = "\nReasoning: "
# The standard-style preference prompt ends with the same separator, so that a trainer that joins prompt and
# completion (TRL's RewardTrainer, DPOTrainer's tokenization) sees "QUERY\nReasoning: RATIONALE": the two read
# apart, and exactly as the embedder saw the rationale.
STANDARD_PROMPT_END = RATIONALE_SEPARATOR
DEFAULT_ROWS_PER_PART = 100_000

PREFERENCE_DOC = """\
preference: TRL preference data (DPOTrainer, RewardTrainer), one row per (chosen, rejected) rationale pair.
  Only pairs whose decision is reason, so the chosen rationale helps (delta > epsilon, and beats the controls
  when they are on), and only rejected rationales that hurt or do nothing (valid, delta <= 0); with
  min_gap, also delta_chosen - delta_rejected >= min_gap. A pair with R rejected rationales gives R rows.
  columns: prompt, chosen, rejected, [images], delta_chosen, delta_rejected, chosen_index, rejected_index,
           chosen_generator, rejected_generator, pair_id, subset
  images (list of the query's image paths) is there only when some exported query has an image; an export
  whose queries are all text (or text_only=True / --text-only, which drops the rows with an image) has no
  images column, since TRL takes any `images` column for a vision dataset.
  style="conversational" (default; vision-language models need it: their processor places the image where
  the {"type": "image"} item is):
      text-only export: prompt = [{"role": "user", "content": QUERY}], chosen = [{"role": "assistant",
                        "content": RATIONALE}], rejected alike (plain string content: any chat template
                        renders it)
      with images:      prompt = [{"role": "user", "content": [{"type": "image", "text": null},
                        {"type": "text", "text": QUERY}]}] (the image item stands where the query had
                        <|image_1|>, first if it had no marker; a text-only row has one text item),
                        chosen = [{"role": "assistant", "content": [{"type": "text", "text": RATIONALE}]}]
  style="standard" (text models): prompt = QUERY + "\\nReasoning: ", chosen and rejected are the plain
      rationales, so prompt + chosen reads "QUERY\\nReasoning: RATIONALE". A query with an image keeps
      <|image_1|> (MMEB's marker, which no VLM processor counts as an image): use the conversational
      style for VLMs.

    # a text-only export and a text model: loaded as written, no column changes (tests/test_trainers.py)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL)   # DPOTrainer loads its reference model from MODEL
    reward_model = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=1)

    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer
    ds = load_dataset("parquet", data_files="EXPORT_DIR/*.parquet", split="train")
    DPOTrainer(model=model, args=DPOConfig(output_dir="dpo"), train_dataset=ds,
               processing_class=tokenizer).train()
    RewardTrainer(model=reward_model, args=RewardConfig(output_dir="rm"), train_dataset=ds,
                  processing_class=tokenizer).train()

    # with images, a vision-language model (conversational style): the paths are the input's
    # (MMEB: relative to input.image_root); TRL wants the images themselves
    import os
    from datasets import Image, List
    ds = ds.map(lambda r: {"images": [os.path.join(IMAGE_ROOT, p) for p in r["images"]]})
    ds = ds.cast_column("images", List(Image()))
    DPOTrainer(model=vlm, args=DPOConfig(output_dir="dpo"), train_dataset=ds, processing_class=processor)
"""

CONTRASTIVE_DOC = f"""\
contrastive: MMEB-train rows (VLM2Vec's TrainDataset reads them unchanged), one row per pair.
  columns: qry, qry_image_path, pos_text, pos_image_path, neg_text, neg_image_path, pair_id, subset,
           decision, need_reasoning (+ rationale with rationale_mode="column")
  Missing text or image is "" as in MMEB-train (VLM2Vec treats image path "" as no image). neg_* is the
  first explicit negative of the input ("" without one); in-shard negatives are not exported, the trainer
  draws in-batch negatives itself. Every pair is exported, undecided ones too (decision tells them apart;
  their need_reasoning is null); the chosen rationale is attached only where the decision is reason:
    rationale_mode="append": qry = query + {RATIONALE_SEPARATOR!r} + rationale
    rationale_mode="column": qry is the query; rationale = the rationale (null where not needed)

    from datasets import load_dataset
    ds = load_dataset("parquet", data_files="EXPORT_DIR/*.parquet", split="train")
    # VLM2Vec: point TrainDataset at this dataset instead of TIGER-Lab/MMEB-train (e.g. replace its
    # load_dataset(name, subset, split=...) with the line above) and pass --image_dir IMAGE_ROOT
"""

GATE_DOC = """\
gate: a reason / don't-reason policy's data, one row per pair whose reasoning was tested.
  columns: pair_id, subset, query_text, query_image_path, target_text, target_image_path (missing text or
           image is "", as in the contrastive export), decision (reason | direct), need_reasoning (the
           label), best_delta (the utility gap of the chosen rationale), s_direct (how well the plain query
           already matches), scoring_mode
  Undecided pairs (no valid candidate) are left out: their label would be a guess. include_undecided=True
  (--include-undecided) keeps them, with decision "undecided" and need_reasoning and best_delta null.

    import polars as pl
    df = pl.read_parquet("EXPORT_DIR/*.parquet")
    y = df["need_reasoning"].cast(pl.Int8)      # or regress on best_delta
"""

DOCS = {"preference": PREFERENCE_DOC, "contrastive": CONTRASTIVE_DOC, "gate": GATE_DOC}


def format_docs() -> str:
    """What each export format holds and how a trainer loads it (for the README)."""
    return "\n".join(DOCS[f] for f in FORMATS)


# ----------------------------------------------------------------------------- expressions


def _candidate(index: str) -> pl.Expr:
    return pl.col("candidates").list.get(pl.col(index), null_on_oob=True)


def _part(kind: str, text: pl.Expr) -> pl.Expr:
    return pl.struct(pl.lit(kind).alias("type"), text.cast(pl.String).alias("text"))


def _user_content() -> pl.Expr:
    """The query as TRL vision content parts: text around an {"type": "image"} item placed at the marker."""
    query = pl.col("query_text").fill_null("")
    has_image = pl.col("query_image_path").is_not_null()
    split = query.str.splitn(IMAGE_MARKER, 2)
    before, after = split.struct.field("field_0"), split.struct.field("field_1")
    image = _part("image", pl.lit(None, dtype=pl.String))
    content = (
        pl.when(has_image & after.is_not_null())
        .then(pl.concat_list(_part("text", before.str.strip_chars()), image, _part("text", after.str.strip_chars())))
        .when(has_image)
        .then(pl.concat_list(image, _part("text", query.str.strip_chars())))
        .otherwise(pl.concat_list(_part("text", query)))
    )
    keep = (pl.element().struct.field("type") == "image") | (pl.element().struct.field("text").str.len_chars() > 0)
    return content.list.eval(pl.element().filter(keep))


def _message(role: str, content: pl.Expr) -> pl.Expr:
    return pl.concat_list(pl.struct(pl.lit(role).alias("role"), content.alias("content")))


def _assistant(text: pl.Expr, parts: bool) -> pl.Expr:
    return _message("assistant", pl.concat_list(_part("text", text)) if parts else text)


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


def as_side(lf: pl.LazyFrame, side: str) -> pl.LazyFrame:
    """The target side in the query side's column names, so that one preference query serves both: the
    target's candidates, label and content stand where the query's are (the prompt shows the target, the
    input the rationale is about; a target-only rationale does not depend on the query)."""
    if side == "query":
        return lf
    if side != "target":
        raise ValueError(f"side must be one of {SIDES}, not {side!r}")
    return lf.with_columns(*(pl.col(f"target_{c}").alias(c) for c in ("candidates", "chosen", "rejected", "decision",
                                                                     "best_delta", "need_reasoning")),
                           pl.col("target_text").alias("query_text"),
                           pl.col("target_image_path").alias("query_image_path"))


def preference_pairs(lf: pl.LazyFrame, text_only: bool = False) -> pl.LazyFrame:
    """The source pairs of preference rows: the chosen rationale helps, there is a rejected one."""
    lf = lf.filter((pl.col("decision") == REASON) & pl.col("chosen").is_not_null() & (pl.col("rejected").list.len() > 0))
    return lf.filter(pl.col("query_image_path").is_null()) if text_only else lf


def preference(lf: pl.LazyFrame, style: str = "conversational", images: bool = True, min_gap: float = 0.0,
               text_only: bool = False, side: str = "query") -> pl.LazyFrame:
    """images: whether the export carries image parts and an `images` column (False when no exported query
    has an image; run() decides, over the whole export, so that every part file has the same columns).
    side="target": target-side preference pairs (the prompt is the target, the completions its rationales)."""
    rows = (
        preference_pairs(as_side(lf, side), text_only)
        .with_columns(_candidate("chosen").alias("_chosen"))
        .explode("rejected")
        .with_columns(_candidate("rejected").alias("_rejected"))
        .with_columns(
            pl.col("_chosen").struct.field("text").alias("_chosen_text"),
            pl.col("_rejected").struct.field("text").alias("_rejected_text"),
            pl.col("_chosen").struct.field("delta").alias("delta_chosen"),
            pl.col("_rejected").struct.field("delta").alias("delta_rejected"),
        )
        # select.py lists as rejected only valid candidates with delta <= 0, never the chosen one; the checks
        # are repeated here so that the export's promise does not rest on another file
        .filter((pl.col("rejected") != pl.col("chosen")) & (pl.col("delta_rejected") <= 0.0)
                & (pl.col("delta_chosen") - pl.col("delta_rejected") >= min_gap)
                & (pl.col("delta_rejected") < pl.col("delta_chosen")))
    )
    has_image = pl.col("query_image_path").is_not_null()
    query = pl.col("query_text").fill_null("")
    if style == "conversational":
        prompt = _message("user", _user_content() if images else query)
        chosen, rejected = _assistant(pl.col("_chosen_text"), images), _assistant(pl.col("_rejected_text"), images)
    elif style == "standard":
        prompt = (pl.when(has_image & ~query.str.contains(IMAGE_MARKER, literal=True))
                  .then(pl.lit(IMAGE_MARKER + "\n") + query).otherwise(query)) + STANDARD_PROMPT_END
        chosen, rejected = pl.col("_chosen_text"), pl.col("_rejected_text")
    else:
        raise ValueError(f"preference style must be one of {PREFERENCE_STYLES}, not {style!r}")
    image_list = pl.when(has_image).then(pl.concat_list(pl.col("query_image_path"))).otherwise(
        pl.lit([], dtype=pl.List(pl.String)))
    return rows.select(
        prompt.alias("prompt"), chosen.alias("chosen"), rejected.alias("rejected"),
        *([image_list.alias("images")] if images else []),
        "delta_chosen", "delta_rejected",
        pl.col("chosen").alias("chosen_index"), pl.col("rejected").alias("rejected_index"),
        pl.col("_chosen").struct.field("generator").alias("chosen_generator"),
        pl.col("_rejected").struct.field("generator").alias("rejected_generator"),
        "pair_id", "subset",
    )


def _side_rationale(side: str) -> pl.Expr:
    """The chosen rationale of one side where that side's decision is reason, else null."""
    if side == "query":
        return pl.when(pl.col("decision") == REASON).then(_candidate("chosen").struct.field("text"))
    chosen = pl.col("target_candidates").list.get(pl.col("target_chosen"), null_on_oob=True)
    return pl.when(pl.col("target_decision") == REASON).then(chosen.struct.field("text"))


def contrastive(lf: pl.LazyFrame, rationale_mode: str = "append", rationale_side: str = "query") -> pl.LazyFrame:
    if rationale_mode not in RATIONALE_MODES:
        raise ValueError(f"rationale_mode must be one of {RATIONALE_MODES}, not {rationale_mode!r}")
    if rationale_side not in RATIONALE_SIDES:
        raise ValueError(f"rationale_side must be one of {RATIONALE_SIDES}, not {rationale_side!r}")
    explicit = pl.col("negatives").list.filter(pl.element().struct.field("origin") == "explicit").list.first()
    rationale = _side_rationale("query")
    pos_rationale = _side_rationale("target")
    query = pl.col("query_text").fill_null("")
    target = pl.col("target_text").fill_null("")
    on_query = rationale_side in ("query", "both")
    on_target = rationale_side in ("target", "both")
    qry, pos = query, target
    if rationale_mode == "append":
        if on_query:
            qry = pl.when(rationale.is_not_null()).then(query + RATIONALE_SEPARATOR + rationale).otherwise(query)
        if on_target:
            pos = pl.when(pos_rationale.is_not_null()).then(target + RATIONALE_SEPARATOR + pos_rationale).otherwise(target)
    columns = [
        qry.alias("qry"),
        pl.col("query_image_path").fill_null("").alias("qry_image_path"),
        pos.alias("pos_text"),
        pl.col("target_image_path").fill_null("").alias("pos_image_path"),
        explicit.struct.field("text").fill_null("").alias("neg_text"),
        explicit.struct.field("image_path").fill_null("").alias("neg_image_path"),
        "pair_id", "subset", "decision", "need_reasoning",
    ]
    if on_target:
        columns += ["target_decision", "target_need_reasoning"]
    if rationale_mode == "column":
        if on_query:
            columns.append(rationale.alias("rationale"))
        if on_target:
            columns.append(pos_rationale.alias("pos_rationale"))
    return lf.select(columns)


def gate(lf: pl.LazyFrame, include_undecided: bool = False, sides: str = "query") -> pl.LazyFrame:
    """sides="query": one row per pair (the query's decision). sides="both": one row per (pair, side), the
    unit an inference-time gate decides on, with a `side` column; the target rows carry the target side's
    decision, need_reasoning and best_delta (pairs without target candidates give no target row)."""
    if sides not in GATE_SIDES:
        raise ValueError(f"sides must be one of {GATE_SIDES}, not {sides!r}")
    texts = [pl.col(c).fill_null("") for c in ("query_text", "query_image_path", "target_text", "target_image_path")]
    label = ("decision", "need_reasoning", "best_delta")
    query = lf.select("pair_id", "subset", *texts, *label, "s_direct", "scoring_mode")
    if sides == "both":
        target = (lf.filter(pl.col("target_decision").is_not_null())
                  .select("pair_id", "subset", *texts, *(pl.col(f"target_{c}").alias(c) for c in label),
                          "s_direct", "scoring_mode"))
        query = pl.concat([query.with_columns(pl.lit("query").alias("side")),
                           target.with_columns(pl.lit("target").alias("side"))]).sort("pair_id", "side")
    return query if include_undecided else query.filter(pl.col("decision") != UNDECIDED)


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


def _query(fmt: str, lf: pl.LazyFrame, opts: dict) -> pl.LazyFrame:
    if fmt == "preference":
        return preference(lf, opts["preference_style"], opts["images"], opts["min_gap"], opts["text_only"],
                          opts["side"])
    if fmt == "contrastive":
        return contrastive(lf, opts["rationale_mode"], opts["rationale_side"])
    if fmt == "gate":
        return gate(lf, opts["include_undecided"], opts["gate_sides"])
    raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")


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
        lf = _query(fmt, lf, opts)
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
    if fmt == "contrastive":
        filters["rationale_mode"] = rationale_mode
        if rationale_side != "query":
            filters["rationale_side"] = rationale_side
    if fmt == "preference":
        filters.update(preference_style=preference_style, min_gap=min_gap, text_only=text_only,
                       images=opts["images"])
        if side != "query":
            filters["side"] = side
    if fmt == "gate":
        filters["include_undecided"] = include_undecided
        if gate_sides != "query":
            filters["sides"] = gate_sides
    result = {"format": fmt, "out": str(dest), "files": [str(p) for p in kept], "rows": rows, "pairs": pairs,
              "filters": filters}
    (dest / "README.md").write_text(_readme(fmt, out_dir, filters, result))
    print(f"{fmt}: {rows} rows from {pairs} pairs -> {dest} ({len(kept)} file(s))")
    return result
