"""The buffer format (`featurestore.streaming.buffer`) without Redis: the record layout, event ->
record packing, buffer key parts, and the worker cache applying hand-written fold replies (the
reply format of `fold.lua`)."""

from __future__ import annotations

import math
import struct
from datetime import timedelta

import numpy as np
import pytest

from ml_platform.featurestore import Aggregation, Entity, FeatureView, FileSource
from ml_platform.featurestore.streaming.buffer import (
    BufferCache,
    key_part,
    pack_records,
    record_dtype,
    unpack_records,
)
from ml_platform.featurestore.streaming.events import EventColumns
from ml_platform.featurestore.streaming.plan import compile_views

H = timedelta(hours=1)
user = Entity("user", join_keys=["user_id"])
merchant = Entity("merchant", join_keys=["merchant_id"])
source = FileSource("events", timestamp_field="ts")
VIEWS = [
    FeatureView("spend", entities=[user], source=source, aggregations=[Aggregation("sum", H, "amount")]),
    FeatureView("pair", entities=[user, merchant], source=source, aggregations=[Aggregation("count", H)]),
]


def test_record_layout_is_time_values_extra_keys_and_event_id_hash():
    assert record_dtype(1, 0).itemsize == 8 + 8 + 8
    assert record_dtype(2, 1).itemsize == 8 + 2 * 8 + 8 + 8
    assert record_dtype(0, 0).names == ("ts", "id")


def test_events_pack_into_records_and_unpack_unchanged():
    _, groups = compile_views(VIEWS)
    group = groups["spend"]
    events = [
        {"event_id": "a", "user_id": 1, "merchant_id": 7, "ts": 1_000, "amount": 2.5},
        {"event_id": "b", "user_id": 1, "merchant_id": None, "ts": 2_000, "amount": None},
    ]
    packed = pack_records(group, EventColumns(events), np.array([0, 1]))
    records, counts = unpack_records(group, [packed[:1].tobytes(), packed[1:].tobytes()])
    assert counts.tolist() == [1, 1]
    assert records["ts"].tolist() == [1_000, 2_000]
    assert records["v"][0, 0] == 2.5 and math.isnan(records["v"][1, 0])  # NULL amount -> NaN
    assert records["x"][:, 0].tolist() == [7, np.iinfo(np.int64).min]  # NULL merchant -> NULL_KEY
    assert records["id"][0] != records["id"][1]
    with pytest.raises(RuntimeError, match="buffer group 'spend' has records of an unexpected size"):
        unpack_records(group, [packed.tobytes()[:-1]])


def test_key_parts_escape_the_separator_and_ints_match_their_text():
    assert key_part("a:b%c") == "a%3Ab%25c"
    assert key_part(7) == key_part("7") == "7"
    assert key_part(np.int64(-3)) == "-3"


EPOCH_1 = struct.pack("<q", 11)


def rec(*times: int) -> bytes:
    """Stand-in records, 8 bytes each (the cache only slices bytes)."""
    return b"".join(struct.pack("<q", t) for t in times)


def test_cache_reads_the_whole_buffer_once_then_only_what_others_appended():
    cache = BufferCache()
    key = b"k"
    assert cache.known(key, now=0.0) == (0, 0, 1)  # unknown: no epoch, refresh its expiry
    # First fold: the whole buffer ("f" + header + records), our own record 2 included.
    got = cache.update(key, b"f" + EPOCH_1 + rec(1, 2), rec(2), 1, now=0.0)
    assert got == rec(1, 2) and cache.known(key, now=10.0) == (11, 8 + 16, 0)
    # Second fold: another worker appended 3, we append 4: the reply carries only 3.
    got = cache.update(key, b"d" + rec(3), rec(4), 0, now=10.0)
    assert got == rec(1, 2, 3, 4) and cache.known(key, now=20.0) == (11, 8 + 32, 0)
    assert (cache.full_reads, cache.delta_reads) == (1, 1)
    # An hour after the last refresh, the expiry is due again.
    assert cache.known(key, now=3600.0)[2] == 1


def test_cache_trims_its_copy_as_the_script_trimmed_the_buffer():
    cache = BufferCache()
    cache.update(b"k", b"f" + EPOCH_1 + rec(1, 2), rec(2), 1, now=0.0)
    # "D": new epoch -5, 8 bytes (record 1) dropped; nothing appended by others; we sent 3.
    got = cache.update(b"k", b"D" + struct.pack("<qq", -5, 8), rec(3), 0, now=1.0)
    assert got == rec(1, 2, 3)  # this fold still sees the records as they were before the trim
    assert cache.known(b"k", now=1.0) == (-5, 8 + 16, 0)  # the copy holds 2, 3 under the new epoch
    # New epoch 0: everything was garbage, the buffer is gone; so is the copy.
    cache.update(b"k", b"D" + struct.pack("<qq", 0, 24), b"", 0, now=2.0)
    assert cache.known(b"k", now=2.0) == (0, 0, 1) and cache.bytes == 0


def test_cache_evicts_the_least_recently_used_beyond_its_size():
    cache = BufferCache(max_bytes=40)
    cache.update(b"a", b"f" + EPOCH_1 + rec(1, 2), b"", 1, now=0.0)  # 16 bytes
    cache.update(b"b", b"f" + EPOCH_1 + rec(1, 2), b"", 1, now=0.0)  # 32
    cache.update(b"a", b"d", rec(3), 0, now=0.0)  # a used again: 24 + 16 = 40
    cache.update(b"c", b"f" + EPOCH_1 + rec(1), b"", 1, now=0.0)  # 48 > 40: b goes
    assert cache.known(b"b", now=0.0) == (0, 0, 1)
    assert cache.known(b"a", now=0.0)[1] == 8 + 24 and cache.bytes == 32
    # cache_bytes 0: nothing is kept, every fold reads whole buffers.
    off = BufferCache(max_bytes=0)
    off.update(b"a", b"f" + EPOCH_1 + rec(1), b"", 1, now=0.0)
    assert off.known(b"a", now=0.0) == (0, 0, 1)
