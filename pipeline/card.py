"""The dataset card, OUT/README.md, written by the job once the manifest is final.

Its YAML front matter makes OUT a Hugging Face dataset folder: `datasets.load_dataset(OUT)` reads
data/*.parquet as the train split (and skips quarantine/ and the "_" bookkeeping folders). The body is
built from the manifest alone, so the card says exactly what the job recorded.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.export_formats import format_docs
from pipeline.report_numbers import percent
from schemas import SCHEMA_VERSION
from stages import layout
from stages.files import atomic_write_text

FRONT_MATTER = {
    "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}],
    # The rows inherit the licenses of the input data and of the generator models' outputs.
    "license": "other",
    "license_name": "inherited-from-sources",
    "task_categories": ["feature-extraction", "sentence-similarity"],
    "tags": ["multimodal", "embedding", "retrieval", "rationale", "reasoning", "preference", "pairsel"],
    "pretty_name": "pairsel: reasoning-selected multimodal embedding pairs",
}


def front_matter() -> str:
    return "---\n" + yaml.safe_dump(FRONT_MATTER, sort_keys=False, allow_unicode=True) + "---\n"


def _rate(x) -> str:
    return percent(x)


def _md(x) -> str:
    return str(x).replace("|", "\\|")


def _calibration_lines(rule: dict) -> list[str]:
    """Under the decoy rule: each side and calibration group's margin and estimated false-discovery rate."""
    if rule.get("rule") != "decoys" or not rule.get("calibration"):
        return []

    def margin(c: dict) -> str:
        return "none (no pair reason)" if c["margin"] is None else f"{c['margin']:.4g}"

    return ["| side | group | tested pairs | reason | margin | estimated FDR |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
            *(f"| {c['side']} | {_md(c['group'])} | {c['pairs']} | {c['reason']} | {margin(c)} |"
              f" {_rate(c['fdr_estimate'])} |" for c in rule["calibration"]),
            ""]


def body(manifest: dict) -> str:
    counts = manifest.get("counts") or {}
    subsets = manifest.get("subsets") or {}
    generators = manifest.get("generators") or {}
    embedder = manifest.get("embedder") or {}
    scoring = (manifest.get("config") or {}).get("scoring") or {}
    rule = manifest.get("decision") or {}
    lines = [
        "# pairsel output",
        "",
        "Multimodal (query, target) pairs for training embedding models, each with K candidate rationales from",
        "one or more MLLM generators. Every rationale r_k is scored by how much appending it to the query moves",
        "the query's embedding towards its target: delta_k = s(q + r_k, t+) - s(q, t+) (cosine mode) or the",
        "change of log p(t+ | x) under a softmax over the target and negatives (pair_aware mode). Each pair",
        "has one of three outcomes (`decision`): **reason** (a rationale helps: its delta > the pair's",
        "`help_threshold`; `need_reasoning` true), **direct** (reasoning was tested and no rationale helps;",
        "`need_reasoning` false) or **undecided** (reasoning was never tested: no valid candidate, or too few",
        "decoys; `need_reasoning` null).",
        "",
        f"Decision rule: {rule.get('promise', '?')}.",
        "",
        f"- status: **{manifest.get('status', 'unknown')}**, finished {manifest.get('finished_at', '?')}"
        f" ({manifest.get('wall_seconds', '?')} s)",
        f"- pairs written: **{counts.get('pairs_written', '?')}** of {counts.get('pairs_read', '?')} read;"
        f" quarantined: {counts.get('pairs_quarantined', '?')}",
        f"- outcomes: reason {counts.get('need_reasoning', '?')} ({_rate(counts.get('need_reasoning_rate'))}),"
        f" direct {counts.get('direct', '?')} ({_rate(counts.get('direct_rate'))}),"
        f" undecided {counts.get('undecided', '?')} ({_rate(counts.get('undecided_rate'))});"
        f" turned from reason to direct by the control: {counts.get('control_turned_direct', '?')},"
        f" by the decoys: {counts.get('null_turned_direct', '?')}",
        f"- candidates: {counts.get('candidates', '?')}; tokens generated: {counts.get('tokens_generated', '?')}",
        f"- scoring: mode {scoring.get('mode', '?')}, epsilon {scoring.get('epsilon', '?')}, content-free controls:"
        f" {', '.join(repr(c) for c in scoring.get('controls') or []) or 'none'}",
        f"- config hash: `{manifest.get('config_hash', '?')}`; pairsel {manifest.get('pairsel_version', '?')};"
        f" schema version {manifest.get('schema_version', '?')}",
        "",
        "## Subsets",
        "",
        "| subset | pairs | reason | direct | undecided | turned direct by the control | by the decoys |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {_md(name)} | {s.get('pairs', '?')} | {s.get('need_reasoning', '?')} ({_rate(s.get('need_reasoning_rate'))}) |"
          f" {s.get('direct', '?')} ({_rate(s.get('direct_rate'))}) | {s.get('undecided', '?')} ({_rate(s.get('undecided_rate'))}) |"
          f" {s.get('control_turned_direct', '?')} | {s.get('null_turned_direct', '?')} |"
          for name, s in sorted(subsets.items())),
        "",
        *_calibration_lines(rule),
        "## Models",
        "",
        f"- embedder: `{_md(embedder.get('model', '?'))}` ({embedder.get('backend', '?')})",
        "",
        "| generator | backend | model | candidates | valid | chosen | chosen share | tokens |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        *(f"| {_md(name)} | {g.get('backend', '?')} | `{_md(g.get('model', '?'))}` | {g.get('candidates', '?')} |"
          f" {g.get('valid', '?')} | {g.get('chosen', '?')} | {_rate(g.get('chosen_share'))} | {g.get('tokens', '?')} |"
          for name, g in generators.items()),
        "",
    ]
    target = manifest.get("target_side")
    if target:  # generators[].k_target > 0
        lines += ["## Target side", "",
                  "Rationales about the target too: each pair's target side has its own decision (`target_decision`,",
                  "`target_chosen`, ...), and the joint choice (`joint_query`, `joint_target`, `joint_delta`) says",
                  "whether a rationale on both sides beats each side alone.", "",
                  "| subset | pairs | target reason | target direct | target undecided | pairs with a joint choice |"
                  " joint beats query side | joint beats target side | joint beats both |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
                  *(f"| {_md(name)} | {s['pairs']} | {s['need_reasoning']} ({_rate(s['need_reasoning_rate'])}) |"
                    f" {s['direct']} ({_rate(s['direct_rate'])}) | {s['undecided']} ({_rate(s['undecided_rate'])}) |"
                    f" {s['joint']['pairs_with_joint']} | {s['joint']['beats_query']} | {s['joint']['beats_target']} |"
                    f" {s['joint']['beats_both']} |"
                    for name, s in sorted(target["subsets"].items())),
                  ""]
    reasons = counts.get("quarantined_by_reason") or {}
    if reasons:
        lines += ["Quarantined rows by reason: " + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())), ""]
    lines += [
        "## Files",
        "",
        f"- `data/shard-NNNNNN.parquet`: one row per pair (schema version {SCHEMA_VERSION}, `schemas/` OUTPUT_SCHEMA):",
        "  the pair, its negatives, `candidates` (text, generator, tokens, finish_reason, s_k, delta,",
        "  delta_control, neg_delta, valid, ...), `s_direct`, `s_control`, `control_delta`, `decision`, `chosen`,",
        "  `best_delta`, `need_reasoning`, `rejected`, `decoys` (donor pair and candidate, s_k, s_neg, delta),",
        "  `base_threshold`, `null_score`, `null_margin`, `help_threshold`, `provenance`; with target rationales",
        "  (k_target > 0) also the same `target_` columns,",
        "  `target_candidates`, `target_s_control`, `target_decision`, `target_chosen`, `target_best_delta`,",
        "  `target_need_reasoning`, `target_rejected`, `joint_query`, `joint_target`, `joint_delta`,",
        "  `joint_beats_query`, `joint_beats_target`, and per query candidate `s_joint` and `delta_joint`",
        "- `quarantine/shard-NNNNNN.parquet`: rows that could not be processed, with a reason",
        "- `manifest.json`: the full resolved config, counts and per-shard checksums",
        "- image columns hold the paths the input gave (MMEB: relative to the job's `input.image_root`); images",
        "  that came as bytes (hf, webdataset inputs) have no path here",
        "",
        "## Loading",
        "",
        "```python",
        "import polars as pl",
        'pairs = pl.scan_parquet("OUT/data/*.parquet")          # lazy; filter before collecting',
        'need = pairs.filter(pl.col("decision") == "reason").collect()   # also "direct", "undecided"',
        "",
        "from datasets import load_dataset",
        'ds = load_dataset("parquet", data_files="OUT/data/*.parquet", split="train")',
        'ds = load_dataset("OUT", split="train")               # uses this card\'s configs',
        "```",
        "",
        "Exports for trainers: `pairsel export OUT --format {preference,contrastive,gate} --out DIR`.",
        "",
        "```text",
        format_docs().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_card(out_dir: str, manifest: dict) -> Path:
    """Write OUT/README.md (atomically) and return its path."""
    path = Path(out_dir) / layout.CARD
    atomic_write_text(path, front_matter() + "\n" + body(manifest))
    return path
