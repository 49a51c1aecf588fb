"""The online store's Lua scripts (`scripts/*.lua`), read once at import and run with EVALSHA.

Writes use Lua so each step of a build (begin, merge phase, flip, abort) and each newer-wins
upsert is atomic in Redis; reads use MULTI/EXEC instead (cheaper for Redis, see snapshot_reads).
"""

from __future__ import annotations

from importlib import resources

from ml_platform.featurestore.online.resp import LuaScript


def _source(name: str) -> str:
    return resources.files(__package__).joinpath("scripts", f"{name}.lua").read_text(encoding="utf-8")


# newer_wins(key, first): the shared newer-event-time-wins hash write, prepended to its users.
_NEWER_WINS = _source("newer_wins")

UPSERT = LuaScript(_NEWER_WINS + _source("upsert"))  # stream / incremental writes into the live version
MERGE = LuaScript(_NEWER_WINS + _source("merge"))  # overlay -> new version before the flip
BEGIN = LuaScript(_source("begin"))  # allocate + mark a full build
MERGE_PHASE = LuaScript(_source("merge_phase"))  # bulk load done: updates go straight to the new version
FLIP = LuaScript(_source("flip"))  # the atomic version pointer flip
ABORT = LuaScript(_source("abort"))  # a failed build removes its partial version

# Redis Cluster (cluster_writes.py): a full build runs per bucket, the flip is global then per bucket.
BUCKET_BEGIN = LuaScript(_source("bucket_begin"))  # mark the build in one bucket
BUCKET_PREPARE = LuaScript(_source("bucket_prepare"))  # the bucket's part is complete: readable as `next`
BUCKET_COMMIT = LuaScript(_source("bucket_commit"))  # the bucket follows the global flip
CLUSTER_FLIP = LuaScript(_source("cluster_flip"))  # the global flip in the view's meta hash
