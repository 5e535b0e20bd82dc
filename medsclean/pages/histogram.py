"""The review page's histogram of the final score eta per class: kept and rejected images stacked,
the cut tau drawn as a dashed line (an inline SVG, no script)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from medsclean.pages.report import escape

HISTOGRAM_BINS = 30

_SVG_WIDTH, _SVG_HEIGHT = 560, 200
_PLOT_LEFT, _PLOT_RIGHT, _PLOT_TOP, _PLOT_BOTTOM = 44, 12, 24, 30
_PLOT_W = _SVG_WIDTH - _PLOT_LEFT - _PLOT_RIGHT
_PLOT_H = _SVG_HEIGHT - _PLOT_TOP - _PLOT_BOTTOM
_KEPT_COLOUR, _REJECTED_COLOUR, _CUT_COLOUR = "#5cb85c", "#d9534f", "#c00"


def _bin_edges(values: np.ndarray, tau: float | None, bins: int) -> np.ndarray:
    """Equal-width bin edges (float64, >= 2) covering ``values`` and ``tau`` with a margin; tau is an edge.

    Values all equal (or within 1e-9 of each other, relatively) get a span of 10 % of their
    magnitude (1 when that is 0), so a class of one image still gets a readable axis.
    """
    points = values if tau is None else np.append(values, tau)
    lo, hi = float(points.min()), float(points.max())
    span = hi - lo
    if span <= 1e-9 * max(abs(lo), abs(hi)):
        span = 0.1 * max(abs(lo), abs(hi)) or 1.0
        lo, hi = (lo + hi) / 2 - span / 2, (lo + hi) / 2 + span / 2
    width = span * 1.1 / bins
    anchor = lo - 0.05 * span if tau is None else tau
    first = math.floor((lo - 0.05 * span - anchor) / width)
    last = max(math.ceil((hi + 0.05 * span - anchor) / width), first + 1)
    return anchor + width * np.arange(first, last + 1, dtype=np.float64)


def _svg_text(x: float, y: float, text: str, anchor: str = "start", colour: str = "#222") -> str:
    return (f'<text x="{x:.2f}" y="{y:.2f}" font-size="11" fill="{colour}" text-anchor="{anchor}" '
            f'stroke="#fff" stroke-width="3" paint-order="stroke">'
            f"{escape(text)}</text>")


def _bars(edges: np.ndarray, counts: Sequence[tuple[str, np.ndarray, str]], x_of: Callable[[float], float],
          peak: int) -> list[str]:
    """Stacked ``rect.bar.<name>`` elements, one per non-empty bin and series, each titled with its count."""
    parts, base = [], np.zeros(len(edges) - 1)
    for name, count, colour in counts:
        for b in np.flatnonzero(count):
            x0, x1 = x_of(edges[b]), x_of(edges[b + 1])
            y = _PLOT_TOP + _PLOT_H - (base[b] + count[b]) / peak * _PLOT_H
            parts.append(f'<rect class="bar {name}" x="{x0:.2f}" y="{y:.2f}" width="{x1 - x0:.2f}" '
                         f'height="{count[b] / peak * _PLOT_H:.2f}" fill="{colour}"><title>{count[b]} {name}, '
                         f"η in [{edges[b]:.4g}, {edges[b + 1]:.4g})</title></rect>")
        base += count
    return parts


def _cut_line(x: float, tau: float) -> str:
    """The dashed ``line.cut`` at pixel x, labelled with tau on the side with room."""
    left = x > _PLOT_LEFT + 0.8 * _PLOT_W
    return (f'<line class="cut" x1="{x:.2f}" y1="{_PLOT_TOP}" x2="{x:.2f}" y2="{_PLOT_TOP + _PLOT_H}" '
            f'stroke="{_CUT_COLOUR}" stroke-width="1.5" stroke-dasharray="4 3"/>'
            + _svg_text(x - 3 if left else x + 3, _PLOT_TOP + 11, f"τ = {tau:.4g}", "end" if left else "start",
                        _CUT_COLOUR))


def histogram_svg(kept: np.ndarray, rejected: np.ndarray, tau: float | None) -> str:
    """Stacked histogram of eta (kept below, rejected on top) with the cut drawn at tau.

    The x axis is linear from ``data-lo`` to ``data-hi`` (eta units, on the ``<svg>``) across the
    ``rect.plot`` frame; bins have a shared edge at tau, so no bar straddles the cut.
    """
    edges = _bin_edges(np.concatenate([kept, rejected]), tau, HISTOGRAM_BINS)
    series = [("kept", np.histogram(kept, bins=edges)[0], _KEPT_COLOUR),
              ("rejected", np.histogram(rejected, bins=edges)[0], _REJECTED_COLOUR)]
    lo, hi = float(edges[0]), float(edges[-1])
    peak = max(1, int((series[0][1] + series[1][1]).max()))

    def x_of(value: float) -> float:
        return _PLOT_LEFT + (value - lo) / (hi - lo) * _PLOT_W

    bottom = _SVG_HEIGHT - 10
    parts = [f'<svg class="histogram" width="{_SVG_WIDTH}" height="{_SVG_HEIGHT}" '
             f'viewBox="0 0 {_SVG_WIDTH} {_SVG_HEIGHT}" role="img" data-lo="{lo!r}" data-hi="{hi!r}">',
             f'<rect class="plot" x="{_PLOT_LEFT}" y="{_PLOT_TOP}" width="{_PLOT_W}" height="{_PLOT_H}" '
             f'fill="none" stroke="#ccc"/>', *_bars(edges, series, x_of, peak),
             _svg_text(_PLOT_LEFT, bottom, f"{lo:.4g}"), _svg_text(_PLOT_LEFT + _PLOT_W, bottom, f"{hi:.4g}", "end"),
             _svg_text(_PLOT_LEFT + _PLOT_W / 2, bottom, "η", "middle"),
             _svg_text(_PLOT_LEFT - 4, _PLOT_TOP + 9, str(peak), "end"),
             _svg_text(_PLOT_LEFT - 4, _PLOT_TOP + _PLOT_H, "0", "end")]
    legend = (("kept", kept, _KEPT_COLOUR), ("rejected", rejected, _REJECTED_COLOUR))
    for i, (name, values, colour) in enumerate(legend):
        parts += [f'<rect x="{_PLOT_LEFT + 8 + i * 120}" y="6" width="10" height="10" fill="{colour}"/>',
                  _svg_text(_PLOT_LEFT + 22 + i * 120, 15, f"{name} ({len(values)})")]
    if tau is not None:
        parts.append(_cut_line(x_of(tau), tau))
    return "".join(parts) + "</svg>"
