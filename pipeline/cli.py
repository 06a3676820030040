"""`python -m pipeline run CONFIG [key=value ...]` and the tools that read a job's output."""
from __future__ import annotations

import argparse
import functools
import logging
import sys

from pipeline.config import ConfigError


def _run(args) -> int:
    from pipeline import config

    cfg = config.load(args.config, args.overrides)  # fails fast, before Ray or any model
    config.resolve_paths(cfg)
    from pipeline.run import run  # Ray and the stages load only once the config is good

    result = run(cfg, address=args.address, overwrite=args.overwrite, force=args.force)
    c = result["counts"]
    out = cfg.output.dir
    rate = c["need_reasoning_rate"]
    print(f"pairsel: {c['pairs_written']} pairs written to {out}/data/ ({len(result['shards'])} shards), "
          f"need_reasoning {c['need_reasoning']}/{c['pairs_written']}" + (f" ({rate:.1%})" if rate is not None else ""))
    for name, g in result["generators"].items():
        md = g.get("mean_delta")
        print(f"  generator {name}: {g.get('candidates', 0)} candidates, {g.get('valid', 0)} valid, "
              f"chosen {g.get('chosen', 0)}, mean delta {md if md is None else f'{md:+.4f}'}")
    if c["pairs_quarantined"]:
        reasons = ", ".join(f"{k} {v}" for k, v in c["quarantined_by_reason"].items())
        print(f"  quarantined {c['pairs_quarantined']} rows ({reasons}) in {out}/quarantine/")
    else:
        print("  quarantined 0 rows")
    print(f"  manifest: {out}/manifest.json")
    return 0 if result["status"] == "complete" else 1


def _output_tool(module, args) -> int:
    """report / show / export: their add_arguments() names every flag after run()'s keywords."""
    module.run(**{k: v for k, v in vars(args).items() if k not in ("func", "command")})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pairsel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the curation job")
    run.add_argument("config", help="a YAML job config, merged over configs/default.yaml")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. input.path=... output.dir=...")
    run.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local Ray)")
    run.add_argument("--overwrite", action="store_true", help="delete output.dir and start afresh")
    run.add_argument("--force", action="store_true", help="resume even if the label config changed")
    run.set_defaults(func=_run)

    for name, help_text in (("report", "write report.html for a job's output"),
                            ("show", "print one pair of a job's output"),
                            ("export", "export a job's output for a trainer")):
        module = __import__(f"pipeline.{name}", fromlist=["run"])
        p = sub.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.set_defaults(func=functools.partial(_output_tool, module))
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `run CONFIG --overwrite key=value`: argparse leaves overrides that follow a flag unparsed
    if extra and args.command == "run" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args) or 0
    except ConfigError as e:
        print(f"pairsel: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
