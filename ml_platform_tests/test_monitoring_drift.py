"""The drift library (ml_platform.monitoring.drift*): exact statistics against scipy, detection of each
kind of shift, no alert on a random split or on small-but-significant changes, every bad input."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from ml_platform.monitoring import ColumnDrift, DriftReport, DriftThresholds, ReferenceProfile, detect_drift
from ml_platform.monitoring import drift_stats as ds
from ml_platform.monitoring.drift_report import FRAME_COLUMNS


def _frame(n: int, seed: int, **shift) -> pd.DataFrame:
    """A mixed frame: normal, lognormal, counts, text categories, a bool, a column with nulls."""
    rng = np.random.default_rng(seed)
    cats = np.array(["card", "cash", "transfer", "wallet", "voucher"], dtype=object)
    p = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    if "move" in shift:  # move mass from the first category to the third
        p = p.copy()
        p[0] -= shift["move"]
        p[2] += shift["move"]
    # a scale shift widens the spread around the same mean (a pure x1.3 change, not a mean shift)
    amount = 100.0 + rng.normal(0.0, 15.0, n) * shift.get("scale", 1.0) + shift.get("mean", 0.0) * 15.0
    channel = cats[rng.choice(5, n, p=p)]
    if "new" in shift:
        channel[rng.random(n) < shift["new"]] = "crypto"
    score = rng.normal(0.0, 1.0, n)
    score[rng.random(n) < shift.get("nulls", 0.01)] = np.nan
    return pd.DataFrame({
        "amount": amount,
        "latency": rng.lognormal(0.0, 1.0, n),
        "items": rng.poisson(3.0, n),
        "channel": pd.Series(channel, dtype="str"),
        "is_new": rng.random(n) < 0.3,
        "score": score,
    })


# ----------------------------------------------------------------------------- exact statistics
@pytest.mark.parametrize("n1,n2", [(7, 5), (300, 200), (10_000, 10_000), (10_000, 10_001), (6_000, 45_000),
                                   (60_000, 60_000)])
@pytest.mark.parametrize("kind", ["continuous", "ties", "discrete"])
def test_ks_matches_scipy(n1, n2, kind):
    rng = np.random.default_rng(n1 + n2)
    if kind == "continuous":
        a, b = rng.normal(0, 1, n1), rng.normal(0.03, 1.1, n2)
    elif kind == "ties":
        a, b = np.round(rng.normal(0, 1, n1), 1), np.round(rng.normal(0.02, 1, n2), 1)
    else:
        a, b = rng.poisson(3.0, n1), rng.poisson(3.05, n2)
    ref = stats.ks_2samp(a, b)
    d, p = ds.ks_2samp_sorted(np.sort(a), np.sort(b))
    assert abs(d - ref.statistic) <= 1e-12
    if max(n1, n2) <= ds.KS_EXACT_MAX_N:
        assert p == ref.pvalue
    else:
        assert p == pytest.approx(ref.pvalue, rel=1e-8, abs=1e-300)


def test_ks_blocked_statistic_is_exact_on_hard_cases():
    """The block bound must never skip the maximum: concentrated current, constants, infinities."""
    rng = np.random.default_rng(3)
    a = np.sort(rng.normal(size=50_000))
    cases = [
        np.full(40_000, 0.1),                                    # all current values in one block
        np.sort(np.concatenate([rng.normal(size=30_000), [np.inf] * 10, [-np.inf] * 5])),
        np.sort(rng.normal(size=20_000)[:5_000]),                # a different size, same law
        np.sort(np.where(rng.random(50_000) < 0.2, a[100], rng.normal(size=50_000))),  # ties with a
    ]
    for b in cases:
        assert abs(ds.ks_statistic_sorted(a, b) - stats.ks_2samp(a, b).statistic) <= 1e-12
        for blocks in (16, 64, 5_000):
            assert abs(ds.ks_statistic_sorted(a, b, blocks=blocks) - stats.ks_2samp(a, b).statistic) <= 1e-12


@pytest.mark.parametrize("n", [20_000, 100_000])
def test_kstwo_sf_fast_branch_matches_scipy(n):
    for nx2 in (2.2, 5.0, 30.0, 150.0):
        d = math.sqrt(nx2 / n)
        assert ds.kstwo_sf(d, n) == pytest.approx(stats.kstwo.sf(d, n), rel=1e-8)
    for d in (0.0005, 0.9, 1.0, 0.0):  # other branches are scipy's own
        assert ds.kstwo_sf(d, n) == pytest.approx(stats.kstwo.sf(d, n), rel=1e-12, abs=1e-300)


def test_chi2_and_jensen_shannon_match_scipy():
    ref = np.array([400, 250, 200, 100, 50, 0])
    cur = np.array([350, 260, 240, 90, 40, 20])  # the last category is new
    stat, p, dof = ds.chi2_homogeneity(ref, cur)
    oracle = stats.chi2_contingency(np.vstack([ref, cur]), correction=False)
    assert stat == pytest.approx(oracle.statistic, rel=1e-12)
    assert p == pytest.approx(oracle.pvalue, rel=1e-9)
    assert dof == oracle.dof == 5
    raw = ds.jensen_shannon(ref, cur, debias=False)
    assert raw == pytest.approx(jensenshannon(ref / ref.sum(), cur / cur.sum(), base=2), rel=1e-12)
    bias = 5 * (1 / 1000 + 1 / 1000) / (8 * math.log(2))
    assert ds.jensen_shannon(ref, cur) == pytest.approx(math.sqrt(raw**2 - bias), rel=1e-12)
    assert ds.chi2_homogeneity([10], [20]) == (0.0, 1.0, 0)


def test_two_proportion_test_and_corrections():
    z, p = ds.two_proportion_test(10, 1000, 40, 1000)
    oracle = stats.chi2_contingency([[10, 990], [40, 960]], correction=False)
    assert z**2 == pytest.approx(oracle.statistic, rel=1e-12)
    assert p == pytest.approx(oracle.pvalue, rel=1e-12)
    assert ds.two_proportion_test(0, 10, 0, 10) == (0.0, 1.0)
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm by hand: sorted 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    assert ds.adjust_pvalues(p, "holm").tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH by hand: 0.005*4/1=0.02, 0.01*4/2=0.02, 0.03*4/3=0.04, 0.04*4/4=0.04
    assert ds.adjust_pvalues(p, "bh").tolist() == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert ds.adjust_pvalues(p, "bonferroni").tolist() == pytest.approx([0.04, 0.16, 0.12, 0.02])
    with pytest.raises(ValueError, match="sidak"):
        ds.adjust_pvalues(p, "sidak")


# ----------------------------------------------------------------------------- detection
def test_each_kind_of_shift_alerts_on_its_column_only():
    ref = _frame(40_000, 1)
    for column, shift in [("amount", {"mean": 0.2}), ("amount", {"scale": 1.3}), ("channel", {"move": 0.08}),
                          ("channel", {"new": 0.03}), ("score", {"nulls": 0.2})]:
        report = detect_drift(ref, _frame(40_000, 2, **shift))
        frame = report.to_frame().set_index("feature")
        assert frame.loc[column, "status"] == "alert", (column, shift, frame.loc[column].to_dict())
        others = frame.drop(index=column)
        assert (others["status"] == "ok").all(), (shift, others[["status", "effect_size", "p_value"]])
        assert report.status == "alert" and report.drift_share == pytest.approx(1 / 6)
    new = detect_drift(ref, _frame(40_000, 2, new=0.03))["channel"]
    assert new.unseen_categories == 1 and new.unseen_share == pytest.approx(0.03, abs=0.005)
    assert "crypto" in new.note and new.plot["unseen"][new.plot["labels"].index("crypto")] is True
    nulls = detect_drift(ref, _frame(40_000, 2, nulls=0.2))["score"]
    assert nulls.null_share_current == pytest.approx(0.2, abs=0.01) and "null share" in nulls.note
    assert nulls.null_p_value_adjusted < 1e-10


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_random_split_of_one_sample_never_alerts(seed):
    whole = _frame(200_000, seed)
    half = np.random.default_rng(seed).permutation(len(whole)) < len(whole) // 2
    report = detect_drift(whole[half], whole[~half])
    assert report.counts()["alert"] == 0, report.to_frame()
    assert report.status in ("ok", "warn")


def test_small_but_significant_change_warns_not_alerts():
    ref = _frame(200_000, 5)
    report = detect_drift(ref, _frame(200_000, 6, mean=0.03))
    amount = report["amount"]
    assert amount.p_value_adjusted < 1e-6  # significant at this size ...
    assert amount.effect_size < DriftThresholds().numeric_effect_floor  # ... but small
    assert amount.status == "warn" and "small change" in amount.note
    assert report.counts()["alert"] == 0


# ----------------------------------------------------------------------------- bad input
def test_empty_current_window_is_no_data():
    ref = _frame(1000, 1)
    report = detect_drift(ref, ref.iloc[:0])
    assert report.status == "no_data"
    assert {c.status for c in report.columns} == {"no_data"} and len(report.columns) == ref.shape[1]
    assert "empty" in report.summary()
    json.dumps(report.to_dict(), allow_nan=False)
    assert detect_drift(ref, pd.DataFrame()).status == "no_data"
    assert detect_drift(ref.iloc[:0], ref).status == "no_data"


def test_missing_column_is_alert():
    ref = _frame(2000, 1)
    col = detect_drift(ref, _frame(2000, 2).drop(columns="latency"))["latency"]
    assert (col.status, col.test) == ("alert", "missing") and "missing" in col.note


def test_all_null_and_constant_columns():
    n = 1000
    ref = pd.DataFrame({"x": np.arange(n, dtype=float), "c": 5.0, "d": 5.0, "t": ["a"] * n, "u": ["a"] * n})
    cur = pd.DataFrame({"x": np.full(n, np.nan), "c": 5.0, "d": 7.0, "t": ["a"] * n, "u": ["b"] * n})
    report = detect_drift(ref, cur)
    x = report["x"]
    assert x.status == "alert" and x.test == "null_share" and "every current value is null" in x.note
    assert (report["c"].status, report["c"].effect_size) == ("ok", 0.0) and "constant in both" in report["c"].note
    assert (report["d"].status, report["d"].effect_size) == ("alert", 1.0) and "constant: 5.0 -> 7.0" in report["d"].note
    assert report["t"].status == "ok"
    assert report["u"].status == "alert" and report["u"].unseen_categories == 1
    # all null on both sides: nothing to compare, not ok
    both = detect_drift(pd.DataFrame({"x": [np.nan] * 50}), pd.DataFrame({"x": [np.nan] * 50}))["x"]
    assert both.status == "no_data" and "too few values" in both.note


def test_numbers_arriving_as_strings():
    rng = np.random.default_rng(0)
    ref = pd.DataFrame({"v": rng.normal(10, 2, 5000)})
    text = pd.DataFrame({"v": pd.Series([f"{x:.6f}" for x in rng.normal(10, 2, 5000)], dtype="str")})
    col = detect_drift(ref, text)["v"]
    assert col.kind == "numeric" and col.test == "ks" and col.status == "ok"
    assert "read as numbers" in col.note and col.invalid_values == 0
    junk = text.copy()
    junk.loc[:2, "v"] = ["n/a", "12,5", "abc"]
    col = detect_drift(ref, junk)["v"]
    assert col.status == "alert" and col.invalid_values == 3 and "not numbers" in col.note and "n/a" in col.note
    # a reference of numbers stored as text is numeric too
    both = detect_drift(text, text.iloc[::-1].reset_index(drop=True))["v"]
    assert both.kind == "numeric" and "numbers stored as text" in both.note and both.status == "ok"


def test_mixed_types_booleans_datetimes_identifiers():
    n = 3000
    rng = np.random.default_rng(1)
    mixed = pd.Series(rng.choice(np.array([1, "a", 2.5, "b"], dtype=object), n), dtype=object)
    ref = pd.DataFrame({
        "mixed": mixed,
        "flag": rng.random(n) < 0.3,
        "when": pd.date_range("2024-01-01", periods=n, freq="min"),
        "txn_id": [f"t{i}" for i in range(n)],
    })
    cur = ref.copy()
    cur["flag"] = rng.random(n) < 0.6
    cur["when"] = cur["when"] + pd.Timedelta(days=30)
    cur["txn_id"] = [f"t{i + n}" for i in range(n)]
    report = detect_drift(ref, cur, thresholds=DriftThresholds(identifier_min_distinct=100))
    assert report["mixed"].kind == "categorical" and report["mixed"].status == "ok"
    assert "mixed types" in report["mixed"].note
    assert report["flag"].kind == "categorical" and report["flag"].test == "chi2" and report["flag"].status == "alert"
    assert report["when"].status == "no_data" and report["when"].test == "skipped" and "datetime" in report["when"].note
    assert report["txn_id"].status == "no_data" and "identifier-like" in report["txn_id"].note
    assert report.status == "alert"  # the flag column; skipped ones do not count
    assert report.drift_share == pytest.approx(1 / 2)
    # named explicitly, both are compared
    forced = detect_drift(ref, cur, numeric=["when"], categorical=["txn_id"],
                          thresholds=DriftThresholds(identifier_min_distinct=100))
    assert forced["when"].test == "ks" and forced["when"].status == "alert"
    assert forced["txn_id"].unseen_categories == n


def test_kind_overrides_and_argument_errors():
    ref = _frame(3000, 1)
    report = detect_drift(ref, _frame(3000, 2), categorical=["items"], columns=["items", "amount"])
    assert [c.feature for c in report.columns] == ["items", "amount"]
    assert report["items"].test == "chi2"
    with pytest.raises(ValueError, match="nope"):
        detect_drift(ref, ref, columns=["nope"])
    with pytest.raises(ValueError, match="both categorical= and numeric="):
        detect_drift(ref, ref, categorical=["items"], numeric=["items"])
    with pytest.raises(TypeError, match="DataFrame"):
        detect_drift(ref, ref.to_dict())
    with pytest.raises(TypeError, match="list of column names"):
        detect_drift(ref, ref, columns="amount")


def test_too_few_rows_is_no_data():
    col = detect_drift(pd.DataFrame({"x": np.arange(10.0)}), pd.DataFrame({"x": np.arange(10.0)}))["x"]
    assert col.status == "no_data" and "min_rows=30" in col.note


@pytest.mark.parametrize("field,value,error,match", [
    ("alpha", 0.0, ValueError, r"DriftThresholds.alpha = 0.0 must be in \(0, 1\)"),
    ("alpha", 1.5, ValueError, "alpha = 1.5"),
    ("correction", "sidak", ValueError, "correction = 'sidak' must be one of"),
    ("numeric_effect_floor", -0.1, ValueError, r"numeric_effect_floor = -0.1 must be in \[0, 1\]"),
    ("numeric_bins", 1, ValueError, "numeric_bins = 1"),
    ("alpha", float("nan"), ValueError, "alpha = nan must be a finite number"),
    ("min_rows", True, TypeError, "min_rows = True must be of type int"),
    ("top_categories", 2.5, TypeError, "top_categories = 2.5"),
    ("correction", None, TypeError, "correction = None"),
])
def test_thresholds_are_validated(field, value, error, match):
    with pytest.raises(error, match=match):
        DriftThresholds(**{field: value})


def test_thresholds_are_frozen_and_used():
    t = DriftThresholds()
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.alpha = 0.5  # type: ignore[misc]
    ref = _frame(20_000, 1)
    cur = _frame(20_000, 2, mean=0.2)
    assert detect_drift(ref, cur)["amount"].status == "alert"
    lenient = DriftThresholds(numeric_effect_floor=0.5)
    assert detect_drift(ref, cur, thresholds=lenient)["amount"].status == "warn"
    strict_dataset = DriftThresholds(dataset_alert_share=0.5)
    assert detect_drift(ref, cur, thresholds=strict_dataset).status == "warn"  # 1 of 6 columns < 50 %


# ----------------------------------------------------------------------------- the report
def test_report_frame_dict_json_summary():
    report = detect_drift(_frame(5000, 1), _frame(5000, 2, new=0.05).drop(columns="latency"))
    assert isinstance(report, DriftReport) and all(isinstance(c, ColumnDrift) for c in report.columns)
    frame = report.to_frame()
    assert list(frame.columns) == FRAME_COLUMNS and len(frame) == 6
    assert frame["feature"].tolist() == ["amount", "latency", "items", "channel", "is_new", "score"]
    text = json.dumps(report.to_dict(), allow_nan=False)
    back = json.loads(text)
    assert back["status"] == "alert" and len(back["columns"]) == 6
    assert back["columns"][1]["test"] == "missing" and back["columns"][1]["p_value"] is None
    assert json.loads(report.to_json()) == back
    amount = back["columns"][0]
    assert len(amount["plot"]["labels"]) == len(amount["plot"]["reference"]) == len(amount["plot"]["current"])
    assert 20 <= len(amount["plot"]["labels"]) <= 23
    assert sum(amount["plot"]["reference"]) == pytest.approx(1.0)
    assert set(amount["reference_stats"]) == {"mean", "std", "min", "median", "max"}
    # every test of the report is corrected together (Holm): distribution tests and null-share tests
    tested = [c for c in report.columns if c.test in ("ks", "chi2")]
    nulls = [c for c in report.columns if c.null_p_value is not None]
    holm = ds.adjust_pvalues([c.p_value for c in tested] + [c.null_p_value for c in nulls], "holm")
    assert [c.p_value_adjusted for c in tested] == pytest.approx(list(holm[: len(tested)]))
    assert [c.null_p_value_adjusted for c in nulls] == pytest.approx(list(holm[len(tested):]))
    assert len(nulls) == 1  # only `score` has nulls
    summary = report.summary()
    assert "\n" not in summary and summary.startswith("drift alert: 2/6 columns alert")


def test_profile_round_trip_gives_the_same_report(tmp_path):
    ref, cur = _frame(20_000, 1), _frame(20_000, 2, move=0.08, nulls=0.1)
    direct = detect_drift(ref, cur).to_dict()
    profile = ReferenceProfile.from_frame(ref)
    path = profile.save(tmp_path / "profiles" / "reference.npz")
    loaded = ReferenceProfile.load(path)
    assert detect_drift(profile, cur).to_dict() == direct
    assert detect_drift(loaded, cur).to_dict() == direct
    assert [p.name for p in tmp_path.joinpath("profiles").iterdir()] == ["reference.npz"]  # no temp file left
    with pytest.raises(ValueError, match="fixed when the ReferenceProfile is built"):
        detect_drift(profile, cur, categorical=["items"])


def test_html_page_and_sections():
    report = detect_drift(_frame(5000, 1), _frame(5000, 2, mean=0.3, new=0.05))
    sections = report.html_sections()
    assert [h for h, _ in sections] == ["Data drift: summary", "Data drift per column",
                                        "Drifted columns: reference vs current"]
    charts = sections[2][1]
    first, second = sorted([report["amount"], report["channel"]], key=lambda c: -c.effect_size)
    assert charts.count("<svg") == 2 and charts.index(first.feature) < charts.index(second.feature)  # larger first
    page = report.to_html()
    assert page.startswith("<!doctype html>") and "crypto" in page and "Data drift per column" in page
    calm = detect_drift(_frame(5000, 1), _frame(5000, 2))
    assert len(calm.html_sections()) == 2 and "<svg" not in calm.to_html()


def test_drifted_columns_alert_first_then_by_effect():
    def col(feature, status, effect):
        plot = {"labels": ["a", "b"], "reference": [0.5, 0.5], "current": [0.4, 0.6], "unseen": [False, False]}
        return ColumnDrift(feature=feature, kind="categorical", test="chi2", status=status, effect_size=effect,
                           effect_metric="jensen_shannon", plot=plot)

    cols = [col("w_big", "warn", 0.04), col("ok_col", "ok", 0.0), col("a_small", "alert", 0.06),
            col("a_big", "alert", 0.3)]
    report = DriftReport(cols, "alert", 0.5, 100, 100, dataclasses.asdict(DriftThresholds()))
    assert [c.feature for c in report.drifted] == ["a_big", "a_small", "w_big"]
    charts = report.html_sections(max_plots=2)[2][1]
    assert charts.count("<svg") == 2 and "w_big" not in charts and "1 more drifted" in charts
    assert charts.index("a_big") < charts.index("a_small")


def test_a_profile_built_with_other_bins_is_refused_not_silently_used():
    from ml_platform.monitoring import ReferenceProfile

    profile = ReferenceProfile.from_frame(_frame(2000, 0))
    with pytest.raises(ValueError, match=r"numeric_bins = 5, but the ReferenceProfile was built with 20"):
        detect_drift(profile, _frame(2000, 1), thresholds=DriftThresholds(numeric_bins=5))


def _clustered_days(days: int, rows: int, seed: int, day_sd: float) -> tuple[pd.DataFrame, np.ndarray]:
    """`days` days of `rows` rows whose `rate` column has a day-level offset (sd `day_sd`, as a
    merchant's fraud rate moves with its week) plus row noise; `steady` has no day effect."""
    rng = np.random.default_rng(seed)
    offsets = rng.normal(0.0, day_sd, days)
    day = np.repeat(np.arange(days), rows)
    frame = pd.DataFrame({"rate": offsets[day] + rng.normal(0.0, 1.0, days * rows),
                          "steady": rng.normal(0.0, 1.0, days * rows)})
    return frame, day


def test_period_effects_measure_the_day_to_day_variation_and_floors_use_it():
    from ml_platform.monitoring.drift import period_effects

    reference, day = _clustered_days(30, 800, seed=1, day_sd=0.25)
    effects = period_effects(reference, day)
    # One day against all: the clustered column differs far more than sampling noise allows
    # (KS noise at 800 rows is ~0.03); the steady column only by noise.
    assert effects["rate"] > 0.12 and effects["steady"] < 0.07
    assert period_effects(reference, day, min_rows=801) == {}  # no day large enough
    # A new day of the same world: the day-level offset alarms without the floors, not with them.
    new_day, _ = _clustered_days(1, 3000, seed=7, day_sd=0.25)
    new_day["rate"] += 0.3  # an ordinary day, 1.2 sd of the day effect away
    plain = detect_drift(reference, new_day)
    assert plain.to_frame().set_index("feature").loc["rate", "status"] == "alert"
    floors = {c: 2.0 * e for c, e in effects.items()}
    floored = detect_drift(reference, new_day, effect_floors=floors).to_frame().set_index("feature")
    assert floored.loc["rate", "status"] == "warn"  # significant, but within the column's own days
    assert f"{floors['rate']:.3g}" in floored.loc["rate", "note"]
    # A real shift still alerts through the floor.
    shifted = new_day.assign(rate=new_day["rate"] + 1.5)
    assert detect_drift(reference, shifted, effect_floors=floors).to_frame().set_index(
        "feature").loc["rate", "status"] == "alert"
