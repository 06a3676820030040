"""Loading and checking the job config.

Defaults live in configs/default.yaml, not here. The dataclasses below only
declare the shape and types, so that omegaconf rejects unknown keys and wrong
types with the full key in the message; `check` adds the rules types can't say.
Everything is checked before Ray starts or any model loads.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.availability import check_model_ref
from pipeline.errors import ConfigError, fail  # callers import ConfigError from here too
# The registry maps names to "module:Class" strings: importing it loads no backend and needs no extra; a
# backend's module (without its runtime: torch, vllm) is imported for its Options when a config names it.
from stages.backends import (EMBEDDER_BACKENDS, GENERATOR_BACKENDS, LOCAL_MODEL_BACKENDS, embedder_class,
                             generator_class)
from stages.backends.base import POOLINGS
from stages.backends.options import BackendOptions, OptionError
from stages.backends.parsing import USES as RATIONALE_USES
from stages.inputs import INPUT_FORMATS
from stages.calibrate import NULL_GROUPS
from stages.score import SCORING_MODES
from stages.select import NULL_RULES

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


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
class Decision:
    rule: str = MISSING
    fdr: float = MISSING
    decoys_per_candidate: float = MISSING
    group: str = MISSING


@dataclass
class Scoring:
    mode: str = MISSING
    temperature: float = MISSING
    in_shard_negatives: int = MISSING
    seed: int = MISSING
    epsilon: float = MISSING
    valid_finish_reasons: List[str] = MISSING
    controls: List[str] = MISSING
    decision: Decision = MISSING


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
    "input.format": INPUT_FORMATS,  # the readers of stages/inputs/
    "generators[].backend": GENERATOR_BACKENDS,  # the backend registry's names (stages/backends/__init__.py)
    "generators[].rationale": RATIONALE_USES,  # the parts of an output that parsing.py can take as the rationale
    "embedder.backend": EMBEDDER_BACKENDS,
    "embedder.pooling": POOLINGS,  # what every embedder backend offers
    "scoring.mode": SCORING_MODES,  # the formulas of stages/score.py
    "scoring.decision.rule": NULL_RULES,  # the rules of stages/select.py
    "scoring.decision.group": NULL_GROUPS,  # stages/calibrate.py's calibration groups
}

# The keys whose values decide the labels; a resume refuses if these changed.
LABEL_KEYS = ("input.rows_per_shard", "generators", "prompts", "embedder", "rounds", "scoring")
# The label keys that act only on the similarities an output stores (the scores, stages/score.py, and the decisions,
# stages/select.py and stages/calibrate.py): `pairsel relabel` changes them without running a model.
RELABEL_KEYS = ("scoring.mode", "scoring.temperature", "scoring.epsilon", "scoring.decision.fdr",
                "scoring.decision.group")
# Keys under those that change where or how fast work runs, not the labels (and each backend's speed-only
# options: label_config asks its Options).
_NOT_LABELS = ("resources", "cache_dir")


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


def load(path: str | os.PathLike | None, overrides: list[str] = (), saved: dict | None = None,
         files: bool = True) -> DictConfig:
    """default.yaml <- job config file (or `saved`: a finished job's whole config, as its manifest holds it) <-
    key=value overrides, then checked; files=False leaves out whether the files it names exist (check)."""
    try:
        base = OmegaConf.load(DEFAULT_CONFIG)
        # Each generator entry is completed from the first entry of default.yaml.
        gen_default = base.generators[0]
        layers = [base]
        if saved is not None:
            layers.append(OmegaConf.create(saved))
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
    check(typed, files)
    return typed


def check(cfg: DictConfig, files: bool = True) -> None:
    """Every rule of the config, and (files) that the input's image root, precomputed rationales and local model
    folders it names exist: what a run reads, and a relabel of its output does not."""
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        fail(sorted(missing)[0], "is required and has no value")

    def choice(key, value, rule=None):
        allowed = CHOICES[rule or key]
        if value not in allowed:
            fail(key, f"must be one of {', '.join(allowed)}; got {value!r}")

    choice("input.format", cfg.input.format)
    if cfg.input.rows_per_shard < 1:
        fail("input.rows_per_shard", "must be >= 1")
    if files and cfg.input.image_root is not None and not Path(cfg.input.image_root).is_dir():
        fail("input.image_root", f"not a directory: {cfg.input.image_root}")

    if not cfg.generators:
        fail("generators", "needs at least one generator")
    names = set()
    for i, g in enumerate(cfg.generators):
        key = f"generators[{i}]"
        choice(f"{key}.backend", g.backend, rule="generators[].backend")
        options = backend_options(f"{key}.options", generator_class(g.backend), g.backend, "generator", g.options)
        choice(f"{key}.rationale", g.rationale, rule="generators[].rationale")
        if g.name in names:
            fail(f"{key}.name", f"duplicate generator name {g.name!r}")
        names.add(g.name)
        if g.k < 1:
            fail(f"{key}.k", "must be >= 1")
        if g.template not in cfg.prompts:
            fail(f"{key}.template", f"no prompt named {g.template!r} under prompts ({', '.join(cfg.prompts)})")
        if g.k_target < 0:
            fail(f"{key}.k_target", "must be >= 0 (0: no target-side rationales)")
        if g.k_target and g.target_template not in cfg.prompts:
            fail(f"{key}.target_template",
                  f"no prompt named {g.target_template!r} under prompts ({', '.join(cfg.prompts)})")
        if g.k_target and "{target}" not in cfg.prompts[g.target_template]:
            fail(f"{key}.target_template", "a target-side prompt must contain {target}")
        if g.sampling.max_new_tokens < 1:
            fail(f"{key}.sampling.max_new_tokens", "must be >= 1")
        _check_resources(f"{key}.resources", g.resources)
        if files and g.backend == "precomputed" and not Path(str(options.path)).is_file():
            fail(f"{key}.options.path", f"precomputed rationales file not found: {options.path}")
        if files and g.backend in LOCAL_MODEL_BACKENDS:
            check_model_ref(f"{key}.model", g.model)
        if g.backend == "openai" and cfg.rounds.k0 is not None and options.use_n:
            # one request with n choices samples them all from the first candidate's seed: a later round
            # could not sample candidate k as a run without rounds does, and need_reasoning could change
            fail(f"{key}.options.use_n", "must be false with rounds (rounds.k0 is set): rounds need each "
                                          "candidate sampled from its own seed")

    choice("embedder.backend", cfg.embedder.backend)
    backend_options("embedder.options", embedder_class(cfg.embedder.backend), cfg.embedder.backend, "embedder",
                    cfg.embedder.options)
    choice("embedder.pooling", cfg.embedder.pooling)
    if files:
        check_model_ref("embedder.model", cfg.embedder.model)
    _check_resources("embedder.resources", cfg.embedder.resources)
    for side in ("query_instruction", "reasoned_query_instruction", "target_instruction",
                 "reasoned_target_instruction"):
        if "{text}" not in cfg.embedder[side]:
            fail(f"embedder.{side}", "must contain {text}")
    for side in ("reasoned_query_instruction", "reasoned_target_instruction"):
        if "{rationale}" not in cfg.embedder[side]:
            fail(f"embedder.{side}", "must contain {rationale}")

    if cfg.rounds.k0 is not None and cfg.rounds.k0 < 1:
        fail("rounds.k0", "must be >= 1, or null for no rounds")
    if cfg.rounds.step < 1:
        fail("rounds.step", "must be >= 1")
    if not cfg.rounds.margin >= 0:  # a negative margin would stop pairs below epsilon and change need_reasoning
        fail("rounds.margin", "must be >= 0")

    choice("scoring.mode", cfg.scoring.mode)
    if not cfg.scoring.temperature > 0:
        fail("scoring.temperature", "must be > 0")
    if cfg.scoring.in_shard_negatives < 0:
        fail("scoring.in_shard_negatives", "must be >= 0")
    for i, control in enumerate(cfg.scoring.controls):  # a content-free control is some text, said once
        if not str(control).strip():
            fail(f"scoring.controls[{i}]", "must be a non-empty text")
        if "{rationale}" in str(control) or "{text}" in str(control):
            fail(f"scoring.controls[{i}]", "may hold {query} (the pair's query), not {rationale} or {text}")
    if len(set(cfg.scoring.controls)) != len(cfg.scoring.controls):
        fail("scoring.controls", "lists a control twice")
    choice("scoring.decision.rule", cfg.scoring.decision.rule)
    choice("scoring.decision.group", cfg.scoring.decision.group)
    if not 0 < cfg.scoring.decision.fdr < 1:
        fail("scoring.decision.fdr", "must be between 0 and 1 (the false-discovery rate of the reason labels)")
    per_candidate = cfg.scoring.decision.decoys_per_candidate
    if not (per_candidate >= 1 and float(per_candidate).is_integer()):
        fail("scoring.decision.decoys_per_candidate", "must be a whole number >= 1 (each decoy group mirrors the "
             "pair's candidate slots)")


def backend_options(key: str, backend_cls: type, backend: str, role: str, options) -> BackendOptions:
    """The entry's options as its backend reads them; a key it does not have (with the closest it has) or a
    value of the wrong type fails here, before Ray starts."""
    try:
        return backend_cls.Options.parse(OmegaConf.to_container(options), f"{backend} {role}")
    except OptionError as e:
        fail(f"{key}.{e.key}", e.reason)


def _check_resources(key, r):
    if r.num_cpus < 0 or r.num_gpus < 0:
        fail(key, "num_cpus and num_gpus must be >= 0")
    if r.pool_size < 1:
        fail(f"{key}.pool_size", "must be >= 1")
    if r.batch_size < 1:
        fail(f"{key}.batch_size", "must be >= 1")


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
    # a backend's speed-only options (batch sizes, how to reach a server) may change on a resume
    out["generators"] = [{**{k: v for k, v in g.items() if k not in _NOT_LABELS},
                          "options": generator_class(g["backend"]).Options.label_options(g["options"])}
                         for g in out["generators"]]
    e = out["embedder"]
    out["embedder"] = {**{k: v for k, v in e.items() if k not in _NOT_LABELS},
                       "options": embedder_class(e["backend"]).Options.label_options(e["options"])}
    if out["rounds"]["k0"] is None:  # no rounds: the labels, and so the hash, of a plain run
        del out["rounds"]
    return out


def config_hash(cfg: DictConfig) -> str:
    blob = json.dumps(label_config(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
