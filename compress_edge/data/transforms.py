"""Transforms (torch): PIL image -> float32 tensor (3, S, S), for evaluation and for training.

The eval transform is :func:`compress_edge.data.images.preprocess_eval` wrapped in a tensor, so the torch
path and the torch-free device path give bit-identical inputs. :class:`TrainAugment` draws its random
choices into a fixed-length parameter vector that can be stored and replayed exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter

from compress_edge.data.fashion_mnist import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from compress_edge.data.grammar import FASHION_MNIST
from compress_edge.data.images import preprocess_eval, to_normalized_array, to_rgb
from compress_edge.models.spec import IMAGENET_MEAN, IMAGENET_STD


def default_normalisation(data: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std a model trained from scratch on DATA uses: Fashion-MNIST's own, else ImageNet's."""
    if data.startswith(FASHION_MNIST):
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD
    return IMAGENET_MEAN, IMAGENET_STD


class EvalTransform:
    """PIL image -> float32 tensor (3, S, S): exactly :func:`compress_edge.data.images.preprocess_eval`."""

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(preprocess_eval(img, self.image_size, self.mean, self.std))

    def __repr__(self) -> str:
        return f"EvalTransform(image_size={self.image_size}, mean={self.mean}, std={self.std})"


def eval_transform(
    image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> EvalTransform:
    """The eval preset (picklable): shorter side to S, centre crop, [0, 1], normalise."""
    return EvalTransform(image_size, mean, std)


@dataclass(frozen=True)
class _Slots:
    """Positions in the parameter vector of :class:`TrainAugment` (float32, length PARAM_DIM)."""

    top: int = 0  # crop box in source pixels
    left: int = 1
    height: int = 2
    width: int = 3
    flip: int = 4  # 1: horizontal flip
    jitter: int = 5  # 1: colour jitter applied
    brightness: int = 6  # jitter factors (1, 1, 1, 0 when not applied)
    contrast: int = 7
    saturation: int = 8
    hue: int = 9
    order: int = 10  # 10..13: the jitter operations' order, a permutation of 0..3
    gray: int = 14  # 1: to grayscale (3 channels)
    blur: int = 15  # gaussian blur sigma, 0: no blur
    src_width: int = 16  # size of the image the parameters were drawn for
    src_height: int = 17


SLOTS = _Slots()
PARAM_DIM = 18


class TrainAugment:
    """SimCLR / MoCo v2 training view with replayable randomness: PIL image -> tensor (3, S, S).

    Random resized crop (area ``scale``, aspect ``ratio``), horizontal flip (p ``flip_p``), colour
    jitter (brightness, contrast, saturation, hue) in random order with p ``jitter_p``, grayscale
    (p ``gray_p``), gaussian blur with sigma in ``blur_sigma`` (p ``blur_p``), then the same
    [0, 1] + mean/std conversion as the eval path. (Chen et al. 2020, SimCLR; Chen et al. 2020,
    "Improved Baselines with Momentum Contrastive Learning".)

    ``sample_params(rng, w, h)`` draws every random choice into a float32 vector (PARAM_DIM,);
    ``apply(img, params)`` is deterministic given it, so a teacher cache can store the parameters
    of each view and replay the very same view for the student. ``aug(img)`` samples with a
    generator seeded from torch's RNG, which DataLoader seeds per worker.
    """

    param_dim = PARAM_DIM

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        *,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1),
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if not 0 <= jitter[3] <= 0.5:
            raise ValueError(f"hue jitter must be in [0, 0.5], got {jitter[3]}")
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.flip_p = float(flip_p)
        self.jitter = tuple(float(v) for v in jitter)
        self.jitter_p = float(jitter_p)
        self.gray_p = float(gray_p)
        self.blur_p = float(blur_p)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))

    @classmethod
    def for_image_size(cls, image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                       std: Sequence[float] = IMAGENET_STD, **overrides: Any) -> TrainAugment:
        """The SimCLR / MoCo v2 view with its blur scaled to the image: MoCo v2's sigma range (0.1, 2.0)
        px is for 224 px images, so at S px it is (0.1, 2.0) * S / 224; where even its largest sigma
        is under half a pixel (S < 56) there is no blur (it would only cost time). A sigma of 2 px on a
        32 px image would erase what tells fine classes apart."""
        k = float(image_size) / 224.0
        blur = (0.1 * k, 2.0 * k)
        settings: dict[str, Any] = {"blur_sigma": blur, "blur_p": 0.5 if blur[1] >= 0.5 else 0.0}
        return cls(image_size, mean, std, **{**settings, **overrides})

    # -- sampling --------------------------------------------------------------------------------------
    def sample_params(self, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
        """Draw one view's random choices for a ``width`` x ``height`` image: float32 (PARAM_DIM,)."""
        p = np.zeros(PARAM_DIM, dtype=np.float32)
        top, left, h, w = self._crop_box(rng, int(width), int(height))
        p[SLOTS.top], p[SLOTS.left], p[SLOTS.height], p[SLOTS.width] = top, left, h, w
        p[SLOTS.flip] = float(rng.random() < self.flip_p)
        b, c, s, hue = self.jitter
        # Always draw the same amount of randomness, so one choice does not shift the next ones.
        factors = (
            rng.uniform(max(0.0, 1 - b), 1 + b),
            rng.uniform(max(0.0, 1 - c), 1 + c),
            rng.uniform(max(0.0, 1 - s), 1 + s),
            rng.uniform(-hue, hue),
        )
        order = rng.permutation(4)
        if rng.random() < self.jitter_p:
            p[SLOTS.jitter] = 1.0
            p[SLOTS.brightness : SLOTS.hue + 1] = factors
        else:
            p[SLOTS.brightness : SLOTS.hue + 1] = (1.0, 1.0, 1.0, 0.0)
        p[SLOTS.order : SLOTS.order + 4] = order
        p[SLOTS.gray] = float(rng.random() < self.gray_p)
        sigma = rng.uniform(*self.blur_sigma)
        p[SLOTS.blur] = sigma if rng.random() < self.blur_p else 0.0
        p[SLOTS.src_width], p[SLOTS.src_height] = width, height
        return p

    def _crop_box(self, rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
        # torchvision's RandomResizedCrop.get_params, drawing from a numpy generator.
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return top, left, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    # -- applying ---------------------------------------------------------------------------------------
    def apply(self, img: Image.Image, params: np.ndarray, *, drawn_at: int | None = None) -> torch.Tensor:
        """Build the view described by ``params`` (from :meth:`sample_params`): float32 (3, S, S).

        The crop is in source pixels and the colour changes have no size, so the same params give the
        same view at any output size S; ``drawn_at`` is the output size the params were drawn for
        (default S), and the blur's sigma, drawn in its pixels, is scaled to S.
        """
        p = np.asarray(params, dtype=np.float32)
        if p.shape != (PARAM_DIM,):
            raise ValueError(f"params must have shape ({PARAM_DIM},), got {p.shape}")
        if img.mode != "RGB":
            img = to_rgb(img)
        if (int(p[SLOTS.src_width]), int(p[SLOTS.src_height])) != img.size:
            raise ValueError(
                f"params were drawn for a {int(p[SLOTS.src_width])}x{int(p[SLOTS.src_height])} image, "
                f"this one is {img.size[0]}x{img.size[1]}"
            )
        size = [self.image_size, self.image_size]
        img = TF.resized_crop(
            img,
            int(p[SLOTS.top]),
            int(p[SLOTS.left]),
            int(p[SLOTS.height]),
            int(p[SLOTS.width]),
            size,
            interpolation=TF.InterpolationMode.BILINEAR,
            antialias=True,
        )
        if p[SLOTS.flip] > 0.5:
            img = TF.hflip(img)
        if p[SLOTS.jitter] > 0.5:
            ops = (
                lambda x: TF.adjust_brightness(x, float(p[SLOTS.brightness])),
                lambda x: TF.adjust_contrast(x, float(p[SLOTS.contrast])),
                lambda x: TF.adjust_saturation(x, float(p[SLOTS.saturation])),
                lambda x: TF.adjust_hue(x, float(p[SLOTS.hue])),
            )
            for k in p[SLOTS.order : SLOTS.order + 4].astype(int):
                img = ops[k](img)
        if p[SLOTS.gray] > 0.5:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if p[SLOTS.blur] > 0:
            # PIL's blur, as MoCo v2 does: the radius is the sigma.
            scale = self.image_size / float(drawn_at) if drawn_at else 1.0
            img = img.filter(ImageFilter.GaussianBlur(radius=float(p[SLOTS.blur]) * scale))
        return torch.from_numpy(to_normalized_array(img, self.mean, self.std))

    def sample_and_apply(
        self, img: Image.Image, rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, np.ndarray]:
        """One random view and the parameters that rebuild it: (float32 (3, S, S), (PARAM_DIM,))."""
        if rng is None:
            rng = _torch_seeded_rng()
        params = self.sample_params(rng, *img.size)
        return self.apply(img, params), params

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.sample_and_apply(img)[0]

    def __repr__(self) -> str:
        return (
            f"TrainAugment(image_size={self.image_size}, scale={self.scale}, flip_p={self.flip_p}, "
            f"jitter={self.jitter}, jitter_p={self.jitter_p}, gray_p={self.gray_p}, "
            f"blur_p={self.blur_p}, blur_sigma={self.blur_sigma})"
        )


def _torch_seeded_rng() -> np.random.Generator:
    # Drawn from torch's RNG so torch.manual_seed and DataLoader's per-worker seeds decide the views.
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return np.random.default_rng(seed)
