"""`membership.is_in`: Series.isin's answers on id columns, without pandas' per-value conversion."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ml_platform.membership import is_in


def test_hand_made_ids_keep_the_index_and_nulls_match_only_nulls():
    ids = pd.Series(["t1", "t2", None, "t4"], index=[10, 11, 12, 13], dtype="string")
    assert is_in(ids, pd.Series(["t2", "t4", "t9"], dtype="string")).to_dict() == {
        10: False, 11: True, 12: False, 13: True}
    assert is_in(ids, {"t1"}).tolist() == [True, False, False, False]
    assert is_in(ids, pd.Index(["t1", None])).tolist() == [True, False, True, False]
    assert is_in(ids, []).tolist() == [False] * 4
    assert is_in(pd.Series(["t1", "t2"], dtype=object), ["t2"]).tolist() == [False, True]


def test_no_cast_between_types_a_number_is_not_its_text():
    numbers = pd.Series([1, 2, 3])
    assert is_in(numbers, ["2"]).tolist() == [False, False, False]  # Arrow alone would cast "2" to 2
    assert is_in(numbers, [2, 3]).tolist() == [False, True, True]


def test_large_random_sets_answer_as_pandas_does():
    rng = np.random.default_rng(3)
    ids = pd.Series([f"tx{i}" for i in rng.integers(0, 50_000, 3_000)], dtype="string")
    among = pd.Series([f"tx{i}" for i in rng.integers(0, 50_000, 40_000)], dtype="string")
    expected = ids.isin(among)
    assert 0 < expected.sum() < len(ids)
    assert is_in(ids, among).equals(expected)
