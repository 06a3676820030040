"""pairsel's throughput and memory benchmark: prints a table (see BENCHMARKS.md).

    python bench/bench.py [--pairs 40] [--out out/bench] [--loop-threads 1]     (or: make bench)

Builds the "small" random-weight models (~32M parameters each) and the demo mix at 1x and 4x, then measures:

1. the job (bench/bench.yaml: K_max = 8 in two rounds: 2 candidates, then up to 8) through the real CLI at 1x and 4x: wall time,
   pairs/s, embedder forward inputs (the Embed actors' counters) against the minimum the method needs (the
   distinct inputs of the written pairs), and the peak memory of the driver and of the whole job (every
   process of its session, sampled);
2. right after each job, the model-only time: pipeline/plan.py:run_local runs the same stages on the same
   shards with the same batch sizes in a plain loop in this process, without Ray, one model call at a time
   with 1 torch thread (as each model actor has), and only the time inside the backends' generate() and
   embed() calls counts;
3. the same job at 1x with every candidate at once (no rounds), and its model-only loop: generated tokens
   per pair against rounds, need_reasoning agreement, how much chosen delta the rounds give up, and time.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow.parquet as pq  # noqa: E402

CONFIG = REPO / "bench" / "bench.yaml"
SCALES = (1, 4)
MIB = 1 << 20


# ------------------------------------------------------------------ the job through the CLI, with its memory
def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (every process, every core), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in bytes, from /proc; (0, 0) once it is gone."""
    values = {}
    try:
        for name, field in (("status", "VmRSS:"), ("smaps_rollup", "Pss:")):
            with open(f"/proc/{pid}/{name}") as f:
                for line in f:
                    if line.startswith(field):
                        values[field] = int(line.split()[1]) * 1024
                        break
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    rss = values.get("VmRSS:", 0)
    return rss, values.get("Pss:", rss)


class Sampler(threading.Thread):
    """Every process of the job's session (driver, Ray's GCS, raylet, agents and workers), sampled: peak RSS
    of the driver, peak sum of RSS and of PSS (shared pages, e.g. the object store, counted once) over the
    session, and the CPU seconds each process had used when last seen."""

    def __init__(self, pid: int, every: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.peak = {"driver_rss": 0, "job_rss": 0, "job_pss": 0, "processes": 0}
        self.cpu: dict[int, float] = {}
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            pids = _session_pids(self.pid)
            for pid in pids:
                self.cpu[pid] = max(self.cpu.get(pid, 0.0), _cpu_seconds(pid))
            sizes = {pid: _memory(pid) for pid in pids}
            self.peak["driver_rss"] = max(self.peak["driver_rss"], sizes.get(self.pid, (0, 0))[0])
            self.peak["job_rss"] = max(self.peak["job_rss"], sum(rss for rss, _ in sizes.values()))
            self.peak["job_pss"] = max(self.peak["job_pss"], sum(pss for _, pss in sizes.values()))
            self.peak["processes"] = max(self.peak["processes"], len(pids))
            self.done.wait(self.every)


def run_job(data: Path, out: Path, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "pipeline", "run", str(CONFIG), f"input.path={data / 'pairs.jsonl'}",
           f"input.image_root={data}", f"output.dir={out}", *overrides, "--overwrite"]
    log = out.with_suffix(".log")
    busy0, t0, started = _busy_seconds(), time.perf_counter(), time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        sampler = Sampler(proc.pid)
        sampler.start()
        rc = proc.wait()
    wall = time.perf_counter() - t0
    sampler.done.set()
    sampler.join()
    cpu = sum(sampler.cpu.values())
    others = max(0.0, _busy_seconds() - busy0 - cpu) / wall  # cores other processes kept busy meanwhile
    for pid in _session_pids(proc.pid):  # whatever of its Ray outlived the driver (in its own session)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if rc != 0:
        raise SystemExit(f"the job failed (exit {rc}); see {log}")
    stats = [json.loads(p.read_text()) for p in sorted((out / "_stats").glob("*.json"))]
    # the job's timeline from its model actors' counters (stages/counters.py), in seconds since it started
    timeline = {"first": min(st["t_first"] for st in stats if st["t_first"]) - started,
                "last": max(st["t_last"] for st in stats if st["t_last"]) - started}
    return {"wall": wall, "timeline": timeline, "memory": sampler.peak, "cpu": cpu, "others": others, "stats": stats,
            "rows": {r["pair_id"]: r for r in pq.read_table(out / "data").to_pylist()},
            "manifest": json.loads((out / "manifest.json").read_text())}


# ------------------------------------------------------------------ model-only time: the stages in a plain loop
class Timed:
    """A backend whose generate() and embed() calls are timed."""

    def __init__(self, backend, clock: dict):
        self._backend, self._clock = backend, clock

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def _timed(self, method, items):
        t0 = time.perf_counter()
        try:
            return method(items)
        finally:
            self._clock["seconds"] += time.perf_counter() - t0

    def generate(self, requests):
        return self._timed(self._backend.generate, requests)

    def embed(self, inputs):
        return self._timed(self._backend.embed, inputs)


def model_only(data: Path, threads: int, overrides: list[str]) -> dict:
    import torch

    from pipeline import config
    from pipeline.plan import run_local
    from stages.inputs import plan_shards

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="pairsel-bench-loop-") as tmp:
        cfg = config.load(CONFIG, [f"input.path={data / 'pairs.jsonl'}", f"input.image_root={data}",
                                   f"output.dir={tmp}", *overrides])
        config.resolve_paths(cfg)
        clock, stages, rows_run = {"seconds": 0.0}, [], {"rows": 0}

        def count_rows(module, args, kwargs, output):
            ids = kwargs.get("input_ids")
            rows_run["rows"] += int(ids.shape[0]) if ids is not None else 0

        def instrument(stage):
            if hasattr(stage, "backend"):
                if hasattr(stage, "cache") and hasattr(stage.backend, "model"):  # an embedder on torch
                    stage.backend.model.register_forward_hook(count_rows, with_kwargs=True)
                stage.backend = Timed(stage.backend, clock)
                stages.append(stage)

        busy0, cpu0, t0 = _busy_seconds(), time.process_time(), time.perf_counter()
        rows = run_local(cfg, plan_shards(config.to_dict(cfg)["input"]), instrument)
        wall = time.perf_counter() - t0
        others = max(0.0, _busy_seconds() - busy0 - (time.process_time() - cpu0)) / wall
        forwards = sum(s.stats.get("forwards", 0) for s in stages)
        return {"model_seconds": clock["seconds"], "loop_wall": wall, "others": others, "forwards": forwards,
                "embedder_rows": rows_run["rows"],
                "pairs": len(rows)}


# ------------------------------------------------------------------ the figures
def minimum_inputs(rows: dict, embedder: dict, image_root: Path, controls=()) -> int:
    """The distinct embedder inputs the written pairs need: plain queries, rationale-augmented queries of the
    candidates that were embedded, the queries with each content-free control (scoring.controls) and each decoy
    (the decoy rule), targets and negatives (a target that is another pair's negative once), and with target
    rationales the targets with each rationale, control and decoy."""
    from stages.embed import control_text

    digests: dict[str, str] = {}

    def image(rel):
        if rel is None:
            return None
        if rel not in digests:
            digests[rel] = hashlib.sha256((image_root / rel).read_bytes()).hexdigest()
        return digests[rel]

    q_ins, t_ins, r_ins = (embedder[k] for k in ("query_instruction", "target_instruction", "reasoned_query_instruction"))
    need = set()

    def decoy_texts(r: dict, field: str, cands: str) -> list[str]:  # a decoy's text is its donor's candidate's
        return [rows[d["donor_pair_id"]][cands][d["donor_candidate"]]["text"] for d in r.get(field) or []]

    for r in rows.values():
        q, q_img = r["query_text"] or "", image(r["query_image_path"])
        need.add((q_ins.replace("{text}", q), q_img))
        need.add((t_ins.replace("{text}", r["target_text"] or ""), image(r["target_image_path"])))
        need.update((t_ins.replace("{text}", n["text"] or ""), image(n["image_path"])) for n in r["negatives"])
        need.update((r_ins.replace("{text}", q).replace("{rationale}", c["text"]), q_img)
                    for c in r["candidates"] if c["s_k"] is not None)
        need.update((r_ins.replace("{text}", q).replace("{rationale}", control_text(c, r["query_text"])), q_img)
                    for c in controls)
        need.update((r_ins.replace("{text}", q).replace("{rationale}", text), q_img)  # the decoy rule's decoys
                    for text in decoy_texts(r, "decoys", "candidates"))
        # target rationales (generators[].k_target): the target with each rationale, and with each control
        rt_ins = embedder.get("reasoned_target_instruction")
        t, t_img = r["target_text"] or "", image(r["target_image_path"])
        targets = r.get("target_candidates") or []
        need.update((rt_ins.replace("{text}", t).replace("{rationale}", c["text"]), t_img)
                    for c in targets if c["s_k"] is not None)
        if targets:
            need.update((rt_ins.replace("{text}", t).replace("{rationale}", control_text(c, r["target_text"])), t_img)
                        for c in controls)
            need.update((rt_ins.replace("{text}", t).replace("{rationale}", text), t_img)
                        for text in decoy_texts(r, "target_decoys", "target_candidates"))
    return len(need)


def tokens(rows: dict) -> int:
    return sum(c["tokens"] or 0 for r in rows.values() for c in r["candidates"])


def compare_labels(rounds: dict, full: dict) -> dict:
    agree = sum(rounds[p]["need_reasoning"] == full[p]["need_reasoning"] for p in full)
    losses = [full[p]["best_delta"] - rounds[p]["best_delta"] for p in full
              if full[p]["best_delta"] is not None and rounds[p]["best_delta"] is not None]
    return {"agree": agree, "pairs": len(full), "mean_loss": sum(losses) / max(1, len(losses)),
            "chosen_differs": sum(rounds[p]["chosen"] != full[p]["chosen"] for p in full)}


def replay(full: dict, schedule: list[int], epsilon: float, margin: float, valid: tuple, rule: dict) -> dict:
    """What rounds would give, replayed on a full-K run's candidates (candidate k is the same candidate in
    both, so this is exact up to the embedder's batch invariance; the measured row checks it): token saving,
    need_reasoning agreement and mean loss in chosen delta, for any margin and set of valid finish reasons. A
    pair stops once its best valid candidate beats its threshold with the margin (stages/select.py:satisfied);
    under the decoy rule with the full-K run's decoys, and the replayed pairs are calibrated again."""
    from stages.calibrate import calibrate, margin_lookup, row_scores
    from stages.select import label_rows, satisfied, score_rows
    from stages.side import QUERY

    need = {"query": len(next(iter(full.values()))["candidates"])} if rule["rule"] == "decoys" else None
    replayed, spent, losses = [], 0, []
    for r in full.values():
        cands = [{**c, "valid": c["finish_reason"] in valid and c["delta"] is not None} for c in r["candidates"]]
        for reach in schedule:
            n = min(reach, len(cands))
            if n == len(cands) or satisfied({**r, "candidates": cands[:n]}, QUERY, epsilon, margin,
                                            (need or {}).get("query", 0)):
                break
        spent += sum(c["tokens"] for c in cands[:n])
        best_full = max((c["delta"] for c in cands if c["valid"]), default=None)
        best = max((c["delta"] for c in cands[:n] if c["valid"]), default=None)
        if best_full is not None:
            losses.append(best_full - best)
        replayed.append({**r, "candidates": cands[:n], "target_candidates": None})
    score_rows(replayed, epsilon, need)
    margins = None
    if need:
        calibration = calibrate(row_scores(replayed, rule["group"]), rule["fdr"], 0.5)
        margins = margin_lookup(calibration, rule["group"])
    label_rows(replayed, epsilon, margins, need)
    agree = sum(r["need_reasoning"] == full[r["pair_id"]]["need_reasoning"] for r in replayed)
    return {"saving": 1 - spent / max(1, tokens(full)), "agree": agree, "pairs": len(full),
            "mean_loss": sum(losses) / max(1, len(losses))}


def per_round_rates(stats: list[dict]) -> tuple[str, str]:
    """Generated tokens and embedder inputs per model-second of the job's actors, round by round."""
    def rates(stage, count):
        rounds = sorted({st["round"] for st in stats if st["stage"] == stage})
        out = []
        for r in rounds:
            sel = [st for st in stats if st["stage"] == stage and st["round"] == r]
            out.append(sum(st[count] for st in sel) / max(1e-9, sum(st["model_seconds"] for st in sel)))
        return " / ".join(f"{x:.0f}" for x in out)
    return rates("generate", "tokens"), rates("embed", "forwards")


def row(name, a, b, target=""):
    return f"| {name} | {a} | {b} | {target} |"


def table(res: dict, n: int) -> str:
    one, four = res["rounds"][1], res["rounds"][4]
    loop1, loop4 = res["loop"][1], res["loop"][4]
    cmp = res["labels"]

    span = lambda run: run["timeline"]["last"] - run["timeline"]["first"]  # noqa: E731
    mem = lambda run, key: f"{run['memory'][key] / MIB:,.0f}"  # noqa: E731
    lines = [
        f"| metric | 1x ({n} pairs) | 4x ({4 * n} pairs) | target |",
        "|---|---|---|---|",
        row("pipeline wall time, s", f"{one['wall']:.1f}", f"{four['wall']:.1f}"),
        row("pairs/s", f"{n / one['wall']:.3f}", f"{4 * n / four['wall']:.3f}",
            f"linear: 4x/1x wall = {four['wall'] / one['wall']:.2f}; each added pair "
            f"{(four['wall'] - one['wall']) / (3 * n):.2f} s"),
        row("model-only time (plain loop, backend calls), s", f"{loop1['model_seconds']:.1f}",
            f"{loop4['model_seconds']:.1f}"),
        row("plain loop wall time (model loads, stage code, cache and backend calls), s",
            f"{loop1['loop_wall']:.1f}", f"{loop4['loop_wall']:.1f}"),
        row("**pipeline wall / model-only**", f"**{one['wall'] / loop1['model_seconds']:.2f}**",
            f"**{four['wall'] / loop4['model_seconds']:.2f}**", "≤ 1.20 (aim 1.10)"),
        row("start-up: job start to its first model batch (Ray, duplicate index, actors, model loads), s",
            f"{one['timeline']['first']:.1f}", f"{four['timeline']['first']:.1f}"),
        row("model-work span: first to last model batch, s", f"{span(one):.1f}", f"{span(four):.1f}"),
        row("**model-work span / model-only** (the pipeline once started)",
            f"**{span(one) / loop1['model_seconds']:.2f}**", f"**{span(four) / loop4['model_seconds']:.2f}**"),
        row("after the last model batch (score, write, commit, manifest, Ray shutdown), s",
            f"{one['wall'] - one['timeline']['last']:.1f}", f"{four['wall'] - four['timeline']['last']:.1f}"),
        row("other processes' CPU meanwhile, cores (job / loop)", f"{one['others']:.2f} / {loop1['others']:.2f}",
            f"{four['others']:.2f} / {loop4['others']:.2f}", "0: a quiet machine"),
        row("model seconds inside the job (sum over its actors)", f"{one['model_seconds']:.1f}",
            f"{four['model_seconds']:.1f}"),
        row("cores kept busy with model work (job's model seconds / wall)",
            f"{one['model_seconds'] / one['wall']:.2f}", f"{four['model_seconds'] / four['wall']:.2f}",
            f"of {os.cpu_count()}"),
        row("embedder forward inputs (job / plain loop)", f"{one['forwards']} / {loop1['forwards']}",
            f"{four['forwards']} / {loop4['forwards']}"),
        row("minimum inputs (distinct q + rationales + targets ∪ negatives)", one["minimum"], four["minimum"]),
        row("**embedder inputs per pair over the minimum**", f"**{one['forwards'] / one['minimum']:.2f}**",
            f"**{four['forwards'] / four['minimum']:.2f}**", "1.00"),
        row("**embedder inputs per pair over the minimum, target rationales (k_target 2, full K)**",
            f"**{res['target']['forwards'] / res['target']['minimum']:.2f}**", "–", "1.00"),
        *decoy_cost_rows(res, n),
        row("embedder inputs per pair, rounds (decoy rule: decoys for every K_max slot in round 1)",
            f"{one['forwards'] / n:.2f}", f"{four['forwards'] / (4 * n):.2f}"),
        row("rows the embedder model ran per input (padding copies included; loop)",
            f"{loop1['embedder_rows'] / max(1, loop1['forwards']):.2f}",
            f"{loop4['embedder_rows'] / max(1, loop4['forwards']):.2f}"),
        row("generated tokens per pair, rounds", f"{tokens(one['rows']) / n:.1f}", f"{tokens(four['rows']) / (4 * n):.1f}"),
        row("generated tokens per pair, full K", f"{tokens(res['full']['rows']) / n:.1f}", "–"),
        row("**token saving of rounds (margin 0)**", f"**{1 - tokens(one['rows']) / tokens(res['full']['rows']):.1%}**",
            "–", "≥ 30%"),
        row("**need_reasoning agreement with full K**", f"**{cmp['agree']}/{cmp['pairs']}**", "–", "identical"),
        row("mean loss in chosen delta (full K − rounds)", f"{cmp['mean_loss']:.4f}", "–"),
        row("pairs whose chosen candidate differs", f"{cmp['chosen_differs']}/{cmp['pairs']}", "–"),
        row("model-only time, rounds / full K, s",
            f"{loop1['model_seconds']:.1f} / {res['loop']['full']['model_seconds']:.1f}", "–"),
        row("job wall time, rounds / full K, s (other processes' CPU, cores)",
            f"{one['wall']:.1f} / {res['full']['wall']:.1f} ({one['others']:.2f} / {res['full']['others']:.2f})", "–"),
        row("generated tokens per model-second, round 1 / round 2 / full K",
            f"{per_round_rates(one['stats'])[0]} / {per_round_rates(res['full']['stats'])[0]}", "–"),
        row("embedder inputs per model-second, round 1 / round 2 / full K",
            f"{per_round_rates(one['stats'])[1]} / {per_round_rates(res['full']['stats'])[1]}", "–"),
        row("peak RSS, driver, MiB", mem(one, "driver_rss"), mem(four, "driver_rss")),
        row("peak memory, whole job (sum of PSS), MiB", mem(one, "job_pss"), mem(four, "job_pss")),
        row("peak memory, whole job (sum of RSS), MiB", mem(one, "job_rss"), mem(four, "job_rss")),
    ]
    return "\n".join(lines)


def embed_forwards(run: dict) -> int:
    """The embedder inputs a job ran (its Embed actors' counters)."""
    return sum(st["forwards"] for st in run["stats"] if st["stage"] == "embed")


def decoy_cost_rows(res: dict, n: int) -> list[str]:
    """What the decoy rule costs against the fixed rule it replaces, from two full-K jobs over one shard of the 1x
    mix: the shipped scoring (configs/demo.yaml: the decoy rule and its controls) and the fixed rule
    (bench/baseline.yaml: five controls). In the mix some subsets are too small to give a pair all its decoys; such
    pairs cost less (and are undecided), so the cost of a pair with all of them is given too: the mean plus the
    decoys the others lacked."""
    dec, bar = res["cost"], res["cost_bar"]
    k = dec["manifest"]["config"]["generators"][0]["k"]
    per_pair = [len(r["decoys"] or []) for r in dec["rows"].values()]
    controls = {run: len(res[run]["manifest"]["config"]["scoring"]["controls"]) for run in ("cost", "cost_bar")}
    whole = (dec["forwards"] + k * n - sum(per_pair)) / n
    return [
        row(f"decoys per pair, full K (K = {k}), one shard of the 1x mix: mean / pairs with all {k}",
            f"{sum(per_pair) / n:.2f} / {sum(d >= k for d in per_pair)} of {n}", "–"),
        row(f"embedder inputs per pair, full K: fixed rule ({controls['cost_bar']} controls) / decoy rule "
            f"({controls['cost']} controls): mean / a pair with all its decoys",
            f"{bar['forwards'] / n:.2f} / {dec['forwards'] / n:.2f} / {whole:.2f}", "–"),
        row(f"**what the decoy rule costs: embedder inputs, decoy rule / fixed rule, full K = {k}: mean / a pair "
            f"with all its decoys**", f"**{dec['forwards'] / bar['forwards']:.2f}x / {whole * n / bar['forwards']:.2f}x**",
            "–", "< 1.5x"),
    ]


def scoring_overrides(path: Path, *keys: str) -> list[str]:
    """key=value overrides that give a job the scoring keys of a config file (flow YAML values)."""
    import yaml

    scoring = yaml.safe_load(path.read_text())["scoring"]
    return [f"scoring.{key}={json.dumps(scoring[key])}" for key in keys]


def run_decoy_cost(data: Path, out: Path, model_args: list[str], res: dict) -> None:
    whole = ["rounds.k0=null", "input.rows_per_shard=100000"]
    shipped = scoring_overrides(REPO / "configs" / "demo.yaml", "controls", "decision")
    baseline = scoring_overrides(REPO / "bench" / "baseline.yaml", "epsilon", "controls", "decision")
    res["cost"] = run_job(data, out / "cost-1x", *model_args, *whole, *shipped)
    res["cost_bar"] = run_job(data, out / "cost-bar-1x", *model_args, *whole, *baseline)
    for run in (res["cost"], res["cost_bar"]):
        run["forwards"] = embed_forwards(run)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=40, help="pairs at 1x (default 40, 8 per subset; 4x is four times that)")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench")
    parser.add_argument("--loop-threads", type=int, default=1,
                        help="torch threads of the model-only loop (default 1, as each model actor of the job has)")
    parser.add_argument("--decoy-cost", action="store_true", help="only what the decoys cost (two full-K jobs at 1x)")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load = os.getloadavg()

    from scripts.build_tiny_models import build
    from scripts.make_demo_data import make

    print("building the small models and the demo mix ...", flush=True)
    models = build(REPO / "models", "small")
    model_args = [f"generators.0.model={models['generator']}", f"embedder.model={models['embedder']}"]
    data = {s: make(out / f"data-{s}x", n_pairs=args.pairs, scale=s).parent for s in SCALES}

    res = {"rounds": {}, "loop": {}}
    if args.decoy_cost:
        run_decoy_cost(data[1], out, model_args, res)
        publish("\n".join(["| | 1x | 4x | goal |", "|---|---|---|---|", *decoy_cost_rows(res, args.pairs)]), out)
        return 0

    def save():  # what is measured so far, for a bench that is stopped or fails part way
        slim = {k: {s: {m: v for m, v in run.items() if m not in ("rows", "manifest")} for s, run in d.items()}
                for k, d in res.items() if k in ("rounds", "loop")}
        (out / "results.json").write_text(json.dumps(slim, indent=1, default=str))

    def count_inputs(run: dict, s: int) -> dict:
        run["forwards"] = embed_forwards(run)
        run["model_seconds"] = sum(st["model_seconds"] for st in run["stats"])
        run["minimum"] = minimum_inputs(run["rows"], run["manifest"]["config"]["embedder"], data[s],
                                        run["manifest"]["config"]["scoring"]["controls"])
        return run

    for s in SCALES:  # each job right before its loop, so that both meet the same machine
        print(f"job with rounds at {s}x ({s * args.pairs} pairs) ...", flush=True)
        res["rounds"][s] = count_inputs(run_job(data[s], out / f"rounds-{s}x", *model_args), s)
        print(f"model-only loop at {s}x ...", flush=True)
        res["loop"][s] = model_only(data[s], args.loop_threads, model_args)
        save()
        if s == 1:
            print("job with every candidate at once (full K) at 1x, and its model-only loop ...", flush=True)
            res["full"] = count_inputs(run_job(data[1], out / "full-1x", *model_args, "rounds.k0=null"), 1)
            print("the decoys' cost: full K over one shard at 1x, decoy rule and fixed rule ...", flush=True)
            run_decoy_cost(data[1], out, model_args, res)
            res["loop"]["full"] = model_only(data[1], args.loop_threads, model_args + ["rounds.k0=null"])
            print("job with target rationales (k_target 2, full K) at 1x ...", flush=True)
            res["target"] = count_inputs(run_job(data[1], out / "target-1x", *model_args, "rounds.k0=null",
                                                 "generators.0.k_target=2"), 1)
            save()
    res["labels"] = compare_labels(res["rounds"][1]["rows"], res["full"]["rows"])

    cfg = res["rounds"][1]["manifest"]["config"]
    k_max, eps, margin = cfg["generators"][0]["k"], cfg["scoring"]["epsilon"], cfg["rounds"]["margin"]
    schedule = list(range(cfg["rounds"]["k0"], k_max, cfg["rounds"]["step"])) + [k_max]
    valid = tuple(cfg["scoring"]["valid_finish_reasons"])
    text = table(res, args.pairs)
    replays = ["| margin | valid finish reasons | token saving | need_reasoning agreement | mean loss in chosen delta |",
               "|---|---|---|---|---|"]
    # larger margins: under the decoy rule shares of a pair's headroom, under the bar rule delta's units
    wider = (0.05, 0.1, 0.2) if cfg["scoring"]["decision"]["rule"] == "decoys" else (0.5, 1.0, 2.0)
    for m, v in [(margin, valid), *[(w, valid) for w in wider], (margin, ("stop",))]:
        r = replay(res["full"]["rows"], schedule, eps, m, v, cfg["scoring"]["decision"])
        replays.append(f"| {m:g} | {', '.join(v)} | {r['saving']:.1%} | {r['agree']}/{r['pairs']} | {r['mean_loss']:.4f} |")
    text += (f"\n\nRounds {schedule} of K_max = {k_max}, margin {margin:g}, valid finish reasons {list(valid)}. "
             f"The same rounds replayed on the full-K run at 1x:\n\n" + "\n".join(replays))
    text += (f"\n\nModel-only loop: {args.loop_threads} torch thread(s), one model call at a time; the job's model "
             f"actors run 1 thread each, several at a time. " + machine_line(load, started))
    publish(text, out)
    return 0


def machine_line(load: tuple, started: float) -> str:
    """The machine and how busy it was, for the end of a bench's table."""
    return (f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}; load "
            f"average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end. "
            f"Bench total {time.perf_counter() - started:.0f} s.")


def publish(text: str, out: Path) -> None:
    """Print the table and keep it as OUT/table.md."""
    print()
    print(text)
    (out / "table.md").write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
