"""Pictures of results, drawn with Pillow: boxes / labels / masks, and attention heatmaps."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from .tasks import Detection

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60)]
MASK_OPACITY = 0.45
PANEL_WIDTH = 256


def to_pil(array: np.ndarray) -> PIL.Image.Image:
    """float [H, W, 3] in [0, 255] (as `image.to_rgb_array` returns) -> RGB image."""
    return PIL.Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), "RGB")


def _font(size: int) -> PIL.ImageFont.ImageFont:
    return PIL.ImageFont.load_default(size=size)


def wrap_text(text: str, font: PIL.ImageFont.ImageFont, width: float) -> list[str]:
    """Greedy word wrap to lines at most `width` pixels wide in `font` (a longer word gets a
    line of its own)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _label(draw: PIL.ImageDraw.ImageDraw, xy: tuple[float, float], text: str,
           color: tuple[int, int, int], font: PIL.ImageFont.ImageFont) -> None:
    """Text in white on a filled box of `color`, with its bottom-left corner at xy."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x, y = xy[0], max(0.0, xy[1] - (bottom - top) - 4)
    draw.rectangle((x, y, x + right - left + 4, y + bottom - top + 4), fill=color)
    draw.text((x + 2 - left, y + 2 - top), text, fill=(255, 255, 255), font=font)


def draw_objects(image: PIL.Image.Image, objects: Sequence[Detection]) -> PIL.Image.Image:
    """Masks (translucent), boxes and labels over a copy of the image (same pixel grid)."""
    out = image.convert("RGB")
    for i, obj in enumerate(objects):
        if obj.mask is not None:
            alpha = PIL.Image.fromarray((obj.mask * round(255 * MASK_OPACITY)).astype(np.uint8))
            out.paste(PIL.Image.new("RGB", out.size, PALETTE[i % len(PALETTE)]), (0, 0), alpha)
    draw = PIL.ImageDraw.Draw(out)
    side = min(out.size)
    font = _font(max(10, side // 30))
    for i, obj in enumerate(objects):
        color = PALETTE[i % len(PALETTE)]
        draw.rectangle(obj.box, outline=color, width=max(2, side // 200))
        _label(draw, obj.box[:2], obj.label or "?", color, font)
    return out


def _heat_colors(heat: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8, black -> red -> yellow -> white ("hot")."""
    rgb = np.stack([np.clip(3 * heat - i, 0, 1) for i in range(3)], -1)
    return (rgb * 255).astype(np.uint8)


def draw_attention(
    image: PIL.Image.Image, maps: np.ndarray, titles: Sequence[str], columns: int = 4
) -> PIL.Image.Image:
    """A grid of panels: each map [grid, grid] (normalized to its own maximum) blended over the
    image, with its title above. maps: [n, grid, grid]."""
    width = PANEL_WIDTH
    height = round(width * image.height / image.width)
    base = image.convert("RGB").resize((width, height), PIL.Image.BILINEAR)
    title_height = 22
    rows = -(-len(maps) // columns)
    sheet = PIL.Image.new("RGB", (columns * width, rows * (height + title_height)), "white")
    draw = PIL.ImageDraw.Draw(sheet)
    font = _font(14)
    for i, (heat, title) in enumerate(zip(maps, titles, strict=True)):
        heat = heat / heat.max() if heat.max() > 0 else heat
        heat_img = PIL.Image.fromarray(heat.astype(np.float32)).resize(
            (width, height), PIL.Image.BILINEAR
        )
        colors = PIL.Image.fromarray(_heat_colors(np.clip(np.asarray(heat_img), 0, 1)))
        x, y = (i % columns) * width, (i // columns) * (height + title_height)
        sheet.paste(PIL.Image.blend(base, colors, 0.55), (x, y + title_height))
        draw.text((x + 4, y + 3), title, fill=(0, 0, 0), font=font)
    return sheet
