"""The promotion rule (strictly better by more than the margin) and what a registration reports:
re-running training on identical data keeps the champion; links to the MLflow run and model."""

from __future__ import annotations

import re

import pytest
from threadpoolctl import threadpool_limits

from ml_platform.registry.lineage import model_ui_path, run_ui_path, ui_url
from ml_platform.registry.promotion import decide
from ml_platform.settings import DEFAULT_PROMOTION_MARGIN, DEFAULT_PROMOTION_METRIC

try:  # the shared synthetic frame lives with the training tests
    from test_training import FAST, synthetic_training_frame
except ImportError:  # ml_platform_tests imported as a package
    from ml_platform_tests.test_training import FAST, synthetic_training_frame


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with threadpool_limits(limits=1):
        yield


# --- the rule, on numbers ---------------------------------------------------------------------


def test_equal_metrics_keep_the_champion_and_say_why():
    promoted, reason = decide("pr_auc", 0.0, 0.4321, 0.4321, champion_version=3)
    assert not promoted
    assert reason == (
        "challenger pr_auc 0.4321 vs champion v3 0.4321: improvement +0.0000 <= required margin 0.0000 "
        "(champion kept: a tie does not promote)"
    )


def test_better_by_more_than_the_margin_promotes_and_by_exactly_the_margin_does_not():
    assert decide("pr_auc", 0.0, 0.5, 0.4, champion_version=1)[0]
    assert decide("pr_auc", 0.05, 0.5, 0.4, champion_version=1)[0]
    promoted, reason = decide("pr_auc", 0.25, 0.75, 0.5, champion_version=1)  # exact binary floats
    assert not promoted and "+0.2500 <= required margin 0.2500" in reason
    promoted, reason = decide("pr_auc", 0.2, 0.75, 0.5, champion_version=1)
    assert promoted and "+0.2500 > required margin 0.2000 (promoted)" in reason
    kept, reason = decide("pr_auc", 0.2, 0.55, 0.5, champion_version=1)
    assert not kept and "champion kept" in reason and "tie" not in reason


def test_lower_is_better_metrics_count_a_decrease_as_the_improvement():
    assert decide("brier", 0.0, 0.05, 0.07, champion_version=2)[0]
    assert not decide("brier", 0.0, 0.07, 0.05, champion_version=2)[0]
    assert not decide("brier", 0.0, 0.05, 0.05, champion_version=2)[0]


def test_edge_cases_of_the_rule():
    assert decide("pr_auc", 0.0, 0.1, None, champion_version=None) == (True, "no champion yet")
    promoted, reason = decide("pr_auc", 0.0, None, 0.3, champion_version=1)
    assert not promoted and "undefined" in reason
    assert decide("pr_auc", 0.0, 0.3, None, champion_version=1)[0]  # champion cannot be scored
    with pytest.raises(ValueError, match=r"Unknown promotion metric 'accuracy'"):
        decide("accuracy", 0.0, 0.9, 0.8, champion_version=1)


def test_platform_defaults_are_what_the_rule_is_documented_with():
    assert DEFAULT_PROMOTION_METRIC == "pr_auc" and DEFAULT_PROMOTION_MARGIN == 0.0


# --- MLflow UI links --------------------------------------------------------------------------


def test_ui_links_are_relative_routes_made_absolute_only_for_http_servers():
    assert model_ui_path("fraud_detector", 7) == "#/models/fraud_detector/versions/7"
    assert run_ui_path("3", "abc") == "#/experiments/3/runs/abc"
    assert (
        ui_url("http://mlflow.internal:5000/", "#/models/m/versions/2")
        == "http://mlflow.internal:5000/#/models/m/versions/2"
    )
    assert ui_url("https://mlflow.example.com/base", "#/x") == "https://mlflow.example.com/base/#/x"
    assert ui_url("sqlite:////tmp/mlflow.db", "#/x") is None
    assert ui_url("postgresql://u@h/mlflow", "#/x") is None


# --- the pipeline step, end to end on a real SQLite store ---------------------------------------


@pytest.fixture()
def data_dir_with_training_set(tmp_path):
    from ml_platform.training import time_split
    from ml_platform.training.pipeline import SPLIT, TRAINING_SET, training_dir

    split = time_split(synthetic_training_frame(n=2000, seed=5), train_frac=0.6, val_frac=0.2)
    parts = {"train": split.train, "validation": split.validation, "test": split.test}
    import pandas as pd

    frame = pd.concat([p.assign(**{SPLIT: name}) for name, p in parts.items()], ignore_index=True)
    training_dir(tmp_path).mkdir(parents=True)
    frame.to_parquet(training_dir(tmp_path) / TRAINING_SET, index=False)
    return tmp_path


def test_rerunning_training_on_identical_data_registers_but_keeps_the_champion(data_dir_with_training_set):
    from ml_platform.registry import CHAMPION, ModelRegistry
    from ml_platform.training.pipeline import evaluate_candidate, register_candidate, train_candidate

    data_dir = data_dir_with_training_set
    registry = ModelRegistry(f"sqlite:///{data_dir / 'mlflow' / 'mlflow.db'}", "rerun_model")
    results = []
    for _ in range(2):  # the demo run twice on the same data
        candidate = train_candidate(data_dir, params=FAST, model_type="hist_gradient_boosting")
        assert candidate.model_type == "hist_gradient_boosting"
        evaluate_candidate(data_dir)
        results.append(register_candidate(data_dir, registry, who="ci", code_version="sha-123"))
    first, second = results
    assert first.promoted and first.reason == "no champion yet" and first.champion_version == 1
    assert (second.version, second.promoted, second.champion_version) == (2, False, 1)
    assert "improvement +0.0000 <= required margin 0.0000" in second.reason
    assert second.decision["challenger_metric"] == second.decision["champion_metric"]
    assert registry.get_version(CHAMPION).version == 1
    champion_moves = [(r["from_version"], r["to_version"]) for r in registry.alias_history(CHAMPION)]
    assert champion_moves == [(None, 1)]

    # What the registered_model asset shows: links to the run and the model, lineage.
    assert second.model_name == "rerun_model" and second.model_type == "hist_gradient_boosting"
    assert second.model_uri == "models:/rerun_model/2"
    assert second.model_ui_path == "#/models/rerun_model/versions/2"
    assert second.run_ui_path == f"#/experiments/{second.experiment_id}/runs/{second.run_id}"
    assert second.model_ui_url is None and second.run_ui_url is None  # SQLite: no UI server to link
    assert second.code_version == "sha-123" == registry.get_version(2).tags["code_version"]
    assert second.tracking_uri == registry.tracking_uri
    run = registry.client.get_run(second.run_id)
    assert run.info.experiment_id == second.experiment_id
    assert run.data.params["model_type"] == "hist_gradient_boosting" and run.data.params["max_iter"] == "30"
    assert second.to_dict()["decision"]["promoted"] is False


def test_default_code_version_is_a_git_sha_or_the_package_version():
    from ml_platform.registry import current_code_version

    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|ml_platform==\S+|unknown", current_code_version())
