"""The Ray Data plan, one step per stage:

read (one task per shard, pipeline/read_source.py) -> generate (one actor pool per generator) -> embed (actor
pool) -> score -> select -> write parts (map_batches)

Each stage declares the columns it reads and writes (stages/contract.py); `check_contracts` checks the whole
chain when the plan is built, before any work, and each stage checks its batches against its own declaration.
After the read, images travel as references (schemas IMAGE_REF); the read stores inline image bytes that no
input file holds as they are under OUTPUT/_images/ (`with_images_dir`).

Generation in rounds (config `rounds`): generate -> embed -> score repeats once per round (`round_schedule`).
A later round samples the next candidates only for the pairs that no rationale satisfies yet, and embeds
only those new candidates: the targets and negatives come back from the embedding cache.

Model stages are callable classes in actor pools: the model loads once per actor and serves many batches.
Resources per stage come from the config; each round has its own pools, with the same resources.

`steps` lists the stages between read and write once, as specs made from the typed config (stages/spec.py), for
both `build_dataset` (Ray) and `run_local` (the same stages in a plain loop in this process, for debugging and for
the benchmark's model-only time). Ray is
imported only where the Ray Data plan is built, so `run_local` runs on a machine without Ray.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Optional

from omegaconf import DictConfig

from pipeline import version
from pipeline.calibration import calibrate_job, decoy_rule, labeller
from pipeline.config import config_hash, to_dict
from pipeline.errors import fail
from schemas import SCHEMA_VERSION, WORK_SCHEMA, conform
from stages import layout
from stages.calibrate import row_scores
from stages.contract import check_chain
from stages.decoys import DecoysSpec, decoy_counts, required
from stages.embed import EmbedderSpec, EmbedSpec
from stages.generate import GeneratorSpec, GenerateSpec
from stages.read import CONTRACT as READ_CONTRACT
from stages.read import ReadSpec, read_shard_table
from stages.score import ScoreSpec
from stages.select import SelectSpec
from stages.side import QUERY, SIDES, Side
from stages.spec import Resources, StageSpec
from stages.write import WriteSpec

if TYPE_CHECKING:
    import ray

log = logging.getLogger("pairsel")


def _actor_args(resources) -> dict:
    import ray

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


def read_spec(cfg: DictConfig) -> ReadSpec:
    return ReadSpec.from_input(cfg.input, cfg.scoring.in_shard_negatives, cfg.scoring.seed)


def with_images_dir(cfg: DictConfig, specs: list[dict]) -> list[dict]:
    """The specs, each naming where its read stores the inline image bytes that no input file holds as they are
    (stages/images.py:InlineStore): OUTPUT/_images/, which the model stages read from while the job runs."""
    return [{**spec, "images_dir": f"{cfg.output.dir}/{layout.IMAGES}"} for spec in specs]


def round_schedule(cfg: DictConfig, side: Side = QUERY) -> list[dict[str, int]]:
    """For each round, how many candidates each generator holds on this side (its k, or its k_target) for a pair
    whose side is still unsatisfied after it. No rounds (rounds.k0 null): one round, every generator's count.
    Otherwise round 1 reaches k0 and each later round `step` more, each generator capped at its count (K_max),
    until every generator has reached its k and its k_target (both sides share the rounds)."""
    ks = {g.name: g[side.count_key] for g in cfg.generators}
    if cfg.rounds.k0 is None:
        return [ks]
    top = max(max(g.k, g.k_target) for g in cfg.generators)
    schedule, reach = [], cfg.rounds.k0
    while True:
        schedule.append({name: min(reach, k) for name, k in ks.items()})
        if reach >= top:
            return schedule
        reach += cfg.rounds.step


def decoy_counts_of(cfg: DictConfig) -> Optional[dict]:
    """Per side, generator -> decoys per pair under the decoy rule (stages/decoys.py); None under the bar rule."""
    if not decoy_rule(cfg):
        return None
    return decoy_counts(to_dict(cfg)["generators"], cfg.scoring.decision.decoys_per_candidate)


def sides(cfg: DictConfig) -> tuple[Side, ...]:
    """The sides the job has rationales for: the query side, and the target side where a generator has k_target
    (without, no stage writes the target columns, so none may read them)."""
    return tuple(side for side in SIDES if any(g[side.count_key] > 0 for g in cfg.generators))


def resources(node) -> Resources:
    return Resources(num_cpus=node.num_cpus, num_gpus=node.num_gpus, pool_size=node.pool_size,
                     batch_size=node.batch_size)


def steps(cfg: DictConfig) -> list[StageSpec]:
    """The stages between read and write, as specs: per round, one generate step per generator and side that
    still has candidates to add, (round 1, the decoy rule: the decoys), embed and score; then select."""
    c = to_dict(cfg)  # plain containers: the specs hold no config nodes
    stats_dir = f"{cfg.output.dir}/{layout.STATS}"
    order = tuple(g.name for g in cfg.generators)
    job_sides, counts = sides(cfg), decoy_counts_of(cfg)
    needed = required(counts) or {}
    valid = tuple(cfg.scoring.valid_finish_reasons)
    score = ScoreSpec(mode=cfg.scoring.mode, temperature=cfg.scoring.temperature, valid_finish_reasons=valid,
                      sides=job_sides, decoys=counts is not None)
    schedules = [round_schedule(cfg, side) for side in job_sides]
    out: list[StageSpec] = []
    held = [{g.name: 0 for g in cfg.generators} for _ in job_sides]
    for r in range(len(schedules[0])):
        for side, schedule, had in zip(job_sides, schedules, held):
            for g, g_plain in zip(cfg.generators, c["generators"]):
                if schedule[r][g.name] > had[g.name]:
                    # a later round skips a pair once a valid candidate beats its threshold with rounds.margin
                    out.append(GenerateSpec(
                        generator=GeneratorSpec.from_config(g_plain), side=side, template_name=g[side.template_key],
                        template=cfg.prompts[g[side.template_key]], k_stop=schedule[r][g.name],
                        max_image_pixels=cfg.input.max_image_pixels, resources=resources(g.resources),
                        generator_order=order, satisfied_above=cfg.rounds.margin if r else None,
                        epsilon=cfg.scoring.epsilon, decoys_required=needed.get(side.name, 0),
                        stats_dir=stats_dir, round_index=r))
        held = [schedule[r] for schedule in schedules]
        if r == 0 and counts is not None:  # drawn from round 1's texts, for every candidate slot of every round
            out.append(DecoysSpec(counts=counts, seed=cfg.scoring.seed, valid_finish_reasons=valid))
        out.append(EmbedSpec(embedder=EmbedderSpec.from_config(c["embedder"]), max_image_pixels=cfg.input.max_image_pixels,
                             resources=resources(cfg.embedder.resources), cache_dir=cfg.embedder.cache_dir,
                             stats_dir=stats_dir, round_index=r, controls=tuple(cfg.scoring.controls),
                             sides=job_sides, decoys=counts is not None))
        out.append(score)
    out.append(SelectSpec(epsilon=cfg.scoring.epsilon, sides=job_sides, decoys_required=needed or None,
                          decoy_groups=int(cfg.scoring.decision.decoys_per_candidate)))
    return out


def write_spec(cfg: DictConfig) -> WriteSpec:
    return WriteSpec(staging=f"{cfg.output.dir}/{layout.STAGING}", provenance=provenance(cfg),
                     compression=cfg.output.compression, sides=sides(cfg),
                     decoys=decoy_rule(cfg))


def label_job(cfg: DictConfig, rows: list[dict]) -> Optional[list[dict]]:
    """The decoy rule's decisions for rows held in memory (every pair of the job): the calibration over all of
    them (one record per side and group, returned), then each pair's decision. None under the bar rule (select
    labelled the pairs already)."""
    if not decoy_rule(cfg):
        return None
    calibration = calibrate_job(cfg, row_scores(rows, cfg.scoring.decision.group))
    labeller(cfg, calibration)(rows)
    return calibration


def check_contracts(cfg: DictConfig, plan: list[StageSpec]) -> None:
    """The whole chain, reader to writer: every column a stage reads is written upstream (stages/contract.py).
    Built from each spec's contract, so no model is loaded."""
    check_chain([READ_CONTRACT] + [spec.contract() for spec in plan] + [write_spec(cfg).contract()])


def check_pools_fit(cfg: DictConfig, plan: list[StageSpec], can_grow: bool) -> None:
    """Every actor pool must be up at once, or Ray Data waits forever for the ones that cannot start. A Ray
    that cannot grow (the local one a run starts) fails here, as a user error naming the resources; a cluster
    may autoscale, so there it is a warning."""
    import ray

    pools = [s.resources for s in plan if s.resources is not None]
    need = {"CPU": sum(r.num_cpus * r.pool_size for r in pools) + cfg.ray.read_num_cpus + cfg.ray.write_num_cpus,
            "GPU": sum(r.num_gpus * r.pool_size for r in pools)}
    have = ray.cluster_resources()
    short = [f"{need[k]:g} {k} (the cluster has {have.get(k, 0):g})" for k in need if need[k] > have.get(k, 0) + 1e-9]
    if not short:
        return
    what = (f"{len(pools)} model actor pools ({len(round_schedule(cfg))} rounds) with reads and writes need "
            f"{', '.join(short)}")
    if not can_grow:
        keys = ", ".join([f"generators.{i}.resources" for i in range(len(cfg.generators))] + ["embedder.resources"])
        fail(keys, f"{what}: Ray Data would wait forever for the pools that cannot start; lower num_cpus, num_gpus "
                   "or pool_size, use fewer rounds, or run on a cluster with --address")
    log.warning("%s; Ray Data waits until they all fit: lower num_cpus/num_gpus/pool_size, or use fewer rounds", what)


def build_dataset(cfg: DictConfig, specs: list[dict], duplicates=None, can_grow: bool = True) -> ray.data.Dataset:
    """The job over `specs`. `duplicates`: the file of stages/duplicates.py:find_duplicates, or a Ray reference
    to the task that writes it (pipeline/run.py:start_duplicate_index), which the read tasks wait for.
    can_grow: whether the Ray cluster may add nodes (check_pools_fit)."""
    from pipeline.read_source import read_pairs

    task = {"batch_format": "pyarrow", "num_cpus": cfg.ray.write_num_cpus}
    plan = steps(cfg)
    check_contracts(cfg, plan)
    check_pools_fit(cfg, plan, can_grow)
    # one read task per shard, kept apart from the first actor step (pipeline/read_source.py says how)
    ds = read_pairs(with_images_dir(cfg, specs), read_spec(cfg), duplicates=duplicates, num_cpus=cfg.ray.read_num_cpus)
    for spec in plan:
        if spec.resources is None:  # a task: the stage is built here and shipped with its spec
            ds = ds.map_batches(spec.build(), **task, **({"batch_size": None} if spec.whole_shards else {}))
        else:  # an actor pool: each actor builds the stage from the spec once (a model loads once per actor)
            ds = ds.map_batches(spec.stage, fn_constructor_kwargs={"spec": spec}, **_actor_args(spec.resources))
    return ds.map_batches(write_spec(cfg).build(), **task)


def run_local(cfg: DictConfig, specs: list[dict], instrument: Optional[Callable[[object], None]] = None) -> list[dict]:
    """The steps of the plan in a plain loop in this process, without Ray: each shard read whole, each step
    fed the shard's rows in batches of the step's batch_size (a step without one: the whole shard), then the
    decoy rule's calibration over all rows (label_job). Returns the labelled rows (nothing is written but the
    embedding cache and stage counters). `instrument(stage)` sees every stage once it is built."""
    plan = steps(cfg)
    check_contracts(cfg, plan)
    read = read_spec(cfg)
    shards = [read_shard_table(spec, read).to_pylist() for spec in with_images_dir(cfg, specs)]
    for spec in plan:
        stage = spec.build()
        if instrument is not None:
            instrument(stage)
        size = spec.resources.batch_size if spec.resources is not None else None
        for i, rows in enumerate(shards):
            size_i = size or max(1, len(rows))
            shards[i] = [row for start in range(0, len(rows), size_i)
                         for row in stage(conform(rows[start:start + size_i], WORK_SCHEMA)).to_pylist()]
        del stage  # one model in memory at a time
    rows = [row for rows in shards for row in rows]
    label_job(cfg, rows)
    return rows
