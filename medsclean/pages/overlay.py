"""The anomaly-map pictures of the pages: image | anomaly map blended over it | ground truth.

Pillow and numpy only. Every map of a page can share one heat range (``heat_range``) so that
colours compare across pictures; pictures go into a page as ``data:`` URIs (`picture_data_uri`)
or into files (`overlay_png`). Captions are drawn with DejaVu Sans where the system has it (it
draws η and τ), else with Pillow's own font, which spells them out.
"""

from __future__ import annotations

import base64
import functools
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from medsclean.workdir.atomic import atomic_path

__all__ = ["colormap_lut", "render_overlay", "draw_overlay", "OverlayStyle", "overlay_png", "picture_data_uri"]

# Nine colours sampled at 0, 1/8, ..., 1 from the perceptually uniform matplotlib maps; the LUT
# interpolates linearly between them, which keeps lightness monotone.
_COLORMAP_ANCHORS = {
    "inferno": [(0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85),
                (227, 89, 51), (249, 142, 9), (248, 201, 49), (252, 255, 164)],
    "viridis": [(68, 1, 84), (72, 40, 120), (62, 73, 137), (49, 104, 142), (38, 130, 142),
                (31, 158, 137), (53, 183, 121), (110, 206, 88), (253, 231, 37)],
}
_MASK_COLOUR = np.array([0, 230, 118], dtype=np.float32)
_CAPTION_HEIGHT = 20


def colormap_lut(name: str = "inferno") -> np.ndarray:
    """A 256-entry colour look-up table.

    Args:
        name: ``inferno`` or ``viridis``.

    Returns:
        uint8 array (256, 3); row i is the RGB colour of value i / 255.
    """
    if name not in _COLORMAP_ANCHORS:
        raise ValueError(f"colormap must be one of {sorted(_COLORMAP_ANCHORS)}, got {name!r}")
    anchors = np.asarray(_COLORMAP_ANCHORS[name], dtype=np.float64)
    positions = np.linspace(0.0, 1.0, len(anchors))
    values = np.linspace(0.0, 1.0, 256)
    channels = [np.interp(values, positions, anchors[:, c]) for c in range(3)]
    return np.clip(np.round(np.stack(channels, axis=1)), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------ overlays

def _resize_float(values: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(np.asarray(values, dtype=np.float32)).resize(size, resample))


def _normalise(heat: np.ndarray, heat_range: tuple[float, float] | None) -> np.ndarray:
    lo, hi = heat_range if heat_range is not None else (float(np.min(heat)), float(np.max(heat)))
    if not hi > lo:
        return np.zeros_like(heat)
    return np.nan_to_num(np.clip((heat - lo) / (hi - lo), 0.0, 1.0), nan=0.0)


_SPELLED = {"η": "eta", "τ": "tau"}
"""Greek letters of the captions, spelled out where the font cannot draw them."""


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans where the system has it (it draws η and τ), else Pillow's own font."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", 12)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=12)
    except (OSError, ImportError):  # Pillow without FreeType: the bitmap font, latin-1 only
        return ImageFont.load_default()


@functools.lru_cache(maxsize=None)
def _draws(font, letter: str) -> bool:
    """Whether ``font`` has a glyph for ``letter`` (its drawing differs from that of an unassigned code point)."""
    if not isinstance(font, ImageFont.FreeTypeFont):
        return False

    def drawn(text: str) -> bytes:
        canvas = Image.new("L", (32, 32))
        ImageDraw.Draw(canvas).text((4, 4), text, font=font, fill=255)
        return canvas.tobytes()
    return drawn(letter) != drawn("\U0010fffd")


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Shorten ``text`` with an ellipsis until it fits ``width`` pixels; keep it drawable (a Greek
    letter the font lacks is spelled out: η as eta)."""
    for letter, name in _SPELLED.items():
        if letter in text and not _draws(font, letter):
            text = text.replace(letter, name)
    if not isinstance(font, ImageFont.FreeTypeFont):
        text = text.encode("latin-1", "replace").decode("latin-1")
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…" if isinstance(font, ImageFont.FreeTypeFont) else text


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, font, width: int) -> None:
    text = _fit_text(draw, text, font, width - 6)
    box = draw.textbbox((xy[0] + 3, xy[1] + 2), text, font=font)
    draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(0, 0, 0))
    draw.text((xy[0] + 3, xy[1] + 2), text, fill=(255, 255, 255), font=font)


@dataclass(frozen=True)
class OverlayStyle:
    """How :func:`draw_overlay` draws: see the keywords of :func:`render_overlay`; ``truth_panel=False``
    leaves out the third panel of an image without a mask (image | anomaly map only)."""

    caption: str = ""
    heat_range: tuple[float, float] | None = None
    alpha: float = 0.55
    colormap: str = "inferno"
    panel_height: int = 224
    truth_panel: bool = True


def render_overlay(image: np.ndarray, heat: np.ndarray, mask: np.ndarray | None, *, caption: str = "",
                   heat_range: tuple[float, float] | None = None, alpha: float = 0.55,
                   colormap: str = "inferno", panel_height: int = 224) -> Image.Image:
    """A triptych: the image | its anomaly map blended over it | the ground truth (or "no mask").

    Args:
        image: uint8 RGB (H, W, 3).
        heat: (h, w) float anomaly map of the same field of view (resized bilinearly).
        mask: (h', w') bool ground truth, or None.
        caption: text of the strip under the panels (e.g. path and score); a Greek letter the
            font cannot draw is spelled out (η as eta).
        heat_range: (lo, hi) scores mapped to the ends of the colormap; None = this map's min/max.
            Use one range for every image of a report so colours are comparable.
        alpha: weight of the colormap over the image, in [0, 1].
        colormap: ``inferno`` or ``viridis``.
        panel_height: height in pixels of each panel; widths keep the image's aspect ratio.

    Returns:
        RGB image of width 3 * panel width and height panel_height + 20.
    """
    return draw_overlay(image, heat, mask, OverlayStyle(caption, heat_range, alpha, colormap, panel_height))


def draw_overlay(image: np.ndarray, heat: np.ndarray, mask: np.ndarray | None, style: OverlayStyle) -> Image.Image:
    """:func:`render_overlay` with its options in ``style``; without a mask and with
    ``style.truth_panel`` False, a diptych (image | anomaly map) of width 2 * panel width."""
    panel_height = style.panel_height
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    panel_w = max(1, round(image.shape[1] * panel_height / image.shape[0]))
    size = (panel_w, panel_height)
    photo = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    level = _normalise(_resize_float(heat, size, Image.Resampling.BILINEAR), style.heat_range)
    colours = colormap_lut(style.colormap)[np.round(level * 255).astype(np.intp)].astype(np.float32)
    blended = (1.0 - style.alpha) * photo + style.alpha * colours
    if mask is not None:
        defect = _resize_float(np.asarray(mask, dtype=np.float32), size, Image.Resampling.NEAREST) > 0.5
        truth = np.where(defect[..., None], 0.35 * photo + 0.65 * _MASK_COLOUR, 0.4 * photo)
    else:
        truth = np.full_like(photo, 64.0)
    panels = (photo, blended, truth) if mask is not None or style.truth_panel else (photo, blended)
    canvas = Image.new("RGB", (len(panels) * panel_w, panel_height + _CAPTION_HEIGHT), (24, 24, 24))
    for index, panel in enumerate(panels):
        canvas.paste(Image.fromarray(np.clip(np.round(panel), 0, 255).astype(np.uint8)), (index * panel_w, 0))
    draw, font = ImageDraw.Draw(canvas), _font()
    lo_hi = style.heat_range
    heat_label = "anomaly map" if lo_hi is None else f"anomaly map [{lo_hi[0]:.3g}, {lo_hi[1]:.3g}]"
    labels = ("image", heat_label, "ground truth" if mask is not None else "no mask")
    for index in range(len(panels)):
        _label(draw, (index * panel_w, 0), labels[index], font, panel_w)
    draw.text((4, panel_height + 3), _fit_text(draw, style.caption, font, len(panels) * panel_w - 8),
              fill=(230, 230, 230), font=font)
    return canvas


def overlay_png(image: np.ndarray, heat: np.ndarray, mask: np.ndarray | None, path: str | Path,
                **options) -> Path:
    """Write :func:`render_overlay` (same arguments as keywords) as a PNG file, atomically."""
    picture = render_overlay(image, heat, mask, **options)
    path = Path(path)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG", optimize=True)
    return path


def picture_data_uri(picture: Image.Image, *, format: str = "PNG", quality: int = 85) -> str:
    """A picture encoded in memory as a ``data:`` URI, for a page without external resources.

    Args:
        picture: RGB image, e.g. from :func:`render_overlay`.
        format: ``PNG`` (lossless) or ``JPEG`` (about 5 times smaller for photographs).
        quality: JPEG quality, 1-95; ignored for PNG.
    """
    buffer = io.BytesIO()
    if format.upper() == "JPEG":
        picture.convert("RGB").save(buffer, format="JPEG", quality=quality)
        mime = "image/jpeg"
    else:
        picture.save(buffer, format="PNG", optimize=True)
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"
