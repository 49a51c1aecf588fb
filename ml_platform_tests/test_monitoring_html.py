"""The monitoring report's HTML building blocks: a sample page rendered by headless Chromium (what a
person sees: the alert red, the ok green, the charts' colours, the page fits), no external
references, escaping of user-supplied names, and valid SVG for the edge cases."""

from __future__ import annotations

import math
import re
import struct
import xml.etree.ElementTree as ET
import zlib
from html.parser import HTMLParser

import browser
import numpy as np
import pytest
from browser import colour_share, decode_png, hex_rgb, render_png, used_height

from ml_platform.monitoring.html import (
    STATUS_COLOURS,
    format_value,
    grid_html,
    histogram_svg,
    line_chart_svg,
    page_html,
    status_badge,
    table_html,
    tiles_html,
    write_report,
)
from ml_platform.monitoring.status import STATUSES

DAYS = [f"2024-05-{d:02d}" for d in range(1, 22)]
# PR AUC per day: a gap on days 8-9 (None, NaN), below the 0.78 threshold on the last 5 days
PR_AUC = [0.83, 0.831, 0.829, 0.832, 0.83, 0.828, 0.827, None, float("nan"), 0.826, 0.825, 0.824,
          0.823, 0.822, 0.81, 0.80, 0.77, 0.76, 0.75, 0.74, 0.73]
BAD_DAYS = 5  # hand count: 0.77, 0.76, 0.75, 0.74, 0.73 are < 0.78
CHECK_ROWS = [
    {"check": "amount drift (PSI)", "value": 0.031, "threshold": 0.2, "status": "ok"},
    {"check": "merchant_category drift", "value": 0.143, "threshold": 0.2, "status": "warn"},
    {"check": "country drift (PSI)", "value": 0.412345, "threshold": 0.2, "status": "alert"},
    {"check": "PR AUC vs champion", "value": 0.7431, "threshold": 0.78, "status": "alert"},
    {"check": "label coverage", "value": None, "threshold": 0.5, "status": "pending"},
    {"check": "rows scored", "value": 123456, "threshold": None, "status": "ok"},
]


def _sample_page(*, alarming: bool = True) -> str:
    """The lead's kind of page; `alarming=False` is the same page with every status ok (a control)."""
    rows = CHECK_ROWS if alarming else [{**r, "status": "ok"} for r in CHECK_ROWS]
    amount = histogram_svg(["0-10", "10-50", "50-100", "100-500", "500+"], [0.3, 0.35, 0.2, 0.12, 0.03],
                           [0.28, 0.33, 0.22, 0.13, 0.04], title="amount (EUR)", status="ok")
    country = histogram_svg(["FR", "DE", "ES", "IT", "GB", "NG"], [0.4, 0.25, 0.15, 0.1, 0.1, 0.0],
                            [0.2, 0.15, 0.1, 0.1, 0.15, 0.3], title="country",
                            status="alert" if alarming else "ok", unseen=[False] * 5 + [True])
    pr_auc = line_chart_svg(DAYS, {"pr_auc": PR_AUC if alarming else [0.83] * len(DAYS)},
                            title="PR AUC", threshold=0.78, threshold_label="alert below 0.78",
                            bad_side="below", reference=0.83, y_format="{:.3f}")
    return page_html(
        "Monitoring 2024-05-21",
        [("Summary", tiles_html([("rows scored", 123456, None), ("alerts", 2 if alarming else 0, None)])),
         ("Checks", table_html(rows)),
         ("Feature drift", grid_html([amount, country])),
         ("Model quality", grid_html([pr_auc]))],
        subtitle="fraud_detector v7 (champion)", status="alert" if alarming else "ok",
    )


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The sample page and its all-ok control, written and rendered once for the module."""
    out = tmp_path_factory.mktemp("report")
    images = {}
    for name, alarming in (("sample", True), ("control", False)):
        path = write_report(out / "reports" / f"{name}.html", _sample_page(alarming=alarming))
        images[name] = decode_png(render_png(path, out / f"{name}.png", height=1600))
    return images


def test_the_rendered_page_shows_the_alert_red_and_the_ok_green(rendered):
    img, control = rendered["sample"], rendered["control"]
    assert img.shape == (1600, 1280, 3)
    background = hex_rgb("#f2f4f7")
    assert colour_share(img, background, 2) < 0.5  # not blank: cards, tables, charts cover the page
    assert len(np.unique(img.reshape(-1, 3)[::7], axis=0)) > 200  # text antialiasing, charts: not flat
    red, green = STATUS_COLOURS["alert"], STATUS_COLOURS["ok"]
    # the red: two ALERT badges, the header pill and stripe, the country bars, 5 bad points;
    # the all-ok control has none of it (so the red comes from the alarms, not from decoration)
    assert colour_share(img, red) > 0.004
    assert colour_share(control, red) < 0.001  # the threshold line and the shaded region's edge only
    assert colour_share(img, green) > 0.0006  # two OK badges, the ok chart's dot
    # the control: six OK badges, the OK header pill and stripe, two green dots
    assert colour_share(control, green) > 5 * colour_share(img, green)
    assert colour_share(img, STATUS_COLOURS["warn"]) > 0.0002  # the WARN badge
    assert colour_share(img, "#3a6fd8") > 0.003  # the ok histogram's current bars and the line
    assert colour_share(img, "#b4bfcd") > 0.006  # reference bars
    # the page is laid out within the viewport and uses it: content ends well below the top and
    # above the bottom (nothing truncated)
    assert 900 < used_height(img, background) < 1560


def test_the_page_has_no_external_references():
    page = _sample_page()
    assert not re.search(r"https?://|src\s*=|@import|<link|<script", page, flags=re.IGNORECASE)
    assert all(target.startswith("#") for target in re.findall(r"url\(([^)]*)\)", page))
    assert "href=" not in page


def test_status_badges_and_colours_cover_every_status():
    assert set(STATUS_COLOURS) == set(STATUSES)
    assert status_badge("alert") == '<span class="badge badge-alert">ALERT</span>'
    assert status_badge(None) == '<span class="badge badge-no_data">NO DATA</span>'
    with pytest.raises(ValueError, match=r"status must be one of .*got 'bad'"):
        status_badge("bad")


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_user_supplied_names_are_escaped_everywhere():
    evil = '<script>alert("x")</script>&'
    svg = histogram_svg([evil, "b"], [0.5, 0.5], [0.4, 0.6], title=evil, unseen=[True, False])
    line = line_chart_svg(["2024-01-01", evil], {evil: [1.0, 2.0]}, title=evil, threshold_label=evil,
                          threshold=1.5, bad_side="above")
    table = table_html([{evil: evil, "status": "ok"}])
    page = page_html(evil, [(evil, table + svg + line)], subtitle=evil, status="warn")
    for fragment in (svg, line):
        ET.fromstring(fragment)  # well-formed XML
    parser = _Tags()
    parser.feed(page)
    assert "script" not in parser.tags
    assert "<script" not in page
    # the text reads back as the original name: escaped, not dropped
    assert any(evil in t for t in parser.text)
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in table


def _svg(text: str) -> ET.Element:
    root = ET.fromstring(text)
    assert root.tag == "svg"
    return root


def _by_class(root: ET.Element, cls: str) -> list[ET.Element]:
    return [e for e in root.iter() if cls in (e.get("class") or "").split()]


def test_histogram_bars_are_proportional_and_new_categories_are_marked():
    root = _svg(histogram_svg(["a", "b", "c"], [0.4, 0.2, 0.0], [0.2, 0.4, 0.4], title="t",
                              unseen=[False, False, True]))
    ref = [float(r.get("height")) for r in _by_class(root, "ref")]
    cur = [float(r.get("height")) for r in _by_class(root, "cur")]
    assert len(ref) == 3 and len(cur) == 3
    assert ref[0] == pytest.approx(2 * ref[1], abs=0.2) and ref[2] == 0.0
    assert cur[1] == pytest.approx(2 * cur[0], abs=0.2) and cur[2] == pytest.approx(cur[1], abs=0.1)
    # against the axis: a 40% bar tops at the 40% gridline, a 20% bar at the 20% one
    label_y = {t.text: float(t.get("y")) - 4 for t in root.iter("text") if (t.text or "").endswith("%")}
    tops = [float(r.get("y")) for r in _by_class(root, "ref")]
    assert tops[0] == pytest.approx(label_y["40%"], abs=0.15)
    assert tops[1] == pytest.approx(label_y["20%"], abs=0.15)
    new = _by_class(root, "new")
    assert len(new) == 1 and new[0].get("fill").startswith("url(#")
    assert "new" in [t.text for t in root.iter("text")]


@pytest.mark.parametrize("labels, reference, current", [
    ([], [], []),                                   # no bins
    (["only"], [1.0], [1.0]),                       # one bin
    (["a", "b"], [0.0, 0.0], [0.0, 0.0]),           # all zero
    (["a", "b", "c"], [0.5, None, float("nan")], [None, 0.5, 0.5]),  # missing shares
    ([f"c{i}" for i in range(60)], [1 / 60] * 60, [1 / 60] * 60),    # many categories
])
def test_histogram_edge_cases_are_valid_svg(labels, reference, current):
    root = _svg(histogram_svg(labels, reference, current, title="edge", status="pending"))
    drawn = [r for r in _by_class(root, "ref") + _by_class(root, "cur") if float(r.get("height")) > 0]
    expected = sum(v is not None and not math.isnan(v) and v > 0 for v in reference + current)
    assert len(drawn) == expected
    texts = " ".join("".join(t.itertext()) for t in root.iter("text"))
    assert ("no bins to show" in texts) == (not labels)
    assert ("all shares are zero" in texts) == (bool(labels) and expected == 0)


def test_long_labels_are_truncated_with_the_full_text_as_tooltip():
    long = "merchant_category_" + "x" * 80
    root = _svg(histogram_svg([long, "b"], [0.5, 0.5], [0.5, 0.5], title=long))
    texts = [t for t in root.iter("text") if t.find("title") is not None]
    assert len(texts) == 2  # the title and the x label
    for text in texts:
        tip = text.find("title")
        assert tip.text == long  # the tooltip has it all; the visible text is cut with an ellipsis
        assert tip.tail.endswith("\u2026") and len(tip.tail) < len(long) and long.startswith(tip.tail[:-1])


def test_line_chart_gaps_threshold_region_and_bad_points():
    root = _svg(line_chart_svg(DAYS, {"pr_auc": PR_AUC}, title="PR AUC", threshold=0.78,
                               bad_side="below", reference=0.83, y_format="{:.3f}"))
    assert len(_by_class(root, "line")) == 2  # broken by the None/NaN gap
    points = _by_class(root, "pt")
    assert len(points) == len(DAYS) - 2
    assert len(_by_class(root, "bad")) == BAD_DAYS
    assert all(p.get("fill") == STATUS_COLOURS["alert"] for p in _by_class(root, "bad"))
    (threshold,) = _by_class(root, "threshold")
    (region,) = _by_class(root, "bad-region")
    (reference,) = _by_class(root, "reference")
    # "below" shades from the threshold down to the axis; the reference line sits above the threshold
    assert float(region.get("y")) == pytest.approx(float(threshold.get("y1")), abs=0.11)
    assert float(reference.get("y1")) < float(threshold.get("y1"))
    # a bad point is drawn below the threshold line (larger y), a good one above
    ys = [float(p.get("cy")) for p in _by_class(root, "bad")]
    assert min(ys) > float(threshold.get("y1"))


@pytest.mark.parametrize("x, series", [
    ([], {}),                                        # nothing
    (DAYS[:3], {"m": [None, float("nan"), None]}),   # no values yet
    (DAYS[:1], {"m": [0.5]}),                        # one day
    (DAYS[:3], {"m": [0.5, 0.5, 0.5]}),              # flat
    (DAYS[:4], {"a": [1.0, None, 3.0, None], "b": [None, 2.0, None, 4.0]}),  # isolated points
])
def test_line_chart_edge_cases_are_valid_svg(x, series):
    root = _svg(line_chart_svg(x, series, title="edge", threshold=0.4, bad_side="above"))
    values = [v for vs in series.values() for v in vs if v is not None and not math.isnan(v)]
    assert len(_by_class(root, "pt")) == len(values)
    assert len(_by_class(root, "bad")) == sum(v > 0.4 for v in values)


def test_y_ticks_are_distinct_under_a_coarse_format():
    # counts per day (0) against a 0.5 threshold, shown as whole numbers: no "0, 0, 0, 1" axis
    root = _svg(line_chart_svg(DAYS[:3], {"columns alerting": [0, 0, 0]}, title="t", threshold=0.5,
                               bad_side="above", y_format="{:.0f}"))
    labels = [t.text for t in root.iter("text") if t.get("text-anchor") == "end"]
    assert labels == ["0", "1"]


def test_bad_input_names_the_field_and_the_value():
    with pytest.raises(ValueError, match=r"current needs one value per label \(2\), got 1"):
        histogram_svg(["a", "b"], [0.5, 0.5], [1.0], title="t")
    with pytest.raises(ValueError, match=r"reference\[1\] is a share and cannot be negative, got -0.1"):
        histogram_svg(["a", "b"], [0.5, -0.1], [0.5, 0.5], title="t")
    with pytest.raises(TypeError, match=r"current\[0\] must be a number or None, got 'x'"):
        histogram_svg(["a"], [1.0], ["x"], title="t")
    with pytest.raises(ValueError, match=r"bad_side must be 'above', 'below' or None, got 'over'"):
        line_chart_svg(DAYS[:2], {"m": [1, 2]}, title="t", threshold=1, bad_side="over")
    with pytest.raises(ValueError, match=r"bad_side='above' needs a threshold"):
        line_chart_svg(DAYS[:2], {"m": [1, 2]}, title="t", bad_side="above")
    with pytest.raises(ValueError, match=r"series\['m'\] needs one value per label \(2\), got 3"):
        line_chart_svg(DAYS[:2], {"m": [1, 2, 3]}, title="t")
    with pytest.raises(ValueError, match=r"rows\[1\]\['status'\] must be one of .*got 'red'"):
        table_html([{"status": "ok"}, {"status": "red"}])


def test_table_formats_numbers_compactly_and_badges_statuses():
    table = table_html(CHECK_ROWS, columns=["check", "value", "status"])
    assert table.count("badge-alert") == 2 and table.count("badge-ok") == 2
    assert table.count('<tr class="row-alert">') == 2
    assert ">0.4123<" in table and ">123,456<" in table and ">\u2013<" in table
    assert "threshold" not in table  # only the columns asked for
    assert [format_value(v) for v in (0.0, 1e-5, 12345.678, 3, float("nan"), None, True, "a")] == \
        ["0", "1.00e-05", "12,346", "3", "\u2013", "\u2013", "True", "a"]
    assert table_html([]) == '<p class="empty">No rows.</p>'


def test_write_report_is_atomic_and_creates_folders(tmp_path):
    target = tmp_path / "data" / "reports" / "2024-05-21.html"
    assert write_report(target, "<p>one</p>") == target
    write_report(target, "<p>two \u2013 \u00e9</p>")
    assert target.read_text(encoding="utf-8") == "<p>two \u2013 \u00e9</p>"
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp file left behind


def _png(pixels: np.ndarray, filters: list[int]) -> bytes:
    """An independent PNG encoder: each row filtered with the given type (0-4), as in the spec."""
    height, width, bpp = pixels.shape
    data = bytearray()
    prev = [0] * (width * bpp)
    for y in range(height):
        row, kind = [int(v) for v in pixels[y].ravel()], filters[y % len(filters)]
        out = []
        for i, x in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            p = a + b - c
            paeth = min((abs(p - a), 0, a), (abs(p - b), 1, b), (abs(p - c), 2, c))[2]
            predictor = [0, a, b, (a + b) // 2, paeth][kind]
            out.append((x - predictor) % 256)
        data += bytes([kind, *out])
        prev = row
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2 if bpp == 3 else 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(data))) + \
        chunk(b"IEND", b"")


@pytest.mark.parametrize("bpp", [3, 4])
def test_the_png_decoder_reads_every_filter_type(tmp_path, bpp):
    pixels = np.random.default_rng(7).integers(0, 256, size=(10, 9, bpp), dtype=np.uint8)
    pixels[:3, :, :3] = (217, 48, 37)  # three red rows: 27 of the 90 pixels
    path = tmp_path / "t.png"
    path.write_bytes(_png(pixels, [0, 1, 2, 3, 4]))
    assert np.array_equal(decode_png(path), pixels[:, :, :3])
    assert colour_share(path, "#d93025", 0) == pytest.approx(27 / 90)


def test_a_missing_chromium_fails_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(browser, "CHROMIUM", str(tmp_path / "no-chromium"))
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install -y chromium"):
        render_png(tmp_path / "a.html", tmp_path / "a.png")
