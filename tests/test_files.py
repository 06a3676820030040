"""stages/files.py: shard names and atomic writes."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.files import (SHARD_FILE, TEMP_SHARD_FILE, atomic_write, atomic_write_json, atomic_write_table,
                          shard_file, shard_name, temp_path)


def test_shard_names_sort_in_shard_order_and_match_the_cleanup_patterns(tmp_path):
    assert shard_name(7) == "shard-000007" and shard_file(7, ".json") == "shard-000007.json"
    assert sorted([shard_file(10), shard_file(9)]) == [shard_file(9), shard_file(10)]
    assert SHARD_FILE.fullmatch(shard_file(12))[1] == "000012"
    # pipeline/run.py deletes shard files never committed, temporaries included, by these patterns
    assert TEMP_SHARD_FILE.fullmatch(temp_path(tmp_path / shard_file(12)).name)


def test_atomic_writes_replace_the_whole_file(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json({"a": 1}, path)
    atomic_write_json({"b": 2}, path)
    assert json.loads(path.read_text()) == {"b": 2}
    table = pa.table({"n": [1, 2, 3]})
    atomic_write_table(table, tmp_path / "t.parquet", row_group_size=2)
    assert pq.read_table(tmp_path / "t.parquet").equals(table)
    assert pq.ParquetFile(tmp_path / "t.parquet").metadata.num_row_groups == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.parquet", "x.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json({"a": 1}, path)

    def half_then_fail(tmp):
        tmp.write_text('{"b":')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
