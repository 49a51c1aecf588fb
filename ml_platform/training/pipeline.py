"""The training pipeline's steps as plain functions over the data directory.

Each step reads what the previous one wrote under `<data_dir>/training/` and writes its own
result atomically (temp file + rename), so a failed step leaves the previous result intact and
the Dagster assets that call these functions stay a few lines each:

  build_training_set -> training_set.parquet (every labelled row with its split)
  train_candidate    -> candidate.joblib + candidate_contract.json (fitted, not yet registered)
  evaluate_candidate -> evaluation.json (metrics on the test split)
  register_candidate -> an MLflow version (`challenger`), promoted to `champion` if it is better
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ml_platform import features as fr
from ml_platform.sources import raw_events
from ml_platform.training.contract import ModelContract
from ml_platform.training.dataset import build_training_frame, data_version, time_split

SPLIT = "split"
TRAINING_SET = "training_set.parquet"
CANDIDATE = "candidate.joblib"
CANDIDATE_CONTRACT = "candidate_contract.json"
EVALUATION = "evaluation.json"


def training_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "training"


def _atomic_write(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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


def build_training_set(store, data_dir: Path, as_of=None, feature_refs=fr.MODEL_FEATURE_REFS) -> BuiltTrainingSet:
    """Labelled events known at `as_of` (default: the newest label) + point-in-time features +
    request-time features, with a leak-free time split recorded in a `split` column."""
    raw_dir = Path(data_dir) / "raw"
    as_of = as_of or raw_events.latest_label_time(raw_dir)
    if as_of is None:
        raise FileNotFoundError(f"no raw transactions under {raw_dir}: materialize raw_transactions first")
    labelled = raw_events.labelled_events(raw_dir, as_of)
    frame = build_training_frame(store, labelled, feature_refs)
    split = time_split(frame, as_of=as_of)
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


def train_candidate(data_dir: Path, params: dict | None = None, random_state: int = 0) -> Candidate:
    """Fit the model on the train split, pick its threshold on the validation split."""
    import joblib

    from ml_platform.training.model import DEFAULT_PARAMS, train_model

    frame, version = load_training_set(data_dir)
    started = time.monotonic()
    model, contract = train_model(_split(frame, "train"), _split(frame, "validation"), params=params,
                                  random_state=random_state)
    took = time.monotonic() - started
    out = training_dir(data_dir)
    used = {**DEFAULT_PARAMS, **(params or {}), "random_state": random_state}
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


def register_candidate(data_dir: Path, registry, metric: str = "pr_auc", margin: float = 0.0,
                       who: str | None = None) -> dict:
    """Register the evaluated candidate in MLflow with its lineage (as `challenger`), then promote it
    to `champion` iff it beats the current champion on the same test split by `margin`."""
    model, contract, info = load_candidate(data_dir)
    evaluation = json.loads(_need(training_dir(data_dir) / EVALUATION, "model_evaluation").read_text())
    frame, version = load_training_set(data_dir)
    if version != evaluation["data_version"] or version != info["data_version"]:
        raise RuntimeError("training set, candidate and evaluation disagree on the data version: rerun training")
    test = _split(frame, "test")
    flat = {k: v for k, v in evaluation["test"].items() if isinstance(v, (int, float)) and v is not None}
    flat.update({f"val_{k}": v for k, v in evaluation["validation"].items()
                 if isinstance(v, (int, float)) and v is not None})
    flat["train_seconds"] = info["train_seconds"]
    registered = registry.log_and_register(
        model, contract, metrics=flat, params=info["params"], data_version=version,
        training_frame_sample=test.head(5), run_name=f"train-{version}", who=who,
    )
    decision = registry.promote_if_better(
        registered.version, test, metric=metric, margin=margin, who=who,
        why=f"training run {registered.run_id} on data {version}",
    )
    champion = registry.champion()
    return {
        "model": registry.model_name,
        "version": registered.version,
        "run_id": registered.run_id,
        "model_uri": registered.model_uri,
        "promoted": decision.promoted,
        "reason": decision.reason,
        "champion_version": champion.version if champion else None,
        "decision": decision.to_dict(),
        "data_version": version,
    }
