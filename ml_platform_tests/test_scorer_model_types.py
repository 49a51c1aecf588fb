"""Which scorer serves which model type, on real fitted models (small synthetic data, no Redis):
treelite for HistGradientBoosting and RandomForest (after their parity check), scikit-learn for a
LogisticRegression; whichever is chosen, the scores equal the Pipeline's predict_proba. Also the
one definition of the request-time features, shared by training and serving."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pytest

from ml_platform import features as fr
from ml_platform.serving.scorer import (
    EVENT_US,
    UnsupportedModel,
    build_scoring_path,
    parity_sample,
    reference_model_input,
    request_columns_from_rows,
    supports,
)
from ml_platform.serving.scoring import LoadedModel
from ml_platform.training.contract import ModelContract
from ml_platform.training.model_types import get_model_type

SMALL = {
    "hist_gradient_boosting": {"max_iter": 15},
    "random_forest": {"n_estimators": 15, "max_depth": 6},
    "logistic_regression": {},
}


@pytest.fixture(scope="module")
def contract():
    return ModelContract.from_features()


@pytest.fixture(scope="module")
def fitted(contract):
    """model type -> LoadedModel, each fitted on the same 1500 synthetic rows (labels depend on
    the amount, the hour and the category, so every model has something to learn)."""
    rows, looked_up = parity_sample(contract, None, 1500, seed=11)
    X = reference_model_input(contract, rows, looked_up)
    rng = np.random.default_rng(0)
    logit = 0.02 * (X["amount"].to_numpy() - 60) + 1.5 * X["is_night"].to_numpy() - 2.0
    logit += np.where(X["merchant_category"].to_numpy() == "x", 1.0, 0.0)
    y = (rng.random(len(X)) < 1 / (1 + np.exp(-logit))).astype(int)
    out = {}
    for i, (name, params) in enumerate(SMALL.items(), start=1):
        model = get_model_type(name).build(contract, params, random_state=0)
        model.fit(X, y)
        out[name] = LoadedModel(i, model, contract)
    return out


def _fresh_requests(contract, n: int = 300):
    """Requests the parity check never saw (another seed)."""
    return parity_sample(contract, None, n, seed=99)


@pytest.mark.parametrize(
    ("model_type", "expected"),
    [
        ("hist_gradient_boosting", "compiled+treelite"),
        ("random_forest", "compiled+treelite"),
        ("logistic_regression", "reference+sklearn"),
    ],
)
def test_the_scorer_is_chosen_by_model_type_and_scores_equal_predict_proba(fitted, contract, model_type, expected):
    loaded = fitted[model_type]
    assert supports(loaded.model) is (expected.endswith("treelite"))
    path = build_scoring_path(loaded)
    assert path.name == expected, path.reasons
    rows, looked_up = _fresh_requests(contract)
    want = loaded.model.predict_proba(reference_model_input(contract, rows, looked_up))[:, 1]
    assert len(set(np.round(want, 6))) > 10  # a model that answers one constant would prove nothing
    got = path.score(rows, looked_up).probabilities
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    request, columns = request_columns_from_rows(contract, rows, looked_up)
    np.testing.assert_allclose(path.score_columns(request, columns), want, rtol=0, atol=1e-9)


def test_a_logistic_regression_says_why_and_cannot_be_forced_onto_treelite(fitted):
    loaded = fitted["logistic_regression"]
    path = build_scoring_path(loaded)
    assert "LogisticRegression" in path.reasons[0] and "tree ensembles" in path.reasons[0]
    with pytest.raises(UnsupportedModel, match="LogisticRegression"):
        build_scoring_path(loaded, "treelite")
    assert build_scoring_path(fitted["random_forest"], "treelite").scorer == "treelite"


@pytest.mark.parametrize("model_type", sorted(SMALL))
def test_unseen_categories_are_found_for_every_model_type(fitted, contract, model_type):
    path = build_scoring_path(fitted[model_type])
    rows, looked_up = _fresh_requests(contract, 3)
    for row in rows:  # values of the training sample
        row.update(merchant_category="x", device="y", channel="x", country="DE")
    looked_up["home_country"] = ["FR", None, "DE"]  # a null is missing, not unseen
    rows[0]["merchant_category"] = "spaceships"
    rows[1].update(device="toaster", merchant_category="spaceships")
    looked_up["home_country"][2] = "Atlantis"
    unseen = path.unseen_values(path.score(rows, looked_up).inputs)
    assert unseen == [["merchant_category"], ["merchant_category", "device"], ["home_country"]]


def test_request_features_formulas():
    us = lambda ts: int((ts - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1_000_000)
    times = [datetime(2026, 3, 2, 5, 59, 59, tzinfo=UTC), datetime(2026, 3, 2, 6, tzinfo=UTC),
             datetime(2026, 3, 2, 23, 30, tzinfo=UTC), datetime(2026, 3, 3, 0, 0, tzinfo=UTC)]
    out = fr.request_features(
        amount=np.array([100.0, 50.0, 10.0, 7.0]),
        event_us=np.array([us(t) for t in times]),
        country=["DE", "FR", "US", "DE"],
        amount_mean_30d=np.array([25.0, 0.0, np.nan, -3.0]),
        home_country=["DE", "DE", None, float("nan")],
    )
    assert out["hour_of_day"].tolist() == [5, 6, 23, 0]
    assert out["is_night"].tolist() == [1, 0, 0, 1]
    assert out["amount_to_user_mean_30d"][0] == 4.0 and all(math.isnan(x) for x in out["amount_to_user_mean_30d"][1:])
    assert out["is_foreign"][:2].tolist() == [0.0, 1.0] and all(math.isnan(x) for x in out["is_foreign"][2:])


def test_training_and_serving_share_one_request_feature_definition(fitted, contract, monkeypatch):
    """Change the one definition: the training frame (add_request_features) and the serving
    columns (the fast scorer) both follow, so the compiled path stays valid and equal."""
    original = fr.request_features

    def night_until_seven(**columns):
        out = original(**columns)
        out["is_night"] = (out["hour_of_day"] <= 6).astype(np.int64)
        return out

    monkeypatch.setattr(fr, "request_features", night_until_seven)
    rows, looked_up = _fresh_requests(contract, 48)
    at_six = [i for i, r in enumerate(rows) if r[fr.EVENT_TS].hour == 6]
    assert at_six
    training = reference_model_input(contract, rows, looked_up)
    assert training["is_night"].iloc[at_six].tolist() == [1.0] * len(at_six)
    path = build_scoring_path(fitted["hist_gradient_boosting"])
    assert path.name == "compiled+treelite", path.reasons
    served = path.score(rows, looked_up).inputs["is_night"]
    assert [served[i] for i in at_six] == [1.0] * len(at_six)
    request, _ = request_columns_from_rows(contract, rows, looked_up)
    assert EVENT_US in request
