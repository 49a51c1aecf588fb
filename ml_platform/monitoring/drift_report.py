"""What `detect_drift` returns: one `ColumnDrift` per column and the `DriftReport` around them, with
a frame (one row per column), JSON-safe dict/JSON, a one-line summary and an HTML page/sections
drawn with `ml_platform.monitoring.html`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from html import escape
from typing import Any

import pandas as pd

from ml_platform.monitoring.results import json_safe
from ml_platform.monitoring.status import ALERT, NO_DATA, OK, WARN

FRAME_COLUMNS = [
    "feature", "kind", "test", "statistic", "p_value", "p_value_adjusted", "effect_size", "effect_metric",
    "status", "n_reference", "n_current", "null_share_reference", "null_share_current", "null_p_value",
    "null_p_value_adjusted", "unseen_categories", "unseen_share", "invalid_values", "psi", "note",
]
TABLE_COLUMNS = ["feature", "status", "test", "effect_metric", "effect_size", "p_value_adjusted",
                 "null_share_reference", "null_share_current", "unseen_share", "note"]
MAX_PLOTS = 12
_RANK = {ALERT: 0, WARN: 1, OK: 2, NO_DATA: 3}


@dataclass
class ColumnDrift:
    """The comparison of one column. `plot` holds what a chart needs (labels, reference and current
    shares per bin or category, `unseen` flags); `reference_stats`/`current_stats` the summary figures
    (numeric: mean, std, min, median, max; categorical: distinct count and top shares)."""

    feature: str
    kind: str | None
    test: str  # ks | chi2 | null_share | missing | skipped | none
    status: str
    statistic: float | None = None
    p_value: float | None = None
    p_value_adjusted: float | None = None
    effect_size: float | None = None
    effect_metric: str | None = None  # ks_distance | jensen_shannon | null_share_change
    n_reference: int = 0
    n_current: int = 0
    null_share_reference: float | None = None
    null_share_current: float | None = None
    null_p_value: float | None = None
    null_p_value_adjusted: float | None = None
    unseen_categories: int | None = None
    unseen_share: float | None = None
    invalid_values: int = 0
    psi: float | None = None
    note: str = ""
    # what made it warn/alert: distribution | null_share | not_numbers | missing | all_null
    reasons: list[str] = field(default_factory=list)
    reference_stats: dict[str, Any] = field(default_factory=dict)
    current_stats: dict[str, Any] = field(default_factory=dict)
    plot: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


@dataclass
class DriftReport:
    """Column results plus the dataset-level view: `status` (ok | warn | alert | no_data),
    `drift_share` (alerting columns / compared columns), and the thresholds used."""

    columns: list[ColumnDrift]
    status: str
    drift_share: float | None
    n_reference: int
    n_current: int
    thresholds: dict[str, Any]
    extra_columns: list[str] = field(default_factory=list)  # in current only: not compared
    note: str = ""

    def __getitem__(self, feature: str) -> ColumnDrift:
        for col in self.columns:
            if col.feature == feature:
                return col
        raise KeyError(f"no column {feature!r} in the drift report; columns: {[c.feature for c in self.columns]}")

    def counts(self) -> dict[str, int]:
        """Columns per status."""
        out = {OK: 0, WARN: 0, ALERT: 0, NO_DATA: 0}
        for col in self.columns:
            out[col.status] = out.get(col.status, 0) + 1
        return out

    @property
    def drifted(self) -> list[ColumnDrift]:
        """warn and alert columns, alerts first, then by effect size."""
        cols = [c for c in self.columns if c.status in (ALERT, WARN)]
        return sorted(cols, key=lambda c: (_RANK[c.status], -(c.effect_size or 0.0)))

    def to_frame(self) -> pd.DataFrame:
        rows = [{k: getattr(c, k) for k in FRAME_COLUMNS} for c in self.columns]
        frame = pd.DataFrame(rows, columns=FRAME_COLUMNS)
        for name in ("statistic", "p_value", "p_value_adjusted", "effect_size", "null_share_reference",
                     "null_share_current", "null_p_value", "null_p_value_adjusted", "unseen_share", "psi"):
            frame[name] = pd.to_numeric(frame[name], errors="coerce").astype("float64")
        frame["unseen_categories"] = frame["unseen_categories"].astype("Int64")
        return frame

    def to_dict(self) -> dict[str, Any]:
        return json_safe({
            "status": self.status,
            "summary": self.summary(),
            "drift_share": self.drift_share,
            "counts": self.counts(),
            "n_reference": self.n_reference,
            "n_current": self.n_current,
            "extra_columns": list(self.extra_columns),
            "note": self.note,
            "thresholds": dict(self.thresholds),
            "columns": [asdict(c) for c in self.columns],
        })

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DriftReport:
        """The report `to_dict` wrote (saved monitoring results are rebuilt into reports, plots included)."""
        names = {f for f in ColumnDrift.__dataclass_fields__}
        columns = [ColumnDrift(**{k: v for k, v in c.items() if k in names}) for c in data.get("columns", [])]
        return cls(
            columns=columns,
            status=data["status"],
            drift_share=data.get("drift_share"),
            n_reference=int(data.get("n_reference") or 0),
            n_current=int(data.get("n_current") or 0),
            thresholds=dict(data.get("thresholds") or {}),
            extra_columns=list(data.get("extra_columns") or []),
            note=data.get("note") or "",
        )

    def to_json(self, **kwargs: Any) -> str:
        """The report as strict JSON (no NaN: missing figures are null)."""
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    def summary(self) -> str:
        """One line: overall status, alerting/warning columns, the largest drifts."""
        c = self.counts()
        if self.status == NO_DATA and not (c[ALERT] or c[WARN] or c[OK]):
            return f"drift no_data: {self.note or 'nothing to compare'} ({len(self.columns)} columns)"
        compared = c[OK] + c[WARN] + c[ALERT]
        share = f" ({self.drift_share:.0%})" if self.drift_share is not None else ""
        text = (f"drift {self.status}: {c[ALERT]}/{compared} columns alert{share}, {c[WARN]} warn"
                f"{f', {c[NO_DATA]} no_data' if c[NO_DATA] else ''}; {self.n_current:,} current vs "
                f"{self.n_reference:,} reference rows")
        top = [col for col in self.drifted if col.status == ALERT][:3]
        if top:
            text += "; top: " + ", ".join(_short(col) for col in top)
        return text

    # ------------------------------------------------------------------------- HTML
    def html_sections(self, max_plots: int = MAX_PLOTS) -> list[tuple[str, str]]:
        """(heading, HTML) sections: summary, per-column table, histograms of drifted columns (alert
        first, at most `max_plots`); the daily report embeds these."""
        from ml_platform.monitoring import html

        c = self.counts()
        tiles = html.tiles_html([
            ("overall", self.status.upper(), self.status),
            ("columns alert", c[ALERT], ALERT if c[ALERT] else OK),
            ("columns warn", c[WARN], WARN if c[WARN] else OK),
            ("drift share", f"{self.drift_share:.0%}" if self.drift_share is not None else None, None),
            ("current rows", self.n_current, None),
            ("reference rows", self.n_reference, None),
        ])
        summary = tiles + f"<p>{escape(self.summary())}</p>"
        ordered = sorted(self.columns, key=lambda col: (_RANK.get(col.status, 9), -(col.effect_size or 0.0)))
        rows = [json_safe({k: getattr(col, k) for k in TABLE_COLUMNS}) for col in ordered]
        sections = [("Data drift: summary", summary), ("Data drift per column", html.table_html(rows, TABLE_COLUMNS))]
        charts = [column_chart(col) for col in self.drifted[:max_plots] if col.plot.get("labels")]
        if charts:
            more = len(self.drifted) - max_plots
            tail = f"<p>{more} more drifted columns are in the table.</p>" if more > 0 else ""
            sections.append(("Drifted columns: reference vs current", html.grid_html(charts) + tail))
        return sections

    def to_html(self, title: str = "Data drift report", max_plots: int = MAX_PLOTS) -> str:
        """A full self-contained HTML page: summary, table, histograms of drifted columns."""
        from ml_platform.monitoring import html

        subtitle = f"{self.n_current:,} current rows vs {self.n_reference:,} reference rows"
        return html.page_html(title, self.html_sections(max_plots), subtitle=subtitle, status=self.status)


def _short(col: ColumnDrift) -> str:
    parts = []
    for reason in col.reasons:
        if reason == "distribution" and col.effect_size is not None:
            parts.append(f"{col.effect_metric} {col.effect_size:.3f}")
        elif reason == "null_share" and col.null_share_current is not None and col.null_share_reference is not None:
            parts.append(f"null share {col.null_share_reference:.1%} -> {col.null_share_current:.1%}")
        elif reason == "not_numbers":
            parts.append(f"{col.invalid_values:,} not numbers")
        else:
            parts.append(reason.replace("_", " "))
    return f"{col.feature} ({', '.join(parts)})" if parts else col.feature


def column_chart(col: ColumnDrift) -> str:
    """The column's reference-vs-current histogram (an inline SVG)."""
    from ml_platform.monitoring import html

    plot = col.plot
    return html.histogram_svg(plot["labels"], plot["reference"], plot["current"],
                              title=_short(col), status=col.status, unseen=plot.get("unseen"))
