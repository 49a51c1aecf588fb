"""`retrain_sensor` over a temp monitoring dir of saved MonitorResults and a real (ephemeral) Dagster
instance: one request per episode, the cursor across restarts, run outcomes read from the instance."""

from __future__ import annotations

import json
from datetime import date, timedelta

import dagster as dg
import pytest
from test_retrain_policy import results_of, write_events

from ml_platform.defs.resources import FeatureStoreResource, MonitoringResource
from ml_platform.defs.sensors import retrain_sensor
from ml_platform.monitoring import retrain_policy as rp
from ml_platform.monitoring.results import save_result
from ml_platform.sources import labels as lb

D0 = date(2026, 2, 1)
DRIFT = ("alert", "amount")


def day(i: int) -> str:
    return (D0 + timedelta(days=i)).isoformat()


@pytest.fixture()
def data_dir(tmp_path):
    return tmp_path / "data"


@pytest.fixture()
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def save_day(data_dir, i: int, skip: tuple[str, ...] = (), **signals) -> None:
    for monitor, result in results_of(day(i), **signals).items():
        if monitor not in skip:
            save_result(data_dir / "monitoring", result)


def label_events(data_dir, i: int, n: int, frauds: int) -> None:
    """n raw events on day i, whose labels (`frauds` of them fraud) arrive the same day."""
    d = D0 + timedelta(days=i)
    ids = [f"t{i}-{k}" for k in range(n)]
    carried = {t: (int(k < frauds), f"{d.isoformat()}T20:00Z") for k, t in enumerate(ids)}
    write_events(data_dir / "raw", d, ids, carried)
    lb.write_labels(lb.empty_labels(), data_dir / "raw", d)


def tick(instance, data_dir, cursor):
    config = data_dir / "monitoring.toml"
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor,
        resources={"feature_store": FeatureStoreResource(repo_path=str(data_dir)),
                   "monitoring": MonitoringResource(config_path=str(config) if config.exists() else None)},
    )
    out = retrain_sensor(context)
    return out, context.cursor


def requests(out) -> list[dg.RunRequest]:
    return [] if isinstance(out, dg.SkipReason) else list(out)


def fake_retrain_run(instance, run_key: str, *, fail: bool = False, promoted: bool | None = None) -> str:
    """A finished run of a job named `retrain` with the sensor's run_key tag (and, when it succeeds, a
    `registered_model` materialization saying whether the model was promoted)."""

    @dg.op
    def register(context):
        if fail:
            raise RuntimeError("training failed")
        if promoted is not None:
            context.log_event(dg.AssetMaterialization("registered_model", metadata={"promoted": promoted}))

    @dg.job(name="retrain")
    def retrain():
        register()

    result = retrain.execute_in_process(instance=instance, tags={"dagster/run_key": run_key}, raise_on_error=False)
    assert result.success is not fail
    return result.run_id


def small_policy(data_dir, **kwargs) -> None:
    """The sensor's policy for these tests, as a deployment sets it: [retrain] of the monitoring
    config (label_settling_days = 0: these tests label and evaluate one day; the maturity rule is
    test_retrain_policy's)."""
    settings = {"min_labelled_rows": 50, "min_labelled_frauds": 5, "label_settling_days": 0, **kwargs}
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "monitoring.toml").write_text("[retrain]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))


def test_evaluating_twice_gives_one_request_and_a_restart_keeps_the_decision(instance, data_dir):
    small_policy(data_dir)
    label_events(data_dir, 0, n=60, frauds=6)
    save_day(data_dir, 0, data=DRIFT, prediction=("alert", "Prediction positive rate"))
    out, cursor = tick(instance, data_dir, None)
    [req] = requests(out)
    assert req.run_key == "retrain:2026-02-01:1"
    assert req.tags["ml_platform/retrain_day"] == "2026-02-01"
    assert req.tags["ml_platform/retrain_reason"] == (
        "data_drift alert on 2026-02-01 (columns: amount); prediction_drift alert on 2026-02-01 "
        "(metrics: Prediction positive rate); 60 labelled post-drift rows (6 frauds)"
    )
    assert json.loads(cursor)["episode"]["attempts"][0]["run_key"] == req.run_key
    # the old cursor evaluated again (the tick's cursor was lost): the same run_key, so Dagster dedups
    again, _ = tick(instance, data_dir, None)
    assert [r.run_key for r in requests(again)] == [req.run_key]
    # a new context (a daemon restart) with the stored cursor: the decision is kept
    out, cursor2 = tick(instance, data_dir, cursor)
    assert isinstance(out, dg.SkipReason)
    assert out.skip_message == ("no monitoring results after 2026-02-01 yet: nothing to decide (drift episode of "
                                "2026-02-01: retrain retrain:2026-02-01:1 requested, waiting for its run)")
    save_day(data_dir, 1, data=DRIFT)
    out, _ = tick(instance, data_dir, cursor2)
    assert isinstance(out, dg.SkipReason) and "evaluated up to 2026-02-02" in out.skip_message


def test_skip_reason_when_monitoring_has_not_run_for_the_day(instance, data_dir):
    small_policy(data_dir)
    out, cursor = tick(instance, data_dir, None)
    assert out.skip_message == "no monitoring results after the start yet: nothing to decide"
    save_day(data_dir, 0)
    out, cursor = tick(instance, data_dir, cursor)
    assert out.skip_message == "evaluated up to 2026-02-01: no open drift episode"
    save_day(data_dir, 1, skip=("prediction_drift", "model_performance"), data=DRIFT)
    out, cursor = tick(instance, data_dir, cursor)
    assert out.skip_message == ("monitoring for 2026-02-02 has not run yet for prediction_drift, model_performance: "
                                "no decision until it has")
    assert json.loads(cursor)["last_day"] == "2026-02-01"


def test_waits_for_labels_then_requests(instance, data_dir):
    small_policy(data_dir)
    label_events(data_dir, 0, n=30, frauds=3)
    save_day(data_dir, 0, data=DRIFT)
    out, cursor = tick(instance, data_dir, None)
    assert out.skip_message == ("evaluated up to 2026-02-01: drift episode of 2026-02-01 waiting for labelled "
                                "post-drift rows (30 rows, 3 frauds so far)")
    label_events(data_dir, 1, n=30, frauds=3)
    save_day(data_dir, 1)
    out, cursor = tick(instance, data_dir, cursor)
    [req] = requests(out)
    assert req.run_key == "retrain:2026-02-01:1" and req.tags["ml_platform/retrain_day"] == "2026-02-02"


def test_a_failed_run_is_read_from_the_instance_retried_once_then_left(instance, data_dir):
    small_policy(data_dir, cooldown_days=2)
    label_events(data_dir, 0, n=60, frauds=6)
    save_day(data_dir, 0, data=DRIFT)
    out, cursor = tick(instance, data_dir, None)
    [first] = requests(out)
    run_id = fake_retrain_run(instance, first.run_key, fail=True)
    save_day(data_dir, 1, data=DRIFT)
    out, cursor = tick(instance, data_dir, cursor)
    assert requests(out) == []
    state = json.loads(cursor)
    assert state["last_outcome"] == {"run_key": first.run_key, "outcome": "failed", "run_id": run_id,
                                     "episode_start": "2026-02-01"}
    save_day(data_dir, 2, data=DRIFT)
    out, cursor = tick(instance, data_dir, cursor)
    [second] = requests(out)
    assert second.run_key == "retrain:2026-02-01:2"
    fake_retrain_run(instance, second.run_key, fail=True)
    for i in range(3, 8):
        save_day(data_dir, i, data=DRIFT)
        out, cursor = tick(instance, data_dir, cursor)
        assert requests(out) == []
    assert "left for a person" in out.skip_message


def test_a_promoted_retrain_ends_the_episode_and_an_unpromoted_one_is_recorded(instance, data_dir):
    small_policy(data_dir, cooldown_days=1, quiet_days_to_close=1)
    label_events(data_dir, 0, n=60, frauds=6)
    save_day(data_dir, 0, data=DRIFT)
    out, cursor = tick(instance, data_dir, None)
    [first] = requests(out)
    fake_retrain_run(instance, first.run_key, promoted=False)
    save_day(data_dir, 1, data=DRIFT)
    out, cursor = tick(instance, data_dir, cursor)
    # not promoted: recorded; the retry needs 50 more post-drift labels than the 60 it had
    assert requests(out) == [] and json.loads(cursor)["last_outcome"]["outcome"] == "not_promoted"
    label_events(data_dir, 2, n=60, frauds=6)
    save_day(data_dir, 2, data=DRIFT)
    out, cursor = tick(instance, data_dir, cursor)
    [second] = requests(out)
    assert second.run_key == "retrain:2026-02-01:2" and "120 labelled post-drift rows" in second.tags["ml_platform/retrain_reason"]
    fake_retrain_run(instance, second.run_key, promoted=True)
    save_day(data_dir, 3, data=DRIFT)
    out, cursor = tick(instance, data_dir, cursor)
    assert requests(out) == [] and json.loads(cursor)["episode"]["status"] == rp.RETRAINED
    save_day(data_dir, 4)
    out, cursor = tick(instance, data_dir, cursor)
    assert json.loads(cursor)["episode"] is None
    assert json.loads(cursor)["closed"][-1]["attempts"] == [[first.run_key, "not_promoted"],
                                                           [second.run_key, "promoted"]]


def test_the_sensor_is_registered_with_the_retrain_job():
    assert retrain_sensor.job_name == "retrain"
    assert retrain_sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert retrain_sensor.minimum_interval_seconds == 600
    assert "feature_store" in retrain_sensor.required_resource_keys
