"""The Dagster layer: the graph loads, the whole training pipeline runs end to end in process, and
the validation gate stops a bad batch before it can touch the champion."""

import datetime as dt
import uuid
import warnings

import dagster as dg
import pandas as pd
import pytest

from ml_platform import features as fr
from ml_platform.defs import assets as a
from ml_platform.defs import pipeline
from ml_platform.defs.pipeline import RANGE_END_TAG, RANGE_START_TAG, build_definitions, run_training_pipeline
from ml_platform.defs.source_assets import SOURCE_ASSETS
from ml_platform.featurestore.definitions import FileSource
from ml_platform.registry import ModelRegistry
from ml_platform.sources.generator import GeneratorConfig, generate_day

try:
    from fixtures_platform import TEST_REDIS_URL
except ImportError:  # ml_platform_tests imported as a package
    from ml_platform_tests.fixtures_platform import TEST_REDIS_URL

SMALL = {"seed": 11, "n_users": 900, "n_merchants": 200, "txns_per_user_per_day": 0.8}
END = dt.date(2026, 3, 31)
START = END - dt.timedelta(days=27)


def test_definitions_load_with_the_whole_graph():
    defs = build_definitions()
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {
        "users", "raw_transactions", "user_transaction_stats", "merchant_transaction_stats",
        "merchant_fraud_stats", "user_merchant_stats", "training_set", "trained_model",
        "model_evaluation", "registered_model",
    } <= keys
    monitoring = {"label_feed", "data_drift", "prediction_drift", "model_performance", "serving_health",
                  "monitoring_dashboard"}
    assert monitoring <= keys
    experiments = {"shadow_comparison", "experiment_rewards", "rollout_status"}
    assert experiments <= keys
    # training_pipeline is everything but batch scoring, the log drain, monitoring and experiments.
    job = defs.resolve_job_def("training_pipeline")
    selected = {k.to_user_string() for k in job.asset_layer.executable_asset_keys}
    assert selected == keys - {"batch_predictions", "prediction_log", "cost_report"} - monitoring - experiments
    job = defs.resolve_job_def("daily_monitoring")
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == monitoring | {"experiment_rewards"}
    job = defs.resolve_job_def("shadow_report")
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {"shadow_comparison"}
    assert {"rollout_sensor", "shadow_report_sensor"} <= {s.name for s in defs.sensors}
    checks = {spec.name: spec.blocking for spec in a.raw_transactions.check_specs}
    assert checks == {a.RAW_CHECK: True}
    assert {spec.name: spec.blocking for spec in a.training_set.check_specs} == {a.TRAINING_CHECK: True}
    assert a.raw_transactions.backfill_policy == dg.BackfillPolicy.single_run()


def _deps(asset: dg.AssetsDefinition) -> set[str]:
    return {k.to_user_string() for keys in asset.asset_deps.values() for k in keys}


def test_feature_tables_depend_on_the_asset_writing_their_declared_source():
    tables = {t.key.to_user_string(): t for t in a.feature_table_assets}
    assert set(tables) == {v.name for v in fr.FEATURE_VIEWS if v.aggregations}
    for view in fr.FEATURE_VIEWS:
        if view.aggregations:
            assert _deps(tables[view.name]) == {SOURCE_ASSETS[view.source.path]}, view.name
    # A view declared on the users table depends on `users`, whatever its name or features say.
    on_users = fr.merchant_fraud_stats.with_source(fr.users_source)
    assert _deps(a._feature_table_asset(on_users)) == {"users"}
    # Views without aggregations are read from their source as is: consumers depend on its asset.
    assert "users" in _deps(a.online_features) and "users" in _deps(a.training_set)
    assert "user_profile" not in {t for deps in map(_deps, tables.values()) for t in deps}


def test_a_view_on_a_source_no_asset_writes_is_a_clear_error():
    view = fr.user_transaction_stats.with_source(FileSource(path="raw/chargebacks", name="chargebacks"))
    with pytest.raises(ValueError, match=r"feature view 'user_transaction_stats' reads source 'chargebacks'"):
        a._feature_table_asset(view)


def test_daily_scoring_has_one_backfill_policy_and_resolves_without_warnings():
    defs = build_definitions()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("daily_scoring", "training_pipeline", "retrain", "drain_prediction_log", "daily_monitoring"):
            defs.resolve_job_def(name)
    assert [str(w.message) for w in caught] == []
    partitioned = {x.key.to_user_string(): x for x in pipeline.ALL_ASSETS if x.partitions_def is not None}
    # Ingestion and scoring run a range of days as one run; monitoring one day per run, so each
    # day has its own materialization, figures and check result.
    policies = {k: x.backfill_policy for k, x in partitioned.items()}
    assert policies == {
        "raw_transactions": dg.BackfillPolicy.single_run(),
        "batch_predictions": dg.BackfillPolicy.single_run(),
        **{k: None for k in ("label_feed", "data_drift", "prediction_drift", "model_performance",
                             "serving_health", "monitoring_dashboard", "experiment_rewards")},
    }


def test_schedules_ship_running():
    defs = build_definitions()
    statuses = {s.name: defs.resolve_schedule_def(s.name).default_status for s in defs.schedules}
    assert statuses == {
        "daily_scoring_schedule": dg.DefaultScheduleStatus.RUNNING,
        "drain_prediction_log_schedule": dg.DefaultScheduleStatus.RUNNING,
        "cost_reporting_schedule": dg.DefaultScheduleStatus.RUNNING,
    }
    # Monitoring follows each successful scoring run (a run-status sensor), the retrain sensor
    # follows monitoring, the rollout sensor advances a running rollout and the shadow report
    # follows a running shadow; all ship running too (each does nothing until there is work).
    sensors = {s.name: s.default_status for s in defs.sensors}
    assert sensors == {"monitor_after_scoring": dg.DefaultSensorStatus.RUNNING,
                       "retrain_sensor": dg.DefaultSensorStatus.RUNNING,
                       "rollout_sensor": dg.DefaultSensorStatus.RUNNING,
                       "shadow_report_sensor": dg.DefaultSensorStatus.RUNNING}


@pytest.fixture(scope="module")
def trained_platform(tmp_path_factory):
    """One real end-to-end run on small synthetic data (shared by the tests below)."""
    from ml_platform.featurestore.online import RedisOnlineStore
    from ml_platform.settings import load_settings

    data = tmp_path_factory.mktemp("platform") / "data"
    project = f"test_pipeline_{uuid.uuid4().hex[:8]}"
    settings = load_settings({
        "ML_PLATFORM_DATA_DIR": str(data),
        "REDIS_URL": TEST_REDIS_URL,
        "ML_PLATFORM_PROJECT": project,
    })
    settings.ensure_dirs()
    try:
        with dg.instance_for_test() as instance:
            outcome = run_training_pipeline(settings, START, END, event_source=SMALL, instance=instance)
        yield settings, outcome
    finally:
        RedisOnlineStore(settings.redis_url, project).delete_project()


def test_end_to_end_run_registers_a_champion_with_lineage(trained_platform):
    settings, outcome = trained_platform
    assert outcome.success, outcome.failure
    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.model_name)
    champion = registry.champion()
    assert champion is not None and champion.version == 1
    # Lineage: the registered version names its run and the training data version.
    meta = outcome.metadata
    assert meta["registered_model"]["version"] == 1
    assert champion.tags["data_version"] == meta["training_set"]["data_version"]
    assert champion.run_id
    model, contract = registry.load_model("champion")
    assert contract.decision_threshold > 0
    # The model learned something real from behavioural features ...
    assert meta["model_evaluation"]["roc_auc"] > 0.75
    # ... and the registered model is exactly the evaluated one: same test AUC from the registry copy.
    from sklearn.metrics import roc_auc_score

    from ml_platform.training.model import fraud_probability
    from ml_platform.training.pipeline import load_training_set

    frame, _ = load_training_set(settings.data_dir)
    test = frame[frame["split"] == "test"]
    auc = roc_auc_score(test["is_fraud"], fraud_probability(model, contract, test))
    assert auc == pytest.approx(meta["model_evaluation"]["roc_auc"], abs=1e-12)
    # Raw partitions were written for every day of the range, in one run.
    days = sorted(p.name for p in (settings.raw_dir / "transactions").glob("date=*"))
    assert len(days) == (END - START).days + 1
    history = registry.alias_history()
    assert [h["alias"] for h in history][-1] == "champion"
    # The online store was fed and agrees with the offline store (the skew check ran and passed).
    assert meta["online_features"]["rows_written"] > 0
    assert outcome.checks["online_offline_skew"] is True


def test_bad_batch_is_stopped_by_the_gate_and_the_champion_stays(trained_platform, tmp_path):
    settings, outcome = trained_platform
    assert outcome.success
    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.model_name)
    before = registry.champion().version
    versions_before = len(registry.list_versions())

    # A day of real-looking events with defects: a negative amount and a duplicated transaction id.
    day = END + dt.timedelta(days=1)
    bad = generate_day(GeneratorConfig(start=day, days=1, **SMALL), day)
    bad.loc[3, "amount"] = -42.0
    bad.loc[5, "transaction_id"] = bad.loc[6, "transaction_id"]
    path = tmp_path / "bad.parquet"
    bad.to_parquet(path)

    defs = build_definitions(settings, event_source={"kind": "files", "import_path": str(path)})
    job = defs.resolve_job_def("training_pipeline")
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            instance=instance,
            tags={RANGE_START_TAG: day.isoformat(), RANGE_END_TAG: day.isoformat()},
            raise_on_error=False,
        )
    assert not result.success
    evaluations = [e.event_specific_data for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    raw_eval = next(e for e in evaluations if e.check_name == a.RAW_CHECK)
    assert not raw_eval.passed
    failed_columns = {f["column"] for f in raw_eval.metadata["failures"].value}
    assert {"amount", "transaction_id"} <= failed_columns
    # Nothing downstream ran: no new model version, the champion is untouched.
    materialized = {
        e.asset_key.to_user_string() for e in result.all_events if e.is_step_materialization
    }
    assert "registered_model" not in materialized and "training_set" not in materialized
    assert registry.champion().version == before
    assert len(registry.list_versions()) == versions_before


def test_raw_partition_has_the_contract_columns(trained_platform):
    settings, _ = trained_platform
    part = next((settings.raw_dir / "transactions").glob("date=*/*.parquet"))
    frame = pd.read_parquet(part)
    assert {"transaction_id", "user_id", "merchant_id", "amount", "event_timestamp", "label_timestamp",
            "is_fraud"} <= set(frame.columns)
    assert str(frame["event_timestamp"].dtype) == "datetime64[us, UTC]"


def test_rollback_job_moves_champion_back_and_records_why(trained_platform):
    from ml_platform.registry import CHAMPION
    from ml_platform.training.pipeline import load_training_set

    settings, _ = trained_platform
    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.model_name)
    previous = registry.champion().version
    model, contract = registry.load_model("champion")
    _, version = load_training_set(settings.data_dir)
    new = registry.log_and_register(model, contract, metrics={}, params={}, data_version=version)
    # (a tie does not promote: the champion is set by hand, as an operator would)
    registry.set_alias(CHAMPION, new.version, who="test", why="same model again", action="promote")
    assert registry.champion().version == new.version != previous

    defs = build_definitions(settings)
    job = defs.resolve_job_def("rollback")
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(
            instance=instance,
            run_config={"ops": {"rollback_champion": {"config": {"reason": "bad canary", "who": "oncall"}}}},
        )
    assert result.success
    assert registry.champion().version == previous
    last = registry.alias_history("champion")[-1]
    assert (last["alias"], last["to_version"], last["who"], last["why"]) == ("champion", previous, "oncall", "bad canary")


def test_own_events_path_switches_the_event_source_to_the_users_files(tmp_path):
    from ml_platform.defs.resources import default_resources
    from ml_platform.settings import load_settings

    events = tmp_path / "my_events.parquet"
    settings = load_settings({"ML_PLATFORM_DATA_DIR": str(tmp_path / "data"), "ML_PLATFORM_EVENTS_PATH": str(events)})
    source = default_resources(settings, seed=3)["event_source"]
    assert (source.kind, source.import_path) == ("files", str(events))
    plain = default_resources(load_settings({"ML_PLATFORM_DATA_DIR": str(tmp_path / "data")}), seed=3)
    assert (plain["event_source"].kind, plain["event_source"].seed) == ("synthetic", 3)
