"""The model contract: exactly which inputs a model consumes and how its score becomes a decision.

Written once at training time, saved with the registered model (`contract.json`), and read by
every consumer (batch scoring, the HTTP API, the stream worker, monitoring), so serving builds the
model input with the same columns, order and dtypes as training did.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import pandas as pd

from ml_platform import features as platform_features
from ml_platform.featurestore.definitions import FeatureView, String, parse_feature_ref
from ml_platform.training.model_types import DEFAULT_MODEL_TYPE
from ml_platform.values import is_missing

CONTRACT_FILE = "contract.json"
# model_type and known_categories were added without a bump: both have defaults that describe the
# contracts written before them (every earlier model was HistGradientBoosting; no categories known).
CONTRACT_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ModelContract:
    """What a model reads and how to turn its fraud probability into a decision.

    feature_refs: the "view:feature" refs looked up in the feature store (point in time);
        their model column is the feature name (`full_feature_names=False`).
    request_columns: raw columns the caller sends with a request (the transaction itself).
    request_features: features computed from the request by `features.add_request_features`.
    categorical_features: input columns encoded as categories (strings; nulls allowed).
    input_columns: the model's input columns in order: numeric ones first, then categorical.
    decision_threshold: a row is flagged as fraud iff its probability >= this value.
    model_type: the `training.model_types` name the model was built with.
    known_categories: categorical input column -> the values seen in training (sorted); a value
        outside them is one the model never saw (`unseen_categories`). Empty: not recorded.
    """

    feature_refs: tuple[str, ...]
    request_columns: tuple[str, ...]
    request_features: tuple[str, ...]
    categorical_features: tuple[str, ...]
    input_columns: tuple[str, ...]
    decision_threshold: float = 0.5
    threshold_rule: str = "max_f1_on_validation"
    label: str = platform_features.LABEL
    event_timestamp: str = platform_features.EVENT_TS
    model_name: str | None = None
    model_version: int | None = None
    schema_version: int = CONTRACT_SCHEMA_VERSION
    model_type: str = DEFAULT_MODEL_TYPE
    known_categories: dict[str, tuple[str, ...]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (
            "feature_refs",
            "request_columns",
            "request_features",
            "categorical_features",
            "input_columns",
        ):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for ref in self.feature_refs:
            parse_feature_ref(ref)
        dupes = sorted({c for c in self.input_columns if self.input_columns.count(c) > 1})
        if dupes:
            raise ValueError(f"ModelContract: input columns listed more than once: {dupes}")
        missing_cats = [c for c in self.categorical_features if c not in self.input_columns]
        if missing_cats:
            raise ValueError(f"ModelContract: categorical features {missing_cats} are not in input_columns")
        if not 0.0 <= float(self.decision_threshold) <= 1.0:
            raise ValueError(
                f"ModelContract: decision_threshold must be in [0, 1], got {self.decision_threshold!r}"
            )
        object.__setattr__(self, "decision_threshold", float(self.decision_threshold))
        known = {str(c): tuple(str(v) for v in values) for c, values in dict(self.known_categories).items()}
        not_categorical = sorted(set(known) - set(self.categorical_features))
        if not_categorical:
            raise ValueError(
                f"ModelContract: known_categories has columns {not_categorical} that are not categorical "
                f"features {list(self.categorical_features)}"
            )
        object.__setattr__(self, "known_categories", known)
        # Sets for membership tests (not a field: not compared, not serialised).
        object.__setattr__(self, "_known_sets", {col: frozenset(values) for col, values in known.items()})

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_features(
        cls,
        feature_refs: Sequence[str] = tuple(platform_features.MODEL_FEATURE_REFS),
        feature_views: Sequence[FeatureView] = tuple(platform_features.FEATURE_VIEWS),
        request_columns: Sequence[str] = tuple(platform_features.REQUEST_COLUMNS),
        request_features: Sequence[str] = tuple(platform_features.REQUEST_FEATURES),
        categorical_features: Sequence[str] = tuple(platform_features.CATEGORICAL_FEATURES),
    ) -> ModelContract:
        """The contract for these feature refs, typed from the feature views.

        String-typed looked-up features (e.g. `user_profile:home_country`) become categorical
        inputs too, next to the request's own categorical columns.
        """
        views = {v.name: v for v in feature_views}
        numeric: list[str] = []
        categorical: list[str] = list(dict.fromkeys(categorical_features))
        for ref in feature_refs:
            view_name, feature = parse_feature_ref(ref)
            if view_name not in views:
                raise ValueError(
                    f"Feature ref {ref!r}: no feature view named {view_name!r}; known views: {sorted(views)}"
                )
            dtypes = {f.name: f.dtype for f in views[view_name].schema}
            if feature not in dtypes:
                raise ValueError(
                    f"Feature ref {ref!r}: view {view_name!r} has no feature {feature!r}; "
                    f"it has {sorted(dtypes)}"
                )
            target = categorical if dtypes[feature] == String else numeric
            if feature in numeric or feature in categorical:
                if feature in categorical_features and dtypes[feature] == String:
                    continue
                raise ValueError(
                    f"Feature ref {ref!r}: column {feature!r} is already an input; two refs with the "
                    "same feature name need full feature names, which the platform does not use"
                )
            target.append(feature)
        for name in request_features:
            if name not in numeric and name not in categorical:
                numeric.append(name)
        return cls(
            feature_refs=tuple(feature_refs),
            request_columns=tuple(request_columns),
            request_features=tuple(request_features),
            categorical_features=tuple(categorical),
            input_columns=tuple(numeric + categorical),
        )

    def with_threshold(self, threshold: float, rule: str | None = None) -> ModelContract:
        return replace(self, decision_threshold=float(threshold), threshold_rule=rule or self.threshold_rule)

    def with_registration(self, model_name: str, model_version: int) -> ModelContract:
        return replace(self, model_name=model_name, model_version=int(model_version))

    def with_training(self, model_type: str, known_categories: Mapping[str, Sequence[str]]) -> ModelContract:
        """This contract as a trained model's: its model type and the categories seen in training."""
        return replace(self, model_type=model_type, known_categories=dict(known_categories))

    # --- columns ------------------------------------------------------------------------------
    @property
    def numeric_features(self) -> tuple[str, ...]:
        return tuple(c for c in self.input_columns if c not in self.categorical_features)

    @property
    def feature_columns(self) -> tuple[str, ...]:
        """Column names of the looked-up features (the feature name of each ref)."""
        return tuple(parse_feature_ref(r)[1] for r in self.feature_refs)

    def model_input(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The model's input frame: `input_columns` in order, numeric as float64 (nulls -> NaN),
        categorical as Python strings (nulls -> NaN). The one place inputs are shaped."""
        missing = [c for c in self.input_columns if c not in frame.columns]
        if missing:
            raise ValueError(
                f"Model input is missing columns {missing} (the contract needs {list(self.input_columns)}); "
                "build the frame with the feature store and features.add_request_features"
            )
        out: dict[str, Any] = {}
        for col in self.numeric_features:
            values = pd.to_numeric(frame[col], errors="coerce")
            out[col] = np.asarray(
                pd.array(values).to_numpy(dtype="float64", na_value=np.nan), dtype="float64"
            )
        for col in self.categorical_features:
            series = frame[col]
            mask = series.isna().to_numpy()
            arr = series.astype(str).to_numpy(dtype=object, copy=True)
            arr[mask] = np.nan
            out[col] = arr
        return pd.DataFrame(out, index=frame.index, columns=list(self.input_columns))

    # --- values the model never saw -------------------------------------------------------------
    def unseen_categories(self, frame: pd.DataFrame) -> dict[str, np.ndarray]:
        """Per categorical column with recorded categories: a boolean mask of the rows whose value
        is not null and was never seen in training. Columns absent from `frame` are skipped."""
        out: dict[str, np.ndarray] = {}
        for col, known in self._known_sets.items():
            if col not in frame.columns:
                continue
            series = frame[col]
            present = series.notna().to_numpy()
            seen = series.astype(str).isin(known).to_numpy()
            out[col] = present & ~seen
        return out

    def unseen_category_columns(self, row: Mapping[str, Any]) -> list[str]:
        """The categorical columns of one row (e.g. a request) whose non-null value was never seen
        in training; [] when none, or when the contract recorded no categories."""
        return [
            col
            for col, known in self._known_sets.items()
            if not is_missing(value := row.get(col)) and str(value) not in known
        ]

    # --- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        d["known_categories"] = {col: list(values) for col, values in self.known_categories.items()}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelContract:
        known = {f.name for f in fields(cls)}
        required = {
            "feature_refs",
            "request_columns",
            "request_features",
            "categorical_features",
            "input_columns",
        }
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(
                f"Model contract is missing keys {missing}; was it written by ModelContract.to_json?"
            )
        version = data.get("schema_version", CONTRACT_SCHEMA_VERSION)
        if version > CONTRACT_SCHEMA_VERSION:
            raise ValueError(
                f"Model contract schema_version {version} is newer than this code understands "
                f"({CONTRACT_SCHEMA_VERSION}); upgrade ml_platform"
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, text: str) -> ModelContract:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"Model contract is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"Model contract must be a JSON object, got {type(data).__name__}")  # noqa: TRY004
        return cls.from_dict(data)
