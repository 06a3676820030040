"""`python -m pipeline run CONFIG [key=value ...]` and the tools that read a job's output.

What a user sees of a run: a user error (bad config, missing input or model, an output.dir that is not pairsel's)
is one line naming the key, exit 2, before Ray starts. A run shows one progress line (shards committed of N,
pairs/s) and ends with the summary; Ray's, Ray Data's and the model libraries' own output goes to
OUT/_logs/run.log, or also to the terminal with --verbose. Ctrl-C stops the job, says how many shards are
committed and that the same command resumes, exit 130. A job that fails says so in one line, exit 1.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import sys
import time
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.verify import DamagedOutput
from stages import layout

log = logging.getLogger("pairsel")
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
EXIT_USER_ERROR, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130
# Without a terminal, the progress line is printed again at most this often (and at the end).
PLAIN_PROGRESS_EVERY_S = 15.0
# A warning at the end when one image reason quarantined more than this share of the rows.
IMAGE_REASON_WARN_SHARE = 0.5


# ---------------------------------------------------------------- the console and the log file
class Console:
    """Where pairsel talks to the user: `out` (the summary) and `err` (status, progress, errors).

    Quiet (the default), once the job's log file is known: the process's own stdout and stderr, file descriptors
    1 and 2, go to the log file, so that everything else prints there (Ray's and Ray Data's logging, the C++
    lines of Ray's core worker, the workers' output that Ray forwards, the model libraries' notices), and
    pairsel writes to copies of the terminal's descriptors. --verbose: everything stays on the terminal, and
    pairsel's logging goes to the log file as well."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.out, self.err = sys.stdout, sys.stderr
        self.log_path: Path | None = None
        self.live = None  # the live progress line (rich) while it shows
        self._file_log: logging.Logger | None = None

    def say(self, message: str, keep: bool = True) -> None:
        """A status line for the user (above the live progress line, if there is one), also kept in the log file."""
        if self.live is not None:
            self.live.console.print(message, highlight=False, markup=False, soft_wrap=True)
        else:
            print(message, file=self.err, flush=True)
        if keep and self._file_log is not None:
            self._file_log.info(message)

    def divert(self, log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        if not self.verbose:
            self.out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
            self.err = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.close(fd)
            for handler in logging.getLogger().handlers:  # they write to sys.stderr: the log file now
                handler.setLevel(logging.INFO)
            # pairsel's own warnings (e.g. actor pools that cannot all fit) still reach the terminal
            log.addHandler(_TerminalHandler(self))
        else:
            to_file = logging.FileHandler(log_path, encoding="utf-8")
            to_file.setFormatter(logging.Formatter(LOG_FORMAT))
            logging.getLogger().addHandler(to_file)
        self.log_path = log_path
        self._file_log = logging.getLogger("pairsel.console")
        self._file_log.propagate = False
        to_file = logging.FileHandler(log_path, encoding="utf-8")
        to_file.setFormatter(logging.Formatter(LOG_FORMAT))
        self._file_log.addHandler(to_file)
        self._file_log.setLevel(logging.INFO)


class _TerminalHandler(logging.Handler):
    """pairsel's own warnings on the terminal of a quiet run (the log file has them from the root logger)."""

    def __init__(self, console: Console):
        super().__init__(logging.WARNING)
        self.console = console
        self.setFormatter(logging.Formatter("pairsel: %(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info is None:  # a failure is told in one line by _stopped
            self.console.say(self.format(record), keep=False)


class ProgressLine:
    """One line that tells how far the job is: shards committed of N, pairs labelled, pairs/s, time.

    On a terminal it is a live rich line; without one (a CI log, a pipe), a plain line when shards were
    committed, at most every PLAIN_PROGRESS_EVERY_S, and once at the end."""

    def __init__(self, console: Console, planned: int, committed_before: int):
        self.console, self.planned, self.before = console, planned, committed_before
        self.t0 = time.monotonic()
        self.committed, self.pairs = committed_before, 0
        self._printed = (committed_before, self.t0)
        self._live = None
        if console.err.isatty() and not console.verbose:
            from rich.console import Console as RichConsole
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._live = Progress(
                SpinnerColumn(), TextColumn("{task.completed}/{task.total} shards committed"),
                BarColumn(bar_width=24), TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                console=RichConsole(file=console.err), transient=False, redirect_stdout=False,
                redirect_stderr=False)
            self._task = self._live.add_task("job", total=planned, completed=committed_before,
                                             status="starting Ray")
            self._live.start()
            console.live = self._live

    def status(self) -> str:
        if not self.pairs:
            return "loading models"
        seconds = max(time.monotonic() - self.t0, 1e-3)  # since the start: steady, and what the job costs
        return f"{self.pairs} pairs, {self.pairs / seconds:.1f} pairs/s"

    def line(self) -> str:
        return f"pairsel: {self.committed}/{self.planned} shards committed, {self.status()}, " \
               f"{time.monotonic() - self.t0:.0f}s"

    def ray_started(self, message: str) -> None:
        if self._live is not None:
            self._live.update(self._task, status="loading models")
        self.console.say(message)

    def __call__(self, committed_now: int, pairs: int) -> None:
        self.committed, self.pairs = self.before + committed_now, pairs
        if self._live is not None:
            self._live.update(self._task, completed=self.committed, status=self.status())
            return
        last_committed, last_at = self._printed
        if self.committed != last_committed and time.monotonic() - last_at >= PLAIN_PROGRESS_EVERY_S:
            self._print()

    def _print(self) -> None:
        self._printed = (self.committed, time.monotonic())
        self.console.say(self.line())

    def stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = self.console.live = None
            self.console._file_log.info(self.line())
        elif self._printed[0] != self.committed:
            self._print()


# ---------------------------------------------------------------- pipeline run
def _run(args) -> int:
    from pipeline import availability, config

    console = Console(verbose=args.verbose)
    try:
        cfg = config.load(args.config, args.overrides)  # fails fast, before Ray or any model
        availability.check_available(cfg)  # the input and every model exist (a typo fails here, not in an actor)
        config.resolve_paths(cfg)
        from pipeline import run as job_run  # Ray and the stages load only once the config is good

        job = job_run.prepare(cfg, overwrite=args.overwrite, force=args.force)
    except KeyboardInterrupt:  # a ConfigError goes up to main(), which says it for every command
        print("pairsel: interrupted before the job started; nothing was run", file=sys.stderr)
        return EXIT_INTERRUPTED

    out = Path(cfg.output.dir)
    console.divert(out / layout.RUN_LOG)
    for line in job.redone:  # a committed shard whose files differ from its commit record is never kept
        console.say(f"pairsel: {line}")
    console.say(f"pairsel: {len(job.specs)} shards planned, {len(job.committed)} already committed, "
                f"{len(job.todo)} to do")
    progress = ProgressLine(console, len(job.specs), len(job.committed)) if job.todo else None

    def ray_started():
        ray_logs = job_run.ray_logs_dir()
        progress.ray_started(f"pairsel: Full logs are in {ray_logs} (Ray's) and {console.log_path}" if ray_logs
                             else f"pairsel: Full logs are in {console.log_path}")

    try:
        result = job_run.execute(job, address=args.address, quiet=not args.verbose, progress=progress,
                                 on_ray_started=ray_started)
    except ConfigError as e:  # a setting this Ray cannot run (pipeline/plan.py:check_pools_fit)
        if progress is not None:
            progress.stop()
        console.say(f"pairsel: config error: {e}")
        return EXIT_USER_ERROR
    except (KeyboardInterrupt, Exception) as e:  # JobStopped, or a failure after the shards (the manifest, the card)
        if progress is not None:
            progress.stop()
        if not isinstance(e, (job_run.JobStopped, KeyboardInterrupt)):
            log.exception("the job failed after its shards")
            e = job_run.JobStopped(interrupted=False, cause=e)
        return _stopped(console, job, e)
    if progress is not None:
        progress.stop()
    _warn_if_images_failed(console, cfg, result)
    print_summary(result, str(out), console.out)  # last: what the job wrote
    return 0 if result["status"] == "complete" else EXIT_FAILED


def _relabel(args) -> int:
    from pipeline import relabel

    cfg = relabel.load_config(Path(args.old_dir), args.new_dir, args.overrides)  # fails fast, in one line
    result = relabel.relabel(Path(args.old_dir), cfg, overwrite=args.overwrite)
    print_summary(result, cfg.output.dir, sys.stdout)
    return 0


def _stopped(console: Console, job, e: BaseException) -> int:
    """A job that ended early: one line on what happened, what is kept, and how to go on."""
    from pipeline.verify import read_commit_records

    # a record that does not read counts as not committed, as the resume treats it
    committed = {r["shard_id"] for r in read_commit_records(job.out_dir)[0]}
    kept = f"{len(committed)} of {len(job.specs)} shards are committed in {job.out_dir} and kept"
    scored = {r["shard_id"] for r in read_commit_records(job.out_dir / layout.SCORED)[0]} - committed
    if scored:  # the decoy rule labels once every shard is scored: these wait for the rest
        kept += f", {len(scored)} more scored and kept until every shard is scored"
    if isinstance(e, KeyboardInterrupt) or e.interrupted:
        console.say(f"pairsel: interrupted; {kept}. Rerun the same command to resume.")
        return EXIT_INTERRUPTED
    console.say(f"pairsel: the job failed ({_cause_line(e.cause)}); {kept}. "
                f"Details: {console.log_path}. Rerun the same command to finish the rest.")
    return EXIT_FAILED


# "OSError: [Errno 28] No space left on device": an exception's own line in a traceback's text
_EXCEPTION_LINE = re.compile(r"(?:[A-Za-z_][\w]*\.)*([A-Za-z_]\w*(?:Error|Exception)): (.+)")


def _cause_line(cause: BaseException) -> str:
    """What failed, as "Type: message". A Ray task error holds the task's exception only as the text of its
    traceback, which Ray Data ends with its own advice on retries: the last exception line in it that is not
    Ray's own wrapper names the cause."""
    lines = str(cause).strip().splitlines() or [""]
    if type(cause).__module__.startswith("ray."):
        for line in reversed(lines):
            found = _EXCEPTION_LINE.fullmatch(line.strip())
            if found and not found[1].startswith(("Ray", "UserCodeException")):
                return f"{found[1]}: {found[2][:300]}"
    return f"{type(cause).__name__}: {lines[-1][:300]}"


def print_summary(result: dict, out: str, stream) -> None:
    """The end of `pipeline run`: what was written where."""
    c = result["counts"]
    n = c["pairs_written"]

    def share(key: str) -> str:
        rate = c.get(f"{key}_rate")
        return f"{c.get(key, 0)}/{n}" + (f" ({rate:.1%})" if rate is not None else "")

    print(f"pairsel: {n} pairs written to {out}/data/ ({len(result['shards'])} shards): reason "
          f"{share('need_reasoning')}, direct {share('direct')}, undecided {share('undecided')}",
          file=stream)
    if c.get("undecided_few_decoys"):
        print(f"  {c['undecided_few_decoys']} of the undecided pairs have a valid candidate but too few decoys: a "
              "pair draws them from other pairs' valid rationales of its own input shard and subset (keep a "
              "subset's rows together)", file=stream)
    if c.get("control_turned_direct"):
        print(f"  the content-free controls turned {c['control_turned_direct']} pairs from reason to direct", file=stream)
    rule = result.get("decision") or {}
    if rule.get("rule") == "decoys":
        print(f"  decoy rule at a false-discovery rate of {rule['fdr']:g}: the decoys turned "
              f"{c.get('null_turned_direct', 0)} pairs from reason to direct", file=stream)
        for cal in rule.get("calibration", []):
            what = (f"no pair reason ({cal['wins']} candidate wins, {cal['losses']} decoy wins; lowest estimated "
                    f"FDR {cal['fdr_estimate']:.0%})" if cal["margin"] is None else
                    f"{cal['reason']} reason, estimated FDR {cal['fdr_estimate']:.1%}")
            print(f"    {cal['side']} side, {cal['group']}: {what}", file=stream)
    target = result.get("target_side")
    if target:  # target rationales (generators[].k_target > 0)
        t, j = target["counts"], target["counts"]["joint"]
        print(f"  target side: reason {t['need_reasoning']}/{t['pairs']} ({t['need_reasoning_rate']:.1%}), direct "
              f"{t['direct']}/{t['pairs']}, undecided {t['undecided']}/{t['pairs']}; the joint choice beats the query "
              f"side in {j['beats_query']}/{j['pairs_with_joint']} pairs, the target side in {j['beats_target']}, "
              f"both in {j['beats_both']}", file=stream)
    for name, g in result["generators"].items():
        md = g.get("mean_delta")
        print(f"  generator {name}: {g.get('candidates', 0)} candidates, {g.get('valid', 0)} valid, "
              f"chosen {g.get('chosen', 0)}, mean delta {md if md is None else f'{md:+.4f}'}", file=stream)
    if c["pairs_quarantined"]:
        reasons = ", ".join(f"{k} {v}" for k, v in c["quarantined_by_reason"].items())
        print(f"  quarantined {c['pairs_quarantined']} rows ({reasons}) in {out}/quarantine/", file=stream)
    else:
        print("  quarantined 0 rows", file=stream)
    print(f"  manifest: {out}/{layout.MANIFEST}", file=stream)
    stream.flush()


# What most likely made most images of a run fail, by reason.
_IMAGE_CAUSES = {
    "image_missing": "the image paths are not relative to {root_said}: set input.image_root to the folder "
                     "they are relative to",
    "image_outside_root": "the image paths leave {root_said} (absolute paths, ../): set input.image_root to the "
                          "folder they are relative to",
}


def _warn_if_images_failed(console: Console, cfg, result: dict) -> None:
    """Most rows quarantined for one image reason is almost never bad data: say so loudly, with the cause."""
    c = result["counts"]
    rows = c["pairs_written"] + c["pairs_quarantined"]
    image = {k: v for k, v in c["quarantined_by_reason"].items() if k.startswith("image_")}
    if not rows or not image:
        return
    reason, n = max(image.items(), key=lambda kv: kv[1])
    if n <= IMAGE_REASON_WARN_SHARE * rows:
        return
    if cfg.input.image_root is None:
        root_said = "the folder of the input file (input.image_root is not set)"
    else:
        root_said = f"input.image_root={cfg.input.image_root}"
    cause = _IMAGE_CAUSES.get(reason, "check the images that the input names under {root_said}")
    example = _first_detail(Path(cfg.output.dir), reason)
    console.say(f"pairsel: WARNING: {n} of {rows} rows ({n / rows:.0%}) were quarantined as {reason}"
                + (f", e.g. {example}" if example else "") + f". Likely cause: {cause.format(root_said=root_said)}.")


def _first_detail(out: Path, reason: str) -> str | None:
    import pyarrow.parquet as pq

    from stages.files import SHARD_GLOB

    for f in sorted((out / layout.QUARANTINE).glob(f"{SHARD_GLOB}.parquet")):
        t = pq.read_table(f, columns=["reason", "detail"]).to_pylist()
        for row in t:
            if row["reason"] == reason:
                return row["detail"]
    return None


# ---------------------------------------------------------------- the output tools
def _output_tool(module, args) -> int:
    """report / show / export / verify: their add_arguments() names every flag after run()'s keywords. verify's
    run() returns the exit code; the others return what they made."""
    result = module.run(**{k: v for k, v in vars(args).items() if k not in ("func", "command")})
    return result if isinstance(result, int) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pairsel", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the curation job")
    run.add_argument("config", help="a YAML job config, merged over configs/default.yaml")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. input.path=... output.dir=...")
    run.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local Ray)")
    run.add_argument("--overwrite", action="store_true",
                     help="delete what an earlier run wrote to output.dir (only pairsel's own files) and start afresh")
    run.add_argument("--force", action="store_true", help="resume even if the label config changed")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="show Ray's and the libraries' own output (always in OUT/_logs/run.log)")
    run.set_defaults(func=_run)

    relabel = sub.add_parser("relabel", help="label a finished job's pairs again under other scoring settings "
                                             "(no model runs), into a new output")
    __import__("pipeline.relabel", fromlist=["add_arguments"]).add_arguments(relabel)
    relabel.set_defaults(func=_relabel)

    for name, help_text in (("report", "write report.html for a job's output"),
                            ("show", "print one pair of a job's output"),
                            ("export", "export a job's output for a trainer"),
                            ("verify", "check that a job's output is whole: every shard as committed, every label "
                                       "as recomputed")):
        module = __import__(f"pipeline.{name}", fromlist=["run"])
        p = sub.add_parser(name, help=help_text)
        module.add_arguments(p)
        p.set_defaults(func=functools.partial(_output_tool, module))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    # only warnings on the terminal: a run's log file takes the rest (--verbose shows it there too); a relabel ends
    # with the summary
    if args.command in ("run", "relabel") and not verbose:
        for handler in logging.getLogger().handlers:
            handler.setLevel(logging.WARNING)
    # `run CONFIG --overwrite key=value`: argparse leaves overrides that follow a flag unparsed
    if extra and args.command in ("run", "relabel") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args) or 0
    except ConfigError as e:
        print(f"pairsel: config error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except DamagedOutput as e:  # report, show, export on an output whose shards differ from their commit records
        print(f"pairsel: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("pairsel: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
