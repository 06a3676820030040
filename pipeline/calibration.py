"""The decoy rule's last phase (stages/calibrate.py): the job's pairs are labelled only once every shard is scored.

Under the decoy rule a pair's decision depends on its calibration group's margin, and the group spans the whole
job. So the Ray Data plan commits each shard *scored* (every column but the decisions) into OUT/_scored/, as
stages/write.py:commit_shard commits any shard (data, quarantine, commit record). Once every shard of the plan is
scored, the driver computes the calibration over all of them (one margin per side and group, from the null_score
column alone: `job_calibration`) and labels each scored shard into OUT/data/ (stages/write.py:label_shard: the
decisions filled, the quarantine file copied, a commit record like every shard's). OUT/_scored/ goes when the job
ends.

Exactly once, and the same bytes after any crash: a resume keeps the scored shards whose files match their records
(pipeline/output_dir.py), scores the others, and labels every shard scored but not labelled. The calibration reads
each shard's null scores from its labelled file where it has one and from its scored file otherwise: the same
values, so a shard redone after the job ended (a damaged file) gets the labels it had.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable, Optional

from omegaconf import DictConfig

from pipeline.config import to_dict
from stages.calibrate import calibrate, margin_lookup, output_scores, win_chance
from stages.decoys import decoy_counts, required
from stages import layout
from stages.files import read_commit_record
from stages.select import label_rows
from stages.write import label_shard

log = logging.getLogger("pairsel")


def decoy_rule(cfg: DictConfig) -> bool:
    return cfg.scoring.decision.rule == "decoys"


def commit_dir(cfg: DictConfig) -> str:
    """Where the Ray Data plan commits its shards: the output dir, or under the decoy rule OUT/_scored/."""
    return str(Path(cfg.output.dir) / layout.SCORED) if decoy_rule(cfg) else cfg.output.dir


def job_calibration(cfg: DictConfig, out_dir: Path, shard_ids: list[int]) -> list[dict]:
    """The calibration over every pair of the job's shards (stages/calibrate.py), each shard's null scores read
    from its labelled file, else its scored one."""
    files = []
    for shard_id in shard_ids:
        for folder in (out_dir, out_dir / layout.SCORED):
            record = read_commit_record(folder, shard_id)
            if record is not None:
                if record["path"]:
                    files.append(str(folder / record["path"]))
                break
        else:
            raise RuntimeError(f"shard {shard_id} is neither scored nor labelled: the calibration needs every shard")
    import polars as pl

    return calibrate_job(cfg, output_scores(pl.scan_parquet(files), cfg.scoring.decision.group) if files else ())


def calibrate_job(cfg: DictConfig, scores: Iterable[tuple[str, str, Optional[float]]]) -> list[dict]:
    """The job's calibration (stages/calibrate.py: one record per side and group) from its pairs' null scores
    (row_scores of rows in memory, output_scores of output shards), under the job's decision rule."""
    rule = cfg.scoring.decision
    return calibrate(scores, rule.fdr, win_chance(to_dict(cfg)["generators"], rule.decoys_per_candidate))


def labeller(cfg: DictConfig, calibration: list[dict]) -> Callable[[list[dict]], None]:
    """rows -> their decisions filled in place (stages/select.py:label_rows with the calibration's margins)."""
    rule = cfg.scoring.decision
    margins = margin_lookup(calibration, rule.group)
    need = required(decoy_counts(to_dict(cfg)["generators"], rule.decoys_per_candidate))
    epsilon = float(cfg.scoring.epsilon)
    return lambda rows: label_rows(rows, epsilon, margins, need)


def label_scored_shards(cfg: DictConfig, specs: list[dict], submit=None) -> int:
    """Label every shard of the plan that is scored and not labelled yet; returns how many. submit: run each
    label_shard call as a Ray task (pipeline/run.py passes one while its Ray is up), else in this process."""
    if not decoy_rule(cfg):
        return 0
    out_dir = Path(cfg.output.dir)
    shard_ids = [s["shard_id"] for s in specs]
    todo = [i for i in shard_ids if read_commit_record(out_dir, i) is None]
    if not todo:
        return 0
    calibration = job_calibration(cfg, out_dir, shard_ids)
    labels = labeller(cfg, calibration)
    args = [(str(out_dir), shard_id, str(out_dir / layout.SCORED), labels, cfg.output.compression) for shard_id in todo]
    if submit is None:
        for a in args:
            label_shard(*a)
    else:
        submit(label_shard, args)
    log.info("labelled %d shards under the decoy rule (%s)", len(todo), "; ".join(
        f"{c['side']} side, {c['group']}: " + ("no pair reason" if c["margin"] is None else
                                               f"margin {c['margin']:.4g}, estimated FDR {c['fdr_estimate']:.3f}")
        for c in calibration))
    return len(todo)
