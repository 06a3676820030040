"""The output folder's layout: every folder and file pairsel writes under output.dir, named once.

  data/shard-NNNNNN.parquet         the labelled pairs, one file per input shard (stages/files.py names shards)
  quarantine/shard-NNNNNN.parquet   the rows that could not be used
  _commits/shard-NNNNNN.json        each shard's commit record (stages/write.py); _commits/job.json: the job record
  manifest.json, report.html        what the job wrote (pipeline/manifest.py), the report (pipeline/report.py)
  README.md                         the dataset card (pipeline/card.py)
  _staging/                         parts of shards not committed yet
  _scored/                          the decoy rule: shards scored and waiting for their labels (the layout again:
                                    data/, quarantine/, _commits/; pipeline/calibration.py)
  _index/                           the pair_id index (stages/duplicates.py)
  _stats/                           the stages' counters
  _cache/embeddings/                the embedding cache's default place (embedder.cache_dir)
  _images/                          image bytes an input holds inline, stored once per digest (stages/images.py)
  _logs/run.log                     the run's log (pipeline/cli.py)

A user's files are sacred: pairsel deletes only what this module names (pipeline/output_dir.py).
"""
DATA = "data"
QUARANTINE = "quarantine"
COMMITS = "_commits"
JOB_RECORD = f"{COMMITS}/job.json"
MANIFEST = "manifest.json"
REPORT = "report.html"
CARD = "README.md"
STAGING = "_staging"
SCORED = "_scored"
INDEX = "_index"
PAIR_IDS = f"{INDEX}/pair_ids"
DUPLICATES = f"{INDEX}/duplicates.parquet"
STATS = "_stats"
CACHE = "_cache"
EMBEDDINGS = f"{CACHE}/embeddings"
IMAGES = "_images"
LOGS = "_logs"
RUN_LOG = f"{LOGS}/run.log"

# a commit record names each file of its shard with these key prefixes: path, rows, bytes, sha256 (stages/write.py)
RECORD_PREFIX = {DATA: "", QUARANTINE: "quarantine_"}

# wholly pairsel's: --overwrite removes them (and _commits, last)
OWN_FOLDERS = (STAGING, SCORED, INDEX, STATS, CACHE, LOGS, IMAGES)
OWN_FILES = (MANIFEST, REPORT)
SHARD_FOLDERS = (DATA, QUARANTINE)  # folders that hold shard files among, perhaps, a user's own
