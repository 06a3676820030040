import json
import logging

import pytest

from stages.backends import generator_class
from stages.backends.base import GenRequest
from stages.backends.precomputed import PrecomputedGenerator


def request(pair_id: str, k: int) -> GenRequest:
    return GenRequest(
        prompt="Query: x", image=None, seeds=list(range(100, 100 + k)), temperature=1.0, top_p=1.0,
        max_new_tokens=8, pair_id=pair_id,
    )


@pytest.fixture
def rationales_file(tmp_path):
    lines = [
        json.dumps({"pair_id": "a", "rationales": ["first for a", "second  for\ta", "third"]}),
        json.dumps({"pair_id": "b", "rationales": ["only one"]}),
        "",  # blank lines are not errors
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"pair_id": "c", "rationales": "not a list"}),
        json.dumps({"pair_id": "d", "rationales": ["ok", 3]}),
        json.dumps({"rationales": ["no id"]}),
        json.dumps({"pair_id": "a", "rationales": ["duplicate, ignored"]}),
        json.dumps({"pair_id": 7, "rationales": ["numeric id"]}),
        json.dumps({"pair_id": "e", "rationales": []}),
    ]
    path = tmp_path / "rationales.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_generate_takes_rationales_in_order(rationales_file, caplog):
    gen = PrecomputedGenerator("ignored", path=str(rationales_file))
    assert gen.model_id == f"precomputed:{rationales_file}"
    with caplog.at_level(logging.WARNING):
        out = gen.generate([request("a", 2), request("b", 3), request("a", 3), request("7", 1), request("e", 1)])
    assert [[g.text for g in gens] for gens in out] == [
        ["first for a", "second  for\ta"],
        ["only one", "", ""],
        ["first for a", "second  for\ta", "third"],
        ["numeric id"],
        [""],
    ]
    first = out[0][1]
    assert (first.tokens, first.finish_reason, first.error) == (3, "stop", None)
    missing = out[1][1]
    assert (missing.tokens, missing.finish_reason, missing.error) == (0, "error", "no precomputed rationale")
    assert out[4][0].finish_reason == "error"
    # 5 malformed lines, 1 duplicate; each was logged with its line number
    assert (gen.malformed_lines, gen.duplicate_lines) == (5, 1)
    assert "rationales.jsonl:4: skipped malformed line: not JSON" in caplog.text
    assert "rationales.jsonl:9: skipped duplicate pair_id 'a'" in caplog.text


def test_unknown_pair_and_zero_seeds(rationales_file):
    gen = PrecomputedGenerator("ignored", path=str(rationales_file))
    out = gen.generate([request("nope", 2), request("a", 0)])
    assert [g.finish_reason for g in out[0]] == ["error", "error"]
    assert out[1] == []
    assert gen.generate([]) == []


def test_file_is_read_once(rationales_file):
    gen = PrecomputedGenerator("ignored", path=str(rationales_file))
    assert gen.generate([request("b", 1)])[0][0].text == "only one"
    rationales_file.write_text(json.dumps({"pair_id": "b", "rationales": ["changed"]}) + "\n")
    assert gen.generate([request("b", 1)])[0][0].text == "only one"
    assert gen.malformed_lines == 5  # not counted twice


def test_constructor_checks_path(tmp_path):
    with pytest.raises(ValueError, match="needs `path`"):
        PrecomputedGenerator("ignored")
    with pytest.raises(FileNotFoundError, match="no such file"):
        PrecomputedGenerator("ignored", path=str(tmp_path / "missing.jsonl"))


def test_registered_under_its_name(rationales_file):
    assert generator_class("precomputed") is PrecomputedGenerator
