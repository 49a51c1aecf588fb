"""Data drift between two DataFrames, column by column: `detect_drift(reference, current)`.

Per column (kind inferred from the reference, see drift_profile):
- numeric: two-sample Kolmogorov-Smirnov test; effect size: the KS distance D itself (the largest
  gap between the two ECDFs, in [0, 1]; it does not grow with the row count);
- categorical: chi-square test of homogeneity on the category counts; effect size: Jensen-Shannon
  distance (base 2, debiased for the sample sizes); categories the reference never had are counted;
- every column: a two-proportion test of the null share, folded into the column's status.
Statuses: `alert` needs a p-value significant after correcting for all tests of the report (Holm by
default) and an effect of at least the floor; `warn` is significant but smaller; `ok` is not
significant; `no_data` is nothing to compare (empty window, too few values, skipped column), neither
ok nor an alarm. A missing column or values that are not numbers are `alert` whatever the tests say.
The method, the defaults and why: docs/monitoring_drift.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ml_platform.monitoring import drift_stats as ds
from ml_platform.monitoring.drift_profile import (
    NUMERIC,
    ColumnProfile,
    ReferenceProfile,
    category_counts,
    category_stats,
    default_workers,
    finite_part,
    numeric_stats,
    plot_counts,
    profile_column,
    select_columns,
    sorted_numeric_values,
)
from ml_platform.monitoring.drift_report import ColumnDrift, DriftReport
from ml_platform.monitoring.status import ALERT, NO_DATA, OK, WARN, worst


@dataclass(frozen=True)
class DriftThresholds:
    """Every knob of drift detection, with the defaults docs/monitoring_drift.md justifies."""

    alpha: float = 0.01  # significance after correction (family-wise with Holm)
    correction: str = "holm"  # holm | bh | bonferroni | none, over all tests of one report
    numeric_effect_floor: float = 0.05  # KS distance: ~ a 0.125-sd mean shift, a 1.25x scale change
    categorical_effect_floor: float = 0.05  # Jensen-Shannon distance: ~ 5 % of mass moved, a 0.5 % new category
    null_share_floor: float = 0.05  # absolute change of the null share (5 percentage points)
    min_rows: int = 30  # non-null values per side below which a column is not compared (no_data)
    numeric_bins: int = 20  # plot bins at reference quantiles (plus below/above the reference range)
    top_categories: int = 15  # categories plotted; the rest is "other"
    identifier_unique_share: float = 0.5  # a text column this unique ...
    identifier_min_distinct: int = 1000  # ... with at least this many values is an identifier: skipped
    dataset_alert_share: float = 0.0  # dataset alert when this share of columns alerts (0: any column)

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, rule: str) -> None:
            if not ok:
                raise ValueError(f"DriftThresholds.{name} = {getattr(self, name)!r} must be {rule}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            want = type(f.default)
            if isinstance(value, bool) or not isinstance(value, want if want is not float else (int, float)):
                raise TypeError(f"DriftThresholds.{f.name} = {value!r} must be of type {want.__name__}")
            if want is float and not math.isfinite(value):
                raise ValueError(f"DriftThresholds.{f.name} = {value!r} must be a finite number")
        check("alpha", 0 < self.alpha < 1, "in (0, 1)")
        check("correction", self.correction in ds.CORRECTIONS, f"one of {ds.CORRECTIONS}")
        for name in ("numeric_effect_floor", "categorical_effect_floor", "null_share_floor", "dataset_alert_share"):
            check(name, 0 <= getattr(self, name) <= 1, "in [0, 1]")
        check("min_rows", self.min_rows >= 1, ">= 1")
        check("numeric_bins", 2 <= self.numeric_bins <= 200, "in [2, 200]")
        check("top_categories", 1 <= self.top_categories <= 100, "in [1, 100]")
        check("identifier_unique_share", 0 < self.identifier_unique_share <= 1, "in (0, 1]")
        check("identifier_min_distinct", self.identifier_min_distinct >= 1, ">= 1")


def detect_drift(reference: pd.DataFrame | ReferenceProfile, current: pd.DataFrame, *, columns=None,
                 categorical=None, numeric=None, thresholds: DriftThresholds | None = None,
                 workers: int | None = None, effect_floors: Mapping[str, float] | None = None) -> DriftReport:
    """Compare `current` with `reference` (a DataFrame, or a ReferenceProfile built from one) column by
    column. `columns`: which (default: all of the reference); `categorical` / `numeric`: force a
    column's kind; `workers`: threads over columns (default min(4, cores)); `effect_floors`: a higher
    effect floor for some columns ({name: floor}, e.g. from `period_effects`: a column whose
    days differ this much among themselves alerts only past it)."""
    t = thresholds if thresholds is not None else DriftThresholds()
    if not isinstance(t, DriftThresholds):
        raise TypeError(f"thresholds must be a DriftThresholds, got {type(t).__name__}")
    if not isinstance(current, pd.DataFrame):
        raise TypeError(f"current must be a pandas DataFrame, got {type(current).__name__}")
    current_names = [str(c) for c in current.columns]
    dup = sorted({c for c in current_names if current_names.count(c) > 1})
    if dup:
        raise ValueError(f"current: duplicated column names {dup}")
    by_name = dict(zip(current_names, current.columns, strict=True))
    workers = workers or default_workers()

    if isinstance(reference, ReferenceProfile):
        if categorical or numeric:
            raise ValueError("categorical= / numeric= are fixed when the ReferenceProfile is built; pass them there")
        if reference.bins != t.numeric_bins:
            raise ValueError(
                f"thresholds.numeric_bins = {t.numeric_bins}, but the ReferenceProfile was built with "
                f"{reference.bins}: build it with the same thresholds (ReferenceProfile.from_frame(thresholds=...))"
            )
        names = list(reference.columns) if columns is None else [str(c) for c in columns]
        unknown = [c for c in names if c not in reference.columns]
        if unknown:
            raise ValueError(f"columns: {unknown} not in the reference profile's columns {list(reference.columns)[:20]}")
        n_reference = reference.n_rows

        def task(name):
            return _compare(reference.columns[name], _current_series(current, by_name, name), t)
    elif isinstance(reference, pd.DataFrame):
        chosen, forced = select_columns(list(reference.columns), columns, categorical, numeric)
        names = [str(c) for c in chosen]
        original = dict(zip(names, chosen, strict=True))
        n_reference = len(reference)

        def task(name):
            prof = profile_column(reference[original[name]], name, kind=forced.get(original[name]),
                                  bins=t.numeric_bins, identifier_unique_share=t.identifier_unique_share,
                                  identifier_min_distinct=t.identifier_min_distinct)
            return _compare(prof, _current_series(current, by_name, name), t)
    else:
        raise TypeError(f"reference must be a pandas DataFrame or a ReferenceProfile, got {type(reference).__name__}")

    extra = [c for c in current_names if c not in set(names)] if columns is None else []
    if len(current) == 0 or n_reference == 0:
        side = "current window" if len(current) == 0 else "reference"
        note = f"{side} is empty (0 rows)"
        cols = [ColumnDrift(feature=n, kind=None, test="none", status=NO_DATA, n_reference=n_reference,
                            n_current=len(current), note=note) for n in names]
        return DriftReport(cols, NO_DATA, None, n_reference, len(current), dataclasses.asdict(t), extra, note)

    if workers > 1 and len(names) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            compared = list(pool.map(task, names))
    else:
        compared = [task(n) for n in names]
    cols = _decide(compared, t, effect_floors or {})
    return _report(cols, t, n_reference, len(current), extra)


def period_effects(frame: pd.DataFrame, periods: pd.Series, *, min_rows: int = 200,
                   thresholds: DriftThresholds | None = None) -> dict[str, float]:
    """How much each column of `frame` differs between its own periods (e.g. the days of a
    reference): {column: the largest effect size (KS / Jensen-Shannon distance) of one period
    against the whole frame}, over the periods of at least `min_rows` rows (fewer than 3: {}).
    Real data is clustered (a day's transactions share merchants, bursts, news), so a day differs
    from the rest by more than sampling noise; a serving day that differs no more than the
    reference's own days did is not drift."""
    periods = pd.Series(np.asarray(periods), index=frame.index)
    sizes = periods.value_counts()
    chosen = sizes[sizes >= min_rows].index
    if len(chosen) < 3:
        return {}
    profile = ReferenceProfile.from_frame(frame, thresholds=thresholds)
    largest: dict[str, float] = {}
    for period in chosen:
        report = detect_drift(profile, frame[periods == period], thresholds=thresholds)
        for col in report.columns:
            if col.effect_size is not None and math.isfinite(col.effect_size):
                largest[col.feature] = max(largest.get(col.feature, 0.0), float(col.effect_size))
    return largest


def _current_series(current: pd.DataFrame, by_name: dict, name: str) -> pd.Series | None:
    return current[by_name[name]] if name in by_name else None


# ----------------------------------------------------------------------------- one column
@dataclass
class _Compared:
    col: ColumnDrift
    floor: str  # the least severe status the facts allow (missing, invalid values: alert)
    notes: list[str]


def _compare(prof: ColumnProfile, series: pd.Series | None, t: DriftThresholds) -> _Compared:
    col = ColumnDrift(feature=prof.name, kind=prof.kind, test="none", status=OK, n_reference=prof.n_rows,
                      reference_stats=prof.stats)
    notes = list(prof.notes)
    if prof.n_rows:
        col.null_share_reference = prof.n_null / prof.n_rows
    if prof.skip_reason:
        col.test, col.status = "skipped", NO_DATA
        col.n_current = 0 if series is None else len(series)
        return _Compared(col, NO_DATA, [prof.skip_reason] + (["missing from the current data"] if series is None else []))
    if series is None:
        col.test, col.status, col.reasons = "missing", ALERT, ["missing"]
        return _Compared(col, ALERT, ["column missing from the current data"] + notes)
    col.n_current = len(series)
    floor = OK
    if prof.kind == NUMERIC:
        n_cur_values, floor = _numeric(prof, series, t, col, notes)
    else:
        n_cur_values, floor = _categorical(prof, series, t, col, notes)
    n_null = col.n_current - n_cur_values - col.invalid_values
    col.null_share_current = n_null / col.n_current
    if prof.n_null + n_null > 0:
        z, p = ds.two_proportion_test(prof.n_null, prof.n_rows, n_null, col.n_current)
        col.null_p_value = p
        if n_cur_values == 0 and col.invalid_values == 0 and prof.n_values > 0:
            col.test, col.statistic, col.p_value = "null_share", z, p
            col.effect_size, col.effect_metric = abs(col.null_share_current - col.null_share_reference), "null_share_change"
            notes.append(f"every current value is null (reference: {col.null_share_reference:.1%} null)")
            floor = worst([floor, WARN])
            col.reasons.append("all_null")
    if col.test == "none" and floor == OK:
        floor = NO_DATA
        notes.append(f"too few values to compare: {prof.n_values} reference, {n_cur_values} current "
                     f"(min_rows={t.min_rows})")
    return _Compared(col, floor, notes)


def _numeric(prof, series, t, col, notes) -> tuple[int, str]:
    cur, _, n_invalid, examples, read_notes = sorted_numeric_values(series, prof.read_as)
    notes.extend(n for n in read_notes if n not in notes)
    ref = prof.values
    col.invalid_values = n_invalid
    floor = OK
    if n_invalid:
        floor = ALERT
        col.reasons.append("not_numbers")
        notes.append(f"{n_invalid:,} current values are not numbers, e.g. {examples}")
    col.current_stats = numeric_stats(finite_part(cur))
    if len(ref) >= t.min_rows and len(cur) >= t.min_rows:
        d, p = ds.ks_2samp_sorted(ref, cur)
        col.test, col.statistic, col.p_value = "ks", d, p
        col.effect_size, col.effect_metric = d, "ks_distance"
        if ref[0] == ref[-1] and cur[0] == cur[-1]:
            notes.append("constant in both" if ref[0] == cur[0] else f"constant: {ref[0].item()!r} -> {cur[0].item()!r}")
    if len(ref):
        col.plot = _numeric_plot(prof, ref, cur)
        col.psi = ds.psi(np.asarray(col.plot["reference"]), np.asarray(col.plot["current"]))
    return len(cur), floor


def _numeric_plot(prof: ColumnProfile, ref: np.ndarray, cur: np.ndarray) -> dict:
    edges = prof.edges
    rc, cc = plot_counts(prof, ref), plot_counts(prof, cur)
    text = _edge_labels(edges, integer=ref.dtype.kind in "iu")
    if prof.discrete or len(edges) == 1:
        labels, unseen = text + ["other values"], [False] * len(edges) + [True]
        keep = [True] * len(edges) + [bool(rc[-1] or cc[-1])]
        kind = "values"
    else:
        inner = [f"[{a}, {b})" for a, b in itertools.pairwise(text)]
        inner[-1] = inner[-1][:-1] + "]"
        labels = [f"< {text[0]}"] + inner + [f"> {text[-1]}"]
        unseen = [True] + [False] * len(inner) + [True]
        keep = [bool(rc[0] or cc[0])] + [True] * len(inner) + [bool(rc[-1] or cc[-1])]
        kind = "bins"
    rs, cs = rc / max(len(ref), 1), cc / max(len(cur), 1)
    pick = np.flatnonzero(keep)
    return {"type": kind, "edges": [float(e) for e in edges], "labels": [labels[i] for i in pick],
            "reference": [float(rs[i]) for i in pick], "current": [float(cs[i]) for i in pick],
            "unseen": [unseen[i] for i in pick]}


def _edge_labels(edges: np.ndarray, integer: bool) -> list[str]:
    if integer:
        return [str(int(e)) for e in edges]
    for digits in range(3, 17):
        text = [f"{float(e):.{digits}g}" for e in edges]
        if len(set(text)) == len(text):
            return text
    return text


def _categorical(prof, series, t, col, notes) -> tuple[int, str]:
    labels, counts, _ = category_counts(series)
    ref_labels, ref_counts = prof.categories, prof.counts
    pos = pd.Index(ref_labels).get_indexer(labels) if len(ref_labels) else np.full(len(labels), -1)
    seen = pos >= 0
    n_ref_cat, new = len(ref_labels), labels[~seen]
    cur_full = np.zeros(n_ref_cat + len(new), dtype=np.int64)
    cur_full[pos[seen]] = counts[seen]
    cur_full[n_ref_cat:] = counts[~seen]
    ref_full = np.concatenate([ref_counts, np.zeros(len(new), dtype=np.int64)])
    all_labels = np.concatenate([ref_labels, new]) if len(new) else ref_labels
    n1, n2 = int(ref_full.sum()), int(cur_full.sum())
    col.unseen_categories = len(new)
    col.unseen_share = float(counts[~seen].sum() / n2) if n2 else None
    col.current_stats = category_stats(labels, counts)
    if len(new) and n2:
        notes.append(f"{len(new):,} {'category' if len(new) == 1 else 'categories'} not in the reference ({col.unseen_share:.1%} of current values), "
                     f"e.g. {[str(x) for x in new[:3]]}")
    if n1 >= t.min_rows and n2 >= t.min_rows:
        stat, p, _ = ds.chi2_homogeneity(ref_full, cur_full)
        col.test, col.statistic, col.p_value = "chi2", stat, p
        col.effect_size, col.effect_metric = ds.jensen_shannon(ref_full, cur_full), "jensen_shannon"
        if len(all_labels) == 1:
            notes.append("constant in both")
        elif n_ref_cat == 1 and len(labels) == 1:
            notes.append(f"constant: {str(ref_labels[0])!r} -> {str(labels[0])!r}")
    if n1 and n2:
        rs, cs = ref_full / n1, cur_full / n2
        col.psi = ds.psi(rs, cs)
        col.plot = _category_plot(all_labels, rs, cs, n_ref_cat, t.top_categories)
    return n2, OK


def _category_plot(labels, rs, cs, n_ref_cat, top) -> dict:
    order = np.argsort(-np.maximum(rs, cs), kind="stable")
    shown, rest = order[:top], order[top:]
    out = {"type": "categories", "labels": [str(labels[i]) if str(labels[i]) else "(empty text)" for i in shown],
           "reference": [float(rs[i]) for i in shown], "current": [float(cs[i]) for i in shown],
           "unseen": [bool(i >= n_ref_cat) for i in shown]}
    if len(rest):
        out["labels"].append(f"other ({len(rest)} categories)")
        out["reference"].append(float(rs[rest].sum()))
        out["current"].append(float(cs[rest].sum()))
        out["unseen"].append(False)
    return out


# ----------------------------------------------------------------------------- statuses
def _decide(compared: list[_Compared], t: DriftThresholds, effect_floors: Mapping[str, float]) -> list[ColumnDrift]:
    """Correct every test of the report together, then give each column its status and note."""
    family: list[tuple[int, str, float]] = []
    for i, c in enumerate(compared):
        if c.col.test in ("ks", "chi2"):
            family.append((i, "dist", c.col.p_value))
        if c.col.null_p_value is not None:
            family.append((i, "null", c.col.null_p_value))
    adjusted = ds.adjust_pvalues([p for _, _, p in family], t.correction)
    for (i, which, _), p_adj in zip(family, adjusted, strict=True):
        if which == "dist":
            compared[i].col.p_value_adjusted = float(p_adj)
        else:
            compared[i].col.null_p_value_adjusted = float(p_adj)
    out = []
    for c in compared:
        col, parts, notes = c.col, [c.floor], c.notes
        if col.test == "null_share":
            col.p_value_adjusted = col.null_p_value_adjusted
        elif col.test in ("ks", "chi2"):
            floor = t.numeric_effect_floor if col.test == "ks" else t.categorical_effect_floor
            floor = max(floor, float(effect_floors.get(col.feature, 0.0)))
            parts.append(_rule(col.p_value_adjusted, col.effect_size, floor, t.alpha))
            if parts[-1] != OK:
                col.reasons.append("distribution")
                size = "large" if parts[-1] == ALERT else "small"
                sign = ">=" if parts[-1] == ALERT else "<"
                notes.append(f"{size} change: {col.effect_metric} {col.effect_size:.3g} {sign} {floor:g} "
                             f"(p_adj {col.p_value_adjusted:.2g})")
        if col.null_p_value_adjusted is not None:
            change = abs(col.null_share_current - col.null_share_reference)
            parts.append(_rule(col.null_p_value_adjusted, change, t.null_share_floor, t.alpha))
            if parts[-1] != OK:
                if "all_null" not in col.reasons:
                    col.reasons.append("null_share")
                notes.append(f"null share {col.null_share_reference:.1%} -> {col.null_share_current:.1%} "
                             f"(p_adj {col.null_p_value_adjusted:.2g}): {parts[-1]}")
        col.status = worst(parts)
        col.note = "; ".join(dict.fromkeys(n for n in notes if n))
        out.append(col)
    return out


def _rule(p_adjusted: float, effect: float, floor: float, alpha: float) -> str:
    if p_adjusted < alpha:
        return ALERT if effect >= floor else WARN
    return OK


def _report(cols: list[ColumnDrift], t: DriftThresholds, n_reference: int, n_current: int,
            extra: list[str]) -> DriftReport:
    compared = [c for c in cols if c.status != NO_DATA]
    alerts = sum(c.status == ALERT for c in compared)
    warns = sum(c.status == WARN for c in compared)
    share = alerts / len(compared) if compared else None
    if not compared:
        status, note = NO_DATA, "no column could be compared"
    elif alerts and share >= t.dataset_alert_share:
        status, note = ALERT, ""
    else:
        status, note = (WARN if alerts or warns else OK), ""
    return DriftReport(cols, status, share, n_reference, n_current, dataclasses.asdict(t), extra, note)
