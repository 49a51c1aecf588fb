"""The MLflow registry on a real SQLite store: lineage, promotion by alias, rollback, audit trail."""

from __future__ import annotations

import getpass
import json
import operator
import os
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from ml_platform.features import LABEL
from ml_platform.training import ModelContract, data_version, evaluate, time_split, train_model

try:  # the shared synthetic frame lives with the training tests
    from test_training import FAST, synthetic_training_frame
except ImportError:  # ml_platform_tests imported as a package
    from ml_platform_tests.test_training import FAST, synthetic_training_frame

MODEL = "fraud_detector"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One OpenMP thread: on this shared 2-core machine HGB fit/predict are ~10x faster than with 2."""
    with threadpool_limits(limits=1):
        yield


# The weaker model lacks txn_count_1h (the strongest signal): only profile refs + request features.
PROFILE_REFS = ["user_profile:account_age_days", "user_profile:home_country"]


@pytest.fixture(scope="module")
def trained():
    """Three in-memory models on the same split: weak (shuffled labels), medium (fewer inputs), good."""
    frame = synthetic_training_frame(n=3000, seed=1)
    split = time_split(frame, train_frac=0.6, val_frac=0.2)
    medium = train_model(
        split.train, split.validation, ModelContract.from_features(feature_refs=PROFILE_REFS), params=FAST
    )
    rng = np.random.default_rng(7)
    shuffled = split.train.assign(**{LABEL: rng.permutation(split.train[LABEL].to_numpy())})
    weak = train_model(shuffled, split.validation, params=FAST)
    good = train_model(split.train, split.validation, params=FAST)
    return split, {"medium": medium, "weak": weak, "good": good}


@pytest.fixture(scope="module")
def registry_with_versions(tmp_path_factory, trained):
    """v1 medium, v2 weak, v3 good, v4 good again (same seed), all registered, none promoted."""
    from ml_platform.registry import ModelRegistry

    root = tmp_path_factory.mktemp("registry")
    registry = ModelRegistry(f"sqlite:///{root / 'mlflow' / 'mlflow.db'}", MODEL)
    split, models = trained
    versions = {}
    for number, name in enumerate(["medium", "weak", "good", "good"], start=1):
        model, contract = models[name]
        registered = registry.log_and_register(
            model,
            contract,
            metrics={"test": evaluate(model, contract, split.test)},
            params={**FAST, "random_state": 0},
            data_version=data_version(split.train),
            code_version="test-sha",
            training_frame_sample=split.train.head(50),
            run_name=f"{name}-{number}",
            who="trainer",
        )
        assert registered.version == number
        versions[number] = registered
    return root, registry, versions


def test_promotion_lifecycle_and_alias_history(registry_with_versions, trained):
    _, registry, _ = registry_with_versions
    split, models = trained
    heldout = split.test
    pr_auc = {name: evaluate(m, c, heldout)["pr_auc"] for name, (m, c) in models.items()}
    assert pr_auc["weak"] < pr_auc["medium"] < pr_auc["good"]

    # The first version becomes champion: there is nothing to beat.
    assert registry.champion() is None
    first = registry.promote_if_better(1, heldout, who="alice", why="first model")
    assert first.promoted and first.reason == "no champion yet" and first.champion_version_before is None
    assert first.challenger_metric == pytest.approx(pr_auc["medium"])
    assert registry.champion().version == 1

    # A worse challenger is not promoted; the champion is scored through its own (smaller) contract.
    worse = registry.promote_if_better(2, heldout, who="alice")
    assert not worse.promoted
    assert worse.challenger_metric == pytest.approx(pr_auc["weak"])
    assert worse.champion_metric == pytest.approx(pr_auc["medium"])
    assert registry.champion().version == 1
    assert json.loads(registry.get_version(2).tags["promotion_decision"])["promoted"] is False

    # A better one is promoted only if its gain is strictly greater than the margin.
    gain = pr_auc["good"] - pr_auc["medium"]
    assert gain > 0.01  # the fixture's premise, from metrics computed on the in-memory models
    assert not registry.promote_if_better(3, heldout, margin=1.0, who="alice").promoted
    at_margin = registry.promote_if_better(3, heldout, margin=gain, who="alice")
    assert not at_margin.promoted and "<= required margin" in at_margin.reason
    assert registry.champion().version == 1
    better = registry.promote_if_better(3, heldout, margin=0.01, who="bob", why="better PR AUC")
    assert better.promoted and better.champion_version_before == 1
    assert better.challenger_metric == pytest.approx(pr_auc["good"])
    assert better.champion_metric == pytest.approx(pr_auc["medium"])
    assert registry.champion().version == 3
    assert registry.get_version("previous-champion").version == 1

    # An equally good challenger (the same model again) keeps the champion at the default margin:
    # re-training on identical data must not churn the registry or the audit trail.
    moves_before = len(registry.alias_history())
    same = registry.promote_if_better(4, heldout, who="bob")
    assert not same.promoted and same.margin == 0.0
    assert same.challenger_metric == same.champion_metric == pytest.approx(pr_auc["good"])
    assert "improvement +0.0000 <= required margin 0.0000" in same.reason and "tie" in same.reason
    assert registry.champion().version == 3 and len(registry.alias_history()) == moves_before
    # A negative margin accepts a challenger that is not worse by more than it: here, the tie.
    assert registry.promote_if_better(4, heldout, margin=-0.001, who="bob").promoted
    assert registry.champion_lineage() == [1, 3, 4]

    # Rollbacks walk back through the lineage and keep previous-champion one step behind.
    assert registry.rollback(who="carol", why="alert on v4") == (4, 3)
    assert registry.champion().version == 3 and registry.get_version("previous-champion").version == 1
    assert registry.rollback(who="carol", why="still bad") == (3, 1)
    assert registry.champion().version == 1
    assert "previous-champion" not in registry.get_version(1).aliases
    with pytest.raises(RuntimeError, match="v1 has no previous champion"):
        registry.rollback(who="carol")
    assert registry.champion().version == 1

    moves = [
        (r["alias"], r["from_version"], r["to_version"], r["action"], r["who"])
        for r in registry.alias_history()
    ]
    assert moves == [
        ("challenger", None, 1, "register", "trainer"),
        ("challenger", 1, 2, "register", "trainer"),
        ("challenger", 2, 3, "register", "trainer"),
        ("challenger", 3, 4, "register", "trainer"),
        ("champion", None, 1, "promote", "alice"),
        ("previous-champion", None, 1, "promote", "bob"),
        ("champion", 1, 3, "promote", "bob"),
        ("previous-champion", 1, 3, "promote", "bob"),
        ("champion", 3, 4, "promote", "bob"),
        ("champion", 4, 3, "rollback", "carol"),
        ("previous-champion", 3, 1, "rollback", "carol"),
        ("champion", 3, 1, "rollback", "carol"),
        ("previous-champion", 1, None, "rollback", "carol"),
    ]
    history = registry.alias_history()
    assert [r["seq"] for r in history] == list(range(1, 14))
    assert history[4]["why"] == "first model" and history[6]["why"] == "better PR AUC"
    assert history[-1]["why"] == "still bad"
    assert all(datetime.fromisoformat(r["when"]).utcoffset().total_seconds() == 0 for r in history)
    assert [r["seq"] for r in registry.alias_history("champion")] == [5, 7, 9, 10, 12]
    # Each record is also on the versions it touched.
    assert json.loads(registry.get_version(4).tags["audit.000010"])["action"] == "rollback"


def test_loaded_model_predicts_exactly_like_the_trained_one(registry_with_versions, trained):
    _, registry, _ = registry_with_versions
    split, models = trained
    model, contract = models["good"]
    loaded, loaded_contract = registry.load_model(3)
    x = loaded_contract.model_input(split.test)
    np.testing.assert_array_equal(
        loaded.predict_proba(x), model.predict_proba(contract.model_input(split.test))
    )
    by_alias, _ = registry.load_model("challenger")  # v4, never moved by promotions
    np.testing.assert_array_equal(by_alias.predict_proba(x), model.predict_proba(x))


def test_a_version_loaded_again_in_the_process_is_not_downloaded_again(registry_with_versions, monkeypatch):
    from ml_platform.registry import model_registry
    from ml_platform.registry.loading import LOADED_VERSIONS

    root, registry, _ = registry_with_versions
    LOADED_VERSIONS.clear()
    first, contract = registry.load_model(3)
    assert registry.load_model(1)[0] is not first  # another version is another model

    def no_download(**kwargs):
        raise AssertionError(f"downloaded again: {kwargs}")

    monkeypatch.setattr(model_registry.mlflow.artifacts, "download_artifacts", no_download)
    again, again_contract = registry.load_model(3)
    assert again is first and again_contract == contract
    with pytest.raises(AssertionError, match="fraud_detector/4"):  # v4 was not loaded: it is downloaded
        registry.load_model("challenger")
    with pytest.raises(AssertionError, match="downloaded again"):  # a serving host's copy always downloads
        registry.load_model(3, copy_to=root / "copy")


def test_version_1_of_two_stores_is_each_stores_own_model(tmp_path, trained):
    """Loaded models are not keyed by name and version alone: each store's version 1 is its own."""
    from ml_platform.registry import ModelRegistry

    split, models = trained
    for name in ("medium", "good"):
        registry = ModelRegistry(f"sqlite:///{tmp_path / name / 'mlflow.db'}", MODEL)
        model, contract = models[name]
        assert registry.log_and_register(model, contract, metrics={}, params={}, data_version="d",
                                         code_version="c", run_name=name, who="t").version == 1
        loaded, loaded_contract = registry.load_model(1)
        assert loaded_contract.feature_refs == contract.feature_refs, name
        x = contract.model_input(split.test)
        np.testing.assert_array_equal(loaded.predict_proba(x), model.predict_proba(x))


def test_contract_round_trips_through_the_registry(registry_with_versions, trained):
    _, registry, _ = registry_with_versions
    _, models = trained
    for version, name in ((1, "medium"), (3, "good")):
        expected = models[name][1].with_registration(MODEL, version)
        assert registry.get_contract(version) == expected
        assert ModelContract.from_json(registry.get_version(version).tags["contract"]) == expected
    assert registry.get_contract(1).feature_refs == tuple(PROFILE_REFS)


def test_versions_carry_lineage_and_explicit_requirements(registry_with_versions, trained):
    root, registry, versions = registry_with_versions
    split, _ = trained
    v3 = registry.get_version(3)
    assert v3.run_id == versions[3].run_id and v3.model_uri == f"models:/{MODEL}/3"
    assert v3.tags["data_version"] == data_version(split.train) and v3.tags["code_version"] == "test-sha"
    assert v3.tags["run_id"] == v3.run_id
    run = registry.client.get_run(v3.run_id)
    assert run.data.tags["data_version"] == data_version(split.train)
    assert json.loads(run.data.tags["feature_refs"])[0] == "user_transaction_stats:txn_count_1h"
    assert run.data.params["max_iter"] == "30"
    assert run.data.params["model_type"] == "hist_gradient_boosting" == v3.tags["model_type"]
    assert 0 < run.data.metrics["test_pr_auc"] <= 1 and "test_calibration" not in run.data.metrics

    # Everything lives under the SQLite file's directory; requirements are exactly ours.
    model_dirs = list((root / "mlflow" / "artifacts").rglob("MLmodel"))
    assert len(model_dirs) >= 4
    requirements = (model_dirs[0].parent / "requirements.txt").read_text().split()
    assert sorted(r.split("==")[0] for r in requirements) == [
        "mlflow",
        "numpy",
        "pandas",
        "scikit-learn",
        "scipy",
        "skops",
    ]
    assert not Path("mlruns").exists() and not Path("mlflow.db").exists()
    # MLflow's global URI (and the env var it sets) is restored after each registry call.
    import mlflow

    assert mlflow.get_tracking_uri() != registry.tracking_uri
    assert os.environ.get("MLFLOW_TRACKING_URI") != registry.tracking_uri


def test_alias_moves_validate_versions_and_default_to_the_os_user(registry_with_versions):
    _, registry, _ = registry_with_versions
    from ml_platform.registry import ModelRegistry

    with pytest.raises(LookupError, match="no version 99"):
        registry.set_alias("champion", 99)
    with pytest.raises(LookupError, match="no alias 'canary'"):
        registry.load_model("canary")
    # Removing an alias that is not set moves nothing and records nothing.
    assert registry.set_alias("canary", None) == {}
    with pytest.raises(ValueError, match="pass artifact_root"):
        ModelRegistry("postgresql://user@localhost/mlflow", MODEL)
    # A second registered model in the same store, so the main history stays untouched.
    other = ModelRegistry(registry.tracking_uri, "other_model")
    assert other.champion() is None and other.alias_history() == []
    with pytest.raises(RuntimeError, match="has no champion"):
        other.rollback()


def test_models_with_types_outside_the_allow_list_are_refused(registry_with_versions, trained):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    from ml_platform.registry import ModelRegistry

    split, _ = trained
    registry = ModelRegistry(registry_with_versions[1].tracking_uri, "unsafe_model")
    contract = ModelContract(
        feature_refs=(),
        request_columns=("amount",),
        request_features=("amount",),
        categorical_features=(),
        input_columns=("amount",),
    )
    model = Pipeline([("neg", FunctionTransformer(operator.neg)), ("clf", LogisticRegression())])
    model.fit(contract.model_input(split.train), split.train[LABEL])
    v = registry.log_and_register(
        model, contract, {}, {}, "dv", "sha", split.train.head(5), who=getpass.getuser()
    )
    assert registry.alias_history()[0]["who"] == getpass.getuser()
    with pytest.raises(RuntimeError, match=r"outside the platform's allow-list: \['_operator.neg'\]"):
        registry.load_model(v.version)
