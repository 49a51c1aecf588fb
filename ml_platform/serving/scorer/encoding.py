"""The Pipeline's preprocessing taken apart (`PipelineLayout`): a ColumnTransformer of
OrdinalEncoder | passthrough becomes per-column dict lookups, so the model matrix is built
without pandas. Also: which categorical values a fitted model knows (`known_categories`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ml_platform.training.contract import ModelContract
from ml_platform.values import is_missing


class UnsupportedModel(Exception):
    """The fast path cannot serve this model (the reason says why); the reference path will."""


@dataclass
class PipelineLayout:
    """A Pipeline(ColumnTransformer(OrdinalEncoder | passthrough), classifier) taken apart: per
    output column of the transformer, its input column and (categorical) code table."""

    columns: list[str]  # input column of each transformed column, in the transformer's order
    codes: list[dict[str, float] | None]  # category -> code for encoded columns, None = passthrough
    unknown_code: list[float]
    missing_code: list[float]
    classifier: Any

    @classmethod
    def of(cls, model: Any) -> PipelineLayout:
        from sklearn.compose import ColumnTransformer
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import FunctionTransformer, OrdinalEncoder

        if not isinstance(model, Pipeline) or len(model.steps) != 2:
            raise UnsupportedModel(f"model is a {type(model).__name__}, not a 2-step Pipeline")
        encode, classifier = model.steps[0][1], model.steps[1][1]
        if len(getattr(classifier, "classes_", ())) != 2:
            raise UnsupportedModel("the classifier is not binary")
        if not isinstance(encode, ColumnTransformer):
            raise UnsupportedModel(f"first step is {type(encode).__name__}, not a ColumnTransformer")
        columns: list[str] = []
        codes: list[dict[str, float] | None] = []
        unknown: list[float] = []
        missing: list[float] = []
        for name, transformer, cols in encode.transformers_:
            if isinstance(transformer, str) and transformer == "drop" or len(cols) == 0:
                continue
            if any(not isinstance(c, str) for c in cols):
                raise UnsupportedModel(f"transformer {name!r} selects columns by position, not name")
            passthrough = transformer == "passthrough" or (
                isinstance(transformer, FunctionTransformer) and transformer.func is None
            )
            if passthrough:
                columns += cols
                codes += [None] * len(cols)
                unknown += [math.nan] * len(cols)
                missing += [math.nan] * len(cols)
            elif isinstance(transformer, OrdinalEncoder):
                if transformer.handle_unknown != "use_encoded_value":
                    raise UnsupportedModel(f"OrdinalEncoder {name!r} raises on unknown categories")
                tables = _ordinal_tables(transformer, cols)
                columns += cols
                codes += tables
                unknown += [float(transformer.unknown_value)] * len(cols)
                missing += [float(transformer.encoded_missing_value)] * len(cols)
            else:
                raise UnsupportedModel(f"transformer {name!r} is a {type(transformer).__name__}")
        if len(columns) != classifier.n_features_in_:
            raise UnsupportedModel(
                f"the transformer emits {len(columns)} columns, the classifier expects {classifier.n_features_in_}"
            )
        return cls(columns, codes, unknown, missing, classifier)

    def encode_columns(
        self, numeric: Mapping[str, np.ndarray], categorical: Mapping[str, Sequence]
    ) -> np.ndarray:
        """The transformer's output matrix (float64) for `columns.model_input_columns`' output:
        passthrough columns copied from `numeric`; encoded ones coded from `categorical`'s raw
        values (null -> the missing code, else str(value), unknown -> the unknown code)."""
        any_column = next(iter((*numeric.values(), *categorical.values())), ())
        out = np.empty((len(any_column), len(self.columns)), dtype=np.float64)
        for j, (col, table) in enumerate(zip(self.columns, self.codes)):
            if table is None:
                out[:, j] = numeric[col]
            else:
                unknown, missing = self.unknown_code[j], self.missing_code[j]
                out[:, j] = [
                    table.get(v, unknown)
                    if isinstance(v, str)
                    else missing
                    if is_missing(v)
                    else table.get(str(v), unknown)
                    for v in categorical[col]
                ]
        return out

    def split(self, inputs: Mapping[str, Sequence]) -> tuple[dict[str, np.ndarray], dict[str, Sequence]]:
        """Model inputs given as column -> values (e.g. the reference frame's) in `encode_columns`'
        form."""
        numeric = {c: np.asarray(inputs[c], dtype=np.float64) for c, t in zip(self.columns, self.codes) if t is None}
        categorical = {c: inputs[c] for c, t in zip(self.columns, self.codes) if t is not None}
        return numeric, categorical


def _ordinal_tables(encoder: Any, cols: list[str]) -> list[dict[str, float]]:
    """category -> code per column, read by running the fitted encoder itself on its categories
    (so infrequent-category grouping and any other encoder rule are taken as they are)."""
    cats = []
    for col, categories in zip(cols, encoder.categories_):
        odd = [c for c in categories if not isinstance(c, str) and not is_missing(c)]
        if odd:
            raise UnsupportedModel(f"OrdinalEncoder column {col!r} has non-string categories {odd[:3]}")
        cats.append([c for c in categories if isinstance(c, str)])
    longest = max((len(c) for c in cats), default=0)
    if longest == 0:
        return [{} for _ in cols]
    padded = {col: (c + [c[0]] * (longest - len(c))) if c else [None] * longest for col, c in zip(cols, cats)}
    coded = encoder.transform(pd.DataFrame(padded, dtype=object))
    return [{cat: float(coded[i, j]) for i, cat in enumerate(cats[j])} for j in range(len(cols))]


def known_categories(contract: ModelContract, model: Any) -> dict[str, frozenset[str]]:
    """Categorical input column -> the values the model saw in training: the contract's record
    (`known_categories`) or, for a contract written before it kept one, the fitted encoders' own
    (`categories_` of any encoder in the model's ColumnTransformer). Columns with no record are
    left out: nothing is flagged for them."""
    if contract.known_categories:
        return {c: frozenset(v) for c, v in contract.known_categories.items()}
    found: dict[str, frozenset[str]] = {}
    steps = getattr(model, "steps", None) or []
    for _, step in steps:
        for _, transformer, cols in getattr(step, "transformers_", ()):
            categories = getattr(transformer, "categories_", None)
            if categories is None or isinstance(cols, str):
                continue
            for col, values in zip(cols, categories):
                if isinstance(col, str) and col in contract.categorical_features:
                    found[col] = frozenset(v for v in values if isinstance(v, str))
    return found
