"""pairsel record schemas, version 6.

Version 6 (from 5): the same columns; the decoy rule measures a pair's lead in shares of its headroom
(stages/score.py: the most a delta of the pair can be, -log p(t+ | q) in pair_aware mode, 1 - s_direct in cosine
mode), so that one margin serves hard and easy pairs in a calibration group. `null_score` is version 5's divided by
the pair's headroom (0 where the headroom is not positive); `null_margin` is the group's margin (the manifest's, a
share) times the pair's headroom, in delta's units, so help_threshold = max(base_threshold, the best decoy's delta) +
null_margin as before. A version 5 output's labels do not recompute under version 6's rule: rerun it with
--overwrite.

Version 5 (from 4): the same columns; two of them are computed otherwise (stages/select.py). `null_score` is a
difference: how far the top of the pair's groups (its candidates, and its decoys in groups that mirror them) clears
the runner-up group and the bar, where it was the top's height above the bar; and `help_threshold` is
max(base_threshold, the best decoy's delta) + null_margin, where it was max(base_threshold + null_margin, the best
decoy's delta). A version 4 output's labels do not recompute under version 5's rule: rerun it with --overwrite.

Version 4 (from 3): the calibrated decoy rule (stages/decoys.py, stages/select.py, stages/calibrate.py). Each
pair gains its decoys (`decoys`: rationales the same generator wrote for other pairs of the shard, each with its
donor's identity, its similarities and its delta, scored like a candidate) and the columns its label is decided
from: `base_threshold` (epsilon, or the best control's delta + epsilon), `null_score` (its score in the decoy
competition), `null_margin` (its calibration group's margin) and `help_threshold` (the value a candidate's delta had
to exceed: decision is reason iff best_delta > help_threshold). The target side has the same columns with the
target_ prefix. Under the fixed rule (scoring.decision.rule: bar) the decoy columns are null and help_threshold is
base_threshold. A decoy's text is not in the output (only in the work schema): its donor row holds it.

Version 3 (from 2): rationales for the target side too (generators[].k_target): `target_candidates`, the target-side
control, label and the joint choice (`joint_query`, `joint_target`, `joint_delta`, `joint_beats_query`,
`joint_beats_target`). Version 2 (from 1): three outcomes (`decision` reason | direct | undecided; need_reasoning
null when undecided) and the content-free controls (`s_control`, `s_control_neg`, `lse_control`, `control_delta`,
per candidate `delta_control`).

Images travel by reference after the read: `query_image`, `target_image` and `negatives[].image` are an IMAGE_REF
in the work schema, and no output column holds an image.

One pair flows through the job as one row of WORK_SCHEMA. The reader fills the
pair columns; each later stage fills its own columns and leaves the rest alone.
A row whose `quarantine_reason` is set is passed through untouched by every
model stage and lands in the quarantine shard instead of the output.

OUTPUT_SCHEMA is what users read: WORK_SCHEMA without image references and
bookkeeping, plus provenance. QUARANTINE_SCHEMA is the quarantine shard.
"""
import pyarrow as pa

SCHEMA_VERSION = 6

# Where an image's bytes are, after the read: `size` bytes from `offset` of the file at `path` (absolute). A plain
# image file: offset 0, its size; a member of an uncompressed tar: the member's data; inline bytes that cannot be
# referenced in place (HF datasets, Parquet, .tar.gz) are stored once per digest under OUTPUT/_images/ (see
# stages/images.py). `digest` ("sha256:<hex>" of the bytes) is checked on every load: a file changed since the read
# is never used silently.
IMAGE_REF = pa.struct(
    [
        pa.field("path", pa.string()),
        pa.field("offset", pa.int64()),
        pa.field("size", pa.int64()),
        pa.field("digest", pa.string()),
    ]
)

NEGATIVE = pa.struct(
    [
        pa.field("text", pa.string()),
        pa.field("image_path", pa.string()),
        pa.field("image", IMAGE_REF),
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
        # delta minus the best control's delta (scoring.controls; null without controls): score(q ⊕ r_k) minus
        # max over controls of score(q ⊕ c), in the units of delta
        pa.field("delta_control", pa.float64()),
        pa.field("neg_delta", pa.float64()),
        pa.field("valid", pa.bool_()),
        # the joint scores of a query candidate r_q,k (null on target candidates and without target candidates):
        # s_joint[j] = cos(E(q ⊕ r_q,k), E(t ⊕ r_t,j)) for each target candidate j (null where either side was
        # not embedded); the negatives' similarities to q ⊕ r_q,k are s_neg. delta_joint[j] is scored as delta.
        pa.field("s_joint", pa.list_(pa.float64())),
        pa.field("delta_joint", pa.list_(pa.float64())),
    ]
)

# A decoy (stages/decoys.py): another pair's rationale appended to this pair's query (target side: its target),
# scored as a candidate is. `text` travels between stages only; the output keeps the donor's identity.
DECOY_IDENTITY = [
    pa.field("generator", pa.string()),
    pa.field("donor_pair_id", pa.string()),
    pa.field("donor_candidate", pa.int32()),  # index into the donor's candidates (target side: target_candidates)
]
DECOY_SCORES = [
    pa.field("s_k", pa.float64()),  # cos(E(q ⊕ d), E(t+)); target side: cos(E(q), E(t ⊕ d))
    pa.field("s_neg", pa.list_(pa.float64())),  # cos(E(q ⊕ d), E(t-_j)); null on the target side
    pa.field("lse", pa.float64()),
    pa.field("delta", pa.float64()),
]
DECOY = pa.struct(DECOY_IDENTITY + [pa.field("text", pa.string())] + DECOY_SCORES)
OUTPUT_DECOY = pa.struct(DECOY_IDENTITY + DECOY_SCORES)

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
    pa.field("query_image", IMAGE_REF),
    pa.field("target_text", pa.string()),
    pa.field("target_image_path", pa.string()),
    pa.field("target_image", IMAGE_REF),
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
    # the content-free controls (scoring.controls), one entry per control text, in config order; null without
    pa.field("s_control", pa.list_(pa.float64())),  # cos(E(q ⊕ c_i), E(t+))
    pa.field("s_control_neg", pa.list_(pa.list_(pa.float64()))),  # cos(E(q ⊕ c_i), E(t-_j))
    pa.field("lse_control", pa.list_(pa.float64())),
    pa.field("control_delta", pa.list_(pa.float64())),  # each control's delta, as a candidate's
    pa.field("scoring_mode", pa.string()),  # cosine | pair_aware
    pa.field("temperature", pa.float64()),
    # filled by stages/select.py
    pa.field("decision", pa.string()),  # reason | direct | undecided
    pa.field("chosen", pa.int32()),  # index into candidates, null if none is valid
    pa.field("chosen_generator", pa.string()),
    pa.field("best_delta", pa.float64()),
    pa.field("need_reasoning", pa.bool_()),  # decision == "reason"; null when undecided
    pa.field("rejected", pa.list_(pa.int32())),
    # the rule (stages/select.py): decision == reason iff best_delta > help_threshold
    pa.field("decoys", pa.list_(DECOY)),  # null under the bar rule
    pa.field("base_threshold", pa.float64()),  # epsilon, or the best control's delta + epsilon
    pa.field("null_score", pa.float64()),  # the decoy competition score (null: bar rule, or untested)
    # the group's margin x the pair's headroom (inf: the group labels no pair reason)
    pa.field("null_margin", pa.float64()),
    pa.field("help_threshold", pa.float64()),  # max(base_threshold, best decoy delta) + null_margin; bar: base
]

# ---- the target side (generators[].k_target > 0; all null without target candidates): the query side's columns
# that a side owns (stages/side.py), prefixed. Each target candidate: s_k = cos(E(q), E(t ⊕ r_t,j)) and s_neg null
# (the plain query's similarities to the negatives are s_direct_neg, see stages/score.py); target_s_control[i] =
# cos(E(q), E(t ⊕ c_i)).
TARGET_PREFIX = "target_"
SIDE_FIELDS = ("candidates", "s_control", "lse_control", "control_delta", "decision", "chosen", "chosen_generator",
               "best_delta", "need_reasoning", "rejected", "decoys", "base_threshold", "null_score", "null_margin",
               "help_threshold")
JOINT_FIELDS = [
    # the joint choice: the valid (k, j) with the largest delta_joint (stages/select.py)
    pa.field("joint_query", pa.int32()),  # index into candidates
    pa.field("joint_target", pa.int32()),  # index into target_candidates
    pa.field("joint_delta", pa.float64()),
    pa.field("joint_beats_query", pa.bool_()),  # joint_delta > the query side's choice + epsilon
    pa.field("joint_beats_target", pa.bool_()),  # joint_delta > the target side's choice + epsilon
]
TARGET_FIELDS = [pa.field(TARGET_PREFIX + f.name, f.type) for f in SCORE_FIELDS if f.name in SIDE_FIELDS] + JOINT_FIELDS
TARGET_COLUMNS = [f.name for f in TARGET_FIELDS]

# What each rule leaves null: the bar rule has no decoys; under the decoy rule the decisions (and the joint choice,
# which compares the sides' decisions) are filled only once the whole job is calibrated (stages/calibrate.py).
JOINT_COLUMNS = [f.name for f in JOINT_FIELDS]
DECOY_RULE_COLUMNS = [p + n for p in ("", TARGET_PREFIX) for n in ("decoys", "null_score", "null_margin")]
CALIBRATED_COLUMNS = [p + n for p in ("", TARGET_PREFIX) for n in ("decision", "need_reasoning", "help_threshold",
                                                                 "null_margin")] + JOINT_COLUMNS

WORK_SCHEMA = pa.schema(PAIR_FIELDS + SCORE_FIELDS + TARGET_FIELDS)

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
_OUTPUT_TYPES = {"decoys": pa.list_(OUTPUT_DECOY), "target_decoys": pa.list_(OUTPUT_DECOY)}
OUTPUT_SCHEMA = pa.schema(
    [f for f in PAIR_FIELDS if f.name not in _DROPPED]
    + [pa.field("negatives", pa.list_(OUTPUT_NEGATIVE))]
    + [pa.field(f.name, _OUTPUT_TYPES.get(f.name, f.type)) for f in SCORE_FIELDS + TARGET_FIELDS]
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


# ---- job bookkeeping files (internal, never read by users; not part of the output contract)

# stages/write.py: what WriteParts returns to the driver for each part it staged
PART_META = pa.schema(
    [
        pa.field("shard_id", pa.int64()),
        pa.field("shard_size", pa.int64()),
        pa.field("part", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("quarantine_part", pa.string()),
        pa.field("quarantine_rows", pa.int64()),
    ]
)

# stages/duplicates.py: the pair_id index, one file per shard (the pair_ids its rows own), and the rows whose
# pair_id an earlier shard owns
PAIR_KEYS = pa.schema([pa.field("pair_id", pa.string()), pa.field("shard_id", pa.int64()),
                       pa.field("row_index", pa.int64())])
DUPLICATES = pa.schema([pa.field("shard_id", pa.int64()), pa.field("row_index", pa.int64()),
                        pa.field("pair_id", pa.string()), pa.field("first_shard_id", pa.int64()),
                        pa.field("first_row_index", pa.int64())])

def conform(rows: list, schema: pa.Schema) -> pa.Table:
    """Build a table of exactly `schema` from row dicts; missing keys become null,
    extra keys are dropped. Stages return through this so that every batch of a
    stage has the same Arrow types, whatever its rows happen to contain."""
    names = schema.names
    return pa.Table.from_pylist([{n: r.get(n) for n in names} for r in rows], schema=schema)
