"""Windowed aggregates kept up to date event by event, compiled from the same `Aggregation`
declarations the offline SQL comes from (`ml_platform.featurestore.aggregation`).

Semantics are the offline ones, function by function: the value of an aggregation at time t for
an entity is `function(column)` over that entity's source rows with time in [t - window, t], both
ends included (so rows with the same time are peers and see each other); rows with a NULL
timestamp, join key or (for column aggregations) value are skipped exactly as in SQL.

State: per entity one Redis string, the entity's *event buffer* of fixed-width records appended
in arrival order. Views reading the same source whose join keys extend another's share its
buffers (a `BufferGroup`: user x merchant counts come from the card holder's buffer). APPEND is
atomic, so several workers share a buffer, and because the state lives in Redis a restarted
worker loses nothing. Folding an event twice (a replay) never double counts. Records older than
the entity's newest time minus the group's longest window minus `trim_slack` are garbage: a
buffer is rewritten without its leading garbage once its first record is a further `trim_slack`
older (garbage costs memory only, never correctness).

From the buffer the updater answers three questions per folded event, each exactly:
  * `before`: the features as the offline point-in-time join would look them up for this event
    (at `features.feature_lookup_time(t)` = t - 1 µs: the aggregates at the entity's latest row
    strictly before t, null when there is none within the view's TTL). Exact for in-order,
    late (up to `trim_slack`) and replayed events alike, and for several events of one entity in
    one batch.
  * `at_event` (optional): the aggregates at the event's own time, i.e. the offline table's row.
  * `latest`: per entity, the aggregates at its newest row, with that row's time as the event
    timestamp: what the online store holds (written with `RedisOnlineStore.update_entities`).

Modules:
  plan.py     compiling feature views into buffer groups (`compile_views`)
  events.py   the updater's input: events as dicts, a batch as columns, `events_from_frame`
  buffer.py   the buffer format: record layout, packing/unpacking, key naming, `BufferCache`
  windows.py  the pure-numpy window evaluation (no Redis: testable with hand-made records)
  updater.py  `StreamingUpdater` / `PendingFold`: the fold script (`fold.lua`) and its replies
  cluster_fold.py  on Redis Cluster: buffers in the online store's buckets, the script per bucket
"""

from ml_platform.featurestore.online import EVENT_TIMESTAMP
from ml_platform.featurestore.streaming.buffer import (
    EXPIRY_REFRESH_S,
    NULL_KEY,
    BufferCache,
    event_id_hash,
    key_part,
    pack_records,
    record_dtype,
    unpack_records,
)
from ml_platform.featurestore.streaming.events import EVENT_ID, EventColumns, events_from_frame
from ml_platform.featurestore.streaming.plan import (
    BufferGroup,
    CompiledAggregation,
    CompiledView,
    compile_views,
    is_integer_key,
)
from ml_platform.featurestore.streaming.updater import (
    DEFAULT_TRIM_SLACK,
    FOLD_LUA,
    PendingFold,
    StreamingUpdater,
)
from ml_platform.featurestore.streaming.windows import (
    LOOKUP_OFFSET_US,
    FoldResult,
    SearchKeys,
    aggregates_at,
    evaluate_group,
)

# Kept for importers of the old module (`ml_platform.serving.stream`): the one definition is
# `ml_platform.timestamps`; import it from there.
from ml_platform.timestamps import from_us, to_us

__all__ = [
    "DEFAULT_TRIM_SLACK",
    "EVENT_ID",
    "EVENT_TIMESTAMP",
    "EXPIRY_REFRESH_S",
    "FOLD_LUA",
    "LOOKUP_OFFSET_US",
    "NULL_KEY",
    "BufferCache",
    "BufferGroup",
    "CompiledAggregation",
    "CompiledView",
    "EventColumns",
    "FoldResult",
    "PendingFold",
    "SearchKeys",
    "StreamingUpdater",
    "aggregates_at",
    "compile_views",
    "evaluate_group",
    "event_id_hash",
    "events_from_frame",
    "from_us",
    "is_integer_key",
    "key_part",
    "pack_records",
    "record_dtype",
    "to_us",
    "unpack_records",
]
