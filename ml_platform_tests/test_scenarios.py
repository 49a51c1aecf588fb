"""Issue 9's proof, end to end: `ml-platform demo --scenario drift` and `--scenario quiet`, 60 days
each, day by day through Dagster's schedule and sensors on a simulated clock, on a smaller
population than the demo's (`scenario_runs.CI_POPULATION`), run side by side as the user runs
them (the CLI, in two processes started right after collection: `scenario_runs`). Every goal of
the issue is asserted on the reports the commands write, and the retrain is looked up in the
scenario's Dagster instance with its tags.
"""

from __future__ import annotations

import pytest
import scenario_runs

from ml_platform.monitoring.retrain_policy import RetrainPolicy

# The first test waits for the two scenarios (the module fixture): up to their own time limit.
pytestmark = pytest.mark.timeout(scenario_runs.TIMEOUT_S + 60)

@pytest.fixture(scope="module")
def scenarios():
    runs = scenario_runs.start()  # normally already running: conftest starts them after collection
    try:
        out = scenario_runs.finish(runs)
        for name, result in out.items():
            assert result["report"] is not None, (
                f"{name}: no report (exit {result['exit']}); output:\n{result['log'][-4000:]}")
        yield out
    finally:
        scenario_runs.cleanup(runs)


def _goal(scenario: dict, name: str) -> dict:
    return scenario["report"]["goals"][name]


def _table(scenario: dict) -> str:
    return "\n".join(line for line in scenario["log"].splitlines() if line[:3].strip().isdigit() or "day" in line[:4])


def test_quiet_scenario_has_no_alert_and_no_retrain_in_60_days(scenarios):
    quiet = scenarios["quiet"]
    days = quiet["report"]["days"]
    assert len(days) == 60
    alerts = {d["date"]: d["alerts"] for d in days if d["alerts"]}
    assert not alerts, f"alerts on quiet days: {alerts}\n{_table(quiet)}"
    assert not [d for d in days if d["retrain_run_key"]]
    assert _goal(quiet, "no_alert_before_drift")["ok"] and _goal(quiet, "no_retrain_before_drift")["ok"]
    # every day was monitored against the one champion, with labelled performance once labels arrived
    assert {d["monitored_version"] for d in days} == {quiet["report"]["initial_champion"]}
    assert all(d["statuses"].get("data_drift") in ("ok", "warn") for d in days)
    assert sum(d["champion_pr_auc"] is not None for d in days) >= 40
    assert quiet["exit"] == 0, quiet["log"][-3000:]


def test_drift_scenario_alerts_at_the_onset_and_retrains_once_for_the_better(scenarios):
    drift = scenarios["drift"]
    report, days = drift["report"], drift["report"]["days"]
    table = _table(drift)
    assert report["scenario"]["onset"] == days[39]["date"], "day 40 is the onset"
    assert not [d for d in days[:39] if d["alerts"]], f"alerts before the drift:\n{table}"
    assert not [d for d in days[:39] if d["retrain_run_key"]]
    first = next(d for d in days[39:] if d["statuses"].get("data_drift") == "alert")
    assert first["number"] <= 42, f"data-drift alert only on day {first['number']}:\n{table}"
    # One episode: a retrain whose model cannot beat the champion on the post-drift rows is retried
    # (the policy's max_unpromoted_retries, each with more labels); the last one is promoted.
    requests = [d for d in days if d["retrain_run_key"]]
    assert 1 <= len(requests) <= 1 + RetrainPolicy().max_unpromoted_retries, f"{len(requests)} retrains:\n{table}"
    assert {d["retrain_run_key"].rsplit(":", 1)[0] for d in requests} == {f"retrain:{report['scenario']['onset']}"}
    assert [d["retrain_outcome"] for d in requests[:-1]] == ["not_promoted"] * (len(requests) - 1), table
    for lost in requests[:-1]:  # not promoted because the champion was better on the same rows
        assert lost["promotion"]["challenger_metric"] <= lost["promotion"]["champion_metric"], lost["promotion"]
    retrain = requests[-1]
    assert retrain["retrain_outcome"] == "promoted", f"{retrain['promotion']}\n{table}"
    gate = retrain["promotion"]
    # promoted because it is better on the post-drift labelled rows, and it is
    assert "after the drift" in gate["compared_on"]
    assert gate["challenger_metric"] > gate["champion_metric"], gate
    assert gate["champion_before"] == report["initial_champion"]
    # the champion changed that day and stayed
    later = [d["champion_version"] for d in days if d["number"] >= retrain["number"]]
    assert set(later) == {gate["version"]} and gate["version"] != report["initial_champion"]
    # the rollback drill: ml-platform rollback restored the old champion, served within 5 s
    rollback = report["rollback"]
    assert rollback["to"] == report["initial_champion"] and rollback["served"] == rollback["to"], rollback
    assert rollback["seconds"] <= 5.0, rollback
    assert all(g["ok"] for g in report["goals"].values()), report["goals"]
    assert drift["exit"] == 0, drift["log"][-3000:]


def test_the_retrain_is_a_dagster_run_with_its_reason_tags(scenarios):
    import dagster as dg

    drift = scenarios["drift"]
    requests = [d for d in drift["report"]["days"] if d["retrain_run_key"]]
    retrain = requests[-1]  # the promoted one (earlier attempts could not beat the champion)
    instance = dg.DagsterInstance.from_config(str(drift["data_dir"] / "dagster_home"))
    try:
        runs = instance.get_runs(dg.RunsFilter(job_name="retrain"))  # newest first
        assert [r.run_id for r in runs] == [d["retrain_run_id"] for d in reversed(requests)]
        tags = runs[0].tags
        assert tags["dagster/run_key"] == retrain["retrain_run_key"]
        assert tags["dagster/sensor_name"] == "retrain_sensor"
        assert tags["ml_platform/retrain_episode"] == drift["report"]["scenario"]["onset"]
        assert tags["ml_platform/retrain_day"] == retrain["date"]
        assert "data_drift" in tags["ml_platform/retrain_reason"]
        assert runs[0].status == dg.DagsterRunStatus.SUCCESS
        # the daily runs came from the schedule and the run-status sensor, one per day
        scoring = instance.get_runs(dg.RunsFilter(job_name="daily_scoring"))
        monitoring = instance.get_runs(dg.RunsFilter(job_name="daily_monitoring"))
        assert len(scoring) == len(monitoring) == 60
        assert {r.tags.get("dagster/schedule_name") for r in scoring} == {"daily_scoring_schedule"}
        assert {r.tags.get("dagster/sensor_name") for r in monitoring} == {"monitor_after_scoring"}
    finally:
        instance.dispose()


def test_one_retrain_episode_goal():
    """The goal's rule on hand-made days: retries of a model that lost, then a promotion."""
    from ml_platform.scenario.report import DayRecord, one_episode

    def day(n, key, outcome):
        return DayRecord(number=n, date=f"2026-11-{n:02d}", retrain_run_key=key, retrain_outcome=outcome)

    lost, won = day(1, "retrain:2026-11-01:1", "not_promoted"), day(4, "retrain:2026-11-01:2", "promoted")
    assert one_episode([won]) and one_episode([lost, won])
    assert not one_episode([])  # no retrain at all
    assert not one_episode([lost])  # never promoted
    assert not one_episode([won, day(7, "retrain:2026-11-01:2", "promoted")])  # the champion changed twice
    assert not one_episode([lost, day(4, "retrain:2026-11-03:1", "promoted")])  # two episodes
    assert not one_episode([day(1, "retrain:2026-11-01:1", "failed"), won])  # a failure is not a lost comparison
    retries = [day(i, f"retrain:2026-11-01:{i}", "not_promoted") for i in range(1, 4)]
    assert not one_episode([*retries, day(9, "retrain:2026-11-01:4", "promoted")])  # beyond the policy's 2 retries
