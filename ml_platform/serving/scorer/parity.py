"""The parity check's material: synthetic requests covering a model's split points, categories,
nulls and all 24 hours (`parity_sample`), and the comparison of two sets of model inputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

import numpy as np

from ml_platform import features as fr
from ml_platform.serving.scorer.encoding import PipelineLayout
from ml_platform.training.contract import ModelContract
from ml_platform.values import is_missing

PARITY_TOLERANCE = 1e-6
PARITY_SAMPLE_ROWS = 256


def parity_sample(
    contract: ModelContract, layout: PipelineLayout | None, n: int = PARITY_SAMPLE_ROWS, seed: int = 0
) -> tuple[list[dict], dict[str, list]]:
    """Synthetic requests + looked-up features covering the model's split points, every known
    category plus an unknown one, nulls, zero / negative means and every hour of the day."""
    rng = np.random.default_rng(seed)
    thresholds: dict[str, np.ndarray] = {}
    categories: dict[str, list[str]] = {c: sorted(v) for c, v in contract.known_categories.items()}
    if layout is not None:
        bins = getattr(getattr(layout.classifier, "_bin_mapper", None), "bin_thresholds_", None)
        for j, (col, table) in enumerate(zip(layout.columns, layout.codes)):
            if table is not None:
                categories[col] = list(table)
            elif bins is not None and j < len(bins) and len(bins[j]):
                thresholds[col] = np.asarray(bins[j], dtype=np.float64)

    def numeric(col: str) -> list:
        t = thresholds.get(col)
        if t is not None:
            picks = rng.choice(t, n)
            # on a threshold, just above it, and in between: every side of every split
            values = picks + rng.choice([0.0, 1e-9, -1e-9, 0.5], n) * np.maximum(np.abs(picks), 1.0)
        else:
            values = rng.gamma(1.5, 40.0, n) * rng.choice([1.0, 0.0, 10.0], n, p=[0.8, 0.1, 0.1])
        out: list = values.tolist()
        for i in np.flatnonzero(rng.random(n) < 0.1):
            out[i] = None
        return out

    def category(col: str, default: Sequence[str]) -> list:
        known = categories.get(col) or list(default)
        pool = known + ["__never_seen__"]
        out: list = [pool[i] for i in rng.integers(0, len(pool), n)]
        for i in np.flatnonzero(rng.random(n) < 0.08):
            out[i] = None
        return out

    base = datetime(2026, 3, 1, tzinfo=UTC)
    hours = np.concatenate([np.arange(24), np.arange(24), rng.integers(0, 24, max(n - 48, 0))])[:n]
    seconds = rng.integers(0, 3600, n)
    micros = rng.integers(0, 1_000_000, n)
    seconds[:24], micros[:24] = 3599, 999_999  # hour boundaries: the last microsecond of each hour
    seconds[24:48], micros[24:48] = 0, 0  # and the first
    countries = category("country", ["DE", "FR", "US"])
    transactions = []
    cats = {
        c: category(c, ["x", "y"]) for c in contract.categorical_features if c in contract.request_columns
    }
    amounts = np.round(rng.lognormal(3.5, 1.2, n), 2) + 0.01
    for i in range(n):
        ts = base + timedelta(
            days=int(i % 7), hours=int(hours[i]), seconds=int(seconds[i]), microseconds=int(micros[i])
        )
        row = {
            "transaction_id": f"parity-{i}",
            "user_id": i,
            "merchant_id": i,
            "amount": float(amounts[i]),
            fr.EVENT_TS: ts,
        }
        for c in ("merchant_category", "device", "channel"):
            row[c] = (cats.get(c) or ["x"] * n)[i] or "x"
        row["country"] = countries[i] or "DE"
        transactions.append(row)
    looked_up: dict[str, list] = {}
    for col in contract.feature_columns:
        if col in contract.categorical_features:
            looked_up[col] = category(col, ["DE", "FR"])
            # some home countries equal the request's country: is_foreign = 0
            for i in range(0, n, 3):
                looked_up[col][i] = transactions[i]["country"]
        else:
            looked_up[col] = numeric(col)
    if "amount_mean_30d" in looked_up:  # zero and negative means: the ratio's guard
        for i in range(1, n, 17):
            looked_up["amount_mean_30d"][i] = 0.0
        for i in range(2, n, 23):
            looked_up["amount_mean_30d"][i] = -5.0
    return transactions, looked_up


def inputs_mismatch(a: Mapping[str, Sequence], b: Mapping[str, Sequence], columns: Sequence[str]) -> str | None:
    """None if the two sets of model inputs are equal (NaN == NaN, a string only equal to the
    same string, numbers compared as floats), else the first difference."""
    for col in columns:
        for i, (x, y) in enumerate(zip(a[col], b[col], strict=True)):
            if is_missing(x) and is_missing(y):
                continue
            if isinstance(x, str) or isinstance(y, str):
                if x != y:
                    return f"column {col!r} row {i}: {x!r} != {y!r}"
            elif is_missing(x) or is_missing(y) or float(x) != float(y):
                return f"column {col!r} row {i}: {x!r} != {y!r}"
    return None
