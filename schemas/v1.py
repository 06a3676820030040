"""pairsel record schemas, version 1.

One pair flows through the job as one row of WORK_SCHEMA. The reader fills the
pair columns; each later stage fills its own columns and leaves the rest alone.
A row whose `quarantine_reason` is set is passed through untouched by every
model stage and lands in the quarantine shard instead of the output.

OUTPUT_SCHEMA is what users read: WORK_SCHEMA without image bytes and
bookkeeping, plus provenance. QUARANTINE_SCHEMA is the quarantine shard.
"""
import pyarrow as pa

SCHEMA_VERSION = 1

NEGATIVE = pa.struct(
    [
        pa.field("text", pa.string()),
        pa.field("image_path", pa.string()),
        pa.field("image", pa.binary()),
        # "explicit" (from the input) or "in_shard" (another pair's target,
        # drawn with a seed from the same input shard)
        pa.field("origin", pa.string()),
    ]
)

CANDIDATE = pa.struct(
    [
        # filled by stages/generate.py
        pa.field("text", pa.string()),
        pa.field("generator", pa.string()),
        pa.field("model", pa.string()),
        pa.field("template", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("sampling", pa.string()),  # JSON of the sampling params used
        pa.field("tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),  # stop | length | empty | echo | error
        pa.field("error", pa.string()),
        # filled by stages/embed.py
        pa.field("s_k", pa.float64()),  # cos(E(q ⊕ r_k), E(t+))
        pa.field("s_neg", pa.list_(pa.float64())),  # cos(E(q ⊕ r_k), E(t-_j))
        # filled by stages/score.py
        pa.field("lse", pa.float64()),  # logsumexp over {t+} ∪ negatives of cos/τ
        pa.field("delta", pa.float64()),
        pa.field("neg_delta", pa.float64()),
        pa.field("valid", pa.bool_()),
    ]
)

# Columns the reader produces: the canonical pair record.
PAIR_FIELDS = [
    pa.field("pair_id", pa.string()),
    pa.field("subset", pa.string()),
    pa.field("source", pa.string()),  # input file (or tar) the row came from
    pa.field("shard_id", pa.int64()),  # fixed input shard, independent of Ray blocks
    pa.field("row_index", pa.int64()),  # position within the shard
    pa.field("shard_size", pa.int64()),  # rows read from the shard, valid or not: the commit count
    pa.field("query_text", pa.string()),
    pa.field("query_image_path", pa.string()),
    pa.field("query_image", pa.binary()),
    pa.field("target_text", pa.string()),
    pa.field("target_image_path", pa.string()),
    pa.field("target_image", pa.binary()),
    pa.field("negatives", pa.list_(NEGATIVE)),
    pa.field("quarantine_reason", pa.string()),
    pa.field("quarantine_detail", pa.string()),
    pa.field("raw", pa.string()),  # the raw input record, kept for quarantine rows only
]
PAIR_COLUMNS = [f.name for f in PAIR_FIELDS]

SCORE_FIELDS = [
    pa.field("candidates", pa.list_(CANDIDATE)),
    pa.field("s_direct", pa.float64()),  # cos(E(q), E(t+))
    pa.field("s_direct_neg", pa.list_(pa.float64())),  # cos(E(q), E(t-_j))
    pa.field("lse_direct", pa.float64()),
    pa.field("scoring_mode", pa.string()),  # cosine | pair_aware
    pa.field("temperature", pa.float64()),
    # filled by stages/select.py
    pa.field("chosen", pa.int32()),  # index into candidates, null if none is valid
    pa.field("chosen_generator", pa.string()),
    pa.field("best_delta", pa.float64()),
    pa.field("need_reasoning", pa.bool_()),
    pa.field("rejected", pa.list_(pa.int32())),
]

WORK_SCHEMA = pa.schema(PAIR_FIELDS + SCORE_FIELDS)

PROVENANCE = pa.struct(
    [
        pa.field("config_hash", pa.string()),
        pa.field("pairsel_version", pa.string()),
        pa.field("schema_version", pa.int32()),
        pa.field("embedder", pa.string()),
        pa.field("generators", pa.list_(pa.string())),
        pa.field("epsilon", pa.float64()),
    ]
)

OUTPUT_NEGATIVE = pa.struct(
    [pa.field("text", pa.string()), pa.field("image_path", pa.string()), pa.field("origin", pa.string())]
)

_DROPPED = {"shard_size", "query_image", "target_image", "negatives", "quarantine_reason", "quarantine_detail", "raw"}
OUTPUT_SCHEMA = pa.schema(
    [f for f in PAIR_FIELDS if f.name not in _DROPPED]
    + [pa.field("negatives", pa.list_(OUTPUT_NEGATIVE))]
    + SCORE_FIELDS
    + [pa.field("provenance", PROVENANCE)],
    metadata={b"pairsel.schema_version": str(SCHEMA_VERSION).encode()},
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string()),
        pa.field("subset", pa.string()),
        pa.field("source", pa.string()),
        pa.field("shard_id", pa.int64()),
        pa.field("row_index", pa.int64()),
        pa.field("reason", pa.string()),  # a reason code, see README
        pa.field("detail", pa.string()),
        pa.field("raw", pa.string()),
    ],
    metadata={b"pairsel.schema_version": str(SCHEMA_VERSION).encode()},
)


def conform(rows: list, schema: pa.Schema) -> pa.Table:
    """Build a table of exactly `schema` from row dicts; missing keys become null,
    extra keys are dropped. Stages return through this so that every batch of a
    stage has the same Arrow types, whatever its rows happen to contain."""
    names = schema.names
    return pa.Table.from_pylist([{n: r.get(n) for n in names} for r in rows], schema=schema)
