"""The training pipeline's steps as plain functions over the data directory.

Each step reads what the previous one wrote under `<data_dir>/training/` and writes its own
result atomically (temp file + rename), so a failed step leaves the previous result intact and
the Dagster assets that call these functions stay a few lines each:

  build_training_set -> training_set.parquet (every labelled row with its split)
  train_candidate    -> candidate.joblib + candidate_contract.json (fitted, not yet registered)
  evaluate_candidate -> evaluation.json (metrics on the test split)
  register_candidate -> an MLflow version (`challenger`), promoted to `champion` if it is better
                        (a RegistrationResult: version, run, MLflow links, lineage, the decision)
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ml_platform import features as fr
from ml_platform.atomic_files import write_atomic
from ml_platform.monitoring.reference import ARTIFACT_DIR as REFERENCE_ARTIFACT_DIR
from ml_platform.monitoring.reference import build_reference
from ml_platform.settings import DEFAULT_PROMOTION_MARGIN, DEFAULT_PROMOTION_METRIC
from ml_platform.sources import raw_events
from ml_platform.training.contract import ModelContract
from ml_platform.training.dataset import build_training_frame, data_version, drift_split, time_split
from ml_platform.training.model_types import DEFAULT_MODEL_TYPE
from ml_platform.values import is_missing

SPLIT = "split"
TRAINING_SET = "training_set.parquet"
CANDIDATE = "candidate.joblib"
CANDIDATE_CONTRACT = "candidate_contract.json"
EVALUATION = "evaluation.json"


def training_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "training"


_atomic_write = write_atomic  # every step's result: temp file, then rename


def _need(path: Path, step: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the {step} step first")
    return path


@dataclass(frozen=True)
class BuiltTrainingSet:
    frame: pd.DataFrame
    path: Path
    data_version: str
    as_of: pd.Timestamp
    split_summary: dict


def build_training_set(store, data_dir: Path, as_of=None, feature_refs=fr.MODEL_FEATURE_REFS,
                       drift_since=None) -> BuiltTrainingSet:
    """Labelled events known at `as_of` (default: the newest label) + point-in-time features +
    request-time features, with a leak-free split recorded in a `split` column: `time_split`, or for
    a retrain after a drift that started on `drift_since` (a date), `drift_split` (the features'
    warm-up of history before the drift and the first half of the mature post-drift rows to train,
    the rest of them to validate and test)."""
    raw_dir = Path(data_dir) / "raw"
    as_of = as_of or raw_events.latest_label_time(raw_dir)
    if as_of is None:
        raise FileNotFoundError(f"no raw transactions under {raw_dir}: materialize raw_transactions first")
    labelled = raw_events.labelled_events(raw_dir, as_of)
    frame = build_training_frame(store, labelled, feature_refs)
    if drift_since is None:
        split = time_split(frame, as_of=as_of, settling=fr.LABEL_SETTLING)
    else:
        since = pd.Timestamp(raw_events.parse_date(drift_since, "drift_since"), tz="UTC")
        # The history kept is the features' warm-up before the drift: the long-window features of
        # the post-drift rows are made of those days. Older rows made the scenario's challenger
        # worse on post-drift data (PR AUC 0.715 with all 115 days, 0.847 with these 37; the
        # champion's 0.796).
        split = drift_split(frame, since=since, as_of=as_of, settling=fr.LABEL_SETTLING,
                            history=fr.history_warmup(feature_refs))
    parts = {"train": split.train, "validation": split.validation, "test": split.test}
    frame = pd.concat([p.assign(**{SPLIT: name}) for name, p in parts.items()], ignore_index=True)
    version = data_version(frame)
    path = _atomic_write(training_dir(data_dir) / TRAINING_SET, lambda tmp: frame.to_parquet(tmp, index=False))
    return BuiltTrainingSet(frame, path, version, split.as_of, split.summary())


def load_training_set(data_dir: Path) -> tuple[pd.DataFrame, str]:
    frame = pd.read_parquet(_need(training_dir(data_dir) / TRAINING_SET, "training_set"))
    return frame, data_version(frame)


def _split(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    return frame[frame[SPLIT] == name].drop(columns=[SPLIT]).reset_index(drop=True)


@dataclass(frozen=True)
class Candidate:
    path: Path
    contract: ModelContract
    data_version: str
    params: dict
    train_seconds: float

    @property
    def model_type(self) -> str:
        return self.contract.model_type


def train_candidate(
    data_dir: Path, params: dict | None = None, random_state: int = 0, model_type: str = DEFAULT_MODEL_TYPE
) -> Candidate:
    """Fit a `model_type` model (`training.model_types`; params validated over its defaults) on the
    train split, pick its threshold on the validation split."""
    import joblib

    from ml_platform.training.model import train_model
    from ml_platform.training.model_types import get_model_type

    used = {**get_model_type(model_type).validate_params(params), "random_state": int(random_state)}
    frame, version = load_training_set(data_dir)
    started = time.monotonic()
    model, contract = train_model(_split(frame, "train"), _split(frame, "validation"), params=params,
                                  random_state=random_state, model_type=model_type)
    took = time.monotonic() - started
    out = training_dir(data_dir)
    _atomic_write(out / CANDIDATE_CONTRACT, lambda tmp: tmp.write_text(json.dumps(
        {"contract": contract.to_dict(), "data_version": version, "params": used, "train_seconds": took})))
    path = _atomic_write(out / CANDIDATE, lambda tmp: joblib.dump(model, tmp))
    return Candidate(path, contract, version, used, took)


def load_candidate(data_dir: Path) -> tuple[Any, ModelContract, dict]:
    import joblib

    out = training_dir(data_dir)
    info = json.loads(_need(out / CANDIDATE_CONTRACT, "trained_model").read_text())
    model = joblib.load(_need(out / CANDIDATE, "trained_model"))
    return model, ModelContract.from_dict(info["contract"]), info


def evaluate_candidate(data_dir: Path) -> dict:
    """Metrics of the candidate on the held-out test split (and on validation, for reference)."""
    from ml_platform.training.evaluate import evaluate

    model, contract, info = load_candidate(data_dir)
    frame, version = load_training_set(data_dir)
    if version != info["data_version"]:
        raise RuntimeError(
            f"the candidate was trained on data version {info['data_version']} but the training set is now "
            f"{version}: rematerialize trained_model"
        )
    metrics = evaluate(model, contract, _split(frame, "test"))
    result = {"test": metrics, "validation": evaluate(model, contract, _split(frame, "validation")),
              "threshold": contract.decision_threshold, "data_version": version}
    _atomic_write(training_dir(data_dir) / EVALUATION, lambda tmp: tmp.write_text(json.dumps(result)))
    return result


def _numeric_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not is_missing(v)}


@dataclass(frozen=True)
class RegistrationResult:
    """What `register_candidate` did: the new version, where to find it, its lineage, the decision."""

    model_name: str
    version: int
    model_type: str
    run_id: str
    experiment_id: str
    model_uri: str  # models:/<name>/<version>
    tracking_uri: str
    model_ui_path: str  # #/models/<name>/versions/<version>, relative to MLflow's UI root
    run_ui_path: str  # #/experiments/<id>/runs/<run_id>
    model_ui_url: str | None  # absolute, when the tracking URI is an http(s) server; else None
    run_ui_url: str | None
    code_version: str
    data_version: str
    promoted: bool
    reason: str
    champion_version: int | None
    decision: dict
    compared_on: str = ""  # the held-out rows challenger and champion were compared on

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# A retrain after drift is judged on the held-out rows from the drift on, when there are enough.
RECENT_MIN_ROWS = 500
RECENT_MIN_POSITIVES = 10


def promotion_rows(test: pd.DataFrame, since=None) -> tuple[pd.DataFrame, str]:
    """(rows, what they are) on which challenger and champion are compared: the test split, or,
    with `since` (the first day of a drift episode), its rows from that day on, if at least
    RECENT_MIN_ROWS labelled rows with RECENT_MIN_POSITIVES frauds (else the whole split, saying so)."""
    if since is None:
        return test, f"the test split ({len(test)} rows)"
    since = raw_events.parse_date(since, "since")
    recent = test[pd.to_datetime(test[fr.EVENT_TS], utc=True) >= pd.Timestamp(since, tz="UTC")]
    positives = int(recent[fr.LABEL].sum()) if len(recent) else 0
    if len(recent) >= RECENT_MIN_ROWS and positives >= RECENT_MIN_POSITIVES:
        return recent, f"the {len(recent)} test rows from {since} on (after the drift; {positives} frauds)"
    return test, (f"the test split ({len(test)} rows): only {len(recent)} rows with {positives} frauds from "
                  f"{since} on, fewer than {RECENT_MIN_ROWS} / {RECENT_MIN_POSITIVES}")


def register_candidate(data_dir: Path, registry, metric: str = DEFAULT_PROMOTION_METRIC,
                       margin: float = DEFAULT_PROMOTION_MARGIN, who: str | None = None,
                       code_version: str | None = None, compare_since=None,
                       reason: str = "") -> RegistrationResult:
    """Register the evaluated candidate in MLflow with its lineage (as `challenger`), then promote it
    to `champion` iff it beats the current champion on the same held-out rows by more than
    `margin`: the test split, or its rows from `compare_since` on (`promotion_rows`). `reason`
    (e.g. the retrain sensor's) is recorded with the alias move."""
    from ml_platform.registry import current_code_version

    model, contract, info = load_candidate(data_dir)
    evaluation = json.loads(_need(training_dir(data_dir) / EVALUATION, "model_evaluation").read_text())
    frame, version = load_training_set(data_dir)
    if version != evaluation["data_version"] or version != info["data_version"]:
        raise RuntimeError("training set, candidate and evaluation disagree on the data version: rerun training")
    test = _split(frame, "test")
    flat = {**_numeric_metrics(evaluation["test"]), **_numeric_metrics(evaluation["validation"], "val_"),
            "train_seconds": info["train_seconds"]}
    code_version = code_version or current_code_version()
    # What monitoring compares the model's serving days with, stored with the model itself.
    reference = build_reference(model, contract, frame, evaluation["test"], data_version=version,
                                since=compare_since)
    with tempfile.TemporaryDirectory() as tmp:
        reference_dir = reference.save(Path(tmp) / REFERENCE_ARTIFACT_DIR)
        registered = registry.log_and_register(
            model, contract, metrics=flat, params=info["params"], data_version=version, code_version=code_version,
            training_frame_sample=test.head(5), run_name=f"train-{contract.model_type}-{version}", who=who,
            artifact_dirs={REFERENCE_ARTIFACT_DIR: reference_dir},
        )
    rows, compared_on = promotion_rows(test, compare_since)
    decision = registry.promote_if_better(
        registered.version, rows, metric=metric, margin=margin, who=who,
        why="; ".join(p for p in (reason, f"training run {registered.run_id} on data {version}",
                                  f"compared on {compared_on}") if p),
    )
    champion = registry.champion()
    model_path, run_path = registry.model_ui_path(registered.version), registry.run_ui_path(registered.run_id)
    return RegistrationResult(
        model_name=registry.model_name,
        version=registered.version,
        model_type=contract.model_type,
        run_id=registered.run_id,
        experiment_id=registry.experiment_id,
        model_uri=registered.model_uri,
        tracking_uri=registry.tracking_uri,
        model_ui_path=model_path,
        run_ui_path=run_path,
        model_ui_url=registry.ui_url(model_path),
        run_ui_url=registry.ui_url(run_path),
        code_version=code_version,
        data_version=version,
        promoted=decision.promoted,
        reason=decision.reason,
        compared_on=compared_on,
        champion_version=champion.version if champion else None,
        decision=decision.to_dict(),
    )
