"""The review page of `medsclean select`: structure read back with html.parser (and headless Chromium)."""

from __future__ import annotations

import base64
import io
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
    raw = report.read_text(encoding="utf-8")
    assert raw.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?://", raw)
    page = dom(report)
    assert not page.all("script") and not page.all("link") and not page.all("iframe")
    assert all(img.attrs["src"].startswith("data:image/") for img in page.all("img"))
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
        assert len(section.one("table", "scores").one("tbody").all("tr")) == len(members)
    text = page.text()
    assert f"{len(rows)} images in 4 classes" in text
    assert f"{sum(r['kept'] for r in rows)} kept" in text and "mixture (bottle, screw, tile); top 0.1 (cable)" in text
    pictured = [int(c.attrs["data-row"]) for c in page.all("figure", "card")]
    assert sorted(pictures.calls) == sorted(pictured) and len(set(pictured)) == len(pictured)
    assert len(page.all("img")) == len(pictured)
    assert "metrics" not in [s.attrs.get("id") for s in page.all("section")]
    assert not page.all(cls="contaminant") and "contaminant" not in page.one("body").text()
    assert len(page.one("table", "settings").one("tbody").all("tr")) == 2


def test_review_pictures_are_embedded_triptychs(tmp_path):
    rows, cuts = make_inputs()
    report = write_review(tmp_path, title="t", rows=rows, cuts=cuts, picture=Pictures(rows),
                          limits=GalleryLimits(gallery_size=2, borderline=1))
    images = dom(report).all("img")
    assert images
    for img in images:
        header, payload = img.attrs["src"].split(",", 1)
        assert header == "data:image/jpeg;base64"
        with Image.open(io.BytesIO(base64.b64decode(payload))) as picture:
            assert picture.format == "JPEG"
            assert picture.size == (3 * round(36 * PANEL_HEIGHT / 24), PANEL_HEIGHT + 20)
        assert img.attrs["alt"] == rows[int(img.parent.attrs["data-row"])]["path"]


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
    assert "<script" not in raw and "<i>" not in raw and "<b>key" not in raw
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
    assert len(re.findall(r"<img\b", rendered)) == expected_images
    ids = re.findall(r'<section id="([^"]+)"', rendered)
    assert ids == ["summary", "metrics", *(f"class-{n}" for n in sorted(cuts))]
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
