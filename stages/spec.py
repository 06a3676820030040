"""A stage's spec apart from the stage itself (as Ray Data LLM splits a stage's spec from its UDF): a frozen value,
made by pipeline/plan.py from the typed config, that holds every parameter of the stage once and says what the
stage reads and writes (its contract), what it runs on (its resources: an actor pool for a model stage, tasks
without) and whether it needs whole input shards. The stage itself is built from its spec alone: `spec.build()`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from stages.contract import Contract


@dataclass(frozen=True)
class Resources:
    """An actor pool: what each actor asks Ray for, how many there are, and the rows of each call."""

    num_cpus: float
    num_gpus: float
    pool_size: int
    batch_size: int


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """The base of every stage's spec. `stage` is the class the spec builds (a callable over a batch)."""

    stage: ClassVar[type]
    whole_shards: ClassVar[bool] = False  # each call gets whole input shards (Ray Data's batch_size None)
    resources: Optional[Resources] = None  # a model stage's actor pool; None: tasks

    @property
    def name(self) -> str:
        return self.contract().stage

    def contract(self) -> Contract:
        raise NotImplementedError

    def build(self):
        return self.stage(self)
