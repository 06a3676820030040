"""Rationales someone already generated, read from a JSONL file.

Each line: {"pair_id": "...", "rationales": ["...", ...]}. The k-th sample of a
pair is its k-th rationale, so the seeds only decide how many are taken.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
from pathlib import Path
from typing import Optional

from stages.backends.base import GenRequest, Generation
from stages.backends.options import BackendOptions, option

log = logging.getLogger(__name__)

MISSING = "no precomputed rationale"
_LOGGED_LINES = 5  # bad lines logged one by one; the rest only counted


@dataclasses.dataclass(frozen=True)
class PrecomputedOptions(BackendOptions):
    path: Optional[str] = option(None, "the JSONL file of `{pair_id, rationales}` lines", label=True,
                                 shown="none: required")


class PrecomputedGenerator:
    Options = PrecomputedOptions

    def __init__(self, model: str, trust_remote_code: bool = False, **options):
        path = self.Options.parse(options, "precomputed generator").path
        if not path:
            raise ValueError("the precomputed backend needs `path`: a JSONL of {pair_id, rationales}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"precomputed rationales: no such file: {path}")
        self.path = str(path)
        self.model_id = "precomputed:" + self.path
        self.malformed_lines = 0
        self.duplicate_lines = 0
        self._index: dict[str, list[str]] | None = None
        self._lock = threading.Lock()

    def _load(self) -> dict[str, list[str]]:
        with self._lock:
            if self._index is None:
                self._index = self._read()
        return self._index

    def _read(self) -> dict[str, list[str]]:
        index: dict[str, list[str]] = {}
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    pair_id, rationales = _parse_line(line)
                except ValueError as e:
                    self.malformed_lines += 1
                    if self.malformed_lines <= _LOGGED_LINES:
                        log.warning("%s:%d: skipped malformed line: %s", self.path, lineno, e)
                    continue
                if pair_id in index:
                    # first line wins, so the result does not depend on how the file was appended to
                    self.duplicate_lines += 1
                    if self.duplicate_lines <= _LOGGED_LINES:
                        log.warning("%s:%d: skipped duplicate pair_id %r", self.path, lineno, pair_id)
                    continue
                index[pair_id] = rationales
        if self.malformed_lines or self.duplicate_lines:
            log.warning(
                "%s: %d pairs loaded, %d malformed and %d duplicate lines skipped",
                self.path, len(index), self.malformed_lines, self.duplicate_lines,
            )
        return index

    def generate(self, requests: list[GenRequest]) -> list[list[Generation]]:
        index = self._load()
        out = []
        for request in requests:
            rationales = index.get(request.pair_id, [])
            out.append(
                [
                    Generation(text=rationales[k], tokens=len(rationales[k].split()), finish_reason="stop")
                    if k < len(rationales)
                    else Generation(text="", tokens=0, finish_reason="error", error=MISSING)
                    for k in range(len(request.seeds))
                ]
            )
        return out


def _parse_line(line: str) -> tuple[str, list[str]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    pair_id = record.get("pair_id")
    if isinstance(pair_id, bool) or not isinstance(pair_id, (str, int)) or pair_id == "":
        raise ValueError("pair_id missing or not a string")
    rationales = record.get("rationales")
    if not isinstance(rationales, list) or not all(isinstance(r, str) for r in rationales):
        raise ValueError("rationales missing or not a list of strings")
    return str(pair_id), rationales
