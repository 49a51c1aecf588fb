"""The serving host's local model copies: what is kept, what is pruned, what an alias serves."""

from __future__ import annotations

import time

from ml_platform.serving.model_cache import ModelCache


def stage(cache: ModelCache, version: int) -> None:
    staged = cache.staging_dir()
    (staged / "model").mkdir()
    (staged / "contract.json").write_text("{}")
    cache.commit(version, staged)
    time.sleep(0.02)  # each copy strictly newer than the one before


def test_copies_beyond_the_newest_three_are_pruned_unless_an_alias_names_them(tmp_path):
    cache = ModelCache(tmp_path, "m")
    stage(cache, 1)
    cache.point("champion", 1)  # v1 stays: the champion names it
    for version in range(2, 7):
        stage(cache, version)
    assert sorted(cache.versions()) == [1, 4, 5, 6]
    assert cache.prune(keep=1) == [5, 4]
    assert sorted(cache.versions()) == [1, 6]
    assert not list(cache.dir.glob(".staging-*"))  # nothing half made is left


def test_a_copy_already_held_is_kept_and_the_second_staging_dropped(tmp_path):
    cache = ModelCache(tmp_path, "m")
    stage(cache, 2)
    (cache.dir / "v2" / "marker").write_text("first")
    stage(cache, 2)
    assert (cache.dir / "v2" / "marker").read_text() == "first"
    assert not list(cache.dir.glob(".staging-*"))
    assert cache.load("champion") is None  # no alias recorded: nothing to serve from here
