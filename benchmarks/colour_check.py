"""What `pretrain`'s colour check decides on the training images of the data sets this project measures.

The check (``compress_edge.eval.quality.colour_check``): weighted 20-NN of each labelled image searched among
the others, by its colours alone (a chroma histogram) against chance, and by raw pixels in colour and in grey;
the model is made blind to colour (``grey_input``) when the colours alone are not above chance by 2 standard
errors, or grey pixels lead colour ones by more than 2 paired standard errors. This script writes each set the way its own
benchmark does (same generator, same seeds) and prints the check at 32 and 64 px.

Run:  python benchmarks/colour_check.py [--out runs/colour-check]    (about 30 s; data written once)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from heldout_check import write_digits, write_glyphs  # noqa: E402

from compress_edge.data.datasets import open_dataset  # noqa: E402
from compress_edge.data.synthetic import make_shapes, make_textures  # noqa: E402
from compress_edge.eval.quality import colour_check  # noqa: E402


def write_sets(out: Path) -> dict[str, Path]:
    """Each set's training images, written as its benchmark writes them (skipped when present)."""
    sets = {
        "letters in fonts (heldout_check --dataset glyphs)": out / "glyphs",
        "generated textures (heldout_check)": out / "textures",
        "generated shapes (heldout_check --dataset shapes)": out / "shapes",
        "generated textures (pretrain-small: tex)": out / "tex",
        "generated shapes (pretrain-small: shp)": out / "shp",
        "handwritten digits (heldout_check --dataset digits)": out / "digits",
    }
    if not (out / "glyphs" / "train").exists():
        write_glyphs(out / "glyphs" / "train", out / "glyphs" / "test", 64, 64, 100)
    if not (out / "textures" / "train").exists():
        make_textures(out / "textures" / "train", 64, size=64, seed=1)
    if not (out / "shapes" / "train").exists():
        make_shapes(out / "shapes" / "train", 64, size=64, seed=1)
    if not (out / "tex" / "train").exists():
        make_textures(out / "tex" / "train", 48, size=32, seed=21)
    if not (out / "shp" / "train").exists():
        make_shapes(out / "shp" / "train", 48, size=32, seed=23)
    if not (out / "digits" / "train").exists():
        write_digits(out / "digits" / "train", out / "digits" / "test", 64)
    return {name: folder / "train" for name, folder in sets.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/colour-check"))
    a = p.parse_args(argv)
    t0 = time.time()
    sets = {**write_sets(a.out), "Fashion-MNIST (the demo's training split)": "fashion-mnist:train@20000"}
    print("| set (training images) | px | colours alone (chance) | raw pixels, colour | raw pixels, grey | "
          "grey lead (standard error) | the model sees |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, data in sets.items():
        dataset = open_dataset(str(data), progress=False)
        for size in (32, 64):
            found = colour_check(dataset, size)
            if found is None:
                print(f"| {name} ({len(dataset):,}) | {size} | | | | | grey images: nothing to decide |")
                continue
            c, px = found["chroma"], found["pixels"]
            lead = px["grey_lead"]
            why = "colours say nothing" if c["says_nothing"] else "colours mislead"
            print(f"| {name} ({found['images']:,}) | {size} | {c['knn20']:.1f} ({c['chance']:.1f}) | "
                  f"{px['colour_knn20']:.1f} | {px['grey_knn20']:.1f} | {lead['points']:+.1f} ({lead['standard_error']:.1f}) | "
                  f"{f'**grey** ({why})' if found['grey'] else 'colour'} |")
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
