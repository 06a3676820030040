"""The child processes of bench/stage_bytes.py, run with the checkout under test first on sys.path (its own
pipeline/ and stages/, whatever their version), so that one bench measures the code before and after a change.

    python bench/stage_bytes_child.py job  REPO JSON_FILE CONFIG [key=value ...]
    python bench/stage_bytes_child.py loop REPO JSON_FILE  CONFIG [key=value ...]

job:  the job through REPO's CLI (`pipeline run CONFIG ... --overwrite`), with the peak object-store use sampled
      meanwhile; then Ray Data's own per-operator figures of the Dataset it consumed (`get_stats_summary()`,
      output bytes of each operator's blocks among them), written to JSON_FILE. The CLI sends stdout and
      stderr to the job's log file, hence the file.
loop: REPO's plain loop (pipeline/plan.py:run_local, the plan's steps without Ray) with every stage's input and
      output Arrow table measured (`Table.nbytes`, what Ray Data counts as a block's size), written to JSON_FILE.
"""
from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path


def _use_repo(repo: str) -> None:
    sys.path.insert(0, repo)
    os.chdir(repo)
    import pipeline

    where = Path(pipeline.__file__).resolve()
    if not where.is_relative_to(Path(repo).resolve()):
        raise SystemExit(f"imported pipeline from {where}, not from {repo}")


class ObjectStorePeak(threading.Thread):
    """Once this driver has started Ray: the node's `ray_object_store_used_memory` (and spilled bytes), Ray's
    system metrics, read from the metrics export port that ray.nodes() names, every `every` seconds; peak kept.
    (The raylet reports them every RAY_metrics_report_interval_ms, which the bench sets to 1000.)"""

    def __init__(self, every: float = 0.5):
        super().__init__(daemon=True)
        self.every, self.done = every, threading.Event()
        self.peak = {"used": 0, "spilled": 0, "samples": 0, "errors": 0, "port": None}

    def _port(self):
        import ray

        if not ray.is_initialized():
            return None
        ports = [n.get("MetricsExportPort") for n in ray.nodes() if n.get("Alive")]
        return ports[0] if ports and ports[0] else None

    def run(self):
        import urllib.request

        while not self.done.wait(self.every):
            try:
                self.peak["port"] = self.peak["port"] or self._port()
                if self.peak["port"] is None:
                    continue
                url = f"http://127.0.0.1:{self.peak['port']}/metrics"
                lines = urllib.request.urlopen(url, timeout=5).read().decode().splitlines()
            except Exception:  # noqa: BLE001 - Ray starting or stopping, a slow agent: the next sample
                self.peak["errors"] += 1
                continue
            used = [float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith("ray_object_store_used_memory")]
            spilled = [float(x.rsplit(" ", 1)[1]) for x in lines
                       if x.startswith("ray_object_store_memory{") and 'Location="SPILLED"' in x]
            if used:
                self.peak["samples"] += 1
                self.peak["used"] = max(self.peak["used"], int(sum(used)))
                self.peak["spilled"] = max(self.peak["spilled"], int(sum(spilled)))


def operators(summary) -> list[dict]:
    """Each operator of a DatasetStatsSummary, upstream first: its name (a fused chain's names joined by ->) and
    the output bytes and rows of its blocks in total. Read from the summary, not from Dataset.stats()'s text,
    which prints an operator whose name repeats (the second round's Embed) as "[execution cached]"."""
    out = []
    for parent in summary.parents:
        out += operators(parent)
    for op in summary.operators_stats:
        out.append({"operator": op.operator_name,
                    "bytes": int(op.output_size_bytes.sum) if op.output_size_bytes else 0,
                    "rows": int(op.output_num_rows.sum) if op.output_num_rows else 0,
                    "largest_block": int(op.output_size_bytes.max) if op.output_size_bytes else 0})
    return out


def job(repo: str, json_file: str, config: str, overrides: list[str]) -> int:
    _use_repo(repo)
    import ray.data

    from pipeline.cli import main

    # The job consumes its Dataset inside pipeline/run.py; keep a reference to it from the consuming call, for
    # its stats afterwards (they live in the Dataset's plan and executor, so they answer once Ray is shut down).
    consumed = []
    for name in ("iter_rows", "iter_batches"):
        original = getattr(ray.data.Dataset, name)

        def keep(self, *args, _original=original, **kwargs):
            consumed.append(self)
            return _original(self, *args, **kwargs)

        setattr(ray.data.Dataset, name, keep)
    peak = ObjectStorePeak()
    peak.start()
    try:
        rc = main(["run", config, *overrides, "--overwrite"])
    finally:
        peak.done.set()
        peak.join()
    result = {"object_store": peak.peak, "operators": [], "stats": ""}
    for ds in dict.fromkeys(consumed):  # the job's Dataset: the one with the most operators
        ops = operators(ds.get_stats_summary())
        if len(ops) > len(result["operators"]):
            result["operators"], result["stats"] = ops, ds.stats()
    Path(json_file).write_text(json.dumps(result, indent=1))
    return rc


def binary_bytes(array) -> int:
    """Bytes of the binary values (the image bytes) in an Arrow array or table, nested ones included."""
    import pyarrow as pa

    if isinstance(array, pa.Table):
        return sum(binary_bytes(c) for c in array.columns)
    if isinstance(array, pa.ChunkedArray):
        return sum(binary_bytes(c) for c in array.chunks)
    t = array.type
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return array.nbytes
    if pa.types.is_struct(t):
        return sum(binary_bytes(array.field(i)) for i in range(t.num_fields))
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return binary_bytes(array.flatten())
    return 0


def loop(repo: str, json_file: str, config: str, overrides: list[str]) -> int:
    _use_repo(repo)
    from pipeline import config as pconfig
    from pipeline.plan import run_local
    from pipeline.run import plan_input

    cfg = pconfig.load(config, overrides)
    pconfig.resolve_paths(cfg)
    measured = []  # one entry per stage, in plan order

    def instrument(stage):
        """Swap the stage's class for a subclass whose __call__ measures the tables it gets and gives back
        (Python looks __call__ up on the class, so the instance alone cannot be wrapped)."""
        entry = {"stage": type(stage).__name__, "in_bytes": 0, "out_bytes": 0, "in_binary_bytes": 0,
                 "out_binary_bytes": 0, "in_rows": 0, "out_rows": 0, "out_columns": None}
        measured.append(entry)
        base = type(stage)

        def __call__(self, table, *args, **kwargs):
            out = base.__call__(self, table, *args, **kwargs)
            entry["in_bytes"] += table.nbytes
            entry["in_binary_bytes"] += binary_bytes(table)
            entry["out_binary_bytes"] += binary_bytes(out)
            entry["in_rows"] += table.num_rows
            entry["out_bytes"] += out.nbytes
            entry["out_rows"] += out.num_rows
            entry["out_columns"] = out.num_columns
            return out

        stage.__class__ = type(base.__name__, (base,), {"__call__": __call__})

    rows = run_local(cfg, plan_input(cfg), instrument)
    Path(json_file).write_text(json.dumps({"pairs": len(rows), "stages": measured}, indent=1))
    return 0


if __name__ == "__main__":
    what, repo, dest, config, *rest = sys.argv[1:]
    sys.exit({"job": job, "loop": loop}[what](repo, dest, config, rest))
