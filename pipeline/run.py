"""Run a job: prepare the output dir (resume or overwrite: pipeline/output_dir.py, which never touches a user's
files), start Ray, find the pair_ids repeated across shards, drive the plan of pipeline/plan.py, commit each
shard once all its rows are written, and write the manifest.

Exactly once: a shard is done when its commit record is (stages/write.py). A rerun into the same output dir,
after any crash or a Ctrl-C, keeps the committed shards whose files still match their records (pipeline/verify.py),
deletes what the dead run staged or left uncommitted, and redoes only the missing or damaged shards; seeds
derive from pair_id and the embedder is batch-invariant, so a redone shard is the same, bit for bit, as in a run
that never died.

Only small per-part records reach the driver, never rows; what it holds grows with the number of shards (a few
hundred bytes each), not with the rows.
"""
from __future__ import annotations

import logging
import os
import signal
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray
from omegaconf import DictConfig

from pipeline.calibration import commit_dir, label_scored_shards
from pipeline.config import REPO_ROOT, ConfigError, to_dict
from pipeline.manifest import now_iso
from pipeline.output_dir import check_output_dir, finish_output, plan_fingerprint, prepare_output
from pipeline.plan import build_dataset, read_spec
from pipeline.verify import read_commit_records
from stages import faults
from stages.duplicates import find_duplicates, index_pair_ids
from stages import layout
from stages.files import shard_file
from stages.inputs import plan_shards
from stages.write import commit_shard

log = logging.getLogger("pairsel")


# ---------------------------------------------------------------- Ray
# The model libraries' progress bars and notices, off in the workers of a quiet run: the console shows pairsel's
# own progress line, and bars would only fill the log file (HF_HUB_DISABLE_PROGRESS_BARS covers transformers'
# "Loading weights" bar, TQDM_DISABLE any other tqdm bar).
QUIET_WORKER_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def init_ray(address: str | None, quiet: bool = False) -> bool:
    """Start or join Ray; True if this call did (and so the caller shuts it down). quiet: no progress bars from
    Ray Data or the model libraries (pipeline/cli.py sends everything else Ray prints to the log file)."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    env = {**faults.forwarded_env(), **(QUIET_WORKER_ENV if quiet else {})}  # faults: empty unless a test set them
    if quiet:
        ray.data.DataContext.get_current().enable_progress_bars = False
    if address:
        # Inside `ray job submit` the working dir is already shipped; from a plain driver, ship this repo.
        runtime_env = {}
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # set by Ray for a submitted job's driver
            runtime_env = {"working_dir": str(REPO_ROOT),
                           "excludes": [".venv/", ".git/", "out/", "models/", "data/", "**/__pycache__/"]}
        if env:
            runtime_env["env_vars"] = env
        ray.init(address=address, runtime_env=runtime_env or None, log_to_driver=True)
    else:
        _init_local_ray({"env_vars": {"PYTHONPATH": str(REPO_ROOT), **env}})
    return True


def ray_logs_dir() -> str | None:
    """Where this driver's Ray session keeps its logs (its workers', raylet's, Ray Data's): Ray's documented
    layout, TEMP_DIR/SESSION_NAME/logs, from the runtime context's public getters."""
    try:
        context = ray.get_runtime_context()
        return os.path.join(context.get_temp_dir(), context.get_session_name(), "logs")
    except Exception:  # noqa: BLE001 - only a pointer for the user; a Ray without it is fine
        return None


def _init_local_ray(runtime_env: dict) -> None:
    """A Ray inside this process, every server of it listening on 127.0.0.1 only.

    Ray 2.60 has no public setting for this on Linux: its servers listen on all interfaces unless the node
    address is 127.0.0.1, and with cluster support on (ray_constants.ENABLE_RAY_CLUSTER, the Linux default)
    both ray.init's `_node_ip_address="127.0.0.1"` and `ray start --node-ip-address=127.0.0.1` are turned into
    the machine's address (services.resolve_ip_for_localhost). The one user-facing switch, the environment
    variable RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, is read once at `import ray`, for the whole process, so it
    would also change a driver that joins a cluster. So cluster support goes off only while this Ray starts,
    which then takes the loopback address as on macOS and Windows (services.get_node_ip_address), and back to
    what it was (the node address is fixed once Ray runs). A Ray started by this process has no other node.
    tests/test_bad_inputs.py checks what its processes listen on.
    """
    from ray._private import ray_constants

    cluster_support = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(include_dashboard=False, runtime_env=runtime_env)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_support
    if ray.util.get_node_ip_address() != "127.0.0.1":  # a Ray whose rule changed: say so, the job still runs
        log.warning("the local Ray took the node address %s, not 127.0.0.1: it may listen beyond this machine",
                    ray.util.get_node_ip_address())


# ---------------------------------------------------------------- duplicates across shards
def _find_duplicates_after(index_dir: str, dest: str, *indexed: int) -> dict:
    """find_duplicates, run once the index tasks whose results it is given have run."""
    return {"path": dest, "rows": find_duplicates(index_dir, dest)}


def start_duplicate_index(cfg: DictConfig, specs: list[dict], out_dir: Path) -> ray.ObjectRef | None:
    """Start finding the rows whose pair_id an earlier shard holds (stages/duplicates.py), and return at once a
    reference to {"path": the file that lists them, "rows": how many}; None when one shard is all there is.

    It runs as tasks beside the job rather than before it: the model actors load their models meanwhile
    (minutes for a large model on a cluster), and only the read tasks wait for it. Each shard's pair_ids are
    read once per output dir (kept in _index/pair_ids/); the comparison is one task."""
    if len(specs) < 2:
        return None
    keys = out_dir / layout.PAIR_IDS
    keys.mkdir(parents=True, exist_ok=True)
    missing = [s for s in specs if not (keys / shard_file(s["shard_id"])).is_file()]
    task = {"num_cpus": cfg.ray.read_num_cpus, "max_retries": -1}
    index = ray.remote(**task)(index_pair_ids)
    read = read_spec(cfg)
    groups = min(len(missing), 256)  # at most this many index tasks, so that the last task waits on few refs
    indexed = [index.remote(missing[i::groups], read, str(keys)) for i in range(groups)]
    return ray.remote(**task)(_find_duplicates_after).remote(
        str(keys), str(out_dir / layout.DUPLICATES), *indexed)


# A progress callback: (shards committed by this run, pairs labelled and written by it so far).
Progress = Callable[[int, int], None]


def drive(ds: ray.data.Dataset, cfg: DictConfig, specs: list[dict], progress: Progress | None = None) -> int:
    """Consume the part records; commit each shard as soon as all of its rows are on disk."""
    commit = ray.remote(num_cpus=cfg.ray.write_num_cpus)(commit_shard)
    staging = str(Path(cfg.output.dir) / layout.STAGING)  # where WriteParts stages the parts
    todo = {s["shard_id"] for s in specs}
    pending: dict[int, dict] = {}  # shards with some rows on disk
    in_flight, committed, pairs = [], 0, 0
    for meta in ds.iter_rows():
        shard_id = meta["shard_id"]
        if shard_id not in todo:
            raise RuntimeError(f"shard {shard_id}: rows arrived for a shard that is not to do (or done already)")
        shard = pending.setdefault(shard_id, {"parts": [], "quarantine_parts": [], "rows": 0})
        shard["rows"] += meta["rows"] + meta["quarantine_rows"]
        pairs += meta["rows"] + meta["quarantine_rows"]
        if meta["part"]:
            shard["parts"].append(meta["part"])
        if meta["quarantine_part"]:
            shard["quarantine_parts"].append(meta["quarantine_part"])
        if shard["rows"] > meta["shard_size"]:
            raise RuntimeError(f"shard {shard_id}: {shard['rows']} rows written for {meta['shard_size']} read; "
                               "not committed, rerun to redo it")
        if shard["rows"] == meta["shard_size"]:
            in_flight.append(commit.remote(commit_dir(cfg), shard_id, shard["parts"], shard["quarantine_parts"],
                                           cfg.output.compression, meta["shard_size"], staging))
            del pending[shard_id]
            todo.discard(shard_id)
        if in_flight:
            done, in_flight = ray.wait(in_flight, num_returns=len(in_flight), timeout=0)
            committed += len(ray.get(done))  # raises if a commit failed
        if progress is not None:
            progress(committed, pairs)
    if pending:
        shard_id = min(pending)
        raise RuntimeError(f"shard {shard_id}: only {pending[shard_id]['rows']} rows written; rerun to resume")
    for shard_id in sorted(todo):  # read no rows at all: an empty shard is committed as such
        in_flight.append(commit.remote(commit_dir(cfg), shard_id, [], [], cfg.output.compression, None, staging))
    while in_flight:
        done, in_flight = ray.wait(in_flight, num_returns=1)
        committed += len(ray.get(done))
        if progress is not None:
            progress(committed, pairs)
    return committed


# ---------------------------------------------------------------- the job
class JobStopped(Exception):
    """The job ended before its last shard: interrupted (Ctrl-C) or failed (`cause`). Committed shards stay; a
    rerun of the same command resumes."""

    def __init__(self, interrupted: bool, cause: BaseException | None = None):
        self.interrupted, self.cause = interrupted, cause
        super().__init__("interrupted" if interrupted else f"{type(cause).__name__}: {cause}")


def plan_input(cfg: DictConfig) -> list[dict]:
    """The shard plan; an input that is missing or not what input.format says is a user error, said in one line
    that names the key (stages/inputs/ starts its messages with it)."""
    try:
        return plan_shards(to_dict(cfg)["input"])
    except (ValueError, OSError, tarfile.TarError) as e:
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(msg if msg.startswith("input.") else f"input.path: {cfg.input.path}: {msg}") from None


@dataclass
class Job:
    """A job whose output dir is ready: what is planned, and what an earlier run already committed."""

    cfg: DictConfig
    out_dir: Path
    specs: list[dict]
    committed: set[int]
    started_at: str
    t0: float
    redone: list[str]  # one line for each committed shard redone because its files differ from its commit record
    scored: set[int] = frozenset()  # the decoy rule: shards scored, waiting for their labels

    @property
    def todo(self) -> list[dict]:
        """The shards the Ray Data plan still has to run."""
        return [s for s in self.specs if s["shard_id"] not in self.committed | self.scored]


def prepare(cfg: DictConfig, overwrite: bool = False, force: bool = False) -> Job:
    """Everything before Ray: the output dir checked (never a user's folder), the input planned, the output dir
    made ready for a fresh run or a resume. Raises ConfigError for every user error."""
    t0, started_at = time.monotonic(), now_iso()
    out_dir = Path(cfg.output.dir)
    check_output_dir(out_dir)
    specs = plan_input(cfg)
    try:
        committed, scored, redone = prepare_output(out_dir, cfg, overwrite, force, plan_fingerprint(specs))
    except OSError as e:  # a folder the user cannot write to, a full disk
        raise ConfigError(f"output.dir: cannot write to {e.filename or out_dir}: {e.strerror or e}") from None
    for line in redone:
        log.info(line)
    log.info("%d shards planned, %d already committed, %d to do", len(specs), len(committed),
             len(specs) - len(committed))
    if scored:
        log.info("%d shards scored already, waiting for their labels", len(scored))
    return Job(cfg, out_dir, specs, committed, started_at, t0, redone, scored)


def execute(job: Job, address: str | None = None, quiet: bool = False, progress: Progress | None = None,
            on_ray_started: Callable[[], None] | None = None) -> dict:
    """Run the shards still to do, then write the manifest and the card. Raises JobStopped if it ends early;
    Ray, if this call started it, is shut down either way (its processes end with it)."""
    cfg, out_dir, todo = job.cfg, job.out_dir, job.todo
    if todo:
        had_ray = ray.is_initialized()
        try:
            # a Ray this run starts on this machine has no autoscaler: what does not fit it now never will
            can_grow = had_ray or bool(address or os.environ.get("RAY_ADDRESS"))
            init_ray(address, quiet)
            if on_ray_started is not None:
                on_ray_started()
            duplicates = start_duplicate_index(cfg, job.specs, out_dir)
            drive(build_dataset(cfg, todo, duplicates, can_grow), cfg, todo, progress)
            if duplicates is not None:
                log.info("%d rows repeat a pair_id that an earlier shard holds", ray.get(duplicates)["rows"])
            label_scored_shards(cfg, job.specs, _ray_tasks(cfg))
        except ConfigError:  # a setting the cluster cannot run: the CLI says it as a user error
            raise
        except KeyboardInterrupt:
            log.info("interrupted with %d of %d shards committed in %s", len(read_commit_records(out_dir)[0]),
                     len(job.specs), out_dir)
            raise JobStopped(interrupted=True) from None
        except Exception as e:
            log.exception("the job failed with %d of %d shards committed in %s; committed shards are kept: rerun "
                          "the same command to finish the rest", len(read_commit_records(out_dir)[0]),
                          len(job.specs), out_dir)
            raise JobStopped(interrupted=False, cause=e) from e
        finally:
            if not had_ray:  # also after a Ctrl-C inside ray.init: no process of this run may outlive it
                _shutdown_ray()
    try:  # a resume that found every shard scored labels here, without Ray
        label_scored_shards(cfg, job.specs)
    except Exception as e:
        log.exception("labelling the scored shards failed; rerun the same command to finish")
        raise JobStopped(interrupted=False, cause=e) from e
    return finish_output(out_dir, cfg, job.started_at, time.monotonic() - job.t0, planned_shards=len(job.specs))


def _ray_tasks(cfg: DictConfig):
    """Run calls as Ray tasks, all at once, and wait for them (pipeline/calibration.py's `submit`)."""
    task = ray.remote(num_cpus=cfg.ray.write_num_cpus, max_retries=-1)

    def submit(fn, calls: list[tuple]) -> list:
        remote = task(fn)
        return ray.get([remote.remote(*args) for args in calls])
    return submit


def _shutdown_ray() -> None:
    """ray.shutdown(), which a second Ctrl-C does not cut short (it would leave Ray's processes behind); it takes
    a few seconds."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None
    try:
        ray.shutdown()
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)


def run(cfg: DictConfig, address: str | None = None, overwrite: bool = False, force: bool = False) -> dict:
    return execute(prepare(cfg, overwrite, force), address)
