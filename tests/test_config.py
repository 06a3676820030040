"""A bad config fails fast, before Ray starts or a model loads, with a message that names the key; backend
options are checked against their backend's declaration, and only label options enter the label hash."""
import subprocess
import sys
import typing

import pytest

from pipeline import config
from pipeline.config import ConfigError
from stages.backends import EMBEDDER_BACKENDS, GENERATOR_BACKENDS, embedder_class, generator_class

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


@pytest.fixture
def rationales(tmp_path):
    path = tmp_path / "rationales.jsonl"
    path.write_text("")
    return path


def select(prefix: str, backend: str, rationales) -> list[str]:
    """The overrides that make the entry at `prefix` use `backend` (precomputed needs its file)."""
    return [f"{prefix}.backend={backend}"] + ([f"{prefix}.options.path={rationales}"] * (backend == "precomputed"))


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
        ("scoring.decision.decoys_per_candidate=0.5", "scoring.decision.decoys_per_candidate"),  # groups of k
        ("scoring.decision.decoys_per_candidate=1.5", "scoring.decision.decoys_per_candidate"),
        # backend options: a type, a choice, a bound (stages/backends/options.py)
        ("embedder.options.batch_size=four", "embedder.options.batch_size"),
        ("embedder.options.batching=exakt", "embedder.options.batching"),
        ("embedder.options.length_bucket=0", "embedder.options.length_bucket"),
        ("generators.0.options.max_batch_tokens=[1]", "generators[0].options.max_batch_tokens"),
    ],
)
def test_bad_value_names_the_key(job, override, key):
    with pytest.raises(ConfigError) as e:
        config.load(job, [override])
    assert str(e.value).startswith(f"{key}:"), str(e.value)


@pytest.mark.parametrize("backend", GENERATOR_BACKENDS)
def test_every_registered_generator_backend_is_a_choice(job, rationales, backend):
    cfg = config.load(job, select("generators.0", backend, rationales))
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
    served = config.load(job, ["generators.0.backend=openai"])
    assert config.config_hash(served) == config.config_hash(config.load(job, [
        "generators.0.backend=openai", "generators.0.options.base_url=http://127.0.0.1:9001/v1",
        "generators.0.options.timeout_s=5"]))
    assert config.config_hash(served) != config.config_hash(config.load(
        job, ["generators.0.backend=openai", "generators.0.options.use_n=false"]))
    # every backend's speed-only options: tests/test_backend_options.py


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


# ------------------------------------------------------------------ backend options (stages/backends/options.py)
ENTRIES = [("generators.0", b, generator_class(b)) for b in GENERATOR_BACKENDS] + \
          [("embedder", b, embedder_class(b)) for b in EMBEDDER_BACKENDS]
OPTIONS = [(prefix, backend, cls, f) for prefix, backend, cls in ENTRIES for f in cls.Options.declared()]
OPTION_IDS = [f"{prefix}-{backend}-{f.name}" for prefix, backend, _, f in OPTIONS]


def other_value(cls, f, rationales) -> str:
    """An override value for option `f` of backend `cls` that differs from its default and that it takes."""
    hint = typing.get_type_hints(cls.Options)[f.name]
    kind = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if f.metadata["choices"]:
        return next(c for c in f.metadata["choices"] if c != f.default)
    if f.name == "path":
        return str(rationales.with_name("other.jsonl"))
    if kind is bool:
        return str(not f.default).lower()
    if kind is int:
        return str((f.default or 1) + 3)
    if kind is float:
        return str((f.default or 1) + 0.5)
    if typing.get_origin(kind) is dict:
        return "{k: 1}"
    return "other"


@pytest.mark.parametrize("prefix, backend, cls, f", OPTIONS, ids=OPTION_IDS)
def test_a_misspelt_option_names_the_key_and_the_option_meant(job, rationales, prefix, backend, cls, f):
    misspelt = [*select(prefix, backend, rationales), f"{prefix}.options.{f.name[:-1]}=1"]
    if cls.Options.PASSES_ON:  # vLLM's engine arguments are vLLM's to check, when the engine starts
        labels = config.label_config(config.load(job, misspelt))
        entry = labels["generators"][0] if prefix.startswith("generators") else labels["embedder"]
        assert entry["options"] == {f.name[:-1]: 1}
        return
    with pytest.raises(ConfigError) as e:
        config.load(job, misspelt)
    key = f"{prefix.replace('.0', '[0]')}.options.{f.name[:-1]}"
    assert str(e.value).startswith(f"{key}: not an option of the {backend} "), str(e.value)
    assert str(e.value).endswith(f"(did you mean {f.name}?)"), str(e.value)


@pytest.mark.parametrize("prefix, backend, cls, f", OPTIONS, ids=OPTION_IDS)
def test_only_label_options_change_the_label_hash(job, rationales, prefix, backend, cls, f):
    rationales.with_name("other.jsonl").write_text("")
    base = select(prefix, backend, rationales)
    changed = config.load(job, [*base, f"{prefix}.options.{f.name}={other_value(cls, f, rationales)}"])
    same = config.config_hash(config.load(job, base)) == config.config_hash(changed)
    assert same != f.metadata["label"], f"{backend} {f.name}: label={f.metadata['label']} but the hash " + \
                                        ("did not change" if same else "changed")


@pytest.mark.parametrize("prefix, role", [("embedder", embedder_class), ("generators.0", generator_class)])
def test_vllm_takes_the_transformers_options_and_passes_engine_options_on(job, prefix, role):
    """A config that sets the transformers backend's options changes to vLLM by `backend` alone: vLLM takes them
    and ignores them (they would reach vllm.LLM as unknown engine arguments), dtype and engine options go on."""
    vllm = config.load(job, [f"{prefix}.backend=vllm"])
    ignored = config.load(job, [f"{prefix}.backend=vllm", f"{prefix}.options.batching=sorted",
                                f"{prefix}.options.length_bucket=16", f"{prefix}.options.attn_implementation=eager"])
    engine = config.load(job, [f"{prefix}.backend=vllm", f"{prefix}.options.max_model_len=64"])
    assert config.config_hash(ignored) == config.config_hash(vllm) != config.config_hash(engine)
    options = role("vllm").Options.parse({"batching": "sorted", "attn_implementation": "eager",
                                          "max_model_len": 64, "dtype": "float32"})
    assert options.passed_on == {"max_model_len": 64, "dtype": "float32"}


def test_the_manifest_states_the_rules_promise_and_its_limit_in_cosine_mode(job):
    """Under the decoy rule the manifest (and from it the report and the dataset card) states the rate and the
    assumption it rests on, and in cosine mode where that assumption fails on measured sets."""
    from pipeline.manifest import decision_rule

    for mode in ("pair_aware", "cosine"):
        rule = decision_rule(None, config.load(job, [f"scoring.mode={mode}", "scoring.decision.rule=decoys",
                                                     "scoring.decision.fdr=0.05"]))
        assert rule["fdr"] == 0.05 and "at most 0.05" in rule["promise"]
        assert "no less than the pair's own content-free rationales" in rule["promise"]
        assert ("can exceed the rate" in rule["promise"]) == (mode == "cosine")
    assert "no stated error rate" in decision_rule(None, config.load(job, ["scoring.decision.rule=bar"]))["promise"]


def test_a_job_that_names_no_mode_gets_the_mode_whose_rate_holds_in_mixed_groups(job):
    """A config that leaves scoring.mode out is labelled in pair-aware mode, the one the manifest promises its rate
    without cosine mode's limit."""
    from pipeline.manifest import decision_rule

    cfg = config.load(job, [])
    assert cfg.scoring.mode == "pair_aware" and cfg.scoring.decision.rule == "decoys"
    assert "can exceed the rate" not in decision_rule(None, cfg)["promise"]
