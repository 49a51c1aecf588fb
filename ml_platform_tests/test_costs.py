"""The cost report: hand-computed figures from given records, missing figures as not measured,
the prices file, the API's CPU from real Prometheus text, and the asset over a Dagster instance
where small jobs really ran."""

from __future__ import annotations

import os
import time

import dagster as dg
import pytest

from ml_platform import costs
from ml_platform.costs import ServingCpu, StepRecord, UnitPrices


def _steps():
    return [
        # v3: two training steps of one run, 3000 s + 600 s = one CPU hour
        StepRecord("training", "r1", "training_pipeline", "training_set", 3000.0, 3),
        StepRecord("training", "r1", "training_pipeline", "trained_model", 600.0, 3),
        StepRecord("training", "r2", "retrain", "trained_model", 1800.0, 4),
        # batch with v3: 36 s for 10,000 rows, twice (a day re-scored: both runs were paid for)
        StepRecord("batch", "b1", "daily_scoring", "batch_predictions", 36.0, 3, 10_000),
        StepRecord("batch", "b2", "daily_scoring", "batch_predictions", 36.0, 3, 10_000),
    ]


def test_hand_computed_report_training_batch_online_and_the_ratio():
    report = costs.compute_cost_report(
        _steps(),
        {("online", 3): 750, ("online", 4): 250, ("stream", 3): 2000},
        UnitPrices(),  # 0.048 USD per vCPU hour, 0.096 per replica hour, 1 API replica, 1 stream worker
        serving_cpu={"online": ServingCpu(cpu_seconds=90.0, predictions=1500)},  # 0.06 CPU-s a prediction
        period_hours={"online": 24.0, "stream": 48.0},
    )
    rows = {(r.path, r.model_version): r for r in report.rows}
    assert set(rows) == {("training", 3), ("training", 4), ("batch", 3), ("online", 3), ("online", 4), ("stream", 3)}

    t3 = rows["training", 3]
    assert t3.compute_seconds == 3600.0
    assert t3.cost_usd == pytest.approx(0.048)  # 3600 CPU-s at 0.048 USD per hour
    # amortized over v3's predictions on every path: 20,000 batch + 750 online + 2,000 stream
    assert t3.predictions == 22_750
    assert t3.usd_per_1000 == pytest.approx(0.048 / 22.75)
    assert rows["training", 4].cost_usd == pytest.approx(0.024)
    assert report.totals["training"]["cost_usd"] == pytest.approx(0.072)

    b = rows["batch", 3]
    assert (b.predictions, b.compute_seconds) == (20_000, 72.0)
    assert b.cost_usd == pytest.approx(72 / 3600 * 0.048)  # 0.00096
    assert b.usd_per_1000 == pytest.approx(0.00096 / 20)  # 4.8e-5

    o3, o4 = rows["online", 3], rows["online", 4]
    # always-on: 24 replica hours x 0.096 = 2.304 USD, split 75 / 25 by predictions
    assert (o3.always_on_hours, o4.always_on_hours) == (18.0, 6.0)
    assert o3.cost_usd == pytest.approx(1.728) and o4.cost_usd == pytest.approx(0.576)
    assert o3.usd_per_1000 == pytest.approx(2.304)  # 1.728 / 750 x 1000
    # the busy CPU, apart: 750 x 0.06 = 45 CPU-s -> 45/3600 x 0.048 = 0.0006 USD
    assert o3.compute_seconds == pytest.approx(45.0)
    assert o3.compute_usd == pytest.approx(0.0006)
    assert o3.usd_per_1000_compute == pytest.approx(0.0008)
    online = report.totals["online"]
    assert online["predictions"] == 1000
    assert online["usd_per_1000"] == pytest.approx(2.304)
    assert online["utilization"] == pytest.approx(60.0 / (24 * 3600 * 2))  # 60 CPU-s of 2 vCPU x 24 h

    s = rows["stream", 3]
    assert s.cost_usd == pytest.approx(48 * 0.096) and s.usd_per_1000 == pytest.approx(4.608 / 2)
    assert s.compute_usd is None and s.usd_per_1000_compute is None  # stream CPU not measured
    assert "stream: CPU seconds not measured" in report.not_measured

    # the lesson: online per 1,000 vs batch per 1,000
    assert report.ratios["online_vs_batch"] == pytest.approx(2.304 / 4.8e-5)  # 48,000x
    assert report.ratios["online_vs_batch_compute"] == pytest.approx(0.0008 / 4.8e-5)
    assert report.ratios["stream_vs_batch_compute"] is None
    assert report.totals["all"]["cost_usd"] == pytest.approx(0.072 + 0.00096 + 2.304 + 4.608)

    frame = report.to_frame()
    assert list(frame.columns) == list(costs.COLUMNS) and len(frame) == 6
    assert frame.loc[frame["path"] == "batch", "usd_per_1000"].item() == pytest.approx(4.8e-5)
    as_dict = report.to_dict()
    assert as_dict["prices"]["usd_per_cpu_hour"] == 0.048 and len(as_dict["rows"]) == 6


def test_missing_figures_are_not_measured_rather_than_zero():
    steps = [StepRecord("batch", "b1", "daily_scoring", "batch_predictions", 10.0, 5, None)]  # rows unknown
    report = costs.compute_cost_report(
        steps, {("online", 5): 100}, UnitPrices(api_replicas=0), period_hours={"online": 24.0}
    )
    batch = next(r for r in report.rows if r.path == "batch")
    assert batch.cost_usd == pytest.approx(10 / 3600 * 0.048)
    assert batch.predictions is None and batch.usd_per_1000 is None
    online = next(r for r in report.rows if r.path == "online")
    # no replicas (pay per use) and no CPU measure: nothing to bill from -> not measured, not 0
    assert online.cost_usd is None and online.usd_per_1000 is None
    assert report.totals["all"] == {"cost_usd": None, "partial": True}
    assert report.ratios["online_vs_batch"] is None
    assert "online: CPU seconds not measured" in report.not_measured
    assert "stream: no predictions in the period" in report.not_measured

    nothing = costs.compute_cost_report([], {})
    assert nothing.rows == [] and nothing.ratios["online_vs_batch"] is None
    assert "batch: no batch_predictions step recorded" in nothing.not_measured

    # pay-per-use online with CPU measured: billed per CPU second
    paid = costs.compute_cost_report([], {("online", 5): 100}, UnitPrices(api_replicas=0),
                                     serving_cpu={"online": ServingCpu(36.0, 1000)}, period_hours={"online": 24.0})
    assert paid.rows[0].cost_usd == pytest.approx(3.6 / 3600 * 0.048)


def test_bad_records_and_prices_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="seconds = -1.0"):
        StepRecord("batch", "r", "j", "batch_predictions", -1.0, 1, 10)
    with pytest.raises(ValueError, match="kind = 'serving'"):
        StepRecord("serving", "r", "j", "x", 1.0, 1)
    with pytest.raises(ValueError, match="path 'batch'"):
        costs.compute_cost_report([], {("batch", 1): 10})
    with pytest.raises(ValueError, match="usd_per_cpu_hour = -0.1"):
        UnitPrices(usd_per_cpu_hour=-0.1)
    with pytest.raises(ValueError, match="api_replicas = 1.5 must be an integer"):
        UnitPrices(api_replicas=1.5)

    path = tmp_path / "cost.toml"
    path.write_text("[prices]\nusd_per_cpu_hour = 0.0416\napi_replicas = 3\n")
    prices = costs.load_unit_prices(path)
    assert (prices.usd_per_cpu_hour, prices.api_replicas, prices.usd_per_serving_instance_hour) == (0.0416, 3, 0.096)
    path.write_text("[prices]\nusd_per_cpu_hr = 1\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['usd_per_cpu_hr'\]"):
        costs.load_unit_prices(path)
    path.write_text("[price]\n")
    with pytest.raises(ValueError, match=r"unknown section\(s\) \['price'\]"):
        costs.load_unit_prices(path)
    path.write_text('[prices]\nstream_workers = "two"\n')
    with pytest.raises(ValueError, match="stream_workers = 'two' must be an integer"):
        costs.load_unit_prices(path)
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        costs.load_unit_prices(tmp_path / "nope.toml")


def test_api_cpu_from_the_api_metrics_text_with_the_process_collector():
    from ml_platform.serving.api.metrics import ServingMetrics

    metrics = ServingMetrics()  # the API's own registry exposes its process CPU
    for version, n in (("3", 4), ("4", 2)):
        metrics.predictions.labels(version, "legit").inc(n)
    metrics.predictions.labels("4", "fraud").inc(1)
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # some CPU of our own
        pass
    text = metrics.exposition()[0].decode()
    times = os.times()
    cpu = costs.serving_cpu_from_metrics(text)
    assert cpu is not None and cpu.predictions == 7
    # the process's user+system CPU, read by the OS (the collector reads /proc in 10 ms ticks)
    assert cpu.cpu_seconds == pytest.approx(times.user + times.system, abs=0.05)
    assert cpu.seconds_per_prediction() == pytest.approx(cpu.cpu_seconds / 7)
    assert costs.serving_cpu_from_metrics("ml_platform_predictions_total 5\n") is None


# --------------------------------------------------------------------------- the asset


@dg.asset(group_name="training", name="training_set")
def _training_set():
    time.sleep(0.25)


@dg.asset(group_name="training", name="registered_model", deps=["training_set"])
def _registered_model():
    time.sleep(0.1)
    return dg.MaterializeResult(metadata={"version": 7})


@dg.asset(name="raw_transactions")
def _raw():  # not a training step: not billed to training
    time.sleep(0.2)


@dg.asset(name="batch_predictions")
def _batch():
    time.sleep(0.15)
    return dg.MaterializeResult(metadata={"model_version": 7, "rows": 2000})


def _write_api_log(log_dir, day: str, n: int, version: int) -> None:
    from ml_platform.atomic_files import write_parquet_atomic
    from ml_platform.serving.prediction_log import day_dir, log_table

    table = log_table({"source": "api", "model_version": version, "probability": 0.1, "decision": "legit"},
                      {"amount": [1.0] * n}, n)
    write_parquet_atomic(day_dir(log_dir, "api", day) / "part-1.parquet", table)


def test_cost_report_asset_over_runs_that_really_ran(tmp_path):
    from ml_platform.defs.cost import cost_report, measured_steps
    from ml_platform.defs.resources import FeatureStoreResource, MonitoringResource

    resources = {"feature_store": FeatureStoreResource(repo_path=str(tmp_path / "data")),
                 "monitoring": MonitoringResource()}
    log_dir = resources["feature_store"].predictions_log_dir
    _write_api_log(log_dir, "2025-03-01", 400, 7)
    _write_api_log(log_dir, "2025-03-02", 100, 7)
    with dg.instance_for_test() as instance:
        train = dg.materialize([_raw, _training_set, _registered_model], instance=instance)
        score = dg.materialize([_batch], instance=instance)
        assert train.success and score.success

        # the oracle: each step's STEP_START / STEP_SUCCESS event times, read from the event log
        def step_seconds(run_id, step):
            events = {e.dagster_event.event_type_value: e.timestamp
                      for e in instance.all_logs(run_id) if e.dagster_event and e.step_key == step}
            return events["STEP_SUCCESS"] - events["STEP_START"]

        training_s = step_seconds(train.run_id, "training_set") + step_seconds(train.run_id, "registered_model")
        batch_s = step_seconds(score.run_id, "batch_predictions")
        assert 0.35 <= training_s < 2.0 and 0.15 <= batch_s < 1.5

        steps = measured_steps(instance)
        assert sorted((s.kind, s.step, s.model_version, s.rows) for s in steps) == [
            ("batch", "batch_predictions", 7, 2000),
            ("training", "registered_model", 7, None),
            ("training", "training_set", 7, None),
        ]
        # A period bills the compute spent in it: the training ran today, not in March 2025.
        import datetime as dt

        today = dt.datetime.now(dt.UTC).date()
        assert {s.kind for s in measured_steps(instance, dt.date(2025, 3, 1), dt.date(2025, 3, 3))} == {"batch"}
        assert len(measured_steps(instance, today, today)) == 3

        def report(**config):
            result = dg.materialize([cost_report], instance=instance, resources=resources, raise_on_error=False,
                                    run_config={"ops": {"cost_report": {"config": config}}} if config else None)
            if not result.success:
                return result
            return {k: getattr(v, "value", v) for k, v in
                    result.asset_materializations_for_node("cost_report")[0].metadata.items()}

        meta = report()
        # a configured period (3 days: the replica ran all of it) and a prices file (2 API replicas)
        prices = tmp_path / "cost.toml"
        prices.write_text("[prices]\napi_replicas = 2\n")
        configured = report(start="2025-03-01", end="2025-03-03", prices_path=str(prices))
        only_first_day = report(start="2025-03-01", end="2025-03-01")
        bad = report(start="2025-13-01")
        assert not bad.success
        error = next(e for e in bad.all_events if e.is_step_failure).step_failure_data.error
        assert "cost_report config start" in str(error.to_string())

    hour = 0.048 / 3600
    assert meta["training_usd"] == pytest.approx(training_s * hour, rel=0.02)
    assert meta["batch_usd_per_1000"] == pytest.approx(batch_s * hour / 2, rel=0.02)
    # two logged days -> 48 replica hours x 0.096 over 500 predictions
    assert meta["online_predictions"] == 500
    assert meta["online_usd"] == pytest.approx(48 * 0.096)
    assert meta["online_usd_per_1000"] == pytest.approx(48 * 0.096 / 0.5)
    assert meta["online_vs_batch"] == pytest.approx(meta["online_usd_per_1000"] / meta["batch_usd_per_1000"])
    assert meta["online_vs_batch"] > 1000  # batch is far cheaper per prediction
    assert "online: CPU seconds not measured" in meta["not_measured"]
    assert "stream_usd_per_1000" not in meta  # no stream predictions: not measured, not 0
    table = {(r.data["path"], r.data["model_version"]): r.data for r in meta["costs"].records}
    assert set(table) == {("training", "7"), ("batch", "7"), ("online", "7")}
    assert table["batch", "7"]["predictions"] == "2000"
    assert table["online", "7"]["usd_per_1000_compute"] == "not measured"
    assert configured["online_usd"] == pytest.approx(72 * 2 * 0.096)
    assert "training_usd" not in configured  # no training in the period: not billed to it
    assert configured["online_usd_per_1000"] == pytest.approx(72 * 2 * 0.096 / 0.5)
    assert only_first_day["online_predictions"] == 400
    assert only_first_day["online_usd"] == pytest.approx(24 * 0.096)
