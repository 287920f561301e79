"""Labelled image sets generated from a seed, for tests and benchmarks that need data nobody tuned on.

Two families, each of ten classes, written as class folders (``ROOT/<class>/<nnnnn>.png``):

- :func:`make_shapes`: a coloured shape (circle, square, triangle, ...) of random size, position,
  rotation and colour on a cluttered background. The class is the shape.
- :func:`make_textures`: a periodic or random pattern (stripes, checks, dots, rings, ...) in two
  random colours, at a random orientation, period and phase, under an illumination gradient and
  noise. The class is the pattern. Raw pixels are a weak baseline here (the phase and colours move
  every pixel), which makes it a fair check that a model learned something.

numpy and PIL only. The same (seed, count) gives the same images on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon", "arrow", "crescent")
TEXTURES = ("stripes", "checks", "dots", "waves", "rings", "grid", "zigzag", "blobs", "spiral", "speckle")


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _contrasting(rng: np.random.Generator, other: np.ndarray, min_distance: float = 120.0) -> np.ndarray:
    for _ in range(50):
        c = _colour(rng)
        if np.linalg.norm(c - other) >= min_distance:
            return c
    return 255.0 - other


# ----------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------
def _polygon(cx: float, cy: float, r: float, angle: float, points: list[tuple[float, float]]) -> list[tuple]:
    """``points`` in a unit frame (radius 1), rotated by ``angle``, scaled by r, moved to (cx, cy)."""
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + r * (c * x - s * y), cy + r * (s * x + c * y)) for x, y in points]


def _regular(n: int, inner: float | None = None) -> list[tuple[float, float]]:
    if inner is None:
        return [(math.cos(2 * math.pi * k / n), math.sin(2 * math.pi * k / n)) for k in range(n)]
    pts = []
    for k in range(2 * n):
        rad = 1.0 if k % 2 == 0 else inner
        pts.append((rad * math.cos(math.pi * k / n), rad * math.sin(math.pi * k / n)))
    return pts


_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)],
    "triangle": _regular(3),
    "star": _regular(5, inner=0.42),
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
              (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "diamond": [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)],
    "hexagon": _regular(6),
    "arrow": [(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25), (-1, 0.25)],
}


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float, angle: float,
                fill: tuple, background: tuple) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if name == "circle":
        draw.ellipse(box, fill=fill)
    elif name == "ring":
        draw.ellipse(box, fill=fill)
        draw.ellipse((cx - r * 0.55, cy - r * 0.55, cx + r * 0.55, cy + r * 0.55), fill=background)
    elif name == "crescent":
        draw.ellipse(box, fill=fill)
        dx, dy = 0.45 * r * math.cos(angle), 0.45 * r * math.sin(angle)
        draw.ellipse((cx - r + dx, cy - r + dy, cx + r + dx, cy + r + dy), fill=background)
    else:
        draw.polygon(_polygon(cx, cy, r, angle, _OUTLINES[name]), fill=fill)


def render_shape(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    """One image of shape class ``label`` (see SHAPES), ``size`` x ``size`` RGB."""
    scale = 4  # drawn large, then shrunk: smooth edges
    big = size * scale
    bg = _colour(rng)
    noise = rng.normal(0, 18, size=(size // 4 + 1, size // 4 + 1, 3))
    field = np.kron(noise, np.ones((4 * scale, 4 * scale, 1)))[:big, :big]
    img = Image.fromarray(np.clip(bg + field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 3))):  # clutter: small strokes of other colours
        x0, y0 = rng.uniform(0, big, size=2)
        x1, y1 = x0 + rng.uniform(-big / 3, big / 3), y0 + rng.uniform(-big / 3, big / 3)
        draw.line((x0, y0, x1, y1), fill=tuple(int(v) for v in _colour(rng)), width=int(scale * rng.uniform(1, 2)))
    r = big * rng.uniform(0.22, 0.38)
    cx, cy = rng.uniform(r, big - r, size=2)
    fill = tuple(int(v) for v in _contrasting(rng, bg))
    mean_bg = tuple(int(v) for v in bg)
    _draw_shape(draw, SHAPES[label], cx, cy, r, rng.uniform(0, 2 * math.pi), fill, mean_bg)
    return img.resize((size, size), Image.Resampling.LANCZOS)


# ----------------------------------------------------------------------------------------------
# textures
# ----------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    coarse = rng.normal(size=(cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img)


def _pattern(rng: np.random.Generator, label: int, size: int, periods: tuple[float, float]) -> np.ndarray:
    """A float mask in [0, 1] of texture class ``label`` (see TEXTURES); the pattern repeats every
    ``periods`` (min, max) of the image side."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    period = rng.uniform(size * periods[0], size * periods[1])
    phase_u, phase_v = rng.uniform(0, period, size=2)
    u, v = u + phase_u, v + phase_v
    two_pi = 2 * math.pi
    name = TEXTURES[label]
    if name == "stripes":
        return (np.sin(two_pi * u / period) > 0).astype(np.float32)
    if name == "checks":
        return (np.sin(two_pi * u / period) * np.sin(two_pi * v / period) > 0).astype(np.float32)
    if name == "dots":
        du, dv = np.mod(u, period) - period / 2, np.mod(v, period) - period / 2
        return (du**2 + dv**2 < (0.28 * period) ** 2).astype(np.float32)
    if name == "waves":
        amp, wl = rng.uniform(0.3, 0.6) * period, rng.uniform(1.5, 3.0) * period
        return (np.sin(two_pi * (u + amp * np.sin(two_pi * v / wl)) / period) > 0).astype(np.float32)
    if name == "rings":
        cx, cy = rng.uniform(0, size, size=2)
        r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        return (np.sin(two_pi * r / period + rng.uniform(0, two_pi)) > 0).astype(np.float32)
    if name == "grid":
        width = max(1.0, 0.15 * period)
        du, dv = np.abs(np.mod(u, period) - period / 2), np.abs(np.mod(v, period) - period / 2)
        return ((du < width) | (dv < width)).astype(np.float32)
    if name == "zigzag":
        wl = rng.uniform(1.0, 2.0) * period
        tri = np.abs(np.mod(v / wl, 1.0) - 0.5) * 2 * rng.uniform(0.5, 1.0) * period
        return (np.sin(two_pi * (u + tri) / period) > 0).astype(np.float32)
    if name == "blobs":
        field = _smooth_noise(rng, size, max(2, int(size / period)))
        return (field > 0).astype(np.float32)
    if name == "spiral":
        cx, cy = rng.uniform(size * 0.3, size * 0.7, size=2)
        r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        phi = np.arctan2(yy - cy, xx - cx)
        arms = int(rng.integers(1, 4))
        return (np.sin(two_pi * r / period + arms * phi) > 0).astype(np.float32)
    # speckle: independent random cells of about a third of a period
    cells = max(2, int(3 * size / period))
    coarse = (rng.random((cells, cells)) > 0.5).astype(np.float32)
    return np.asarray(Image.fromarray(coarse * 255).resize((size, size), Image.Resampling.NEAREST)) / 255.0


#: The period of a texture, as a share of the image side: coarse enough for a network whose stem
#: divides the image by four (an ImageNet ResNet at 32 px) to see it.
TEXTURE_PERIODS = (1 / 5, 2 / 5)


def render_texture(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    """One image of texture class ``label`` (see TEXTURES), ``size`` x ``size`` RGB."""
    scale = 2
    big = size * scale
    mask = _pattern(rng, label, big, TEXTURE_PERIODS)[..., None]
    a = _colour(rng)
    b = _contrasting(rng, a, min_distance=90.0)
    img = mask * a + (1 - mask) * b
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32) / big
    angle = rng.uniform(0, 2 * math.pi)
    light = 1 + rng.uniform(0.1, 0.4) * ((xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle))
    img = img * light[..., None] + rng.normal(0, 10, size=img.shape)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return out.resize((size, size), Image.Resampling.BILINEAR)


# ----------------------------------------------------------------------------------------------
# writing a class folder
# ----------------------------------------------------------------------------------------------
FAMILIES: dict[str, tuple[tuple[str, ...], Callable[[np.random.Generator, int, int], Image.Image]]] = {
    "shapes": (SHAPES, render_shape),
    "textures": (TEXTURES, render_texture),
}


def make_image_set(root: str | Path, family: str, per_class: int, *, size: int = 32, seed: int = 0,
                   classes: int | None = None) -> Path:
    """Write ``per_class`` images of each class of ``family`` ("shapes" or "textures") under
    ``root/<class>/``; returns ``root``. ``classes`` keeps the first few classes only."""
    names, render = FAMILIES[family]
    names = names[: classes or len(names)]
    root = Path(root)
    rng = np.random.default_rng(seed)
    for label, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            render(rng, label, size).save(folder / f"{i:05d}.png")
    return root


def make_shapes(root: str | Path, per_class: int, *, size: int = 32, seed: int = 0) -> Path:
    return make_image_set(root, "shapes", per_class, size=size, seed=seed)


def make_textures(root: str | Path, per_class: int, *, size: int = 32, seed: int = 0) -> Path:
    return make_image_set(root, "textures", per_class, size=size, seed=seed)


def train_labelled_teacher(train_root: str | Path, out: str | Path, *, image_size: int, epochs: int,
                           small_input: bool = False, batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> Path:
    """Train a torchvision ``resnet18`` with labels on a class folder and save its plain state dict.

    The kind of checkpoint a user brings as ``--teacher resnet18 --teacher-weights FILE``: torchvision
    layout, ImageNet normalisation, an ImageNet stem (or the 3x3 stem of small-image models when
    ``small_input``). AdamW with a one-cycle schedule, flips and shifts; the images are held in
    memory, so this is for the few hundred to few thousand images of tests and benchmarks.
    """
    import torch
    import torchvision
    from torch import nn

    from compress_edge.data.datasets import open_dataset
    from compress_edge.data.transforms import EvalTransform

    torch.manual_seed(seed)
    ds = open_dataset(str(train_root), transform=EvalTransform(image_size))
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    labels = torch.as_tensor(ds.labels, dtype=torch.long)
    model = torchvision.models.resnet18(num_classes=len(ds.classes))
    if small_input:
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    steps_per_epoch = (len(images) + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    pad = max(1, image_size // 10)
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for start in range(0, len(images), batch_size):
            idx = order[start:start + batch_size]
            x = images[idx].clone()
            flip = torch.rand(len(x)) < 0.5
            x[flip] = x[flip].flip(-1)
            dy, dx = (int(v) for v in torch.randint(-pad, pad + 1, (2,)))
            x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
            loss = nn.functional.cross_entropy(model(x), labels[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.eval().state_dict(), out)
    return out
