"""Infrastructure cost, training vs serving: measured compute turned into USD with configurable
unit prices, and the cost per 1,000 predictions per model version and serving path.

What is measured, and how it is billed (each path is billed the way it would be deployed):
- training: the wall seconds of the training steps (feature tables, training set, train,
  evaluate, register) of every run that registered a version, x `step_vcpus` vCPUs at
  `usd_per_cpu_hour` (jobs run on demand: pay for what they use). Per model version; also shown
  amortized over the predictions that version made on every path.
- batch: the wall seconds of each `batch_predictions` step and the rows it scored, billed the
  same way. Per model version.
- online (the HTTP API) and stream (the stream worker) are always on: they are billed their
  replica hours over the period (`api_replicas` / `stream_workers` x `usd_per_serving_instance_hour`
  x period hours), whatever the traffic. The CPU they really used (`ServingCpu`, e.g. the API's
  `process_cpu_seconds_total`) is shown apart as `compute_usd` (what the same predictions would
  cost billed per busy CPU second, the floor at 100 % utilization) with the replicas'
  utilization: it runs inside the replicas, so it is not added to their price. With 0 replicas
  (pay-per-use serving), the CPU is the bill.
Predictions per (path, model version) come from the prediction log (batch: from the steps' rows).
A figure that was not measured is None ("not measured"), never 0.

Prices: `UnitPrices` (defaults below, with their source); a deployment overrides them in a TOML
file (`load_unit_prices`):

    [prices]
    usd_per_cpu_hour = 0.0416
    api_replicas = 2
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

TRAINING, BATCH, ONLINE, STREAM = "training", "batch", "online", "stream"
SERVING_PATHS = (BATCH, ONLINE, STREAM)
STEP_KINDS = (TRAINING, BATCH)
LOG_SOURCE = {BATCH: "batch", ONLINE: "api", STREAM: "stream"}  # the prediction log's `source` of a path
NOT_MEASURED = "not measured"
COST_CONFIG_ENV = "ML_PLATFORM_COST_CONFIG"


@dataclass(frozen=True)
class UnitPrices:
    """Unit prices. Defaults: AWS EC2 on-demand, us-east-1, Linux, m5.large (2 vCPU, 8 GiB) at
    0.096 USD/h (the public price list, 2024-2026): 0.048 USD per vCPU hour, and one such instance
    per always-on replica. Memory is included in the instance price; `usd_per_gb_hour` (e.g.
    Fargate's 0.004445) adds `step_memory_gb` per step hour when a deployment bills it apart."""

    usd_per_cpu_hour: float = 0.048
    step_vcpus: float = 1.0  # vCPUs a Dagster step is billed for over its wall time
    usd_per_gb_hour: float = 0.0
    step_memory_gb: float = 0.0
    usd_per_serving_instance_hour: float = 0.096
    serving_instance_vcpus: float = 2.0  # for the replicas' utilization
    api_replicas: int = 1
    stream_workers: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            integer = f.type in ("int", int)
            if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
                kind = "an integer" if integer else "a number"
                raise ValueError(f"unit prices: {f.name} = {value!r} must be {kind}")  # noqa: TRY004 - config error
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"unit prices: {f.name} = {value!r} must be a finite number >= 0")
        for name in ("step_vcpus", "serving_instance_vcpus"):
            if getattr(self, name) <= 0:
                raise ValueError(f"unit prices: {name} = {getattr(self, name)!r} must be > 0")

    def step_usd(self, seconds: float) -> float:
        """What `seconds` of one Dagster step cost (vCPUs and, if priced, memory)."""
        hours = seconds / 3600.0
        return hours * (self.step_vcpus * self.usd_per_cpu_hour + self.step_memory_gb * self.usd_per_gb_hour)

    def replicas(self, path: str) -> int:
        return {ONLINE: self.api_replicas, STREAM: self.stream_workers}[path]


def unit_prices_from_dict(data: Mapping[str, Any], source: str = "cost config") -> UnitPrices:
    """The defaults with `data`'s [prices] table applied; an unknown section or key is an error naming it."""
    unknown = sorted(set(data) - {"prices"})
    if unknown:
        raise ValueError(f"{source}: unknown section(s) {unknown}; known: ['prices']")
    overrides = data.get("prices") or {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f"{source}: [prices] must be a table of settings, got {overrides!r}")  # noqa: TRY004
    known = {f.name for f in fields(UnitPrices)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"{source}: unknown key(s) {bad} in [prices]; known: {sorted(known)}")
    try:
        return UnitPrices(**overrides)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from exc


def load_unit_prices(path: str | Path | None = None) -> UnitPrices:
    """The defaults, overridden by the TOML file at `path` (None: the file ML_PLATFORM_COST_CONFIG
    names, via settings.cost_config; unset: the defaults)."""
    if path is None:
        from ml_platform.settings import load_settings

        path = load_settings().cost_config
    if path is None:
        return UnitPrices()
    from ml_platform.toml_files import read_toml

    return unit_prices_from_dict(read_toml(path, COST_CONFIG_ENV), source=str(path))


# --------------------------------------------------------------------------- measured compute


@dataclass(frozen=True)
class StepRecord:
    """One successful Dagster step: its kind (training or batch), wall seconds, the model version
    it trained or scored with, and (batch) the predictions it made."""

    kind: str
    run_id: str
    job: str
    step: str
    seconds: float
    model_version: int | None
    rows: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in STEP_KINDS:
            raise ValueError(f"step record {self.step}: kind = {self.kind!r} must be one of {STEP_KINDS}")
        if not (math.isfinite(self.seconds) and self.seconds >= 0):
            raise ValueError(f"step record {self.step}: seconds = {self.seconds!r} must be a finite number >= 0")
        if self.rows is not None and self.rows < 0:
            raise ValueError(f"step record {self.step}: rows = {self.rows!r} must be >= 0")


@dataclass(frozen=True)
class ServingCpu:
    """CPU seconds a serving process used and the predictions it made over the same window
    (e.g. since the API started): a per-prediction CPU rate."""

    cpu_seconds: float
    predictions: int
    source: str = ""

    def seconds_per_prediction(self) -> float | None:
        return self.cpu_seconds / self.predictions if self.predictions > 0 else None


def serving_cpu_from_metrics(text: str, source: str = "API /metrics") -> ServingCpu | None:
    """The API's CPU rate from its Prometheus text: `process_cpu_seconds_total` (the process
    collector) over `ml_platform_predictions_total` (all labels summed). None without the CPU line."""
    from ml_platform.monitoring.serving_health import metric_totals

    t = metric_totals(text, ("process_cpu_seconds_total", "ml_platform_predictions_total"))
    cpu, predictions = t["process_cpu_seconds_total"], t["ml_platform_predictions_total"] or 0.0
    return None if cpu is None else ServingCpu(cpu_seconds=cpu, predictions=int(predictions), source=source)


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class CostRow:
    """One (path, model version). `cost_usd` is what is billed; `compute_usd` the busy CPU alone.
    None: not measured. Training: `predictions` are the version's predictions on every path and
    `usd_per_1000` its training cost amortized over them."""

    path: str
    model_version: int | None
    predictions: int | None
    compute_seconds: float | None
    compute_usd: float | None
    always_on_hours: float
    always_on_usd: float
    cost_usd: float | None
    usd_per_1000: float | None
    usd_per_1000_compute: float | None
    note: str = ""


COLUMNS = tuple(f.name for f in fields(CostRow))


@dataclass
class CostReport:
    rows: list[CostRow]
    totals: dict[str, dict[str, Any]]  # per path (and "serving"): predictions, cost_usd, usd_per_1000, ...
    ratios: dict[str, float | None]  # online_vs_batch, stream_vs_batch (per 1,000, billed and compute)
    prices: UnitPrices
    not_measured: list[str] = field(default_factory=list)

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame([asdict(r) for r in self.rows], columns=list(COLUMNS))
        return frame.astype({"model_version": "Int64", "predictions": "Int64"})

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [asdict(r) for r in self.rows],
            "totals": self.totals,
            "ratios": self.ratios,
            "prices": asdict(self.prices),
            "not_measured": list(self.not_measured),
        }


def _per_1000(usd: float | None, predictions: int | None) -> float | None:
    return usd / predictions * 1000.0 if usd is not None and predictions else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compute_cost_report(
    steps: Iterable[StepRecord],
    predictions: Mapping[tuple[str, int | None], int],
    prices: UnitPrices | None = None,
    *,
    serving_cpu: Mapping[str, ServingCpu | None] | None = None,
    period_hours: Mapping[str, float] | None = None,
) -> CostReport:
    """The report from measured compute. `predictions`: {(path, model version): count} of the
    always-on paths (online, stream; batch's count is its steps' rows); `serving_cpu`: {path:
    ServingCpu} where measured; `period_hours`: {path: hours the path was deployed over the
    report's period} (its replicas are billed for them)."""
    prices = prices or UnitPrices()
    serving_cpu = dict(serving_cpu or {})
    period_hours = dict(period_hours or {})
    for (path, _version), count in predictions.items():
        if path not in (ONLINE, STREAM):
            raise ValueError(f"predictions: path {path!r} must be one of {(ONLINE, STREAM)} (batch counts its steps' rows)")
        if count < 0:
            raise ValueError(f"predictions[{path}, {_version}] = {count!r} must be >= 0")
    steps = list(steps)
    not_measured: list[str] = []
    rows: list[CostRow] = []

    by_version: dict[int | None, int] = defaultdict(int)  # predictions of a version, every path
    batch: dict[int | None, list[StepRecord]] = defaultdict(list)
    training: dict[int | None, list[StepRecord]] = defaultdict(list)
    for s in steps:
        (batch if s.kind == BATCH else training)[s.model_version].append(s)
    for version, group in batch.items():
        by_version[version] += sum(s.rows or 0 for s in group)
    for (_path, version), count in predictions.items():
        by_version[version] += count

    for version, group in sorted(training.items(), key=lambda kv: _order(kv[0])):
        seconds = sum(s.seconds for s in group)
        usd = prices.step_usd(seconds)
        served = by_version.get(version) or None
        runs = len({s.run_id for s in group})
        rows.append(CostRow(TRAINING, version, served, seconds, usd, 0.0, 0.0, usd, _per_1000(usd, served), None,
                            f"{runs} run(s), {len(group)} step(s)" + ("" if served else "; no predictions yet")))

    for version, group in sorted(batch.items(), key=lambda kv: _order(kv[0])):
        seconds = sum(s.seconds for s in group)
        usd = prices.step_usd(seconds)
        unknown_rows = any(s.rows is None for s in group)
        count = None if unknown_rows else sum(s.rows for s in group)
        note = f"{len(group)} scoring step(s)" + ("; rows not recorded: per 1,000 not measured" if unknown_rows else "")
        per = _per_1000(usd, count)
        rows.append(CostRow(BATCH, version, count, seconds, usd, 0.0, 0.0, usd, per, per, note))
    if not batch:
        not_measured.append("batch: no batch_predictions step recorded")

    for path in (ONLINE, STREAM):
        counts = {v: c for (p, v), c in predictions.items() if p == path and c > 0}
        total = sum(counts.values())
        cpu = serving_cpu.get(path)
        rate = cpu.seconds_per_prediction() if cpu is not None else None
        hours = float(period_hours.get(path, 0.0)) * prices.replicas(path)
        if not total:
            not_measured.append(f"{path}: no predictions in the period")
            continue
        if rate is None:
            not_measured.append(f"{path}: CPU seconds not measured" + (f" ({cpu.source}: no predictions)" if cpu else ""))
        for version in sorted(counts, key=_order):
            count = counts[version]
            share = count / total
            compute_s = rate * count if rate is not None else None
            compute_usd = compute_s / 3600.0 * prices.usd_per_cpu_hour if compute_s is not None else None
            replica_h = hours * share
            replica_usd = replica_h * prices.usd_per_serving_instance_hour
            billed = replica_usd if hours > 0 else compute_usd
            note = (f"{share:.0%} of the {path} predictions: that share of {hours:g} replica hour(s)" if hours > 0
                    else "no always-on replicas: billed per CPU second")
            if rate is None:
                note += "; CPU " + NOT_MEASURED
            rows.append(CostRow(path, version, count, compute_s, compute_usd, replica_h, replica_usd, billed,
                                _per_1000(billed, count), _per_1000(compute_usd, count), note))

    totals = _totals(rows, prices, period_hours)
    ratios = {
        "online_vs_batch": _ratio(_get(totals, ONLINE, "usd_per_1000"), _get(totals, BATCH, "usd_per_1000")),
        "stream_vs_batch": _ratio(_get(totals, STREAM, "usd_per_1000"), _get(totals, BATCH, "usd_per_1000")),
        "online_vs_batch_compute": _ratio(_get(totals, ONLINE, "usd_per_1000_compute"),
                                          _get(totals, BATCH, "usd_per_1000_compute")),
        "stream_vs_batch_compute": _ratio(_get(totals, STREAM, "usd_per_1000_compute"),
                                          _get(totals, BATCH, "usd_per_1000_compute")),
    }
    return CostReport(rows=rows, totals=totals, ratios=ratios, prices=prices, not_measured=not_measured)


def _order(version: int | None) -> tuple:
    return (version is None, version or 0)


def _get(totals: dict, path: str, key: str) -> Any:
    return totals.get(path, {}).get(key)


def _sum(values: list[float | None]) -> float | None:
    """The sum, or None if any part was not measured."""
    return None if not values or any(v is None for v in values) else sum(values)


def _totals(rows: list[CostRow], prices: UnitPrices, period_hours: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    totals: dict[str, dict[str, Any]] = {}
    for path in (TRAINING, *SERVING_PATHS):
        part = [r for r in rows if r.path == path]
        if not part:
            continue
        cost = _sum([r.cost_usd for r in part])
        compute = _sum([r.compute_usd for r in part])
        entry: dict[str, Any] = {"cost_usd": cost, "compute_seconds": _sum([r.compute_seconds for r in part]),
                                 "compute_usd": compute}
        if path != TRAINING:
            count = _sum([r.predictions for r in part])
            entry.update(predictions=count, usd_per_1000=_per_1000(cost, count),
                         usd_per_1000_compute=_per_1000(compute, count))
        if path in (ONLINE, STREAM):
            hours = float(period_hours.get(path, 0.0)) * prices.replicas(path)
            capacity_s = hours * 3600.0 * prices.serving_instance_vcpus
            entry.update(always_on_hours=hours, always_on_usd=hours * prices.usd_per_serving_instance_hour,
                         utilization=(entry["compute_seconds"] / capacity_s
                                      if entry["compute_seconds"] is not None and capacity_s else None))
        totals[path] = entry
    costs = [t["cost_usd"] for t in totals.values()]
    totals["all"] = {"cost_usd": _sum(costs), "partial": any(c is None for c in costs)}
    return totals


def period_hours_of_days(days: Iterable[Any]) -> float:
    """Hours from the first to the end of the last of `days` (dates): an always-on path's period."""
    days = sorted(days)
    return ((days[-1] - days[0]).days + 1) * 24.0 if days else 0.0


def prediction_counts(log: pd.DataFrame) -> dict[tuple[str, int | None], int]:
    """{(path, model version): predictions} of the online and stream rows of a prediction-log
    frame (`read_prediction_log`'s columns `source`, `model_version`; unscored rows included)."""
    out: dict[tuple[str, int | None], int] = {}
    if not len(log):
        return out
    paths = {source: path for path, source in LOG_SOURCE.items() if path != BATCH}
    part = log[log["source"].isin(list(paths))]
    grouped = part.groupby(["source", part["model_version"].astype("Int64")], dropna=False).size()
    for (source, version), count in grouped.items():
        out[(paths[source], None if pd.isna(version) else int(version))] = int(count)
    return out
