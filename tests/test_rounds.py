"""Generation in rounds: under the fixed rule (bar) with margin 0 the need_reasoning labels are those of a full-K
run, with fewer tokens; candidate k is the same candidate in both; several generators keep their order; under the
decoy rule a pair stops only once its best candidate beats its round-1 decoys; Ray runs the rounds as the
in-process loop does."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline import config
from pipeline.plan import round_schedule, run_local, steps
from schemas import WORK_SCHEMA, conform
from scripts.make_demo_data import make
from stages.generate import Generate, GeneratorSpec, GenerateSpec
from stages.inputs import plan_shards
from stages.select import pair_headroom, satisfied
from stages.side import QUERY

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds-data")
    # a draw where some pairs are helped by their first candidate and others by none: rounds stop at both ends
    return {"path": str(make(root, n_pairs=20, seed=5)), "root": str(root)}


def load(tmp_path, tiny_models, data, *overrides, generators=None):
    """The demo config over `data` with the tiny models; `generators` (name -> k) replaces its generator."""
    job = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    if generators:
        models = [tiny_models["generator"], tiny_models["generator_b"]]
        job["generators"] = [{**job["generators"][0], "name": name, "k": k, "model": str(models[i % 2])}
                             for i, (name, k) in enumerate(generators.items())]
    path = tmp_path / f"job-{len(list(tmp_path.glob('job-*')))}.yaml"
    path.write_text(yaml.safe_dump(job))
    cfg = config.load(path, [f"input.path={data['path']}", f"input.image_root={data['root']}",
                             f"generators.0.model={tiny_models['generator']}", f"embedder.model={tiny_models['embedder']}",
                             f"output.dir={tmp_path / 'out'}", "input.rows_per_shard=10", "scoring.decision.rule=bar",
                             *overrides])
    config.resolve_paths(cfg)
    return cfg


def generate_stage(g: dict, template: str, k_stop: int, satisfied_above=None) -> Generate:
    """A query-side Generate stage of this generator (a config's generators[] entry as a dict)."""
    return GenerateSpec(generator=GeneratorSpec.from_config(g), side=QUERY, template_name=g["template"],
                        template=template, k_stop=k_stop, max_image_pixels=10**7,
                        satisfied_above=satisfied_above).build()


def run(cfg):
    return {r["pair_id"]: r for r in run_local(cfg, plan_shards(config.to_dict(cfg)["input"]))}


def tokens(rows):
    return sum(c["tokens"] for r in rows.values() for c in r["candidates"])


def same_candidate(a, b):
    assert (a["generator"], a["seed"], a["text"], a["tokens"], a["finish_reason"]) == \
           (b["generator"], b["seed"], b["text"], b["tokens"], b["finish_reason"])
    assert (a["s_k"] is None) == (b["s_k"] is None)
    if a["s_k"] is not None:
        np.testing.assert_allclose([a["s_k"], a["delta"]], [b["s_k"], b["delta"]], rtol=0, atol=1e-6)


def check_against_full(rounds, full, threshold):
    """Labels equal; each pair's candidates are the full run's, cut short only once one is above threshold."""
    assert rounds.keys() == full.keys()
    for pid, r in rounds.items():
        f = full[pid]
        assert r["need_reasoning"] == f["need_reasoning"], pid
        by_gen = {}
        for c in f["candidates"]:
            by_gen.setdefault(c["generator"], []).append(c)
        seen = {}
        for c in r["candidates"]:  # per generator, a prefix of the full run's candidates, in generator order
            k = seen.get(c["generator"], 0)
            same_candidate(c, by_gen[c["generator"]][k])
            seen[c["generator"]] = k + 1
        assert [c["generator"] for c in r["candidates"]] == sorted(
            [c["generator"] for c in r["candidates"]], key=list(by_gen).index)
        if len(r["candidates"]) < len(f["candidates"]):
            assert satisfied(r, QUERY, 0.0, threshold)
        else:
            assert r["chosen"] == f["chosen"] and r["best_delta"] == pytest.approx(f["best_delta"], abs=1e-6)


@pytest.fixture(scope="module")
def full(tiny_models, data, tmp_path_factory):
    cfg = load(tmp_path_factory.mktemp("full"), tiny_models, data, "generators.0.k=4", "embedder.cache_dir=null")
    return run(cfg)


def test_round_schedule_and_steps(tiny_models, data, tmp_path):
    gens = {"a": 8, "b": 3}
    cfg = load(tmp_path, tiny_models, data, "rounds.k0=2", "rounds.step=3", generators=gens)
    assert round_schedule(cfg) == [{"a": 2, "b": 2}, {"a": 5, "b": 3}, {"a": 8, "b": 3}]
    plan = [(s.stage.__name__, s.generator.name if hasattr(s, "generator") else None, getattr(s, "k_stop", None),
             getattr(s, "satisfied_above", None)) for s in steps(cfg)]
    assert plan == [("Generate", "a", 2, None), ("Generate", "b", 2, None), ("Embed", None, None, None), ("Score", None, None, None),
                    ("Generate", "a", 5, 0.0), ("Generate", "b", 3, 0.0), ("Embed", None, None, None), ("Score", None, None, None),
                    ("Generate", "a", 8, 0.0), ("Embed", None, None, None), ("Score", None, None, None),
                    ("Select", None, None, None)]
    assert round_schedule(load(tmp_path, tiny_models, data, generators=gens)) == [gens]
    assert round_schedule(load(tmp_path, tiny_models, data, "rounds.k0=9", generators=gens)) == [gens]
    for bad, key in (("rounds.margin=-0.1", "rounds.margin"), ("rounds.k0=0", "rounds.k0"),
                     ("rounds.step=0", "rounds.step"), ("rounds.k_zero=2", "rounds.k_zero")):
        with pytest.raises(config.ConfigError, match=key):
            load(tmp_path, tiny_models, data, bad)


def test_rounds_decide_labels_and_the_cache_folder_does_not(tiny_models, data, tmp_path):
    plain = load(tmp_path, tiny_models, data)
    assert "rounds" not in config.label_config(plain)  # no rounds: the hash of a run made before rounds existed
    assert config.config_hash(load(tmp_path, tiny_models, data, "embedder.cache_dir=/elsewhere")) == config.config_hash(plain)
    assert config.config_hash(load(tmp_path, tiny_models, data, "rounds.k0=2")) != config.config_hash(plain)
    assert plain.embedder.cache_dir == str(tmp_path / "out" / "_cache" / "embeddings")


def test_margin_zero_keeps_need_reasoning_with_fewer_tokens(full, tiny_models, data, tmp_path):
    cfg = load(tmp_path, tiny_models, data, "generators.0.k=4", "rounds.k0=1", "rounds.step=1")
    rounds = run(cfg)
    check_against_full(rounds, full, threshold=0.0)
    assert tokens(rounds) < tokens(full)
    assert any(len(r["candidates"]) < 4 for r in rounds.values())  # some pairs stopped early...
    assert any(len(r["candidates"]) == 4 for r in rounds.values())  # ...and some ran every round


def test_a_margin_no_pair_reaches_samples_like_a_full_run(full, tiny_models, data, tmp_path):
    rounds = run(load(tmp_path, tiny_models, data, "generators.0.k=4", "rounds.k0=2", "rounds.step=1",
                      "rounds.margin=1000"))
    check_against_full(rounds, full, threshold=1000.0)
    assert tokens(rounds) == tokens(full)


def test_several_generators_in_rounds(tiny_models, data, tmp_path):
    gens = {"a": 3, "b": 2}
    full = run(load(tmp_path, tiny_models, data, "embedder.cache_dir=null", generators=gens))
    rounds = run(load(tmp_path, tiny_models, data, "rounds.k0=1", "rounds.step=1", generators=gens))
    check_against_full(rounds, full, threshold=0.0)
    assert tokens(rounds) < tokens(full)


def test_a_satisfied_pair_gets_nothing_more(tiny_models, data, tmp_path):
    cfg = load(tmp_path, tiny_models, data, "generators.0.k=3")
    g = config.to_dict(cfg)["generators"][0]
    stage = generate_stage(g, "Query: {query}", k_stop=3, satisfied_above=0.0)
    row = {"pair_id": "p", "query_text": "a query", "query_image": None, "target_text": "t",
           "candidates": [{"generator": g["name"], "text": "r", "valid": True, "delta": 0.5, "finish_reason": "stop"}]}
    assert len(stage(conform([row], WORK_SCHEMA)).to_pylist()[0]["candidates"]) == 1
    row["candidates"][0]["delta"] = -0.5  # not above epsilon: samples candidates 1 and 2
    out = stage(conform([row], WORK_SCHEMA)).to_pylist()[0]["candidates"]
    assert len(out) == 3 and stage.stats["rows_satisfied"] == 1 and stage.stats["samples"] == 2


def test_under_the_decoy_rule_a_pair_stops_only_once_it_beats_its_decoys(tiny_models, data, tmp_path):
    """The decoys are drawn in round 1 for every slot of K_max (valid texts of round 1), so a pair that stops early
    already beats all of them and its bar: it wins its decoy competition as it would with K_max candidates. The
    rounds' margin is a share of the pair's headroom, as the calibrated margin is: a pair stops once its lead
    (null_score) passes it, and a shorter prefix of its candidates had not."""
    bigger = {"path": str(make(tmp_path / "data", n_pairs=40, seed=3)), "root": str(tmp_path / "data")}
    margin = 0.03  # below some pairs' lead as a share of their headroom and above it in delta's units
    cfg = load(tmp_path, tiny_models, bigger, "scoring.decision.rule=decoys", "generators.0.k=4", "rounds.k0=1",
               "rounds.step=1", "scoring.valid_finish_reasons=[stop,length]", "input.rows_per_shard=40",
               "scoring.in_shard_negatives=0", f"rounds.margin={margin}")
    plan = [s.stage.__name__ for s in steps(cfg)]
    assert plan[:4] == ["Generate", "Decoys", "Embed", "Score"] and plan.count("Decoys") == 1
    rows = run(cfg)
    stopped = [r for r in rows.values() if 0 < len(r["candidates"]) < 4]
    assert stopped and any(len(r["candidates"]) == 4 for r in rows.values())
    for r in rows.values():  # four decoys each (one per slot), from other pairs
        assert len(r["decoys"]) == 4 and all(d["donor_pair_id"] != r["pair_id"] for d in r["decoys"])

    def threshold(r):  # the rounds' threshold, as the README states it
        return max(r["base_threshold"], *(d["delta"] for d in r["decoys"])) + margin * pair_headroom(r)

    for r in stopped:
        assert r["best_delta"] > threshold(r)
        assert r["null_score"] > margin
    for r in rows.values():  # each round that went on had a prefix below the threshold
        for n in range(1, len(r["candidates"])):
            best = max((c["delta"] for c in r["candidates"][:n] if c["valid"]), default=None)
            assert best is None or r["null_score"] is None or best <= threshold(r)


@pytest.mark.slow
def test_rounds_through_ray_match_the_local_loop(tiny_models, data, tmp_path):
    """The shipped decoy rule in rounds, through Ray and in the plain loop: the same candidates, decoys and labels."""
    overrides = ["generators.0.k=4", "rounds.k0=2", "rounds.step=2", "scoring.decision.rule=decoys"]
    local = run(load(tmp_path, tiny_models, data, *overrides))
    out = tmp_path / "ray-out"
    # 2 rounds x (generator + embedder) pools, plus reads and writes, on 2 cores
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "configs/demo.yaml", f"input.path={data['path']}",
         f"input.image_root={data['root']}", f"generators.0.model={tiny_models['generator']}",
         f"embedder.model={tiny_models['embedder']}", f"output.dir={out}", "input.rows_per_shard=10", *overrides,
         "generators.0.resources.num_cpus=0.25", "embedder.resources.num_cpus=0.25", "--overwrite"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ray_rows = {r["pair_id"]: r for r in pq.read_table(out / "data").to_pylist()}
    assert ray_rows.keys() == local.keys()
    for pid, r in ray_rows.items():
        assert len(r["candidates"]) == len(local[pid]["candidates"])
        for a, b in zip(r["candidates"], local[pid]["candidates"]):
            same_candidate(a, b)
        assert [(d["donor_pair_id"], d["donor_candidate"]) for d in r["decoys"]] == \
               [(d["donor_pair_id"], d["donor_candidate"]) for d in local[pid]["decoys"]]
        for key in ("decision", "need_reasoning", "chosen", "null_score", "help_threshold"):
            assert r[key] == pytest.approx(local[pid][key], abs=1e-6) if isinstance(r[key], float) else \
                r[key] == local[pid][key], (pid, key)
    assert tokens(ray_rows) == tokens(local)
    assert (out / "_cache" / "embeddings").is_dir() and list((out / "_stats").glob("generate-*.json"))


def test_precomputed_rationales_continue_where_the_last_round_stopped(tmp_path):
    path = tmp_path / "rationales.jsonl"
    path.write_text('{"pair_id": "p", "rationales": ["first", "second", "third"]}\n')
    g = {"name": "pre", "backend": "precomputed", "model": "precomputed", "k": 3, "template": "query_only",
         "rationale": "both", "seed": 0, "trust_remote_code": False, "options": {"path": str(path)},
         "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8}}
    row = {"pair_id": "p", "query_text": "a query", "query_image": None, "target_text": "t"}
    row = generate_stage(g, "{query}", k_stop=1)(conform([row], WORK_SCHEMA)).to_pylist()[0]
    row["candidates"][0].update(valid=True, delta=-1.0)
    later = generate_stage(g, "{query}", k_stop=3, satisfied_above=0.0)(conform([row], WORK_SCHEMA)).to_pylist()[0]
    assert [c["text"] for c in later["candidates"]] == ["first", "second", "third"]


def test_reads_stay_one_task_per_shard_when_resources_match(local_ray, tiny_models, data, tmp_path):
    """With read_num_cpus equal to the actors' num_cpus, Ray Data would fuse the read into the first Generate
    actor step, which then reads a batch_size of shards in one call before passing anything on."""
    from ray.data._internal.util import explain_plan  # what Dataset.explain() prints

    from pipeline.plan import build_dataset

    cfg = load(tmp_path, tiny_models, data, "ray.read_num_cpus=0.25", "generators.0.resources.num_cpus=0.25",
               "embedder.resources.num_cpus=0.25")
    specs = plan_shards(config.to_dict(cfg)["input"])
    optimized = explain_plan(build_dataset(cfg, specs)._logical_plan).split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[ReadPairShards]" in optimized
    assert "ActorPoolMapOperator[MapBatches(Generate)]" in optimized


# --------------------------------------------------------------------------- the stage contracts of the plan


@pytest.mark.parametrize("overrides", [[], ["generators.0.k_target=2"], ["rounds.k0=1", "rounds.step=1"],
                                       ["rounds.k0=1", "rounds.step=1", "generators.0.k_target=2"],
                                       ["scoring.mode=pair_aware", "scoring.controls=[ok]"]])
def test_each_plan_holds_its_contract_chain_and_a_missing_stage_breaks_it(tiny_models, data, tmp_path, overrides):
    """check_contracts (run by build_dataset and run_local) over every plan shape: each column a stage reads is
    written upstream. Without the embed steps, score reads similarities that no stage writes: the plan fails
    before any work, naming the stage and the column."""
    from pipeline.plan import check_contracts
    from stages.contract import ContractError
    from stages.embed import Embed

    cfg = load(tmp_path, tiny_models, data, *overrides)
    plan = steps(cfg)
    check_contracts(cfg, plan)
    with pytest.raises(ContractError, match=r"stage score: column (s_direct|candidates\.s_k)"):
        check_contracts(cfg, [s for s in plan if s.stage is not Embed])


def test_generate_changes_only_its_declared_columns(tmp_path):
    """A real Generate (precomputed backend) over a batch whose other columns hold values: they come back as they
    were (Arrow, never through Python); a contract without the candidates column makes the same stage fail."""
    from stages.contract import Contract, ContractError

    path = tmp_path / "rationales.jsonl"
    path.write_text('{"pair_id": "p", "rationales": ["first", "second"]}\n')
    g = {"name": "pre", "backend": "precomputed", "model": "precomputed", "k": 2, "template": "query_only",
         "rationale": "both", "seed": 0, "trust_remote_code": False, "options": {"path": str(path)},
         "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 8}}
    ref = {"path": "/nowhere.png", "offset": 0, "size": 3, "digest": "sha256:" + "0" * 64}
    row = {"pair_id": "p", "query_text": "a query", "target_text": "t", "target_image": ref, "s_direct": 0.25,
           "negatives": [{"text": "n", "image_path": "x.png", "image": ref, "origin": "explicit"}], "raw": "kept"}
    batch = conform([row], WORK_SCHEMA)
    stage = generate_stage(g, "{query}", k_stop=2)
    out = stage(batch)
    assert [c["text"] for c in out["candidates"].to_pylist()[0]] == ["first", "second"]
    for name in WORK_SCHEMA.names:
        if name != "candidates":
            assert out[name].equals(batch[name]), name
    stage._contract = Contract("generate[pre]", stage._contract.reads, ("quarantine_reason", "quarantine_detail"))
    with pytest.raises(ContractError, match="candidates"):
        stage(batch)
