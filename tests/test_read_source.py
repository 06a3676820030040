"""The read step as a Ray Data datasource (pipeline/read_source.py), in a real local Ray: one read task and one
block per shard holding exactly `read_shard`'s rows, the duplicate index waited for, and read tasks that Ray Data
keeps apart from the first actor step."""
import contextlib
import io
import re
import time
from pathlib import Path

import pytest

import schemas
from pipeline.read_source import read_pairs
from scripts.make_demo_data import make as make_demo
from stages.duplicates import find_duplicates, index_pair_ids
from stages.inputs import plan_shards
from stages.read import ReadSpec, read_shard

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[dict, list[dict]]:
    """Demo pairs with a broken line and three pairs repeated in the last shard: 44 rows in shards of 16."""
    root = tmp_path_factory.mktemp("read-source")
    jsonl = Path(make_demo(root, n_pairs=40, seed=0))
    lines = jsonl.read_text().splitlines()
    jsonl.write_text("\n".join(lines + ["{broken"] + lines[:3]) + "\n")
    cfg = {"path": str(jsonl), "format": "mmeb", "image_root": str(root), "subset": None, "rows_per_shard": 16,
           "max_query_chars": 20000, "max_image_pixels": 40_000_000}
    return cfg, plan_shards(cfg)


def physical_plan(ds) -> list[str]:
    """The operators of the optimized physical plan, as `Dataset.explain` prints them."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ds.explain()
    optimized = out.getvalue().split("-------- Physical Plan (Optimized) --------")[1]
    return [line.strip(" +-") for line in optimized.strip().splitlines()]


class PassThrough:
    """An actor-pool step as the model steps are (a callable class)."""

    def __call__(self, batch):
        return batch


def test_one_task_and_one_block_per_shard_with_read_shards_rows_after_the_duplicate_index(local_ray, demo,
                                                                                          tmp_path):
    ray = local_ray
    cfg, specs = demo
    assert len(specs) == 3
    dest, keys = tmp_path / "duplicates.parquet", tmp_path / "keys"

    def index_late() -> dict:  # pipeline/run.py:start_duplicate_index's tasks, late (local: pickled by value)
        time.sleep(3)
        keys.mkdir()
        index_pair_ids(specs, ReadSpec.from_input(cfg, 0, 0), str(keys))
        return {"path": str(dest), "rows": find_duplicates(str(keys), str(dest))}

    duplicates = ray.remote(num_cpus=0.25)(index_late).remote()
    ds = read_pairs(specs, ReadSpec.from_input(cfg, 2, 7), duplicates=duplicates, num_cpus=0.25)
    assert not dest.exists()  # the index task is still sleeping: only a read that waits for it finds the file
    blocks = ray.get(ds.to_arrow_refs())

    assert len(blocks) == len(specs)
    by_shard = {}
    for block in blocks:
        assert block.schema == schemas.WORK_SCHEMA
        (shard_id,) = set(block.column("shard_id").to_pylist())  # a block holds one shard, whole
        by_shard[shard_id] = block.to_pylist()
    for spec in specs:
        expected = read_shard({**spec, "duplicates": str(dest)}, ReadSpec.from_input(cfg, 2, 7))
        assert by_shard[spec["shard_id"]] == schemas.conform(expected, schemas.WORK_SCHEMA).to_pylist()
    reasons = [r["quarantine_reason"] for rows in by_shard.values() for r in rows]
    assert len(reasons) == 44 and reasons.count("malformed_record") == 1
    # the repeats are found across shards, which only the index can see: the read did use it
    assert reasons.count("duplicate_pair_id") == 3 == ray.get(duplicates)["rows"]
    stats = ds.stats()
    assert re.search(rf"ReadPairShards: {len(specs)} tasks executed, {len(specs)} blocks produced", stats), stats


def test_the_read_is_not_fused_into_the_next_actor_step_even_with_equal_num_cpus(local_ray, demo):
    ray = local_ray
    cfg, specs = demo
    ds = read_pairs(specs, ReadSpec.from_input(cfg, 0, 0), num_cpus=0.5)

    def then_actors(batch_size):
        return ds.map_batches(PassThrough, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5,
                              batch_size=batch_size, batch_format="pyarrow")

    # as every model step of the plan: an int batch_size (config resources.batch_size), same num_cpus as the read
    assert physical_plan(then_actors(8)) == ["ActorPoolMapOperator[MapBatches(PassThrough)]",
                                             "TaskPoolMapOperator[ReadPairShards]", "InputDataBuffer[Input]"]
    # without a batch_size Ray Data does fuse them (each actor call would read shards itself): what the check
    # above tells apart
    assert physical_plan(then_actors(None))[0] == "ActorPoolMapOperator[ReadPairShards->MapBatches(PassThrough)]"



def test_in_the_jobs_plan_the_read_stays_its_own_operator(local_ray, demo, tiny_models, tmp_path):
    """pipeline/plan.py's whole plan, the reads with the same num_cpus as the generator's actors (their worst
    case: equal remote args)."""
    from pipeline import config
    from pipeline.plan import build_dataset

    input_cfg, specs = demo
    cfg = config.load(REPO / "configs" / "demo.yaml", [
        f"input.path={input_cfg['path']}", f"input.image_root={input_cfg['image_root']}", "input.rows_per_shard=16",
        f"generators.0.model={tiny_models['generator']}", f"embedder.model={tiny_models['embedder']}",
        f"output.dir={tmp_path / 'out'}"])
    cfg.ray.read_num_cpus = cfg.generators[0].resources.num_cpus
    operators = physical_plan(build_dataset(cfg, specs))
    assert "TaskPoolMapOperator[ReadPairShards]" in operators, operators
    assert operators[operators.index("TaskPoolMapOperator[ReadPairShards]") - 1].startswith(
        "ActorPoolMapOperator[MapBatches(Generate)"), operators  # the first generate step comes right after
