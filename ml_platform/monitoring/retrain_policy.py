"""When monitoring asks for a retrain: the decision, as plain data in and out (no Dagster here; the
sensor in `ml_platform.defs.sensors` is a thin shell over `evaluate`).

The state (the sensor's cursor, JSON) walks the monitoring days in order, once each:

- A day is *alarming* when one of the policy's signals (data_drift, prediction_drift,
  model_performance) has the trigger status (`alert`). The first alarming day opens an *episode*;
  later alarms merge into it (their signals and columns are added to the reason).
- An open episode requests ONE retrain (`run_key` = "retrain:<episode start>:<attempt>", so a
  re-evaluation after a daemon restart yields the same key and Dagster launches nothing twice)
  once there is data to learn the new world from: at least `min_labelled_rows` labelled rows with
  at least `min_labelled_frauds` frauds among the transactions whose events are on or after the
  episode start, known at the end of the day being evaluated (`count_post_drift_labels`, from
  `read_known_labels`). Before that the episode *waits* (status waiting_for_labels).
- The attempt's run is looked up (by the sensor, in the Dagster instance) and its outcome recorded:
  promoted (done), not_promoted (the retrain could not beat the champion: recorded, retried after
  the cooldown once `min_labelled_rows` more post-drift labels have arrived, at most
  `max_unpromoted_retries` times, never forced), failed / missing (retried once after the cooldown,
  `max_failed_retries`, then left for a person: status needs_attention, no loop).
- No request less than `cooldown_days` after the previous one (any episode).
- `quiet_days_to_close` consecutive days with no alarm close the episode; a later alarm opens a
  NEW episode, which can request again.
- A day is evaluated once all signals have a result for it, or once a later day has results (a
  monitor that never ran for a day does not block the sensor forever). Nothing new: no decision.
- An empty state (first evaluation) starts `initial_lookback_days` before the latest day, so
  switching the sensor on over a long history does not act on alarms from months ago.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from ml_platform.monitoring.results import MonitorResult
from ml_platform.monitoring.status import ALERT, STATUSES

STATE_VERSION = 1
REASON_TAG = "ml_platform/retrain_reason"
DAY_TAG = "ml_platform/retrain_day"
EPISODE_TAG = "ml_platform/retrain_episode"
ATTEMPT_TAG = "ml_platform/retrain_attempt"
MAX_REASON_CHARS = 1000
MAX_ITEMS_NAMED = 6  # columns / metrics named per signal in the reason
KEEP_CLOSED = 10  # closed episodes kept in the state (the UI's cursor view stays readable)

# Outcomes of a retrain attempt (None: not known yet, the run is queued or in progress).
PROMOTED, NOT_PROMOTED, SUCCEEDED, FAILED, MISSING = "promoted", "not_promoted", "succeeded", "failed", "missing"
OUTCOMES = (PROMOTED, NOT_PROMOTED, SUCCEEDED, FAILED, MISSING)
DONE = (PROMOTED, SUCCEEDED)  # the world was learnt: nothing more for this episode

# Episode statuses.
WAITING, REQUESTED, RETRAINED, RETRY_PENDING, NEEDS_ATTENTION = (
    "waiting_for_labels", "requested", "retrained", "retry_pending", "needs_attention")


@dataclass(frozen=True)
class RetrainPolicy:
    """The thresholds of the retraining decision (defaults sized for the demo's ~3,000 events a day
    at a 0.8 % fraud rate: the labels of a week of post-drift events).

    signals: the monitors whose `trigger_status` opens an episode (serving_health is about the
      service, not the world: a retrain cannot fix latency).
    trigger_status: `alert` (a `warn` is statistically real but small: worth a look, not a retrain).
    min_labelled_rows / min_labelled_frauds: mature labelled post-drift rows needed to retrain
      (`count_post_drift_labels`: 2,000 rows and 100 frauds. Legit labels settle in 7 days and
      chargebacks take 1-30, so at the demo's volume that is about 12 days after the drift
      starts. The retrain's `drift_split` learns from the first half of those frauds' days and
      validates and tests on the rest, so the promotion gate compares on about 25 frauds. At 40
      frauds it compared on 15, where PR AUC's error (~0.07) is larger than the differences it
      decides: the default scenario's first attempt lost 0.839 to 0.876, and its retry 3 days
      later, on 29 frauds, won 0.847 to 0.796).
    cooldown_days: days between two requests (a retrain and its promotion take effect the next
      monitoring day; 3 days leave room for the new champion's own monitoring to settle).
    quiet_days_to_close: consecutive days without an alarm that end an episode (3: one quiet day
      inside a drift is common, three are a change).
    max_failed_retries: retries of a failed run (1: a transient fault gets a second chance, a broken
      pipeline is left for a person instead of looping).
    max_unpromoted_retries: retries of a run whose model did not beat the champion (2, each with at
      least `min_labelled_rows` more post-drift labels than the previous attempt).
    initial_lookback_days: an empty cursor evaluates only the last days of results (7).
    label_settling_days: how old a post-drift event must be for its labels to count (the features'
      LABEL_SETTLING, the rule the retrain's `drift_split` applies; 0 counts every known label).
    """

    signals: tuple[str, ...] = ("data_drift", "prediction_drift", "model_performance")
    trigger_status: str = ALERT
    min_labelled_rows: int = 2000
    min_labelled_frauds: int = 100
    cooldown_days: int = 3
    quiet_days_to_close: int = 3
    max_failed_retries: int = 1
    max_unpromoted_retries: int = 2
    initial_lookback_days: int = 7
    label_settling_days: int = field(default_factory=lambda: _features().LABEL_SETTLING.days)

    def __post_init__(self) -> None:
        object.__setattr__(self, "signals", tuple(self.signals))
        _check(len(self.signals) > 0 and all(isinstance(s, str) and s for s in self.signals),
               "signals", self.signals, "a non-empty tuple of monitor names")
        _check(self.trigger_status in STATUSES, "trigger_status", self.trigger_status, f"one of {STATUSES}")
        for name, low in (("min_labelled_rows", 1), ("min_labelled_frauds", 0), ("cooldown_days", 0),
                          ("quiet_days_to_close", 1), ("max_failed_retries", 0), ("max_unpromoted_retries", 0),
                          ("initial_lookback_days", 1), ("label_settling_days", 0)):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= low, name, value,
                   f"an integer >= {low}")
        _check(self.min_labelled_frauds <= self.min_labelled_rows, "min_labelled_frauds", self.min_labelled_frauds,
               f"<= min_labelled_rows ({self.min_labelled_rows})")


def _features():
    from ml_platform import features

    return features


def _check(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise ValueError(f"RetrainPolicy.{name} = {value!r} must be {rule}")


@dataclass(frozen=True)
class RetrainRequest:
    run_key: str
    tags: dict[str, str]
    reason: str


@dataclass
class Evaluation:
    """What one evaluation decided: `action` is request | wait | nothing | not_ready; `state` is the
    new cursor (always safe to store), `message` the text a SkipReason shows."""

    action: str
    state: dict[str, Any]
    requests: list[RetrainRequest] = field(default_factory=list)
    message: str = ""
    log: list[str] = field(default_factory=list)


LabelCounter = Callable[[date, date], tuple[int, int]]  # (episode start, day) -> (labelled rows, frauds)


def empty_state() -> dict[str, Any]:
    return {"version": STATE_VERSION, "last_day": None, "last_request_day": None, "episode": None,
            "last_outcome": None, "closed": []}


def parse_state(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of a stored state (None or {}: the empty state); an unknown version is an error."""
    if not data:
        return empty_state()
    if data.get("version") != STATE_VERSION:
        raise ValueError(f"retrain state: version {data.get('version')!r} is not {STATE_VERSION}")
    return {**empty_state(), **copy.deepcopy(dict(data))}


def days_to_load(state: Mapping[str, Any] | None, available: Iterable[str], policy: RetrainPolicy) -> list[str]:
    """The days (YYYY-MM-DD, sorted) whose results an evaluation needs: after the state's last day,
    or the last `initial_lookback_days` of `available` for an empty state."""
    state = parse_state(state)
    days = sorted(set(available))
    if state["last_day"] is not None:
        return [d for d in days if d > state["last_day"]]
    return days[-policy.initial_lookback_days:]


def alarms(results: Mapping[str, MonitorResult | None], policy: RetrainPolicy) -> dict[str, list[str]]:
    """{signal: the columns (data drift) or metrics at the trigger status} of one day's results."""
    found: dict[str, list[str]] = {}
    for monitor in policy.signals:
        result = results.get(monitor)
        if result is None or result.status != policy.trigger_status:
            continue
        columns = (result.details.get("report") or {}).get("columns") if monitor == "data_drift" else None
        if columns:
            items = [c["feature"] for c in columns if c.get("status") == policy.trigger_status]
        else:
            items = [r.metric for r in result.rows if r.status == policy.trigger_status]
        found[monitor] = items
    return found


def evaluate(state: Mapping[str, Any] | None, results: Mapping[str, Mapping[str, MonitorResult | None]], *,
             outcomes: Mapping[str, tuple[str | None, str | None]], count_labels: LabelCounter,
             policy: RetrainPolicy, now: datetime) -> Evaluation:
    """Walk the days of `results` ({day: {monitor: result}}, days after the state's last day) and
    decide. `outcomes`: {run_key: (outcome or None while running, run id)} of the state's attempts;
    `count_labels(start, day)`: labelled post-drift rows and frauds known at the end of `day`."""
    state = parse_state(state)
    log: list[str] = []
    _record_outcomes(state, outcomes, log)
    days = sorted(d for d in results if state["last_day"] is None or d > state["last_day"])
    ready, blocked = [], None
    for i, day in enumerate(days):
        missing = [m for m in policy.signals if results[day].get(m) is None]
        if missing and i == len(days) - 1:
            blocked = (day, missing)
            break
        ready.append(day)
    requests: list[RetrainRequest] = []
    for day in ready:
        request = _step(state, day, results[day], policy, count_labels, now, log)
        if request is not None:
            requests.append(request)
        state["last_day"] = day
    episode = state["episode"]
    if requests:
        return Evaluation("request", state, requests, "; ".join(r.reason for r in requests), log)
    if not ready:
        if blocked:
            message = (f"monitoring for {blocked[0]} has not run yet for {', '.join(blocked[1])}: "
                       "no decision until it has")
        else:
            message = f"no monitoring results after {state['last_day'] or 'the start'} yet: nothing to decide"
        if episode is not None:
            message += f" ({_describe(episode)})"
        return Evaluation("not_ready", state, [], message, log)
    through = f"evaluated up to {state['last_day']}"
    if episode is None:
        return Evaluation("nothing", state, [], f"{through}: no open drift episode", log)
    action = "wait" if episode["status"] in (WAITING, RETRY_PENDING) else "nothing"
    return Evaluation(action, state, [], f"{through}: {_describe(episode)}", log)


def _record_outcomes(state: dict, outcomes: Mapping[str, tuple[str | None, str | None]], log: list[str]) -> None:
    episode = state["episode"]
    if episode is None:
        return
    for attempt in episode["attempts"]:
        if attempt["outcome"] is not None or attempt["run_key"] not in outcomes:
            continue
        outcome, run_id = outcomes[attempt["run_key"]]
        if run_id:
            attempt["run_id"] = run_id  # the run exists (queued or running while outcome is None)
        if outcome is None:
            continue
        if outcome not in OUTCOMES:
            raise ValueError(f"retrain outcome of {attempt['run_key']}: {outcome!r} is not one of {OUTCOMES}")
        attempt["outcome"], attempt["run_id"] = outcome, run_id
        state["last_outcome"] = {"run_key": attempt["run_key"], "outcome": outcome, "run_id": run_id,
                                 "episode_start": episode["start_day"]}
        log.append(f"retrain {attempt['run_key']}: {outcome}" + (f" (run {run_id})" if run_id else ""))
        episode["status"] = _status_after(episode)


def _status_after(episode: dict) -> str:
    last = episode["attempts"][-1] if episode["attempts"] else None
    if last is None:
        return WAITING
    if last["outcome"] is None:
        return REQUESTED
    if last["outcome"] in DONE:
        return RETRAINED
    return RETRY_PENDING


def _step(state: dict, day: str, results: Mapping[str, MonitorResult | None], policy: RetrainPolicy,
          count_labels: LabelCounter, now: datetime, log: list[str]) -> RetrainRequest | None:
    found = alarms(results, policy)
    episode = state["episode"]
    if episode is None and not found:
        return None
    if episode is None:
        episode = state["episode"] = {"start_day": day, "last_alert_day": day, "quiet_days": 0, "signals": {},
                                      "status": WAITING, "labelled_rows": None, "labelled_frauds": None,
                                      "attempts": []}
        log.append(f"{day}: drift episode opened by {', '.join(found)}")
    if found:
        episode["last_alert_day"], episode["quiet_days"] = day, 0
        for signal, items in found.items():
            seen = episode["signals"].setdefault(signal, {"first_day": day, "last_day": day, "items": []})
            seen["last_day"] = day
            seen["items"] += [i for i in items if i not in seen["items"]]
    else:
        episode["quiet_days"] += 1
        if episode["quiet_days"] >= policy.quiet_days_to_close:
            _close(state, day, log)
            return None
    return _maybe_request(state, episode, day, policy, count_labels, now, log)


def _close(state: dict, day: str, log: list[str]) -> None:
    episode = state["episode"]
    summary = {"start_day": episode["start_day"], "end_day": day, "last_alert_day": episode["last_alert_day"],
               "status": episode["status"], "signals": sorted(episode["signals"]),
               "attempts": [(a["run_key"], a["outcome"]) for a in episode["attempts"]]}
    state["closed"] = (state["closed"] + [summary])[-KEEP_CLOSED:]
    state["episode"] = None
    log.append(f"{day}: drift episode of {episode['start_day']} closed after {episode['quiet_days']} quiet day(s)")


def _maybe_request(state: dict, episode: dict, day: str, policy: RetrainPolicy, count_labels: LabelCounter,
                   now: datetime, log: list[str]) -> RetrainRequest | None:
    attempts = episode["attempts"]
    last = attempts[-1] if attempts else None
    if last is not None:
        if last["outcome"] is None and last["run_id"] is None and _days(last["day"], day) >= max(1, policy.cooldown_days):
            last["outcome"] = MISSING  # requested, yet no run was ever seen: count it as failed
            state["last_outcome"] = {"run_key": last["run_key"], "outcome": MISSING, "run_id": None,
                                     "episode_start": episode["start_day"]}
            log.append(f"{day}: no run of {last['run_key']} was found since {last['day']}: recorded as missing")
        if last["outcome"] is None or last["outcome"] in DONE:
            return None  # running, or the retrain is done: one episode, one retrain
        failed = sum(a["outcome"] in (FAILED, MISSING) for a in attempts)
        unpromoted = sum(a["outcome"] == NOT_PROMOTED for a in attempts)
        if (last["outcome"] == NOT_PROMOTED and unpromoted > policy.max_unpromoted_retries) or (
                last["outcome"] != NOT_PROMOTED and failed > policy.max_failed_retries):
            if episode["status"] != NEEDS_ATTENTION:
                log.append(f"{day}: retrain of the episode of {episode['start_day']} gave up after "
                           f"{len(attempts)} attempt(s) ({last['outcome']}): left for a person")
            episode["status"] = NEEDS_ATTENTION
            return None
    if state["last_request_day"] is not None and _days(state["last_request_day"], day) < policy.cooldown_days:
        episode["status"] = _status_after(episode) if last else WAITING
        return None
    rows, frauds = count_labels(date.fromisoformat(episode["start_day"]), date.fromisoformat(day))
    episode["labelled_rows"], episode["labelled_frauds"] = int(rows), int(frauds)
    needed_rows = policy.min_labelled_rows
    if last is not None and last["outcome"] == NOT_PROMOTED:
        needed_rows = last["labelled_rows"] + policy.min_labelled_rows  # more of the new world, or no point
    if rows < needed_rows or frauds < policy.min_labelled_frauds:
        episode["status"] = WAITING if last is None else RETRY_PENDING
        return None
    number = len(attempts) + 1
    run_key = f"retrain:{episode['start_day']}:{number}"
    reason = _reason(episode, number, last, rows, frauds)
    attempts.append({"run_key": run_key, "day": day, "requested_at": now.isoformat(), "labelled_rows": int(rows),
                     "labelled_frauds": int(frauds), "outcome": None, "run_id": None})
    episode["status"] = REQUESTED
    state["last_request_day"] = day
    log.append(f"{day}: retrain requested ({run_key})")
    tags = {REASON_TAG: reason, DAY_TAG: day, EPISODE_TAG: episode["start_day"], ATTEMPT_TAG: str(number)}
    return RetrainRequest(run_key=run_key, tags=tags, reason=reason)


def _reason(episode: dict, number: int, last: dict | None, rows: int, frauds: int) -> str:
    parts = []
    for signal, seen in episode["signals"].items():
        span = seen["first_day"] if seen["first_day"] == seen["last_day"] else f"{seen['first_day']}..{seen['last_day']}"
        items = seen["items"][:MAX_ITEMS_NAMED]
        more = len(seen["items"]) - len(items)
        named = ", ".join(items) + (f" and {more} more" if more > 0 else "")
        what = "columns" if signal == "data_drift" else "metrics"
        parts.append(f"{signal} alert on {span}" + (f" ({what}: {named})" if named else ""))
    text = "; ".join(parts) + f"; {rows} labelled post-drift rows ({frauds} frauds)"
    if last is not None:
        text += f"; attempt {number}, previous {last['run_key']} {last['outcome']}"
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def _describe(episode: dict) -> str:
    start, status = episode["start_day"], episode["status"]
    if status == WAITING:
        return (f"drift episode of {start} waiting for labelled post-drift rows "
                f"({episode['labelled_rows']} rows, {episode['labelled_frauds']} frauds so far)")
    if status == REQUESTED:
        return f"drift episode of {start}: retrain {episode['attempts'][-1]['run_key']} requested, waiting for its run"
    if status == RETRAINED:
        return f"drift episode of {start}: retrained ({episode['attempts'][-1]['run_key']}), waiting for quiet days"
    if status == RETRY_PENDING:
        last = episode["attempts"][-1]
        return f"drift episode of {start}: {last['run_key']} {last['outcome']}, retry after the cooldown"
    return (f"drift episode of {start}: {len(episode['attempts'])} retrain attempt(s) did not succeed, "
            "left for a person (see the retrain runs)")


def _days(first: str, last: str) -> int:
    return (date.fromisoformat(last) - date.fromisoformat(first)).days


def count_post_drift_labels(raw_dir: str | Path, start: date, day: date, settling_days: int | None = None
                            ) -> tuple[int, int]:
    """(labelled rows, frauds) a retrain at the end of `day` could learn from: the labels known then
    of the *mature* transactions from `start` on, those of the days [start, day - settling_days]
    (default: the features' LABEL_SETTLING) whose legit labels have all arrived (the rows
    `training.dataset.drift_split` uses; the early chargebacks of younger events do not count)."""
    from datetime import timedelta

    from ml_platform import features as fr
    from ml_platform.membership import is_in
    from ml_platform.monitoring.daily import raw_transaction_ids
    from ml_platform.sources.labels import read_known_labels

    settling = fr.LABEL_SETTLING if settling_days is None else timedelta(days=settling_days)
    last_mature = day - settling  # its events' labels have all arrived by the end of `day`
    if last_mature < start:
        return 0, 0
    labels = read_known_labels(raw_dir, until=day, events_since=start)
    if labels.empty:
        return 0, 0
    post = labels[is_in(labels["transaction_id"], raw_transaction_ids(Path(raw_dir), start, last_mature))]
    return len(post), int(post[fr.LABEL].sum())
