"""The model types training can fit: one registry, name -> builder with validated params.

Each type is a scikit-learn Pipeline over the contract's inputs (the encoding its estimator needs,
then the estimator), so every consumer scores it the same way: `model.predict_proba(
contract.model_input(frame))[:, 1]`. Add a type by writing a params model (pydantic, `extra=
"forbid"`, defaults = the recommended settings) and a builder, then listing it in MODEL_TYPES.

  hist_gradient_boosting (default): ordinal-encoded categoricals fed to HistGradientBoosting's
      native categorical splits; nulls and unseen values go down the "missing" branch.
  logistic_regression: one-hot categoricals (nulls are a category, unseen values all zeros),
      numerics median-imputed with missing-indicator columns, then standardised.
  random_forest: ordinal-encoded categoricals (unseen -> NaN), RandomForest's native NaN support.

Imbalance: fraud is ~1-3 % of rows. class_weight=None keeps predicted probabilities calibrated
(Brier score, the calibration table and drift monitoring read them as probabilities); the
imbalance is handled by choosing the decision threshold on validation (max F1) and by judging
models on PR AUC. Pass params={"class_weight": "balanced"} to reweight instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ml_platform.settings import DEFAULT_MODEL_TYPE  # the training default (re-exported)

if TYPE_CHECKING:  # scikit-learn is imported by the builders: the contract imports this module
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline

    from ml_platform.training.contract import ModelContract


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HistGradientBoostingParams(_Params):
    max_iter: int = Field(200, ge=1)
    learning_rate: float = Field(0.1, gt=0)
    max_leaf_nodes: int = Field(31, ge=2)
    min_samples_leaf: int = Field(20, ge=1)
    l2_regularization: float = Field(1.0, ge=0)
    class_weight: Literal["balanced"] | None = None
    # Per categorical column; rarer values share one "infrequent" code (HGB allows at most 255 bins).
    max_categories: int = Field(250, ge=2, le=254)


class LogisticRegressionParams(_Params):
    C: float = Field(1.0, gt=0)  # inverse L2 regularisation strength
    max_iter: int = Field(1000, ge=1)
    class_weight: Literal["balanced"] | None = None
    max_categories: int = Field(50, ge=2)  # one-hot columns per categorical input, incl. "infrequent"


class RandomForestParams(_Params):
    n_estimators: int = Field(100, ge=1)
    max_depth: int | None = Field(12, ge=1)
    min_samples_leaf: int = Field(20, ge=1)
    max_features: Literal["sqrt", "log2"] | float = "sqrt"
    class_weight: Literal["balanced", "balanced_subsample"] | None = None
    max_categories: int = Field(250, ge=2)


def _ordinal_encoding(contract: ModelContract, max_categories: int) -> ColumnTransformer:
    """Categoricals as float codes (unknown and missing -> NaN), numerics unchanged; categorical
    columns come out first."""
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import OrdinalEncoder

    return ColumnTransformer(
        [
            (
                "categorical",
                OrdinalEncoder(
                    handle_unknown="use_encoded_value",
                    unknown_value=np.nan,
                    encoded_missing_value=np.nan,
                    max_categories=max_categories,
                    dtype=np.float64,
                ),
                list(contract.categorical_features),
            ),
            ("numeric", "passthrough", list(contract.numeric_features)),
        ],
        remainder="drop",
    )


def _hist_gradient_boosting(
    contract: ModelContract, p: HistGradientBoostingParams, random_state: int
) -> Pipeline:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.pipeline import Pipeline

    n_categorical = len(contract.categorical_features)
    classifier = HistGradientBoostingClassifier(
        max_iter=p.max_iter,
        learning_rate=p.learning_rate,
        max_leaf_nodes=p.max_leaf_nodes,
        min_samples_leaf=p.min_samples_leaf,
        l2_regularization=p.l2_regularization,
        class_weight=p.class_weight,
        categorical_features=list(range(n_categorical)) or None,  # the encoder emits them first
        early_stopping=False,
        random_state=random_state,
    )
    return Pipeline([("encode", _ordinal_encoding(contract, p.max_categories)), ("classifier", classifier)])


def _logistic_regression(contract: ModelContract, p: LogisticRegressionParams, random_state: int) -> Pipeline:
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    encode = ColumnTransformer(
        [
            (
                "categorical",
                OneHotEncoder(
                    handle_unknown="infrequent_if_exist", max_categories=p.max_categories, sparse_output=False
                ),
                list(contract.categorical_features),
            ),
            (
                "numeric",
                Pipeline(
                    [
                        (
                            "impute",
                            SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
                        ),
                        ("scale", StandardScaler()),
                    ]
                ),
                list(contract.numeric_features),
            ),
        ],
        remainder="drop",
    )
    classifier = LogisticRegression(
        C=p.C, max_iter=p.max_iter, class_weight=p.class_weight, random_state=random_state
    )
    return Pipeline([("encode", encode), ("classifier", classifier)])


def _random_forest(contract: ModelContract, p: RandomForestParams, random_state: int) -> Pipeline:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import Pipeline

    classifier = RandomForestClassifier(
        n_estimators=p.n_estimators,
        max_depth=p.max_depth,
        min_samples_leaf=p.min_samples_leaf,
        max_features=p.max_features,
        class_weight=p.class_weight,
        random_state=random_state,
    )
    return Pipeline([("encode", _ordinal_encoding(contract, p.max_categories)), ("classifier", classifier)])


@dataclass(frozen=True)
class ModelType:
    """A model type: its validated params (defaults = recommended) and how to build the Pipeline."""

    name: str
    params: type[_Params]
    builder: Callable[[ModelContract, Any, int], Pipeline]
    description: str

    @property
    def default_params(self) -> dict[str, Any]:
        return self.params().model_dump()

    def validate_params(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """`params` over the defaults, validated: a clear error names the param and its value."""
        given = dict(params or {})
        try:
            return self.params(**given).model_dump()
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                name = ".".join(str(p) for p in err["loc"]) or "?"
                value = err.get("input")
                if err["type"] == "extra_forbidden":
                    problems.append(
                        f"params.{name} = {value!r} is not a parameter of model_type {self.name!r} "
                        f"(known: {sorted(self.params.model_fields)})"
                    )
                else:
                    problems.append(f"params.{name} = {value!r}: {err['msg']}")
            raise ValueError(
                f"Invalid training params for model_type {self.name!r}: " + "; ".join(problems)
            ) from None

    def build(
        self, contract: ModelContract, params: Mapping[str, Any] | None = None, random_state: int = 0
    ) -> Pipeline:
        """The untrained Pipeline for `contract`."""
        return self.builder(contract, self.params(**self.validate_params(params)), int(random_state))


MODEL_TYPES: dict[str, ModelType] = {
    t.name: t
    for t in (
        ModelType(
            DEFAULT_MODEL_TYPE,
            HistGradientBoostingParams,
            _hist_gradient_boosting,
            "scikit-learn HistGradientBoostingClassifier, native categorical splits",
        ),
        ModelType(
            "logistic_regression",
            LogisticRegressionParams,
            _logistic_regression,
            "scikit-learn LogisticRegression on one-hot categoricals and standardised, imputed numerics",
        ),
        ModelType(
            "random_forest",
            RandomForestParams,
            _random_forest,
            "scikit-learn RandomForestClassifier on ordinal-encoded categoricals",
        ),
    )
}


def get_model_type(name: str) -> ModelType:
    """The registered model type `name`; an unknown name is a clear error listing the known ones."""
    try:
        return MODEL_TYPES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"model_type = {name!r} is not a known model type; known: {sorted(MODEL_TYPES)}"
        ) from None
