"""Loading and checking the job config.

Defaults live in configs/default.yaml, not here. The dataclasses below only
declare the shape and types, so that omegaconf rejects unknown keys and wrong
types with the full key in the message; `check` adds the rules types can't say.
Everything is checked before Ray starts or any model loads.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A config problem; the message starts with the offending key."""


@dataclass
class Resources:
    num_cpus: float = MISSING
    num_gpus: float = MISSING
    pool_size: int = MISSING
    batch_size: int = MISSING


@dataclass
class Sampling:
    temperature: float = MISSING
    top_p: float = MISSING
    max_new_tokens: int = MISSING


@dataclass
class Generator:
    name: str = MISSING
    backend: str = MISSING
    model: str = MISSING
    k: int = MISSING
    template: str = MISSING
    k_target: int = MISSING
    target_template: str = MISSING
    rationale: str = MISSING
    seed: int = MISSING
    trust_remote_code: bool = MISSING
    sampling: Sampling = MISSING
    options: Dict[str, Any] = MISSING
    resources: Resources = MISSING


@dataclass
class Input:
    path: str = MISSING
    format: str = MISSING
    image_root: Optional[str] = MISSING
    subset: Optional[str] = MISSING
    rows_per_shard: int = MISSING
    max_query_chars: int = MISSING
    max_image_pixels: int = MISSING


@dataclass
class Embedder:
    backend: str = MISSING
    model: str = MISSING
    pooling: str = MISSING
    max_length: int = MISSING
    trust_remote_code: bool = MISSING
    options: Dict[str, Any] = MISSING
    query_instruction: str = MISSING
    reasoned_query_instruction: str = MISSING
    target_instruction: str = MISSING
    reasoned_target_instruction: str = MISSING
    cache_dir: Optional[str] = MISSING
    resources: Resources = MISSING


@dataclass
class Scoring:
    mode: str = MISSING
    temperature: float = MISSING
    in_shard_negatives: int = MISSING
    seed: int = MISSING
    epsilon: float = MISSING
    valid_finish_reasons: List[str] = MISSING
    controls: List[str] = MISSING


@dataclass
class Rounds:
    k0: Optional[int] = MISSING
    step: int = MISSING
    margin: float = MISSING


@dataclass
class Output:
    dir: str = MISSING
    compression: str = MISSING


@dataclass
class RayOpts:
    address: Optional[str] = MISSING
    read_num_cpus: float = MISSING
    write_num_cpus: float = MISSING


@dataclass
class JobConfig:
    input: Input = MISSING
    generators: List[Generator] = MISSING
    prompts: Dict[str, str] = MISSING
    embedder: Embedder = MISSING
    rounds: Rounds = MISSING
    scoring: Scoring = MISSING
    output: Output = MISSING
    ray: RayOpts = MISSING


CHOICES = {
    "input.format": ("mmeb", "hf", "webdataset"),
    "generators[].backend": ("transformers", "vllm", "openai", "precomputed"),
    "generators[].rationale": ("thinking", "answer", "both"),
    "embedder.backend": ("transformers", "sentence_transformers", "vllm"),
    "embedder.pooling": ("last", "mean"),
    "scoring.mode": ("cosine", "pair_aware"),
}

# The keys whose values decide the labels; a resume refuses if these changed.
LABEL_KEYS = ("input.rows_per_shard", "generators", "prompts", "embedder", "rounds", "scoring")
# Keys under those that change where or how fast work runs, not the labels.
_NOT_LABELS = ("resources", "cache_dir")
# Backend options that say how to reach a served model and how hard to retry (stages/backends/openai_http.py),
# not what it samples: a resumed run may use another port, timeout or key variable.
_NOT_LABEL_OPTIONS = ("base_url", "api_key_env", "max_in_flight", "timeout_s", "max_retries", "backoff_s",
                      "max_backoff_s")


def _fail(key: str, msg: str):
    raise ConfigError(f"{key}: {msg}")


def _as_config_error(e: OmegaConfBaseException, prefix: str = "") -> ConfigError:
    key = getattr(e, "full_key", None) or "config"
    msg = str(getattr(e, "msg", None) or e).splitlines()[0]
    return ConfigError(f"{prefix}{key}: {msg}")


@contextlib.contextmanager
def _keyed(prefix: str):
    """Errors inside a list entry only know their key within the entry."""
    try:
        yield
    except OmegaConfBaseException as e:
        raise _as_config_error(e, prefix) from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def load(path: str | os.PathLike | None, overrides: list[str] = ()) -> DictConfig:
    """default.yaml <- job config file <- key=value overrides, then checked."""
    try:
        base = OmegaConf.load(DEFAULT_CONFIG)
        # Each generator entry is completed from the first entry of default.yaml.
        gen_default = base.generators[0]
        layers = [base]
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config: no such file: {path}")
            try:
                layers.append(OmegaConf.load(path))
            except yaml.YAMLError as e:
                raise ConfigError(f"config: {path} is not valid YAML: {_yaml_problem(e)}") from None
        merged = OmegaConf.merge(*layers)
        for item in overrides:
            key, sep, _ = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"{item}: overrides are key=value")
            # from_dotlist parses the value as YAML; update() walks list indices (generators.0.k)
            try:
                value = OmegaConf.from_dotlist([f"v={item[len(key) + 1:]}"])["v"]
            except yaml.YAMLError as e:
                raise ConfigError(f"{key}: the value is not valid YAML: {_yaml_problem(e)}") from None
            OmegaConf.update(merged, key, value, merge=True)
        generators = []
        for i, g in enumerate(merged.generators):
            with _keyed(f"generators[{i}]."):
                generators.append(OmegaConf.merge(OmegaConf.structured(Generator), gen_default, g))
        merged.generators = generators
        typed = OmegaConf.merge(OmegaConf.structured(JobConfig), merged)
    except OmegaConfBaseException as e:
        raise _as_config_error(e) from None
    check(typed)
    return typed


def check(cfg: DictConfig) -> None:
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        _fail(sorted(missing)[0], "is required and has no value")

    def choice(key, value, rule=None):
        allowed = CHOICES[rule or key]
        if value not in allowed:
            _fail(key, f"must be one of {', '.join(allowed)}; got {value!r}")

    choice("input.format", cfg.input.format)
    if cfg.input.rows_per_shard < 1:
        _fail("input.rows_per_shard", "must be >= 1")
    if cfg.input.image_root is not None and not Path(cfg.input.image_root).is_dir():
        _fail("input.image_root", f"not a directory: {cfg.input.image_root}")

    if not cfg.generators:
        _fail("generators", "needs at least one generator")
    names = set()
    for i, g in enumerate(cfg.generators):
        key = f"generators[{i}]"
        choice(f"{key}.backend", g.backend, rule="generators[].backend")
        choice(f"{key}.rationale", g.rationale, rule="generators[].rationale")
        if g.name in names:
            _fail(f"{key}.name", f"duplicate generator name {g.name!r}")
        names.add(g.name)
        if g.k < 1:
            _fail(f"{key}.k", "must be >= 1")
        if g.template not in cfg.prompts:
            _fail(f"{key}.template", f"no prompt named {g.template!r} under prompts ({', '.join(cfg.prompts)})")
        if g.k_target < 0:
            _fail(f"{key}.k_target", "must be >= 0 (0: no target-side rationales)")
        if g.k_target and g.target_template not in cfg.prompts:
            _fail(f"{key}.target_template",
                  f"no prompt named {g.target_template!r} under prompts ({', '.join(cfg.prompts)})")
        if g.k_target and "{target}" not in cfg.prompts[g.target_template]:
            _fail(f"{key}.target_template", "a target-side prompt must contain {target}")
        if g.sampling.max_new_tokens < 1:
            _fail(f"{key}.sampling.max_new_tokens", "must be >= 1")
        _check_resources(f"{key}.resources", g.resources)
        if g.backend == "precomputed" and not Path(str(g.options.get("path", ""))).is_file():
            _fail(f"{key}.options.path", f"precomputed rationales file not found: {g.options.get('path')}")
        if g.backend in _LOCAL_MODEL_BACKENDS:
            _check_model_ref(f"{key}.model", g.model)
        if g.backend == "openai" and cfg.rounds.k0 is not None and g.options.get("use_n", True):
            # one request with n choices samples them all from the first candidate's seed: a later round
            # could not sample candidate k as a run without rounds does, and need_reasoning could change
            _fail(f"{key}.options.use_n", "must be false with rounds (rounds.k0 is set): rounds need each "
                                          "candidate sampled from its own seed")

    choice("embedder.backend", cfg.embedder.backend)
    choice("embedder.pooling", cfg.embedder.pooling)
    _check_model_ref("embedder.model", cfg.embedder.model)
    _check_resources("embedder.resources", cfg.embedder.resources)
    for side in ("query_instruction", "reasoned_query_instruction", "target_instruction",
                 "reasoned_target_instruction"):
        if "{text}" not in cfg.embedder[side]:
            _fail(f"embedder.{side}", "must contain {text}")
    for side in ("reasoned_query_instruction", "reasoned_target_instruction"):
        if "{rationale}" not in cfg.embedder[side]:
            _fail(f"embedder.{side}", "must contain {rationale}")

    if cfg.rounds.k0 is not None and cfg.rounds.k0 < 1:
        _fail("rounds.k0", "must be >= 1, or null for no rounds")
    if cfg.rounds.step < 1:
        _fail("rounds.step", "must be >= 1")
    if not cfg.rounds.margin >= 0:  # a negative margin would stop pairs below epsilon and change need_reasoning
        _fail("rounds.margin", "must be >= 0")

    choice("scoring.mode", cfg.scoring.mode)
    if not cfg.scoring.temperature > 0:
        _fail("scoring.temperature", "must be > 0")
    if cfg.scoring.in_shard_negatives < 0:
        _fail("scoring.in_shard_negatives", "must be >= 0")
    for i, control in enumerate(cfg.scoring.controls):  # a content-free control is some text, said once
        if not str(control).strip():
            _fail(f"scoring.controls[{i}]", "must be a non-empty text")
        if "{rationale}" in str(control) or "{text}" in str(control):
            _fail(f"scoring.controls[{i}]", "may hold {query} (the pair's query), not {rationale} or {text}")
    if len(set(cfg.scoring.controls)) != len(cfg.scoring.controls):
        _fail("scoring.controls", "lists a control twice")


def _check_resources(key, r):
    if r.num_cpus < 0 or r.num_gpus < 0:
        _fail(key, "num_cpus and num_gpus must be >= 0")
    if r.pool_size < 1:
        _fail(f"{key}.pool_size", "must be >= 1")
    if r.batch_size < 1:
        _fail(f"{key}.batch_size", "must be >= 1")


# Backends that load a model from a local folder or the Hugging Face hub; a served (openai) model's name
# belongs to its server, and precomputed rationales name no model at all.
_LOCAL_MODEL_BACKENDS = ("transformers", "sentence_transformers", "vllm")


def _model_keys(cfg: DictConfig) -> list[tuple[str, str]]:
    """(key, model) of every model that this process or its actors load themselves."""
    keys = [(f"generators[{i}].model", g.model) for i, g in enumerate(cfg.generators)
            if g.backend in _LOCAL_MODEL_BACKENDS]
    return keys + [("embedder.model", cfg.embedder.model)]


def _looks_like_a_folder(ref: str) -> bool:
    """models/tiny-qwen2vl, ./m, /data/m, ~/m: a path. org/name: a hub id, unless `org` is a folder here (a
    typo in models/<name> must not send the job to the hub)."""
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        return True
    return "/" in ref and Path(ref.split("/")[0]).expanduser().is_dir()


def _did_you_mean(path: Path) -> str:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return ""
    close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir() if p.is_dir()], n=1)
    return f" (did you mean {path.parent / close[0]}?)" if close else ""


def _check_model_ref(key, ref):
    """A model is a local folder or a hub id (org/name). A path-looking value that does not exist is almost
    always a mistake (a typo, or `make models` not run): say so now, not after Ray tried the hub for minutes."""
    p = Path(ref).expanduser()
    if _looks_like_a_folder(ref) and not p.exists():  # a file is fine: vLLM loads a .gguf
        _fail(key, f"model folder not found: {ref}{_did_you_mean(p)}")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(f in ("1", "ON", "YES", "TRUE") for f in flags)


HUB_TIMEOUT_S = 10


def _check_hub_model(key: str, ref: str) -> None:
    """A model that is not a local folder must be in the Hugging Face cache, or on a hub this machine reaches
    (one request, HUB_TIMEOUT_S at most; none at all with HF_HUB_OFFLINE=1)."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(ref, "config.json"), str):
        return
    where = f"not a local folder and not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if _hub_offline():
        _fail(key, f"{ref}: {where}, and the hub is off (HF_HUB_OFFLINE=1); give a local folder, or download it")
    try:
        HfApi().model_info(ref, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:  # it exists; loading it needs the user's token, which the backend reads
        return
    except RepositoryNotFoundError:
        _fail(key, f"{ref}: {where}, and no such model on {constants.ENDPOINT}")
    except Exception as e:  # noqa: BLE001 - no network, DNS, proxy, timeout: all say "cannot reach"
        _fail(key, f"{ref}: {where}, and {constants.ENDPOINT} cannot be reached ({type(e).__name__}: "
                   f"{str(e).splitlines()[0] if str(e) else ''}); give a local folder, or download it first")


# Every model folder that transformers, sentence-transformers or vLLM load holds one of these.
MODEL_FOLDER_MARKERS = ("config.json", "modules.json", "params.json")


def check_available(cfg: DictConfig) -> None:
    """What the config names exists on this machine: the input, and every model (a local folder, a cached hub
    model, or one the hub has). Run by `pipeline run` after `load`, before Ray starts; `load` alone stays free of
    the filesystem and the network so that a config can be checked anywhere (e.g. for a cluster)."""
    if not any(ch in cfg.input.path for ch in "*?[") and not Path(cfg.input.path).expanduser().exists():
        _fail("input.path", f"no such file or folder: {cfg.input.path}")
    for key, ref in _model_keys(cfg):
        _check_model_ref(key, ref)
        folder = Path(ref).expanduser()
        if folder.is_dir() and not any((folder / name).is_file() for name in MODEL_FOLDER_MARKERS):
            _fail(key, f"{ref} is not a model folder (it has no {' or '.join(MODEL_FOLDER_MARKERS)})")
        if not folder.exists():
            if key == "embedder.model" and cfg.embedder.backend == "sentence_transformers" and "/" not in ref:
                ref = f"sentence-transformers/{ref}"  # how sentence-transformers resolves a bare name
            _check_hub_model(key, ref)


def resolve_paths(cfg: DictConfig) -> None:
    """Make local paths absolute: Ray workers do not share the driver's working directory."""

    def absolute(p):
        return str(Path(p).expanduser().resolve())

    cfg.output.dir = absolute(cfg.output.dir)
    if cfg.embedder.cache_dir is not None:  # after output.dir: the default is a folder under it
        cfg.embedder.cache_dir = absolute(cfg.embedder.cache_dir)
    if cfg.input.image_root is not None:
        cfg.input.image_root = absolute(cfg.input.image_root)
    if not any(ch in cfg.input.path for ch in "*?[") or Path(cfg.input.path).exists():
        cfg.input.path = absolute(cfg.input.path)
    else:  # a glob: keep the pattern, anchor it
        cfg.input.path = str(Path.cwd() / cfg.input.path) if not cfg.input.path.startswith("/") else cfg.input.path
    for node in [*cfg.generators, cfg.embedder]:
        if Path(node.model).expanduser().exists():
            node.model = absolute(node.model)
        if "path" in node.options and node.options.path:
            node.options.path = absolute(node.options.path)


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)


def label_config(cfg: DictConfig) -> dict[str, Any]:
    """The part of the config that decides the labels."""
    d = to_dict(cfg)
    out = {}
    for key in LABEL_KEYS:
        node = d
        for part in key.split("."):
            node = node[part]
        out[key] = node
    out["generators"] = [{**{k: v for k, v in g.items() if k not in _NOT_LABELS},
                          "options": {k: v for k, v in g["options"].items() if k not in _NOT_LABEL_OPTIONS}}
                         for g in out["generators"]]
    out["embedder"] = {k: v for k, v in out["embedder"].items() if k not in _NOT_LABELS}
    if out["rounds"]["k0"] is None:  # no rounds: the labels, and so the hash, of a plain run
        del out["rounds"]
    return out


def config_hash(cfg: DictConfig) -> str:
    blob = json.dumps(label_config(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
