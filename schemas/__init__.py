"""Arrow schemas of pairsel's records: the current version's module, re-exported here. Changing any schema
means a new version module (vN.py, SCHEMA_VERSION = N) whose docstring says what changed; the old module goes,
since nothing reads another version (report, show and export refuse it) and git keeps it."""
from schemas.v3 import (  # noqa: F401
    CANDIDATE,
    NEGATIVE,
    OUTPUT_SCHEMA,
    PAIR_COLUMNS,
    PROVENANCE,
    QUARANTINE_SCHEMA,
    SCHEMA_VERSION,
    WORK_SCHEMA,
    conform,
)
