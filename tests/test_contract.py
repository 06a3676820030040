"""Stage contracts (stages/contract.py): a stage sees and writes only what it declares, and a plan whose stages
read what nobody writes is refused. The real stages' declarations are checked here on real batches; the whole
job's chain is checked where the plan is built (tests/test_job.py and the plan tests run it on every job)."""
import math

import pytest

from schemas import WORK_SCHEMA, conform
from stages.contract import Contract, ContractError, check_chain
from stages.score import Score, ScoreSpec
from stages.select import SelectSpec
from stages.side import QUERY, SIDES


def _cand(**kw):
    base = {"text": "r", "generator": "g", "finish_reason": "stop", "s_k": 0.5, "s_neg": [0.1]}
    return {**base, **kw}


def _batch(n=3):
    rows = [{"pair_id": f"p{i}", "subset": "s", "shard_id": 0, "row_index": i, "shard_size": n,
             "query_text": f"q{i}", "target_text": f"t{i}", "s_direct": 0.3, "s_direct_neg": [0.2],
             "candidates": [_cand(s_k=0.3 + 0.1 * i), _cand(s_k=0.1)]} for i in range(n)]
    return conform(rows, WORK_SCHEMA)


def test_apply_returns_the_batch_with_only_the_written_columns_replaced():
    batch = _batch()
    contract = Contract("t", reads=("s_direct",), writes=("lse_direct",))

    def process(rows):
        assert set(rows[0]) == {"s_direct", "lse_direct"}  # the stage sees only what it declared
        for r in rows:
            r["lse_direct"] = r["s_direct"] * 2

    out = contract.apply(batch, process)
    assert out.schema.equals(WORK_SCHEMA)
    assert out["lse_direct"].to_pylist() == [0.6, 0.6, 0.6]
    for name in WORK_SCHEMA.names:
        if name != "lse_direct":
            assert out[name].equals(batch[name]), name


def test_a_stage_that_changes_a_column_it_only_reads_fails():
    contract = Contract("t", reads=("s_direct", "query_text"), writes=("lse_direct",))

    def sneaky(rows):
        rows[1]["query_text"] = "rewritten"

    with pytest.raises(ContractError, match="stage t: column query_text: changed but not declared"):
        contract.apply(_batch(), sneaky)


def test_a_stage_that_writes_an_undeclared_column_fails():
    contract = Contract("t", reads=("s_direct",), writes=("lse_direct",))

    def sneaky(rows):
        rows[0]["decision"] = "reason"

    with pytest.raises(ContractError, match="column decision: written but not declared"):
        contract.apply(_batch(), sneaky)


def test_field_writes_may_change_only_those_fields_and_not_the_list():
    contract = Contract("t", reads=("candidates.s_k",), writes=("candidates.delta",))

    def ok(rows):
        for r in rows:
            for c in r["candidates"]:
                c["delta"] = c["s_k"] - 0.3

    out = contract.apply(_batch(), ok)
    assert [c["delta"] for c in out["candidates"].to_pylist()[1]] == pytest.approx([0.1, -0.2])

    def changes_text(rows):
        rows[2]["candidates"][0]["text"] = "other"

    with pytest.raises(ContractError, match="column candidates.text: changed"):
        contract.apply(_batch(), changes_text)

    def appends(rows):
        rows[0]["candidates"].append(_cand())

    with pytest.raises(ContractError, match="list lengths changed"):
        contract.apply(_batch(), appends)


def test_rows_may_not_be_added_or_dropped():
    contract = Contract("t", reads=("s_direct",), writes=("lse_direct",))
    with pytest.raises(ContractError, match="2 rows out for 3 in"):
        contract.apply(_batch(), lambda rows: rows[:2])


def test_nan_passed_on_unchanged_is_unchanged():
    rows = _batch().to_pylist()
    rows[0]["s_direct"] = math.nan
    out = Contract("t", reads=("s_direct",), writes=("lse_direct",)).apply(conform(rows, WORK_SCHEMA), lambda r: None)
    assert math.isnan(out["s_direct"][0].as_py())


def test_names_must_exist_in_the_work_schema():
    with pytest.raises(ContractError, match="not a WORK_SCHEMA column"):
        Contract("t", reads=("no_such_column",), writes=())
    with pytest.raises(ContractError, match="has no struct field"):
        Contract("t", reads=("candidates.no_such_field",), writes=())
    with pytest.raises(ContractError, match="has no struct field"):
        Contract("t", reads=("s_direct.x",), writes=())


def test_check_chain():
    read = Contract("read", reads=(), writes=("pair_id", "query_text", "target_text"))
    # generate grows the list and fills text: candidates.s_k is left to embed
    gen = Contract("generate", reads=("query_text",), writes=("candidates", "candidates.text"))
    embed = Contract("embed", reads=("candidates.text", "s_direct"), writes=("s_direct", "candidates.s_k"))
    score = Contract("score", reads=("candidates.s_k", "candidates.text"), writes=("candidates.delta",))
    select = Contract("select", reads=("candidates",), writes=("decision",))
    check_chain([read, gen, embed, score, select])  # embed reads its own s_direct (a round's earlier output)
    with pytest.raises(ContractError, match="stage score: column candidates.s_k: read, but no earlier stage"):
        check_chain([read, gen, score, embed])
    # a column written whole, without fields named, covers every field
    check_chain([read, Contract("generate", reads=(), writes=("candidates",)), score])
    with pytest.raises(ContractError, match="stage generate: column query_text"):
        check_chain([gen, read])


def test_check_source():
    reader = Contract("read", reads=(), writes=("pair_id", "subset", "shard_id", "row_index", "shard_size",
                                                 "query_text", "target_text", "s_direct", "s_direct_neg",
                                                 "candidates"))
    reader.check_source(_batch())
    leaky = Contract("read", reads=(), writes=tuple(n for n in reader.writes if n != "s_direct"))
    with pytest.raises(ContractError, match="column s_direct: written but not declared"):
        leaky.check_source(_batch())
    with pytest.raises(ContractError, match="not as WORK_SCHEMA has it"):
        reader.check_source(_batch().drop_columns(["raw"]))


# ---------------------------------------------------------------- the real stages' declarations


def test_score_and_select_keep_to_their_contracts_on_real_batches():
    scored = ScoreSpec(mode="cosine", temperature=1.0).build()(_batch())
    labelled = SelectSpec(epsilon=0.0).build()(scored)
    assert labelled["decision"].to_pylist() == ["direct", "reason", "reason"]
    assert labelled["candidates"].to_pylist()[2][0]["valid"] is True
    # what neither declares passes through untouched
    for name in ("query_text", "s_direct", "target_decision", "joint_delta"):
        assert labelled[name].equals(_batch()[name])


def test_a_real_stage_writing_an_undeclared_column_fails():
    class LeakyScore(Score):
        def __init__(self):
            super().__init__(ScoreSpec(mode="cosine", temperature=1.0))

        def __call__(self, batch):
            def process(rows):
                for r in rows:
                    r["s_direct"] = 0.0  # a score stage must not move what embed measured
            return self._contract.apply(batch, process)

    with pytest.raises(ContractError, match="stage score: column s_direct: changed but not declared"):
        LeakyScore()(_batch())


def test_without_target_side_the_target_columns_are_not_declared():
    """k_target 0: no stage writes the target columns, so the stages that would read them must not declare them
    (check_chain would refuse the plan); with the target side they do."""
    for make in (lambda sides: ScoreSpec(mode="cosine", temperature=1.0, sides=sides).contract(),
                 lambda sides: SelectSpec(epsilon=0.0, sides=sides).contract()):
        assert not any(n.startswith("target_") for n in make((QUERY,)).reads + make((QUERY,)).writes)
        assert any(n.startswith("target_") for n in make(SIDES).reads)
