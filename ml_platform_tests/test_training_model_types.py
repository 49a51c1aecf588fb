"""Model types: each one trains, evaluates, registers in MLflow with its params, and loads back
predicting exactly what it predicted before registering; bad choices fail naming the field."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score
from threadpoolctl import threadpool_limits

from ml_platform.features import LABEL
from ml_platform.training import (
    DEFAULT_MODEL_TYPE,
    MODEL_TYPES,
    ModelContract,
    data_version,
    evaluate,
    fraud_probability,
    time_split,
    train_model,
)

try:  # the shared synthetic frame lives with the training tests
    from test_training import synthetic_training_frame
except ImportError:  # ml_platform_tests imported as a package
    from ml_platform_tests.test_training import synthetic_training_frame

# Small but real settings per type, so the whole file trains in seconds.
SMALL = {
    "hist_gradient_boosting": {"max_iter": 30, "learning_rate": 0.2},
    "logistic_regression": {"C": 0.5},
    "random_forest": {"n_estimators": 20, "max_depth": 8},
}
# The param each type must log to MLflow (only that type has it).
OWN_PARAM = {
    "hist_gradient_boosting": "max_leaf_nodes",
    "logistic_regression": "C",
    "random_forest": "n_estimators",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def split():
    return time_split(synthetic_training_frame(n=2500, seed=3), train_frac=0.6, val_frac=0.2)


@pytest.fixture(scope="module")
def trained(split):
    return {
        name: train_model(split.train, split.validation, params=SMALL[name], model_type=name)
        for name in MODEL_TYPES
    }


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    from ml_platform.registry import ModelRegistry

    root = tmp_path_factory.mktemp("model_types")
    return ModelRegistry(f"sqlite:///{root / 'mlflow.db'}", "fraud_detector_types")


def test_the_registry_has_the_three_types_and_hgb_is_the_default():
    assert DEFAULT_MODEL_TYPE == "hist_gradient_boosting"
    assert {"hist_gradient_boosting", "logistic_regression", "random_forest"} <= set(MODEL_TYPES)
    assert set(SMALL) == set(MODEL_TYPES), "a new model type needs a case in this file"
    contract = ModelContract.from_features()
    assert contract.model_type == DEFAULT_MODEL_TYPE  # contracts written before model types existed
    classifiers = {name: type(t.build(contract)[-1]).__name__ for name, t in MODEL_TYPES.items()}
    assert classifiers == {
        "hist_gradient_boosting": "HistGradientBoostingClassifier",
        "logistic_regression": "LogisticRegression",
        "random_forest": "RandomForestClassifier",
    }


@pytest.mark.parametrize("name", sorted(SMALL))
def test_each_type_learns_the_signal_and_records_itself_in_the_contract(trained, split, name):
    model, contract = trained[name]
    assert contract.model_type == name
    assert type(model[-1]).__name__ in {
        "HistGradientBoostingClassifier",
        "LogisticRegression",
        "RandomForestClassifier",
    }
    y = split.test[LABEL].to_numpy()
    p = fraud_probability(model, contract, split.test)
    assert np.all((p >= 0) & (p <= 1))
    # Far above the base rate (what a model that learnt nothing scores), from sklearn directly.
    assert average_precision_score(y, p) > 3 * y.mean()
    assert evaluate(model, contract, split.test)["pr_auc"] == pytest.approx(average_precision_score(y, p))
    # The categories recorded are exactly those of the train split, nulls excluded.
    assert contract.known_categories["merchant_category"] == ("electronics", "fuel", "grocery", "travel")
    assert contract.known_categories["home_country"] == tuple(
        sorted(split.train["home_country"].dropna().unique())
    )
    assert set(contract.known_categories) == set(contract.categorical_features)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_each_type_scores_unseen_categories_and_missing_values(trained, split, name):
    model, contract = trained[name]
    rows = split.test.head(20).copy()
    rows["merchant_category"] = "spaceships"
    rows["home_country"] = None
    rows["amount_mean_30d"] = np.nan
    rows["txn_count_1h"] = np.nan
    p = fraud_probability(model, contract, rows)
    assert p.shape == (20,) and np.all(np.isfinite(p))
    flags = contract.unseen_categories(rows)
    assert flags["merchant_category"].all()
    assert not flags["home_country"].any()  # null is missing, not unseen
    assert not flags["country"].any()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_each_type_registers_and_loads_back_with_the_same_scores(trained, split, registry, name):
    model, contract = trained[name]
    before = model.predict_proba(contract.model_input(split.test))
    registered = registry.log_and_register(
        model,
        contract,
        metrics={"test": evaluate(model, contract, split.test)},
        params={**MODEL_TYPES[name].validate_params(SMALL[name]), "random_state": 0},
        data_version=data_version(split.train),
        code_version="test-sha",
        training_frame_sample=split.train.head(20),
        run_name=name,
        who="tester",
    )
    loaded, loaded_contract = registry.load_model(registered.version)
    assert type(loaded[-1]) is type(model[-1])
    np.testing.assert_array_equal(loaded.predict_proba(loaded_contract.model_input(split.test)), before)
    assert loaded_contract == contract.with_registration(registry.model_name, registered.version)
    assert loaded_contract.model_type == name
    run = registry.client.get_run(registered.run_id)
    assert run.data.params["model_type"] == name == run.data.tags["model_type"]
    assert run.data.params[OWN_PARAM[name]] == str(
        MODEL_TYPES[name].validate_params(SMALL[name])[OWN_PARAM[name]]
    )
    others = {OWN_PARAM[t] for t in OWN_PARAM if t != name} - set(MODEL_TYPES[name].default_params)
    assert not others & set(run.data.params), "another type's params leaked into this run"
    assert registered.tags["model_type"] == name


def test_an_unknown_model_type_names_the_field_the_value_and_the_known_types(split):
    with pytest.raises(ValueError) as err:
        train_model(split.train, split.validation, model_type="xgboost")
    message = str(err.value)
    assert "model_type = 'xgboost'" in message
    for known in MODEL_TYPES:
        assert known in message


def test_train_candidate_refuses_an_unknown_type_before_reading_data(tmp_path):
    from ml_platform.training.pipeline import train_candidate

    # No training set exists in tmp_path: the type is checked first, so the error is about it.
    with pytest.raises(ValueError, match=r"model_type = 'svm' is not a known model type"):
        train_candidate(tmp_path, model_type="svm")


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("logistic_regression", {"C": -1.0}, r"params\.C = -1\.0: Input should be greater than 0"),
        (
            "random_forest",
            {"n_trees": 5},
            r"params\.n_trees = 5 is not a parameter of model_type 'random_forest'",
        ),
        ("hist_gradient_boosting", {"max_categories": 300}, r"params\.max_categories = 300"),
        ("random_forest", {"max_features": "all"}, r"params\.max_features"),
    ],
)
def test_bad_params_name_the_param_and_the_value(split, name, params, expected):
    with pytest.raises(ValueError, match=expected):
        train_model(split.train, split.validation, params=params, model_type=name)


def test_validated_params_fill_in_the_defaults_and_keep_overrides():
    rf = MODEL_TYPES["random_forest"]
    params = rf.validate_params({"n_estimators": 7})
    assert params["n_estimators"] == 7
    assert params["min_samples_leaf"] == rf.default_params["min_samples_leaf"] == 20
    model = rf.build(ModelContract.from_features(), {"n_estimators": 7}, random_state=5)
    assert model[-1].n_estimators == 7 and model[-1].random_state == 5


# --- known categories in the contract ---------------------------------------------------------


def test_known_categories_round_trip_and_flag_single_rows(trained):
    _, contract = trained["logistic_regression"]
    again = ModelContract.from_json(contract.to_json())
    assert again == contract and again.known_categories == contract.known_categories
    row = {
        "merchant_category": "spaceships",
        "country": "DE",
        "device": "web",
        "channel": "pos",
        "home_country": None,
    }
    assert contract.unseen_category_columns(row) == ["merchant_category"]
    assert contract.unseen_category_columns({**row, "merchant_category": "fuel", "device": "fax"}) == [
        "device"
    ]
    assert contract.unseen_category_columns({**row, "merchant_category": float("nan")}) == []


def test_contracts_without_known_categories_flag_nothing_and_bad_ones_are_refused():
    old = ModelContract.from_features().to_dict()
    del old["known_categories"], old["model_type"]  # as written before this field existed
    contract = ModelContract.from_dict(old)
    assert contract.known_categories == {} and contract.model_type == DEFAULT_MODEL_TYPE
    assert contract.unseen_categories(pd.DataFrame({"merchant_category": ["spaceships"]})) == {}
    with pytest.raises(ValueError, match=r"known_categories has columns \['amount'\]"):
        ModelContract.from_dict({**old, "known_categories": {"amount": ["1"]}})
