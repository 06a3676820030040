"""The output folder: what pairsel may write and delete there, and getting it ready for a fresh run or a resume.

A user's files are sacred: output.dir must be new, empty or a pairsel output (its marker: _commits/job.json or
a manifest of its own), and pairsel deletes there only what it writes itself (stages/layout.py: its own folders and files, shard
files); --overwrite too. A resume keeps the committed shards whose files are as their commit records say
(pipeline/verify.py), redoes the others, and deletes only what a dead run staged or left uncommitted
(pipeline/run.py says why that is exactly once).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path

import yaml
from omegaconf import DictConfig

from pipeline import card, manifest
from pipeline.config import RELABEL_KEYS, ConfigError, config_hash, label_config
from pipeline.verify import Depth, Problem, check_records, read_commit_records, read_json
from schemas import SCHEMA_VERSION
from stages import layout
from stages.files import SHARD_FILE, SHARD_GLOB, TEMP_SHARD_FILE, atomic_write_json, commit_record_path

log = logging.getLogger("pairsel")


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


def _config_changes(old: dict, new: dict) -> dict[str, tuple]:
    """The flat keys (`generators[0].k`) whose values differ, in key order: (old value, new value), '<unset>' where
    one side lacks the key."""
    a, b = _flatten(old), _flatten(new)
    return {k: (a.get(k, "<unset>"), b.get(k, "<unset>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def plan_fingerprint(specs: list[dict]) -> dict:
    """What the shard plan is made of: a changed input (rows added, removed or rewritten) changes it."""
    cut = [[s["source"], s["start"], s["stop"], s["offset"]] for s in specs]
    return {"shards": len(specs), "sha256": hashlib.sha256(json.dumps(cut).encode()).hexdigest()[:16]}


# What pairsel writes into an output dir (stages/layout.py), and so the only things it ever deletes there. Anything
# else (a user's notes, another tool's files) is left alone, and a non-empty folder without pairsel's marker is
# refused.
JOB_RECORD = Path(layout.JOB_RECORD)


def is_pairsel_output(out_dir: Path) -> bool:
    """pairsel's marker: the job record it writes before anything else, or a manifest of its own."""
    for path, key in ((out_dir / JOB_RECORD, "label_config"), (out_dir / layout.MANIFEST, "pairsel_version")):
        try:
            if key in json.loads(path.read_text()):
                return True
        except (OSError, ValueError, TypeError):
            continue
    return False


def is_pairsel_card(path: Path) -> bool:
    """OUT/README.md as pipeline/card.py writes it (front matter tagged pairsel), not a README of the user's."""
    try:
        text = path.read_text(encoding="utf-8")
        if not text.startswith("---\n"):
            return False
        meta = yaml.safe_load(text[4:text.index("\n---\n")])
        return isinstance(meta, dict) and "pairsel" in (meta.get("tags") or [])
    except (OSError, ValueError, yaml.YAMLError):
        return False


def check_output_dir(out_dir: Path) -> None:
    """output.dir is new, empty, or a pairsel output: pairsel never writes over, nor deletes, a user's files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output.dir: {out_dir} is a file, not a folder")
    if not out_dir.is_dir() or is_pairsel_output(out_dir):
        return
    found = sorted(p.name for p in out_dir.iterdir())
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ConfigError(f"output.dir: {out_dir} is not empty ({shown}) and is not a pairsel output; pairsel "
                          "writes only into a new or empty folder or its own output, whatever the flags: "
                          "choose another output.dir")


def _shard_files(out_dir: Path, keep: set[int] = frozenset()):
    """pairsel's shard files (and their temporary names) in data/ and quarantine/, but those of `keep`."""
    for sub in layout.SHARD_FOLDERS:
        for f in sorted((out_dir / sub).glob(f"*{SHARD_GLOB}")):
            m = SHARD_FILE.fullmatch(f.name)
            if (m and int(m[1]) not in keep) or TEMP_SHARD_FILE.fullmatch(f.name):
                yield f


def remove_own_output(out_dir: Path, cache_dir: str | None) -> None:
    """--overwrite: delete what pairsel wrote in out_dir, and nothing else. The job record goes last, so that a
    removal cut short still leaves a folder that pairsel recognises as its own."""
    if not out_dir.is_dir():
        return
    for f in _shard_files(out_dir):
        f.unlink()
    for sub in layout.SHARD_FOLDERS:
        with contextlib.suppress(OSError):  # kept if it holds anything else
            (out_dir / sub).rmdir()
    folders = [out_dir / name for name in layout.OWN_FOLDERS]
    if cache_dir is not None and Path(cache_dir).resolve().is_relative_to(out_dir.resolve()):
        folders.append(Path(cache_dir))  # the embedding cache, where it lives in the output
    for folder in folders:
        if folder.resolve() != out_dir.resolve():
            shutil.rmtree(folder, ignore_errors=True)
    for name in layout.OWN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    if is_pairsel_card(out_dir / layout.CARD):
        (out_dir / layout.CARD).unlink()
    commits = out_dir / layout.COMMITS
    for f in sorted(commits.glob(f"{SHARD_GLOB}.json")) + sorted(commits.glob(".*.tmp")):
        f.unlink()
    (out_dir / JOB_RECORD).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        commits.rmdir()


def _keep_committed(folder: Path) -> tuple[set[int], list[Problem]]:
    """The shards committed in `folder` (the output dir, or the scored shards' OUT/_scored) whose files match their
    records; the record of any other goes (first, so that a crash now still redoes it), and so do the shard files
    that no kept record names."""
    records, unreadable = read_commit_records(folder)
    damaged = unreadable + [p for found in check_records(folder, records, Depth.RESUME).values() for p in found[:1]]
    for problem in damaged:
        commit_record_path(folder, problem.shard_id).unlink(missing_ok=True)
    kept = {r["shard_id"] for r in records} - {p.shard_id for p in damaged}
    for f in _shard_files(folder, keep=kept):
        f.unlink()
    return kept, damaged


def _relabel_hint(out_dir: Path, changes: dict[str, tuple]) -> str:
    """Where a finished job and this config differ only in keys that `pairsel relabel` changes (_config_changes):
    the command that writes the job under this config without running a model."""
    if not changes or not set(changes) <= set(RELABEL_KEYS):
        return ""
    finished, _ = read_json(out_dir / layout.MANIFEST)
    if (finished or {}).get("status") != "complete":
        return ""
    keys = " ".join(f"{k}={now}" for k, (_, now) in changes.items())
    return f", or write the job under this config without running a model: pairsel relabel {out_dir} NEW_DIR {keys}"


def prepare_output(out_dir: Path, cfg: DictConfig, overwrite: bool, force: bool,
                   input_plan: dict | None = None) -> tuple[set[int], set[int], list[str]]:
    """Make out_dir ready; return the shard ids already committed there (resume is the default), those scored and
    waiting for their labels (the decoy rule: pipeline/calibration.py), and one line for each committed shard that
    is redone because its files differ from its commit record. input_plan: the plan's plan_fingerprint, which a
    resume must find unchanged."""
    check_output_dir(out_dir)
    if overwrite:
        remove_own_output(out_dir, cfg.embedder.cache_dir)
    commits = out_dir / layout.COMMITS
    commits.mkdir(parents=True, exist_ok=True)
    job = out_dir / JOB_RECORD
    current = {"label_config": label_config(cfg), "config_hash": config_hash(cfg), "schema_version": SCHEMA_VERSION}
    if input_plan is not None:
        current["input_plan"] = input_plan
    if job.exists():
        previous = json.loads(job.read_text())
        written = previous.get("schema_version", 1)  # records before this key were all version 1
        if written != SCHEMA_VERSION:  # not even --force: one output holds one schema version
            raise ConfigError(f"output.dir: holds shards of schema version {written} and this pairsel writes "
                              f"version {SCHEMA_VERSION}; use --overwrite to start afresh, or another output.dir")
        changes = _config_changes(previous["label_config"], current["label_config"])
        diff = [f"{k}: {was!r} -> {now!r}" for k, (was, now) in changes.items()]
        input_changed = input_plan is not None and previous.get("input_plan", input_plan) != input_plan
        if input_changed:
            old, new = previous["input_plan"], current["input_plan"]
            diff.append(f"input plan: {old['shards']} shards ({old['sha256']}) -> {new['shards']} shards "
                        f"({new['sha256']}); the input files changed")
        if diff and not force:
            hint = "" if input_changed else _relabel_hint(out_dir, changes)  # relabel keeps the job's input
            raise ConfigError(
                "output.dir: holds a run made with a different label config or input; use --overwrite to start "
                f"afresh or --force to resume anyway{hint}. Changed:\n  " + "\n  ".join(diff)
            )
        if diff:  # forced: the pair_id index was made from the old input
            shutil.rmtree(out_dir / layout.INDEX, ignore_errors=True)
    if not job.exists() or force:
        atomic_write_json(current, job)

    # A committed shard is kept only as committed: its files there, with the size, sha256, rows and schema version
    # of its record. Any other is redone. Parts of unfinished shards and shard files never committed are leftovers
    # of a crash; nothing else is.
    committed, damaged = _keep_committed(out_dir)
    scored, damaged_scored = _keep_committed(out_dir / layout.SCORED)
    shutil.rmtree(out_dir / layout.STAGING, ignore_errors=True)
    lines = [f"shard {p.shard_id} is redone: {p.line()}" for p in damaged]
    lines += [f"shard {p.shard_id} is scored again: {layout.SCORED}/{p.line()}" for p in damaged_scored
              if p.shard_id not in committed]
    return committed, scored - committed, lines


def finish_output(out_dir: Path, cfg: DictConfig, started_at: str, wall_seconds: float, planned_shards: int) -> dict:
    """Once every shard is committed: the manifest, the dataset card (never over a README.md of the user's), and
    the job's working folders gone, the labelled shards holding everything the scored ones did. Returns the
    manifest."""
    result = manifest.build(out_dir, cfg, started_at, wall_seconds, planned_shards=planned_shards)
    manifest.write(out_dir, result)
    if (out_dir / layout.CARD).exists() and not is_pairsel_card(out_dir / layout.CARD):
        log.warning("%s/README.md is not pairsel's dataset card: left as it is, no card written", out_dir)
    else:
        card.write_card(str(out_dir), result)
    for folder in (layout.STAGING, layout.SCORED):
        shutil.rmtree(out_dir / folder, ignore_errors=True)
    return result
