"""The three export formats: what each holds (DOCS, for the README, the dataset card and each export's
README.md) and the lazy polars query that builds its rows from the output shards' rows.

Each format treats the three outcomes (stages/select.py) on purpose: preference rows come only from pairs
whose decision is reason (the chosen rationale helps); the gate export leaves undecided pairs out unless
include_undecided (their label is null: reasoning was never tested); the contrastive export keeps every pair
(the pair itself is good training data), attaches a rationale only where the decision is reason, and carries
`decision` so that a trainer can tell undecided pairs apart.
"""
from __future__ import annotations

import polars as pl

from stages.backends.prompt_text import IMAGE_MARKER  # MMEB's image placeholder; kept in contrastive/gate text
from stages.select import REASON, UNDECIDED
from stages.side import BY_NAME, QUERY, TARGET, Side

FORMATS = ("preference", "contrastive", "gate")
RATIONALE_MODES = ("append", "column")
SIDES = tuple(BY_NAME)  # preference --side: whose rationales the rows are about
RATIONALE_SIDES = ("query", "target", "both")  # contrastive --rationale-side: which side gets its rationale
GATE_SIDES = ("query", "both")  # gate --sides: the query's row per pair, or one row per (pair, side)
PREFERENCE_STYLES = ("conversational", "standard")
# How a chosen rationale is appended to the query in contrastive exports (rationale_mode="append"): the same
# shape as the embedder's default reasoned_query_instruction, "Query: {text}\nReasoning: {rationale}".
RATIONALE_SEPARATOR = "\nReasoning: "
# The standard-style preference prompt ends with the same separator, so that a trainer that joins prompt and
# completion (TRL's RewardTrainer, DPOTrainer's tokenization) sees "QUERY\nReasoning: RATIONALE": the two read
# apart, and exactly as the embedder saw the rationale.
STANDARD_PROMPT_END = RATIONALE_SEPARATOR

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


def as_side(lf: pl.LazyFrame, side: str) -> pl.LazyFrame:
    """The target side in the query side's column names, so that one preference query serves both: the
    target's candidates, label and content stand where the query's are (the prompt shows the target, the
    input the rationale is about; a target-only rationale does not depend on the query). The query side stands
    where it is."""
    if side not in BY_NAME:
        raise ValueError(f"side must be one of {SIDES}, not {side!r}")
    s = BY_NAME[side]
    return lf.with_columns(*(pl.col(s.column(c)).alias(c) for c in ("candidates", "chosen", "rejected", "decision",
                                                                     "best_delta", "need_reasoning")),
                           pl.col(s.text).alias("query_text"),
                           pl.col(s.image_path).alias("query_image_path"))


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


def _side_rationale(side: Side) -> pl.Expr:
    """The chosen rationale of one side where that side's decision is reason, else null."""
    chosen = pl.col(side.candidates).list.get(pl.col(side.column("chosen")), null_on_oob=True)
    return pl.when(pl.col(side.column("decision")) == REASON).then(chosen.struct.field("text"))


def contrastive(lf: pl.LazyFrame, rationale_mode: str = "append", rationale_side: str = "query") -> pl.LazyFrame:
    if rationale_mode not in RATIONALE_MODES:
        raise ValueError(f"rationale_mode must be one of {RATIONALE_MODES}, not {rationale_mode!r}")
    if rationale_side not in RATIONALE_SIDES:
        raise ValueError(f"rationale_side must be one of {RATIONALE_SIDES}, not {rationale_side!r}")
    explicit = pl.col("negatives").list.filter(pl.element().struct.field("origin") == "explicit").list.first()
    rationale = _side_rationale(QUERY)
    pos_rationale = _side_rationale(TARGET)
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


def format_rows(fmt: str, lf: pl.LazyFrame, opts: dict) -> pl.LazyFrame:
    """The rows of format `fmt` (one of FORMATS) from output rows, with export.run's options."""
    if fmt == "preference":
        return preference(lf, opts["preference_style"], opts["images"], opts["min_gap"], opts["text_only"],
                          opts["side"])
    if fmt == "contrastive":
        return contrastive(lf, opts["rationale_mode"], opts["rationale_side"])
    if fmt == "gate":
        return gate(lf, opts["include_undecided"], opts["gate_sides"])
    raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
