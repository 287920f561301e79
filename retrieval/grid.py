"""A picture of search results: one row per query, the query first, then its neighbours with their
similarity and label. PIL only."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from compress_edge.data.grammar import FASHION_MNIST, is_dataset_id, parse_dataset_id
from compress_edge.data.images import open_image
from compress_edge.storage import atomic_path

log = logging.getLogger(__name__)

TILE = 128
CAPTION = 34
PAD = 6
BACKGROUND = (255, 255, 255)
QUERY_BORDER = (40, 90, 200)
SAME_LABEL = (40, 160, 60)
OTHER_LABEL = (200, 60, 50)
_DATASETS: dict[str, object] = {}


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _thumb(img: Image.Image | None, tile: int) -> Image.Image:
    canvas = Image.new("RGB", (tile, tile), (235, 235, 235))
    if img is None:
        d = ImageDraw.Draw(canvas)
        d.text((8, tile // 2 - 6), "not found", fill=(120, 120, 120), font=_font())
        return canvas
    img = img.convert("RGB")
    w, h = img.size
    scale = tile / max(w, h)
    # Small images (Fashion-MNIST's 28 px) are enlarged without blurring.
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BILINEAR
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)
    canvas.paste(img, ((tile - img.width) // 2, (tile - img.height) // 2))
    return canvas


def load_item(path: str | None) -> Image.Image | None:
    """The image of a stored item: a file, or a dataset id such as "fashion-mnist:test/00042"."""
    if not path:
        return None
    if is_dataset_id(path):
        item = parse_dataset_id(path)
        if item is None:
            log.debug("cannot load %s: not a well-formed dataset id", path)
            return None
        split, number = item
        try:
            from compress_edge.data.datasets import open_dataset  # torch; absent on a device

            name = f"{FASHION_MNIST}:{split}"
            if name not in _DATASETS:
                _DATASETS[name] = open_dataset(name)
            return _DATASETS[name].get_image(number)
        except Exception as exc:  # the picture is a convenience: draw a blank tile instead
            log.debug("cannot load %s: %s", path, exc)
            return None
    try:
        return open_image(path)
    except Exception as exc:
        log.debug("cannot load %s: %s", path, exc)
        return None


def draw_grid(
    queries: Sequence[tuple[Image.Image | str, str]],
    results: Sequence[Sequence[object]],
    out: str | os.PathLike,
    *,
    tile: int = TILE,
    query_labels: Sequence[str | None] | None = None,
    loader: Callable[[str | None], Image.Image | None] = load_item,
) -> Path:
    """Write a PNG: row i is query i (image or path, caption) then the ``Hit`` objects of results[i].

    Neighbour captions give rank, similarity and label; with ``query_labels`` a neighbour's border is
    green when its label matches the query's and red when not. Returns the path written.
    """
    k = max((len(r) for r in results), default=0)
    cols = 1 + k
    cell_w, cell_h = tile + 2 * PAD, tile + CAPTION + 2 * PAD
    sheet = Image.new("RGB", (cols * cell_w + PAD, max(1, len(queries)) * cell_h + PAD), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font(12)
    for row, ((query, caption), hits) in enumerate(zip(queries, results, strict=True)):
        y = PAD + row * cell_h
        qimg = query if isinstance(query, Image.Image) else loader(str(query))
        _cell(sheet, draw, font, _thumb(qimg, tile), PAD, y, tile, QUERY_BORDER, ["query", _fit(caption, tile)])
        qlabel = query_labels[row] if query_labels else None
        for j, hit in enumerate(hits):
            x = PAD + (j + 1) * cell_w
            label = getattr(hit, "label_name", None) or (
                str(hit.label) if getattr(hit, "label", None) is not None else "")
            colour = (200, 200, 200)
            if qlabel is not None and label:
                colour = SAME_LABEL if label == qlabel else OTHER_LABEL
            lines = [f"#{hit.rank}  {hit.score:.3f}", _fit(label or Path(str(hit.file or hit.id)).name, tile)]
            _cell(sheet, draw, font, _thumb(loader(hit.path), tile), x, y, tile, colour, lines)
    out = Path(out)
    with atomic_path(out, suffix=out.suffix or ".png") as tmp:
        sheet.save(tmp, format="PNG")
    return out


def _cell(sheet, draw, font, thumb, x, y, tile, border, lines) -> None:
    sheet.paste(thumb, (x, y))
    draw.rectangle([x - 2, y - 2, x + tile + 1, y + tile + 1], outline=border, width=2)
    for i, line in enumerate(lines):
        draw.text((x, y + tile + 4 + 14 * i), line, fill=(20, 20, 20), font=font)


def _fit(text: str, tile: int) -> str:
    limit = max(4, tile // 7)
    return text if len(text) <= limit else text[: limit - 1] + "…"
