"""Run a job: prepare the output dir (resume or overwrite), start Ray, find the pair_ids repeated across
shards, drive the plan of pipeline/plan.py, commit each shard once all its rows are written, and write the
manifest.

Exactly once: a shard is done when its commit record is (stages/write.py). A rerun into the same output dir,
after any crash, keeps the committed shards, deletes everything else a dead run left, and redoes only the
missing shards; seeds derive from pair_id and the embedder is batch-invariant, so a redone shard is the same,
bit for bit, as in a run that never died.

Only small per-part records reach the driver, never rows; what it holds grows with the number of shards (a few
hundred bytes each), not with the rows.
"""
from __future__ import annotations

import hashlib
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
from stages import faults
from stages.read import find_duplicates, index_pair_ids, plan_shards
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


def plan_fingerprint(specs: list[dict]) -> dict:
    """What the shard plan is made of: a changed input (rows added, removed or rewritten) changes it."""
    cut = [[s["source"], s["start"], s["stop"], s["offset"]] for s in specs]
    return {"shards": len(specs), "sha256": hashlib.sha256(json.dumps(cut).encode()).hexdigest()[:16]}


def prepare_output(out_dir: Path, cfg: DictConfig, overwrite: bool, force: bool,
                   specs: list[dict] | None = None) -> set[int]:
    """Make out_dir ready and return the shard ids already committed there (resume is the default)."""
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    commits = out_dir / "_commits"
    commits.mkdir(parents=True, exist_ok=True)
    job = commits / "job.json"
    current = {"label_config": label_config(cfg), "config_hash": config_hash(cfg)}
    if specs is not None:
        current["input_plan"] = plan_fingerprint(specs)
    if job.exists():
        previous = json.loads(job.read_text())
        diff = config_diff(previous["label_config"], current["label_config"])
        if specs is not None and previous.get("input_plan", current["input_plan"]) != current["input_plan"]:
            old, new = previous["input_plan"], current["input_plan"]
            diff.append(f"input plan: {old['shards']} shards ({old['sha256']}) -> {new['shards']} shards "
                        f"({new['sha256']}); the input files changed")
        if diff and not force:
            raise ConfigError(
                "output.dir: holds a run made with a different label config or input; use --overwrite to start "
                "afresh or --force to resume anyway. Changed:\n  " + "\n  ".join(diff)
            )
        if diff:  # forced: the pair_id index was made from the old input
            shutil.rmtree(out_dir / "_index", ignore_errors=True)
    if not job.exists() or force:
        atomic_write_json(current, job)

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
    fault_env = faults.forwarded_env()  # empty unless a fault test set PAIRSEL_FAULT
    if address:
        # Inside `ray job submit` the working dir is already shipped; from a plain driver, ship this repo.
        runtime_env = {}
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # set by Ray for a submitted job's driver
            runtime_env = {"working_dir": str(REPO_ROOT),
                           "excludes": [".venv/", ".git/", "out/", "models/", "data/", "**/__pycache__/"]}
        if fault_env:
            runtime_env["env_vars"] = fault_env
        ray.init(address=address, runtime_env=runtime_env or None, log_to_driver=True)
    else:
        _init_local_ray({"env_vars": {"PYTHONPATH": str(REPO_ROOT), **fault_env}})


def _init_local_ray(runtime_env: dict) -> None:
    """A Ray inside this process, every server of it listening on 127.0.0.1 only.

    Ray 2.60 turns a node address of 127.0.0.1 into the machine's address (services.resolve_ip_for_localhost)
    unless cluster support is off (ray_constants.ENABLE_RAY_CLUSTER, which RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
    sets at import), and its servers listen on all interfaces unless the node address is the loopback one. A
    Ray started by this process has no other node: cluster support goes off while it starts, so the node keeps
    127.0.0.1, then back to what it was (the node address is fixed once Ray runs).
    """
    from ray._private import ray_constants

    cluster_support = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", runtime_env=runtime_env)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_support


# ---------------------------------------------------------------- duplicates across shards
def _find_duplicates_after(index_dir: str, dest: str, *indexed: int) -> dict:
    """find_duplicates, run once the index tasks whose results it is given have run."""
    return {"path": dest, "rows": find_duplicates(index_dir, dest)}


def start_duplicate_index(cfg: DictConfig, specs: list[dict], out_dir: Path) -> ray.ObjectRef | None:
    """Start finding the rows whose pair_id an earlier shard holds (stages/read.py), and return at once a
    reference to {"path": the file that lists them, "rows": how many}; None when one shard is all there is.

    It runs as tasks beside the job rather than before it: the model actors load their models meanwhile
    (minutes for a large model on a cluster), and only the read tasks wait for it. Each shard's pair_ids are
    read once per output dir (kept in _index/pair_ids/); the comparison is one task."""
    if len(specs) < 2:
        return None
    keys = out_dir / "_index" / "pair_ids"
    keys.mkdir(parents=True, exist_ok=True)
    missing = [s for s in specs if not (keys / f"shard-{s['shard_id']:06d}.parquet").is_file()]
    task = {"num_cpus": cfg.ray.read_num_cpus, "max_retries": -1}
    index = ray.remote(**task)(index_pair_ids)
    input_cfg = to_dict(cfg)["input"]
    groups = min(len(missing), 256)  # at most this many index tasks, so that the last task waits on few refs
    indexed = [index.remote(missing[i::groups], input_cfg, str(keys)) for i in range(groups)]
    return ray.remote(**task)(_find_duplicates_after).remote(
        str(keys), str(out_dir / "_index" / "duplicates.parquet"), *indexed)


def drive(ds: ray.data.Dataset, cfg: DictConfig, specs: list[dict]) -> int:
    """Consume the part records; commit each shard as soon as all of its rows are on disk."""
    commit = ray.remote(num_cpus=cfg.ray.write_num_cpus)(commit_shard)
    todo = {s["shard_id"] for s in specs}
    pending: dict[int, dict] = {}  # shards with some rows on disk
    in_flight, committed = [], 0
    for meta in ds.iter_rows():
        shard_id = meta["shard_id"]
        if shard_id not in todo:
            raise RuntimeError(f"shard {shard_id}: rows arrived for a shard that is not to do (or done already)")
        shard = pending.setdefault(shard_id, {"parts": [], "quarantine_parts": [], "rows": 0})
        shard["rows"] += meta["rows"] + meta["quarantine_rows"]
        if meta["part"]:
            shard["parts"].append(meta["part"])
        if meta["quarantine_part"]:
            shard["quarantine_parts"].append(meta["quarantine_part"])
        if shard["rows"] > meta["shard_size"]:
            raise RuntimeError(f"shard {shard_id}: {shard['rows']} rows written for {meta['shard_size']} read; "
                               "not committed, rerun to redo it")
        if shard["rows"] == meta["shard_size"]:
            in_flight.append(commit.remote(cfg.output.dir, shard_id, shard["parts"], shard["quarantine_parts"],
                                           cfg.output.compression, meta["shard_size"]))
            del pending[shard_id]
            todo.discard(shard_id)
            done, in_flight = ray.wait(in_flight, num_returns=len(in_flight), timeout=0)
            committed += len(ray.get(done))  # raises if a commit failed
    if pending:
        shard_id = min(pending)
        raise RuntimeError(f"shard {shard_id}: only {pending[shard_id]['rows']} rows written; rerun to resume")
    for shard_id in sorted(todo):  # read no rows at all: an empty shard is committed as such
        in_flight.append(commit.remote(cfg.output.dir, shard_id, [], [], cfg.output.compression))
    return committed + len(ray.get(in_flight))


def run(cfg: DictConfig, address: str | None = None, overwrite: bool = False, force: bool = False) -> dict:
    t0 = time.monotonic()
    started_at = manifest.now_iso()
    out_dir = Path(cfg.output.dir)
    specs = plan_shards(to_dict(cfg)["input"])
    committed = prepare_output(out_dir, cfg, overwrite, force, specs)
    todo = [s for s in specs if s["shard_id"] not in committed]
    log.info("%d shards planned, %d already committed, %d to do", len(specs), len(committed), len(todo))
    if todo:
        init_ray(address)
        try:
            duplicates = start_duplicate_index(cfg, specs, out_dir)
            drive(build_dataset(cfg, todo, duplicates), cfg, todo)
            if duplicates is not None:
                log.info("%d rows repeat a pair_id that an earlier shard holds", ray.get(duplicates)["rows"])
        except Exception as e:
            log.error("the job failed (%s: %s) with %d of %d shards committed in %s; committed shards are kept: "
                      "rerun the same command to finish the rest", type(e).__name__, str(e)[:300],
                      len(manifest.commit_records(out_dir)), len(specs), out_dir)
            raise
    result = manifest.build(out_dir, cfg, started_at, time.monotonic() - t0, planned_shards=len(specs))
    manifest.write(out_dir, result)
    card.write_card(str(out_dir), result)
    shutil.rmtree(out_dir / "_staging", ignore_errors=True)
    return result
