"""The read step as a Ray Data datasource: one read task per input shard spec, each yielding the shard's rows
(stages/read.py:read_shard_table) as one block of schemas.WORK_SCHEMA, whatever columns it holds. Call it so:
    ds = read_pairs(specs, read_spec(cfg), duplicates=duplicates, num_cpus=cfg.ray.read_num_cpus)

A shard is one task's work, as a file is in Ray's own file datasources: its rows are read, checked and numbered
together (in-shard duplicates and negatives need the whole shard), and the writer commits a shard once all of
its rows are written (stages/write.py).

The reads stay tasks of their own, apart from the first model step (an actor pool, whose num_cpus may equal
read_num_cpus): Ray Data 2.60 never fuses an operator that can change the number of rows, as a Read can, into
a map_batches with an int batch_size, so as not to bundle `batch_size` read tasks into one (the rule in
ray/data/_internal/logical/rules/operator_fusion.py, `_can_fuse_map_ops`). Every model step has one
(`resources.batch_size` >= 1, pipeline/config.py). tests/test_read_source.py checks the optimized plan
(`Dataset.explain`), so a Ray whose rule changes fails there rather than reading eight shards in one task.
"""
from __future__ import annotations

import functools
from typing import Iterator, Optional

import pyarrow as pa
import ray
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

import schemas
from stages.faults import fault_point
from stages.read import ReadSpec, read_shard_table


class PairShardsDatasource(Datasource):
    """The input shards of `specs` (stages/inputs:plan_shards), one read task each. Its read operator is
    named "ReadPairShards" in Ray Data's plans and stats.

    `duplicates`: the file of stages/duplicates.py:find_duplicates, a Ray reference to the task that writes it
    and returns {"path": ...} (pipeline/run.py:start_duplicate_index; each read task waits for it), or None."""

    def __init__(self, specs: list[dict], read: ReadSpec, duplicates=None):
        super().__init__()
        self._specs = list(specs)
        self._read_args = {"read": read, "duplicates": duplicates}

    def estimate_inmemory_data_size(self) -> Optional[int]:
        # Unknown before the images are read. None also keeps Ray Data from splitting a shard's block into
        # several to reach a target block size (its SetReadParallelismRule splits by this estimate).
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: Optional[int] = None,
                       data_context=None) -> list[ReadTask]:
        # One task per shard whatever `parallelism` says: read_pairs asks for exactly this many blocks.
        return [
            ReadTask(functools.partial(_read_one_shard, spec, **self._read_args),
                     BlockMetadata(num_rows=spec["stop"] - spec["start"], size_bytes=None, exec_stats=None,
                                   input_files=[spec["source"]]),
                     schema=schemas.WORK_SCHEMA, per_task_row_limit=per_task_row_limit)
            for spec in self._specs
        ]


def _read_one_shard(spec: dict, read: ReadSpec, duplicates=None) -> Iterator[pa.Table]:
    """A read task's body: the shard's rows as one block."""
    if duplicates is not None and not isinstance(duplicates, str):
        duplicates = ray.get(duplicates)["path"]  # the index task may still run: wait for its file
    if duplicates is not None:
        spec = {**spec, "duplicates": duplicates}
    table = read_shard_table(spec, read)  # checked against the read's contract
    fault_point("read", table.num_rows)
    yield table


def read_pairs(specs: list[dict], read: ReadSpec, *, duplicates=None, num_cpus: float = 1) -> ray.data.Dataset:
    """A dataset of the rows of `specs`, one read task (num_cpus each) and one block per shard. See
    PairShardsDatasource for `duplicates`."""
    source = PairShardsDatasource(specs, read, duplicates)
    # one output block per read task: asking for more would make Ray split each shard's block
    return ray.data.read_datasource(source, num_cpus=num_cpus, override_num_blocks=max(1, len(specs)))
