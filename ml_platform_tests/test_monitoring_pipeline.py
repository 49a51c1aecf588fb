"""Monitoring through Dagster on real platform data: train on a quiet month, then score and monitor
a quiet day and a day after the generator's drift switch; the drifted day alerts on the shifted
columns, the quiet day on nothing; checks, dashboard table and the HTML report (looked at as an
image in headless Chromium) say so."""

from __future__ import annotations

import datetime as dt
import uuid

import dagster as dg
import pytest
from threadpoolctl import threadpool_limits

from ml_platform.defs.monitoring import status_check_name
from ml_platform.defs.pipeline import run_daily_job, run_monitoring, run_training_pipeline
from ml_platform.monitoring.daily_report import report_path
from ml_platform.monitoring.results import load_result

try:
    from browser import colour_share, decode_png, render_png
    from fixtures_platform import TEST_REDIS_URL
except ImportError:  # ml_platform_tests imported as a package
    from ml_platform_tests.browser import colour_share, decode_png, render_png
    from ml_platform_tests.fixtures_platform import TEST_REDIS_URL

# 60 days: the features' 37-day warm-up (the reference leaves it out), then steady state.
END = dt.date(2026, 2, 28)
START = END - dt.timedelta(days=59)
QUIET = END + dt.timedelta(days=1)
DRIFTED = END + dt.timedelta(days=4)  # the second day of the drift
SOURCE = {"seed": 11, "n_users": 900, "n_merchants": 200, "txns_per_user_per_day": 0.8,
          "drift_start": (END + dt.timedelta(days=3)).isoformat()}
ALERT_RED = "#d93025"


@pytest.fixture(scope="module")
def monitored(tmp_path_factory):
    from ml_platform.featurestore.online import RedisOnlineStore
    from ml_platform.settings import load_settings

    root = tmp_path_factory.mktemp("monitoring")
    project = f"test_monitoring_{uuid.uuid4().hex[:8]}"
    settings = load_settings({"ML_PLATFORM_DATA_DIR": str(root / "data"), "REDIS_URL": TEST_REDIS_URL,
                              "ML_PLATFORM_PROJECT": project})
    settings.ensure_dirs()
    try:
        with dg.instance_for_test() as instance, threadpool_limits(limits=1):
            trained = run_training_pipeline(settings, START, END, event_source=SOURCE, instance=instance)
            assert trained.success, trained.failure
            runs = {}
            for day in (QUIET, DRIFTED):
                scored = run_daily_job(settings, "daily_scoring", day, SOURCE, instance)
                assert scored.success, scored.failure
                runs[day] = run_monitoring(settings, day, SOURCE, instance)
            yield settings, instance, runs
    finally:
        RedisOnlineStore(settings.redis_url, project).delete_project()


def _statuses(result) -> dict[str, str]:
    columns = result.details["report"]["columns"]
    return {c["feature"]: c["status"] for c in columns}


def test_every_monitoring_asset_materializes_for_both_days(monitored):
    _, _, runs = monitored
    for day, outcome in runs.items():
        assert outcome.success, (day, outcome.failure)
        assert {"label_feed", "data_drift", "prediction_drift", "model_performance", "serving_health",
                "monitoring_dashboard"} <= set(outcome.metadata), day


def test_the_drifted_day_alerts_on_the_shifted_columns_and_the_quiet_day_on_nothing(monitored):
    settings, _, _ = monitored
    quiet = load_result(settings.monitoring_dir, "data_drift", QUIET)
    drifted = load_result(settings.monitoring_dir, "data_drift", DRIFTED)
    assert "alert" not in _statuses(quiet).values(), _statuses(quiet)
    assert quiet.status != "alert"
    statuses = _statuses(drifted)
    assert drifted.status == "alert"
    # Amounts x1.5 and two new merchant categories: those inputs alert.
    assert statuses["amount"] == "alert" and statuses["merchant_category"] == "alert", statuses
    category = next(c for c in drifted.details["report"]["columns"] if c["feature"] == "merchant_category")
    assert category["unseen_categories"] == 2
    # The model's inputs came from the log's batch rows of the day.
    assert drifted.metrics["rows"] == runs_rows(settings, DRIFTED)


def runs_rows(settings, day) -> int:
    from ml_platform.sources.raw_events import read_days

    return len(read_days(settings.raw_dir, [day]))


def test_performance_is_pending_while_labels_are_still_arriving(monitored):
    settings, _, _ = monitored
    for day in (QUIET, DRIFTED):
        result = load_result(settings.monitoring_dir, "model_performance", day)
        assert result.status == "pending", result.rows
        assert result.metrics["day_label_completeness"] < 0.5


def test_checks_turn_statuses_into_results(monitored):
    _, instance, _ = monitored
    check = dg.AssetCheckKey(dg.AssetKey("data_drift"), status_check_name("data_drift"))
    evaluations = {}
    for record in instance.event_log_storage.get_asset_check_execution_history(check, limit=10):
        evaluation = record.event.dagster_event.event_specific_data
        if isinstance(evaluation, dg.AssetCheckEvaluation):  # not the "planned" events
            evaluations[evaluation.metadata["day"].value] = evaluation
    assert evaluations[DRIFTED.isoformat()].passed is False
    assert evaluations[DRIFTED.isoformat()].severity == dg.AssetCheckSeverity.ERROR
    quiet = evaluations[QUIET.isoformat()]
    # The quiet day may warn (a Sunday's 30-day sums) but never errors.
    assert quiet.passed or quiet.severity == dg.AssetCheckSeverity.WARN, quiet


def test_the_dashboard_is_a_table_with_numbers_over_partitions(monitored):
    _, instance, runs = monitored
    meta = runs[DRIFTED].metadata["monitoring_dashboard"]
    rows = [r.data for r in meta["dashboard"].records]
    assert {"metric", "threshold", "value", "status", "detail"} == set(rows[0])
    metrics = {r["metric"]: r for r in rows}
    assert metrics["Data drift (amount)"]["status"] == "ALERT"
    assert "Latency p99 (api)" not in metrics  # nothing was served online: no made-up latency
    # Numeric metadata on each day's materialization, so the UI plots it over partitions.
    events = instance.fetch_materializations(dg.AssetKey("data_drift"), limit=10).records
    by_day = {e.asset_materialization.partition: e.asset_materialization.metadata for e in events}
    assert by_day[DRIFTED.isoformat()]["columns_alert"].value >= 2
    assert by_day[QUIET.isoformat()]["columns_alert"].value == 0


def test_the_html_report_renders_and_shows_the_alert(monitored, tmp_path):
    settings, _, _ = monitored
    shares = {}
    for day in (QUIET, DRIFTED):
        page = report_path(settings.reports_dir, day.isoformat())
        html = page.read_text()
        assert "http://" not in html and "https://" not in html  # opens with no network
        png = render_png(page, tmp_path / f"{day}.png")
        pixels = decode_png(png)
        shares[day] = colour_share(pixels, ALERT_RED, tol=30)
    # The drifted day's page is covered in alert red (badges, bars); the quiet day's is not.
    assert shares[DRIFTED] > 0.002, shares
    assert shares[QUIET] < shares[DRIFTED] / 4, shares


def test_a_day_nothing_was_served_for_is_monitored_on_its_raw_events_features(monitored):
    """The last training day was never scored: data drift builds its inputs from the raw events
    with their point-in-time features (as training does), and finds the same world."""
    from ml_platform.defs.resources import default_resources
    from ml_platform.monitoring.daily import run_data_drift

    settings, _, _ = monitored
    resources = default_resources(settings, **SOURCE)
    inputs = resources["monitoring"].inputs(resources["feature_store"], resources["mlflow"])
    result, report = run_data_drift(inputs, END)
    assert result.details["source"].startswith("nothing served: the day's raw events")
    assert result.metrics["rows"] == runs_rows(settings, END)
    assert report.status != "alert", report.summary()
