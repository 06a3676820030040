"""Stage contracts: the columns each stage reads and writes, declared and checked.

Every stage declares a `Contract`: the WORK_SCHEMA columns it reads and the ones it writes, a column named whole
("candidates") or one field of the structs of a list column ("candidates.s_k"). Two checks keep the declarations
true, at the weight of Ray Data's own callable classes (no framework: a stage is still a callable over a batch):

- `check_chain`, when the plan is built: every column a stage reads is written by an earlier stage (or by the
  stage itself: a later round reads what its own earlier pass wrote, null the first time), and every name exists in
  WORK_SCHEMA. A plan that asks for a column nobody fills fails before any work starts.
- `Contract.apply`, on every batch: the stage sees only the columns it declared, as Python rows; what it hands back
  must leave every column and field it did not declare as written exactly as it came, with as many rows. Only the
  written columns go back into the batch; the rest (texts, image references, other stages' scores) passes through as
  Arrow, never converted. A stage that writes an undeclared column fails with ContractError naming it.

The reader, the first stage, has no input batch: `check_source` checks that what it produced holds only its columns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc

import schemas  # the current version


class ContractError(RuntimeError):
    """A stage read or wrote outside its declaration, or the plan asks for a column no stage writes."""

    def __init__(self, stage: str, column: str, problem: str):
        super().__init__(f"stage {stage}: column {column}: {problem}")
        self.stage, self.column, self.problem = stage, column, problem


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _struct_type(schema: pa.Schema, column: str) -> Optional[pa.StructType]:
    """The struct type of a list<struct> (or struct) column, else None."""
    t = schema.field(column).type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return t if pa.types.is_struct(t) else None


@dataclass(frozen=True)
class Contract:
    stage: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "reads", tuple(dict.fromkeys(self.reads)))
        object.__setattr__(self, "writes", tuple(dict.fromkeys(self.writes)))
        work = schemas.WORK_SCHEMA
        for name in self.reads + self.writes:
            column, _, field = name.partition(".")
            if column not in work.names:
                raise ContractError(self.stage, name, "not a WORK_SCHEMA column")
            if field:
                struct = _struct_type(work, column)
                if struct is None or struct.get_field_index(field) < 0:
                    raise ContractError(self.stage, name, f"{column} has no struct field {field!r}")

    # ------------------------------------------------------------ what is declared
    @property
    def columns(self) -> list[str]:
        """The top-level columns the stage sees: those it reads or writes (a writer may keep what is there)."""
        return list(dict.fromkeys(_top(n) for n in self.reads + self.writes))

    @property
    def written_columns(self) -> list[str]:
        """The top-level columns that go back into the batch."""
        return list(dict.fromkeys(_top(n) for n in self.writes))

    def _written_fields(self, column: str) -> Optional[set[str]]:
        """None when `column` is written whole, else the struct fields written in it."""
        if column in self.writes:
            return None
        return {n.partition(".")[2] for n in self.writes if _top(n) == column}

    # ------------------------------------------------------------ checks
    def apply(self, batch: pa.Table, process: Callable[[list[dict]], Optional[list[dict]]]) -> pa.Table:
        """Run `process` over the declared columns of `batch` as row dicts (mutated in place, or a new list
        returned) and return `batch` with the written columns replaced; ContractError if `process` changed
        anything it did not declare."""
        columns = self.columns
        absent = [c for c in columns if c not in batch.schema.names]
        if absent:
            raise ContractError(self.stage, absent[0], "declared but not in the batch")
        view = batch.select(columns)
        rows = view.to_pylist()
        out = process(rows)
        out = rows if out is None else out
        if len(out) != batch.num_rows:
            raise ContractError(self.stage, "*", f"{len(out)} rows out for {batch.num_rows} in")
        allowed = set(columns)
        for row in out:
            extra = row.keys() - allowed
            if extra:
                raise ContractError(self.stage, sorted(extra)[0], "written but not declared")
        work = schemas.WORK_SCHEMA
        result = pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in out],
                                      schema=pa.schema([work.field(c) for c in columns]))
        for column in columns:
            fields = self._written_fields(column)
            if fields is None:
                continue
            self._check_unchanged(column, view[column], result[column], fields)
        for column in self.written_columns:
            batch = batch.set_column(batch.schema.get_field_index(column), work.field(column), result[column])
        return batch

    def _check_unchanged(self, column: str, before: pa.ChunkedArray, after: pa.ChunkedArray, written: set[str]):
        """`column` as it came in and as the stage left it: equal, but for the struct fields in `written`."""
        if not written:
            if not _same(before, after):
                raise ContractError(self.stage, column, "changed but not declared as written")
            return
        if not _same(pc.list_value_length(before), pc.list_value_length(after)):
            raise ContractError(self.stage, column, f"list lengths changed, but only fields {sorted(written)} "
                                                    "are declared as written")
        flat_before, flat_after = pc.list_flatten(before), pc.list_flatten(after)
        for field in _struct_type(schemas.WORK_SCHEMA, column).names:
            if field in written:
                continue
            if not _same(_field(flat_before, field), _field(flat_after, field)):
                raise ContractError(self.stage, f"{column}.{field}", "changed but not declared as written")

    def check_source(self, table: pa.Table) -> None:
        """The reader's output: WORK_SCHEMA, and null in every column it does not write."""
        work = schemas.WORK_SCHEMA
        if not table.schema.equals(work):
            theirs = {f.name: f.type for f in table.schema}
            wrong = next((f.name for f in work if theirs.get(f.name) != f.type), None) or next(
                n for n in table.schema.names if n not in work.names)
            raise ContractError(self.stage, wrong, "not as WORK_SCHEMA has it")
        for column in work.names:
            if column not in self.writes and table[column].null_count != table.num_rows:
                raise ContractError(self.stage, column, "written but not declared")


def _field(flat: pa.ChunkedArray, name: str) -> pa.ChunkedArray:
    return pa.chunked_array([chunk.field(name) for chunk in flat.chunks], type=flat.type.field(name).type)


def _same(a: pa.ChunkedArray, b: pa.ChunkedArray) -> bool:
    """Equal values, NaN equal to NaN (a float a stage passes on unchanged may be NaN)."""
    if a.equals(b):
        return True
    return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a.to_pylist(), b.to_pylist()))


def _same_value(x, y) -> bool:
    if isinstance(x, float) and isinstance(y, float):
        return x == y or (math.isnan(x) and math.isnan(y))
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_same_value(a, b) for a, b in zip(x, y))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_same_value(x[k], y[k]) for k in x)
    return x == y


def check_chain(contracts: Sequence[Contract]) -> None:
    """The plan's contracts in order, the reader's first: every column each stage reads is written by an earlier
    stage or by itself."""
    available: set[str] = set()
    for contract in contracts:
        own = _provides(contract)
        for name in contract.reads:
            if not _covered(name, available | own):
                raise ContractError(contract.stage, name, "read, but no earlier stage writes it")
        available |= own


def _provides(contract: Contract) -> set[str]:
    """What a stage's writes make available downstream. A column written whole covers each of its fields, unless
    the contract also names fields of it: `("candidates", "candidates.text", ...)` declares a stage that grows the
    list and fills those fields of its new elements (generate), so a later read of candidates.s_k still needs the
    stage that fills s_k."""
    out = set()
    for name in contract.writes:
        if "." not in name and any(_top(n) == name and "." in n for n in contract.writes):
            out.add(name + "[]")  # the list itself (a read of the whole column is served)
        else:
            out.add(name)
    return out


def _covered(name: str, written: set[str]) -> bool:
    top = _top(name)
    return name in written or top in written or ("." not in name and top + "[]" in written)
