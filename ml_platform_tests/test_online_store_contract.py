"""The OnlineStore contract (online_store_contract.py) run on RedisOnlineStore against the real
Redis (127.0.0.1:6379 or ML_PLATFORM_TEST_REDIS_URL), each test under its own key prefix."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import redis.asyncio as aioredis
from fixtures_platform import TEST_REDIS_URL
from online_store_contract import OnlineStoreContract, check_flip_order, check_snapshot

from ml_platform.featurestore.online import RedisOnlineStore


class TestRedisOnlineStore(OnlineStoreContract):
    @pytest.fixture()
    def open_store(self, client):
        opened: list[RedisOnlineStore] = []

        def open_store(views, namespace):
            store = RedisOnlineStore(
                client, project=namespace, views=views, async_client=aioredis.Redis.from_url(TEST_REDIS_URL)
            )
            opened.append(store)
            return store

        yield open_store
        namespaces = {s.namespace for s in opened}
        for store in opened:
            store.close()
            with contextlib.suppress(RuntimeError):  # its connections may belong to a finished event loop
                asyncio.run(store.async_client.aclose())
        for namespace in namespaces:  # every test removed what it wrote
            assert list(client.scan_iter(match=namespace + "*")) == []


def test_the_snapshot_oracle_rejects_mixes():
    """The checks of the snapshot test can fail: a mixed view, a missing entity, B ahead of A."""
    cols = {"a": "a__x", "b": "b__x"}
    assert check_snapshot({"a__x": [2.0, 2.0], "b__x": [1.0, 1.0]}, cols) == {"a": 2.0, "b": 1.0}
    with pytest.raises(AssertionError, match="view a: one read mixed versions"):
        check_snapshot({"a__x": [1.0, 2.0], "b__x": [1.0, 1.0]}, cols)
    with pytest.raises(AssertionError, match="view b: an entity was missing"):
        check_snapshot({"a__x": [1.0, 1.0], "b__x": [1.0, None]}, cols)
    check_flip_order(3.0, 3.0)
    check_flip_order(3.0, 2.0)
    with pytest.raises(AssertionError, match="not one snapshot"):
        check_flip_order(2.0, 3.0)
    with pytest.raises(AssertionError, match="not one snapshot"):
        check_flip_order(4.0, 2.0)
