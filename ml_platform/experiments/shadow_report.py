"""Live vs shadow on the same requests: what a shadow version would have done had it served.

The API logs a shadow's prediction beside the live one (role `shadow`, prediction id = the live
id + `SHADOW_SUFFIX`, same transaction). `pair_shadow` matches the two; `compare_shadow` reports
decision agreement and flips, score correlation, both latencies and the shadow's errors, and, on
the pairs whose label has arrived, both models' served metrics on exactly the same rows.
Vectorised pandas: a log of hundreds of thousands of rows takes well under a second.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import orjson
import pandas as pd

from ml_platform.monitoring.performance import served_metrics
from ml_platform.monitoring.results import json_safe

SHADOW_SUFFIX = ":shadow"
_LIVE, _SHADOW = "live", "shadow"


def shadow_prediction_id(live_prediction_id: str) -> str:
    """The prediction id of a live prediction's shadow twin (the one place this rule lives)."""
    return f"{live_prediction_id}{SHADOW_SUFFIX}"


def _roles(log: pd.DataFrame) -> pd.Series:
    if "role" not in log.columns:
        return pd.Series(_LIVE, index=log.index)
    return log["role"].fillna(_LIVE)


def _error(flags: Any) -> str | None:
    if not isinstance(flags, str) or not flags:
        return None
    try:
        value = orjson.loads(flags)
    except orjson.JSONDecodeError:
        return None
    return value.get("error") if isinstance(value, dict) else None


def pair_shadow(log: pd.DataFrame, *, shadow_version: int | None = None) -> pd.DataFrame:
    """One row per live prediction with a shadow twin (optionally only twins of `shadow_version`)."""
    roles = _roles(log)
    shadow = log[roles == _SHADOW]
    if shadow_version is not None:
        shadow = shadow[shadow["model_version"] == shadow_version]
    live = log[roles == _LIVE]
    columns = ["prediction_id", "model_version", "probability", "decision", "threshold", "latency_ms"]
    live_part = live[[*columns, "transaction_id", "event_timestamp"]].rename(
        columns={c: f"live_{c}" for c in columns}
    )
    shadow_part = shadow[[*columns, "flags"]].rename(columns={c: f"shadow_{c}" for c in columns})
    shadow_part["live_prediction_id"] = shadow_part["shadow_prediction_id"].str.removesuffix(SHADOW_SUFFIX)
    pairs = live_part.merge(shadow_part, on="live_prediction_id", how="inner")
    failed = pairs["shadow_probability"].isna()
    pairs["shadow_error"] = None
    if failed.any():
        pairs.loc[failed, "shadow_error"] = pairs.loc[failed, "flags"].map(_error)
    return pairs.drop(columns=["flags", "shadow_prediction_id"]).rename(
        columns={"live_model_version": "live_version", "shadow_model_version": "shadow_version"}
    )


def _latency(values: pd.Series) -> dict[str, float | None]:
    v = values.dropna().to_numpy(dtype=float)
    if not len(v):
        return {"p50": None, "p99": None, "max": None}
    return {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)), "max": float(v.max())}


@dataclass
class ShadowComparison:
    live_version: int | None
    shadow_version: int | None
    pairs: int
    shadow_errors: int
    unpaired_shadow: int
    agreement_rate: float | None
    flips_to_fraud: int
    flips_to_legit: int
    score_correlation: float | None
    score_rank_correlation: float | None
    mean_abs_score_diff: float | None
    live_latency_ms: dict
    shadow_latency_ms: dict
    labelled: int
    live_metrics: dict | None
    shadow_metrics: dict | None

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    def summary(self) -> str:
        def ms(d: dict) -> str:
            return f"{d['p99']:.1f} ms" if d.get("p99") is not None else "-"

        text = f"v{self.shadow_version} shadowing v{self.live_version} on {self.pairs:,} rows: "
        if self.agreement_rate is None:
            text += "no scored pair yet"
        else:
            text += (
                f"agreement {self.agreement_rate:.1%} ({self.flips_to_fraud} to fraud, {self.flips_to_legit} to legit)"
                + (f", r={self.score_correlation:.3f}" if self.score_correlation is not None else "")
            )
        text += f", p99 live {ms(self.live_latency_ms)} / shadow {ms(self.shadow_latency_ms)}, {self.shadow_errors} errors"
        if self.labelled and self.live_metrics and self.shadow_metrics:
            lp, sp = self.live_metrics.get("pr_auc"), self.shadow_metrics.get("pr_auc")
            if lp is not None and sp is not None:
                text += f"; on {self.labelled:,} labelled rows PR AUC {lp:.3f} vs {sp:.3f}"
            else:
                text += f"; {self.labelled:,} labelled rows (one class only)"
        return text


def compare_shadow(
    log: pd.DataFrame, labels: pd.DataFrame | None = None, *, shadow_version: int | None = None
) -> ShadowComparison:
    """The comparison over every pair in `log` (read with roles=None); `labels` (transaction_id,
    is_fraud, label_timestamp) adds both models' metrics on the labelled pairs."""
    pairs = pair_shadow(log, shadow_version=shadow_version)
    roles = _roles(log)
    shadow_rows = log[roles == _SHADOW]
    if shadow_version is not None:
        shadow_rows = shadow_rows[shadow_rows["model_version"] == shadow_version]
    unpaired = len(shadow_rows) - len(pairs)
    scored = pairs[pairs["live_probability"].notna() & pairs["shadow_probability"].notna()]
    live_fraud = scored["live_decision"] == "fraud"
    shadow_fraud = scored["shadow_decision"] == "fraud"
    n = len(scored)
    pearson = spearman = None
    if n >= 3 and scored["live_probability"].nunique() > 1 and scored["shadow_probability"].nunique() > 1:
        pearson = float(scored["live_probability"].corr(scored["shadow_probability"]))
        spearman = float(scored["live_probability"].corr(scored["shadow_probability"], method="spearman"))
    labelled_rows = pd.DataFrame()
    if labels is not None and len(labels) and n:
        latest = labels.sort_values("label_timestamp").drop_duplicates("transaction_id", keep="last")
        labelled_rows = scored.merge(latest[["transaction_id", "is_fraud"]], on="transaction_id", how="inner")
    live_metrics = shadow_metrics = None
    if len(labelled_rows):
        y = labelled_rows["is_fraud"].astype(int).to_numpy()
        live_metrics = served_metrics(y, labelled_rows["live_probability"].to_numpy(float),
                                      (labelled_rows["live_decision"] == "fraud").to_numpy())  # fmt: skip
        shadow_metrics = served_metrics(y, labelled_rows["shadow_probability"].to_numpy(float),
                                        (labelled_rows["shadow_decision"] == "fraud").to_numpy())  # fmt: skip
    live_versions = pairs["live_version"].dropna()
    shadow_versions = pairs["shadow_version"].dropna()
    return ShadowComparison(
        live_version=int(live_versions.mode().iloc[0]) if len(live_versions) else None,
        shadow_version=int(shadow_versions.mode().iloc[0]) if len(shadow_versions) else shadow_version,
        pairs=len(pairs),
        shadow_errors=int(pairs["shadow_probability"].isna().sum()),
        unpaired_shadow=int(unpaired),
        agreement_rate=float((live_fraud == shadow_fraud).mean()) if n else None,
        flips_to_fraud=int((~live_fraud & shadow_fraud).sum()),
        flips_to_legit=int((live_fraud & ~shadow_fraud).sum()),
        score_correlation=pearson,
        score_rank_correlation=spearman,
        mean_abs_score_diff=float((scored["live_probability"] - scored["shadow_probability"]).abs().mean()) if n else None,
        live_latency_ms=_latency(pairs["live_latency_ms"]),
        shadow_latency_ms=_latency(pairs.loc[pairs["shadow_probability"].notna(), "shadow_latency_ms"]),
        labelled=len(labelled_rows),
        live_metrics=live_metrics,
        shadow_metrics=shadow_metrics,
    )
