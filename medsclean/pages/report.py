"""One self-contained HTML report of a run (`eval --report`), and the HTML helpers the pages share.

Pillow and numpy only. The HTML report has no external resource and no script: images are inline
base64 PNGs, the histograms are inline SVG, the style sheet is inline, so the single file can be
mailed or archived. Every user-supplied string (paths, class names, setting values) is escaped.
The anomaly-map pictures are drawn by `pages.overlay` (re-exported here).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medsclean.errors import DataError
from medsclean.pages.overlay import colormap_lut, overlay_png, picture_data_uri, render_overlay
from medsclean.workdir.atomic import write_bytes_atomic

__all__ = ["colormap_lut", "render_overlay", "overlay_png", "picture_data_uri", "write_html_report",
           "escape", "html_table", "html_page", "settings_rows", "PAGE_CSS"]

# ------------------------------------------------------------------------------ HTML: helpers

PAGE_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;padding:0 16px;color:#222}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}th{background:#f4f4f4}
td.num{text-align:right}td.undefined{color:#999}
.summary{color:#555}.histograms{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0}figcaption{font-size:12px;color:#444;word-break:break-all}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:14px}
.card{border:1px solid #ddd;border-radius:6px;padding:6px}.card img{width:100%;height:auto}
.card.rejected{border-color:#d9534f}.card.kept{border-color:#5cb85c}
.badge{display:inline-block;padding:0 6px;border-radius:8px;font-size:11px;color:#fff}
.badge.rejected{background:#d9534f}.badge.kept{background:#5cb85c}
""".strip()

_SERIES_COLOURS = ("#3b7dd8", "#e4572e", "#8a8a8a")


def escape(value) -> str:
    """``str(value)`` escaped for HTML text and quoted attribute values (``<>&"'``)."""
    return html.escape(str(value), quote=True)




def _format_cell(value) -> tuple[str, str]:
    """(css class, escaped text) of one table cell."""
    if value is None:
        return "", ""
    if isinstance(value, bool):
        return "", escape(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        if isinstance(value, (float, np.floating)) and math.isnan(value):
            return "num undefined", "n/a"
        text = f"{value:.4f}" if isinstance(value, (float, np.floating)) else str(value)
        return "num", escape(text)
    return "", escape(value)


def html_table(rows: Sequence[Mapping], css_class: str) -> str:
    """A ``<table class=css_class>``: columns are the union of the rows' keys in order of appearance.

    Floats show with 4 decimals (NaN as "n/a"), numbers right-aligned, None as an empty cell;
    every key and value is escaped.
    """
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = (_format_cell(row.get(c)) for c in columns)
        body.append("<tr>" + "".join(f'<td class="{k}">{t}</td>' if k else f"<td>{t}</td>"
                                     for k, t in cells) + "</tr>")
    return (f'<table class="{css_class}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def _score(row: Mapping) -> float:
    value = row.get("score")
    return float(value) if value is not None and not math.isnan(float(value)) else -math.inf


def _status(row: Mapping) -> str:
    kept = row.get("kept")
    return "" if kept is None else ("kept" if kept else "rejected")


# -------------------------------------------------------------------------- HTML: histograms

def _series(rows: Sequence[Mapping]) -> list[tuple[str, np.ndarray]]:
    """Scores split by selection (kept/rejected), else by label (good/defect), else one series."""
    if any(r.get("kept") is not None for r in rows):
        groups = [("kept", lambda r: r.get("kept") is not None and bool(r["kept"])),
                  ("rejected", lambda r: r.get("kept") is not None and not bool(r["kept"]))]
    elif any(r.get("label") is not None for r in rows):
        groups = [("good", lambda r: r.get("label") == 0), ("defect", lambda r: r.get("label") == 1)]
    else:
        groups = [("all", lambda r: True)]
    return [(name, np.array([_score(r) for r in rows if member(r) and _score(r) > -math.inf]))
            for name, member in groups]


def _histogram_svg(series: list[tuple[str, np.ndarray]], thresholds: list[float], bins: int) -> str:
    width, height, left, bottom, top = 460, 190, 40, 28, 22
    values = np.concatenate([v for _, v in series] + [np.asarray(thresholds, dtype=np.float64)])
    if values.size == 0:
        return f'<svg width="{width}" height="{height}" role="img"><text x="10" y="20">no scores</text></svg>'
    lo, hi = float(values.min()), float(values.max())
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts = [np.histogram(v, bins=edges)[0] for _, v in series]
    peak = max(1, max(int(c.max()) for c in counts))
    plot_w, plot_h = width - left - 10, height - bottom - top
    parts = [f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#444"/>',
             f'<text x="{left}" y="{height - 8}" font-size="11">{lo:.4g}</text>',
             f'<text x="{left + plot_w}" y="{height - 8}" font-size="11" text-anchor="end">{hi:.4g}</text>',
             f'<text x="{left - 4}" y="{top + 4}" font-size="11" text-anchor="end">{peak}</text>']
    bar_w = plot_w / bins
    for (name, _), count, colour in zip(series, counts, _SERIES_COLOURS):
        for b, c in enumerate(count):
            if c:
                h = c / peak * plot_h
                parts.append(f'<rect x="{left + b * bar_w:.1f}" y="{top + plot_h - h:.1f}" '
                             f'width="{bar_w:.1f}" height="{h:.1f}" fill="{colour}" fill-opacity="0.55"/>')
    for i, ((name, v), colour) in enumerate(zip(series, _SERIES_COLOURS)):
        parts.append(f'<rect x="{left + 8 + i * 110}" y="6" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{left + 22 + i * 110}" y="15" font-size="11">{escape(name)} ({len(v)})</text>')
    for t in thresholds:
        x = left + (t - lo) / (hi - lo) * plot_w
        parts.append(f'<line class="threshold" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" '
                     f'stroke="#c00" stroke-dasharray="4 3"/><text x="{x + 3:.1f}" y="{top + 10}" '
                     f'font-size="11" fill="#c00">τ={t:.4g}</text>')
    return "".join(parts) + "</svg>"


def _histograms(rows: Sequence[Mapping], threshold, bins: int) -> str:
    classes = sorted({str(r.get("class", "")) for r in rows})
    per_class = len(classes) > 1 or isinstance(threshold, Mapping)
    groups = [(c, [r for r in rows if str(r.get("class", "")) == c]) for c in classes] if per_class \
        else [("all images", list(rows))]
    figures = []
    for name, members in groups:
        if isinstance(threshold, Mapping):
            lines = [float(threshold[name])] if name in threshold else []
        else:
            lines = [] if threshold is None else [float(threshold)]
        figures.append(f"<figure>{_histogram_svg(_series(members), lines, bins)}"
                       f"<figcaption>{escape(name)}</figcaption></figure>")
    return f'<div class="histograms">{"".join(figures)}</div>'


# ---------------------------------------------------------------------------- HTML: gallery

def _data_uri(path: Path) -> str:
    mime = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}.get(
        path.suffix.lower(), "image/png")
    try:
        payload = base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError as exc:
        raise DataError(f"{path}: cannot read overlay picture ({exc.strerror}); write it with "
                        f"overlay_png first or pass overlay_png=None") from exc
    return f"data:{mime};base64,{payload}"


def _gallery(out_dir: Path, ranked: Sequence[Mapping], limit: int) -> str:
    cards = []
    for row in [r for r in ranked if r.get("overlay_png")][:limit]:
        picture = Path(row["overlay_png"])
        picture = picture if picture.is_absolute() else out_dir / picture
        status = _status(row)
        badge = f' <span class="badge {status}">{status}</span>' if status else ""
        label = "" if row.get("label") is None else f" · label {escape(row['label'])}"
        score = _format_cell(row.get("score"))[1]
        cards.append(f'<figure class="card {status}"><img src="{_data_uri(picture)}" '
                     f'alt="{escape(row.get("path", ""))}"><figcaption>{escape(row.get("class", ""))} · '
                     f'score {score}{label}{badge}<br>{escape(row.get("path", ""))}</figcaption></figure>')
    if not cards:
        return "<p>No overlay pictures were produced.</p>"
    return f'<div class="gallery">{"".join(cards)}</div>'


def _summary(rows: Sequence[Mapping]) -> str:
    statuses = [_status(r) for r in rows]
    classes = sorted({str(r.get("class", "")) for r in rows})
    parts = [f"{len(rows)} images", f"{len(classes)} class{'es' if len(classes) != 1 else ''}"]
    if any(statuses):
        parts += [f"{statuses.count('kept')} kept", f"{statuses.count('rejected')} rejected"]
    return f'<p class="summary">{escape(", ".join(parts))}; scores: higher = more anomalous.</p>'


def settings_rows(settings: Mapping) -> list[dict]:
    """``{"setting", "value"}`` rows of a settings table; non-string values JSON-encoded."""
    def show(value):
        return value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return [{"setting": key, "value": show(value)} for key, value in settings.items()]


def html_page(title: str, body: Sequence[str], *, extra_css: str = "") -> str:
    """A whole HTML document: inline style sheet, escaped ``title`` as <title> and <h1>, then ``body``.

    Args:
        title: plain text (escaped here).
        body: HTML fragments, already escaped, joined by newlines.
        extra_css: rules appended to :data:`PAGE_CSS`.
    """
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title><style>{PAGE_CSS}{extra_css}</style></head><body>",
        f"<h1>{escape(title)}</h1>", *body, "</body></html>", ""])


def write_html_report(out_dir: str | Path, *, title: str, metrics_rows: Sequence[Mapping],
                      score_rows: Sequence[Mapping], threshold: float | Mapping[str, float] | None,
                      settings: Mapping, gallery_limit: int = 48, bins: int = 30) -> Path:
    """Write ``out_dir/report.html``: one self-contained page (no script, no external resource).

    Sections: a summary line; the metrics table; score histograms (per class when there are
    several classes or per-class thresholds; kept vs rejected, else good vs defect, else all) with
    the threshold line(s); a gallery of overlay pictures ranked by score (most suspicious first);
    a collapsible table of all scores; the protocol settings.

    Args:
        out_dir: folder of the report (created if missing).
        title: page title.
        metrics_rows: table rows, e.g. ``{"class": "bottle", "image_auroc": 0.99, ...}``; columns
            are the union of the keys in order of appearance; NaN shows as "n/a".
        score_rows: one dict per image with keys ``path``, ``class``, ``score`` (higher = more
            anomalous), ``kept`` (bool or None), ``label`` (0/1 or None) and ``overlay_png``
            (a picture file, relative paths being relative to ``out_dir``, or None).
        threshold: one threshold, one per class, or None.
        settings: protocol settings shown as a key/value table (values JSON-encoded).
        gallery_limit: most overlay pictures embedded.
        bins: histogram bins.

    Returns:
        The path of the report.

    Raises:
        DataError: an overlay picture named in ``score_rows`` cannot be read.
    """
    out_dir = Path(out_dir)
    ranked = sorted(score_rows, key=_score, reverse=True)
    score_table = [{"rank": i + 1, "path": r.get("path"), "class": r.get("class"), "score": r.get("score"),
                    "status": _status(r) or None, "label": r.get("label")} for i, r in enumerate(ranked)]
    page = html_page(title, [
        _summary(score_rows),
        '<section id="metrics"><h2>Metrics</h2>',
        html_table(metrics_rows, "metrics") if metrics_rows else "<p>No metrics.</p>", "</section>",
        '<section id="histograms"><h2>Score distribution</h2>', _histograms(score_rows, threshold, bins),
        "</section>", '<section id="gallery"><h2>Most suspicious images</h2>',
        _gallery(out_dir, ranked, gallery_limit), "</section>",
        f'<section id="scores"><h2>All scores</h2><details><summary>{len(ranked)} images, most '
        f'suspicious first</summary>{html_table(score_table, "scores")}</details></section>',
        '<section id="settings"><h2>Protocol settings</h2>',
        html_table(settings_rows(settings), "settings"), "</section>"])
    path = out_dir / "report.html"
    write_bytes_atomic(path, page.encode("utf-8"))
    return path
