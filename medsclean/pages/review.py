"""The review page of `medsclean select`: what was rejected, what was nearly rejected, and why.

One self-contained ``report.html`` (no external resource, nothing fetched; one small inline
script), with or without labels: a summary of the counts and cut rules, then one section per
class with a histogram of the final score η and the cut τ, the rejected images (most suspicious
first) and the kept images nearest the cut ("borderline kept"), pictured with their anomaly maps
(``pages.gallery``: a click enlarges a picture, a link opens the file); then boxes of the rejected
and borderline paths to copy into ``--keep`` / ``--reject`` files, the full list of images with
thumbnails, sortable and filterable (``pages.image_list``), and every setting of the run. With
labels, the page also shows the metrics table and marks every pictured image contaminant or normal.

An image is kept iff η < τ (strict), unless the user decided otherwise (a badge says so). Every
path, class name and setting is escaped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsclean.presets import METHOD_ADVICE
from medsclean.pages.gallery import PANEL_HEIGHT, Picture, gallery, picture_uris, thumbnail_uris
from medsclean.pages.histogram import histogram_svg
from medsclean.pages.image_list import image_list, list_link
from medsclean.pages.report import escape, html_page, html_table, settings_rows
from medsclean.pages.review_assets import REVIEW_CSS, REVIEW_SCRIPT
from medsclean.workdir.atomic import write_text_atomic

__all__ = ["GalleryLimits", "Picture", "PANEL_HEIGHT", "write_review"]


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
    and `borderline` kept ones (those with the highest η first); and how many images of the full
    list get a thumbnail (`thumbnails`, the most suspicious of every class first)."""

    gallery_size: int = 24
    borderline: int = 8
    thumbnails: int = 5000


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
            ``label`` (0 normal, 1 contaminant, None unknown), optional ``file`` (the original
            file: the "open file" link and the list's thumbnail), optional ``user_path`` (the path
            as the lists write it, for the boxes of paths to copy; ``path`` without it), optional
            ``decision`` ("auto", the default, "kept by user" or "rejected by user": a badge).
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
        limits: most rejected and most kept (borderline) images pictured per class, most thumbnails.
        metrics_rows: table shown when any row has a label (e.g. per-class precision/recall).
        settings: run settings shown as a table, values JSON-encoded; a value that is a mapping is
            a group (e.g. one per stage: ``{"distill": {"--distill-iters": 300, ...}}``).

    Returns:
        The path of ``report.html``.

    Raises:
        ValueError: a row lacks a key, its eta is not finite, or a limit is negative.
    """
    rows = list(rows)
    gallery_size, borderline = limits.gallery_size, limits.borderline
    _check(rows, limits)
    classes = _classes(rows, cuts)
    pictured = [i for c in classes for i in c.rejected[:gallery_size] + c.kept[:borderline]]
    uris = picture_uris(rows, pictured, picture) if picture is not None else {}
    labelled = any(r.get("label") is not None for r in rows)
    body = [_summary(rows, classes, labelled)]
    if labelled:
        body.append(_metrics(metrics_rows))
    body += [_class_section(rows, c, uris, limits, labelled, picture is not None) for c in classes]
    body.append(_copy_boxes(rows, classes, borderline))
    body.append(image_list(rows, [i for c in classes for i in c.ranked], [c.name for c in classes],
                           thumbnail_uris(rows, limits.thumbnails), labelled))
    if settings:
        body.append(_settings(settings))
    body.append(f"<script>{REVIEW_SCRIPT}</script>")
    path = Path(out_dir) / "report.html"
    write_text_atomic(path, html_page(title, body, extra_css=REVIEW_CSS))
    return path


# ------------------------------------------------------------------------------------- inputs

_REQUIRED = ("path", "class", "eta", "kept", "rank_in_class")


def _check(rows: list[Mapping], limits: GalleryLimits) -> None:
    if min(limits.gallery_size, limits.borderline, limits.thumbnails) < 0:
        raise ValueError(f"gallery_size, borderline and thumbnails must be 0 or more, not {limits.gallery_size}, "
                         f"{limits.borderline} and {limits.thumbnails}")
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


# --------------------------------------------------------------------------------- per class

def _shown(total: int, limit: int, what: str) -> str:
    return f"{what} ({total})" if total <= limit else f"{what}: {limit} of {total}, the full list is below"


def _class_section(rows: list[Mapping], cls: _Class, uris: Mapping[int, str], limits: GalleryLimits,
                   labelled: bool, pictures: bool) -> str:
    tau = _tau(cls)
    eta = np.array([float(rows[i]["eta"]) for i in cls.ranked])
    kept_mask = np.array([bool(rows[i]["kept"]) for i in cls.ranked], dtype=bool)
    rejected, kept = cls.rejected[:limits.gallery_size], cls.kept[:limits.borderline]
    note = ('<p class="note">Click a picture to enlarge it (the arrow keys step through them); "open file" '
            'opens the original.</p>' if pictures else '<p class="note">No pictures: paths and scores only.</p>')
    parts = [f'<section id="{cls.anchor}" class="class"><h2>{escape(cls.name)}</h2>',
             f'<p class="counts">{_count(len(cls.ranked), "image")}: <b>{len(cls.kept)} kept</b>, '
             f'<b>{len(cls.rejected)} rejected</b>; rule {escape(_used(cls))}, '
             f'τ = {"n/a" if tau is None else escape(f"{tau:.6g}")}.</p>',
             f'<p class="note rule">{escape(_rule_note(cls))}</p>',
             f'<p class="note engine">{escape(_engine_note(cls))}</p>',
             f"<figure>{histogram_svg(eta[kept_mask], eta[~kept_mask], tau)}</figure>", note,
             f"<h3>{escape(_shown(len(cls.rejected), limits.gallery_size, 'Rejected, most suspicious first'))}</h3>",
             gallery(rows, rejected, "rejected", uris, labelled) if rejected else "<p>None rejected.</p>",
             f"<h3>{escape(_shown(len(cls.kept), limits.borderline, 'Borderline kept, nearest the cut first'))}</h3>",
             gallery(rows, kept, "borderline", uris, labelled) if kept else "<p>None kept.</p>",
             f'<p class="more"><a href="{escape(list_link(cls.name))}">All {_count(len(cls.ranked), "image")} of '
             f"{escape(cls.name)} in the full list</a></p></section>"]
    return "".join(parts)


# ------------------------------------------------------------------------- paths to copy, settings

def _paths_box(name: str, heading: str, advice: str, paths: Sequence[str]) -> str:
    if not paths:
        return f"<h3>{escape(heading)} (0)</h3><p>None.</p>"
    text = "".join(f"{p}\n" for p in paths)
    return (f"<h3>{escape(heading)} ({len(paths)})</h3><p class=\"note\">{escape(advice)}</p>"
            f'<textarea id="paths-{name}" rows="{min(10, len(paths) + 1)}" readonly spellcheck="false">'
            f'{escape(text)}</textarea><button type="button" data-copy="paths-{name}">Copy these paths</button>')


def _copy_boxes(rows: list[Mapping], classes: Sequence[_Class], borderline: int) -> str:
    """The rejected and the borderline kept images' paths, one per line as the lists write them."""
    def user(i: int) -> str:
        return str(rows[i].get("user_path") or rows[i]["path"])
    rejected = [user(i) for c in classes for i in c.rejected]
    near = [user(i) for c in classes for i in c.kept[:borderline]]
    return ('<section id="copy" class="copy"><h2>Correct the cut</h2><p class="note">Paths as the clean list '
            "writes them, one per line, most suspicious first: paste them into a file, keep the lines you "
            "mean, and pass it to <code>medsclean cut</code> (or <code>select</code>).</p>"
            + _paths_box("rejected", "Rejected", "Keep the lines of the images that look normal and pass the "
                         "file as --keep FILE: they go back into the clean list.", rejected)
            + _paths_box("borderline", "Borderline kept", "Keep the lines of the images that look defective "
                         "and pass the file as --reject FILE: they leave the clean list.", near)
            + "</section>")


def _settings(settings: Mapping) -> str:
    """The settings table: one row per setting; a group (a mapping value) names its stage in a first column."""
    if not any(isinstance(v, Mapping) for v in settings.values()):
        return f'<section id="settings"><h2>Settings</h2>{html_table(settings_rows(settings), "settings")}</section>'
    else:
        table = html_table([{"stage": group if isinstance(values, Mapping) else "", **line}
                            for group, values in settings.items()
                            for line in settings_rows(values if isinstance(values, Mapping) else {group: values})],
                           "settings")
    return (f'<section id="settings"><h2>Settings</h2><p class="note">Every option of the run, by stage, as '
            f"its results recorded it; an option is named by its command-line flag where it has one.</p>"
            f"{table}</section>")
