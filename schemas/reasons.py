"""The quarantine reason codes: the values of QUARANTINE_SCHEMA's `reason` column, and so part of the output
contract (README "Quarantine reasons" documents each one). Every code any stage sets in `quarantine_reason`
is listed here, grouped by the stage that finds it; tests/test_reasons.py holds this list, the README's table
and the stages to each other.
"""

# stages/read.py and its modules: the record and its images (stages/images.py names the image_* ones that
# decoding finds, and the model stages may find them again for a file that changed after the read)
READ_REASONS = (
    "image_missing",
    "image_empty",
    "image_corrupt",
    "image_too_large",
    "image_unsupported",
    "image_outside_root",
    "image_marker_without_image",  # text has <|image_1|> but that side has no image
    "empty_query",
    "missing_target",
    "wrong_type",
    "malformed_record",
    "not_utf8",
    "query_too_long",
    "duplicate_pair_id",
    "unsafe_member_name",  # tar member with an absolute name or a `..` part
    "unsafe_member_type",  # tar member that is a link, device or fifo
)

# the later stages
EMBED_REASONS = ("embed_failed",)  # stages/embed.py: the embedder failed on this row alone
SELECT_REASONS = ("generation_failed",)  # stages/select.py: every candidate failed; nothing was tested

REASONS = READ_REASONS + EMBED_REASONS + SELECT_REASONS
