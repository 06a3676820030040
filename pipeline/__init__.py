"""pairsel's job: config, CLI, the Ray Data plan, the manifest."""
from __future__ import annotations


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version("pairsel")
    except PackageNotFoundError:  # run from a checkout, e.g. as a Ray job's working dir
        import tomllib
        from pathlib import Path

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]
