"""What a scenario showed: one record per simulated day, the goals the issue sets, the table and
the JSON (`data/reports/scenario_<name>.json`). Plain data: the driver fills it, tests read it.

The goals (each a name -> {ok, detail}):
- both scenarios: no alert and no retrain on the days before the onset (the quiet scenario: on all
  its days, so zero alerts over the 60 days);
- drift: a data-drift alert within 2 days of the onset (on the onset day or one of the 2 after);
  one retrain episode: its retrains share the episode, each but the last could not beat the
  champion (the policy retries those, at most `max_unpromoted_retries` times), the last promoted,
  so the champion changes once; that retrain promoted because its
  PR AUC on the post-drift held-out rows is above the old champion's on the same rows;
  the rollback drill (`ml-platform rollback` against a running API) served the old champion
  again within 5 s.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ml_platform.atomic_files import write_text_atomic
from ml_platform.monitoring.retrain_policy import NOT_PROMOTED, PROMOTED, RetrainPolicy
from ml_platform.monitoring.status import ALERT
from ml_platform.scenario.plan import ScenarioPlan

ALERT_WITHIN_DAYS = 2  # a data-drift alert on the onset day or one of the 2 days after it
ROLLBACK_WITHIN_S = 5.0  # serving picks a rollback up within this long


@dataclass
class DayRecord:
    """One simulated day: what monitoring said, what the sensor did, who was champion after it."""

    number: int
    date: str
    statuses: dict[str, str] = field(default_factory=dict)  # monitor -> ok | pending | warn | alert | no_data
    alert_details: dict[str, str] = field(default_factory=dict)  # monitor -> what alerted (columns, metrics)
    monitored_version: int | None = None  # the champion monitoring compared the day with
    champion_version: int | None = None  # the champion at the end of the day (after any retrain)
    champion_pr_auc: float | None = None  # the champion's PR AUC over the mature labelled days known then
    retrain_run_key: str | None = None  # a retrain the sensor requested this day
    retrain_reason: str | None = None
    retrain_run_id: str | None = None
    retrain_outcome: str | None = None  # promoted | not_promoted | failed
    promotion: dict[str, Any] = field(default_factory=dict)  # the gate's figures when a retrain registered
    sensor_message: str = ""  # the retrain sensor's skip reason (no request)
    runs: dict[str, str] = field(default_factory=dict)  # job -> run id
    seconds: float = 0.0

    @property
    def alerts(self) -> list[str]:
        return sorted(m for m, s in self.statuses.items() if s == ALERT)


@dataclass
class ScenarioReport:
    plan: ScenarioPlan
    days: list[DayRecord] = field(default_factory=list)
    initial_champion: int | None = None
    setup_seconds: float = 0.0
    rollback: dict[str, Any] = field(default_factory=dict)  # the drill: from, to, seconds until served
    cost: dict[str, Any] = field(default_factory=dict)  # the cost report's summary after the last day
    data_dir: str = ""

    # --- the goals -----------------------------------------------------------------------------
    def _before_onset(self) -> list[DayRecord]:
        onset = self.plan.onset
        return [d for d in self.days if onset is None or dt.date.fromisoformat(d.date) < onset]

    def goals(self) -> dict[str, dict[str, Any]]:
        before = self._before_onset()
        span = "all days" if self.plan.onset is None else f"days 1-{self.plan.drift_day - 1}"
        alerted = [f"day {d.number} ({', '.join(d.alerts)})" for d in before if d.alerts]
        retrained = [f"day {d.number}" for d in before if d.retrain_run_key]
        goals = {
            "no_alert_before_drift": _goal(not alerted, f"no alert on {span}" if not alerted
                                           else f"alerts on {span}: {'; '.join(alerted[:10])}"),
            "no_retrain_before_drift": _goal(not retrained, f"no retrain on {span}" if not retrained
                                             else f"retrains on {span}: {', '.join(retrained)}"),
        }
        if self.plan.onset is None:
            return goals
        onset = self.plan.onset
        first_alert = next((d for d in self.days if dt.date.fromisoformat(d.date) >= onset
                            and d.statuses.get("data_drift") == ALERT), None)
        lag = None if first_alert is None else (dt.date.fromisoformat(first_alert.date) - onset).days
        goals["data_drift_alert_within_2_days"] = _goal(
            lag is not None and lag <= ALERT_WITHIN_DAYS,
            "no data-drift alert after the onset" if lag is None
            else f"first data-drift alert on day {first_alert.number}, {lag} day(s) after the onset",
        )
        requests = [d for d in self.days if d.retrain_run_key]
        goals["one_retrain_episode"] = _goal(
            one_episode(requests),
            f"{len(requests)} retrain(s) requested: "
            + ", ".join(f"day {d.number} ({d.retrain_run_key}, {d.retrain_outcome})" for d in requests),
        )
        promoted = next((d for d in requests if d.retrain_outcome == "promoted"), None)
        gate = (promoted.promotion if promoted else {}) or {}
        challenger, champion = gate.get("challenger_metric"), gate.get("champion_metric")
        better = challenger is not None and champion is not None and challenger > champion
        goals["retrain_promoted_because_better_after_drift"] = _goal(
            promoted is not None and better and "after the drift" in str(gate.get("compared_on", "")),
            "no retrain was promoted" if promoted is None else
            f"v{gate.get('version')} {gate.get('promotion_metric')} {_fmt(challenger)} vs champion "
            f"v{gate.get('champion_before')} {_fmt(champion)} on {gate.get('compared_on')}",
        )
        if self.rollback:
            seconds = self.rollback.get("seconds")
            ok = (seconds is not None and seconds <= ROLLBACK_WITHIN_S
                  and self.rollback.get("served") == self.rollback.get("to"))
            goals["rollback_served_within_5_s"] = _goal(
                ok, f"champion v{self.rollback.get('from')} -> v{self.rollback.get('to')}; the API served "
                f"v{self.rollback.get('served')} after {_fmt(seconds, '.2f')} s" if seconds is not None
                else f"rollback drill failed: {self.rollback.get('error')}",
            )
        return goals

    @property
    def ok(self) -> bool:
        return all(g["ok"] for g in self.goals().values())

    # --- output -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.plan.to_dict(),
            "ok": self.ok,
            "goals": self.goals(),
            "initial_champion": self.initial_champion,
            "setup_seconds": round(self.setup_seconds, 1),
            "seconds": round(self.setup_seconds + sum(d.seconds for d in self.days), 1),
            "rollback": self.rollback,
            "cost": self.cost,
            "data_dir": self.data_dir,
            "days": [{**asdict(d), "alerts": d.alerts, "seconds": round(d.seconds, 1)} for d in self.days],
        }

    def save(self, reports_dir: str | Path) -> Path:
        path = Path(reports_dir) / f"scenario_{self.plan.name}.json"
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    def table(self) -> str:
        """The day-by-day table: date, alerts, retrain requested, champion version, its PR AUC."""
        header = f"{'day':>3}  {'date':10}  {'alerts':34}  {'retrain':30}  {'champion':>8}  {'PR AUC':>6}"
        lines = [header, "-" * len(header)]
        for d in self.days:
            retrain = "" if not d.retrain_run_key else f"requested -> {d.retrain_outcome or 'running'}"
            onset = " <- drift starts" if self.plan.onset and d.date == self.plan.onset.isoformat() else ""
            lines.append(f"{d.number:>3}  {d.date:10}  {', '.join(d.alerts) or '-':34}  {retrain or '-':30}  "
                         f"{'v' + str(d.champion_version) if d.champion_version else '-':>8}  "
                         f"{_fmt(d.champion_pr_auc):>6}{onset}")
        return "\n".join(lines)

    def goals_text(self) -> str:
        return "\n".join(f"  [{'x' if g['ok'] else ' '}] {name}: {g['detail']}" for name, g in self.goals().items())


def _goal(ok: bool, detail: str) -> dict[str, Any]:
    return {"ok": bool(ok), "detail": detail}


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def one_episode(requests: list[DayRecord], policy: RetrainPolicy | None = None) -> bool:
    """The drift scenario's retrains are one episode's: the same episode in every run key, each
    attempt but the last not promoted (the champion stayed better on the post-drift rows: the
    policy's retry), the last promoted, within the policy's retries."""
    policy = policy or RetrainPolicy()
    if not requests or len(requests) > 1 + policy.max_unpromoted_retries:
        return False
    episodes = {d.retrain_run_key.rsplit(":", 1)[0] for d in requests}
    return (len(episodes) == 1 and all(d.retrain_outcome == NOT_PROMOTED for d in requests[:-1])
            and requests[-1].retrain_outcome == PROMOTED)  # fmt: skip
