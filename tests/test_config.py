"""A bad config fails fast, before Ray starts or a model loads, with a message that names the key."""
import subprocess
import sys

import pytest

from pipeline import config
from pipeline.config import ConfigError
from stages.backends import EMBEDDER_BACKENDS, GENERATOR_BACKENDS, NOT_LABEL_OPTIONS

REPO = config.REPO_ROOT


@pytest.fixture
def job(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "gen").mkdir()
    (tmp_path / "emb").mkdir()
    path = tmp_path / "job.yaml"
    path.write_text(
        f"input: {{path: {tmp_path}/pairs.jsonl, image_root: {tmp_path}/images}}\n"
        f"generators:\n  - {{name: g, model: {tmp_path}/gen}}\n"
        f"embedder: {{model: {tmp_path}/emb}}\n"
    )
    return path


def test_defaults_fill_a_minimal_config(job):
    cfg = config.load(job, ["output.dir=/tmp/x"])
    g = cfg.generators[0]
    assert g.k == 4 and g.backend == "transformers" and g.resources.num_cpus == 0.5  # from default.yaml
    assert cfg.scoring.epsilon == 0.0 and cfg.output.dir == "/tmp/x"


@pytest.mark.parametrize(
    "override, key",
    [
        ("scoring.mode=softmax", "scoring.mode"),
        ("scoring.temperature=0", "scoring.temperature"),
        ("scoring.tempreature=0.1", "scoring.tempreature"),  # a typo is an unknown key
        ("generators.0.k=many", "generators[0].k"),
        ("generators.0.k=0", "generators[0].k"),
        ("generators.0.template=nope", "generators[0].template"),
        ("generators.0.backend=tgi", "generators[0].backend"),
        ("generators.0.resources.batch_size=0", "generators[0].resources.batch_size"),
        ("embedder.model=/no/such/model", "embedder.model"),
        ("embedder.pooling=cls", "embedder.pooling"),
        ("embedder.reasoned_query_instruction=Query", "embedder.reasoned_query_instruction"),
        ("input.format=csv", "input.format"),
        ("input.image_root=/no/such/dir", "input.image_root"),
        ("input.rows_per_shard=0", "input.rows_per_shard"),
    ],
)
def test_bad_value_names_the_key(job, override, key):
    with pytest.raises(ConfigError) as e:
        config.load(job, [override])
    assert str(e.value).startswith(f"{key}:"), str(e.value)


@pytest.mark.parametrize("backend", GENERATOR_BACKENDS)
def test_every_registered_generator_backend_is_a_choice(job, tmp_path, backend):
    rationales = tmp_path / "rationales.jsonl"  # what the precomputed backend reads; the others ignore it
    rationales.write_text("")
    cfg = config.load(job, [f"generators.0.backend={backend}", f"generators.0.options.path={rationales}"])
    assert cfg.generators[0].backend == backend


@pytest.mark.parametrize("backend", EMBEDDER_BACKENDS)
def test_every_registered_embedder_backend_is_a_choice(job, backend):
    assert config.load(job, [f"embedder.backend={backend}"]).embedder.backend == backend


def test_an_unknown_backend_lists_the_registered_ones(job):
    with pytest.raises(ConfigError) as e:
        config.load(job, ["generators.0.backend=tgi"])
    assert str(e.value) == f"generators[0].backend: must be one of {', '.join(GENERATOR_BACKENDS)}; got 'tgi'"
    with pytest.raises(ConfigError) as e:
        config.load(job, ["embedder.backend=tgi"])
    assert str(e.value) == f"embedder.backend: must be one of {', '.join(EMBEDDER_BACKENDS)}; got 'tgi'"


def test_missing_required_key(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("output: {dir: out}\n")
    with pytest.raises(ConfigError, match=r"^input\.path:"):
        config.load(path)


def test_duplicate_generator_names(job, tmp_path):
    with pytest.raises(ConfigError, match=r"^generators\[1\]\.name:"):
        config.load(job, [f"generators=[{{name: g, model: {tmp_path}/gen}}, {{name: g, model: {tmp_path}/gen}}]"])


def test_hash_follows_label_keys_only(job):
    a = config.load(job)
    assert config.config_hash(a) == config.config_hash(config.load(job, ["output.dir=/elsewhere"]))
    assert config.config_hash(a) == config.config_hash(config.load(job, ["generators.0.resources.pool_size=4"]))
    assert config.config_hash(a) != config.config_hash(config.load(job, ["scoring.epsilon=0.1"]))
    # how to reach a served model is not a label: a resumed run may use another port or timeout
    assert config.config_hash(a) == config.config_hash(config.load(
        job, ["generators.0.options.base_url=http://127.0.0.1:9001/v1", "generators.0.options.timeout_s=5"]))
    assert config.config_hash(a) != config.config_hash(config.load(job, ["generators.0.options.use_n=false"]))
    for option in NOT_LABEL_OPTIONS:  # the backend registry says which options these are
        assert config.config_hash(a) == config.config_hash(config.load(job, [f"generators.0.options.{option}=7"]))


def test_cli_fails_fast_with_exit_2_and_the_key(job):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(job), "scoring.mode=bogus"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "scoring.mode" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr + proc.stdout


def test_cli_takes_overrides_after_flags(job):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(job), "--overwrite", "scoring.mode=bogus"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "scoring.mode" in proc.stderr  # the override was read


def test_rounds_refuse_n_choices_per_request(job):
    served = ["generators.0.backend=openai", "generators.0.model=served-name"]
    with pytest.raises(ConfigError, match=r"^generators\[0\]\.options\.use_n:"):
        config.load(job, [*served, "rounds.k0=2"])
    config.load(job, [*served, "rounds.k0=2", "generators.0.options.use_n=false"])
    config.load(job, served)  # without rounds, n choices per request are fine
