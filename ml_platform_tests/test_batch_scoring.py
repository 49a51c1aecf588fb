"""Batch scoring of a daily partition into the DuckDB predictions table: the same scores as the
model on point-in-time features, an all-or-nothing swap per day, idempotent re-runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from datetime import date

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from threadpoolctl import threadpool_limits

from ml_platform import features as fr
from ml_platform.serving import batch_columns, batch_trees
from ml_platform.serving.batch import (
    PREDICTION_COLUMNS,
    PredictionsLockedError,
    read_predictions,
    read_scored_days,
    score_partition,
)
from ml_platform.serving.scoring import LoadedModel, assemble_features, load_champion

try:
    from fixtures_platform import tiny_platform  # a pytest fixture, used by name
except ImportError:  # ml_platform_tests imported as a package
    from ml_platform_tests.fixtures_platform import tiny_platform  # noqa: F401


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def champion(tiny_platform):
    return load_champion(tiny_platform.registry)


@pytest.fixture(scope="module")
def days(tiny_platform):
    """The two latest days with events: (yesterday, the day before)."""
    ts = pd.to_datetime(tiny_platform.events[fr.EVENT_TS], utc=True)
    last = sorted(set(ts.dt.date))[-2:]
    return last[1], last[0]


def day_events(platform, day: date) -> pd.DataFrame:
    ts = pd.to_datetime(platform.events[fr.EVENT_TS], utc=True)
    return platform.events[(ts.dt.date == day).to_numpy()].reset_index(drop=True)


def expected_scores(platform, model: LoadedModel, day: date) -> pd.DataFrame:
    """The reference: the training set's point-in-time lookup (build_training_frame's rule:
    features as of just before each event) + assemble_features + LoadedModel.predict_proba."""
    events = day_events(platform, day)
    lookup = events.copy()
    lookup[fr.EVENT_TS] = fr.feature_lookup_time(pd.to_datetime(events[fr.EVENT_TS], utc=True))
    looked_up = platform.store.get_historical_features(lookup, list(model.contract.feature_refs))
    frame = assemble_features(events, looked_up[list(model.contract.feature_columns)])
    out = events[["transaction_id", "user_id", "merchant_id", fr.EVENT_TS]].copy()
    out["score"] = model.predict_proba(frame)
    out["txn_count_24h"] = looked_up["txn_count_24h"].to_numpy()
    out["txn_count_30d"] = looked_up["txn_count_30d"].to_numpy()
    return out.sort_values("transaction_id").reset_index(drop=True)


def by_id(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("transaction_id").reset_index(drop=True)


@dataclass
class CrashingModel(LoadedModel):
    """A model whose scoring fails on its n-th chunk (a crash in the middle of a run)."""

    crash_on_call: int = 2
    calls: int = 0

    def predict_proba(self, features_frame):
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise RuntimeError(f"simulated crash while scoring chunk {self.calls}")
        return super().predict_proba(features_frame)


def test_scores_equal_the_model_on_point_in_time_features(tiny_platform, champion, days, tmp_path):
    day = days[0]
    db = tmp_path / "predictions.duckdb"
    result = score_partition(tiny_platform.store, champion, day, db, chunk_rows=50)
    expected = expected_scores(tiny_platform, champion, day)
    got = by_id(read_predictions(db, day))

    assert len(expected) > 100  # several chunks of 50
    assert result["rows"] == len(got) == len(expected)
    assert result["model_version"] == champion.version == 2 and result["table"] == "predictions"
    # the columnar path with the native trees served it (no silent fallback), bit for bit
    assert result["scorer"] == "compiled+native" and result["scorer_reasons"] == []
    assert list(got.columns) == list(PREDICTION_COLUMNS)
    assert got["transaction_id"].tolist() == expected["transaction_id"].tolist()
    np.testing.assert_array_equal(got["score"].to_numpy(), expected["score"].to_numpy())
    assert got["user_id"].tolist() == expected["user_id"].tolist()
    assert (got[fr.EVENT_TS] == pd.to_datetime(expected[fr.EVENT_TS], utc=True)).all()
    # The features were really looked up: many events follow another of the same card holder, and
    # many 30-day counts hold events of earlier days (the feature rows read from before the day).
    assert (expected["txn_count_24h"].fillna(0) > 0).mean() > 0.3
    assert (expected["txn_count_30d"].fillna(0) > expected["txn_count_24h"].fillna(0)).mean() > 0.3
    threshold = champion.contract.decision_threshold
    assert (got["decision"] == (got["score"] >= threshold)).all()
    assert result["positives_flagged"] == int(got["decision"].sum())
    assert (got["model_version"] == 2).all() and (got["day"] == pd.Timestamp(day)).all()
    assert got["scored_at"].nunique() == 1
    assert result["peak_rss_mb"] > 50
    # The phases are measured one after the other inside the call: each took time, none is counted
    # twice, and the rate is rows over the whole call.
    phases = [result[k] for k in ("load_s", "features_s", "score_s", "swap_s")]
    assert all(p > 0 for p in phases), phases
    assert sum(phases) <= result["seconds"] + 0.005
    assert result["rows_per_s"] == pytest.approx(result["rows"] / result["seconds"], rel=0.01)
    scored = read_scored_days(db)
    assert scored["day"].tolist() == [pd.Timestamp(day)] and scored["rows"].tolist() == [len(expected)]
    assert not list((tmp_path / ".predictions.duckdb.staging").iterdir())  # staging cleaned up


def test_a_model_with_another_contract_reads_its_own_features(tiny_platform, days, tmp_path):
    """v1 looks up only the card holder's views: its scores follow its own contract."""
    model, contract = tiny_platform.registry.load_model(1)
    v1 = LoadedModel(version=1, model=model, contract=contract)
    assert len(contract.feature_refs) < len(fr.MODEL_FEATURE_REFS)
    db = tmp_path / "p.duckdb"
    score_partition(tiny_platform.store, v1, days[1], db, chunk_rows=10_000)
    got = by_id(read_predictions(db, days[1]))
    expected = expected_scores(tiny_platform, v1, days[1])
    np.testing.assert_array_equal(got["score"].to_numpy(), expected["score"].to_numpy())
    assert (got["model_version"] == 1).all()


def test_rescoring_a_day_replaces_it_and_leaves_other_days(tiny_platform, champion, days, tmp_path):
    db = tmp_path / "p.duckdb"
    first = score_partition(tiny_platform.store, champion, days[0], db)
    score_partition(tiny_platform.store, champion, days[1], db)
    before = by_id(read_predictions(db, days[0]))
    other_before = by_id(read_predictions(db, days[1]))

    again = score_partition(tiny_platform.store, champion, str(days[0]), db, chunk_rows=64)
    after = by_id(read_predictions(db, days[0]))
    assert again["rows"] == first["rows"] == len(after)  # replaced, not appended
    assert after["transaction_id"].is_unique
    pd.testing.assert_frame_equal(after.drop(columns="scored_at"), before.drop(columns="scored_at"))
    assert (after["scored_at"] > before["scored_at"]).all()

    model, contract = tiny_platform.registry.load_model(1)
    score_partition(tiny_platform.store, LoadedModel(1, model, contract), days[0], db)
    replaced = by_id(read_predictions(db, days[0]))
    assert len(replaced) == len(before) and (replaced["model_version"] == 1).all()
    assert not np.array_equal(replaced["score"].to_numpy(), before["score"].to_numpy())
    pd.testing.assert_frame_equal(by_id(read_predictions(db, days[1])), other_before)
    assert len(read_predictions(db)) == len(replaced) + len(other_before)
    assert read_scored_days(db)["model_version"].tolist() == [2, 1]  # ordered by day


def test_a_crash_midway_leaves_the_previous_rows_of_the_day(tiny_platform, champion, days, tmp_path):
    db = tmp_path / "p.duckdb"
    first = score_partition(tiny_platform.store, champion, days[0], db)
    previous = by_id(read_predictions(db, days[0]))
    previous_runs = read_scored_days(db)
    # the day's prediction log file (next to the database by default)
    log_file = tmp_path / "predictions_log" / "source=batch" / f"date={days[0]}" / "predictions.parquet"
    assert first["log_path"] == str(log_file)
    previous_log = pq.read_table(log_file)
    assert previous_log.num_rows == len(previous) and set(
        previous_log.column("model_version").to_pylist()
    ) == {2}

    # the reference path (assemble_features + predict_proba) dies on its second chunk ...
    crashing = CrashingModel(version=7, model=champion.model, contract=champion.contract, crash_on_call=2)
    with pytest.raises(RuntimeError, match="simulated crash while scoring chunk 2"):
        score_partition(tiny_platform.store, crashing, days[0], db, chunk_rows=40, path="reference")
    assert crashing.calls == 2  # the first chunk was scored and staged, then the run died
    # ... and so does the compiled path (its trees fail on the third chunk)
    calls = []
    real_predict = batch_columns.ChunkScorer._predict

    def failing_predict(self, X):
        calls.append(len(X))
        if len(calls) == 4:  # 1: the first-chunk check, 2-3: chunks 1-2 staged
            raise RuntimeError("simulated crash in the trees")
        return real_predict(self, X)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batch_columns.ChunkScorer, "_predict", failing_predict)
        with pytest.raises(RuntimeError, match="simulated crash in the trees"):
            score_partition(
                tiny_platform.store,
                LoadedModel(7, champion.model, champion.contract),
                days[0],
                db,
                chunk_rows=40,
            )
    assert len(calls) == 4

    pd.testing.assert_frame_equal(by_id(read_predictions(db, days[0])), previous)
    assert (read_predictions(db)["model_version"] != 7).all()  # no partial new rows anywhere
    pd.testing.assert_frame_equal(read_scored_days(db), previous_runs)
    assert not list((tmp_path / ".p.duckdb.staging").iterdir())
    assert pq.read_table(log_file).equals(previous_log)  # the log file too: untouched
    assert [p.name for p in log_file.parent.iterdir()] == ["predictions.parquet"]  # its temp file removed

    # A swap that fails (the database refuses the day) leaves the log file untouched too.
    import ml_platform.serving.batch as batch_module

    def refused(*args, **kwargs):
        raise RuntimeError("simulated: the swap failed")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batch_module, "swap_partition", refused)
        with pytest.raises(RuntimeError, match="the swap failed"):
            score_partition(tiny_platform.store, champion, days[0], db)
    assert pq.read_table(log_file).equals(previous_log)
    assert [p.name for p in log_file.parent.iterdir()] == ["predictions.parquet"]

    # A first-ever run that crashes publishes nothing either.
    fresh = tmp_path / "fresh.duckdb"
    with pytest.raises(RuntimeError, match="simulated crash"):
        score_partition(
            tiny_platform.store,
            CrashingModel(7, champion.model, champion.contract, crash_on_call=1),
            days[0],
            fresh,
        )
    assert not fresh.exists() or read_predictions_or_empty(fresh).empty


def read_predictions_or_empty(path) -> pd.DataFrame:
    try:
        return read_predictions(path)
    except ValueError:
        return pd.DataFrame()


_HOLD_CODE = textwrap.dedent(
    """
    import sys, time, duckdb
    con = duckdb.connect(sys.argv[1], read_only=sys.argv[2] == "read")
    print("locked", flush=True)
    time.sleep(float(sys.argv[3]))
    con.close()
    """
)


def hold_database(path, mode: str, seconds: float) -> subprocess.Popen:
    """Another process holding the database open (a reader or a writer) for `seconds`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_CODE, str(path), mode, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_the_swap_waits_for_readers_and_a_held_lock_fails_cleanly(tiny_platform, champion, days, tmp_path):
    db = tmp_path / "p.duckdb"
    score_partition(tiny_platform.store, champion, days[0], db)
    previous = by_id(read_predictions(db, days[0]))

    # An application reading (read-only, for 1.5 s): the swap waits for it, then publishes.
    reader = hold_database(db, "read", 1.5)
    started = time.monotonic()
    result = score_partition(tiny_platform.store, champion, days[0], db, lock_timeout_s=30)
    reader.wait(10)
    assert time.monotonic() - started >= 1.0 and result["rows"] == len(previous)

    # Another writer holding the file past the timeout: a clear error, previous rows kept. (It
    # holds it until killed: the scoring before the swap may take seconds on a loaded machine.)
    writer = hold_database(db, "write", 600)
    try:
        with pytest.raises(PredictionsLockedError, match="read-only connections"):
            score_partition(tiny_platform.store, champion, days[0], db, lock_timeout_s=1)
    finally:
        writer.kill()
        writer.wait(15)
    after = by_id(read_predictions(db, days[0]))
    pd.testing.assert_frame_equal(after.drop(columns="scored_at"), previous.drop(columns="scored_at"))


def test_a_day_without_raw_events_is_a_clear_error(tiny_platform, champion, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no raw transactions for 1999-01-01 .*ingest that day"):
        score_partition(tiny_platform.store, champion, "1999-01-01", tmp_path / "p.duckdb")
    with pytest.raises(ValueError, match="not a date"):
        score_partition(tiny_platform.store, champion, "yesterday", tmp_path / "p.duckdb")
    with pytest.raises(FileNotFoundError, match="score a day first"):
        read_predictions(tmp_path / "missing.duckdb")
    day = "2026-01-01"
    with pytest.raises(ValueError, match="threads must be >= 1 .*got 0"):
        score_partition(tiny_platform.store, champion, day, tmp_path / "p.duckdb", threads=0)
    with pytest.raises(ValueError, match=r"path must be one of \('auto', 'reference'\), got 'fast'"):
        score_partition(tiny_platform.store, champion, day, tmp_path / "p.duckdb", path="fast")
    with pytest.raises(ValueError, match="chunk_rows must be >= 1, got 0"):
        score_partition(tiny_platform.store, champion, day, tmp_path / "p.duckdb", chunk_rows=0)


# --------------------------------------------------------------------------- the compiled path


def model_matrix(model: LoadedModel, platform, day: date) -> np.ndarray:
    """The Pipeline's own model matrix for the day's events (the reference features)."""
    events = day_events(platform, day)
    lookup = events.copy()
    lookup[fr.EVENT_TS] = fr.feature_lookup_time(pd.to_datetime(events[fr.EVENT_TS], utc=True))
    looked_up = platform.store.get_historical_features(lookup, list(model.contract.feature_refs))
    frame = assemble_features(events, looked_up[list(model.contract.feature_columns)])
    return np.asarray(model.model[:-1].transform(model.contract.model_input(frame)), dtype=np.float64)


def test_native_trees_give_scikit_learns_probabilities_bit_for_bit(tiny_platform, champion, days):
    """The C kernel against HistGradientBoosting's own predict_proba, on the day's real matrix and on
    rows made to take every odd branch: NaN in every column (the missing side), negative and unseen
    category codes (missing), values on the thresholds; on one and two threads."""
    classifier = champion.model[-1]
    trees = batch_trees.NativeTrees.of(classifier)
    assert trees is not None, "no C compiler on this machine? (the fallback is tested below)"
    nodes = np.concatenate([t.nodes for it in classifier._predictors for t in it])
    assert nodes["is_categorical"].any()  # the model has native categorical splits
    X = model_matrix(champion, tiny_platform, days[0])
    rng = np.random.default_rng(3)
    odd = X[rng.integers(0, len(X), 3000)].copy()
    split = nodes[~nodes["is_leaf"].astype(bool) & ~nodes["is_categorical"].astype(bool)]
    picks = rng.integers(0, len(split), 1000)
    odd[np.arange(1000), split["feature_idx"][picks]] = split["num_threshold"][
        picks
    ]  # exactly on a threshold
    odd[rng.random(odd.shape) < 0.15] = np.nan
    n_cat = len(champion.contract.categorical_features)  # the encoder emits the categoricals first
    cats = odd[:, :n_cat]
    cats[rng.random(cats.shape) < 0.1] = -1.0
    cats[rng.random(cats.shape) < 0.1] = 200.0  # a code no category has
    for matrix in (X, odd, np.asfortranarray(odd)):
        want = classifier.predict_proba(matrix)[:, 1]
        assert len(np.unique(want)) > 50
        for threads in (1, 2):
            got = trees.predict_proba(matrix, threads=threads)
            assert got.dtype == np.float64 and np.array_equal(got, want), (threads, np.abs(got - want).max())
        np.testing.assert_array_equal(trees.raw(matrix)[:, 0], classifier._raw_predict(matrix)[:, 0])


@pytest.mark.parametrize("leaves", [64, 65])
def test_native_trees_take_trees_of_up_to_64_leaves_exactly(leaves):
    """64 leaves fill every bit of a tree's leaf mask (the lowest and the highest); 65 do not fit,
    and the kernel declines (scikit-learn scores such a model)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(leaves)
    X = rng.normal(size=(6000, 6))
    X[:, 0] = rng.integers(0, 30, 6000)  # a categorical column
    X[rng.random(X.shape) < 0.1] = np.nan
    y = ((np.nan_to_num(X[:, 1]) + np.sin(3 * np.nan_to_num(X[:, 2])) + (X[:, 0] % 3 == 0)) > 0.5).astype(int)
    classifier = HistGradientBoostingClassifier(
        max_iter=20, max_leaf_nodes=leaves, min_samples_leaf=5, categorical_features=[0], random_state=0
    ).fit(X, y)
    trees = batch_trees.NativeTrees.of(classifier)
    most = max(t.get_n_leaf_nodes() for it in classifier._predictors for t in it)
    if leaves == 65:
        assert most == 65 and trees is None
        return
    assert most == 64 and trees is not None
    test = rng.normal(size=(3000, 6))
    test[:, 0] = rng.integers(-2, 40, 3000)  # negative and unseen categories too
    test[rng.random(test.shape) < 0.1] = np.nan
    assert np.array_equal(trees.predict_proba(test, threads=2), classifier.predict_proba(test)[:, 1])


def fitted_model(platform, contract, model_type: str, day: date, version: int) -> LoadedModel:
    """A `model_type` model fitted on the day's reference inputs (labels from the amount and hour)."""
    from ml_platform.training.model_types import get_model_type

    events = day_events(platform, day)
    lookup = events.copy()
    lookup[fr.EVENT_TS] = fr.feature_lookup_time(pd.to_datetime(events[fr.EVENT_TS], utc=True))
    looked_up = platform.store.get_historical_features(lookup, list(contract.feature_refs))
    X = contract.model_input(assemble_features(events, looked_up[list(contract.feature_columns)]))
    rng = np.random.default_rng(0)
    logit = 0.02 * (X["amount"].to_numpy() - 60) + 1.5 * X["is_night"].to_numpy() - 2.0
    y = (rng.random(len(X)) < 1 / (1 + np.exp(-logit))).astype(int)
    params = {"random_forest": {"n_estimators": 10, "max_depth": 6}}.get(model_type, {})
    model = get_model_type(model_type).build(contract, params, random_state=0)
    model.fit(X, y)
    return LoadedModel(version=version, model=model, contract=contract)


@pytest.mark.parametrize(
    ("model_type", "scorer"),
    [("logistic_regression", "reference+sklearn"), ("random_forest", "compiled+sklearn")],
)
def test_models_without_native_trees_score_exactly_too(
    tiny_platform, champion, days, tmp_path, model_type, scorer
):
    """A logistic regression (one-hot Pipeline: the reference path) and a random forest (the column-wise
    matrix, scikit-learn's trees) publish exactly their predict_proba on point-in-time features."""
    model = fitted_model(tiny_platform, champion.contract, model_type, days[1], version=5)
    db = tmp_path / "p.duckdb"
    # a linear model's matrix product rounds differently with the batch size (BLAS blocking): one
    # chunk for it; trees score each row alone, so the forest is scored in chunks of 70
    chunk_rows = 10_000 if model_type == "logistic_regression" else 70
    result = score_partition(tiny_platform.store, model, days[0], db, chunk_rows=chunk_rows)
    assert result["scorer"] == scorer, result["scorer_reasons"]
    got = by_id(read_predictions(db, days[0]))
    expected = expected_scores(tiny_platform, model, days[0])
    assert len(np.unique(expected["score"])) > 20
    np.testing.assert_array_equal(got["score"].to_numpy(), expected["score"].to_numpy())


def test_a_compiled_path_that_disagrees_is_refused_on_the_first_rows(tiny_platform, champion, days, tmp_path):
    """A column-wise encoding that codes one category wrong would publish wrong scores: the first
    chunk's check against the reference path sees it and the day takes the reference path."""
    real_codes = batch_columns._codes

    def wrong_codes(values, table, unknown, missing):
        out = real_codes(values, table, unknown, missing)
        out[out == 0.0] = 1.0  # the first category of every column read as the second
        return out

    db = tmp_path / "p.duckdb"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batch_columns, "_codes", wrong_codes)
        result = score_partition(tiny_platform.store, champion, days[0], db, chunk_rows=60)
    assert result["scorer"] == "reference+sklearn"
    assert any("model matrix differs" in r for r in result["scorer_reasons"]), result["scorer_reasons"]
    expected = expected_scores(tiny_platform, champion, days[0])
    np.testing.assert_array_equal(
        by_id(read_predictions(db, days[0]))["score"].to_numpy(), expected["score"].to_numpy()
    )


def test_without_a_c_compiler_the_classifier_scores_the_matrix(tiny_platform, champion, days, tmp_path):
    db = tmp_path / "p.duckdb"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batch_trees, "_compiled", lambda: None)
        result = score_partition(tiny_platform.store, champion, days[0], db)
    assert result["scorer"] == "compiled+sklearn"
    expected = expected_scores(tiny_platform, champion, days[0])
    np.testing.assert_array_equal(
        by_id(read_predictions(db, days[0]))["score"].to_numpy(), expected["score"].to_numpy()
    )


def test_the_log_is_the_same_whichever_path_scored(tiny_platform, champion, days, tmp_path):
    """The prediction log of the compiled path equals the reference path's, column by column (typed
    model inputs with nulls, request fields, decisions), but for how and when it ran."""
    logs = {}
    for path in ("auto", "reference"):
        result = score_partition(
            tiny_platform.store,
            champion,
            days[0],
            tmp_path / f"{path}.duckdb",
            chunk_rows=90,
            log_dir=tmp_path / f"log_{path}",
            path=path,
        )
        logs[path] = (
            pq.read_table(result["log_path"]).to_pandas().sort_values("transaction_id", ignore_index=True)
        )
    auto, reference = logs["auto"], logs["reference"]
    assert (auto["scorer"] == "compiled+native").all() and (reference["scorer"] == "reference+sklearn").all()
    assert list(auto.columns) == list(reference.columns)
    nulls = auto.filter(like="feature.").isna().sum()
    assert nulls.sum() > 0, "no null input: the comparison would not see NaN logged instead of null"
    same = [c for c in auto.columns if c not in ("scorer", "latency_ms", "predicted_at")]
    pd.testing.assert_frame_equal(auto[same], reference[same])
    assert (auto["latency_ms"] > 0).all()
