"""A user error (a typo in a model folder or a backend option, a model that is nowhere, a missing input, the wrong
input.format, a broken config file) ends `pipeline run` with exit code 2 and one line naming the key, before Ray
starts: in seconds, with no traceback, writing nothing. Through the CLI as a user runs it."""
import os
import subprocess
import sys
import time

import pytest

from tests.job_runs import REPO, checksums, free_port, run_pipeline


@pytest.fixture
def user(tmp_path, demo_data, tiny_models):
    """A user's input and a fresh output path; what is there before, to compare after. The tiny models are
    built (models/, which a fresh clone lacks), so that only the mistake under test is wrong."""
    return {"out": tmp_path / "out", "input": demo_data["path"], "root": demo_data["root"],
            "before": checksums(tmp_path) | {"input": checksums(os.path.dirname(demo_data["path"]))}}


def fails_fast(user, args, key: str, env: dict | None = None) -> str:
    t0 = time.monotonic()
    proc = run_pipeline([f"input.path={user['input']}", f"input.image_root={user['root']}",
                         f"output.dir={user['out']}", *args], env=env, timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]  # one line, no traceback, no Ray chatter
    assert lines[0].startswith(f"pairsel: config error: {key}: "), lines[0]
    assert proc.stdout == ""
    assert took < 45, f"took {took:.0f}s: the check must come before Ray and any model"
    assert not user["out"].exists()  # nothing written
    assert checksums(user["out"].parent) | {"input": checksums(os.path.dirname(user["input"]))} == user["before"]
    return lines[0]


@pytest.mark.parametrize("key, value, meant", [
    ("generators.0.model", "models/tiny-qwen2v", "models/tiny-qwen2vl"),
    ("embedder.model", "models/tiny-embeder", "models/tiny-embedder"),
])
def test_a_typo_in_a_model_folder_names_the_key_and_the_folder(user, tiny_models, key, value, meant):
    spelled = key.replace(".0.", "[0].")  # config errors spell list entries generators[0]
    line = fails_fast(user, [f"{key}={value}"], spelled)
    assert f"model folder not found: {value} (did you mean {meant}?)" in line


@pytest.mark.parametrize("override, key, ends", [
    ("embedder.options.batch_sise=4", "embedder.options.batch_sise",
     "not an option of the transformers embedder (did you mean batch_size?)"),
    ("generators.0.options.length_bucet=16", "generators[0].options.length_bucet",
     "not an option of the transformers generator (did you mean length_bucket?)"),
    ("embedder.options.batch_size=four", "embedder.options.batch_size",
     "Value 'four' of type 'str' could not be converted to Integer"),
])
def test_a_typo_or_a_wrong_type_in_backend_options_names_the_key(user, tiny_models, override, key, ends):
    assert fails_fast(user, [override], key).endswith(ends)


def test_a_typo_in_a_vllm_model_folder_fails_before_vllm_is_imported(user, tiny_models):
    line = fails_fast(user, ["generators.0.backend=vllm", "generators.0.model=models/tiny-qwen2v"],
                      "generators[0].model")
    assert "model folder not found: models/tiny-qwen2v" in line


def test_a_hub_model_that_is_not_cached_fails_at_once_offline(user, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-cache")}
    line = fails_fast(user, ["embedder.model=nosuch-org/nosuch-embedder"], "embedder.model", env)
    assert "nosuch-org/nosuch-embedder: not a local folder and not in the Hugging Face cache" in line
    assert "HF_HUB_OFFLINE=1" in line


def test_a_hub_model_that_is_not_cached_fails_at_once_when_the_hub_cannot_be_reached(user, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HUB_CACHE=str(tmp_path / "empty-cache"))
    line = fails_fast(user, ["generators.0.model=nosuch-org/nosuch-vlm"], "generators[0].model", env)
    assert f"{env['HF_ENDPOINT']} cannot be reached" in line


def test_a_missing_input_names_input_path(user, tmp_path):
    line = fails_fast(user, [f"input.path={tmp_path / 'no' / 'pairs.jsonl'}"], "input.path")  # the last one counts
    assert line.endswith(f"no such file or folder: {tmp_path / 'no' / 'pairs.jsonl'}")


@pytest.mark.parametrize("fmt, reads", [("hf", "a datasets save_to_disk folder"), ("webdataset", "tar files")])
def test_an_input_of_another_format_names_input_format(user, fmt, reads):
    line = fails_fast(user, [f"input.format={fmt}"], "input.format")
    assert f"{fmt} reads {reads}" in line and line.endswith("input.format=mmeb reads it")


def test_a_config_file_that_is_not_yaml_names_the_file(user, tmp_path):
    bad = tmp_path / "job.yaml"
    bad.write_text("input:\n  path: [oops\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(bad), f"output.dir={user['out']}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and time.monotonic() - t0 < 45
    assert proc.stderr.strip().splitlines() == [
        f"pairsel: config error: config: {bad} is not valid YAML: did not find expected ',' or ']' (line 3, column 1)"]
    assert not user["out"].exists()


def test_a_folder_that_holds_no_model_names_the_key(user, tiny_models):
    line = fails_fast(user, ["embedder.model=models"], "embedder.model")  # the folder above the models
    assert line.endswith("models is not a model folder (it has no config.json or modules.json or params.json)")


def test_actor_pools_that_the_local_ray_cannot_hold_fail_in_one_line_and_a_rerun_that_fits_runs(user, tiny_models):
    """Ray Data waits forever for an actor pool that cannot start, and the local Ray a run starts cannot grow:
    the run ends at once with exit 2 and one line naming the resources (after Ray starts: only Ray knows the
    machine's size). Pool sizes change no label, so the same command with pools that fit goes on from there."""
    common = [f"input.path={user['input']}", f"input.image_root={user['root']}", f"output.dir={user['out']}"]
    t0 = time.monotonic()
    proc = run_pipeline([*common, "embedder.resources.num_cpus=4096"], timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith("pairsel: config error: generators.0.resources, embedder.resources: 2 model actor "
                                "pools (1 rounds) with reads and writes need 4097 CPU (the cluster has "), errors[0]
    assert took < 60, f"took {took:.0f}s: it must not wait for the pools"
    rerun = run_pipeline(common, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert "shards planned, 0 already committed" in rerun.stderr and "shards committed" in rerun.stderr
