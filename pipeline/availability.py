"""Whether what a config names exists: model references (a local folder or a hub id) and the input.

`check_model_ref` runs inside config.check (a path-looking model that does not exist is a typo); the rest is
`check_available`, which `pipeline run` calls after config.load and before Ray starts: it looks at the
filesystem, the Hugging Face cache and, at most once per model, the hub, so that config.load stays free of
the network and a config can be checked anywhere (e.g. for a cluster).
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

from omegaconf import DictConfig

from pipeline.errors import fail
from stages.backends import LOCAL_MODEL_BACKENDS  # the backends that load a model themselves

HUB_TIMEOUT_S = 10
# Every model folder that transformers, sentence-transformers or vLLM load holds one of these.
MODEL_FOLDER_MARKERS = ("config.json", "modules.json", "params.json")


def _model_keys(cfg: DictConfig) -> list[tuple[str, str]]:
    """(key, model) of every model that this process or its actors load themselves."""
    keys = [(f"generators[{i}].model", g.model) for i, g in enumerate(cfg.generators)
            if g.backend in LOCAL_MODEL_BACKENDS]
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


def check_model_ref(key: str, ref: str) -> None:
    """A model is a local folder or a hub id (org/name). A path-looking value that does not exist is almost
    always a mistake (a typo, or `make models` not run): say so now, not after Ray tried the hub for minutes."""
    p = Path(ref).expanduser()
    if _looks_like_a_folder(ref) and not p.exists():  # a file is fine: vLLM loads a .gguf
        fail(key, f"model folder not found: {ref}{_did_you_mean(p)}")


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get(name, "").upper() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or any(f in ("1", "ON", "YES", "TRUE") for f in flags)


def _check_hub_model(key: str, ref: str) -> None:
    """A model that is not a local folder must be in the Hugging Face cache, or on a hub this machine reaches
    (one request, HUB_TIMEOUT_S at most; none at all with HF_HUB_OFFLINE=1)."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(ref, "config.json"), str):
        return
    where = f"not a local folder and not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if _hub_offline():
        fail(key, f"{ref}: {where}, and the hub is off (HF_HUB_OFFLINE=1); give a local folder, or download it")
    try:
        HfApi().model_info(ref, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:  # it exists; loading it needs the user's token, which the backend reads
        return
    except RepositoryNotFoundError:
        fail(key, f"{ref}: {where}, and no such model on {constants.ENDPOINT}")
    except Exception as e:  # noqa: BLE001 - no network, DNS, proxy, timeout: all say "cannot reach"
        fail(key, f"{ref}: {where}, and {constants.ENDPOINT} cannot be reached ({type(e).__name__}: "
                  f"{str(e).splitlines()[0] if str(e) else ''}); give a local folder, or download it first")


def check_available(cfg: DictConfig) -> None:
    """What the config names exists on this machine: the input, and every model (a local folder, a cached hub
    model, or one the hub has). Run by `pipeline run` after `load`, before Ray starts; `load` alone stays free of
    the filesystem and the network so that a config can be checked anywhere (e.g. for a cluster)."""
    if not any(ch in cfg.input.path for ch in "*?[") and not Path(cfg.input.path).expanduser().exists():
        fail("input.path", f"no such file or folder: {cfg.input.path}")
    for key, ref in _model_keys(cfg):
        check_model_ref(key, ref)
        folder = Path(ref).expanduser()
        if folder.is_dir() and not any((folder / name).is_file() for name in MODEL_FOLDER_MARKERS):
            fail(key, f"{ref} is not a model folder (it has no {' or '.join(MODEL_FOLDER_MARKERS)})")
        if not folder.exists():
            if key == "embedder.model" and cfg.embedder.backend == "sentence_transformers" and "/" not in ref:
                ref = f"sentence-transformers/{ref}"  # how sentence-transformers resolves a bare name
            _check_hub_model(key, ref)
