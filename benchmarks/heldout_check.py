"""Distillation on a data set nobody tuned for: generated textures, a supervised teacher, `distill`'s defaults.

The check a new user's first run amounts to, made reproducible:

1. ``make_textures`` writes a 10-class set of coloured patterns (train and test from different seeds).
2. A torchvision ``resnet18`` is trained with labels on the train part and saved as a plain
   torchvision-layout state dict (``teacher.pth``), the kind of checkpoint a user brings.
3. ``compress-edge distill TRAIN --teacher resnet18 --teacher-weights teacher.pth --image-size S`` runs
   with every other option at its default (extra options can be passed to compare settings).
4. ``compress-edge eval knn`` scores teacher, student, raw pixels and the student's random weights.

Run:  python benchmarks/heldout_check.py --out runs/heldout --tag TAG [--per-class 64] [-- --method compress-2q]
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

from compress_edge.data.synthetic import make_textures, train_labelled_teacher
from compress_edge.models.resolve import resolve_model, save_model


def _cli(*args: str) -> str:
    cmd = [sys.executable, "-m", "compress_edge", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def _knn(model: str, train: Path, test: Path, size: int, *extra: str) -> dict:
    return json.loads(_cli("eval", "knn", model, "--train", str(train), "--test", str(test), "--image-size",
                           str(size), "--json", *extra))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/heldout"))
    p.add_argument("--per-class", type=int, default=64)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--tag", default="defaults")
    p.add_argument("distill_args", nargs="*", help="extra distill options, after --")
    a = p.parse_args(argv)

    root = a.out
    train = root / "data" / "train"
    test = root / "data" / "test"
    if not train.exists():
        make_textures(train, a.per_class, size=a.size, seed=1)
        make_textures(test, a.test_per_class, size=a.size, seed=2)
    teacher = root / "teacher.pth"
    if not teacher.exists():
        t0 = time.time()
        train_labelled_teacher(train, teacher, image_size=a.size, epochs=a.teacher_epochs)
        print(f"teacher trained in {time.time() - t0:.0f}s", flush=True)
    run = root / f"distill-{a.tag}"
    took = None  # a finished run reused: its time is in its own metrics.jsonl
    if not (run / "student" / "model.safetensors").exists():
        t0 = time.time()
        _cli("distill", str(train), "--teacher", "resnet18", "--teacher-weights", str(teacher), "--image-size",
             str(a.size), "--out", str(run), "--no-progress", *a.distill_args)
        took = time.time() - t0
    student = _knn(str(run), train, test, a.size, "--baselines")
    teacher_model = root / "teacher-model"
    if not (teacher_model / "model.safetensors").exists():
        model, spec = resolve_model("resnet18", weights=teacher, image_size=a.size)
        save_model(model, spec, teacher_model)
    teacher_row = _knn(str(teacher_model), train, test, a.size)
    result = {"tag": a.tag, "distill_args": a.distill_args, "distill_seconds": took,
              "student": student, "teacher": teacher_row}
    (root / f"results-{a.tag}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
