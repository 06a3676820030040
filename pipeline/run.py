"""Run a job: prepare the output dir (resume or overwrite), start Ray, drive the plan of pipeline/plan.py,
commit each shard once all its rows are written, and write the manifest.

Only small per-part records reach the driver, never rows, so its memory does not grow with the input.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import ray
from omegaconf import DictConfig

from pipeline import card, manifest
from pipeline.config import REPO_ROOT, ConfigError, config_hash, label_config, to_dict
from pipeline.plan import build_dataset
from stages.read import plan_shards
from stages.write import atomic_write_json, commit_shard

log = logging.getLogger("pairsel")


# ---------------------------------------------------------------- output dir: resume, overwrite
def _flatten(d, prefix=""):
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(d, list):
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix[:-1]}[{i}]."))
        return out
    return {prefix[:-1]: d}


def config_diff(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def prepare_output(out_dir: Path, cfg: DictConfig, overwrite: bool, force: bool) -> set[int]:
    """Make out_dir ready and return the shard ids already committed there (resume is the default)."""
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    commits = out_dir / "_commits"
    commits.mkdir(parents=True, exist_ok=True)
    job = commits / "job.json"
    labels = label_config(cfg)
    if job.exists():
        previous = json.loads(job.read_text())
        diff = config_diff(previous["label_config"], labels)
        if diff and not force:
            raise ConfigError(
                "output.dir: holds a run made with a different label config; use --overwrite to start afresh "
                "or --force to resume anyway. Changed:\n  " + "\n  ".join(diff)
            )
    if not job.exists() or force:
        atomic_write_json({"label_config": labels, "config_hash": config_hash(cfg)}, job)

    committed = set()
    for record in manifest.commit_records(out_dir):
        files = [record[k] for k in ("path", "quarantine_path") if record[k]]
        if all((out_dir / f).is_file() for f in files):
            committed.add(record["shard_id"])
        else:  # a record without its files cannot be trusted: redo the shard
            (commits / f"shard-{record['shard_id']:06d}.json").unlink()
    # Parts of unfinished shards and files never committed are leftovers of a crash.
    shutil.rmtree(out_dir / "_staging", ignore_errors=True)
    for sub in ("data", "quarantine"):
        for f in (out_dir / sub).glob("*"):
            shard = f.name.split(".")[0]
            if not f.name.startswith("shard-") or int(shard.split("-")[1]) not in committed:
                f.unlink()
    return committed


# ---------------------------------------------------------------- Ray
def init_ray(address: str | None) -> None:
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        # Inside `ray job submit` the working dir is already shipped; from a plain driver, ship this repo.
        runtime_env = None
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # set by Ray for a submitted job's driver
            runtime_env = {"working_dir": str(REPO_ROOT),
                           "excludes": [".venv/", ".git/", "out/", "models/", "data/", "**/__pycache__/"]}
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})


def drive(ds: ray.data.Dataset, cfg: DictConfig, specs: list[dict]) -> int:
    """Consume the part records; commit each shard as soon as all of its rows are on disk."""
    commit = ray.remote(num_cpus=cfg.ray.write_num_cpus)(commit_shard)
    pending = {s["shard_id"]: {"parts": [], "quarantine_parts": [], "rows": 0, "size": None} for s in specs}
    futures = []
    for meta in ds.iter_rows():
        shard = pending[meta["shard_id"]]
        shard["size"] = meta["shard_size"]
        shard["rows"] += meta["rows"] + meta["quarantine_rows"]
        if meta["part"]:
            shard["parts"].append(meta["part"])
        if meta["quarantine_part"]:
            shard["quarantine_parts"].append(meta["quarantine_part"])
        if shard["rows"] == shard["size"]:
            futures.append(commit.remote(cfg.output.dir, meta["shard_id"], shard["parts"],
                                         shard["quarantine_parts"], cfg.output.compression))
            del pending[meta["shard_id"]]
    for shard_id, shard in sorted(pending.items()):
        if shard["size"] is None:  # the shard held no rows at all
            futures.append(commit.remote(cfg.output.dir, shard_id, [], [], cfg.output.compression))
        else:
            raise RuntimeError(f"shard {shard_id}: {shard['rows']} of {shard['size']} rows written; rerun to resume")
    ray.get(futures)
    return len(futures)


def run(cfg: DictConfig, address: str | None = None, overwrite: bool = False, force: bool = False) -> dict:
    t0 = time.monotonic()
    started_at = manifest.now_iso()
    out_dir = Path(cfg.output.dir)
    committed = prepare_output(out_dir, cfg, overwrite, force)
    specs = plan_shards(to_dict(cfg)["input"])
    todo = [s for s in specs if s["shard_id"] not in committed]
    log.info("%d shards planned, %d already committed, %d to do", len(specs), len(committed), len(todo))
    if todo:
        init_ray(address)
        drive(build_dataset(cfg, todo), cfg, todo)
    result = manifest.build(out_dir, cfg, started_at, time.monotonic() - t0, planned_shards=len(specs))
    manifest.write(out_dir, result)
    card.write_card(str(out_dir), result)
    shutil.rmtree(out_dir / "_staging", ignore_errors=True)
    return result
