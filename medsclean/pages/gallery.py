"""The review page's pictures: one card per pictured image, and the thumbnails of the full list.

A card shows the image | its anomaly map over it (| the ground truth, when the page has masks),
every map coloured on one heat range so that colours compare across the page, with one caption:
the image's path in the folder and ``η = 0.1234 (#3 in bottle)``, burned under the panels and
written under the card in the same words. Panels are embedded at the evaluation size, so the
page's lightbox (``pages.review_assets``) enlarges them; a card links the original file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from medsclean.errors import DataError
from medsclean.pages.overlay import OverlayStyle, draw_overlay, picture_data_uri
from medsclean.pages.report import escape
from medsclean.workdir.images import decode_image

__all__ = ["PANEL_HEIGHT", "THUMB_HEIGHT", "Picture", "picture_uris", "thumbnail_uris", "caption", "card",
           "gallery", "status", "decision", "decision_badge", "file_link"]

Picture = Callable[[int], tuple[np.ndarray, np.ndarray, "np.ndarray | None"]]
"""picture(i) -> (image uint8 (H, W, 3), heat float32 (H, W) anomaly map, mask bool (H, W) or None).

heat and mask may have another resolution (e.g. the token grid): they are resized to the picture.
"""

PANEL_HEIGHT = 256
"""Height in pixels of each panel of a pictured image (the evaluation size; width follows the aspect ratio)."""
JPEG_QUALITY = 85
HEAT_PERCENTILES = (1.0, 99.9)
"""Percentiles of all pictured maps' values mapped to the ends of the colormap."""
THUMB_HEIGHT = 64
"""Height in pixels of a thumbnail of the full list (width follows the aspect ratio, at most twice it)."""
THUMB_QUALITY = 70
AUTO = "auto"
"""The decision of an image the cut decided alone (the others: "kept by user", "rejected by user")."""


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


def caption(row: Mapping) -> str:
    """The one caption of an image: its path in the folder and ``η = 0.1234 (#3 in bottle)``."""
    return f"{row['path']}  η = {float(row['eta']):.4g} (#{row['rank_in_class']} in {row['class']})"


def picture_uris(rows: Sequence[Mapping], indices: Sequence[int], picture: Picture) -> dict[int, str]:
    """Row index -> JPEG data URI of its panels, every map coloured on one shared heat range.

    The ground-truth panel is drawn on every picture when any pictured image has a mask (an image
    without one shows "no mask"), and on none otherwise: image | anomaly map.
    """
    shrunk = {i: _shrunk(*picture(i)) for i in dict.fromkeys(indices)}
    heat_range = _heat_range([heat for _, heat, _ in shrunk.values()])
    masks = any(mask is not None for _, _, mask in shrunk.values())
    def style(i: int) -> OverlayStyle:
        return OverlayStyle(caption=caption(rows[i]), heat_range=heat_range, panel_height=PANEL_HEIGHT, truth_panel=masks)
    return {i: picture_data_uri(draw_overlay(image, heat, mask, style(i)), format="JPEG", quality=JPEG_QUALITY)
            for i, (image, heat, mask) in shrunk.items()}


# --------------------------------------------------------------------------------- thumbnails

def _thumbnail(path: Path) -> str | None:
    """A JPEG data URI of the image at THUMB_HEIGHT, or None when it cannot be read (select warned already)."""
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":  # decode at a reduced scale: a 12-megapixel photo in milliseconds
                img.draft("RGB", (4 * THUMB_HEIGHT, 4 * THUMB_HEIGHT))
                img = ImageOps.exif_transpose(img).convert("RGB")
            else:
                img = decode_image(path)
        img.thumbnail((2 * THUMB_HEIGHT, THUMB_HEIGHT), Image.Resampling.BILINEAR)
        return picture_data_uri(img, format="JPEG", quality=THUMB_QUALITY)
    except (OSError, ValueError, SyntaxError, DataError, Image.DecompressionBombError):
        return None


def thumbnail_uris(rows: Sequence[Mapping], limit: int) -> dict[int, str]:
    """Row index -> thumbnail data URI of the rows with a ``file``: at most ``limit``, the most
    suspicious of every class first (rank_in_class, then eta descending); decoded on threads."""
    wanted = sorted((i for i, r in enumerate(rows) if r.get("file")),
                    key=lambda i: (rows[i]["rank_in_class"], -float(rows[i]["eta"]), i))[:limit]
    if not wanted:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        uris = list(pool.map(lambda i: _thumbnail(Path(rows[i]["file"])), wanted))
    return {i: uri for i, uri in zip(wanted, uris) if uri is not None}


# -------------------------------------------------------------------------------------- cards

def status(row: Mapping) -> str:
    return "kept" if row["kept"] else "rejected"


def decision(row: Mapping) -> str:
    """How the image's status was decided: "auto" (the cut), "kept by user" or "rejected by user"."""
    return str(row.get("decision") or AUTO)


def decision_badge(row: Mapping) -> str:
    """A badge naming a user's decision; nothing for the cut's own."""
    made = decision(row)
    return "" if made == AUTO else f' <span class="badge decision" title="a correction you passed">{escape(made)}</span>'


def file_link(row: Mapping) -> str:
    """A link that opens the original file (a file:// URI), or nothing without a ``file``."""
    if not row.get("file"):
        return ""
    uri = Path(row["file"]).absolute().as_uri()
    return f' <a class="open" href="{escape(uri)}" target="_blank" title="{escape(row["file"])}">open file</a>'


def _label_badge(label) -> str:
    name = {0: "normal", 1: "contaminant"}.get(label, "unknown")
    return f' <span class="badge {name}">{"label unknown" if name == "unknown" else name}</span>'


def card(rows: Sequence[Mapping], i: int, role: str, uri: str | None, labelled: bool) -> str:
    """One pictured image: its panels (when there is a picture), badges, the caption, a link to the file."""
    row = rows[i]
    label = row.get("label")
    mark = {0: " normal", 1: " contaminant"}.get(label, "") if labelled else ""
    corrected = "" if decision(row) == AUTO else " corrected"
    memory = row.get("memory_score")
    memory_text = "" if memory is None else f" · memory score {float(memory):.4g}"
    image = ("" if uri is None else
             f'<img class="zoom" src="{uri}" alt="{escape(row["path"])}" title="click to enlarge" loading="lazy">')
    return (f'<figure class="card {role} {status(row)}{mark}{corrected}{"" if uri else " nopic"}" id="card-{i}" '
            f'data-row="{i}" data-eta="{float(row["eta"])!r}" data-rank="{escape(row["rank_in_class"])}">{image}'
            f'<figcaption><span class="badge {status(row)}">{status(row)}</span>{decision_badge(row)}'
            f'{_label_badge(label) if labelled else ""} <span class="path">{escape(row["path"])}</span>'
            f'<br><span class="score">η = {float(row["eta"]):.4g} (#{escape(row["rank_in_class"])} in '
            f'{escape(row["class"])}){memory_text}</span>{file_link(row)}</figcaption></figure>')


def gallery(rows: Sequence[Mapping], indices: Sequence[int], role: str, uris: Mapping[int, str],
            labelled: bool) -> str:
    cards = "".join(card(rows, i, role, uris.get(i), labelled) for i in indices)
    return f'<div class="gallery {role}">{cards}</div>'
