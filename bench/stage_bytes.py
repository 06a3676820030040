"""Bytes moved between stages per pair, and the job's peak object-store use, at 1x and 4x: prints a table.

    python bench/stage_bytes.py [--repo DIR] [--pairs 20] [--scales 1 4] [--models tiny|small] [--out DIR]
    python bench/stage_bytes.py --compare BEFORE.json AFTER.json     (the before/after table of two runs)

--repo is the checkout whose pipeline runs (default: this one), so the same bench measures the code before and
after a change: `--repo /tmp/base-wt` runs an older commit's pipeline/ and stages/ (bench/stage_bytes_child.py
puts REPO first on sys.path; the job's Ray workers get REPO from its pipeline/run.py). The job is REPO's
bench/bench.yaml (K_max 8 in two rounds, pair-aware scoring with 3 in-shard negatives) on the image subsets of
the demo mix (scripts/make_demo_data.py without the text-only facts_t2t), with the tiny models by default.

Three figures, each from what Ray or Arrow already keep, with no hook in the pipeline:

1. **Ray Data operator output** (the job through REPO's CLI): Ray Data's stats of the Dataset the job consumed
   (`Dataset.get_stats_summary()`, what `Dataset.stats()` prints), each operator's output bytes in total
   ("Output size bytes per block ... total"), over the pairs read. These are the blocks that
   go through the object store between operators as Ray Data executes the plan: operators that Ray Data fuses
   (e.g. score -> select -> write, all tasks with the same resources) pass their tables inside one task, and
   only the last of a fused chain puts its output in the object store.
2. **Arrow bytes per stage** (REPO's plain loop, pipeline/plan.py:run_local, at the first scale only): the
   `Table.nbytes` of each stage's output table (read: the first stage's input), over the pairs. What each
   stage hands to the next whether or not Ray fuses them; write is not in the loop (figure 1 has it).
3. **Peak object-store use**: the node's `ray_object_store_used_memory` (Ray's system metrics, read in the job's
   driver from the metrics export port that `ray.nodes()` names), sampled every 0.5 s while the job runs, with
   the raylet reporting every second (RAY_metrics_report_interval_ms=1000; Ray's default is 10 s). Objects
   under 100 KiB are returned inline to their owner and never enter the object store.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

_spec = importlib.util.spec_from_file_location("pairsel_bench", REPO / "bench" / "bench.py")  # as bench_vllm.py
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)
_session_pids, machine_line, publish = base._session_pids, base.machine_line, base.publish

CHILD = REPO / "bench" / "stage_bytes_child.py"
TEXT_ONLY = {"facts_t2t"}  # the demo mix's subset without images
MIB = 1 << 20
ROLES = ("read", "generate", "embed", "score", "select", "write")


# ------------------------------------------------------------------ input: the image subsets of the demo mix
IMAGE_FIELDS = ("qry_image_path", "pos_image_path", "neg_image_path")


def image_pairs(out: Path, pairs: int, scale: int, side: int) -> Path:
    """The demo mix's pairs with images (pairs.jsonl without the text-only subset). side > 0: every image
    re-encoded at side x side pixels with a little noise, so that its file is the size of a photo's rather
    than of a flat 128-pixel drawing (the models resize images to their own pixel budget either way)."""
    from scripts.make_demo_data import make

    jsonl = make(out / f"data-{scale}x", n_pairs=pairs, scale=scale)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    rows = [r for r in rows if r["subset"] not in TEXT_ONLY]
    root = jsonl.parent if not side else out / f"data-{scale}x-{side}px"
    if side:
        import numpy as np
        from PIL import Image

        for rel in sorted({r[f] for r in rows for f in IMAGE_FIELDS if r.get(f)}):
            dest = root / rel
            if dest.is_file():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            img = Image.open(jsonl.parent / rel).convert("RGB").resize((side, side), Image.BICUBIC)
            noise = np.random.default_rng(zlib.crc32(rel.encode())).integers(-8, 9, (side, side, 3))
            pixels = np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
            tmp = dest.with_name(f".{dest.name}.tmp")
            Image.fromarray(pixels).save(tmp, format="PNG" if rel.endswith(".png") else "JPEG", quality=90)
            tmp.replace(dest)
    kept = root / "pairs-images.jsonl"
    kept.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return kept


def image_kib(data: Path) -> float:
    """Mean file size of the distinct images the pairs name, KiB."""
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    paths = {r[f] for r in rows for f in IMAGE_FIELDS if r.get(f)}
    return sum((data.parent / p).stat().st_size for p in paths) / max(1, len(paths)) / 1024


# ------------------------------------------------------------------ figures 1 and 3: the job
def role(name: str) -> str:
    """The pipeline stages an operator runs: 'read', 'score->select->write' (a fused chain), or Ray's own
    name when it runs none (the input items)."""
    found = []
    for part in name.split("->"):
        low = part.lower()
        for r in ROLES:
            if r in low and r not in found:
                found.append(r)
                break
    return "->".join(found) if found else name


def run_job(repo: Path, data: Path, out: Path, overrides: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result, log = out / "job.json", out / "child.log"
    cmd = [sys.executable, str(CHILD), "job", str(repo), str(result), str(repo / "bench" / "bench.yaml"),
           f"input.path={data}", f"input.image_root={data.parent}", f"output.dir={out / 'job'}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(repo), "RAY_metrics_report_interval_ms": "1000",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    for pid in _session_pids(proc.pid):  # whatever of its Ray outlived the driver (in its own session)
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    if rc != 0:
        raise SystemExit(f"the job failed (exit {rc}); see {log} and {out / 'job' / '_logs' / 'run.log'}")
    manifest = json.loads((out / "job" / "manifest.json").read_text())
    measured = json.loads(result.read_text())
    (out / "dataset-stats.txt").write_text(measured["stats"])
    return {"wall": wall, "pairs": manifest["counts"]["pairs_read"], "operators": measured["operators"],
            "object_store": measured["object_store"]}


# ------------------------------------------------------------------ figure 2: the plain loop, Arrow bytes
def run_loop(repo: Path, data: Path, out: Path, overrides: list[str]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    dest = out / "loop.json"
    cmd = [sys.executable, str(CHILD), "loop", str(repo), str(dest), str(repo / "bench" / "bench.yaml"),
           f"input.path={data}", f"input.image_root={data.parent}", f"output.dir={out / 'loop'}", *overrides]
    env = {**os.environ, "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    with open(out / "loop.log", "w") as f:
        rc = subprocess.run(cmd, cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"the plain loop failed (exit {rc}); see {out / 'loop.log'}")
    return json.loads(dest.read_text())


# ------------------------------------------------------------------ the table
def keyed(rows: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Number repeated labels in order (generate #1, generate #2 for two rounds), so two runs line up."""
    seen: dict[str, int] = {}
    out = []
    for label, value in rows:
        seen[label] = seen.get(label, 0) + 1
        out.append((f"{label} #{seen[label]}", value))
    return out


def operator_rows(job: dict) -> list[tuple[str, float]]:
    return keyed([(role(op["operator"]), op["bytes"] / job["pairs"]) for op in job["operators"]])


def stage_rows(loop: dict, what: str = "bytes") -> list[tuple[str, float]]:
    """(stage #n, KiB per pair of its output table) in plan order; what="binary_bytes": the image bytes in it."""
    stages = loop["stages"]
    rows = [("read", stages[0][f"in_{what}"] / loop["pairs"])] if stages else []
    rows += [(role(s["stage"]), s[f"out_{what}"] / loop["pairs"]) for s in stages]
    return keyed(rows)


def kib(x: float) -> str:
    return f"{x / 1024:,.1f}"


def largest_block(job: dict) -> str:
    sizes = [op["largest_block"] for op in job["operators"] if "largest_block" in op]
    return kib(max(sizes)) if sizes else "–"  # results.json of a run before the bench kept it


def table(res: dict) -> str:
    scales = sorted(res["jobs"], key=int)
    jobs = [res["jobs"][s] for s in scales]
    head = " | ".join(f"{s}x ({j['pairs']} pairs)" for s, j in zip(scales, jobs))
    side = f"re-encoded at {res['image_side']} px a side" if res.get("image_side") else "as the demo makes them"
    lines = [f"Code: {res['repo']} at {res['commit']}; models: {res['models']}; input: the demo mix's image subsets, "
             f"images {side} (mean {res.get('image_kib', 0):.1f} KiB a file).",
             "", "Ray Data operator output, KiB per pair (`Dataset.stats()`: output size bytes of each operator's "
             "blocks, what goes through the object store; a fused chain's inner stages pass tables inside one task)",
             "", f"| operator (Ray Data's name) | stage(s) | {head} |", "|---|---|" + "---|" * len(jobs)]
    per_scale = [dict(operator_rows(j)) for j in jobs]
    names = {k: op["operator"] for k, op in zip(dict(operator_rows(jobs[0])), jobs[0]["operators"])}
    for key in per_scale[0]:
        lines.append(f"| {names[key]} | {key} | " + " | ".join(kib(p.get(key, 0)) for p in per_scale) + " |")
    lines.append("| **total, all operators** | | " +
                 " | ".join(f"**{kib(sum(p.values()))}**" for p in per_scale) + " |")
    lines += ["", "| job | " + head + " |", "|---|" + "---|" * len(jobs),
              "| **peak object-store use (ray_object_store_used_memory), MiB** | " +
              " | ".join(f"**{j['object_store']['used'] / MIB:,.2f}**" for j in jobs) + " |",
              "| largest block of any operator, KiB (over Ray's 100 KiB inline size, a block goes to the object store) | "
              + " | ".join(largest_block(j) for j in jobs) + " |",
              "| peak spilled, MiB | " + " | ".join(f"{j['object_store']['spilled'] / MIB:,.2f}" for j in jobs) + " |",
              "| object-store samples (every 0.5 s; failed reads) | " + " | ".join(
                  f"{j['object_store']['samples']} ({j['object_store']['errors']})" for j in jobs) + " |",
              "| job wall time (CLI, Ray start included), s | " + " | ".join(f"{j['wall']:.1f}" for j in jobs) + " |"]
    if res.get("loop"):
        loop = res["loop"]
        lines += ["", f"Arrow bytes per stage, KiB per pair (plain loop pipeline/plan.py:run_local, {loop['pairs']} "
                  "pairs: `Table.nbytes` of each stage's output; read = the first stage's input)", "",
                  "| stage | KiB per pair | of which image bytes (binary values) | columns |", "|---|---|---|---|"]
        cols = [None] + [s["out_columns"] for s in loop["stages"]]
        rows, images = stage_rows(loop), stage_rows(loop, "binary_bytes")
        for (key, value), (_, img), c in zip(rows, images, cols):
            lines.append(f"| {key} | {kib(value)} | {kib(img)} | {c if c is not None else ''} |")
        lines.append(f"| **total, read to select** | **{kib(sum(v for _, v in rows))}** | "
                     f"**{kib(sum(v for _, v in images))}** | |")
    return "\n".join(lines)


def compare(before: dict, after: dict) -> str:
    """The before/after table of two runs' results.json."""
    scales = [s for s in sorted(before["jobs"], key=int) if s in after["jobs"]]
    lines = [f"Before: {before['repo']} at {before['commit']}. After: {after['repo']} at {after['commit']}.", "",
             "| KiB per pair (Ray Data operator output) | " +
             " | ".join(f"before {s}x | after {s}x" for s in scales) + " |",
             "|---|" + "---|---|" * len(scales)]
    b_rows = {s: dict(operator_rows(before["jobs"][s])) for s in scales}
    a_rows = {s: dict(operator_rows(after["jobs"][s])) for s in scales}
    keys = list(dict.fromkeys([*b_rows[scales[0]], *a_rows[scales[0]]]))
    cell = lambda d, k: kib(d[k]) if k in d else "–"  # noqa: E731
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{cell(b_rows[s], k)} | {cell(a_rows[s], k)}" for s in scales) + " |")
    lines.append("| **total** | " + " | ".join(
        f"**{kib(sum(b_rows[s].values()))}** | **{kib(sum(a_rows[s].values()))}**" for s in scales) + " |")
    lines.append("| **peak object-store use, MiB** | " + " | ".join(
        f"**{before['jobs'][s]['object_store']['used'] / MIB:,.2f}** | "
        f"**{after['jobs'][s]['object_store']['used'] / MIB:,.2f}**" for s in scales) + " |")
    if before.get("loop") and after.get("loop"):
        b, a = dict(stage_rows(before["loop"])), dict(stage_rows(after["loop"]))
        bi, ai = dict(stage_rows(before["loop"], "binary_bytes")), dict(stage_rows(after["loop"], "binary_bytes"))
        lines += ["", "| KiB per pair (Arrow output of each stage, plain loop) | before | after | image bytes before "
                  "| image bytes after |", "|---|---|---|---|---|"]
        for k in dict.fromkeys([*b, *a]):
            lines.append(f"| {k} | {cell(b, k)} | {cell(a, k)} | {cell(bi, k)} | {cell(ai, k)} |")
        lines.append(f"| **total, read to select** | **{kib(sum(b.values()))}** | **{kib(sum(a.values()))}** | "
                     f"**{kib(sum(bi.values()))}** | **{kib(sum(ai.values()))}** |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose pipeline runs (default: this one)")
    parser.add_argument("--pairs", type=int, default=20,
                        help="demo pairs at 1x before the text-only subset is dropped (default 20: 16 image pairs)")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--models", choices=("tiny", "small"), default="tiny",
                        help="tiny (default, fast) or small (bench.yaml's ~32M-parameter models)")
    parser.add_argument("--image-side", type=int, default=384,
                        help="re-encode every image at this many pixels a side, with noise (default 384: photo-sized "
                             "files); 0: the demo's own 96-128 pixel drawings")
    parser.add_argument("--no-loop", action="store_true", help="skip the plain loop (figure 2)")
    parser.add_argument("--out", type=Path, default=None, help="default: out/bench-bytes/<checkout's commit>")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                        help="print the before/after table of two runs' results.json, and run nothing")
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        print(compare(before, after))
        return 0
    repo = args.repo.resolve()
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "pipeline", "stages", "schemas"],
                           capture_output=True, text=True).stdout.strip()
    commit += " (with uncommitted changes in pipeline/ stages/ schemas/)" if dirty else ""
    out = (args.out or REPO / "out" / "bench-bytes" / commit.split()[0]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started, load = time.perf_counter(), os.getloadavg()

    from scripts.build_tiny_models import build

    models = build(REPO / "models", args.models)
    overrides = [f"generators.0.model={models['generator']}", f"embedder.model={models['embedder']}"]
    res = {"repo": str(repo), "commit": commit, "models": args.models, "image_side": args.image_side,
           "jobs": {}, "loop": None}
    for s in args.scales:
        data = image_pairs(out, args.pairs, s, args.image_side)
        res["image_kib"] = image_kib(data)
        print(f"job at {s}x ({repo}) ...", flush=True)
        res["jobs"][str(s)] = run_job(repo, data, out / f"job-{s}x", overrides)
        if s == args.scales[0] and not args.no_loop:
            print(f"plain loop at {s}x ...", flush=True)
            res["loop"] = run_loop(repo, data, out / f"loop-{s}x", overrides)
        (out / "results.json").write_text(json.dumps(res, indent=1))
    publish(table(res) + "\n\n" + machine_line(load, started), out)
    print(f"\nresults: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
