"""Distillation on a data set nobody tuned for (generated textures or scikit-learn's handwritten digits), a
supervised teacher, `distill`'s defaults.

The check a new user's first run amounts to, made reproducible:

1. ``make_textures`` writes a 10-class set of coloured patterns (train and test from different seeds),
   ``make_shapes`` (``--dataset shapes``) one of coloured shapes on textured backgrounds, or, with
   ``--dataset digits``, :func:`write_digits` writes a real handwritten set: the 1,797 digit images
   scikit-learn ships (8x8 px, 16 grey levels), split by a fixed seed and enlarged to ``--size``.
2. A torchvision ``resnet18`` is trained with labels on the train part and saved as a plain
   torchvision-layout state dict (``teacher.pth``), the kind of checkpoint a user brings; or, with
   ``--teacher pretrain``, ``compress-edge pretrain TRAIN --image-size S`` makes the teacher with its defaults.
3. ``compress-edge distill TRAIN --teacher resnet18 --teacher-weights teacher.pth --image-size S`` runs
   with every other option at its default (extra options can be passed to compare settings).
4. ``compress-edge eval knn`` scores teacher, student, raw pixels and the student's random weights.

Run:  python benchmarks/heldout_check.py --out runs/heldout --tag TAG [--per-class 64] [-- --method compress-2q]
      python benchmarks/heldout_check.py --out runs/heldout --tag cache4 --cache-views 4   (a cached teacher)
      python benchmarks/heldout_check.py --dataset digits --out runs/heldout-digits --tag defaults
Prints the scores and writes ``results-TAG.json`` in the output folder; data, teacher and finished
runs already there are reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from compress_edge.data.synthetic import make_shapes, make_textures, train_labelled_teacher
from compress_edge.models.resolve import resolve_model, save_model


def _cli(*args: str) -> str:
    cmd = [sys.executable, "-m", "compress_edge", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def write_digits(train: Path, test: Path, size: int, test_share: float = 0.4, seed: int = 0) -> None:
    """scikit-learn's handwritten digits (``load_digits``: 1,797 images of 8x8 px, values 0 to 16, read
    from the package, no download) as two class folders of PNG files enlarged to ``size`` px, a random
    ``test_share`` of each class in ``test``."""
    import numpy as np
    from PIL import Image

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("--dataset digits reads scikit-learn's bundled digits: pip install scikit-learn") from None
    digits = load_digits()
    pixels = (digits.images * (255 / 16)).round().astype(np.uint8)
    rng = np.random.default_rng(seed)
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(digits.target == label))
        n_test = int(round(len(idx) * test_share))
        for part, chosen in ((test, idx[:n_test]), (train, idx[n_test:])):
            folder = part / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                image = Image.fromarray(pixels[i], "L").resize((size, size), Image.Resampling.BILINEAR)
                image.save(folder / f"{i:04d}.png")


def write_glyphs(train: Path, test: Path, size: int, per_class: int, test_per_class: int, seed: int = 0) -> None:
    """Ten capital letters (A to J) as class folders, each image one letter in a font, size, angle,
    position and pair of colours drawn at random, with noise; the font is drawn from the TrueType files under
    /usr/share/fonts (DejaVu and Liberation here), one pool for train and test. numpy, PIL and the fonts:
    raises SystemExit when there are none."""
    import glob

    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    fonts = sorted(glob.glob("/usr/share/fonts/**/*.ttf", recursive=True))
    if not fonts:
        raise SystemExit("--dataset glyphs draws letters in the machine's TrueType fonts; none found under "
                         "/usr/share/fonts (apt-get install fonts-dejavu-core fonts-liberation)")
    rng = np.random.default_rng(seed)
    big = size * 4  # drawn large, then shrunk: smooth edges
    for part, count in ((train, per_class), (test, test_per_class)):
        for label, letter in enumerate("ABCDEFGHIJ"):
            folder = part / letter
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                bg = rng.integers(0, 256, size=3)
                fg = (bg + rng.integers(90, 166, size=3)) % 256  # a colour well apart from the background's
                font = ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], int(big * rng.uniform(0.45, 0.8)))
                layer = Image.new("L", (big, big), 0)
                ImageDraw.Draw(layer).text((big / 2, big / 2), letter, fill=255, font=font, anchor="mm")
                layer = layer.rotate(rng.uniform(-25, 25), resample=Image.Resampling.BICUBIC,
                                     translate=tuple(rng.uniform(-0.12, 0.12, size=2) * big))
                alpha = np.asarray(layer, dtype=np.float32)[..., None] / 255
                pixels = (1 - alpha) * bg + alpha * fg
                image = Image.fromarray(pixels.astype(np.uint8)).resize((size, size), Image.Resampling.LANCZOS)
                noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, size=(size, size, 3))
                Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folder / f"{label}{i:04d}.png")


def _knn(model: str, train: Path, test: Path, size: int, *extra: str) -> dict:
    return json.loads(_cli("eval", "knn", model, "--train", str(train), "--test", str(test), "--image-size",
                           str(size), "--json", *extra))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("textures", "shapes", "digits", "glyphs"), default="textures",
                   help="textures or shapes: generated (--per-class, --test-per-class); digits: scikit-learn's "
                        "handwritten digits, 60 %% train / 40 %% test; glyphs: the letters A to J in this "
                        "machine's fonts (--per-class, --test-per-class)")
    p.add_argument("--teacher", choices=("supervised", "pretrain"), default="supervised",
                   help="supervised: a torchvision resnet18 trained with the labels (a checkpoint a user brings); "
                        "pretrain: `compress-edge pretrain TRAIN` with its defaults, then distill from that run")
    p.add_argument("--out", type=Path, default=Path("runs/heldout"))
    p.add_argument("--per-class", type=int, default=64)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--tag", default="defaults")
    p.add_argument("--cache-views", type=int, default=0,
                   help="K > 0: run the teacher once with `compress-edge cache-teacher --views K` and distil from "
                        "that cache (--teacher-cache) instead of running it live at every step")
    p.add_argument("distill_args", nargs="*", help="extra distill options, after --")
    a = p.parse_args(argv)

    root = a.out
    train = root / "data" / "train"
    test = root / "data" / "test"
    if not train.exists():
        if a.dataset == "digits":
            write_digits(train, test, a.size)
        elif a.dataset == "glyphs":
            write_glyphs(train, test, a.size, a.per_class, a.test_per_class)
        else:
            make = make_shapes if a.dataset == "shapes" else make_textures
            make(train, a.per_class, size=a.size, seed=1)
            make(test, a.test_per_class, size=a.size, seed=2)
    took = {}  # seconds of what this call ran; a finished run reused has its time in its own folder
    if a.teacher == "pretrain":  # the user's first two commands, nothing but the data and the image size
        pre = root / "pretrain"
        if not (pre / "student" / "model.safetensors").exists():
            t0 = time.time()
            _cli("pretrain", str(train), "--image-size", str(a.size), "--out", str(pre), "--no-progress")
            took["pretrain"] = round(time.time() - t0, 1)
        teacher_args = ["--teacher", str(pre)]
        teacher_model = pre
    else:
        teacher = root / "teacher.pth"
        if not teacher.exists():
            t0 = time.time()
            train_labelled_teacher(train, teacher, image_size=a.size, epochs=a.teacher_epochs)
            took["teacher"] = round(time.time() - t0, 1)
        teacher_args = ["--teacher", "resnet18", "--teacher-weights", str(teacher)]
        teacher_model = root / "teacher-model"
        if not (teacher_model / "model.safetensors").exists():
            model, spec = resolve_model("resnet18", weights=teacher, image_size=a.size)
            save_model(model, spec, teacher_model)
    if a.cache_views > 0:  # the teacher run once, K recorded views of each image, then replayed
        cache = root / f"cache-views{a.cache_views}"
        if not (cache / "meta.json").exists():
            t0 = time.time()
            _cli("cache-teacher", str(train), *teacher_args, "--image-size", str(a.size), "--views",
                 str(a.cache_views), "--out", str(cache), "--no-progress")
            took["cache-teacher"] = round(time.time() - t0, 1)
        teacher_args = ["--teacher-cache", str(cache)]
    run = root / f"distill-{a.tag}"
    if not (run / "student" / "model.safetensors").exists():
        t0 = time.time()
        _cli("distill", str(train), *teacher_args, "--image-size", str(a.size), "--out", str(run), "--no-progress",
             *a.distill_args)
        took["distill"] = round(time.time() - t0, 1)
    student = _knn(str(run), train, test, a.size, "--baselines")
    teacher_row = _knn(str(teacher_model), train, test, a.size)
    result = {"dataset": a.dataset, "teacher_from": a.teacher, "tag": a.tag, "distill_args": a.distill_args,
              "cache_views": a.cache_views,
              "seconds": took, "student": student, "teacher": teacher_row}
    (root / f"results-{a.tag}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
