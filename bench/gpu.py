"""The transformers backends on a GPU: pairsel's stages against the same model driven directly. Prints a table
(BENCHMARKS.md, "GPU").

    python bench/gpu.py [--pairs 50] [--k 8] [--new-tokens 64] [--out out/bench-gpu]     (or: make bench-gpu)
    python bench/gpu.py --smoke      the same on the CPU with a tiny model and a few pairs (under 2 minutes)

1. Builds a Qwen2-VL-2B-shaped model (text 1536 wide, 28 layers; vision tower 32 layers) with random weights
   from a config, on the device (no download), with the tiny models' tokenizer and Qwen2-VL's image processor,
   and saves it: the stages load it from a folder, as a job does.
2. Runs the stages on demo pairs (10 per subset, images included) through pipeline/plan.py:run_local with
   configs/demo.yaml, K candidates of up to N new tokens, the model as generator and embedder, 64 rows per
   generate and embed call; every backend call is timed, and NVML samples the GPU's utilisation meanwhile.
   Then the same job again (a twin run: its rows must equal the first's; where they do not, the first backend
   call whose output differs for the same input names the stage). The rates are the twin's: the first run also
   pays the device's cold start (kernels load on first use), shown apart.
3. Drives the same model directly on the same inputs: one `generate` call over the sequences the job sampled
   (transformers' own sampling), and the embedder inputs of the job in batches of 64 sorted by length, images
   included (the model's own vision tower per batch), last-token pooling.

Needs torch, transformers, omegaconf, polars and pyarrow; not Ray.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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

GIB = 1 << 30
# Qwen2-VL-2B's shape; the vocabulary is the tiny tokenizer's.
QWEN2VL_2B = {"text": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                           num_key_value_heads=2, mrope_section=[16, 24, 24]),
              "vision": dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4),
              "max_position_embeddings": 32768}
# Qwen2-VL's own pixel budget per image (its preprocessor_config.json)
IMAGE_PIXELS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280}
DIRECT_EMBED_ROWS = 64


def build_model(out: Path, shape: dict, device: str, dtype) -> tuple[Path, int]:
    """A random-weight Qwen2-VL of `shape` built on `device`, saved under out with the tiny tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration

    from scripts.build_tiny_models import build, image_processor, model_config, save_processor

    tiny = build(REPO / "models")["generator"]
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = model_config({**shape, "vocab_size": len(tokenizer)}, tokenizer)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    folder = out / "model"
    model.save_pretrained(folder)
    save_processor(folder, tokenizer, image_processor(IMAGE_PIXELS))
    params = sum(p.numel() for p in model.parameters())
    del model
    return folder, params


class Recorder:
    """A backend whose calls are recorded and timed (wall, CPU of this process), with the device synchronised
    at both ends so that a call's time is its own work."""

    def __init__(self, backend, kind: str, log: list, sync):
        self._backend, self._kind, self._log, self._sync = backend, kind, log, sync

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def _call(self, method, items):
        self._sync()
        t0, c0 = time.perf_counter(), time.process_time()
        out = method(items)
        self._sync()
        self._log.append({"kind": self._kind, "start": t0, "end": time.perf_counter(),
                          "cpu": time.process_time() - c0, "items": items, "out": out})
        return out

    def generate(self, requests):
        return self._call(self._backend.generate, requests)

    def embed(self, inputs):
        return self._call(self._backend.embed, inputs)


class Utilisation(threading.Thread):
    """NVML's GPU utilisation, sampled every 20 ms (each sample: the share of the last sampling period in
    which a kernel ran)."""

    def __init__(self):
        super().__init__(daemon=True)
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.02):
            self.samples.append((time.perf_counter(), self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu))

    def mean_over(self, spans: list[tuple[float, float]]) -> float | None:
        inside = [u for t, u in self.samples if any(a <= t <= b for a, b in spans)]
        return sum(inside) / len(inside) if inside else None


def run_job(cfg_args: list[str], out_dir: Path, sync) -> dict:
    """The stages through run_local; returns the rows, the recorded backend calls and the times."""
    from pipeline import config
    from pipeline.plan import run_local
    from stages.backends.hf import embedders, generator
    from stages.inputs import plan_shards

    cfg = config.load(REPO / "configs" / "demo.yaml", [*cfg_args, f"output.dir={out_dir}"])
    config.resolve_paths(cfg)
    calls, loads = [], []
    real_loads = generator.load_model, embedders.load_model  # both the one of stages/backends/hf/inputs.py

    def timed_load(*args, **kwargs):  # model loads are neither model calls nor per-pair work
        c0 = time.process_time()
        try:
            return real_loads[0](*args, **kwargs)
        finally:
            loads.append(time.process_time() - c0)

    def instrument(stage):
        if hasattr(stage, "backend"):
            stage.backend = Recorder(stage.backend, "embed" if hasattr(stage, "cache") else "generate", calls, sync)

    generator.load_model = embedders.load_model = timed_load
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        rows = run_local(cfg, plan_shards(config.to_dict(cfg)["input"]), instrument)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        generator.load_model, embedders.load_model = real_loads
    return {"rows": rows, "calls": calls, "wall": wall, "cpu": cpu, "load_cpu": sum(loads)}


def direct_generate(model, inputs, requests, sync) -> dict:
    """One generate call over every (prompt, image, seed) the job sampled, with transformers' own sampling."""
    import torch

    rows = [inputs.encode(inputs.chat_prompt(r.prompt, r.image), r.image, add_special_tokens=False)
            for r in requests for _ in r.seeds]
    r0 = requests[0]
    batch = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v
             for k, v in inputs.collate(rows, "left").items()}
    width = batch["input_ids"].shape[1]
    stops = [i for i in (inputs.tokenizer.eos_token_id, inputs.tokenizer.convert_tokens_to_ids("<|im_end|>"),
                         inputs.pad_token_id) if i is not None]
    torch.manual_seed(0)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=True, temperature=r0.temperature, top_p=r0.top_p, top_k=0,
                             max_new_tokens=r0.max_new_tokens, eos_token_id=stops, pad_token_id=inputs.pad_token_id)
    sync()
    seconds = time.perf_counter() - t0
    tokens = 0
    for seq in out[:, width:].tolist():
        stop = next((i for i, t in enumerate(seq) if t in stops), None)
        tokens += len(seq) if stop is None else stop + 1
    return {"seconds": seconds, "tokens": tokens, "sequences": len(rows)}


def direct_embed(model, inputs, embed_inputs, max_length: int, sync) -> dict:
    """The job's embedder inputs in batches of DIRECT_EMBED_ROWS sorted by length, pixels with their rows."""
    import torch

    c0, t0 = time.process_time(), time.perf_counter()
    rows = [inputs.encode(inputs.raw_text(x.text, x.image), x.image, add_special_tokens=True, max_length=max_length)
            for x in embed_inputs]
    prepare = time.perf_counter() - t0
    order = sorted(range(len(rows)), key=lambda i: -rows[i]["input_ids"].shape[1])
    batches = [inputs.collate([rows[i] for i in order[s:s + DIRECT_EMBED_ROWS]], "right")
               for s in range(0, len(order), DIRECT_EMBED_ROWS)]
    prepare, cpu = time.perf_counter() - t0, time.process_time() - c0
    sync()
    t0 = time.perf_counter()
    pooled = []
    with torch.inference_mode():
        for batch in batches:
            batch = {k: v.to(model.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
            hidden = model(**batch, use_cache=False).last_hidden_state
            last = batch["attention_mask"].sum(1) - 1
            pooled.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float())
        torch.cat(pooled).cpu()
    sync()
    return {"seconds": time.perf_counter() - t0, "prepare": prepare, "prepare_cpu": cpu, "inputs": len(rows)}


def summary(job: dict, pairs: int) -> dict:
    gen = [c for c in job["calls"] if c["kind"] == "generate"]
    emb = [c for c in job["calls"] if c["kind"] == "embed"]
    model_cpu = sum(c["cpu"] for c in job["calls"])
    return {
        "gen_seconds": sum(c["end"] - c["start"] for c in gen),
        "tokens": sum(g.tokens for c in gen for gens in c["out"] for g in gens),
        "sequences": sum(len(r.seeds) for c in gen for r in c["items"]),
        "embed_seconds": sum(c["end"] - c["start"] for c in emb),
        "inputs": sum(len(c["items"]) for c in emb), "embed_calls": len(emb), "generate_calls": len(gen),
        "cpu_per_pair": (job["cpu"] - model_cpu - job["load_cpu"]) / pairs, "wall": job["wall"],
        "gen_spans": [(c["start"], c["end"]) for c in gen], "embed_spans": [(c["start"], c["end"]) for c in emb],
    }


def twin_differences(a: list[dict], b: list[dict]) -> str:
    """'yes' where the two runs' rows are equal, else which columns differ in how many rows (by pair_id)."""
    first, second = ({r["pair_id"]: r for r in rows} for rows in (a, b))
    if first.keys() != second.keys():
        return f"**no**: {len(first.keys() ^ second.keys())} pair_ids in one run only"
    columns: dict[str, int] = {}
    rows = 0
    for pair_id, row in first.items():
        differ = [k for k in row.keys() | second[pair_id].keys() if row.get(k) != second[pair_id].get(k)]
        rows += bool(differ)
        for k in differ:
            columns[k] = columns.get(k, 0) + 1
    if not rows:
        return "yes"
    return f"**no**: {rows} of {len(first)} rows differ (" + ", ".join(
        f"{k} {n}" for k, n in sorted(columns.items(), key=lambda kv: (-kv[1], kv[0]))) + ")"


def first_call_difference(a: list[dict], b: list[dict]) -> str:
    """The first backend call (in call order) whose output differs between two runs' recorded calls, or ''."""
    import numpy as np

    for i, (x, y) in enumerate(zip(a, b)):
        where = f"call {i + 1} ({x['kind']})"
        if x["kind"] != y["kind"] or x["items"] != y["items"]:
            return f"{where}: other inputs"
        if x["kind"] == "generate":
            first, second = ([g.text for gens in c["out"] for g in gens] for c in (x, y))
            differ = sum(p != q for p, q in zip(first, second))
            if differ:
                return f"{where}: {differ} of {len(first)} texts differ for the same requests"
        else:
            first, second = np.asarray(x["out"]), np.asarray(y["out"])
            differ = int((~np.all(first == second, axis=1)).sum())
            if differ:
                return (f"{where}: {differ} of {len(first)} vectors differ for the same inputs (largest "
                        f"difference {float(np.abs(first - second).max()):.1e})")
    return "" if len(a) == len(b) else f"{len(a)} calls against {len(b)}"


def table(s: dict, direct: dict, extra: dict) -> str:
    gen_rate, emb_rate = s["tokens"] / s["gen_seconds"], s["inputs"] / s["embed_seconds"]
    d_gen = direct["gen"]["tokens"] / direct["gen"]["seconds"]
    d_emb = direct["embed"]["inputs"] / direct["embed"]["seconds"]
    d_emb_prep = direct["embed"]["inputs"] / (direct["embed"]["seconds"] + direct["embed"]["prepare"])
    pct = lambda x: "–" if x is None else f"{x:.0f}%"  # noqa: E731
    rows = [
        "| | pairsel stages (second run) | same model, direct | ratio | target |",
        "|---|---|---|---|---|",
        f"| generation, tokens/s | {gen_rate:,.0f} ({s['gen_seconds']:.1f} s for {s['tokens']:,} tokens, "
        f"{s['generate_calls']} calls) | {d_gen:,.0f} (one `generate` call over the same {direct['gen']['sequences']} "
        f"sequences, {direct['gen']['tokens']:,} tokens) | **{gen_rate / d_gen:.3f}** | ≥ 0.5 |",
        f"| embedding, inputs/s | {emb_rate:,.0f} ({s['inputs']} inputs in {s['embed_seconds']:.2f} s, "
        f"{s['embed_calls']} calls, preprocessing included) | {d_emb:,.0f} (batches of {DIRECT_EMBED_ROWS} sorted by "
        f"length, images included, forward only); {d_emb_prep:,.0f} with its preprocessing "
        f"({direct['embed']['prepare']:.2f} s) | **{emb_rate / d_emb:.3f}** (forward only); "
        f"{emb_rate / d_emb_prep:.3f} (with preprocessing) | ≥ 0.8 |",
        f"| GPU utilisation over the embed calls (NVML, mean) | {pct(extra.get('util_embed'))} | "
        f"{pct(extra.get('util_direct_embed'))} | | ≥ 70% |",
        f"| GPU utilisation over the generate calls (NVML, mean) | {pct(extra.get('util_gen'))} | "
        f"{pct(extra.get('util_direct_gen'))} | | |",
        f"| peak GPU memory, GiB | {extra.get('peak_job', '–')} | {extra.get('peak_direct', '–')} | | |",
        f"| CPU seconds per pair outside the model calls (stage code, cache, scoring; model loads excluded) | "
        f"{s['cpu_per_pair']:.3f} | | | |",
        f"| job wall time (run_local, model loads included), s | {s['wall']:.1f} | | | |",
        f"| the first run's model calls, s (cold start included) | generate {extra['cold_gen']:.1f}, embed "
        f"{extra['cold_embed']:.2f} | | | |",
        f"| twin run: rows identical (labels, texts, similarities) | {extra['twin']} | | | identical |",
    ]
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the CPU, the tiny model's shape, a few pairs")
    parser.add_argument("--pairs", type=int, default=None, help="demo pairs (default 50; --smoke 10)")
    parser.add_argument("--k", type=int, default=None, help="candidates per pair (default 8; --smoke 2)")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per candidate (default 64; --smoke 8)")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench-gpu")
    args = parser.parse_args(argv)
    import torch
    import transformers

    transformers.logging.set_verbosity_error()  # the embedder loads the generator's folder without its LM head
    transformers.logging.disable_progress_bar()
    from scripts.build_tiny_models import PRESETS
    from scripts.make_demo_data import make
    from stages.backends.hf.inputs import ModelInputs

    smoke = args.smoke
    pairs, k, new_tokens = args.pairs or (10 if smoke else 50), args.k or (2 if smoke else 8), \
        args.new_tokens or (8 if smoke else 64)
    device = "cpu" if smoke else "cuda"
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or with --smoke on the CPU")
    if smoke:
        torch.set_num_threads(1)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    started, load = time.perf_counter(), os.getloadavg()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pairsel-bench-gpu-", dir=out) as tmp:
        tmp = Path(tmp)
        shape = {k_: v for k_, v in PRESETS["tiny"].items() if k_ != "vocab_size"} if smoke else QWEN2VL_2B
        print(f"building the {'tiny' if smoke else '2B'}-shaped model on {device} ...", flush=True)
        folder, params = build_model(tmp, shape, device, torch.float32 if smoke else torch.bfloat16)
        data = make(out / f"data-{pairs}", n_pairs=pairs)
        cfg_args = [f"input.path={data}", f"input.image_root={data.parent}", f"input.rows_per_shard={pairs}",
                    f"generators.0.model={folder}", f"generators.0.k={k}",
                    f"generators.0.sampling.max_new_tokens={new_tokens}", "generators.0.resources.batch_size=64",
                    f"embedder.model={folder}", "embedder.resources.batch_size=64"]
        util = None if smoke else Utilisation()
        if util is not None:
            util.start()
            torch.cuda.reset_peak_memory_stats()
        print(f"the stages through run_local: {pairs} pairs, K = {k}, {new_tokens} new tokens ...", flush=True)
        job = run_job(cfg_args, tmp / "run-1", sync)
        extra = {"peak_job": f"{torch.cuda.max_memory_allocated() / GIB:.1f}" if util else "–"}
        print("the same job again (twin) ...", flush=True)
        twin = run_job(cfg_args, tmp / "run-2", sync)
        extra["twin"] = twin_differences(job["rows"], twin["rows"])
        if extra["twin"] != "yes":
            extra["twin"] += "; first: " + (first_call_difference(job["calls"], twin["calls"]) or
                                            "every model call gave the same output")
        cold, s = summary(job, pairs), summary(twin, pairs)
        extra["cold_gen"], extra["cold_embed"] = cold["gen_seconds"], cold["embed_seconds"]

        print("the same model, driven directly ...", flush=True)
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32 if smoke else torch.bfloat16)
        model = model.to(device).eval()
        inputs = ModelInputs(str(folder))
        if util is not None:
            torch.cuda.reset_peak_memory_stats()
        requests = [r for c in job["calls"] if c["kind"] == "generate" for r in c["items"]]
        t_gen = time.perf_counter()
        direct = {"gen": direct_generate(model, inputs, requests, sync)}
        t_emb = time.perf_counter()
        embed_inputs = [x for c in job["calls"] if c["kind"] == "embed" for x in c["items"]]
        direct["embed"] = direct_embed(model.model, inputs, embed_inputs, 512, sync)
        t_end = time.perf_counter()
        if util is not None:
            util.done.set()
            extra["peak_direct"] = f"{torch.cuda.max_memory_allocated() / GIB:.1f}"
            extra["util_gen"], extra["util_embed"] = util.mean_over(s["gen_spans"]), util.mean_over(s["embed_spans"])
            extra["util_direct_gen"] = util.mean_over([(t_gen, t_emb)])
            extra["util_direct_embed"] = util.mean_over([(t_end - direct["embed"]["seconds"], t_end)])
        text = table(s, direct, extra)
        embedder = json.dumps({"rows encoded by": "processor" if inputs.encodes_with_processor
                               else "tokenizer + image processor",
                               "processor loaded": inputs.processor is not None})
        gpu = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine()
        text += (f"\n\n{pairs} demo pairs, K = {k}, up to {new_tokens} new tokens; a Qwen2-VL of {params / 1e6:,.1f} M "
                 f"parameters ({'tiny shape, float32' if smoke else '2B shape, bfloat16'}, random weights) as "
                 f"generator and embedder; {embedder}. Device: {gpu}; torch {torch.__version__}, transformers "
                 f"{transformers.__version__}, Python {platform.python_version()}; {os.cpu_count()} cores, load "
                 f"average {load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; Ray imported: "
                 f"{sys.modules.get('ray') is not None}. Bench total {time.perf_counter() - started:.0f} s.")
    print()
    print(text)
    (out / ("table-smoke.md" if smoke else "table.md")).write_text(text + "\n")
    (out / ("results-smoke.json" if smoke else "results.json")).write_text(json.dumps(
        {"summary": {k_: v for k_, v in s.items() if not k_.endswith("spans")}, "direct": direct,
         "extra": extra}, indent=1, default=str))
    return 0 if extra["twin"] == "yes" else 1


if __name__ == "__main__":
    sys.exit(main())
