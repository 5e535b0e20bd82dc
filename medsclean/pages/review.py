"""The review page of `medsclean select`: what was rejected, what was nearly rejected, and why.

One self-contained ``report.html`` (no script, no external resource), with or without labels:
a summary of the counts and cut rules, then one section per class with a histogram of the final
score eta and the cut tau, the rejected images (most suspicious first), the kept images nearest
the cut ("borderline kept"), and every score in a collapsible table. Pictures are anomaly-map
triptychs (:func:`medsclean.pages.report.render_overlay`) embedded as JPEG ``data:`` URIs straight from
memory, all coloured on one heat range so they compare across the page. With labels, the page
also shows the metrics table and marks every pictured image contaminant or normal.

An image is kept iff eta < tau (strict). Every path, class name and setting is escaped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medsclean.presets import METHOD_ADVICE
from medsclean.pages.histogram import histogram_svg
from medsclean.pages.report import escape, html_page, html_table, picture_data_uri, render_overlay, settings_rows
from medsclean.workdir.atomic import write_text_atomic

__all__ = ["GalleryLimits", "Picture", "write_review"]

Picture = Callable[[int], tuple[np.ndarray, np.ndarray, "np.ndarray | None"]]
"""picture(i) -> (image uint8 (H, W, 3), heat float32 (H, W) anomaly map, mask bool (H, W) or None).

heat and mask may have another resolution (e.g. the token grid): they are resized to the picture.
"""

PANEL_HEIGHT = 192
"""Height in pixels of each panel of a pictured triptych (width follows the aspect ratio)."""
JPEG_QUALITY = 85
HEAT_PERCENTILES = (1.0, 99.9)
"""Percentiles of all pictured maps' values mapped to the ends of the colormap."""

_REVIEW_CSS = """
.classes td a{font-weight:600}.note{color:#666;font-size:13px}
.card.borderline{border-color:#f0ad4e}.card.nopic{padding:8px}
.badge.contaminant{background:#8e44ad}.badge.normal{background:#6c757d}.badge.unknown{background:#bbb}
.path{font-family:ui-monospace,monospace;font-size:12px}
table.classes,table.scores{display:block;overflow-x:auto;max-width:100%}svg.histogram{max-width:100%;height:auto}
"""


@dataclass(frozen=True)
class _Class:
    """One class's rows (indices into ``rows``), ranked most suspicious first."""

    name: str
    anchor: str
    ranked: list[int]
    rejected: list[int]
    kept: list[int]
    cut: Mapping


@dataclass(frozen=True)
class GalleryLimits:
    """How many images each class pictures: `gallery_size` rejected ones (most suspicious first)
    and `borderline` kept ones (those with the highest eta first)."""

    gallery_size: int = 24
    borderline: int = 8


def write_review(out_dir: Path, *, title: str, rows: Sequence[Mapping], cuts: Mapping[str, Mapping],
                 picture: Picture | None, limits: GalleryLimits = GalleryLimits(),
                 metrics_rows: Sequence[Mapping] = (), settings: Mapping = {}) -> Path:
    """Write ``out_dir/report.html``, the page a user reads to decide whether to trust the cleaning.

    Args:
        out_dir: folder of the page (created if missing); nothing else is written there.
        title: page title (plain text).
        rows: one dict per training image, in input order: ``path`` (relative to the image
            folder), ``class``, ``eta`` (final score, finite, higher = more suspicious), ``kept``
            (bool), ``rank_in_class`` (1 = most suspicious), optional ``memory_score``, optional
            ``label`` (0 normal, 1 contaminant, None unknown).
        cuts: class -> ``{"tau": float, "rule": str, "kept": int, "size": int}``; tau is the cut
            on eta (kept iff eta < tau). A class missing here is shown without a cut. Optional:
            ``"used"``, ``{"rule": str, "why": str}``, the rule the class actually used (the mixture
            falls back to mad on some classes), and ``"engine"``, ``{"engine": str, "reason": str,
            "projected_exact_s": float, "over_bound": bool}``, the class's Step-1 engine (the scores
            artifact's ``engines``); "not recorded" when absent.
        picture: ``picture(i)`` for row i returns (image uint8 (H, W, 3), heat float32 (H, W)
            anomaly map, mask bool (H, W) or None; any other resolution is resized bilinearly,
            nearest for the mask); called once per pictured row, in page order. None: the
            galleries list paths and scores only.
        limits: most rejected and most kept (borderline) images pictured per class.
        metrics_rows: table shown when any row has a label (e.g. per-class precision/recall).
        settings: run settings shown as a key/value table (values JSON-encoded).

    Returns:
        The path of ``report.html``.

    Raises:
        ValueError: a row lacks a key, its eta is not finite, or a limit is negative.
    """
    rows = list(rows)
    gallery_size, borderline = limits.gallery_size, limits.borderline
    _check(rows, gallery_size, borderline)
    classes = _classes(rows, cuts)
    pictured = [i for c in classes for i in c.rejected[:gallery_size] + c.kept[:borderline]]
    uris = _picture_uris(rows, pictured, picture) if picture is not None else {}
    labelled = any(r.get("label") is not None for r in rows)
    body = [_summary(rows, classes, labelled)]
    if labelled:
        body.append(_metrics(metrics_rows))
    body += [_class_section(rows, c, uris, gallery_size, borderline, labelled, picture is not None)
             for c in classes]
    if settings:
        body.append(f'<section id="settings"><h2>Settings</h2>{html_table(settings_rows(settings), "settings")}'
                    f"</section>")
    path = Path(out_dir) / "report.html"
    write_text_atomic(path, html_page(title, body, extra_css=_REVIEW_CSS))
    return path


# ------------------------------------------------------------------------------------- inputs

_REQUIRED = ("path", "class", "eta", "kept", "rank_in_class")


def _check(rows: list[Mapping], gallery_size: int, borderline: int) -> None:
    if gallery_size < 0 or borderline < 0:
        raise ValueError(f"gallery_size and borderline must be 0 or more, not {gallery_size} and {borderline}")
    for i, row in enumerate(rows):
        missing = [key for key in _REQUIRED if key not in row]
        if missing:
            raise ValueError(f"row {i} ({row.get('path', '?')}) lacks {', '.join(missing)}")
        if not math.isfinite(float(row["eta"])):
            raise ValueError(f"row {i} ({row['path']}): eta must be finite, not {row['eta']}")


def _anchors(names: Sequence[str]) -> list[str]:
    """Distinct HTML ids ``class-<name>`` made of letters, digits, ``_`` and ``-`` only."""
    anchors: list[str] = []
    for index, name in enumerate(names):
        anchor = "class-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or str(index))
        while anchor in anchors:
            anchor += f"-{index}"
        anchors.append(anchor)
    return anchors


def _classes(rows: list[Mapping], cuts: Mapping[str, Mapping]) -> list[_Class]:
    """Classes in sorted order; each ranks its rows by eta descending (ties: rank_in_class, input order)."""
    names = sorted({str(r["class"]) for r in rows})
    out = []
    for name, anchor in zip(names, _anchors(names)):
        members = [i for i, r in enumerate(rows) if str(r["class"]) == name]
        ranked = sorted(members, key=lambda i: (-float(rows[i]["eta"]), rows[i]["rank_in_class"], i))
        out.append(_Class(name=name, anchor=anchor, ranked=ranked,
                          rejected=[i for i in ranked if not rows[i]["kept"]],
                          kept=[i for i in ranked if rows[i]["kept"]], cut=cuts.get(name, {})))
    return out


def _tau(cls: _Class) -> float | None:
    tau = cls.cut.get("tau")
    return float(tau) if tau is not None and math.isfinite(float(tau)) else None


# ----------------------------------------------------------------------------------- pictures

def _shrunk(image: np.ndarray, heat: np.ndarray, mask: np.ndarray | None) -> tuple:
    """The picture at panel size: image uint8 (PANEL_HEIGHT, w, 3), heat float32 and mask bool (PANEL_HEIGHT, w)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"picture(i) must return a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"picture(i) must return a (H, W) anomaly map, got shape {heat.shape}")
    size = (max(1, round(image.shape[1] * PANEL_HEIGHT / image.shape[0])), PANEL_HEIGHT)
    small_image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    small_heat = np.asarray(Image.fromarray(heat).resize(size, Image.Resampling.BILINEAR))
    small_mask = None
    if mask is not None:
        small_mask = np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize(
            size, Image.Resampling.NEAREST)) > 127
    return small_image, small_heat, small_mask


def _heat_range(heats: Sequence[np.ndarray]) -> tuple[float, float]:
    """(lo, hi) = HEAT_PERCENTILES of every finite value of ``heats`` together; (0, 1) when none."""
    values = np.concatenate([h.ravel() for h in heats]) if heats else np.zeros(0, dtype=np.float32)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, HEAT_PERCENTILES)
    return float(lo), float(hi)


def _picture_uris(rows: list[Mapping], indices: Sequence[int], picture: Picture) -> dict[int, str]:
    """Row index -> JPEG data URI of its triptych, every map coloured on one shared heat range."""
    shrunk = {i: _shrunk(*picture(i)) for i in dict.fromkeys(indices)}
    heat_range = _heat_range([heat for _, heat, _ in shrunk.values()])
    uris = {}
    for i, (image, heat, mask) in shrunk.items():
        row = rows[i]
        canvas = render_overlay(image, heat, mask, heat_range=heat_range, panel_height=PANEL_HEIGHT,
                                caption=f"#{row['rank_in_class']} {row['class']}/{row['path']}  eta {row['eta']:.4g}")
        uris[i] = picture_data_uri(canvas, format="JPEG", quality=JPEG_QUALITY)
    return uris


# ------------------------------------------------------------------------------------ summary

def _count(n: int, singular: str, plural: str | None = None) -> str:
    """"1 image", "2 images"."""
    return f"{n} {singular if n == 1 else plural or singular + 's'}"


def _used(cls: _Class) -> str:
    """The rule the class actually used ("mad"), or its configured rule when that was not recorded."""
    used = cls.cut.get("used") or {}
    return str(used.get("rule") or cls.cut.get("rule", "no cut"))


def _why(cls: _Class) -> str:
    return str((cls.cut.get("used") or {}).get("why", ""))


def _engine(cls: _Class) -> str:
    """The class's Step-1 engine ("exact"), "not recorded" for runs made before it was."""
    engine = cls.cut.get("engine") or {}
    return str(engine.get("engine", "not recorded"))


def _engine_note(cls: _Class) -> str:
    """One sentence on the Step-1 engine: its reason, and the advice when the exact pass was projected long."""
    engine = cls.cut.get("engine") or {}
    if not engine:
        return "Step-1 engine: not recorded (a run made before engines were recorded)."
    text = f"Step-1 engine: {engine.get('engine')} ({engine.get('reason', '')})"
    if engine.get("over_bound"):
        text += (f"; its exact pass was projected at {float(engine.get('projected_exact_s', 0)) / 60:.0f} min, "
                 f"over the bound: --engine approx would be faster, with approximate scores")
    return text + "."


def _rule_note(cls: _Class) -> str:
    """Which rule the class used and why, e.g. "Cut: mad (12 images, fewer than ...)"."""
    configured = str(cls.cut.get("rule", "no cut"))
    why = _why(cls)
    text = f"Cut: {_used(cls)}" + (f" ({why})" if why else "")
    return text + (f"; the run asked for {configured}." if configured != _used(cls) else ".")


def _rules(classes: Sequence[_Class]) -> str:
    """The distinct cut rules, each with its classes when they differ: "mixture" or "mad (a), top 0.1 (b)"."""
    by_rule: dict[str, list[str]] = {}
    for c in classes:
        by_rule.setdefault(_used(c), []).append(c.name)
    if len(by_rule) == 1:
        return next(iter(by_rule))
    return "; ".join(f"{rule} ({', '.join(names)})" for rule, names in by_rule.items())


_LABEL_COUNTS = ("contaminants", "contaminants rejected", "normals rejected")


def _label_counts(rows: list[Mapping], members: Sequence[int]) -> tuple[int, int, int]:
    """The :data:`_LABEL_COUNTS` of the rows ``members``."""
    contaminants = [i for i in members if rows[i].get("label") == 1]
    normals = [i for i in members if rows[i].get("label") == 0]
    return (len(contaminants), sum(not rows[i]["kept"] for i in contaminants),
            sum(not rows[i]["kept"] for i in normals))


def _summary(rows: list[Mapping], classes: Sequence[_Class], labelled: bool) -> str:
    kept = sum(bool(r["kept"]) for r in rows)
    share = f" ({(len(rows) - kept) / len(rows):.1%})" if rows else ""
    lines = []
    for c in classes:
        tau = _tau(c)
        cells = [f'<td><a href="#{c.anchor}">{escape(c.name)}</a></td>', f'<td class="num">{len(c.ranked)}</td>',
                 f'<td class="num">{len(c.kept)}</td>', f'<td class="num">{len(c.rejected)}</td>',
                 f"<td title=\"{escape(_why(c))}\">{escape(_used(c))}</td>", f"<td>{escape(_engine(c))}</td>",
                 f'<td class="num">{"n/a" if tau is None else escape(f"{tau:.6g}")}</td>']
        if labelled:
            cells += [f'<td class="num">{v}</td>' for v in _label_counts(rows, c.ranked)]
        lines.append(f"<tr>{''.join(cells)}</tr>")
    heads = ["class", "images", "kept", "rejected", "rule", "Step-1 engine", "τ",
             *(_LABEL_COUNTS if labelled else ())]
    head = "".join(f"<th>{escape(h)}</th>" for h in heads)
    return (f'<section id="summary"><h2>Summary</h2><p class="summary">{_count(len(rows), "image")} '
            f"in {_count(len(classes), 'class', 'classes')}: <b>{kept} kept</b>, <b>{len(rows) - kept} rejected</b>"
            f"{share}. Rule: {escape(_rules(classes))}.</p>"
            f'<p class="note">η is the final selection score (higher = more suspicious); an image is kept '
            f"iff η &lt; τ, its class's cut. Check that the rejected images look defective and that the "
            f"borderline kept ones look normal.</p>"
            f'<p class="note">Which method: {escape(METHOD_ADVICE)}</p>'
            f'<table class="classes"><thead><tr>{head}</tr></thead><tbody>{"".join(lines)}</tbody></table>'
            f"</section>")


def _metrics(metrics_rows: Sequence[Mapping]) -> str:
    table = html_table(metrics_rows, "metrics") if metrics_rows else "<p>No metrics.</p>"
    return f'<section id="metrics"><h2>Metrics against the labels</h2>{table}</section>'


# ------------------------------------------------------------------------------------ gallery

def _label_badge(label) -> str:
    name = {0: "normal", 1: "contaminant"}.get(label, "unknown")
    return f' <span class="badge {name}">{"label unknown" if name == "unknown" else name}</span>'


def _card(rows: list[Mapping], i: int, role: str, uri: str | None, labelled: bool) -> str:
    """One pictured image: overlay (when there is one), status and label badges, rank, eta, path."""
    row = rows[i]
    status = "kept" if row["kept"] else "rejected"
    label = row.get("label")
    mark = {0: " normal", 1: " contaminant"}.get(label, "") if labelled else ""
    memory = row.get("memory_score")
    memory_text = "" if memory is None else f" · memory score {float(memory):.4g}"
    image = "" if uri is None else f'<img src="{uri}" alt="{escape(row["path"])}" loading="lazy">'
    return (f'<figure class="card {role} {status}{mark}{"" if uri else " nopic"}" data-row="{i}" '
            f'data-eta="{float(row["eta"])!r}" data-rank="{escape(row["rank_in_class"])}">{image}'
            f'<figcaption><span class="badge {status}">{status}</span>'
            f'{_label_badge(label) if labelled else ""} #{escape(row["rank_in_class"])} · '
            f'η {float(row["eta"]):.4g}{memory_text}<br><span class="path">{escape(row["path"])}</span>'
            f"</figcaption></figure>")


def _gallery(rows, indices: Sequence[int], role: str, uris: Mapping[int, str], labelled: bool) -> str:
    cards = "".join(_card(rows, i, role, uris.get(i), labelled) for i in indices)
    return f'<div class="gallery {role}">{cards}</div>'


def _shown(total: int, limit: int, what: str) -> str:
    return f"{what} ({total})" if total <= limit else f"{what}: {limit} of {total}, the full list is below"


def _scores_table(rows: list[Mapping], cls: _Class, labelled: bool) -> str:
    with_memory = any(rows[i].get("memory_score") is not None for i in cls.ranked)
    table = []
    for i in cls.ranked:
        row = rows[i]
        entry = {"rank": row["rank_in_class"], "path": row["path"], "η": f"{float(row['eta']):.6g}"}
        if with_memory:
            memory = row.get("memory_score")
            entry["memory score"] = None if memory is None else f"{float(memory):.6g}"
        entry["status"] = "kept" if row["kept"] else "rejected"
        if labelled:
            entry["label"] = {0: "normal", 1: "contaminant"}.get(row.get("label"))
        table.append(entry)
    return (f"<details><summary>All {_count(len(cls.ranked), 'image')} of {escape(cls.name)}, "
            f"most suspicious first"
            f"</summary>{html_table(table, 'scores')}</details>")


def _class_section(rows: list[Mapping], cls: _Class, uris: Mapping[int, str], gallery_size: int,
                   borderline: int, labelled: bool, pictures: bool) -> str:
    tau = _tau(cls)
    eta = np.array([float(rows[i]["eta"]) for i in cls.ranked])
    kept_mask = np.array([bool(rows[i]["kept"]) for i in cls.ranked], dtype=bool)
    rejected, kept = cls.rejected[:gallery_size], cls.kept[:borderline]
    note = "" if pictures else '<p class="note">No pictures: paths and scores only.</p>'
    parts = [f'<section id="{cls.anchor}" class="class"><h2>{escape(cls.name)}</h2>',
             f'<p class="counts">{_count(len(cls.ranked), "image")}: <b>{len(cls.kept)} kept</b>, '
             f'<b>{len(cls.rejected)} rejected</b>; rule {escape(_used(cls))}, '
             f'τ = {"n/a" if tau is None else escape(f"{tau:.6g}")}.</p>',
             f'<p class="note rule">{escape(_rule_note(cls))}</p>',
             f'<p class="note engine">{escape(_engine_note(cls))}</p>',
             f"<figure>{histogram_svg(eta[kept_mask], eta[~kept_mask], tau)}</figure>", note,
             f"<h3>{escape(_shown(len(cls.rejected), gallery_size, 'Rejected, most suspicious first'))}</h3>",
             _gallery(rows, rejected, "rejected", uris, labelled) if rejected else "<p>None rejected.</p>",
             f"<h3>{escape(_shown(len(cls.kept), borderline, 'Borderline kept, nearest the cut first'))}</h3>",
             _gallery(rows, kept, "borderline", uris, labelled) if kept else "<p>None kept.</p>",
             _scores_table(rows, cls, labelled), "</section>"]
    return "".join(parts)
