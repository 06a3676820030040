"""A model stage's counters, kept by each actor as one small JSON file under the output's `_stats/`.

They feed the manifest's per-generator figures and the benchmark (bench/bench.py): batches, rows, model
seconds, and a timeline in wall-clock seconds since the epoch (`t_init`: the actor started loading its
model, `t_ready`: loaded, `t_first` / `t_last`: its first and last batch began / ended), which shows how much
of a job's wall time went to start-up, to waiting and to model work.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path
from typing import Optional

from stages.files import atomic_write_json

log = logging.getLogger(__name__)


class StageCounters(dict):
    """Counters of one actor, saved to STATS_DIR/<name>-<pid>-<random>.json (stats_dir None: nowhere)."""

    def __init__(self, stats_dir: Optional[str], name: str, **fields):
        super().__init__(batches=0, rows=0, model_seconds=0.0, t_init=time.time(), t_ready=None, t_first=None,
                         t_last=None, **fields)
        self.path = None if stats_dir is None else Path(stats_dir) / f"{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"

    def ready(self) -> None:
        self["t_ready"] = time.time()

    def batch_started(self) -> None:
        if self["t_first"] is None:
            self["t_first"] = time.time()

    def save(self, extra: Optional[dict] = None) -> None:
        """Count one batch and rewrite the file (best effort: counters are never worth a batch)."""
        self["batches"] += 1
        self["t_last"] = time.time()
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json({**self, **(extra or {})}, self.path)
        except OSError as e:
            log.warning("cannot write stage counters to %s: %s", self.path, e)
