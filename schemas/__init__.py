"""Arrow schemas of pairsel's records: the current version's module, re-exported here. Changing what users read
(OUTPUT_SCHEMA, QUARANTINE_SCHEMA) means a new version module (vN.py, SCHEMA_VERSION = N) whose docstring says
what changed; the old module goes, since nothing reads another version (report, show and export refuse it) and
git keeps it. The internal schemas (WORK_SCHEMA between stages, the bookkeeping files) may change within a
version, as long as the version's docstring says so and the output stays the same."""
from schemas.v6 import (  # noqa: F401
    CALIBRATED_COLUMNS,
    CANDIDATE,
    DECOY,
    DECOY_RULE_COLUMNS,
    DUPLICATES,
    IMAGE_REF,
    JOINT_COLUMNS,
    NEGATIVE,
    OUTPUT_SCHEMA,
    PAIR_COLUMNS,
    PAIR_KEYS,
    PART_META,
    PROVENANCE,
    QUARANTINE_SCHEMA,
    SCHEMA_VERSION,
    TARGET_COLUMNS,
    TARGET_PREFIX,
    WORK_SCHEMA,
    conform,
)
