"""The review page of `medsclean select`: structure read back with html.parser (and headless Chromium)."""

from __future__ import annotations

import base64
import io
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest
from PIL import Image

from medsclean.pages.gallery import THUMB_HEIGHT, caption
from medsclean.pages.review import PANEL_HEIGHT, GalleryLimits, write_review

from .test_report import require_chromium, run_chromium, screenshot_pixels

HOSTILE_PATH = '<script>alert("p")</script>.png'
HOSTILE_CLASS = '"><img src=x onerror=alert(1)>'
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


# ------------------------------------------------------------------------------------- a tiny DOM

class Node:
    """An element: tag, attributes, children (nodes and strings)."""

    def __init__(self, tag: str, attrs: dict, parent: Node | None) -> None:
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def all(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        """Descendants in document order, filtered by tag and by one CSS class."""
        found = []
        for child in self.children:
            if isinstance(child, Node):
                if (tag is None or child.tag == tag) and (cls is None or cls in child.classes):
                    found.append(child)
                found += child.all(tag, cls)
        return found

    def one(self, tag: str | None = None, cls: str | None = None) -> Node:
        found = self.all(tag, cls)
        assert len(found) == 1, f"{len(found)} <{tag} class={cls}> elements"
        return found[0]


class TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.node = Node("#document", {}, None)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.node)
        self.node.children.append(node)
        if tag not in VOID:
            self.node = node

    def handle_startendtag(self, tag, attrs):
        self.node.children.append(Node(tag, dict(attrs), self.node))

    def handle_endtag(self, tag):
        node = self.node
        while node.parent is not None and node.tag != tag:
            node = node.parent
        if node.parent is not None:
            self.node = node.parent

    def handle_data(self, data):
        self.node.children.append(data)


def dom(path: Path) -> Node:
    builder = TreeBuilder()
    builder.feed(path.read_text(encoding="utf-8"))
    builder.close()
    return builder.root


# ------------------------------------------------------------------------------------ the inputs

def class_rows(name: str, eta: list[float], tau: float, labels: list | None = None) -> list[dict]:
    """Rows of one class as the pipeline gives them: kept iff eta < tau, rank 1 = highest eta."""
    order = sorted(range(len(eta)), key=lambda i: -eta[i])
    rank = {i: r + 1 for r, i in enumerate(order)}
    return [{"path": f"{name}/{i:04d}.png", "class": name, "eta": float(e), "kept": bool(e < tau),
             "rank_in_class": rank[i], "memory_score": 0.5 * float(e),
             "label": None if labels is None else labels[i]} for i, e in enumerate(eta)]


def make_inputs(labelled: bool = False, seed: int = 0) -> tuple[list[dict], dict]:
    """Four classes: a big one, a small one, one of a single image, one whose scores are all equal."""
    rng = np.random.default_rng(seed)
    spec = {"bottle": (rng.lognormal(0.0, 0.4, 60), 1.6), "cable": (rng.normal(5.0, 1.0, 9), 5.5),
            "screw": (np.array([0.3]), 0.3), "tile": (np.full(4, 0.25), float(np.nextafter(0.25, 1.0)))}
    rows, cuts = [], {}
    for name, (eta, tau) in spec.items():
        labels = [int(e >= tau) if i % 5 else 1 - int(e >= tau) for i, e in enumerate(eta)] if labelled else None
        members = class_rows(name, list(eta), tau, labels)
        rows += members
        kept = sum(r["kept"] for r in members)
        cuts[name] = {"tau": tau, "rule": "top 0.1" if name == "cable" else "mixture", "kept": kept,
                      "size": len(members)}
    order = rng.permutation(len(rows))  # input order is not class order
    return [rows[i] for i in order], cuts


class Pictures:
    """picture(i): a random image (24, 36, 3), its heat map and, for contaminants, a mask; records calls."""

    def __init__(self, rows: list[dict], seed: int = 0) -> None:
        self.rows, self.calls, self.rng = rows, [], np.random.default_rng(seed)

    def __call__(self, i: int):
        self.calls.append(i)
        image = self.rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)
        heat = (self.rng.random((24, 36)) * self.rows[i]["eta"]).astype(np.float32)
        mask = np.zeros((24, 36), dtype=bool) if self.rows[i].get("label") == 1 else None
        if mask is not None:
            mask[8:16, 10:20] = True
        return image, heat, mask


def expected_gallery(rows: list[dict], name: str, kept: bool, limit: int) -> list[int]:
    """Row indices of one gallery: eta descending, ties by rank_in_class."""
    members = [i for i, r in enumerate(rows) if r["class"] == name and r["kept"] == kept]
    return sorted(members, key=lambda i: (-rows[i]["eta"], rows[i]["rank_in_class"]))[:limit]


def sections(page: Node) -> list[Node]:
    return [s for s in page.all("section") if "class" in s.classes]


def assert_self_contained(report: Path) -> None:
    """One file that fetches nothing: no URL of a network, no source file, no request from its one
    inline script, pictures as data: URIs, links only to the page itself or to local files."""
    raw = report.read_text(encoding="utf-8")
    assert raw.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", raw, flags=re.IGNORECASE)
    page = dom(report)
    scripts = page.all("script")
    assert len(scripts) == 1 and not scripts[0].attrs
    assert not re.search(r"fetch\(|XMLHttpRequest|WebSocket|EventSource|sendBeacon|import\(|\.src\s*=\s*[\"']",
                         scripts[0].text())
    assert not page.all("link") and not page.all("iframe") and not page.all("object") and not page.all("embed")
    assert all(img.attrs["src"].startswith("data:image/") for img in page.all("img"))
    assert all(a.attrs["href"].startswith(("#", "file:///")) for a in page.all("a"))
    assert not [a for node in page.all() for a in node.attrs if a.lower().startswith("on")]


# ----------------------------------------------------------------------------------------- tests

def test_review_sections_counts_and_galleries(tmp_path):
    rows, cuts = make_inputs()
    pictures = Pictures(rows)
    report = write_review(tmp_path / "review", title="Review", rows=rows, cuts=cuts, picture=pictures,
                          limits=GalleryLimits(gallery_size=4, borderline=3),
                          settings={"rule": "mixture", "seed": 0})
    assert report == tmp_path / "review" / "report.html"
    assert [p.name for p in report.parent.iterdir()] == ["report.html"]   # no temporary or picture file
    assert_self_contained(report)
    page = dom(report)
    names = sorted(cuts)
    assert [s.attrs["id"] for s in sections(page)] == [f"class-{n}" for n in names]
    summary = page.one("table", "classes").one("tbody").all("tr")
    for section, name, line in zip(sections(page), names, summary):
        members = [r for r in rows if r["class"] == name]
        kept = sum(r["kept"] for r in members)
        assert section.one("h2").text() == name
        counts = section.one("p", "counts").text()
        assert f"{len(members)} image" in counts and f"{kept} kept" in counts
        assert f"{len(members) - kept} rejected" in counts and cuts[name]["rule"] in counts
        assert [td.text() for td in line.all("td")[:5]] == [name, str(len(members)), str(kept),
                                                           str(len(members) - kept), cuts[name]["rule"]]
        for role, is_kept, limit in (("rejected", False, 4), ("borderline", True, 3)):
            cards = [c for g in section.all("div", role) for c in g.all("figure", "card")]
            expected = expected_gallery(rows, name, is_kept, limit)
            assert [int(c.attrs["data-row"]) for c in cards] == expected
            assert [float(c.attrs["data-eta"]) for c in cards] == sorted((rows[i]["eta"] for i in expected),
                                                                         reverse=True)
            assert all(("kept" if is_kept else "rejected") in c.classes for c in cards)
            assert all((float(c.attrs["data-eta"]) < cuts[name]["tau"]) == is_kept for c in cards)
        listed = [tr for tr in page.one("table", "scores").one("tbody").all("tr") if tr.attrs["data-class"] == name]
        assert [int(tr.attrs["data-rank"]) for tr in listed] == list(range(1, len(members) + 1))
    text = page.text()
    assert f"{len(rows)} images in 4 classes" in text
    assert f"{sum(r['kept'] for r in rows)} kept" in text and "mixture (bottle, screw, tile); top 0.1 (cable)" in text
    pictured = [int(c.attrs["data-row"]) for c in page.all("figure", "card")]
    assert sorted(pictures.calls) == sorted(pictured) and len(set(pictured)) == len(pictured)
    assert len(page.all("img")) == len(pictured)
    assert "metrics" not in [s.attrs.get("id") for s in page.all("section")]
    assert not page.all(cls="contaminant") and "contaminant" not in page.one("body").text()
    assert len(page.one("table", "settings").one("tbody").all("tr")) == 2


def embedded_pictures(report: Path) -> dict[int, Image.Image]:
    """Row -> decoded JPEG of every pictured card of a page."""
    pictures = {}
    for img in dom(report).all("img", "zoom"):
        header, payload = img.attrs["src"].split(",", 1)
        assert header == "data:image/jpeg;base64"
        with Image.open(io.BytesIO(base64.b64decode(payload))) as picture:
            assert picture.format == "JPEG"
            pictures[int(img.parent.attrs["data-row"])] = picture.convert("RGB")
        assert img.attrs["alt"] == img.parent.one("span", "path").text()
    return pictures


def test_without_masks_a_picture_is_image_and_overlay_with_masks_three_panels(tmp_path):
    panel = round(36 * PANEL_HEIGHT / 24)   # the pictures are 24 x 36
    rows, cuts = make_inputs()              # unlabelled: no masks
    pictures = embedded_pictures(write_review(tmp_path / "a", title="t", rows=rows, cuts=cuts, picture=Pictures(rows),
                                              limits=GalleryLimits(gallery_size=2, borderline=1)))
    assert pictures and {p.size for p in pictures.values()} == {(2 * panel, PANEL_HEIGHT + 20)}
    for picture in pictures.values():       # the right panel is the coloured overlay, not the flat "no mask" grey
        right = np.asarray(picture, dtype=np.float64)[40:PANEL_HEIGHT - 40, panel + 20:2 * panel - 20]
        assert right.std() > 10
    rows, cuts = make_inputs(labelled=True)  # masks for the contaminants only: every picture gets the truth panel
    pictures = embedded_pictures(write_review(tmp_path / "b", title="t", rows=rows, cuts=cuts, picture=Pictures(rows),
                                              limits=GalleryLimits(gallery_size=2, borderline=1)))
    assert {rows[i]["label"] for i in pictures} == {0, 1}
    assert {p.size for p in pictures.values()} == {(3 * panel, PANEL_HEIGHT + 20)}


def test_one_caption_names_the_path_once_and_eta_as_the_page_does(tmp_path):
    rows = [{"path": "chelsea/chelsea_010.png", "class": "chelsea", "eta": 0.12345, "kept": False, "rank_in_class": 1},
            {"path": "chelsea/chelsea_011.png", "class": "chelsea", "eta": 0.01, "kept": True, "rank_in_class": 2}]
    assert caption(rows[0]) == "chelsea/chelsea_010.png  η = 0.1235 (#1 in chelsea)"
    report = write_review(tmp_path, title="t", rows=rows, cuts={"chelsea": {"tau": 0.1, "rule": "mad"}},
                          picture=lambda i: (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32), None))
    card = dom(report).one("div", "rejected").one("figure", "card")
    text = card.one("figcaption").text()
    assert text.count("chelsea_010.png") == 1 and "chelsea/chelsea/" not in text and "eta" not in text
    assert card.one("span", "score").text() == "η = 0.1235 (#1 in chelsea)"


def test_a_font_without_greek_spells_eta_out(tmp_path):
    from PIL import ImageDraw, ImageFont

    from medsclean.pages import overlay as pictures

    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    latin = ImageFont.load_default(size=12)   # Pillow's own font has no Greek
    assert pictures._fit_text(draw, "a.png  η = 0.5", latin, 1000) == "a.png  eta = 0.5"
    if pictures._draws(pictures._font(), "η"):  # DejaVu Sans where installed
        assert pictures._fit_text(draw, "a.png  η = 0.5", pictures._font(), 1000) == "a.png  η = 0.5"


def svg_geometry(svg: Node) -> tuple[float, float, float, float]:
    """(lo, hi) of the x axis in eta units and (x, width) of the plot frame in pixels."""
    frame = svg.one("rect", "plot")
    return (float(svg.attrs["data-lo"]), float(svg.attrs["data-hi"]), float(frame.attrs["x"]),
            float(frame.attrs["width"]))


def test_histogram_draws_the_cut_at_tau_and_every_image_on_its_side(tmp_path):
    rows, cuts = make_inputs()
    report = write_review(tmp_path, title="t", rows=rows, cuts=cuts, picture=None)
    for section, name in zip(sections(dom(report)), sorted(cuts)):
        svg = section.one("svg", "histogram")
        lo, hi, left, width = svg_geometry(svg)
        eta = [r["eta"] for r in rows if r["class"] == name]
        tau = cuts[name]["tau"]
        assert math.isfinite(lo) and math.isfinite(hi) and lo < hi
        assert lo <= min(eta + [tau]) and max(eta + [tau]) <= hi
        line = svg.one("line", "cut")
        x = left + (tau - lo) / (hi - lo) * width
        assert float(line.attrs["x1"]) == pytest.approx(x, abs=0.01) == float(line.attrs["x2"])
        assert left < x < left + width
        members_of = {status: [r for r in rows if r["class"] == name and r["kept"] == (status == "kept")]
                      for status in ("kept", "rejected")}
        for status, members in members_of.items():
            bars = svg.all("rect", status)
            assert sum(int(b.one("title").text().split()[0]) for b in bars) == len(members)
            for bar in bars:
                x0, x1 = float(bar.attrs["x"]), float(bar.attrs["x"]) + float(bar.attrs["width"])
                assert (x1 <= x + 0.02) if status == "kept" else (x0 >= x - 0.02)


def test_degenerate_classes_get_a_readable_axis(tmp_path):
    rows = (class_rows("one", [7.0], 7.0) + class_rows("two", [1e6, 1e6 + 1e-3], 1e6 + 5e-4)
            + class_rows("flat", [0.0] * 5, 1e-300) + class_rows("nocut", [1.0, 2.0], 1.5))
    cuts = {"one": {"tau": 7.0, "rule": "mad"}, "two": {"tau": 1e6 + 5e-4, "rule": "mad"},
            "flat": {"tau": 1e-300, "rule": "mad"}}
    report = write_review(tmp_path, title="t", rows=rows, cuts=cuts, picture=None)
    for section in sections(dom(report)):
        svg = section.one("svg", "histogram")
        lo, hi, left, width = svg_geometry(svg)
        assert lo < hi and hi - lo > 1e-12 * max(abs(lo), abs(hi))
        bars = svg.all("rect", "bar")
        assert bars and all(left - 0.01 <= float(b.attrs["x"]) <= left + width for b in bars)
        assert all(float(b.attrs["width"]) > 1 for b in bars)
        lines = svg.all("line", "cut")
        assert len(lines) == (section.attrs["id"] != "class-nocut")
    nocut = [s for s in sections(dom(report)) if s.attrs["id"] == "class-nocut"][0]
    assert "no cut" in nocut.one("p", "counts").text()


def test_labels_add_metrics_and_mark_every_pictured_image(tmp_path):
    rows, cuts = make_inputs(labelled=True)
    metrics = [{"class": "bottle", "precision": 0.8, "recall": 0.9}, {"class": "mean", "precision": math.nan}]
    report = write_review(tmp_path, title="t", rows=rows, cuts=cuts, picture=Pictures(rows),
                          limits=GalleryLimits(gallery_size=5, borderline=4), metrics_rows=metrics)
    page = dom(report)
    table = [s for s in page.all("section") if s.attrs.get("id") == "metrics"][0].one("table", "metrics")
    assert len(table.one("tbody").all("tr")) == 2 and "n/a" in table.text()
    cards = page.all("figure", "card")
    assert cards
    for card in cards:
        label = rows[int(card.attrs["data-row"])]["label"]
        mark = "contaminant" if label == 1 else "normal"
        assert mark in card.classes and ({"contaminant", "normal"} - {mark}).isdisjoint(card.classes)
        assert card.one("span", mark).text() == mark
    heads = [th.text() for th in page.one("table", "classes").all("th")]
    assert heads[-3:] == ["contaminants", "contaminants rejected", "normals rejected"]
    for line in page.one("table", "classes").one("tbody").all("tr"):
        name = line.all("td")[0].text()
        contaminants = [r for r in rows if r["class"] == name and r["label"] == 1]
        assert int(line.all("td")[-3].text()) == len(contaminants)
        assert int(line.all("td")[-2].text()) == sum(not r["kept"] for r in contaminants)


def test_without_pictures_the_galleries_list_paths_and_scores(tmp_path):
    rows, cuts = make_inputs()
    report = write_review(tmp_path, title="t", rows=rows, cuts=cuts, picture=None,
                          limits=GalleryLimits(gallery_size=3, borderline=2))
    page = dom(report)
    assert not page.all("img")
    cards = page.all("figure", "card")
    assert len(cards) == sum(len(expected_gallery(rows, n, k, 3 if not k else 2)) for n in cuts for k in (False, True))
    for card in cards:
        row = rows[int(card.attrs["data-row"])]
        assert "nopic" in card.classes and card.one("span", "path").text() == row["path"]
        assert f"{row['eta']:.4g}" in card.text()


def test_hostile_names_are_inert(tmp_path):
    rows = class_rows(HOSTILE_CLASS, [0.1, 0.9, 0.5], 0.7)
    rows[1]["path"] = HOSTILE_PATH
    settings = {"<b>key</b>": "</table><script>x</script>"}
    report = write_review(tmp_path, title="<script>t</script> & co", rows=rows,
                          cuts={HOSTILE_CLASS: {"tau": 0.7, "rule": "<i>mad</i>"}}, picture=Pictures(rows),
                          settings=settings)
    raw = report.read_text(encoding="utf-8")
    assert raw.count("<script") == 1 and "<i>" not in raw and "<b>key" not in raw   # the page's own script only
    assert "<script>alert" not in raw and "<script>x" not in raw and "<script>t" not in raw
    assert_self_contained(report)
    page = dom(report)
    section = sections(page)[0]
    assert re.fullmatch(r"class-[A-Za-z0-9_-]+", section.attrs["id"])
    assert section.one("h2").text() == HOSTILE_CLASS
    card = section.one("div", "rejected").one("figure", "card")
    assert card.one("img").attrs["alt"] == HOSTILE_PATH and card.one("span", "path").text() == HOSTILE_PATH
    text = page.text()
    assert "<script>t</script> & co" in text and "<i>mad</i>" in text and "</table><script>x</script>" in text
    assert len(page.all("img")) == 3


def test_shared_heat_range_makes_colours_comparable(tmp_path):
    rows = class_rows("c", [2.0, 1.0], 1.5)
    grey = np.full((16, 16, 3), 128, dtype=np.uint8)
    heats = {0: np.full((16, 16), 10.0, np.float32), 1: np.zeros((16, 16), np.float32)}
    report = write_review(tmp_path, title="t", rows=rows, cuts={"c": {"tau": 1.5, "rule": "mad"}},
                          picture=lambda i: (grey, heats[i], None))
    brightness = {}
    for img in dom(report).all("img"):
        with Image.open(io.BytesIO(base64.b64decode(img.attrs["src"].split(",", 1)[1]))) as picture:
            grey_levels = np.asarray(picture.convert("L"), dtype=np.float64)
        middle = grey_levels[40:PANEL_HEIGHT - 40, PANEL_HEIGHT + 40:2 * PANEL_HEIGHT - 40]   # heat panel
        brightness[int(img.parent.attrs["data-row"])] = middle.mean()
    assert brightness[0] > brightness[1] + 60   # per-image ranges would paint both the same dark colour


def test_limits_and_invalid_rows(tmp_path):
    rows, cuts = make_inputs()
    pictures = Pictures(rows)
    page = dom(write_review(tmp_path, title="t", rows=rows, cuts=cuts, picture=pictures,
                            limits=GalleryLimits(gallery_size=0, borderline=0)))
    assert not page.all("figure", "card") and not pictures.calls and len(sections(page)) == 4
    bad = [dict(rows[0], eta=math.nan)]
    with pytest.raises(ValueError, match="eta must be finite"):
        write_review(tmp_path / "x", title="t", rows=bad, cuts=cuts, picture=None)
    with pytest.raises(ValueError, match="lacks rank_in_class"):
        write_review(tmp_path / "x", title="t", rows=[{k: v for k, v in rows[0].items() if k != "rank_in_class"}],
                     cuts=cuts, picture=None)
    with pytest.raises(ValueError, match="0 or more"):
        write_review(tmp_path / "x", title="t", rows=rows, cuts=cuts, picture=None, limits=GalleryLimits(borderline=-1))
    assert not (tmp_path / "x").exists()


def test_review_renders_in_headless_chromium(tmp_path):
    require_chromium()
    rows, cuts = make_inputs(labelled=True)
    report = write_review(tmp_path / "review", title="Review", rows=rows, cuts=cuts, picture=Pictures(rows),
                          limits=GalleryLimits(gallery_size=3, borderline=2),
                          metrics_rows=[{"class": "bottle", "recall": 1.0}])
    expected_images = len(dom(report).all("img"))
    assert expected_images > 0
    rendered = run_chromium(report, tmp_path / "profile-dom", "--dump-dom")
    assert len(re.findall(r"<img\b[^>]*src=\"data:image/", rendered)) == expected_images
    ids = re.findall(r'<section id="([^"]+)"', rendered)
    assert ids == ["summary", "metrics", *(f"class-{n}" for n in sorted(cuts)), "copy", "list"]
    assert rendered.count('class="cut"') == len(cuts)
    pixels = screenshot_pixels(report, tmp_path)
    assert pixels.std() > 10                                   # something was drawn, not a blank page
    assert (np.abs(pixels[..., 0].astype(int) - pixels[..., 1]) > 60).mean() > 0.001   # colour: bars, badges, overlays


def test_page_and_help_say_which_method_to_try_for_which_data(tmp_path):
    from typer.testing import CliRunner

    from medsclean.cli import app

    rows, cuts = make_inputs()
    page = write_review(tmp_path, title="t", rows=rows, cuts=cuts, picture=None).read_text()
    assert "Which method:" in page and "--method knn ranked defective images better" in page
    res = CliRunner().invoke(app, ["select", "--help"], terminal_width=300)
    assert "when every defect is unique, --method knn" in " ".join(res.output.replace("│", " ").split())  # panels' borders out


def test_page_shows_each_class_engine_and_the_rule_it_used(tmp_path):
    rows = class_rows("big", [3.0, 1.0, 2.0], 2.5) + class_rows("small", [5.0, 4.0], 4.5)
    engine = {"engine": "exact", "reason": "CPU only: exact 9 TFLOP", "projected_exact_s": 5400.0,
              "over_bound": True}
    cuts = {"big": {"tau": 2.5, "rule": "mixture", "engine": engine,
                    "used": {"rule": "mixture", "why": "two separated components (likelihood ratio 80.0)"}},
            "small": {"tau": 4.5, "rule": "mixture", "used": {"rule": "mad", "why": "2 images, fewer than 20"}}}
    page = dom(write_review(tmp_path, title="t", rows=rows, cuts=cuts, picture=None))
    summary = page.one("table", "classes").one("tbody").all("tr")
    assert [[td.text() for td in tr.all("td")[4:6]] for tr in summary] == [["mixture", "exact"],
                                                                            ["mad", "not recorded"]]
    big, small = sections(page)
    assert "over the bound: --engine approx" in big.one("p", "engine").text() and "90 min" in \
        big.one("p", "engine").text()
    assert small.one("p", "rule").text() == "Cut: mad (2 images, fewer than 20); the run asked for mixture."
    assert "not recorded" in small.one("p", "engine").text()
    assert "mixture (big); mad (small)" in page.text()


# ------------------------------------------------------------- the full list, paths to copy, corrections

def files_for(rows: list[dict], root: Path) -> list[dict]:
    """The rows with real files under ``root``: PNGs, every fifth a large JPEG, one file that is not an image."""
    rng = np.random.default_rng(1)
    out = []
    for i, row in enumerate(rows):
        path = root / row["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        if i == 3:
            path.write_bytes(b"not an image")
        elif i % 5 == 0:
            path = path.with_suffix(".jpg")
            Image.fromarray(rng.integers(0, 256, (600, 900, 3), dtype=np.uint8)).save(path, quality=80)
        else:
            Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(path)
        out.append(dict(row, file=str(path), user_path=f"./images/{row['path']}"))
    return out


def by_id(page: Node, name: str) -> Node:
    found = [node for node in page.all() if node.attrs.get("id") == name]
    assert len(found) == 1, name
    return found[0]


def section(page: Node, name: str) -> Node:
    return by_id(page, name)


def list_rows(page: Node) -> list[Node]:
    return page.one("table", "scores").one("tbody").all("tr")


def test_full_list_has_every_image_with_thumbnail_scores_and_file_link(tmp_path):
    rows, cuts = make_inputs()
    rows = files_for(rows, tmp_path / "images")
    page = dom(write_review(tmp_path / "review", title="t", rows=rows, cuts=cuts, picture=None))
    listed = list_rows(page)
    expected = sorted(range(len(rows)), key=lambda i: (rows[i]["class"], rows[i]["rank_in_class"]))
    assert [int(tr.attrs["data-row"]) for tr in listed] == expected       # class, then most suspicious first
    for tr in listed:
        row = rows[int(tr.attrs["data-row"])]
        assert (tr.attrs["data-class"], tr.attrs["data-path"]) == (row["class"], row["path"])
        assert float(tr.attrs["data-eta"]) == row["eta"] and float(tr.attrs["data-memory"]) == row["memory_score"]
        assert tr.attrs["data-status"] == ("kept" if row["kept"] else "rejected") and tr.attrs["data-decision"] == "auto"
        assert tr.one("a", "open").attrs["href"] == Path(row["file"]).as_uri()
        thumbs = tr.all("img")
        if row is rows[3]:                  # not an image: listed without a thumbnail
            assert not thumbs
            continue
        with Image.open(io.BytesIO(base64.b64decode(thumbs[0].attrs["src"].split(",", 1)[1]))) as thumb:
            with Image.open(row["file"]) as source:
                width, height = source.size
            scale = min(1.0, THUMB_HEIGHT / height, 2 * THUMB_HEIGHT / width)   # shrunk to 64 high, never enlarged
            assert abs(thumb.size[0] - width * scale) <= 1 and abs(thumb.size[1] - height * scale) <= 1
    assert f"1 of {len(rows)} images have no thumbnail" in section(page, "list").text()
    assert [o.attrs["value"] for o in by_id(page, "list-sort").all("option")] == [
        "class", "rank", "eta-desc", "eta-asc", "memory-desc", "memory-asc", "path"]
    assert [o.attrs["value"] for o in by_id(page, "list-class").all("option")] == ["", *sorted(cuts)]
    assert_self_contained(tmp_path / "review" / "report.html")


def test_thumbnails_stop_at_the_limit_most_suspicious_of_each_class_first(tmp_path):
    rows, cuts = make_inputs()
    rows = [r for i, r in enumerate(files_for(rows, tmp_path / "images")) if i != 3]
    page = dom(write_review(tmp_path, title="t", rows=rows, cuts=cuts, picture=None,
                            limits=GalleryLimits(thumbnails=4)))
    with_thumb = [rows[int(tr.attrs["data-row"])] for tr in list_rows(page) if tr.all("img")]
    assert sorted((r["class"], r["rank_in_class"]) for r in with_thumb) == [(c, 1) for c in sorted(cuts)]


def test_copy_boxes_hold_the_rejected_and_the_borderline_paths_as_the_lists_write_them(tmp_path):
    rows, cuts = make_inputs()
    rows = [dict(r, user_path=f"./images/{r['path']}") for r in rows]
    page = dom(write_review(tmp_path, title="t", rows=rows, cuts=cuts, picture=None,
                            limits=GalleryLimits(gallery_size=2, borderline=3)))
    boxes = {t.attrs["id"]: t for t in page.all("textarea")}
    rejected = [rows[i]["user_path"] for n in sorted(cuts) for i in expected_gallery(rows, n, False, len(rows))]
    near = [rows[i]["user_path"] for n in sorted(cuts) for i in expected_gallery(rows, n, True, 3)]
    assert rejected and len(near) > 3
    assert boxes["paths-rejected"].text() == "".join(f"{p}\n" for p in rejected)   # every rejected image, not 2 per class
    assert boxes["paths-borderline"].text() == "".join(f"{p}\n" for p in near)
    assert {b.attrs["data-copy"] for b in page.all("button")} == set(boxes)
    assert "--keep FILE" in page.text() and "--reject FILE" in page.text()


def test_corrections_show_a_badge_on_tiles_and_list_rows(tmp_path):
    rows, cuts = make_inputs()
    near = expected_gallery(rows, "bottle", True, 1)[0]
    out = expected_gallery(rows, "bottle", False, 1)[0]
    rows[near]["decision"], rows[out]["decision"] = "kept by user", "rejected by user"
    rows[expected_gallery(rows, "cable", False, 1)[0]]["decision"] = "auto"
    page = dom(write_review(tmp_path, title="t", rows=rows, cuts=cuts, picture=Pictures(rows)))
    badged_cards = {int(c.attrs["data-row"]): c.one("span", "decision").text()
                    for c in page.all("figure", "card") if c.all("span", "decision")}
    badged_rows = {int(tr.attrs["data-row"]): tr.one("span", "decision").text()
                   for tr in list_rows(page) if tr.all("span", "decision")}
    assert badged_cards == badged_rows == {near: "kept by user", out: "rejected by user"}
    assert {int(c.attrs["data-row"]) for c in page.all("figure", "corrected")} == {near, out}
    assert [o.attrs["value"] for o in by_id(page, "list-status").all("option")] == ["all", "kept", "rejected", "changed"]
    plain = dom(write_review(tmp_path / "plain", title="t", rows=make_inputs()[0], cuts=cuts, picture=None))
    assert not plain.all("span", "decision")
    assert [o.attrs["value"] for o in by_id(plain, "list-status").all("option")] == ["all", "kept", "rejected"]


def test_settings_grouped_by_stage(tmp_path):
    rows, cuts = make_inputs()
    settings = {"run": {"run": "abc", "--seed": 0}, "distill": {"--distill-iters": 60, "final_lr": 2e-4},
                "select": {"--select-iters": 60, "--method": "meds"}, "note": "<flat>"}
    table = dom(write_review(tmp_path, title="t", rows=rows, cuts=cuts, picture=None, settings=settings)).one(
        "table", "settings")
    assert [th.text() for th in table.all("th")] == ["stage", "setting", "value"]
    assert [[td.text() for td in tr.all("td")] for tr in table.one("tbody").all("tr")] == [
        ["run", "run", "abc"], ["run", "--seed", "0"], ["distill", "--distill-iters", "60"],
        ["distill", "final_lr", "0.0002"], ["select", "--select-iters", "60"], ["select", "--method", "meds"],
        ["", "note", "<flat>"]]


# ------------------------------------------------------- the page of a real run on an unlabelled folder

FAST = {"resize": 64, "crop": 64, "num_workers": 0, "banks": 10, "distill_iters": 20, "select_iters": 20,
        "width": 16, "depth": 2, "heads": 2}


@pytest.fixture(scope="module")
def unlabelled_run(tmp_path_factory):
    """`select` on a folder of two classes without labels or masks (a few crops of the other texture
    in each), cutting a fixed share so that both galleries have pictures."""
    import medsclean

    from .helpers import crops, save_png, texture

    base = tmp_path_factory.mktemp("unlabelled")
    rng = np.random.default_rng(0)
    for name, other in (("brick", "gravel"), ("gravel", "brick")):
        for i, img in enumerate(crops(texture(name), 10, 80, rng)):
            save_png(base / "images" / name / f"{name}_{i:03d}.png", img)
        for i, img in enumerate(crops(texture(other), 2, 80, rng)):
            save_png(base / "images" / name / f"odd_{i:03d}.png", img)
    selection = medsclean.select(str(base / "images"), work=base / "work", progress=False, reject_fraction=0.25,
                                 report=base / "review", **FAST)
    return base, selection


def chromium_dom(url: str, profile: Path) -> str:
    """The DOM headless Chromium holds after loading ``url`` (a fragment included); fails on a script error."""
    done = subprocess.run([str(require_chromium()), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", "--dump-dom", url],
                          check=True, timeout=45, capture_output=True, text=True)
    shutil.rmtree(profile, ignore_errors=True)
    errors = [line for line in done.stderr.splitlines() if "CONSOLE" in line and "Uncaught" in line]
    assert not errors, errors
    return done.stdout


def parsed(html: str) -> Node:
    builder = TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def test_review_of_an_unlabelled_run_pictures_lists_and_records_every_option(unlabelled_run):
    base, selection = unlabelled_run
    report = Path(selection.review)
    assert_self_contained(report)
    page = dom(report)
    pictures = embedded_pictures(report)
    assert pictures and {p.size for p in pictures.values()} == {(2 * PANEL_HEIGHT, PANEL_HEIGHT + 20)}  # no "no mask"
    listed = list_rows(page)
    assert len(listed) == len(selection.rows) == 24 and all(tr.all("img") for tr in listed)   # every thumbnail
    for tr in listed:
        target = Path(unquote(urlparse(tr.one("a", "open").attrs["href"]).path))
        assert target == base / "images" / tr.attrs["data-path"] and target.is_file()
    assert by_id(page, "paths-rejected").text().splitlines() == sorted(
        selection.rejected, key=lambda p: next((r["class"], r["rank_in_class"]) for r in selection.rows if r["path"] == p))
    settings = {(tr.all("td")[0].text(), tr.all("td")[1].text()): tr.all("td")[2].text()
                for tr in page.one("table", "settings").one("tbody").all("tr")}
    assert settings[("distill", "--distill-iters")] == "20" and settings[("select", "--select-iters")] == "20"
    assert settings[("cut", "--reject-fraction")] == "0.25" and settings[("extract", "--crop")] == "64"
    assert settings[("score", "--banks")] == "10" and settings[("data", "--layout")] == "auto"
    assert {stage for stage, _ in settings} == {"run", "data", "extract", "score", "distill", "select", "cut"}


def test_review_of_an_unlabelled_run_in_headless_chromium(unlabelled_run, tmp_path):
    """The page's script, run by Chromium: the list sorted and filtered from the address, a picture
    enlarged; and a screenshot of the gallery."""
    base, selection = unlabelled_run
    report = Path(selection.review)
    rows = {Path(r["path"]).relative_to(base / "images").as_posix(): r for r in selection.rows}

    def visible(url: str) -> tuple[Node, list[str]]:
        page = parsed(chromium_dom(url, tmp_path / "profile"))
        assert page.one("body").attrs.get("data-script") == "ready"
        return page, [tr.attrs["data-path"] for tr in list_rows(page) if "hidden" not in tr.attrs]

    page, shown = visible(report.as_uri() + "#list?sort=eta-asc&status=rejected&class=gravel")
    expected = sorted((p for p, r in rows.items() if r["class"] == "gravel" and not r["kept"]),
                      key=lambda p: rows[p]["final_eta"])
    assert len(expected) >= 2 and shown == expected
    assert page.one("table", "scores").attrs["data-shown"] == str(len(expected))
    assert by_id(page, "list-shown").text() == f"{len(expected)} of 24 images"
    _, shown = visible(report.as_uri() + "#list?sort=memory-desc")
    assert shown == sorted(rows, key=lambda p: -rows[p]["memory_score"])
    _, shown = visible(report.as_uri() + "#list?sort=path&status=kept")
    assert shown == sorted(p for p, r in rows.items() if r["kept"])
    card = dom(report).all("figure", "card")[1]
    page, _ = visible(report.as_uri() + f"#{card.attrs['id']}")
    box = by_id(page, "lightbox")
    assert "hidden" not in box.attrs and box.attrs["data-card"] == card.attrs["id"]
    assert box.one("img").attrs["src"] == card.one("img").attrs["src"]
    assert card.one("span", "path").text() in box.one("div", "caption").text()
    pixels = screenshot_pixels(report, tmp_path)
    shot = Image.fromarray(pixels)
    shot.save(tmp_path / "review.png")   # kept with the test's files, to look at
    assert pixels.std() > 10
    assert (np.abs(pixels[..., 0].astype(int) - pixels[..., 2]) > 60).mean() > 0.01   # the heat maps' colours
