"""Report pictures and HTML: structure read back with html.parser / Pillow, not string matching."""

from __future__ import annotations

import base64
import math
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medsclean.errors import DataError
from medsclean.pages.report import colormap_lut, overlay_png, render_overlay, write_html_report

WEIRD_PATH = 'lot 7/<b>crack</b> & "ünïcødé" 图像.png'


class PageParser(HTMLParser):
    """Collects start tags (with the open table/section context) and all text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict, tuple[str, ...]]] = []
        self.stack: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        context = tuple(self.stack)
        self.tags.append((tag, attrs, context))
        if tag in ("section", "table", "svg", "tbody", "figure"):
            self.stack.append(f"{tag}.{attrs.get('id') or attrs.get('class') or ''}")

    def handle_endtag(self, tag):
        if self.stack and self.stack[-1].split(".")[0] == tag:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag: str, *inside: str) -> list[dict]:
        """Attributes of every ``tag`` element nested in all the ``inside`` contexts."""
        return [a for t, a, ctx in self.tags if t == tag and all(c in ctx for c in inside)]


def parse(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])


# ----------------------------------------------------------------------------------- colormap

@pytest.mark.parametrize("name", ["inferno", "viridis"])
def test_colormap_is_256_entries_with_monotone_lightness(name):
    lut = colormap_lut(name)
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    assert np.all(np.diff(luminance(lut)) >= -0.5)  # lightness never drops (up to rounding)
    assert luminance(lut[-1]) - luminance(lut[0]) > 150


def test_colormap_rejects_unknown_name():
    with pytest.raises(ValueError, match="inferno"):
        colormap_lut("jet")


# ------------------------------------------------------------------------------------ overlays

def test_overlay_png_is_three_panels_wide_with_a_caption_strip(tmp_path):
    image = np.full((40, 60, 3), 128, dtype=np.uint8)
    heat = np.zeros((10, 10), dtype=np.float32)
    heat[6:, 6:] = 1.0                            # hot bottom-right corner
    mask = np.zeros((40, 60), dtype=bool)
    mask[24:, 36:] = True
    path = overlay_png(image, heat, mask, tmp_path / "sub" / "o.png", caption=WEIRD_PATH + " score 0.5",
                       panel_height=64)
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.size == (3 * 96, 64 + 20)  # panel width = 60 * 64 / 40
        pixels = np.asarray(picture.convert("RGB"))
    heat_panel, truth_panel = pixels[:64, 96:192], pixels[:64, 192:]
    assert luminance(heat_panel[56, 88]) > luminance(heat_panel[30, 20]) + 40
    assert truth_panel[56, 88, 1] > truth_panel[56, 88, 0] + 60      # defect highlighted green
    assert abs(int(truth_panel[30, 20, 1]) - int(truth_panel[30, 20, 0])) < 5  # background dimmed grey
    assert [p.name for p in path.parent.iterdir()] == ["o.png"]     # no temporary file left


def test_overlay_without_mask_has_a_plain_third_panel():
    picture = render_overlay(np.zeros((32, 32, 3), dtype=np.uint8), np.random.default_rng(0).random((8, 8)),
                             None, panel_height=32, heat_range=(0.0, 1.0))
    pixels = np.asarray(picture)
    assert picture.size == (96, 52)
    assert np.all(pixels[20:32, 64:] == 64)


def test_overlay_rejects_non_rgb8_image():
    with pytest.raises(ValueError, match="uint8"):
        render_overlay(np.zeros((8, 8), dtype=np.float32), np.zeros((8, 8)), None)


# ---------------------------------------------------------------------------------------- HTML

def make_run(tmp_path: Path) -> tuple[Path, list[dict]]:
    out = tmp_path / "run"
    rng = np.random.default_rng(0)
    rows = []
    for i, (cls, score, kept) in enumerate([("bottle", 0.9, False), ("bottle", 0.2, True),
                                            ("cable", 0.7, False), ("cable", 0.1, True),
                                            ("cable", float("nan"), None)]):
        overlay = None
        if i < 3:
            overlay = f"overlays/{i}.png"
            overlay_png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), rng.random((4, 4)), None,
                        out / overlay, panel_height=16)
        rows.append({"path": WEIRD_PATH if i == 2 else f"{cls}/{i:03d}.png", "class": cls, "score": score,
                     "kept": kept, "label": i % 2, "overlay_png": overlay})
    return out, rows


def test_html_report_structure_and_self_containment(tmp_path):
    out, rows = make_run(tmp_path)
    metrics = [{"class": "bottle", "image_auroc": 0.95, "aupro": math.nan},
               {"class": "cable", "image_auroc": 0.85, "aupro": 0.7},
               {"class": "mean", "image_auroc": 0.9, "aupro": math.nan}]
    settings = {"map_size": 256, "mask_threshold": 0.5, "connectivity": 8, "note": "<i>&</i>"}
    report = write_html_report(out, title="Run <1> & co", metrics_rows=metrics, score_rows=rows,
                               threshold={"bottle": 0.5, "cable": 0.4}, settings=settings)
    assert report == out / "report.html"
    raw = report.read_text(encoding="utf-8")
    assert raw.startswith("<!DOCTYPE html>")
    assert "http://" not in raw and "https://" not in raw
    assert "<b>crack" not in raw and "<i>&" not in raw          # user strings are escaped
    page = parse(report)
    assert not page.find("script") and not page.find("link") and not page.find("iframe")
    assert len(page.find("tr", "table.metrics", "tbody.")) == 3
    assert len(page.find("tr", "table.settings", "tbody.")) == len(settings)
    assert len(page.find("tr", "table.scores", "tbody.")) == len(rows)
    assert len(page.find("svg")) == 2                              # one histogram per class
    assert len(page.find("line", "svg.")) >= 2
    assert len([a for a in page.find("line") if a.get("class") == "threshold"]) == 2
    images = page.find("img", "section.gallery")
    assert len(images) == 3
    # ranked by suspicion: 0.9, 0.7 (the weird path), then 0.2
    assert [a["alt"] for a in images] == ["bottle/000.png", WEIRD_PATH, "bottle/001.png"]
    for attrs, index in zip(images, (0, 2, 1)):
        assert attrs["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(attrs["src"].split(",", 1)[1]) == (out / f"overlays/{index}.png").read_bytes()
    text = "".join(page.text)
    assert WEIRD_PATH in text and "Run <1> & co" in text and "<i>&</i>" in text
    assert "n/a" in text
    assert sorted(p.name for p in out.iterdir()) == ["overlays", "report.html"]


def test_html_report_single_threshold_and_no_threshold(tmp_path):
    out, rows = make_run(tmp_path)
    rows = [dict(r, **{"class": "bottle"}) for r in rows]
    report = write_html_report(out, title="t", metrics_rows=[], score_rows=rows, threshold=0.5, settings={})
    page = parse(report)
    assert len(page.find("svg")) == 1
    assert len([a for a in page.find("line") if a.get("class") == "threshold"]) == 1
    report = write_html_report(out, title="t", metrics_rows=[], score_rows=rows, threshold=None, settings={})
    assert not [a for a in parse(report).find("line") if a.get("class") == "threshold"]


def test_html_report_names_a_missing_overlay(tmp_path):
    rows = [{"path": "a.png", "class": "c", "score": 1.0, "kept": None, "label": None,
             "overlay_png": "missing.png"}]
    with pytest.raises(DataError, match="missing.png"):
        write_html_report(tmp_path, title="t", metrics_rows=[], score_rows=rows, threshold=None, settings={})
    assert not list(tmp_path.iterdir())


CHROMIUM = Path("/usr/bin/chromium")
REQUIRE_CHROMIUM = "MEDSCLEAN_REQUIRE_CHROMIUM"


def require_chromium() -> Path:
    """The Chromium binary; skips the test without one, unless $MEDSCLEAN_REQUIRE_CHROMIUM is set (CI sets
    it after installing Debian's `chromium`), in which case the test fails."""
    found = CHROMIUM if CHROMIUM.exists() else (Path(p) if (p := shutil.which("chromium")) else None)
    if found is not None:
        return found
    if os.environ.get(REQUIRE_CHROMIUM):
        pytest.fail(f"{REQUIRE_CHROMIUM} is set but there is no {CHROMIUM}; install Debian's chromium package")
    pytest.skip(f"needs {CHROMIUM} (set {REQUIRE_CHROMIUM}=1 to make its absence a failure)")


def run_chromium(page: Path, profile: Path, *arguments: str) -> str:
    """Headless Chromium on ``page`` with ``arguments`` (e.g. ``--dump-dom``); its stdout."""
    done = subprocess.run([str(require_chromium()), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", *arguments, page.as_uri()], check=True, timeout=45,
                          capture_output=True, text=True)
    shutil.rmtree(profile, ignore_errors=True)
    return done.stdout


def screenshot_pixels(page: Path, tmp_path: Path, window: str = "1200,1600") -> np.ndarray:
    """A headless Chromium screenshot of ``page``: uint8 (H, W, 3)."""
    shot = tmp_path / "shot.png"
    run_chromium(page, tmp_path / "profile", f"--screenshot={shot}", f"--window-size={window}")
    with Image.open(shot) as picture:
        return np.asarray(picture.convert("RGB"))


def test_html_report_renders_in_headless_chromium(tmp_path):
    require_chromium()
    out, rows = make_run(tmp_path)
    report = write_html_report(out, title="t", metrics_rows=[{"a": 1.0}], score_rows=rows, threshold=0.5,
                               settings={"x": 1})
    assert screenshot_pixels(report, tmp_path).std() > 10  # something was drawn, not a blank page


def test_missing_chromium_skips_unless_required(monkeypatch, tmp_path):
    monkeypatch.setattr(f"{__name__}.CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv(REQUIRE_CHROMIUM, raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_chromium()
    monkeypatch.setenv(REQUIRE_CHROMIUM, "1")
    with pytest.raises(pytest.fail.Exception, match=REQUIRE_CHROMIUM):
        require_chromium()
