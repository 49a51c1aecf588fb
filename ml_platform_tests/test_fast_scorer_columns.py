"""The fast scorer's compiled path on a real trained model, given rows (`ScoringPath.score`, the HTTP
API) and columns (`score_columns`, the stream worker): the same matrix and probabilities either
way, on a realistic batch with nulls, unknown categories, zero / negative means and hour
boundaries, within tolerance of scikit-learn; the reference path's row fallback; and the parity
check that turns a wrong column-assembly step off."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from ml_platform import features as fr
from ml_platform.featurestore.definitions import parse_feature_ref
from ml_platform.serving.scorer import (
    EVENT_US,
    PARITY_TOLERANCE,
    build_scoring_path,
    float_column,
    model_input_columns,
    request_columns_from_rows,
)
from ml_platform.serving.scorer import columns as scorer_columns
from ml_platform.serving.scoring import LoadedModel, assemble_features

try:  # ml_platform_tests on sys.path (rootdir conftest) or imported as a package
    from fixtures_platform import tiny_platform
except ImportError:
    from ml_platform_tests.fixtures_platform import tiny_platform  # noqa: F401

N = 400
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Times around hour boundaries (night ends at 06:00 UTC), then arbitrary times of the day.
BOUNDARY_TIMES = [
    datetime(2026, 3, 2, 5, 59, 59, 999_999, tzinfo=UTC),
    datetime(2026, 3, 2, 6, 0, 0, tzinfo=UTC),
    datetime(2026, 3, 2, 23, 59, 59, 999_999, tzinfo=UTC),
    datetime(2026, 3, 3, 0, 0, 0, tzinfo=UTC),
]
# Looked-up features the stream folds itself (given to score_columns as float64 arrays); the
# others are read from the online store (given as lists of int / float / str / None).
STREAM_FOLDED_VIEWS = (fr.user_transaction_stats, fr.merchant_transaction_stats, fr.user_merchant_stats)
STREAM_FOLDED = {parse_feature_ref(r)[1] for v in STREAM_FOLDED_VIEWS for r in v.feature_refs()}


def _loaded(platform, version: int) -> LoadedModel:
    model, contract = platform.registry.load_model(version)
    return LoadedModel(version, model, contract)


def _batch(platform, contract, seed: int = 0) -> tuple[list[dict], dict[str, list], dict, dict]:
    """A batch of real card holder / merchant pairs (and a few unknown ones) with their online
    features, in both forms: (rows, looked-up lists) for `score` and (request, looked-up columns)
    for `score_columns`. It has nulls, unknown and missing categories, zero / negative / unparsable
    means and events on both sides of hour boundaries."""
    rng = random.Random(seed)
    pairs = platform.events[["user_id", "merchant_id"]].drop_duplicates()
    pairs = pairs.sample(n=N - 10, random_state=seed).itertuples(index=False)
    entities = [(int(u), int(m)) for u, m in pairs] + [(10**12 + i, 10**12 + i) for i in range(10)]
    answer = platform.online.read(
        list(contract.feature_refs), [{"user_id": u, "merchant_id": m} for u, m in entities]
    )
    looked_up = {c: list(answer[c]) for c in contract.feature_columns}
    assert any(v is not None for v in looked_up["amount_mean_30d"])  # real features were read

    day = datetime(2026, 3, 2, tzinfo=UTC)
    times = BOUNDARY_TIMES + [
        day + timedelta(microseconds=rng.randrange(86_400_000_000)) for _ in range(N - 4)
    ]
    rows = [
        {
            "amount": round(rng.lognormvariate(3.5, 1.2), 2),
            "merchant_category": rng.choice(["grocery", "electronics", "travel", "brand_new_category"]),
            "country": rng.choice(["DE", "FR", "US", "GB", "ZZ"]),
            "device": rng.choice(["ios", "android", "desktop", "toaster"]),
            "channel": rng.choice(["online", "pos"]),
            fr.EVENT_TS: ts,
        }
        for ts in times
    ]
    rows[5]["device"] = None  # a missing category in the request
    means = looked_up["amount_mean_30d"]
    means[0], means[1], means[2], means[3] = 0.0, -5.0, None, "not a number"
    means[4] = "12.5"  # a parsable string: 12.5, as the row path's float() reads it
    homes = looked_up["home_country"]
    homes[0], homes[1] = None, rows[1]["country"]
    homes[2] = rows[2]["country"] + "X"
    looked_up["account_age_days"][3] = None
    looked_up["account_age_days"][4] = "30"

    request = {
        "amount": np.array([r["amount"] for r in rows], dtype=np.float64),
        EVENT_US: np.array([(r[fr.EVENT_TS] - EPOCH) // timedelta(microseconds=1) for r in rows]),
        **{c: [r[c] for r in rows] for c in ("merchant_category", "country", "device", "channel")},
    }
    # The mean (with its odd values) as a list, the stream's other features as float64 arrays.
    arrays = STREAM_FOLDED - {"amount_mean_30d"}
    columns = {c: np.array(v, dtype=np.float64) if c in arrays else v for c, v in looked_up.items()}
    assert any(isinstance(v, np.ndarray) for v in columns.values())
    assert any(isinstance(v, list) and c not in contract.categorical_features for c, v in columns.items())
    return rows, looked_up, request, columns


def _reference(loaded: LoadedModel, rows: list[dict], looked_up: dict[str, list]) -> np.ndarray:
    """assemble_features + the scikit-learn Pipeline: no fast path anywhere."""
    return loaded.predict_proba(assemble_features(pd.DataFrame(rows), looked_up))


@pytest.mark.parametrize("version", [1, 2])
def test_score_columns_equals_the_row_path_exactly(tiny_platform, version):
    loaded = _loaded(tiny_platform, version)
    path = build_scoring_path(loaded)
    assert (path.features, path.scorer) == ("compiled", "treelite"), path.reasons
    assert (path.features, path.scorer, path.columnar) == ("compiled", "treelite", True)
    assert path.describe()["columnar"] is True
    rows, looked_up, request, columns = _batch(tiny_platform, loaded.contract, seed=version)

    got = path.score_columns(request, columns)
    want = path.score(rows, looked_up).probabilities
    assert got.dtype == np.float64 and got.shape == (N,)
    np.testing.assert_array_equal(got, want)
    assert np.max(np.abs(got - _reference(loaded, rows, looked_up))) < PARITY_TOLERANCE

    # The model matrix itself is bit-identical whether the batch came as rows (datetimes, lists)
    # or as columns (int µs, float64 arrays).
    numeric, categorical = model_input_columns(loaded.contract, request, columns)
    matrix = path._layout.encode_columns(numeric, categorical)
    from_rows = model_input_columns(loaded.contract, *request_columns_from_rows(loaded.contract, rows, looked_up))
    assert np.array_equal(matrix, path._layout.encode_columns(*from_rows), equal_nan=True)

    # ... and holds the values the formulas give.
    assert numeric["hour_of_day"][:4].tolist() == [5.0, 6.0, 23.0, 0.0]
    assert numeric["is_night"][:4].tolist() == [1.0, 0.0, 0.0, 1.0]
    ratio = numeric["amount_to_user_mean_30d"]
    assert all(math.isnan(x) for x in ratio[:4])  # mean 0, negative, null, unparsable
    assert ratio[4] == request["amount"][4] / 12.5
    assert math.isnan(numeric["is_foreign"][0]) and numeric["is_foreign"][1:3].tolist() == [0.0, 1.0]
    assert math.isnan(numeric["account_age_days"][3]) and numeric["account_age_days"][4] == 30.0
    j = path._layout.columns.index("device")
    devices = request["device"]
    unseen = [i for i, d in enumerate(devices) if d == "toaster"]
    known = [i for i, d in enumerate(devices) if d in ("ios", "android", "desktop")]
    assert unseen and known
    assert np.array_equal(matrix[5, j], path._layout.missing_code[j], equal_nan=True)  # None
    assert np.array_equal(
        matrix[unseen, j], np.full(len(unseen), path._layout.unknown_code[j]), equal_nan=True
    )
    assert not np.isnan(matrix[known, j]).any() and len(set(matrix[known, j].tolist())) == 3


def test_reference_path_scores_columns_row_by_row(tiny_platform):
    loaded = _loaded(tiny_platform, 2)
    path = build_scoring_path(loaded, "sklearn")
    assert path.name == "reference+sklearn" and not path.columnar
    rows, looked_up, request, columns = _batch(tiny_platform, loaded.contract, seed=7)

    got = path.score_columns(request, columns)
    assert got.shape == (N,)
    np.testing.assert_allclose(got, _reference(loaded, rows, looked_up), rtol=0, atol=1e-9)
    fast = build_scoring_path(loaded).score_columns(request, columns)
    assert np.max(np.abs(got - fast)) < PARITY_TOLERANCE


def test_a_wrong_column_assembly_step_is_caught_and_the_reference_features_are_used(tiny_platform, monkeypatch):
    loaded = _loaded(tiny_platform, 2)
    to_us = scorer_columns.to_us
    # a time-zone bug: event times read one hour late
    monkeypatch.setattr(scorer_columns, "to_us", lambda ts: to_us(ts) + 3_600_000_000)

    path = build_scoring_path(loaded)
    assert (path.features, path.scorer) == ("reference", "treelite")  # treelite itself is fine
    assert path.columnar is False and path.describe()["columnar"] is False
    assert "compiled request features differ" in path.reasons[-1] and "hour_of_day" in path.reasons[-1]

    rows, looked_up, request, columns = _batch(tiny_platform, loaded.contract, seed=3)
    reference = _reference(loaded, rows, looked_up)
    assert np.max(np.abs(path.score_columns(request, columns) - reference)) < PARITY_TOLERANCE
    assert np.max(np.abs(path.score(rows, looked_up).probabilities - reference)) < PARITY_TOLERANCE


def test_float_columns_read_values_as_pandas_to_numeric_does():
    values = [None, 1.5, 3, True, "12.5", " 7 ", "abc", float("nan"), [1.0], np.float32(0.5)]
    got = float_column(values, len(values))
    want = [math.nan, 1.5, 3.0, 1.0, 12.5, 7.0, math.nan, math.nan, math.nan, 0.5]
    assert np.array_equal(got, np.array(want), equal_nan=True)
    assert float_column(["1", "2.5", None], 3).tolist()[:2] == [1.0, 2.5]  # numpy's whole-column path
    assert math.isnan(float_column(["1", "2.5", None], 3)[2])
    ints = np.array([1, 2, 3], dtype=np.int64)
    assert float_column(ints, 3).tolist() == [1.0, 2.0, 3.0]
