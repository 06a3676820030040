"""The reasoning-pool demo: serve one tiny model over HTTP, run configs/pool.yaml (two local generators and
the served one), stop the server, and print what each generator contributed.

    python scripts/pool_demo.py [--faults] [key=value ...]

The models and the demo data are built first if they are missing (as `make models demo-data` does).
--faults makes the server answer some requests with 429, 503, a dropped connection or too late, and fail
every request for one query for good; the job still writes every pair, and the candidates that failed after
their retries are stored with finish_reason "error". key=value overrides go to the job, e.g.
output.dir=out/pool2 generators.0.k=2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts import serve_openai  # noqa: E402

SERVED_NAME = "tiny-qwen2vl"  # configs/pool.yaml: generators.2.model
# Every 5th new request rate-limited, every 7th a 503, every 11th answered after the client's timeout,
# every 13th dropped; each recovers on its retry. One query fails on every attempt.
FAULT_ARGS = ["--rate-limit-every", "5", "--retry-after", "1", "--error-every", "7", "--slow-every", "11",
              "--slow-s", "6", "--reset-every", "13", "--fail-matching", "What is 10 plus 537?"]
FAULT_OVERRIDES = ["generators.2.options.timeout_s=4"]


def _fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def generator_table(manifest: dict) -> str:
    """The per-generator figures of a manifest as a fixed-width table."""
    head = ("generator", "backend", "candidates", "valid", "invalid (by reason)", "chosen", "share",
            "mean delta", "mean chosen delta", "tokens")
    rows = [head]
    configured = [g["name"] for g in manifest["config"]["generators"]]  # manifest.json's keys are sorted
    for name in configured + sorted(set(manifest["generators"]) - set(configured)):
        g = manifest["generators"][name]
        invalid = ", ".join(f"{k} {v}" for k, v in g["invalid_by_reason"].items()) or "0"
        rows.append((name, g["backend"], str(g["candidates"]), str(g["valid"]), invalid, str(g["chosen"]),
                     _fmt(g["chosen_share"], ".1%"), _fmt(g["mean_delta"], "+.4f"),
                     _fmt(g["mean_chosen_delta"], "+.4f"), str(g["tokens"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", action="store_true", help="inject server faults (see above)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the job")
    args = parser.parse_args(argv)

    from scripts.build_tiny_models import build
    from scripts.make_demo_data import make

    models = build(REPO / "models")
    make(REPO / "data" / "demo")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the server shares the cores with the job

    proc, url = serve_openai.spawn(models["generator"], SERVED_NAME, *(FAULT_ARGS if args.faults else []))
    print(f"pool_demo: serving {models['generator']} as {SERVED_NAME!r} at {url}", flush=True)
    try:
        overrides = [f"generators.2.options.base_url={url}", *(FAULT_OVERRIDES if args.faults else []),
                     *args.overrides]
        job = subprocess.run([sys.executable, "-m", "pipeline", "run", "--overwrite", "configs/pool.yaml",
                              *overrides], cwd=REPO)
        with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=10) as r:
            server_stats = json.load(r)
    finally:
        serve_openai.stop(proc)
    if job.returncode != 0:
        print(f"pool_demo: the job failed (exit code {job.returncode})", file=sys.stderr)
        return job.returncode

    from pipeline import config

    out = Path(config.load(REPO / "configs" / "pool.yaml", args.overrides).output.dir)
    manifest = json.loads((REPO / out / "manifest.json").read_text())
    c = manifest["counts"]
    print(f"\npool_demo: {c['pairs_written']} pairs, {c['candidates']} candidates, need_reasoning "
          f"{c['need_reasoning']} ({c['need_reasoning_rate']:.1%}); per generator:\n")
    print(generator_table(manifest))
    print(f"\nserver: {server_stats['requests']} requests ({server_stats['distinct_requests']} distinct), "
          f"faults injected: {server_stats['injected']}")
    print(f"output: {REPO / out}/data/   manifest: {REPO / out}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
