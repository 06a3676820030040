"""A reasoning pool end to end: two tiny transformers generators plus the tiny model served over real HTTP by
scripts/serve_openai.py (a subprocess on 127.0.0.1), one job through the CLI, pooled labels and per-generator
figures out. Then the same job against a server that rate-limits, fails, stalls and drops connections."""
import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from PIL import Image

from scripts import serve_openai
from tests import job_runs
from stages.backends.base import IMAGE_MARKER, GenRequest
from stages.backends.openai_http import OpenAIGenerator
from stages.generate import candidate_seed

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

SERVED = "tiny-qwen2vl"  # configs/pool.yaml: generators.2.model
GENERATORS = ("tiny-qwen", "tiny-qwen-b", "served-qwen")
K = 2
FAIL_QUERY = "What is 10 plus 537?"  # one facts_t2t query of the demo_data fixture
FAULTS = ["--rate-limit-every", "4", "--retry-after", "1", "--error-every", "5", "--slow-every", "7",
          "--slow-s", "4", "--reset-every", "9", "--fail-matching", FAIL_QUERY]


@pytest.fixture(scope="module")
def server(tiny_models):
    proc, url = serve_openai.spawn(tiny_models["generator"], SERVED)
    yield url
    serve_openai.stop(proc)


def pool_args(tiny_models, demo_data, out, url, *extra):
    return [f"input.path={demo_data['path']}", f"input.image_root={demo_data['root']}",
            f"generators.0.model={tiny_models['generator']}", f"generators.1.model={tiny_models['generator_b']}",
            f"generators.2.options.base_url={url}", f"embedder.model={tiny_models['embedder']}",
            f"output.dir={out}", "input.rows_per_shard=16", *(f"generators.{i}.k={K}" for i in range(3)), *extra]


def run_pool(*args):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "configs/pool.yaml", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def server_stats(url: str) -> dict:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=10) as r:
        return json.load(r)


def read_job(out: Path, stdout: str) -> dict:
    return {"out": out, "stdout": stdout, "manifest": json.loads((out / "manifest.json").read_text()),
            "rows": pq.read_table(out / "data").to_pylist()}


@pytest.fixture(scope="module")
def pool_job(tiny_models, demo_data, server, tmp_path_factory):
    """The pool under the fixed rule: the tiny generators write noise, which the decoy rule rightly labels no pair
    reason for, and the per-generator figures need chosen rationales."""
    out = tmp_path_factory.mktemp("pool") / "out"
    proc = run_pool(*pool_args(tiny_models, demo_data, out, server, "scoring.decision.rule=bar"))
    return {**read_job(out, proc.stdout), "url": server}


@pytest.fixture(scope="module")
def faulty_job(tiny_models, demo_data, tmp_path_factory):
    proc, url = serve_openai.spawn(tiny_models["generator"], SERVED, *FAULTS)
    try:
        out = tmp_path_factory.mktemp("pool-faults") / "out"
        # a client timeout below the server's --slow-s (the openai client backs off 0.5 s doubling, or as
        # Retry-After says)
        job = run_pool(*pool_args(tiny_models, demo_data, out, url, "generators.2.options.timeout_s=2",
                                  "generators.2.options.max_retries=4"))
        stats = server_stats(url)
    finally:
        serve_openai.stop(proc)
    return {**read_job(out, job.stdout), "server": stats}


# -- the server on its own ------------------------------------------------------------------------------


def test_served_model_samples_what_the_local_backend_samples(server, tiny_models, demo_data):
    from stages.backends.hf import TransformersGenerator

    image = Image.open(Path(demo_data["root"]) / "images" / "shapes_cls" / "00000.png").convert("RGB")
    requests = [GenRequest(f"{IMAGE_MARKER}Describe the image.", image, [3, 4, 5], 1.0, 0.95, 16),
                GenRequest("Query: what is 2 plus 2?", None, [7], 1.0, 0.95, 16)]
    local = TransformersGenerator(str(tiny_models["generator"])).generate(requests)
    per_seed = OpenAIGenerator(SERVED, base_url=server, use_n=False).generate(requests)
    with_n = OpenAIGenerator(SERVED, base_url=server, use_n=True).generate(requests)
    for here, served, served_n in zip(local, per_seed, with_n):
        assert [(g.text, g.finish_reason, g.tokens) for g in served] == [
            (g.text, g.finish_reason, g.tokens) for g in here]
        # with n, choice i is sampled with seed + i; the seeds above are consecutive
        assert [g.text for g in served_n] == [g.text for g in here]
        assert sum(g.tokens for g in served_n) == sum(g.tokens for g in here)  # usage.completion_tokens
    assert any(g.text for gens in local for g in gens)


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_server_protocol(server):
    with urllib.request.urlopen(server + "/models", timeout=10) as r:
        assert [m["id"] for m in json.load(r)["data"]] == [SERVED]
    message = [{"role": "user", "content": "Query: a red car"}]
    status, body = post(server, {"model": SERVED, "messages": message, "n": 2, "seed": 1, "max_tokens": 8})
    assert status == 200 and len(body["choices"]) == 2
    usage = body["usage"]
    assert usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] <= usage["prompt_tokens"] + 16
    assert {c["finish_reason"] for c in body["choices"]} <= {"stop", "length"}
    assert post(server, {"model": "gpt-4o", "messages": message})[0] == 404
    assert post(server, {"model": SERVED, "messages": message, "stream": True})[0] == 400
    status, body = post(server, {"model": SERVED, "messages": message, "top_p": 0})
    assert status == 400 and "top_p" in body["error"]["message"]
    remote_image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    assert post(server, {"model": SERVED, "messages": remote_image})[0] == 400


# -- the pooled job ----------------------------------------------------------------------------------------


def test_every_pair_written_once_with_candidates_from_every_generator(pool_job, demo_data):
    m = pool_job["manifest"]
    assert m["status"] == "complete"
    assert m["counts"]["pairs_written"] == demo_data["valid_rows"] and m["counts"]["pairs_quarantined"] == 0
    rows = pool_job["rows"]
    assert len({r["pair_id"] for r in rows}) == len(rows) == demo_data["valid_rows"]
    served_model = f"openai:{SERVED}@{pool_job['url']}"
    for row in rows:
        cands = row["candidates"]
        # pooled in config order, K per generator
        assert [c["generator"] for c in cands] == [g for g in GENERATORS for _ in range(K)]
        for i, c in enumerate(cands):
            assert c["seed"] == candidate_seed(0, c["generator"], row["pair_id"], i % K)
            assert c["finish_reason"] != "error", c["error"]
        assert {c["model"] for c in cands if c["generator"] == "served-qwen"} == {served_model}
        if row["chosen"] is not None:
            assert row["chosen_generator"] == cands[row["chosen"]]["generator"]
    chosen_from = {r["chosen_generator"] for r in rows if r["need_reasoning"]}
    assert chosen_from <= set(GENERATORS) and len(chosen_from) >= 2  # the pool is used, not one generator


def test_generator_figures_in_the_manifest_agree_with_the_shards(pool_job):
    """Each manifest figure recomputed with polars from the columns a user has."""
    m = pool_job["manifest"]
    assert list(m["generators"]) == sorted(GENERATORS)  # manifest.json is written with sorted keys
    pairs = pl.scan_parquet(str(pool_job["out"] / "data" / "*.parquet"))
    cands = pairs.select(pl.col("candidates").explode()).unnest("candidates")
    per_gen = (cands.group_by("generator")
               .agg(pl.len().alias("candidates"), pl.col("valid").sum().alias("valid"),
                    pl.col("delta").filter("valid").mean().alias("mean_delta"), pl.col("tokens").sum().alias("tokens"))
               .collect())
    invalid = cands.filter(~pl.col("valid")).group_by("generator", "finish_reason").len().collect()
    chosen = (pairs.filter("need_reasoning").group_by("chosen_generator")
              .agg(pl.len().alias("chosen"), pl.col("best_delta").mean().alias("mean_chosen_delta")).collect())
    need = pairs.select(pl.col("need_reasoning").sum()).collect().item()
    assert need == m["counts"]["need_reasoning"] > 0
    for g in per_gen.iter_rows(named=True):
        figures = m["generators"][g["generator"]]
        assert figures["candidates"] == g["candidates"] == pool_job["manifest"]["counts"]["pairs_written"] * K
        assert figures["valid"] == g["valid"]
        assert figures["tokens"] == g["tokens"] > 0
        assert figures["mean_delta"] == pytest.approx(g["mean_delta"])
        mine = invalid.filter(pl.col("generator") == g["generator"])
        assert figures["invalid_by_reason"] == dict(zip(mine["finish_reason"], mine["len"]))
        assert figures["valid"] + sum(figures["invalid_by_reason"].values()) == figures["candidates"]
        mine = chosen.filter(pl.col("chosen_generator") == g["generator"])
        assert figures["chosen"] == mine["chosen"].item()
        assert figures["chosen_share"] == pytest.approx(mine["chosen"].item() / need)
        assert figures["mean_chosen_delta"] == pytest.approx(mine["mean_chosen_delta"].item())
    assert sum(g["chosen_share"] for g in m["generators"].values()) == pytest.approx(1.0)
    assert sum(g["candidates"] for g in m["generators"].values()) == m["counts"]["candidates"]
    assert m["generators"]["served-qwen"]["backend"] == "openai"


def test_cli_prints_per_generator_figures(pool_job):
    for name, g in pool_job["manifest"]["generators"].items():
        line = (f"generator {name}: {g['candidates']} candidates, {g['valid']} valid, chosen {g['chosen']}, "
                f"mean delta {g['mean_delta']:+.4f}")
        assert line in pool_job["stdout"]


# -- the pooled job against a faulty server ----------------------------------------------------------------


def test_faulty_server_loses_no_pair(faulty_job, pool_job, demo_data):
    injected = faulty_job["server"]["injected"]
    assert all(injected[kind] > 0 for kind in ("rate_limit", "error", "slow", "reset", "fail")), injected
    m = faulty_job["manifest"]
    assert m["status"] == "complete" and m["counts"]["pairs_written"] == demo_data["valid_rows"]
    clean = {r["pair_id"]: r for r in pool_job["rows"]}
    failed_pairs = 0
    for row in faulty_job["rows"]:
        cands, reference = row["candidates"], clean[row["pair_id"]]["candidates"]
        assert [c["generator"] for c in cands] == [c["generator"] for c in reference]
        if FAIL_QUERY in row["query_text"]:
            failed_pairs += 1
            served = [c for c in cands if c["generator"] == "served-qwen"]
            assert all(c["finish_reason"] == "error" and not c["valid"] for c in served)
            assert all("HTTP 500" in c["error"] and "gave up after 5 attempts" in c["error"] for c in served)
            assert row["chosen_generator"] != "served-qwen"
            others = [(c["text"], c["finish_reason"]) for c in cands if c["generator"] != "served-qwen"]
            assert others == [(c["text"], c["finish_reason"]) for c in reference if c["generator"] != "served-qwen"]
        else:
            # retried requests come back with exactly what the clean run got: seeded per candidate
            assert [(c["text"], c["finish_reason"], c["error"]) for c in cands] == [
                (c["text"], c["finish_reason"], c["error"]) for c in reference]
    assert failed_pairs == 1
    served = m["generators"]["served-qwen"]
    assert served["invalid_by_reason"]["error"] == K == m["counts"]["candidates_invalid_by_reason"]["error"]
    assert served["candidates"] == demo_data["valid_rows"] * K


# -- the cluster example -------------------------------------------------------------------------------------


def test_cluster_config_checks_and_fits_four_gpus():
    from pipeline import config

    cfg = config.load(REPO / "configs" / "cluster-qwen25vl-7b.yaml",
                      ["input.path=/shared/train.jsonl", "output.dir=/shared/out"])
    (gen,) = cfg.generators
    assert (gen.backend, gen.model) == ("vllm", "Qwen/Qwen2.5-VL-7B-Instruct")
    stages = [gen.resources, cfg.embedder.resources]
    assert sum(r.num_gpus * r.pool_size for r in stages) == 4
    assert "VLM2Vec" in cfg.embedder.model and cfg.embedder.pooling == "last"
    with pytest.raises(config.ConfigError, match="input.path"):  # no silent default for where the data is
        config.load(REPO / "configs" / "cluster-qwen25vl-7b.yaml")


def test_a_pair_that_no_generator_answered_is_quarantined_not_labelled(tiny_models, demo_data, tmp_path):
    """A served generator that is down: every candidate is an error, so nothing was tested, and the pairs go to
    quarantine as generation_failed instead of being written with need_reasoning = false."""
    import yaml

    from pipeline import config
    from pipeline.plan import run_local
    from stages.inputs import plan_shards

    port = job_runs.free_port()  # nobody listens on it: connections are refused
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"generators": [{
        "name": "down", "backend": "openai", "model": SERVED, "k": 2,
        "options": {"base_url": f"http://127.0.0.1:{port}/v1", "max_retries": 0, "timeout_s": 5}}]}))
    cfg = config.load(job, [f"input.path={demo_data['path']}", f"input.image_root={demo_data['root']}",
                            f"embedder.model={tiny_models['embedder']}", f"output.dir={tmp_path / 'out'}",
                            "input.rows_per_shard=8"])
    config.resolve_paths(cfg)
    rows = run_local(cfg, plan_shards(config.to_dict(cfg)["input"])[:1])
    assert len(rows) == 8
    assert {r["quarantine_reason"] for r in rows} == {"generation_failed"}
    assert all("cannot reach" in r["quarantine_detail"] and r["need_reasoning"] is None for r in rows)
