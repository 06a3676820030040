"""The Ray Data plan, one map_batches step per stage:

read (tasks) -> generate (one actor pool per generator) -> embed (actor pool) -> score -> select -> write parts

Model stages are callable classes in actor pools: the model loads once per actor and serves many batches.
Resources per stage come from the config.
"""
from __future__ import annotations

import ray
from omegaconf import DictConfig

from pipeline import version
from pipeline.config import config_hash, to_dict
from schemas import SCHEMA_VERSION
from stages.embed import Embed
from stages.generate import Generate
from stages.read import read_shards_batch
from stages.score import Score
from stages.select import Select
from stages.write import WriteParts


def _actor_args(resources) -> dict:
    return {
        "compute": ray.data.ActorPoolStrategy(size=resources.pool_size),
        "num_cpus": resources.num_cpus,
        "num_gpus": resources.num_gpus,
        "batch_size": resources.batch_size,
        "batch_format": "pyarrow",
    }


def provenance(cfg: DictConfig) -> dict:
    return {
        "config_hash": config_hash(cfg),
        "pairsel_version": version(),
        "schema_version": SCHEMA_VERSION,
        "embedder": cfg.embedder.model,
        "generators": [f"{g.name}={g.model}" for g in cfg.generators],
        "epsilon": float(cfg.scoring.epsilon),
    }


def build_dataset(cfg: DictConfig, specs: list[dict]) -> ray.data.Dataset:
    c = to_dict(cfg)
    task = {"batch_format": "pyarrow", "num_cpus": cfg.ray.write_num_cpus}
    ds = ray.data.from_items(specs, override_num_blocks=max(1, len(specs)))
    ds = ds.map_batches(
        read_shards_batch,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=cfg.ray.read_num_cpus,
        fn_kwargs={"input_cfg": c["input"], "in_shard_negatives": cfg.scoring.in_shard_negatives, "seed": cfg.scoring.seed},
    )
    for g, g_cfg in zip(c["generators"], cfg.generators):
        ds = ds.map_batches(
            Generate,
            fn_constructor_kwargs={"generator": g, "template": c["prompts"][g["template"]],
                                   "max_image_pixels": cfg.input.max_image_pixels},
            **_actor_args(g_cfg.resources),
        )
    ds = ds.map_batches(
        Embed,
        fn_constructor_kwargs={"embedder": c["embedder"], "max_image_pixels": cfg.input.max_image_pixels},
        **_actor_args(cfg.embedder.resources),
    )
    ds = ds.map_batches(Score(cfg.scoring.mode, cfg.scoring.temperature, cfg.scoring.valid_finish_reasons), **task)
    ds = ds.map_batches(Select(cfg.scoring.epsilon), **task)
    ds = ds.map_batches(WriteParts(cfg.output.dir, provenance(cfg), cfg.output.compression), **task)
    return ds
