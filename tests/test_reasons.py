"""The quarantine reason codes have one list (schemas/reasons.py): the README documents exactly those, and
every code a stage sets in its source is on it."""
import re
from pathlib import Path

from schemas.reasons import REASONS

REPO = Path(__file__).resolve().parent.parent

# a code raised as Bad(...) or ImageError(...), or assigned to quarantine_reason (alone or in a tuple assignment)
SET_IN_SOURCE = re.compile(r'(?:\bBad|\bImageError)\(\s*"([a-z0-9_]+)"'
                           r'|\["quarantine_reason"\](?:\s*,\s*[^=\n]+)?\s*=\s*"([a-z0-9_]+)"')


def test_the_list_has_no_repeats():
    assert len(REASONS) == len(set(REASONS))


def test_the_readme_documents_exactly_the_listed_codes():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("### Quarantine reasons", 1)[1].split("\n### ", 1)[0]
    documented = {code for line in section.splitlines() if line.startswith("| `")
                  for code in re.findall(r"`([a-z0-9_]+)`", line.split("|")[1])}
    assert documented == set(REASONS)


def test_every_code_a_stage_sets_is_listed():
    found = {}
    for path in sorted((REPO / "stages").rglob("*.py")):
        for m in SET_IN_SOURCE.finditer(path.read_text(encoding="utf-8")):
            found.setdefault(m.group(1) or m.group(2), path.relative_to(REPO).as_posix())
    # the scan sees the codes of the later stages too, not just the reader's
    assert {"embed_failed", "generation_failed", "duplicate_pair_id", "image_corrupt"} <= set(found)
    assert {code: where for code, where in found.items() if code not in REASONS} == {}
