"""The validation gate: one pandera schema per dataset, and a report that never raises on bad data.

Schemas: RAW_TRANSACTIONS_SCHEMA (derived from the transaction contract, `ml_platform.transactions`,
plus the table-only rules), USERS_SCHEMA, TRAINING_SET_SCHEMA
(built from ml_platform.features, so a new feature is validated without touching this file).
`validate(df, "raw_transactions", now=...)` returns a ValidationReport whose `to_metadata()` goes
into a Dagster asset check and whose `summary()` tells a person what failed, where, with samples.

Severity: every check is an error (the gate fails) except checks declared with
`raise_warning=True`. The one such check here is "merchant_category is a known one" (the
contract's soft vocabulary): a new
category is a fact about the world (drift, a new merchant type), not broken data; the model
treats unknown categories as such and drift monitoring reports it. Such findings go to
`report.warnings` and leave `report.ok` True. The category itself must still be a non-empty
lowercase identifier (an error otherwise).

Why ~500 lines in one module: the schemas and the report share the check registry (row rules,
the clock of record) that turns pandera's failure cases into findings; splitting them would make
that state cross a module boundary. A candidate split, once a second report consumer appears:
`validation/schemas.py` and `validation/report.py`.
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaErrors, SchemaWarning

from ml_platform import fixed_point
from ml_platform.features import (
    CATEGORICAL_FEATURES,
    CREATED_TS,
    EVENT_TS,
    FEATURE_VIEWS,
    LABEL,
    LABEL_TS,
    MODEL_FEATURE_REFS,
    REQUEST_FEATURES,
)
from ml_platform.featurestore.definitions import FeatureView, ValueType, parse_feature_ref
from ml_platform.transactions import TRANSACTION, EventContract, IntegerField, NumberField, TextField

SAMPLE_SIZE = 5

# The instant "now" for the not-in-the-future checks; set by validate(), else the wall clock.
_NOW: contextvars.ContextVar[pd.Timestamp | None] = contextvars.ContextVar("validation_now", default=None)


def _now() -> pd.Timestamp:
    return _NOW.get() or pd.Timestamp.now(tz="UTC")


# --- Reusable checks ---


def _dtype_check(kind: str) -> pa.Check:
    """A lenient dtype check: any integer width or the nullable Int64, any datetime unit in UTC, ..."""
    tests: dict[str, Callable[[pd.Series], bool]] = {
        "integer": pd.api.types.is_integer_dtype,
        "float": pd.api.types.is_float_dtype,
        "numeric": lambda s: pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s),
        "string": lambda s: pd.api.types.is_string_dtype(s) or pd.api.types.is_object_dtype(s),
        "utc_timestamp": lambda s: isinstance(s.dtype, pd.DatetimeTZDtype) and str(s.dtype.tz) == "UTC",
    }
    test = tests[kind]
    return pa.Check(lambda s: bool(test(s)), name=f"dtype_{kind}", error=f"dtype is {kind}")


def _not_in_future() -> pa.Check:
    return pa.Check(lambda s: s <= _now(), name="not_in_future", error="not in the future (<= now)")


def _iso2_country(name: str) -> pa.Check:
    """The transaction contract's country rule, for another column holding a country."""
    return _text_value_check(dataclasses.replace(TRANSACTION.field("country"), name=name))  # type: ignore[arg-type]


def _unique() -> pa.Check:
    """Values appear once (pandera's `unique=True` raises on unhashable values such as lists;
    the gate reports those as bad text, and must not crash on them)."""

    def test(s: pd.Series) -> pd.Series:
        keys = s.map(lambda v: v if isinstance(v, (str, int, float)) else (type(v).__name__, repr(v)))
        return ~keys.duplicated(keep=False)

    return pa.Check(test, name="field_uniqueness", error="field_uniqueness")


def _row_rule(name: str, columns: Sequence[str], test: Callable[[pd.DataFrame], pd.Series]) -> pa.Check:
    """A check across columns; `columns[0]` is the column it is reported under."""

    def run(df: pd.DataFrame) -> pd.Series | bool:
        if any(c not in df.columns for c in columns):
            return True  # the missing column is reported by its own check
        return test(df)

    check = pa.Check(run, name=name, error=name)
    _ROW_RULE_COLUMNS[name] = tuple(columns)
    return check


_ROW_RULE_COLUMNS: dict[str, tuple[str, ...]] = {}


# --- Schemas ---


def _text_value_check(spec: TextField) -> pa.Check:
    """Length, not blank and the full-match pattern of a text field, vectorised (what spec.check
    decides per value: a non-string value fails)."""
    regex = spec.pattern

    def test(s: pd.Series) -> pd.Series:
        is_str = s.map(lambda v: type(v) is str).astype(bool)
        text = s.where(is_str, "").astype(str)
        ok = is_str & text.str.len().between(spec.min_length, spec.max_length) & ~text.str.isspace()
        if regex:
            ok &= text.str.fullmatch(regex).fillna(False).astype(bool)
        return ok

    label = f"{spec.name}: {spec.min_length}..{spec.max_length} characters, not blank"
    return pa.Check(test, name=f"{spec.name}_text", error=label + (f", matching {regex}" if regex else ""))


def _decimals_check(name: str, decimals: int) -> pa.Check:
    """At most `decimals` decimal places (`fixed_point.on_grid`, vectorised); a non-number is the
    dtype check's finding."""

    def test(s: pd.Series) -> pd.Series:
        values = pd.to_numeric(s, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
        return pd.Series(~fixed_point.off_grid(values, decimals), index=s.index)

    return pa.Check(test, name=f"{name}_decimals", error=f"{name} has at most {decimals} decimal places")


def contract_columns(contract: EventContract = TRANSACTION) -> dict[str, pa.Column]:
    """One pandera column per field of the transaction contract, with the contract's limits."""
    columns: dict[str, pa.Column] = {}
    for spec in contract.fields:
        if isinstance(spec, TextField):
            checks = [_dtype_check("string"), _text_value_check(spec)]
            if spec.allowed is not None:
                label = f"{spec.name} is a known one" if spec.allowed_is_soft else f"isin({list(spec.allowed)})"
                checks.append(pa.Check.isin(list(spec.allowed), raise_warning=spec.allowed_is_soft, error=label))
        elif isinstance(spec, IntegerField):
            checks = [
                _dtype_check("integer"),
                pa.Check.in_range(spec.ge, spec.le, error=f"{spec.name} in [{spec.ge}, {spec.le}]"),
            ]
        elif isinstance(spec, NumberField):
            checks = [
                _dtype_check("numeric"),
                pa.Check.gt(spec.gt, error=f"{spec.name} > {spec.gt:g}"),
                pa.Check.lt(spec.lt, error=f"{spec.name} < {spec.lt:g}"),
            ]
            if spec.decimals is not None:
                checks.append(_decimals_check(spec.name, spec.decimals))
        else:  # TimestampField: typed in a table
            checks = [_dtype_check("utc_timestamp"), _not_in_future()]
        columns[spec.name] = pa.Column(checks=checks)
    return columns


def raw_transactions_schema(contract: EventContract = TRANSACTION) -> pa.DataFrameSchema:
    """The raw transaction table: the transaction contract's fields (`ml_platform.transactions`),
    plus the table-only columns and rules (unique ids, created/label times, label consistency)."""
    ts = _dtype_check("utc_timestamp")
    columns = contract_columns(contract)
    columns["transaction_id"] = pa.Column(checks=[*columns["transaction_id"].checks, _unique()])
    columns.update(
        {
            CREATED_TS: pa.Column(checks=[ts, _not_in_future()]),
            LABEL: pa.Column(
                checks=[_dtype_check("numeric"), pa.Check.isin([0, 1], error="label in {0, 1}")],
                nullable=True,
            ),
            LABEL_TS: pa.Column(checks=[ts, _not_in_future()], nullable=True),
        }
    )
    return pa.DataFrameSchema(
        columns,
        checks=[
            _row_rule(
                f"{CREATED_TS} >= {EVENT_TS}", [CREATED_TS, EVENT_TS], lambda d: d[CREATED_TS] >= d[EVENT_TS]
            ),
            _row_rule(
                f"{LABEL_TS} >= {EVENT_TS}",
                [LABEL_TS, EVENT_TS],
                lambda d: d[LABEL_TS].isna() | (d[LABEL_TS] >= d[EVENT_TS]),
            ),
            _row_rule(
                f"{LABEL} is null iff {LABEL_TS} is null",
                [LABEL, LABEL_TS],
                lambda d: d[LABEL].isna() == d[LABEL_TS].isna(),
            ),
        ],
        name="raw_transactions",
    )


def users_schema() -> pa.DataFrameSchema:
    """The card-holder profile table."""
    return pa.DataFrameSchema(
        {
            "user_id": pa.Column(checks=[_dtype_check("integer"), pa.Check.gt(0)], unique=True),
            "home_country": pa.Column(checks=[_dtype_check("string"), _iso2_country("home_country")]),
            "account_age_days": pa.Column(
                checks=[_dtype_check("integer"), pa.Check.ge(0), pa.Check.lt(365 * 120)]
            ),
            "updated_at": pa.Column(checks=[_dtype_check("utc_timestamp"), _not_in_future()]),
        },
        name="users",
    )


# Sane ranges of request-time features: (checks, nullable)
_REQUEST_FEATURE_CHECKS: dict[str, tuple[list[pa.Check], bool]] = {
    "amount": ([pa.Check.gt(0)], False),
    "amount_to_user_mean_30d": ([pa.Check.ge(0)], True),  # null: no spending history yet
    "hour_of_day": ([pa.Check.in_range(0, 23)], False),
    "is_night": ([pa.Check.isin([0, 1])], False),
    "is_foreign": ([pa.Check.isin([0, 1])], True),  # null: home country unknown
}
_RANGE_BY_NAME = {"account_age_days": [pa.Check.ge(0)]}


def _looked_up_feature_columns(
    refs: Sequence[str], views: Sequence[FeatureView], full_feature_names: bool
) -> dict[str, pa.Column]:
    """One column per feature reference, its type and range derived from the feature's definition."""
    by_name = {v.name: v for v in views}
    columns: dict[str, pa.Column] = {}
    for ref in refs:
        view_name, feature = parse_feature_ref(ref)
        view = by_name[view_name]
        dtype = next(f.dtype for f in view.schema if f.name == feature)
        agg = next((a for a in view.aggregations if a.feature_name == feature), None)
        checks: list[pa.Check]
        if dtype == ValueType.String:
            checks = [_dtype_check("string")]
        else:
            checks = [_dtype_check("numeric")]
            if agg is not None and agg.function == "count":
                checks.append(pa.Check.ge(0))
            elif agg is not None and agg.column == LABEL:
                checks.append(pa.Check.in_range(0, 1))
            elif agg is not None and agg.column == "amount":
                checks.append(pa.Check.ge(0))
            checks += _RANGE_BY_NAME.get(feature, [])
        name = f"{view_name}__{feature}" if full_feature_names else feature
        # Null: the entity has no value in the window (no history) or the value expired (TTL).
        columns[name] = pa.Column(checks=checks, nullable=True)
    return columns


def training_set_schema(
    feature_refs: Sequence[str] = MODEL_FEATURE_REFS,
    feature_views: Sequence[FeatureView] = FEATURE_VIEWS,
    full_feature_names: bool = False,
) -> pa.DataFrameSchema:
    """A training set: event time, a known label, and every model input with its sane range.

    Looked-up features are named by feature name (Feast's default), or `view__feature` with
    `full_feature_names=True`."""
    columns: dict[str, pa.Column] = {
        EVENT_TS: pa.Column(checks=[_dtype_check("utc_timestamp")]),
        LABEL: pa.Column(checks=[_dtype_check("numeric"), pa.Check.isin([0, 1], error="label in {0, 1}")]),
    }
    columns.update(_looked_up_feature_columns(feature_refs, feature_views, full_feature_names))
    for name in REQUEST_FEATURES:
        checks, nullable = _REQUEST_FEATURE_CHECKS.get(name, ([], True))
        columns[name] = pa.Column(checks=[_dtype_check("numeric"), *checks], nullable=nullable)
    for name in CATEGORICAL_FEATURES:
        columns[name] = pa.Column(checks=[_dtype_check("string")], nullable=False)
    return pa.DataFrameSchema(columns, name="training_set")


RAW_TRANSACTIONS_SCHEMA = raw_transactions_schema()
USERS_SCHEMA = users_schema()
TRAINING_SET_SCHEMA = training_set_schema()
SCHEMAS: dict[str, pa.DataFrameSchema] = {
    "raw_transactions": RAW_TRANSACTIONS_SCHEMA,
    "users": USERS_SCHEMA,
    "training_set": TRAINING_SET_SCHEMA,
}


# --- The report ---


@dataclass
class ValidationReport:
    """What a validation found. `ok` is False when any error-level check failed."""

    schema: str
    rows: int
    failed_rows: int = 0
    failures: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_metadata(self) -> dict:
        """JSON-serialisable summary for a Dagster asset check's metadata."""
        return {
            "schema": self.schema,
            "ok": self.ok,
            "rows": self.rows,
            "failed_rows": self.failed_rows,
            "failed_checks": len(self.failures),
            "failures": self.failures,
            "warnings": self.warnings,
        }

    def summary(self) -> str:
        """Human-readable: which columns failed which checks, on how many rows, with samples."""
        head = f"{self.schema}: {self.rows} rows, "
        head += (
            "OK" if self.ok else f"FAILED: {self.failed_rows} bad rows, {len(self.failures)} failed checks"
        )
        lines = [head]
        for kind, findings in (("error", self.failures), ("warning", self.warnings)):
            for f in findings:
                column = f["column"] if f["column"] is not None else "<table>"
                lines.append(
                    f"  {kind}: column {column!r} failed {f['check']!r} on {f['failure_count']} rows;"
                    f" e.g. {f['sample_values']}"
                )
        return "\n".join(lines)


def _jsonable(value):
    """A sample value as JSON: timestamps as ISO strings, numpy scalars as Python, NaN/NaT as None."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (pd.Timestamp, datetime, date)):
        return value.isoformat()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def _finding(column, check: str, count: int, samples, index=()) -> dict:
    return {
        "column": column,
        "check": check,
        "failure_count": int(count),
        "sample_values": [_jsonable(v) for v in list(samples)[:SAMPLE_SIZE]],
        "sample_rows": [_jsonable(i) for i in list(index)[:SAMPLE_SIZE]],
    }


def _check_label(check: pa.Check) -> str:
    return str(check.error or check.name)


def _evaluate_directly(check: pa.Check, obj: pd.Series | pd.DataFrame) -> pd.Series | None:
    """Run one check on a column or frame, outside pandera's validation: the boolean pass mask
    per row, or None when the check passed as a whole. Nulls pass when the check ignores them."""
    result = check(obj)
    output = result.check_output
    if not isinstance(output, pd.Series):
        return None if bool(np.all(output)) else pd.Series(False, index=obj.index)
    passed = output.fillna(False).astype(bool)
    if check.ignore_na and isinstance(obj, pd.Series):
        passed |= obj.isna()
    return None if passed.all() else passed


def _resolve(schema: str | pa.DataFrameSchema) -> pa.DataFrameSchema:
    if isinstance(schema, pa.DataFrameSchema):
        return schema
    try:
        return SCHEMAS[schema]
    except KeyError:
        raise ValueError(
            f"Unknown schema {schema!r}; use one of {sorted(SCHEMAS)} or a pandera DataFrameSchema"
        ) from None


def validate(
    df: pd.DataFrame, schema: str | pa.DataFrameSchema, now: datetime | str | None = None
) -> ValidationReport:
    """Validate `df` against a schema (a name in SCHEMAS or a pandera schema) and report every
    failure (lazy validation). Never raises for bad data. `now` (default: the wall clock) is the
    instant timestamps must not exceed."""
    schema_obj = _resolve(schema)
    frame = df.reset_index(drop=True)  # row numbers as the index: counts and samples refer to rows
    now_ts = None
    if now is not None:
        now_ts = pd.Timestamp(now)
        now_ts = now_ts.tz_localize("UTC") if now_ts.tzinfo is None else now_ts.tz_convert("UTC")
    report = ValidationReport(schema=schema_obj.name or "schema", rows=len(frame))
    bad_rows = np.zeros(len(frame), dtype=bool)
    token = _NOW.set(now_ts)
    try:
        # 1. Column checks through pandera, with warning-level checks and frame-wide checks taken
        #    out (pandera's failure cases for a frame-wide check hold every column of every bad row).
        column_schema = copy.copy(schema_obj)
        column_schema.checks = []
        warning_checks: list[tuple[str | None, pa.Check]] = []
        for name, column in schema_obj.columns.items():
            soft = [c for c in column.checks if c.raise_warning]
            if soft:
                warning_checks += [(name, c) for c in soft]
                column_schema = column_schema.update_column(
                    name, checks=[c for c in column.checks if not c.raise_warning]
                )
        warning_checks += [(None, c) for c in schema_obj.checks if c.raise_warning]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SchemaWarning)
            try:
                column_schema.validate(frame, lazy=True)
            except SchemaErrors as errors:
                _add_pandera_failures(report, errors.failure_cases, frame, bad_rows)

        # 2. Frame-wide checks (across columns), evaluated directly.
        for check in schema_obj.checks:
            if check.raise_warning:
                continue
            _add_direct_finding(report.failures, check, None, frame, bad_rows)

        # 3. Warning-level checks: reported, but they do not fail the gate.
        for name, check in warning_checks:
            if name is None or name in frame.columns:
                _add_direct_finding(report.warnings, check, name, frame, None)
    finally:
        _NOW.reset(token)
    report.failed_rows = int(bad_rows.sum())
    return report


def _add_direct_finding(
    findings: list[dict],
    check: pa.Check,
    column: str | None,
    frame: pd.DataFrame,
    bad_rows: np.ndarray | None,
) -> None:
    obj = frame if column is None else frame[column]
    label = _check_label(check)
    try:
        passed = _evaluate_directly(check, obj)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # cannot run on this data (naive vs UTC)
        column = column if column is not None else _ROW_RULE_COLUMNS.get(label, (None,))[0]
        findings.append(
            _finding(column, label, len(frame), [f"check could not run: {type(exc).__name__}: {exc}"[:300]])
        )
        if bad_rows is not None:
            bad_rows[:] = True
        return
    if passed is None:
        return
    failed = ~passed.to_numpy()
    if column is None and label in _ROW_RULE_COLUMNS:
        cols = _ROW_RULE_COLUMNS[label]
        column = cols[0]
        sample = frame.loc[failed, list(cols)].head(SAMPLE_SIZE)
        values = [{c: _jsonable(v) for c, v in row.items()} for row in sample.to_dict("records")]
    elif column is None:
        sample = frame.loc[failed].head(SAMPLE_SIZE)
        values = [{c: _jsonable(v) for c, v in row.items()} for row in sample.to_dict("records")]
    else:
        sample = frame.loc[failed, column].head(SAMPLE_SIZE)
        values = list(sample)
    findings.append(_finding(column, label, failed.sum(), values, sample.index))
    if bad_rows is not None:
        bad_rows |= failed


_STRUCTURAL_CHECKS = ("column_in_dataframe", "column_in_schema", "dataframe_not_equal_schema")


def _add_pandera_failures(
    report: ValidationReport, cases: pd.DataFrame, frame: pd.DataFrame, bad_rows: np.ndarray
) -> None:
    """Group pandera's failure cases by (column, check) into findings."""
    cases = cases.copy()
    cases["column"] = cases["column"].astype(object).where(cases["column"].notna(), None)
    cases["check"] = cases["check"].astype(str)
    for (column, check), group in cases.groupby(["column", "check"], dropna=False, sort=False):
        index = group["index"]
        if index.isna().all():
            # A whole-column failure (missing column, wrong dtype): every row is affected.
            if check == "column_in_dataframe":
                for missing in group["failure_case"]:
                    report.failures.append(_finding(missing, check, len(frame), ["<missing column>"]))
                bad_rows[:] = True
                continue
            if check in _STRUCTURAL_CHECKS:
                values = list(group["failure_case"])
            elif check.startswith("dtype is") and column in frame.columns:
                values = [str(frame[column].dtype)]
            else:
                values = list(group["failure_case"])
            report.failures.append(_finding(column, check, len(frame), values))
            bad_rows[:] = True
            continue
        rows = pd.to_numeric(index, errors="coerce").dropna().astype("int64").unique()
        report.failures.append(_finding(column, check, len(rows), group["failure_case"], rows))
        bad_rows[rows[(rows >= 0) & (rows < len(bad_rows))]] = True
