"""Peak driver memory at 1x and 10x the demo input: the driver streams, so it should not grow with the input.

    python bench/memory.py [--scales 1 10] [--out out/bench-memory] [key=value ...]

For each scale, builds the demo data (scripts/make_demo_data.py: 200 pairs x scale), runs the demo job on it
with the tiny models (`--overwrite`, a fresh local Ray each time), and reports the driver process's peak
resident set size (getrusage RUSAGE_SELF ru_maxrss: the driver alone, not its Ray workers), the pairs and
shards written and the wall time. Extra key=value arguments go to the job as config overrides. Results are
also written to OUT/memory.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Runs the CLI in this child process and reports its own peak RSS (kB on Linux) on the last line.
CHILD = """
import resource, sys
from pipeline.cli import main
rc = main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
sys.exit(rc)
"""


def measure(scale: int, out: Path, overrides: list[str]) -> dict:
    from scripts.build_tiny_models import build
    from scripts.make_demo_data import make

    models = build(REPO / "models")
    data = make(out / f"data-x{scale}", n_pairs=200, scale=scale)
    job_out = out / f"job-x{scale}"
    args = ["run", "configs/demo.yaml", f"input.path={data}", f"input.image_root={data.parent}",
            f"generators.0.model={models['generator']}", f"embedder.model={models['embedder']}",
            f"output.dir={job_out}", *overrides, "--overwrite"]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"scale {scale}: the job failed\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    peak_kb = int(proc.stdout.strip().splitlines()[-1].split()[1])
    manifest = json.loads((job_out / "manifest.json").read_text())
    return {"scale": scale, "pairs": manifest["counts"]["pairs_read"], "shards": len(manifest["shards"]),
            "peak_driver_rss_mib": round(peak_kb / 1024, 1), "wall_seconds": round(wall, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-memory")
    ap.add_argument("overrides", nargs="*", help="config overrides for the job, key=value")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"{'scale':>5} {'pairs':>6} {'shards':>6} {'peak driver RSS':>16} {'wall':>8}")
    for scale in args.scales:
        r = measure(scale, args.out.resolve(), args.overrides)
        results.append(r)
        print(f"{r['scale']:>4}x {r['pairs']:>6} {r['shards']:>6} {r['peak_driver_rss_mib']:>12.1f} MiB "
              f"{r['wall_seconds']:>7.1f}s", flush=True)
    (args.out / "memory.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
