"""vLLM side by side: prints a table (see BENCHMARKS.md).

    python bench/bench_vllm.py [--pairs 40] [--scales 1 4] [--hf-scales 1 4] [--out out/bench-vllm]
    (or: make bench-vllm, which runs it in .venv-vllm)

On the "small" random-weight models and the demo mix (as bench/bench.py), with every candidate at once (K = 8,
no rounds) so that the same prompts can be replayed outside the job:

1. the job on vLLM (`generators.0.backend=vllm embedder.backend=vllm`, the CPU defaults of
   stages/backends/vllm.py) through the CLI, at each scale;
2. right after it, in a fresh process, standalone vLLM with the same engine settings: one `LLM.generate` call
   over every (prompt, seed) the job sampled and one `LLM.embed` call over every distinct input the job
   embedded, each with 1 torch thread, as each model actor of the job has;
3. the same job on the transformers backends;
4. the peer a user would pick instead: Ray Data LLM (`ray.data.llm.build_processor` with a
   `vLLMEngineProcessorConfig`) generating the same K rationales per pair (one row per seed: its engine stage
   keeps only the first of n samples), with the changes that make it run on a CPU; if it fails, the error is
   printed and a plain Ray Data `map_batches` + `vllm.LLM` pipeline, written as Ray's docs show, runs instead;
5. the job on vLLM with rounds (bench/bench.yaml: 2 candidates, then up to 8), for the tokens per pair.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_spec = importlib.util.spec_from_file_location("pairsel_bench", REPO / "bench" / "bench.py")
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)

VLLM = ["generators.0.backend=vllm", "embedder.backend=vllm"]
FULL_K = ["rounds.k0=null"]


# ------------------------------------------------------------------ what the job sampled and embedded
def job_rows(out: Path) -> tuple[dict, list[dict]]:
    import pyarrow.parquet as pq

    manifest = json.loads((out / "manifest.json").read_text())
    rows = pq.read_table(out / "data").sort_by([("shard_id", "ascending"), ("row_index", "ascending")]).to_pylist()
    return manifest["config"], rows


def load_image(root: Path, rel):
    from PIL import Image

    if rel is None:
        return None
    with Image.open(root / rel) as im:
        return im.convert("RGB")


def generation_requests(cfg: dict, rows: list[dict], root: Path):
    """The job's generate requests, rebuilt from its output: the same prompt, image and seeds per pair."""
    from stages.backends.base import GenRequest
    from stages.generate import candidate_seed, render_prompt

    gen = cfg["generators"][0]
    template = cfg["prompts"][gen["template"]]
    requests = []
    for r in rows:
        image = load_image(root, r["query_image_path"])
        row = {"query_text": r["query_text"], "query_image": None if image is None else b"1",
               "target_text": r["target_text"], "target_image_path": r["target_image_path"]}
        seeds = [candidate_seed(gen["seed"], gen["name"], r["pair_id"], k) for k in range(gen["k"])]
        s = gen["sampling"]
        requests.append(GenRequest(prompt=render_prompt(template, row), image=image, seeds=seeds,
                                   temperature=s["temperature"], top_p=s["top_p"],
                                   max_new_tokens=s["max_new_tokens"], pair_id=r["pair_id"]))
    return requests


def embed_inputs(cfg: dict, rows: list[dict], root: Path):
    """Every distinct input the job embedded: plain queries, queries with each scored rationale, targets and
    negatives."""
    from stages.backends.base import EmbedInput

    emb = cfg["embedder"]
    q_ins, r_ins, t_ins = emb["query_instruction"], emb["reasoned_query_instruction"], emb["target_instruction"]
    seen, images = {}, {}

    def add(text, rel):
        if (text, rel) not in seen:
            if rel not in images:
                images[rel] = load_image(root, rel)
            seen[(text, rel)] = EmbedInput(text, images[rel])

    for r in rows:
        q = r["query_text"] or ""
        add(q_ins.replace("{text}", q), r["query_image_path"])
        add(t_ins.replace("{text}", r["target_text"] or ""), r["target_image_path"])
        for n in r["negatives"]:
            add(t_ins.replace("{text}", n["text"] or ""), n["image_path"])
        for c in r["candidates"]:
            if c["s_k"] is not None:
                add(r_ins.replace("{text}", q).replace("{rationale}", c["text"]), r["query_image_path"])
    return list(seen.values())


# ------------------------------------------------------------------ standalone vLLM (a process of its own)
def standalone(job_out: Path, root: Path) -> dict:
    from vllm import LLM, SamplingParams

    from stages.backends.vllm import (VLLMEmbedder, build_embed_prompts, build_generate_requests,
                                      cpu_engine_defaults, on_cpu, render_chat)

    cfg, rows = job_rows(job_out)
    gen = cfg["generators"][0]
    options = dict(gen.get("options") or {})
    engine = cpu_engine_defaults(options) if on_cpu() else options
    t0 = time.perf_counter()
    llm = LLM(model=gen["model"], trust_remote_code=gen["trust_remote_code"], enable_prefix_caching=True, **engine)
    gen_start = time.perf_counter() - t0
    tokenizer = llm.get_tokenizer()
    requests = generation_requests(cfg, rows, root)
    batch = build_generate_requests(requests, lambda m: render_chat(tokenizer, m))
    params = [SamplingParams(**p) for p in batch.params]
    t0 = time.perf_counter()
    outputs = llm.generate(batch.prompts, params, use_tqdm=False)
    gen_seconds = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    texts = {}
    for (i, k), o in zip(batch.slots, outputs):
        texts[(requests[i].pair_id, k)] = o.outputs[0].text
    same = sum(texts.get((r["pair_id"], k)) is not None and texts[(r["pair_id"], k)].strip() == c["text"]
               for r in rows for k, c in enumerate(r["candidates"]))
    del llm

    emb = cfg["embedder"]
    t0 = time.perf_counter()
    embedder = VLLMEmbedder(emb["model"], pooling=emb["pooling"], max_length=emb["max_length"],
                            trust_remote_code=emb["trust_remote_code"], **dict(emb.get("options") or {}))
    emb_start = time.perf_counter() - t0
    inputs = embed_inputs(cfg, rows, root)
    t0 = time.perf_counter()  # tokenising counts: the job's embed calls tokenise too
    prompts = [embedder._tokenized(p) for p in build_embed_prompts(inputs, embedder.image_placeholder,
                                                                   embedder.reserved)]
    embedder.llm.embed(prompts, use_tqdm=False)
    emb_seconds = time.perf_counter() - t0
    return {"gen_seconds": gen_seconds, "tokens": tokens, "samples": len(batch.prompts), "gen_start": gen_start,
            "same_text": same, "candidates": sum(len(r["candidates"]) for r in rows),
            "emb_seconds": emb_seconds, "inputs": len(inputs), "emb_start": emb_start}


# ------------------------------------------------------------------ Ray Data LLM, and plain Ray Data + vllm.LLM
def ray_data_items(cfg: dict, rows: list[dict], root: Path) -> list[dict]:
    from stages.backends.openai_http import build_content

    items = []
    for request in generation_requests(cfg, rows, root):
        content = build_content(request.prompt, request.image)
        png = None
        if request.image is not None:
            buf = io.BytesIO()
            request.image.save(buf, format="PNG")
            png = buf.getvalue()
        for k, seed in enumerate(request.seeds):
            items.append({"pair_id": request.pair_id, "k": k, "prompt": request.prompt, "png": png,
                          "messages": [{"role": "user", "content": content}],
                          "sampling_params": {"temperature": request.temperature, "top_p": request.top_p,
                                              "max_tokens": request.max_new_tokens, "seed": seed}})
    return items


def ray_data_llm(job_out: Path, root: Path, own_images: bool = False) -> dict:
    """Ray Data LLM generating the job's K rationales per pair, one row per (pair, seed).

    As its docs show, images travel in OpenAI-style messages (image_url parts) through its
    prepare-multimodal stage. With own_images, that stage is off and each row carries its image as
    `multimodal_data` and its messages in the Hugging Face convention ({"type": "image"} parts), which its
    chat-template, tokenize and vLLM engine stages take as they are."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from stages.backends.vllm import chat_messages, cpu_engine_defaults

    cfg, rows = job_rows(job_out)
    engine = cpu_engine_defaults({})  # also sets the engine's environment, which Ray's workers inherit
    items = ray_data_items(cfg, rows, root)
    for item in items:
        png, prompt = item.pop("png"), item.pop("prompt")
        if own_images:
            item["messages"] = chat_messages(prompt, png is not None)
            item["image"] = png
    small = {"num_cpus": 0.1}

    def preprocess(row):
        out = {"messages": row["messages"], "sampling_params": row["sampling_params"]}
        if own_images and row.get("image") is not None:
            from PIL import Image

            out["multimodal_data"] = {"image": Image.open(io.BytesIO(row["image"])).convert("RGB")}
        return out

    # not on loopback only: Ray 2.60 has no public way (pipeline/run.py); a bench Ray is short-lived
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        config = vLLMEngineProcessorConfig(
            model_source=str(cfg["generators"][0]["model"]),
            engine_kwargs={"enable_prefix_caching": True, **engine},
            batch_size=64, concurrency=1,
            # what makes it run on a CPU (../shared/notes/vllm-on-cpu.md): a CPU bundle instead of num_gpus=1,
            # no engine metrics (they import ray.serve), fractional CPUs for the CPU stages
            placement_group_config={"bundle_per_worker": {"CPU": 1}},
            log_engine_metrics=False,
            prepare_multimodal_stage={"enabled": not own_images, **small, "chat_template_content_format": "openai"},
            chat_template_stage={"enabled": True, **small},
            tokenize_stage={"enabled": True, **small},
            detokenize_stage={"enabled": True, **small},
        )
        processor = build_processor(
            config, preprocess=preprocess,
            postprocess=lambda row: {"pair_id": row["pair_id"], "k": row["k"], "text": row.get("generated_text"),
                                     "tokens": row.get("num_generated_tokens")
                                     or len(row.get("generated_tokens") or [])},
            preprocess_map_kwargs=small, postprocess_map_kwargs=small,
        )
        t0 = time.perf_counter()
        out = processor(ray.data.from_items(items)).take_all()
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    texts = {(r["pair_id"], int(r["k"])): r["text"] for r in out}
    same = sum((texts.get((r["pair_id"], k)) or "").strip() == c["text"] for r in rows
               for k, c in enumerate(r["candidates"]))
    return {"wall": wall, "rows": len(out), "tokens": int(sum(int(r["tokens"] or 0) for r in out)),
            "samples": len(items), "same_text": same}


def ray_data_llm_own_images(job_out: Path, root: Path) -> dict:
    return ray_data_llm(job_out, root, own_images=True)


class PlainVLLMPredictor:
    """Ray Data's documented pattern for batch inference with vLLM: a callable class in map_batches that loads
    vllm.LLM once."""

    def __init__(self, model: str, engine: dict):
        from vllm import LLM

        self.llm = LLM(model=model, enable_prefix_caching=True, **engine)
        self.tokenizer = self.llm.get_tokenizer()

    def __call__(self, batch: dict) -> dict:
        from PIL import Image
        from vllm import SamplingParams

        from stages.backends.vllm import chat_messages, render_chat

        prompts, params = [], []
        for prompt, png, sp in zip(batch["prompt"], batch["png"], batch["sampling_params"]):
            image = None if png is None else Image.open(io.BytesIO(png)).convert("RGB")
            p = {"prompt": render_chat(self.tokenizer, chat_messages(prompt, image is not None))}
            if image is not None:
                p["multi_modal_data"] = {"image": image}
            prompts.append(p)
            params.append(SamplingParams(n=1, **sp))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return {"pair_id": batch["pair_id"], "k": batch["k"], "text": [o.outputs[0].text for o in outputs],
                "tokens": [len(o.outputs[0].token_ids) for o in outputs]}


def ray_data_plain(job_out: Path, root: Path) -> dict:
    import ray

    from stages.backends.vllm import cpu_engine_defaults

    cfg, rows = job_rows(job_out)
    engine = cpu_engine_defaults({})
    items = ray_data_items(cfg, rows, root)
    for item in items:
        item.pop("messages")
    # not on loopback only: Ray 2.60 has no public way (pipeline/run.py); a bench Ray is short-lived
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        ds = ray.data.from_items(items).map_batches(
            PlainVLLMPredictor, fn_constructor_kwargs={"model": str(cfg["generators"][0]["model"]), "engine": engine},
            concurrency=1, num_cpus=1, batch_size=64, batch_format="numpy")
        t0 = time.perf_counter()
        out = ds.take_all()
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return {"wall": wall, "rows": len(out), "tokens": int(sum(int(r["tokens"]) for r in out)), "samples": len(items)}


def in_subprocess(what: str, job_out: Path, root: Path, result: Path, timeout: float = 1800) -> dict:
    """Run one of the measurements above in a fresh process (1 torch thread, as a job's model actor), so that
    its engines and Ray come and go with it."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--measure", what, "--job-out", str(job_out), "--root", str(root),
           "--result", str(result)]
    with open(result.with_suffix(".log"), "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                              start_new_session=True)
    data = json.loads(result.read_text()) if result.is_file() else {}
    if proc.returncode != 0 and "error" not in data:
        data["error"] = f"exit {proc.returncode}; see {result.with_suffix('.log')}"
    return data


# ------------------------------------------------------------------ the table
def job_figures(run: dict) -> dict:
    stats = run["stats"]
    gen = [st for st in stats if st["stage"] == "generate"]
    emb = [st for st in stats if st["stage"] == "embed"]
    span = lambda sel: max(s["t_last"] for s in sel) - min(s["t_first"] for s in sel)  # noqa: E731
    return {"tokens": sum(s["tokens"] for s in gen), "gen_model": sum(s["model_seconds"] for s in gen),
            "inputs": sum(s["forwards"] for s in emb), "emb_model": sum(s["model_seconds"] for s in emb),
            "gen_span": span(gen), "emb_span": span(emb),
            # the generate stage from its engine's start to its last batch: what Ray Data LLM's wall covers
            "gen_stage": max(s["t_last"] for s in gen) - min(s["t_init"] for s in gen),
            "span": run["timeline"]["last"] - run["timeline"]["first"], "wall": run["wall"]}


def table(res: dict, pairs: int, scales: list[int]) -> str:
    head = " | ".join(f"{s}x ({s * pairs} pairs)" for s in scales)
    lines = [f"| metric | {head} | target |", "|---" * (len(scales) + 2) + "|"]

    def row(name, values, target=""):
        lines.append(f"| {name} | {' | '.join(values)} | {target} |")

    def each(fn):
        out = []
        for s in scales:
            try:
                out.append(fn(s))
            except (KeyError, TypeError, ZeroDivisionError):
                out.append("–")
        return out

    v = {s: job_figures(res["vllm"][s]) for s in scales if s in res["vllm"]}
    h = {s: job_figures(res["hf"][s]) for s in scales if s in res["hf"]}
    st = res["standalone"]
    row("job on vLLM: wall time (CLI, Ray start-up and model loads included), s", each(lambda s: f"{v[s]['wall']:.1f}"))
    row("job on vLLM: model-work span (first to last model batch), s", each(lambda s: f"{v[s]['span']:.1f}"))
    row("job on vLLM: generated tokens / embedder inputs", each(lambda s: f"{v[s]['tokens']} / {v[s]['inputs']}"))
    row("other processes' CPU during the vLLM job, cores", each(lambda s: f"{res['vllm'][s]['others']:.2f}"),
        "0: a quiet machine")
    row("standalone vLLM: one LLM.generate + one LLM.embed call, s",
        each(lambda s: f"{st[s]['gen_seconds']:.1f} + {st[s]['emb_seconds']:.1f}"))
    row("standalone: same samples / inputs as the job", each(lambda s: f"{st[s]['samples']} / {st[s]['inputs']}"))
    row("standalone: candidate texts identical to the job's", each(lambda s: f"{st[s]['same_text']}/{st[s]['candidates']}"))
    row("generation tokens/s: job (inside its generate calls) / standalone",
        each(lambda s: f"{v[s]['tokens'] / v[s]['gen_model']:.0f} / {st[s]['tokens'] / st[s]['gen_seconds']:.0f}"))
    row("**generation: job / standalone tokens/s**",
        each(lambda s: f"**{(v[s]['tokens'] / v[s]['gen_model']) / (st[s]['tokens'] / st[s]['gen_seconds']):.2f}**"),
        "≥ 0.9 at 4x")
    row("embedding inputs/s: job (inside its embed calls) / standalone",
        each(lambda s: f"{v[s]['inputs'] / v[s]['emb_model']:.0f} / {st[s]['inputs'] / st[s]['emb_seconds']:.0f}"))
    row("**embedding: job / standalone inputs/s**",
        each(lambda s: f"**{(v[s]['inputs'] / v[s]['emb_model']) / (st[s]['inputs'] / st[s]['emb_seconds']):.2f}**"),
        "≥ 0.9 at 4x")
    row("**whole job: standalone (generate + embed) s / job model-work span**",
        each(lambda s: f"**{(st[s]['gen_seconds'] + st[s]['emb_seconds']) / v[s]['span']:.2f}**"),
        "≥ 0.9 at 4x")
    row("standalone engine start-up, generator + embedder, s",
        each(lambda s: f"{st[s]['gen_start']:.1f} + {st[s]['emb_start']:.1f}"))
    row("job on transformers: wall time, s", each(lambda s: f"{h[s]['wall']:.1f}"))
    row("job on transformers: model-work span, s", each(lambda s: f"{h[s]['span']:.1f}"))
    row("generation tokens/s inside the generate calls: vLLM / transformers",
        each(lambda s: f"{v[s]['tokens'] / v[s]['gen_model']:.0f} / {h[s]['tokens'] / h[s]['gen_model']:.0f}"))
    row("embedding inputs/s inside the embed calls: vLLM / transformers",
        each(lambda s: f"{v[s]['inputs'] / v[s]['emb_model']:.0f} / {h[s]['inputs'] / h[s]['emb_model']:.0f}"))
    row("**job wall: transformers / vLLM**", each(lambda s: f"**{h[s]['wall'] / v[s]['wall']:.2f}**"))
    rd = res.get("ray_data", {})
    for name, key in (("Ray Data LLM (build_processor + vLLMEngineProcessorConfig)", "llm"),
                      ("Ray Data LLM, images as multimodal_data (prepare-multimodal stage off)", "llm_own_images"),
                      ("plain Ray Data map_batches + vllm.LLM", "plain")):
        r = rd.get(key)
        if r is None:
            continue
        if "error" in r:
            row(f"{name}: the job's K samples per pair at 1x", ["failed (error below)"] + ["–"] * (len(scales) - 1))
            continue
        one = v.get(1)
        row(f"{name}: wall time for the job's {r['samples']} samples (Ray start excluded), s",
            [f"{r['wall']:.1f}"] + ["–"] * (len(scales) - 1))
        if "same_text" in r:
            row(f"{name}: samples identical to the job's", [f"{r['same_text']}/{r['samples']}"]
                + ["–"] * (len(scales) - 1))
        row(f"{name}: tokens/s over its wall / the vLLM job's generate stage (engine start to last batch)",
            [f"{r['tokens'] / r['wall']:.0f} / {one['tokens'] / one['gen_stage']:.0f}" if one else "–"]
            + ["–"] * (len(scales) - 1))
    rounds = res.get("rounds")
    if rounds and 1 in v:
        full_rows = res["vllm"][1]["rows"]
        tok = lambda rows: sum(c["tokens"] or 0 for r in rows.values() for c in r["candidates"])  # noqa: E731
        agree = sum(rounds["rows"][p]["need_reasoning"] == full_rows[p]["need_reasoning"] for p in full_rows)
        row("vLLM: generated tokens per pair, rounds / full K",
            [f"{tok(rounds['rows']) / len(rounds['rows']):.1f} / {tok(full_rows) / len(full_rows):.1f}"]
            + ["–"] * (len(scales) - 1))
        row("**vLLM: token saving of rounds (margin 0)**",
            [f"**{1 - tok(rounds['rows']) / tok(full_rows):.1%}**"] + ["–"] * (len(scales) - 1), "≥ 30%")
        row("vLLM: need_reasoning agreement, rounds vs full K", [f"{agree}/{len(full_rows)}"] + ["–"] * (len(scales) - 1),
            "identical")
        row("vLLM job wall, rounds / full K, s", [f"{rounds['wall']:.1f} / {v[1]['wall']:.1f}"] + ["–"] * (len(scales) - 1))
    return "\n".join(lines)


def load_results(out: Path) -> dict:
    """What a finished run measured (results.json), with each job's rows, stats and manifest read back from
    its output folder."""
    import pyarrow.parquet as pq

    res = json.loads((out / "results.json").read_text())

    def complete(run: dict, folder: Path) -> dict:
        run["stats"] = [json.loads(p.read_text()) for p in sorted((folder / "_stats").glob("*.json"))]
        run["rows"] = {r["pair_id"]: r for r in pq.read_table(folder / "data").to_pylist()}
        run["manifest"] = json.loads((folder / "manifest.json").read_text())
        return run

    for kind in ("vllm", "hf"):
        res[kind] = {int(s): complete(run, out / f"{kind}-{s}x") for s, run in res.get(kind, {}).items()}
    res["standalone"] = {int(s): run for s, run in res.get("standalone", {}).items()}
    if (out / "vllm-rounds-1x" / "manifest.json").is_file():
        rounds = complete(res.get("rounds") or {}, out / "vllm-rounds-1x")
        rounds.setdefault("wall", float("nan"))
        res["rounds"] = rounds
    return res


MEASURES = {"standalone": standalone, "ray_data_llm": ray_data_llm, "ray_data_llm_own_images": ray_data_llm_own_images,
            "ray_data_plain": ray_data_plain}


def failures(res: dict) -> str:
    text = ""
    for key, name in (("llm", "Ray Data LLM, as documented (images in messages, prepare-multimodal stage)"),
                      ("llm_own_images", "Ray Data LLM, images as multimodal_data"),
                      ("plain", "plain Ray Data + vllm.LLM")):
        if "error" in res.get("ray_data", {}).get(key, {}):
            error = re.sub(r"\x1b\[[0-9;]*m", "", res["ray_data"][key]["error"])
            text += f"\n\n{name} failed:\n\n```\n{error}\n```"
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=40, help="pairs at 1x (default 40)")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--hf-scales", type=int, nargs="*", default=None, help="default: --scales")
    parser.add_argument("--no-ray-data", action="store_true")
    parser.add_argument("--vllm-batch", type=int, nargs=2, default=[32, 64], metavar=("GENERATE", "EMBED"),
                        help="rows per call of the vLLM job's generate and embed stages (default 32 64: vLLM "
                             "batches by itself, so it is fed more rows per call than bench.yaml's 8 and 16)")
    parser.add_argument("--out", type=Path, default=REPO / "out" / "bench-vllm")
    parser.add_argument("--measure", choices=list(MEASURES), help=argparse.SUPPRESS)
    parser.add_argument("--job-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report", action="store_true",
                        help="print the table again from what a finished run left in --out (no model runs)")
    args = parser.parse_args(argv)

    if args.report:
        res = load_results(args.out.resolve())
        print(table(res, args.pairs, args.scales) + failures(res))
        return 0
    if args.measure:  # one measurement, in this fresh process
        fn = MEASURES[args.measure]
        try:
            result = fn(args.job_out, args.root)
        except BaseException as e:  # the exact error goes into the table's notes (without the log's colours)
            traceback.print_exc()
            result = {"error": re.sub(r"\x1b\[[0-9;]*m", "", f"{type(e).__name__}: {e}").strip()[:2000]}
        args.result.write_text(json.dumps(result, indent=1))
        return 0 if "error" not in result else 1

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started, load = time.perf_counter(), os.getloadavg()
    hf_scales = args.scales if args.hf_scales is None else args.hf_scales
    vllm_batch = [f"generators.0.resources.batch_size={args.vllm_batch[0]}",
                  f"embedder.resources.batch_size={args.vllm_batch[1]}"]

    from scripts.build_tiny_models import build
    from scripts.make_demo_data import make

    print("building the small models and the demo mix ...", flush=True)
    models = build(REPO / "models", "small")
    model_args = [f"generators.0.model={models['generator']}", f"embedder.model={models['embedder']}"]
    data = {s: make(out / f"data-{s}x", n_pairs=args.pairs, scale=s).parent for s in args.scales}
    res = {"vllm": {}, "standalone": {}, "hf": {}, "ray_data": {}}

    def save():
        slim = {k: ({s: {m: x for m, x in r.items() if m not in ("rows", "manifest", "stats")} for s, r in d.items()}
                    if k in ("vllm", "hf") else d) for k, d in res.items() if k != "rounds"}
        if "rounds" in res:
            slim["rounds"] = {m: x for m, x in res["rounds"].items() if m not in ("rows", "manifest", "stats")}
        (out / "results.json").write_text(json.dumps(slim, indent=1, default=str))

    for s in args.scales:
        print(f"job on vLLM at {s}x ({s * args.pairs} pairs, full K) ...", flush=True)
        res["vllm"][s] = base.run_job(data[s], out / f"vllm-{s}x", *model_args, *VLLM, *FULL_K, *vllm_batch)
        print(f"standalone vLLM on the same prompts and inputs at {s}x ...", flush=True)
        res["standalone"][s] = in_subprocess("standalone", out / f"vllm-{s}x", data[s], out / f"standalone-{s}x.json")
        save()
        if s in hf_scales:
            print(f"job on transformers at {s}x ...", flush=True)
            res["hf"][s] = base.run_job(data[s], out / f"hf-{s}x", *model_args, *FULL_K)
            save()
        if s == 1 and not args.no_ray_data:
            print("Ray Data LLM on the same K samples per pair at 1x ...", flush=True)
            res["ray_data"]["llm"] = in_subprocess("ray_data_llm", out / "vllm-1x", data[1], out / "ray-data-llm.json")
            if "error" in res["ray_data"]["llm"]:
                print("Ray Data LLM failed as documented; again with the images passed as multimodal_data ...",
                      flush=True)
                res["ray_data"]["llm_own_images"] = in_subprocess("ray_data_llm_own_images", out / "vllm-1x", data[1],
                                                                  out / "ray-data-llm-own-images.json")
            if all("error" in r for r in res["ray_data"].values()):
                print("Ray Data LLM failed; plain Ray Data map_batches + vllm.LLM instead ...", flush=True)
                res["ray_data"]["plain"] = in_subprocess("ray_data_plain", out / "vllm-1x", data[1],
                                                         out / "ray-data-plain.json")
            save()
        if s == 1:
            print("job on vLLM with rounds at 1x ...", flush=True)
            res["rounds"] = base.run_job(data[1], out / "vllm-rounds-1x", *model_args, *VLLM, *vllm_batch)
    errors = {k: v for k, v in res["standalone"].items() if "error" in v}
    if errors:
        raise SystemExit(f"standalone vLLM failed: {errors}")

    text = table(res, args.pairs, args.scales)
    text += failures(res)
    text += (f"\n\nK = 8 candidates at once (no rounds) unless stated; 24 new tokens at most; the small models "
             f"(~32M parameters); the vLLM jobs take {args.vllm_batch[0]} / {args.vllm_batch[1]} rows per generate / "
             f"embed call, the transformers job bench.yaml's 8 / 16"
             f"; each model actor of the job and each standalone engine with 1 torch thread. "
             + base.machine_line(load, started))
    base.publish(text, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
