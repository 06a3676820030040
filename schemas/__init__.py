"""Arrow schemas of pairsel's records. One module per schema version; this file
re-exports the current one. Changing any schema means a new version module."""
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
