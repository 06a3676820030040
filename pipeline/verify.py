"""Whether an output folder is whole: every shard file as its commit record says, each shard there once, and every
label what the job's own stages compute from the stored similarities.

A commit record (stages/write.py) holds, for the shard's data file and its quarantine file, the path, rows, bytes
and sha256, and the schema version. Three users check files against it, each at its own depth (a `Depth`):

- a resume (pipeline/output_dir.py) keeps a committed shard only if `shard_problems` finds none at RESUME: the file
  exists, its size and sha256 match, and its Parquet footer has the recorded rows and schema version; any mismatch
  redoes the shard;
- `pairsel verify OUT` (`verify`) checks the whole folder at FULL (each file also decoded whole, and its labels
  recomputed), or with --quick at QUICK (sizes and sha256 only), against the manifest too;
- report, show and export (pipeline/read_output.py) refuse a damaged output (`check_readable`, at QUICK).

Labels are recomputed by the job's own stages, never by a copy of the rule: the steps of pipeline/plan.py:steps after
its last model step (the last Score step and the Select step), built from the config the run stored in
manifest.json, run over the stored rows turned back into the work schema (stages/write.py:to_work_table), and every
column their contracts write is compared with the stored one.
"""
from __future__ import annotations

import argparse
import enum
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from schemas import SCHEMA_VERSION
from stages import layout
from stages.files import SHARD_FILE, SHARD_GLOB, file_sha256, shard_file

SCHEMA_KEY = b"pairsel.schema_version"  # the Parquet footer key that names a shard's schema version


class Depth(enum.IntEnum):
    QUICK = 1  # the file exists, with the recorded size and sha256
    RESUME = 2  # and its footer holds the recorded rows and schema version
    FULL = 3  # and it decodes whole (and the labels of a data file recompute: `verify`)


@dataclass(frozen=True)
class Problem:
    where: str  # a path relative to the output folder, or "shard N"
    what: str
    shard_id: Optional[int] = None

    def line(self) -> str:
        return f"{self.where}: {self.what}"


class DamagedOutput(Exception):
    """An output whose committed files do not match their commit records: its readers refuse it, in one line."""

    def __init__(self, out_dir, problems: list[Problem]):
        more = {1: "", 2: " (and 1 more problem)"}.get(len(problems), f" (and {len(problems) - 1} more problems)")
        super().__init__(f"{out_dir} is damaged: {problems[0].line()}{more}; `pairsel verify {out_dir}` lists "
                         "every problem, and rerunning the job's command redoes the damaged shards")
        self.problems = problems


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


# ---------------------------------------------------------------- commit records and the manifest
COMMIT_FILE = re.compile(r"shard-(\d+)\.json")
RECORD_KEYS = ("shard_id", "path", "rows", "sha256", "quarantine_path", "quarantine_rows")


def read_commit_records(out_dir: Path) -> tuple[list[dict], list[Problem]]:
    """The commit records in _commits/, in shard order, and a problem for each one that does not read."""
    records, problems = [], []
    for path in sorted((Path(out_dir) / layout.COMMITS).glob(f"{SHARD_GLOB}.json")):
        named = COMMIT_FILE.fullmatch(path.name)
        if not named:
            continue
        shard_id = int(named[1])
        try:
            record = json.loads(path.read_text())
            if not isinstance(record, dict) or any(k not in record for k in RECORD_KEYS):
                raise ValueError("some of its keys are missing")
            if record["shard_id"] != shard_id:
                raise ValueError(f"it is the record of shard {record['shard_id']}")
            records.append(record)
        except (OSError, ValueError) as e:
            problems.append(Problem(f"{layout.COMMITS}/{path.name}", f"not a readable commit record ({_first_line(e)})",
                                    shard_id))
    return records, problems


def read_json(path: Path) -> tuple[Optional[dict], Optional[str]]:
    """A JSON file of pairsel's, or why it cannot be read."""
    if not path.is_file():
        return None, "missing"
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as e:
        return None, f"does not read ({_first_line(e)})"


def expected_records(out_dir: Path) -> tuple[list[dict], list[Problem], str]:
    """What the output's shard files are checked against: the commit records, else (an output copied without its
    _commits/, e.g. from a dataset hub) the manifest's list of them; and which of the two that is ("" for none)."""
    records, problems = read_commit_records(out_dir)
    if records or problems:
        return records, problems, f"{layout.COMMITS}/"
    manifest, _ = read_json(Path(out_dir) / layout.MANIFEST)
    if isinstance(manifest, dict) and isinstance(manifest.get("shards"), list):
        return manifest["shards"], [], layout.MANIFEST
    return [], [], ""


# ---------------------------------------------------------------- one shard's files
def _file_problem(out_dir: Path, rel: str, rows: int, size: Optional[int], sha256: Optional[str],
                  schema_version: int, depth: Depth) -> Optional[str]:
    """The first way the file at `rel` differs from its commit record, or None."""
    path = out_dir / rel
    if not path.is_file():
        return "missing"
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"{actual} bytes, its commit record says {size} (truncated or overwritten)"
    if sha256 is not None and file_sha256(path) != sha256:
        return "sha256 differs from its commit record (the bytes changed since the commit)"
    if depth < Depth.RESUME and sha256 is not None:
        return None
    try:
        meta = pq.read_metadata(path)
        if meta.num_rows != rows:
            return f"{meta.num_rows} rows, its commit record says {rows}"
        version = (meta.schema.to_arrow_schema().metadata or {}).get(SCHEMA_KEY, b"?").decode()
        if version != str(schema_version):
            return f"schema version {version}, its commit record says {schema_version}"
        if depth >= Depth.FULL or sha256 is None:  # no sha256 recorded: decoding it whole is the check left
            pq.read_table(path)
    except (OSError, pa.ArrowException, UnicodeDecodeError) as e:
        return f"does not read as Parquet ({_first_line(e)})"
    return None


def shard_problems(out_dir: Path, record: dict, depth: Depth) -> list[Problem]:
    """How a committed shard's data and quarantine files differ from its commit record (empty: as committed)."""
    out_dir = Path(out_dir)
    shard_id = record["shard_id"]
    schema_version = record.get("schema_version", SCHEMA_VERSION)  # records without the key: the job's version
    problems = []
    for sub, prefix in layout.RECORD_PREFIX.items():
        rel = record[f"{prefix}path"]
        if rel is None:
            continue
        if rel != f"{sub}/{shard_file(shard_id)}":  # a record names its own shard's file, nothing else
            problems.append(Problem(f"{layout.COMMITS}/{shard_file(shard_id, '.json')}", f"names {rel!r}", shard_id))
            continue
        # records of an older pairsel have no bytes, nor a quarantine sha256: what they hold is checked
        what = _file_problem(out_dir, rel, record[f"{prefix}rows"], record.get(f"{prefix}bytes"),
                             record.get(f"{prefix}sha256"), schema_version, depth)
        if what:
            problems.append(Problem(rel, what, shard_id))
    return problems


def check_records(out_dir: Path, records: list[dict], depth: Depth) -> dict[int, list[Problem]]:
    """shard_problems of every record, by shard id, the files hashed on several threads (hashlib lets go of the
    GIL while it hashes, so a folder of many shards on a network disk is read in parallel)."""
    with ThreadPoolExecutor() as pool:
        found = pool.map(lambda r: shard_problems(out_dir, r, depth), records)
        return {r["shard_id"]: p for r, p in zip(records, found)}


def check_readable(out_dir) -> list[dict]:
    """For report, show and export: the records of the committed shards, after checking their files (QUICK);
    DamagedOutput if any differs. An output without records (none in _commits/ nor in the manifest) is read
    unchecked."""
    records, problems, _ = expected_records(Path(out_dir))
    for found in check_records(Path(out_dir), records, Depth.QUICK).values():
        problems += found
    if problems:
        raise DamagedOutput(out_dir, problems)
    return records


# ---------------------------------------------------------------- the labels
def label_stages(config: dict) -> list:
    """The job's own label steps, as pipeline/plan.py:steps builds them from the run's config: the steps after
    the last model step (the last round's Score, which scores every candidate, then Select). They need no model:
    they compute from columns the output stores."""
    from omegaconf import OmegaConf

    from pipeline.plan import steps

    plan = steps(OmegaConf.create(config))
    last_model_step = max(i for i, spec in enumerate(plan) if spec.resources is not None)
    return plan[last_model_step + 1:]


def _values(table: pa.Table, name: str) -> list:
    """Per row, the value of a column ("decision") or the list of one struct field of a list column
    ("candidates.delta")."""
    column, _, field = name.partition(".")
    values = table[column].to_pylist()
    if not field:
        return values
    return [None if v is None else [None if item is None else item[field] for item in v] for v in values]


def _short(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _same(a, b) -> bool:
    return json.dumps(a) == json.dumps(b)  # NaN equals NaN; floats compare bit for bit (repr round-trips)


def recompute(stored: pa.Table, stages: list) -> tuple[pa.Table, pa.Table, list[str]]:
    """(the stored rows as work rows, the same rows after the label stages ran over them again, the columns those
    stages write)."""
    from stages.write import to_work_table

    work = to_work_table(stored)
    again = work
    names: list[str] = []
    for spec in stages:
        again = spec.build()(again)
        names += [n for n in spec.contract().writes if n not in names]
    return work, again, names


def column_problems(rel: str, work: pa.Table, again: pa.Table, names: list[str], shard_id: int) -> list[Problem]:
    """Where the columns `names` of `again` differ from the stored ones in `work`."""
    problems, ids = [], work["pair_id"].to_pylist()
    for name in names:
        column = name.partition(".")[0]
        if work[column].equals(again[column]):
            continue
        was, now = _values(work, name), _values(again, name)
        wrong = [i for i in range(work.num_rows) if not _same(was[i], now[i])]
        if wrong:
            i = wrong[0]
            problems.append(Problem(rel, f"{name} does not recompute in {len(wrong)} of {work.num_rows} rows (e.g. "
                                         f"pair {ids[i]}: stored {_short(was[i])}, recomputed {_short(now[i])})",
                                    shard_id))
    return problems


def config_hashes(stored: pa.Table) -> set:
    """The config hashes that a data file's rows were labelled under (provenance.config_hash): the manifest's alone,
    unless a resume with --force kept shards of another config."""
    return set(stored["provenance"].combine_chunks().field("config_hash").to_pylist())


def label_problems(rel: str, stored: pa.Table, stages: list, config_hash: Optional[str],
                   shard_id: int) -> tuple[list[Problem], Optional[pa.Table]]:
    """Where the stored score and label columns of a data file differ from what the stages compute again, and
    the recomputed rows (None where they cannot be recomputed)."""
    hashes = config_hashes(stored)
    if config_hash is not None and hashes != {config_hash}:
        return [Problem(rel, f"labelled under config {', '.join(sorted(map(str, hashes)))}, not the manifest's "
                             f"{config_hash} (a resume with --force): its labels cannot be recomputed", shard_id)], None
    work, again, names = recompute(stored, stages)
    return column_problems(rel, work, again, names, shard_id), again


def calibration_problems(out_dir: Path, records: list[dict], stages: list, config: dict, recomputed: dict) -> list:
    """The decoy rule: the calibration over every recomputed pair of the job (pipeline/calibration.py), then each
    shard's decisions from it, compared with the stored ones (CALIBRATED_COLUMNS)."""
    from omegaconf import OmegaConf

    from pipeline.calibration import calibrate_job, labeller
    from schemas import CALIBRATED_COLUMNS, WORK_SCHEMA
    from stages.calibrate import row_scores

    cfg = OmegaConf.create(config)
    group = cfg.scoring.decision.group
    labels = labeller(cfg, calibrate_job(cfg, [s for again in recomputed.values()
                                               for s in row_scores(again.to_pylist(), group)]))
    problems = []
    for record in records:
        if record["shard_id"] not in recomputed:
            continue
        rows = recomputed[record["shard_id"]].to_pylist()
        labels(rows)
        work, _, _ = recompute(pq.read_table(out_dir / record["path"]), [])
        again = pa.Table.from_pylist(rows, schema=WORK_SCHEMA)
        problems += column_problems(record["path"], work, again, list(CALIBRATED_COLUMNS), record["shard_id"])
    return problems


# ---------------------------------------------------------------- the whole folder
@dataclass
class Verdict:
    problems: list[Problem]
    shards: int  # committed shards checked
    pairs: int
    quarantined: int
    checked: str  # what was checked, in words


def manifest_problems(manifest: Optional[dict], why: Optional[str], records: list[dict]) -> list[Problem]:
    """Where the commit records and the manifest's list of shards disagree (or why there is no manifest)."""
    if manifest is None:
        return [Problem(layout.MANIFEST, f"{why}: the job has not finished; rerun its command to finish it")]
    problems = []
    if manifest.get("status") != "complete":
        problems.append(Problem(layout.MANIFEST, f"status {manifest.get('status')!r}: the job has not finished"))
    listed = {s.get("shard_id"): s for s in manifest.get("shards") or []}
    for record in records:
        entry = listed.pop(record["shard_id"], None)
        if entry is None:
            problems.append(Problem(layout.MANIFEST, f"does not list shard {record['shard_id']}", record["shard_id"]))
        elif entry != record:
            keys = sorted(k for k in set(entry) | set(record) if entry.get(k) != record.get(k))
            problems.append(Problem(layout.MANIFEST, f"shard {record['shard_id']}: {', '.join(keys)} differ from its "
                                                    "commit record", record["shard_id"]))
    for shard_id in sorted(listed, key=str):
        problems.append(Problem(layout.MANIFEST, f"lists shard {shard_id}, which has no commit record"))
    return problems


def _extra_files(out_dir: Path, records: list[dict]) -> list[Problem]:
    """Shard files that no commit record names: left by a run that died before committing them, or put there."""
    named = {r[k] for r in records for k in ("path", "quarantine_path") if r.get(k)}
    problems = []
    for sub in layout.SHARD_FOLDERS:
        for f in sorted((out_dir / sub).glob(f"{SHARD_GLOB}.parquet")):
            rel = f"{sub}/{f.name}"
            if SHARD_FILE.fullmatch(f.name) and rel not in named:
                problems.append(Problem(rel, "no commit record names it (a shard that was never committed, or a file "
                                             "from elsewhere)", int(SHARD_FILE.fullmatch(f.name)[1])))
    return problems


def verify(out_dir, quick: bool = False) -> Verdict:
    """Check a whole output folder; the problems are in shard order, the folder's own after them."""
    out_dir = Path(out_dir)
    records, problems, source = expected_records(out_dir)
    manifest, why = read_json(out_dir / layout.MANIFEST)
    job, _ = read_json(out_dir / layout.JOB_RECORD)
    if source == f"{layout.COMMITS}/":
        problems += manifest_problems(manifest, why, records)
    elif source == layout.MANIFEST:
        problems.append(Problem(f"{layout.COMMITS}/", "missing: the shards are checked against manifest.json alone"))
    planned = ((job or {}).get("input_plan") or {}).get("shards")
    unreadable = {p.shard_id for p in problems if p.where.startswith(f"{layout.COMMITS}/shard")}
    have = {r["shard_id"] for r in records} | unreadable
    for shard_id in range(planned or 0):
        if shard_id not in have:
            problems.append(Problem(f"shard {shard_id}", "not committed (no commit record)", shard_id))
    depth = Depth.QUICK if quick else Depth.FULL
    found = check_records(out_dir, records, depth)
    for problem_list in found.values():
        problems += problem_list
    problems += _extra_files(out_dir, records)
    checked = "sizes and sha256" if quick else "sizes, sha256, rows, schema version, every file read whole"
    if not quick:
        config = (manifest or {}).get("config")
        if config is None:
            checked += "; labels not checked (they need the run's config, in manifest.json)"
        else:
            stages = label_stages(config)
            recomputed = {}
            for record in records:
                if record["path"] and not found[record["shard_id"]]:
                    found_here, again = label_problems(record["path"], pq.read_table(out_dir / record["path"]),
                                                       stages, manifest.get("config_hash"), record["shard_id"])
                    problems += found_here
                    if again is not None:
                        recomputed[record["shard_id"]] = again
            if config["scoring"]["decision"]["rule"] == "decoys":  # decisions come from the whole job's calibration
                problems += calibration_problems(out_dir, records, stages, config, recomputed)
            checked += ", and every score and label recomputed from the stored similarities"
    problems.sort(key=lambda p: (p.shard_id is None, p.shard_id or 0))
    return Verdict(problems, len(records), sum(r["rows"] for r in records),
                   sum(r["quarantine_rows"] for r in records), checked)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="output folder of a pairsel job")
    parser.add_argument("--quick", action="store_true", help="check only the files' sizes and sha256")


def run(out_dir: str, quick: bool = False) -> int:
    """Print one line per problem, then a summary; 0 when the output is whole, else 1."""
    from pipeline.errors import ConfigError
    from pipeline.output_dir import is_pairsel_output

    if not Path(out_dir).is_dir() or not is_pairsel_output(Path(out_dir)):
        raise ConfigError(f"out_dir: {out_dir} is not a pairsel output folder (no _commits/job.json nor manifest.json)")
    verdict = verify(out_dir, quick)
    for problem in verdict.problems:
        print(problem.line())
    counted = f"{verdict.shards} shards, {verdict.pairs} pairs, {verdict.quarantined} quarantined rows"
    if verdict.problems:
        shards = {p.shard_id for p in verdict.problems if p.shard_id is not None}
        print(f"pairsel verify: {out_dir} is NOT whole: {len(verdict.problems)} problem(s) in {len(shards)} shard(s) "
              f"({counted}; checked {verdict.checked}). Rerunning the job's command redoes the shards whose files "
              "differ from their commit record or that were never committed; labels that do not recompute from "
              "files as committed need a run with --overwrite.")
        return 1
    print(f"pairsel verify: {out_dir} is whole: {counted}; checked {verdict.checked}")
    return 0
