"""The retraining decision on hand-made monitoring results (no Dagster, no files but the label test)."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import pandas as pd
import pytest

from ml_platform.monitoring import retrain_policy as rp
from ml_platform.monitoring.results import DashboardRow, MonitorResult

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
D0 = date(2026, 2, 1)


def day(i: int) -> str:
    return (D0 + timedelta(days=i)).isoformat()


def result(monitor: str, d: str, status: str = "ok", items: tuple[str, ...] = ()) -> MonitorResult:
    if monitor == "data_drift":
        columns = [{"feature": c, "status": status} for c in items] + [{"feature": "device", "status": "ok"}]
        return MonitorResult(monitor, d, status, details={"report": {"status": status, "columns": columns}})
    rows = [DashboardRow(m, "-", "x", status) for m in items] + [DashboardRow("Other", "-", "y", "ok")]
    return MonitorResult(monitor, d, status, rows=rows)


def results_of(d: str, data=("ok",), prediction=("ok",), performance=("ok",)) -> dict:
    return {
        "data_drift": result("data_drift", d, data[0], tuple(data[1:])),
        "prediction_drift": result("prediction_drift", d, prediction[0], tuple(prediction[1:])),
        "model_performance": result("model_performance", d, performance[0], tuple(performance[1:])),
        "serving_health": result("serving_health", d),
    }


class Labels:
    """Labelled post-drift rows by day: `enough_from` (index) on, 5,000 rows and 150 frauds; before, 100 and 2."""

    def __init__(self, enough_from: int = 0, rows: int = 5000):
        self.enough_from, self.rows, self.calls = enough_from, rows, []

    def __call__(self, start: date, d: date) -> tuple[int, int]:
        self.calls.append((start.isoformat(), d.isoformat()))
        i = (d - D0).days
        return (self.rows + 1000 * (i - self.enough_from), 150) if i >= self.enough_from else (100, 2)


class Driver:
    """Evaluates once per day as the daily sensor would, keeping the state as JSON between ticks."""

    def __init__(self, policy: rp.RetrainPolicy | None = None, labels: Labels | None = None):
        self.policy = policy or rp.RetrainPolicy()
        self.labels = labels or Labels()
        self.cursor: str | None = None
        self.outcomes: dict = {}

    def tick(self, results: dict) -> rp.Evaluation:
        state = json.loads(self.cursor) if self.cursor else None
        ev = rp.evaluate(state, results, outcomes=self.outcomes, count_labels=self.labels, policy=self.policy, now=NOW)
        self.cursor = json.dumps(ev.state)
        return ev

    def day(self, i: int, **signals) -> rp.Evaluation:
        return self.tick({day(i): results_of(day(i), **signals)})


DRIFT = ("alert", "amount", "merchant_category")


def test_an_alert_requests_one_retrain_with_the_reason_in_its_tags():
    d = Driver()
    ev = d.day(0, data=DRIFT)
    assert ev.action == "request" and len(ev.requests) == 1
    req = ev.requests[0]
    assert req.run_key == "retrain:2026-02-01:1"
    assert req.tags["ml_platform/retrain_day"] == "2026-02-01"
    reason = req.tags["ml_platform/retrain_reason"]
    assert reason.startswith("data_drift alert on 2026-02-01 (columns: amount, merchant_category)")
    assert "device" not in reason and "prediction_drift" not in reason
    assert "5000 labelled post-drift rows (150 frauds)" in reason
    assert d.labels.calls == [("2026-02-01", "2026-02-01")]
    # the rest of the episode: alerts every day, in flight, then done: nothing more
    d.outcomes = {req.run_key: (None, "run-1")}
    for i in range(1, 4):
        assert d.day(i, data=DRIFT, prediction=("alert", "Prediction positive rate")).requests == []
    d.outcomes = {req.run_key: (rp.PROMOTED, "run-1")}
    for i in range(4, 12):
        ev = d.day(i, data=DRIFT)
        assert ev.requests == []
    assert ev.state["episode"]["status"] == rp.RETRAINED
    assert ev.state["last_outcome"] == {"run_key": req.run_key, "outcome": "promoted", "run_id": "run-1",
                                        "episode_start": "2026-02-01"}


def test_two_signals_on_one_day_give_one_request_naming_both():
    ev = Driver().day(0, data=("alert", "amount"), performance=("alert", "PR AUC (7-day window)"))
    assert len(ev.requests) == 1
    reason = ev.requests[0].reason
    assert "data_drift alert on 2026-02-01 (columns: amount)" in reason
    assert "model_performance alert on 2026-02-01 (metrics: PR AUC (7-day window))" in reason


def test_warn_and_serving_health_do_not_trigger():
    d = Driver()
    assert d.day(0, data=("warn", "amount"), prediction=("warn", "x")).action == "nothing"
    results = results_of(day(1))
    results["serving_health"] = result("serving_health", day(1), "alert", ("Latency p99 (api)",))
    ev = d.tick({day(1): results})
    assert ev.action == "nothing" and ev.state["episode"] is None and ev.state["last_day"] == day(1)


def test_too_few_labels_waits_then_requests_once_enough_arrive():
    d = Driver(labels=Labels(enough_from=3))
    for i in range(3):
        ev = d.day(i, data=DRIFT)
        assert ev.action == "wait" and ev.requests == []
        assert "waiting for labelled post-drift rows (100 rows, 2 frauds so far)" in ev.message
    ev = d.day(3, prediction=("alert", "Prediction positive rate"))
    assert [r.run_key for r in ev.requests] == ["retrain:2026-02-01:1"]
    assert ev.requests[0].tags["ml_platform/retrain_day"] == day(3)
    assert "data_drift alert on 2026-02-01..2026-02-03" in ev.requests[0].reason
    assert "prediction_drift alert on 2026-02-04" in ev.requests[0].reason
    assert d.day(4, data=DRIFT).requests == []


def test_the_label_threshold_is_frauds_too():
    policy = rp.RetrainPolicy(min_labelled_rows=50, min_labelled_frauds=3)
    ev = Driver(policy, Labels(enough_from=99)).day(0, data=DRIFT)  # 100 rows but only 2 frauds
    assert ev.action == "wait"
    assert ev.state["episode"]["labelled_rows"] == 100 and ev.state["episode"]["labelled_frauds"] == 2


def test_quiet_days_close_the_episode_and_a_later_alert_requests_again():
    d = Driver()
    first = d.day(0, data=DRIFT).requests[0]
    d.outcomes = {first.run_key: (rp.PROMOTED, "r1")}
    assert d.day(1).state["episode"]["quiet_days"] == 1
    d.day(2)
    assert d.day(3, data=DRIFT).state["episode"]["quiet_days"] == 0  # an alert inside the episode resets the count
    for i in (4, 5):
        assert d.day(i).state["episode"] is not None
    ev = d.day(6)
    assert ev.state["episode"] is None
    assert ev.state["closed"][-1]["start_day"] == day(0) and ev.state["closed"][-1]["end_day"] == day(6)
    ev = d.day(7, prediction=("alert", "Prediction positive rate"))
    assert [r.run_key for r in ev.requests] == ["retrain:2026-02-08:1"]
    assert ev.requests[0].reason.startswith("prediction_drift alert on 2026-02-08")


def test_cooldown_holds_a_new_episode_too():
    d = Driver(rp.RetrainPolicy(cooldown_days=5, quiet_days_to_close=1))
    first = d.day(0, data=DRIFT).requests[0]
    d.outcomes = {first.run_key: (rp.PROMOTED, "r1")}
    assert d.day(1).state["episode"] is None  # closed
    assert d.day(2, data=DRIFT).requests == []  # new episode, within 5 days of the last request
    assert d.day(4, data=DRIFT).requests == []
    assert [r.run_key for r in d.day(5, data=DRIFT).requests] == ["retrain:2026-02-03:1"]


def test_a_failed_run_is_retried_once_after_the_cooldown_then_left_for_a_person():
    d = Driver(rp.RetrainPolicy(cooldown_days=3))
    first = d.day(0, data=DRIFT).requests[0]
    d.outcomes = {first.run_key: (rp.FAILED, "r1")}
    assert d.day(1, data=DRIFT).requests == []
    assert d.day(2, data=DRIFT).state["episode"]["status"] == rp.RETRY_PENDING
    ev = d.day(3, data=DRIFT)
    assert [r.run_key for r in ev.requests] == ["retrain:2026-02-01:2"]
    assert "attempt 2, previous retrain:2026-02-01:1 failed" in ev.requests[0].reason
    d.outcomes[ev.requests[0].run_key] = (rp.FAILED, "r2")
    for i in range(4, 15):
        ev = d.day(i, data=DRIFT)
        assert ev.requests == [], day(i)
    assert ev.state["episode"]["status"] == rp.NEEDS_ATTENTION
    assert "left for a person" in ev.message
    assert [a["outcome"] for a in ev.state["episode"]["attempts"]] == ["failed", "failed"]


def test_a_model_that_cannot_beat_the_champion_is_retried_with_more_labels_not_forced():
    d = Driver(rp.RetrainPolicy(cooldown_days=2, max_unpromoted_retries=1, min_labelled_rows=2000),
               Labels(enough_from=0, rows=5000))  # 5000 rows on day 0, +1000 a day
    first = d.day(0, data=DRIFT).requests[0]
    d.outcomes = {first.run_key: (rp.NOT_PROMOTED, "r1")}
    # cooldown over on day 2 (7000 rows) but the retry needs 5000 + 2000: day 2 has exactly 7000
    assert d.day(1, data=DRIFT).requests == []
    ev = d.day(2, data=DRIFT)
    assert [r.run_key for r in ev.requests] == ["retrain:2026-02-01:2"]
    d.outcomes[ev.requests[0].run_key] = (rp.NOT_PROMOTED, "r2")
    assert all(d.day(i, data=DRIFT).requests == [] for i in range(3, 10))
    assert json.loads(d.cursor)["episode"]["status"] == rp.NEEDS_ATTENTION


def test_a_request_whose_run_never_appears_is_recorded_missing_and_retried():
    d = Driver(rp.RetrainPolicy(cooldown_days=2))
    d.day(0, data=DRIFT)
    assert d.day(1, data=DRIFT).requests == []
    ev = d.day(2, data=DRIFT)
    assert [r.run_key for r in ev.requests] == ["retrain:2026-02-01:2"]
    assert ev.state["episode"]["attempts"][0]["outcome"] == rp.MISSING


def test_a_running_run_blocks_retries():
    d = Driver(rp.RetrainPolicy(cooldown_days=1))
    first = d.day(0, data=DRIFT).requests[0]
    d.outcomes = {first.run_key: (None, "r1")}  # queued / started
    for i in range(1, 6):
        assert d.day(i, data=DRIFT).requests == []
    assert json.loads(d.cursor)["episode"]["attempts"][0]["run_id"] == "r1"


def test_no_result_for_the_day_is_no_decision():
    d = Driver()
    d.day(0)
    ev = d.tick({})
    assert ev.action == "not_ready" and ev.requests == []
    assert ev.message == "no monitoring results after 2026-02-01 yet: nothing to decide"
    partial = results_of(day(1), data=DRIFT)
    del partial["model_performance"]
    ev = d.tick({day(1): partial})
    assert ev.action == "not_ready" and ev.requests == [] and ev.state["last_day"] == day(0)
    assert ev.message == "monitoring for 2026-02-02 has not run yet for model_performance: no decision until it has"
    # once a later day has results, the incomplete day is evaluated with what it has
    ev = d.tick({day(1): partial, day(2): results_of(day(2))})
    assert [r.run_key for r in ev.requests] == ["retrain:2026-02-02:1"] and ev.state["last_day"] == day(2)


def test_reevaluating_the_same_state_gives_the_same_run_key():
    """A daemon restart before the cursor was stored evaluates the old cursor again: same key."""
    state = None
    results = {day(0): results_of(day(0), data=DRIFT)}
    a = rp.evaluate(state, results, outcomes={}, count_labels=Labels(), policy=rp.RetrainPolicy(), now=NOW)
    b = rp.evaluate(state, results, outcomes={}, count_labels=Labels(), policy=rp.RetrainPolicy(), now=NOW)
    assert a.requests == b.requests
    again = rp.evaluate(a.state, results, outcomes={}, count_labels=Labels(), policy=rp.RetrainPolicy(), now=NOW)
    assert again.requests == [] and again.action == "not_ready"


def test_days_to_load():
    policy = rp.RetrainPolicy(initial_lookback_days=2)
    available = [day(i) for i in (3, 0, 1, 2)]
    assert rp.days_to_load(None, available, policy) == [day(2), day(3)]
    state = {**rp.empty_state(), "last_day": day(1)}
    assert rp.days_to_load(state, available, policy) == [day(2), day(3)]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"cooldown_days": -1}, "RetrainPolicy.cooldown_days = -1 must be an integer >= 0"),
    ({"min_labelled_rows": 0}, "RetrainPolicy.min_labelled_rows = 0 must be an integer >= 1"),
    ({"quiet_days_to_close": 1.5}, "RetrainPolicy.quiet_days_to_close = 1.5 must be an integer >= 1"),
    ({"trigger_status": "red"}, "RetrainPolicy.trigger_status = 'red' must be one of"),
    ({"signals": ()}, "RetrainPolicy.signals = () must be"),
    ({"min_labelled_rows": 10, "min_labelled_frauds": 11}, "RetrainPolicy.min_labelled_frauds = 11 must be <= "),
])
def test_policy_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        rp.RetrainPolicy(**kwargs)


def test_the_policy_is_the_monitoring_config_s_retrain_section(tmp_path):
    from ml_platform.monitoring.config import load_monitoring_config

    path = tmp_path / "monitoring.toml"
    path.write_text('[retrain]\ncooldown_days = 5\nsignals = ["data_drift"]\n')
    policy = load_monitoring_config(path).retrain
    assert policy.cooldown_days == 5 and policy.signals == ("data_drift",)
    assert policy.min_labelled_frauds == rp.RetrainPolicy().min_labelled_frauds == 100
    path.write_text("[retrain]\ncooldown = 5\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['cooldown'\] in \[retrain\]"):
        load_monitoring_config(path)
    path.write_text("[retrain]\nmin_labelled_frauds = 3000\n")
    with pytest.raises(ValueError, match="RetrainPolicy.min_labelled_frauds = 3000 must be <= min_labelled_rows"):
        load_monitoring_config(path)


def test_state_version_is_checked():
    with pytest.raises(ValueError, match="version 99 is not 1"):
        rp.parse_state({"version": 99})


def write_events(raw, d: date, ids, carried=None) -> None:
    """Raw events of `d` with the given ids; `carried`: {id: (is_fraud, label time)} known at write time."""
    import pyarrow as pa

    from ml_platform.sources import raw_events

    carried = carried or {}
    ts = pd.Timestamp(d, tz="UTC") + pd.Timedelta(hours=12)
    frame = {}
    for f in raw_events.TRANSACTIONS_ARROW_SCHEMA:
        if pa.types.is_string(f.type):
            frame[f.name] = list(ids) if f.name == "transaction_id" else ["x"] * len(ids)
        elif pa.types.is_timestamp(f.type):
            frame[f.name] = [ts] * len(ids)
        else:
            frame[f.name] = [1] * len(ids)
    frame = pd.DataFrame(frame)
    frame["is_fraud"] = pd.array([carried[i][0] if i in carried else None for i in ids], dtype="Int64")
    frame["label_timestamp"] = pd.to_datetime([carried[i][1] if i in carried else None for i in ids], utc=True)
    stamps = [f.name for f in raw_events.TRANSACTIONS_ARROW_SCHEMA if pa.types.is_timestamp(f.type)]
    raw_events.write_partition([frame.astype({c: "datetime64[us, UTC]" for c in stamps})], raw, d)


def test_count_post_drift_labels_counts_the_mature_labelled_events_from_the_episode_start(tmp_path):
    from ml_platform.sources import labels as lb

    raw = tmp_path / "raw"
    # events: 3 on Feb 1 (before the episode), 4 on Feb 2, 2 on Feb 3; a3 and b4 carry their labels
    write_events(raw, date(2026, 2, 1), ["a1", "a2", "a3"], {"a3": (1, "2026-02-02T08:00Z")})
    write_events(raw, date(2026, 2, 2), ["b1", "b2", "b3", "b4"], {"b4": (0, "2026-02-03T10:00Z")})
    write_events(raw, date(2026, 2, 3), ["c1", "c2"])

    def feed(d: date, rows):
        ts = pd.Timestamp(d, tz="UTC") + pd.Timedelta(hours=1)
        frame = pd.DataFrame({"transaction_id": [r[0] for r in rows], "merchant_id": [1] * len(rows),
                              "is_fraud": [r[1] for r in rows], "label_timestamp": [ts] * len(rows)})
        lb.write_labels(lb.coerce_labels(frame), raw, d)

    # arriving Feb 4: a1 (an old event), b1 fraud, b2, c1 fraud; Feb 6: b3; Feb 11: c2
    feed(date(2026, 2, 4), [("a1", 1), ("b1", 1), ("b2", 0), ("c1", 1)])
    feed(date(2026, 2, 6), [("b3", 0)])
    feed(date(2026, 2, 11), [("c2", 0)])
    # Labels settle 7 days after the event: at the end of Feb 8 no event from Feb 2 on is mature
    # (c1's early chargeback and b4's label are known but do not count yet).
    assert rp.count_post_drift_labels(raw, date(2026, 2, 2), date(2026, 2, 8)) == (0, 0)
    # end of Feb 9: Feb 2's events are mature: b1 (fraud), b2, b3 from the feed + b4 carried
    assert rp.count_post_drift_labels(raw, date(2026, 2, 2), date(2026, 2, 9)) == (4, 1)
    # end of Feb 10: Feb 3's too, with c1 (fraud); c2's label arrives only on Feb 11
    assert rp.count_post_drift_labels(raw, date(2026, 2, 2), date(2026, 2, 10)) == (5, 2)
    assert rp.count_post_drift_labels(raw, date(2026, 2, 2), date(2026, 2, 11)) == (6, 2)
    # from Feb 1, at the end of Feb 9: a1 (feed, fraud), a3 (carried, fraud) and the four of Feb 2
    assert rp.count_post_drift_labels(raw, date(2026, 2, 1), date(2026, 2, 9)) == (6, 3)
