"""What a model is monitored against, stored with the model when it is registered.

Three files under the MLflow run's `monitoring/` artifact folder:
- `reference_inputs.parquet`: a seeded sample (at most `max_rows`) of the model inputs of the
  training set's rows in steady state (past the features' history warm-up, all splits: the data
  the model was built and judged on), shaped by the model's contract: data drift compares each
  day's served inputs with it;
- `validation_scores.parquet`: the model's own scores and labels on the held-out (validation and
  test) steady-state rows: prediction drift compares each day's scores and flag rate with them;
- `reference_summary.json`: that flag rate at the decision threshold, the held-out evaluation
  metrics (test split), row counts, which rows were taken, data version.

A model registered before monitoring existed has none of them; `reference_from_training_set`
re-derives them from the training set on disk when its data version is the model's.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ARTIFACT_DIR = "monitoring"
INPUTS_FILE = "reference_inputs.parquet"
SCORES_FILE = "validation_scores.parquet"
SUMMARY_FILE = "reference_summary.json"
DEFAULT_REFERENCE_ROWS = 50_000  # enough for tight KS/chi-square at any daily volume, ~2 MB on disk
MIN_STEADY_ROWS = 2_000  # fewer rows past the warm-up: fall back to the latest part of the history
SCORE = "probability"
LABEL = "label"


@dataclass
class MonitoringReference:
    """The champion's reference world: training inputs, validation scores, summary figures."""

    inputs: pd.DataFrame
    scores: pd.DataFrame  # columns: probability, label
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def positive_rate(self) -> float:
        return float(self.summary["positive_rate"])

    @property
    def threshold(self) -> float:
        return float(self.summary["threshold"])

    @property
    def flag_rate_rho(self) -> float:
        """The day-to-day overdispersion of the flag rate on the held-out days (`rate_test`; 0 for a
        reference built before it was measured: the binomial test)."""
        return float(self.summary.get("flag_rate_rho") or 0.0)

    @property
    def day_to_day_effects(self) -> dict[str, float]:
        """{input: the largest effect size of one reference day against the whole reference}
        (`drift.period_effects`; {} for a reference built before it was measured)."""
        return {str(k): float(v) for k, v in (self.summary.get("day_to_day_effects") or {}).items()}

    @property
    def metrics(self) -> dict[str, float]:
        """Held-out (test split) metrics of the model at registration: roc_auc, pr_auc, precision, ..."""
        return dict(self.summary.get("metrics") or {})

    def save(self, directory: str | Path) -> Path:
        """Write the three files into `directory` (replaced as a whole: temp dir, then rename)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staged = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.tmp")
        staged.mkdir()
        try:
            self.inputs.to_parquet(staged / INPUTS_FILE, index=False)
            self.scores.to_parquet(staged / SCORES_FILE, index=False)
            (staged / SUMMARY_FILE).write_text(json.dumps(self.summary, indent=2, sort_keys=True))
            if directory.exists():
                old = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.old")
                os.replace(directory, old)
                os.replace(staged, directory)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staged, directory)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> MonitoringReference:
        directory = Path(directory)
        missing = [n for n in (INPUTS_FILE, SCORES_FILE, SUMMARY_FILE) if not (directory / n).exists()]
        if missing:
            raise FileNotFoundError(f"monitoring reference at {directory} lacks {missing}")
        return cls(
            inputs=pd.read_parquet(directory / INPUTS_FILE),
            scores=pd.read_parquet(directory / SCORES_FILE),
            summary=json.loads((directory / SUMMARY_FILE).read_text()),
        )


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def build_reference(
    model: Any,
    contract,
    training_frame: pd.DataFrame,
    test_metrics: dict[str, Any],
    *,
    data_version: str,
    max_rows: int = DEFAULT_REFERENCE_ROWS,
    seed: int = 0,
    since=None,
) -> MonitoringReference:
    """The reference of `model` from its training set (a frame with a `split` column): a sample of
    the steady-state rows' model inputs, the held-out steady-state rows' scores and labels, the
    summary (see the module docstring). A model retrained after a drift that started on `since`
    (a date) is monitored against the world it was retrained for: the rows from `since` on, when
    there are at least MIN_STEADY_ROWS of them."""
    from ml_platform.features import EVENT_TS, history_warmup
    from ml_platform.monitoring.drift import period_effects
    from ml_platform.monitoring.rate_test import MIN_DAYS, daily_rate
    from ml_platform.training.model import fraud_probability

    if "split" not in training_frame.columns:
        raise ValueError("build_reference: the training frame has no `split` column (train/validation/test)")
    # Steady state only: rows whose features had their full history (see features.history_warmup).
    event_ts = pd.to_datetime(training_frame[EVENT_TS], utc=True)
    warmup = history_warmup(contract.feature_refs)
    cut = event_ts.min() + warmup
    steady = training_frame[event_ts >= cut]
    note = f"rows from {cut.date()} on (the features' {warmup.days}-day warm-up left out)"
    if since is not None:
        after = training_frame[event_ts >= pd.Timestamp(str(since), tz="UTC")]
        if len(after) >= MIN_STEADY_ROWS:
            steady, cut = after, pd.Timestamp(str(since), tz="UTC")
            note = f"rows from {cut.date()} on (the drift this model was retrained for)"
    if len(steady) < min(MIN_STEADY_ROWS, len(training_frame) // 2):
        # A history shorter than the warm-up: the latest third is the closest there is to steady state.
        steady = training_frame[event_ts >= event_ts.quantile(2 / 3)]
        note = (f"history shorter than the features' {warmup.days}-day warm-up: the latest third of it "
                f"(from {pd.Timestamp(event_ts.quantile(2 / 3)).date()}); expect drift on long-window features")
    if len(steady) > max_rows:
        steady = steady.sample(n=max_rows, random_state=seed)
    inputs = contract.model_input(steady).reset_index(drop=True)
    # How much each input differs between the reference's own days (data drift's per-column floor).
    day_effects = period_effects(inputs, pd.to_datetime(steady[EVENT_TS], utc=True).dt.date.to_numpy())
    held_out = steady[steady["split"].isin(["validation", "test"]) & steady[contract.label].notna()]
    if len(held_out) < MIN_STEADY_ROWS // 4:
        held_out = training_frame[training_frame["split"].isin(["validation", "test"])]
        held_out = held_out[held_out[contract.label].notna()]
    if held_out.empty:
        raise ValueError("build_reference: no labelled validation or test rows to take the model's scores from")
    scores = fraud_probability(model, contract, held_out)
    frame = pd.DataFrame({SCORE: scores.astype("float64"), LABEL: held_out[contract.label].astype("int64").to_numpy()})
    threshold = float(contract.decision_threshold)
    flags_by_day = pd.DataFrame({"day": pd.to_datetime(held_out[EVENT_TS], utc=True).dt.date.to_numpy(),
                                 "flag": scores >= threshold}).groupby("day")["flag"].agg(["sum", "size"])
    daily = daily_rate(flags_by_day["sum"].to_numpy(), flags_by_day["size"].to_numpy())
    summary = {
        "threshold": threshold,
        # The flag rate of the full held-out days (the youngest days of a training set hold only
        # their early chargebacks), and how much it varies from day to day.
        "positive_rate": daily.rate if daily.days >= MIN_DAYS and daily.rate is not None
        else float(np.mean(scores >= threshold)),
        "flag_rate_rho": daily.rho,
        "day_to_day_effects": day_effects,
        "flag_rate_days": daily.days,
        "label_rate": float(frame[LABEL].mean()),
        "score_rows": len(frame),
        "reference_rows": len(inputs),
        "reference_note": note,
        "warmup_days": warmup.days,
        "train_rows": int((training_frame["split"] == "train").sum()),
        "metrics": _numeric(test_metrics),
        "data_version": data_version,
    }
    return MonitoringReference(inputs=inputs, scores=frame, summary=summary)


def load_model_reference(registry, version: int, cache_dir: str | Path, data_dir: str | Path | None = None) -> MonitoringReference:
    """The monitoring reference of model `version`: from the local cache, else from its MLflow run
    (then cached), else re-derived from the training set on disk if that is the version's data
    version (models registered before references were stored). Raises FileNotFoundError saying what
    to do when none of these has it."""
    import tempfile

    cached = Path(cache_dir) / registry.model_name / f"v{int(version)}"
    if (cached / SUMMARY_FILE).exists():
        return MonitoringReference.load(cached)
    with tempfile.TemporaryDirectory() as tmp:
        downloaded = registry.download_run_artifacts(int(version), ARTIFACT_DIR, Path(tmp))
        if downloaded is not None:
            reference = MonitoringReference.load(downloaded)
            reference.save(cached)
            return reference
    wanted = registry.get_version(int(version)).tags.get("data_version")
    if data_dir is not None and wanted:
        from ml_platform.training.pipeline import load_training_set

        try:
            frame, have = load_training_set(Path(data_dir))
        except FileNotFoundError:
            frame, have = None, None
        if frame is not None and have == wanted:
            model, contract = registry.load_model(int(version))
            reference = build_reference(model, contract, frame, {}, data_version=have)
            reference.save(cached)
            return reference
    raise FileNotFoundError(
        f"{registry.model_name} v{version} has no monitoring reference in its MLflow run and its training "
        f"set (data version {wanted}) is no longer on disk: retrain (the training pipeline stores one)"
    )
