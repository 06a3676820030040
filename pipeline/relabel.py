"""`pairsel relabel OLD NEW [key=value ...]`: a finished job's pairs labelled again under other scoring settings,
without running a model.

Every score and label of an output recomputes from the similarities it stores (pipeline/verify.py recomputes
them to check a job). So the settings that act on those similarities alone (config.RELABEL_KEYS) may change after
the job: another false-discovery rate, one calibration group for the whole job, the cosine mode. NEW becomes a
pairsel output of its own, with a manifest and card, and with the shards and commit records that `pairsel run`
writes with OLD's config and these keys, byte for byte (tests/test_relabel.py), but that images an input carried
inline keep the paths of OLD's copies (OLD/_images/). OLD is only read. The other keys decided what OLD generated,
drew and embedded (candidates, decoys, controls, negatives), so they cannot change here, and a job run in rounds
cannot be relabelled at all: which pairs got more candidates followed from its labels.

Each of OLD's shards is recomputed by the job's own label stages (pipeline/verify.py:label_stages) and committed
into NEW as the Ray Data plan commits it (stages/write.py:commit_shard; under the decoy rule into NEW/_scored,
labelled once all are there: pipeline/calibration.py). So relabelling is exactly once per shard and resumable like
a run: rerunning the command keeps what NEW committed and does the rest.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import pyarrow.parquet as pq
from omegaconf import DictConfig

from pipeline import config
from pipeline.calibration import commit_dir, decoy_rule, label_scored_shards
from pipeline.errors import ConfigError
from pipeline.manifest import commit_records, now_iso
from pipeline.output_dir import finish_output, prepare_output
from pipeline.plan import provenance
from pipeline.verify import (DamagedOutput, Depth, check_records, config_hashes, label_stages, manifest_problems,
                             read_json, recompute)
from schemas import CALIBRATED_COLUMNS, OUTPUT_SCHEMA, SCHEMA_VERSION, conform
from stages import layout
from stages.files import atomic_copy, atomic_write_table, shard_file, shard_name
from stages.write import commit_shard, to_output_row

log = logging.getLogger("pairsel")


def load_config(old_dir: Path, new_dir: str, overrides: list[str]) -> DictConfig:
    """OLD's config (its manifest's) with the overrides, writing to new_dir; a ConfigError names the key or folder
    that stops it."""
    saved, why = read_json(old_dir / layout.MANIFEST)
    if saved is None:
        raise ConfigError(f"old_dir: {old_dir}: {why}; relabel reads a finished job's manifest")
    if saved.get("status") != "complete":
        raise ConfigError(f"old_dir: {old_dir}: the job has not finished (manifest status {saved.get('status')!r}); "
                          "rerun its command to finish it first")
    if saved.get("schema_version") != SCHEMA_VERSION:
        raise ConfigError(f"old_dir: {old_dir} holds shards of schema version {saved.get('schema_version')} and this "
                          f"pairsel writes version {SCHEMA_VERSION}")
    for item in overrides:
        key = item.partition("=")[0]
        if key not in config.RELABEL_KEYS:
            raise ConfigError(f"{key}: relabel changes only {', '.join(config.RELABEL_KEYS)}; the other keys "
                              "decided what the job generated and embedded: run the job with them")
    cfg = config.load(None, list(overrides), saved=saved["config"], files=False)  # no model nor input is read
    if cfg.rounds.k0 is not None:
        raise ConfigError("rounds.k0: the job ran in rounds, and which pairs got more candidates followed from its "
                          "labels: run it again to change them")
    cfg.output.dir = new_dir
    config.resolve_paths(cfg)
    return cfg


def relabel(old_dir: Path, cfg: DictConfig, overwrite: bool = False) -> dict:
    """Write NEW (cfg.output.dir) from OLD's shards; returns NEW's manifest. OLD must be whole (DamagedOutput)."""
    t0, started_at = time.monotonic(), now_iso()
    out, old = Path(cfg.output.dir).resolve(), old_dir.resolve()
    if out == old or out.is_relative_to(old) or old.is_relative_to(out):
        raise ConfigError(f"new_dir: {cfg.output.dir} {'is' if out == old else 'overlaps'} old_dir: relabel leaves the "
                          "job as it is and writes a new output beside it")
    records = commit_records(old_dir)
    saved, why = read_json(old_dir / layout.MANIFEST)
    damaged = manifest_problems(saved, why, records)  # e.g. a copy that lost its commit records
    damaged += [p for found in check_records(old_dir, records, Depth.RESUME).values() for p in found]
    if damaged:
        raise DamagedOutput(old_dir, damaged)
    job_hash = saved["config_hash"]
    for record in (r for r in records if r["path"]):
        hashes = config_hashes(pq.read_table(old_dir / record["path"], columns=["provenance"]))
        if hashes != {job_hash}:
            raise ConfigError(f"old_dir: {record['path']} was labelled under config {', '.join(sorted(hashes))}, not "
                              f"the job's {job_hash} (a resume with --force): its pairs are not all the job's config's")
    old_job, _ = read_json(old_dir / layout.JOB_RECORD)
    committed, scored, redone = prepare_output(out, cfg, overwrite, force=False,
                                               input_plan=(old_job or {}).get("input_plan"))
    for line in redone:
        log.info(line)
    stages = label_stages(config.to_dict(cfg))
    for record in records:
        if record["shard_id"] not in committed | scored:
            _relabel_shard(old_dir, record, cfg, stages)
    label_scored_shards(cfg, [{"shard_id": r["shard_id"]} for r in records])
    return finish_output(out, cfg, started_at, time.monotonic() - t0, planned_shards=len(records))


def _relabel_shard(old_dir: Path, record: dict, cfg: DictConfig, stages: list) -> None:
    """One of OLD's shards, its pairs recomputed under cfg, staged and committed into NEW as a run commits it."""
    out, shard_id = Path(cfg.output.dir), record["shard_id"]
    staging = out / layout.STAGING / shard_name(shard_id)
    staging.mkdir(parents=True, exist_ok=True)
    parts, quarantine_parts = [], []
    if record["path"]:
        _, again, _ = recompute(pq.read_table(old_dir / record["path"]), stages)
        stamp = provenance(cfg)
        rows = [to_output_row(row, stamp) for row in again.to_pylist()]
        if decoy_rule(cfg):  # as the plan scores a shard: the decisions wait for the job's calibration
            for row in rows:
                row.update(dict.fromkeys(CALIBRATED_COLUMNS))
        parts.append(str(staging / f"part-{shard_file(shard_id)}"))
        atomic_write_table(conform(rows, OUTPUT_SCHEMA), Path(parts[0]), cfg.output.compression)
    if record["quarantine_path"]:  # the quarantine follows from the input alone
        quarantine_parts.append(str(staging / f"quarantine-{shard_file(shard_id)}"))
        atomic_copy(old_dir / record["quarantine_path"], Path(quarantine_parts[0]))
    commit_shard(commit_dir(cfg), shard_id, parts, quarantine_parts, cfg.output.compression,
                 size=record["rows"] + record["quarantine_rows"], staging_dir=str(out / layout.STAGING))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("old_dir", help="output folder of a finished pairsel job (read only)")
    parser.add_argument("new_dir", help="where the relabelled output goes: a new or empty folder, or an unfinished "
                                        "relabel of the same job and keys to resume")
    parser.add_argument("overrides", nargs="*", help=f"key=value, of {', '.join(config.RELABEL_KEYS)}")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete what an earlier run wrote to new_dir (only pairsel's own files) and start afresh")
