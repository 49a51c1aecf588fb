"""shadow_report: live/shadow pairing and the comparison, on small hand-made prediction logs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ml_platform.experiments.shadow_report import (
    PAIR_COLUMNS,
    SHADOW_SUFFIX,
    ShadowComparison,
    compare_shadow,
    pair_shadow,
    shadow_prediction_id,
)

T0 = pd.Timestamp("2024-05-01 12:00", tz="UTC")
ERROR_FLAGS = '{"error": "RuntimeError: boom"}'


def _row(pid, tx, version, p, *, role, threshold=0.5, latency=5.0, flags="{}", decision="auto", minute=0):
    if decision == "auto":
        decision = None if np.isnan(p) else ("fraud" if p >= threshold else "legit")
    return {
        "prediction_id": pid, "transaction_id": tx, "model_version": version, "probability": p,
        "decision": decision, "threshold": threshold, "latency_ms": latency, "flags": flags,
        "event_timestamp": T0 + pd.Timedelta(minutes=minute), "role": role, "experiment": "exp", "arm": None,
    }  # fmt: skip


def _log(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame["model_version"] = frame["model_version"].astype("Int64")
    return frame


def _pair(i, live_p, shadow_p, *, live_version=3, shadow_version=4, live_latency=5.0, shadow_latency=6.0,
          shadow_flags="{}", live_role="live", shadow_decision="auto"):  # fmt: skip
    """A live row and its shadow twin for transaction t{i}."""
    pid = f"p{i}"
    return [
        _row(pid, f"t{i}", live_version, live_p, role=live_role, latency=live_latency, minute=i),
        _row(shadow_prediction_id(pid), f"t{i}", shadow_version, shadow_p, role="shadow",
             latency=shadow_latency, flags=shadow_flags, decision=shadow_decision, minute=i),
    ]  # fmt: skip


def _standard_log() -> pd.DataFrame:
    """10 scored pairs (decisions flip on p0: legit -> fraud and p1: fraud -> legit), one pair whose
    shadow failed, one shadow row without a live twin, one live row without a shadow.
    Live latencies 1..11 ms (the failed pair's is 11); shadow latencies 2, 4, ..., 20, failed 1000."""
    live_ps = [0.2, 0.9, 0.1, 0.15, 0.3, 0.35, 0.6, 0.7, 0.8, 0.95]
    shadow_ps = [0.7, 0.4, 0.12, 0.1, 0.25, 0.4, 0.65, 0.75, 0.85, 0.9]
    rows = []
    for i, (lp, sp) in enumerate(zip(live_ps, shadow_ps)):
        rows += _pair(i, lp, sp, live_latency=float(i + 1), shadow_latency=float(2 * (i + 1)))
    rows += _pair(10, 0.5, float("nan"), live_latency=11.0, shadow_latency=1000.0, shadow_flags=ERROR_FLAGS)
    rows.append(_row(shadow_prediction_id("gone"), "t99", 4, 0.3, role="shadow"))  # its live row is elsewhere
    rows.append(_row("alone", "t50", 3, 0.4, role="live"))  # not shadowed
    return _log(rows)


def test_shadow_prediction_id_appends_the_suffix():
    assert SHADOW_SUFFIX == ":shadow"
    assert shadow_prediction_id("abc-123") == "abc-123:shadow"


def test_pair_shadow_matches_twins_and_reads_the_error():
    log = _standard_log()
    pairs = pair_shadow(log)
    assert list(pairs.columns) == PAIR_COLUMNS
    assert len(pairs) == 11  # not the unpaired shadow row, not the unshadowed live row
    assert set(pairs["live_prediction_id"]) == {f"p{i}" for i in range(11)}
    first = pairs.set_index("live_prediction_id").loc["p0"]
    assert first["transaction_id"] == "t0"
    assert first["event_timestamp"] == T0
    assert (first["live_version"], first["shadow_version"]) == (3, 4)
    assert (first["live_probability"], first["shadow_probability"]) == (0.2, 0.7)
    assert (first["live_decision"], first["shadow_decision"]) == ("legit", "fraud")
    assert (first["live_latency_ms"], first["shadow_latency_ms"]) == (1.0, 2.0)
    assert first["live_threshold"] == first["shadow_threshold"] == 0.5
    assert first["shadow_error"] is None
    failed = pairs.set_index("live_prediction_id").loc["p10"]
    assert np.isnan(failed["shadow_probability"])
    assert failed["shadow_error"] == "RuntimeError: boom"
    assert pairs["shadow_error"].notna().sum() == 1


def test_compare_counts_agreement_flips_errors_and_unpaired():
    c = compare_shadow(_standard_log())
    assert (c.live_version, c.shadow_version) == (3, 4)
    assert c.pairs == 11
    assert c.shadow_errors == 1
    assert c.unpaired_shadow == 1
    assert c.agreement_rate == pytest.approx(0.8)  # 8 of the 10 scored pairs; the failed one excluded
    assert (c.flips_to_fraud, c.flips_to_legit) == (1, 1)
    diffs = [0.5, 0.5, 0.02, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05]
    assert c.mean_abs_score_diff == pytest.approx(sum(diffs) / 10)
    assert c.labelled == 0 and c.live_metrics is None and c.shadow_metrics is None


def test_latency_percentiles_numpy_linear_definition():
    c = compare_shadow(_standard_log())
    # live over all 11 pairs: 1..11 ms; p99 at rank 0.99 * 10 = 9.9 -> 10 + 0.9 * (11 - 10)
    assert c.live_latency_ms == pytest.approx({"p50": 6.0, "p99": 10.9, "max": 11.0})
    # shadow over the 10 it scored (the failure's 1000 ms left out): 2..20; p50 = (10 + 12) / 2,
    # p99 at rank 0.99 * 9 = 8.91 -> 18 + 0.91 * (20 - 18)
    assert c.shadow_latency_ms == pytest.approx({"p50": 11.0, "p99": 19.82, "max": 20.0})


def test_correlations_on_constructed_scores():
    live = [0.05, 0.1, 0.2, 0.3, 0.45]
    doubled = _log([r for i, p in enumerate(live) for r in _pair(i, p, 2 * p)])
    c = compare_shadow(doubled)
    assert c.score_correlation == pytest.approx(1.0)
    assert c.score_rank_correlation == pytest.approx(1.0)
    assert c.mean_abs_score_diff == pytest.approx(np.mean(live))
    # reversed order, not linear: Spearman exactly -1, Pearson only close
    reversed_ = _log([r for i, p in enumerate(live) for r in _pair(i, p, 0.01 / p)])
    c = compare_shadow(reversed_)
    assert c.score_rank_correlation == pytest.approx(-1.0)
    assert -1.0 < c.score_correlation < -0.8
    assert c.score_correlation != pytest.approx(-1.0)


def test_correlation_none_with_fewer_than_three_pairs_or_a_constant_side():
    two = _log(_pair(0, 0.1, 0.2) + _pair(1, 0.3, 0.4))
    assert compare_shadow(two).score_correlation is None
    assert compare_shadow(two).score_rank_correlation is None
    constant = _log([r for i, p in enumerate([0.1, 0.2, 0.3, 0.4]) for r in _pair(i, p, 0.5)])
    c = compare_shadow(constant)
    assert c.score_correlation is None and c.score_rank_correlation is None
    assert c.agreement_rate == 0.0 and c.flips_to_fraud == 4  # 0.5 >= threshold: all fraud


def test_labelled_metrics_of_both_models_on_the_same_rows():
    rows = (
        _pair(0, 0.9, 0.8)  # fraud: live tp, shadow tp
        + _pair(1, 0.3, 0.7)  # fraud: live fn, shadow tp
        + _pair(2, 0.6, 0.2)  # legit: live fp, shadow tn
        + _pair(3, 0.1, 0.1)  # legit: both tn
        + _pair(4, 0.2, float("nan"), shadow_flags=ERROR_FLAGS)  # labelled but the shadow failed
        + _pair(5, 0.4, 0.4)  # never labelled
    )
    ts = pd.Timestamp("2024-05-10", tz="UTC")
    labels = pd.DataFrame(
        {
            # t1's labels out of time order: the later one (fraud) must win over the frame's last
            # t5's label is still pending (null): not a labelled row
            "transaction_id": ["t0", "t1", "t1", "t2", "t3", "t4", "t77", "t5"],
            "is_fraud": [True, True, False, False, False, True, True, None],
            "label_timestamp": [ts, ts + pd.Timedelta(days=5), ts, ts, ts, ts, ts, ts],
        }
    )
    c = compare_shadow(_log(rows), labels)
    assert c.labelled == 4
    live, shadow = c.live_metrics, c.shadow_metrics
    assert (live["rows"], live["positives"], live["flagged"]) == (4, 2, 2)
    assert live["precision"] == pytest.approx(0.5) and live["recall"] == pytest.approx(0.5)
    assert live["f1"] == pytest.approx(0.5) and live["accuracy"] == pytest.approx(0.5)
    assert live["roc_auc"] == pytest.approx(0.75)  # 3 of the 4 fraud/legit pairs ordered right
    assert live["pr_auc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)  # average precision
    assert (shadow["rows"], shadow["positives"], shadow["flagged"]) == (4, 2, 2)
    assert shadow["precision"] == shadow["recall"] == shadow["f1"] == shadow["accuracy"] == pytest.approx(1.0)
    assert shadow["roc_auc"] == pytest.approx(1.0) and shadow["pr_auc"] == pytest.approx(1.0)
    assert "on 4 labelled rows PR AUC 0.833 vs 1.000" in c.summary()


def test_shadow_version_filter_and_most_common_live_version():
    rows = (
        _pair(0, 0.1, 0.2, shadow_version=4)
        + _pair(1, 0.8, 0.3, shadow_version=4, live_version=7)  # a minority (and higher) live version
        + _pair(2, 0.9, 0.7, shadow_version=4)
        + _pair(3, 0.2, 0.9, shadow_version=5)
        + [_row(shadow_prediction_id("gone5"), "t8", 5, 0.3, role="shadow"),
           _row(shadow_prediction_id("gone?"), "t9", pd.NA, 0.3, role="shadow")]
    )  # fmt: skip
    log = _log(rows)
    only4 = compare_shadow(log, shadow_version=4)
    assert set(pair_shadow(log, shadow_version=4)["live_prediction_id"]) == {"p0", "p1", "p2"}
    assert (only4.pairs, only4.unpaired_shadow, only4.shadow_version, only4.live_version) == (3, 0, 4, 3)
    assert only4.flips_to_legit == 1 and only4.flips_to_fraud == 0
    only5 = compare_shadow(log, shadow_version=5)
    assert (only5.pairs, only5.unpaired_shadow, only5.shadow_version, only5.live_version) == (1, 1, 5, 3)
    assert only5.flips_to_fraud == 1
    every = compare_shadow(log)
    assert (every.pairs, every.unpaired_shadow, every.shadow_version) == (4, 2, 4)
    none = compare_shadow(log, shadow_version=9)
    assert (none.pairs, none.shadow_version, none.agreement_rate) == (0, 9, None)


def test_log_without_roles_has_no_pairs():
    log = _standard_log().drop(columns=["role"])
    assert len(pair_shadow(log)) == 0
    assert list(pair_shadow(log).columns) == PAIR_COLUMNS
    c = compare_shadow(log)
    assert (c.pairs, c.unpaired_shadow, c.shadow_errors, c.agreement_rate) == (0, 0, 0, None)
    assert c.live_latency_ms == {"p50": None, "p99": None, "max": None}
    assert "no scored pair" in c.summary()


def test_null_role_is_live_and_duplicate_ids_count_once():
    rows = _pair(0, 0.2, 0.8, live_role=None) + _pair(1, 0.3, 0.1)
    rows += [dict(rows[0]), dict(rows[1])]  # the same predictions read twice (files + stream)
    rows.append(_row("p1/shadow", "t1", 4, 0.9, role="shadow"))  # not the suffix: no live twin
    c = compare_shadow(_log(rows))
    assert (c.pairs, c.unpaired_shadow, c.flips_to_fraud, c.agreement_rate) == (2, 1, 1, 0.5)


def test_flips_and_agreement_come_from_the_decision_strings():
    # scored pairs whose live decision is missing: neither a flip nor an agreement
    rows = _pair(0, 0.2, 0.8) + _pair(1, 0.7, 0.9) + _pair(2, 0.6, 0.1) + _pair(3, 0.1, 0.2)
    rows += _pair(4, 0.8, 0.3, shadow_decision=None)  # live "fraud", shadow None
    rows[2]["decision"] = None  # pair 1: live None, shadow "fraud"
    rows[6]["decision"] = None  # pair 3: live None, shadow "legit"
    c = compare_shadow(_log(rows))
    assert (c.flips_to_fraud, c.flips_to_legit) == (1, 1)
    assert c.agreement_rate == 0.0


def test_to_dict_is_json_safe_and_summary_names_versions_and_agreement():
    c = compare_shadow(_standard_log())
    assert isinstance(c, ShadowComparison)
    data = c.to_dict()
    json.dumps(data, allow_nan=False)
    assert data["agreement_rate"] == pytest.approx(0.8) and data["live_latency_ms"]["max"] == 11.0
    text = c.summary()
    assert text.startswith("v4 shadowing v3 on 11 rows: agreement 80.0 % (1 to fraud, 1 to legit)")
    assert "p99 live 10.9 ms / shadow 19.8 ms" in text and "1 errors" in text
    assert "1 unpaired shadow rows" in text


def test_a_failed_shadow_row_without_an_error_flag_is_still_an_error():
    rows = _pair(0, 0.2, 0.3) + _pair(1, 0.4, float("nan"), shadow_flags="{}") + _pair(2, 0.6, float("nan"))
    rows[5]["flags"] = None  # no flags at all
    pairs = pair_shadow(_log(rows))
    assert pairs["shadow_error"].tolist() == [None, None, None]
    c = compare_shadow(_log(rows))
    assert (c.pairs, c.shadow_errors, c.agreement_rate) == (3, 2, 1.0)
