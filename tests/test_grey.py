"""Grey input: a model that mixes the colours away in its first layer (``grey_input``), the colour check
that turns it on in ``pretrain`` when the colours mislead, and ``distill`` giving the student what its
teacher sees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from compress_edge.cli import app
from compress_edge.errors import ModelError
from compress_edge.models.files import load_model, save_model, spec_for
from compress_edge.models.registry import create_model, rebuild
from compress_edge.models.spec import LUMA_WEIGHTS, is_grey_input

runner = CliRunner()


def _recoloured(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``x`` with a random colour added to every pixel along a direction the luma weights do not see."""
    w = torch.tensor(LUMA_WEIGHTS)
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(x.shape[0], 3, x.shape[2], x.shape[3], generator=g)
    d = d - (w.view(1, 3, 1, 1) * d).sum(1, keepdim=True) * w.view(1, 3, 1, 1) / (w @ w)
    return x + d


def write_folder(root, *, colour_is_class: bool, per_class: int = 100, size: int = 32, seed: int = 0):
    """Three classes of letters (A, H, O in Pillow's own font), each drawn at a random size, angle and
    place, with noise. colour_is_class False: the class is the letter and every image has its own random
    pair of colours (the README's letters data set in small); True: the class is the colour pair and the
    letter is random."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    big = size * 4  # drawn large, then shrunk
    palette = [(200, 30, 30), (30, 200, 40), (40, 60, 220)]
    for ci, name in enumerate("AHO"):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            if colour_is_class:
                bg, letter = np.array(palette[ci]), "AHO"[int(rng.integers(3))]
                fg = (bg + 128) % 256
            else:
                bg, letter = rng.integers(0, 256, size=3), name
                fg = (bg + rng.integers(90, 166, size=3)) % 256
            font = ImageFont.load_default(size=int(big * rng.uniform(0.45, 0.8)))
            layer = Image.new("L", (big, big), 0)
            ImageDraw.Draw(layer).text((big / 2, big / 2), letter, fill=255, font=font, anchor="mm")
            layer = layer.rotate(rng.uniform(-25, 25), resample=Image.Resampling.BICUBIC,
                                 translate=tuple(rng.uniform(-0.12, 0.12, size=2) * big))
            alpha = np.asarray(layer, dtype=np.float32)[..., None] / 255
            img = Image.fromarray(((1 - alpha) * bg + alpha * fg).astype(np.uint8)).resize((size, size))
            noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, size=(size, size, 3))
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


def test_a_grey_model_ignores_colour_and_saves_the_keys_of_a_colour_one(tmp_path):
    torch.manual_seed(0)
    grey = create_model("mobilenet_v3_small", small_input=True, grey_input=True).eval()
    torch.manual_seed(0)
    colour = create_model("mobilenet_v3_small", small_input=True).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        same = (grey(x) - grey(_recoloured(x))).abs().max().item()
        moved = (colour(x) - colour(_recoloured(x))).abs().max().item()
    assert same < 1e-5 < 1e-3 < moved, (same, moved)  # the colour model does see the change
    assert grey.state_dict().keys() == colour.state_dict().keys()  # nothing new to save or load
    assert grey.arch_kwargs["grey_input"] is True and "grey_input" not in colour.arch_kwargs

    save_model(grey, spec_for(grey, image_size=32), tmp_path / "grey")
    loaded, spec = load_model(tmp_path / "grey")
    assert is_grey_input(spec)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), grey(x))
    assert rebuild("mobilenet_v3_small", {"small_input": True, "grey_input": "yes"}).arch_kwargs["grey_input"]
    with pytest.raises(ModelError, match="grey_input takes true or false"):
        create_model("mobilenet_v3_small", grey_input="maybe")


def test_the_onnx_export_of_a_grey_model_ignores_colour(tmp_path):
    from compress_edge.export import onnx as ce_onnx
    from compress_edge.export.runtimes import open_embedder

    torch.manual_seed(1)
    model = create_model("mobilenet_v3_small", small_input=True, grey_input=True).eval()
    spec = spec_for(model, image_size=32)
    ce_onnx.export_onnx(model, spec, tmp_path / "m.onnx", exporter="torchscript")
    embedder = open_embedder(tmp_path / "m.onnx")
    assert is_grey_input(embedder.spec)  # the spec in the ONNX metadata says so
    x = torch.rand(4, 3, 32, 32)
    a, b = embedder.embed(x.numpy()), embedder.embed(_recoloured(x, seed=3).numpy())
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(a, ref, atol=1e-4)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_the_colour_check_says_grey_only_where_colours_mislead(tmp_path):
    from compress_edge.data.datasets import open_dataset
    from compress_edge.eval.quality import colour_check

    shapes = open_dataset(str(write_folder(tmp_path / "shapes", colour_is_class=False)), progress=False)
    found = colour_check(shapes, 32)
    assert found["grey"] and found["chroma"]["says_nothing"] and found["pixels"]["mislead"], found
    assert abs(found["chroma"]["knn20"] - found["chroma"]["chance"]) < 10, found  # random colours: chance
    painted = open_dataset(str(write_folder(tmp_path / "painted", colour_is_class=True)), progress=False)
    found = colour_check(painted, 32)
    assert not found["grey"] and found["chroma"]["knn20"] > 90 > 50 > found["chroma"]["chance"], found
    assert found["pixels"]["colour_knn20"] > found["pixels"]["grey_knn20"], found

    from PIL import Image
    for p in (tmp_path / "shapes").rglob("*.png"):  # grey images: nothing to decide
        q = tmp_path / "gray" / p.relative_to(tmp_path / "shapes")
        q.parent.mkdir(parents=True, exist_ok=True)
        Image.open(p).convert("L").save(q)
    assert colour_check(open_dataset(str(tmp_path / "gray"), progress=False), 32) is None


def test_pretrain_sees_grey_where_colours_mislead_and_distill_follows_its_teacher(tmp_path):
    data = write_folder(tmp_path / "shapes", colour_is_class=False)
    common = ["--arch", "mobilenet_v3_small", "--epochs", "1", "--batch-size", "16", "--image-size", "32",
              "--workers", "0", "--no-progress"]
    result = runner.invoke(app, ["pretrain", str(data), *common, "--out", str(tmp_path / "pre")])
    assert result.exit_code == 0, result.output
    assert "the colours say nothing of the class" in " ".join(result.output.split())  # the log wraps
    _, spec = load_model(tmp_path / "pre" / "student")
    assert is_grey_input(spec)
    config = json.loads((tmp_path / "pre" / "config.json").read_text())
    assert config["resolved"]["grey_input"] is True and config["resolved"]["colour_check"]["grey"], config
    resumed = runner.invoke(app, ["pretrain", "--resume", str(tmp_path / "pre"), "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    assert "colour check" not in resumed.output  # a resumed run keeps what it started with

    from compress_edge.train.pretrain import load_pretrain_options

    assert load_pretrain_options(tmp_path / "pre").grey is True
    del config["resolved"]["grey_input"]  # a run from before the colour check existed sees colour
    (tmp_path / "pre" / "config.json").write_text(json.dumps(config))
    assert load_pretrain_options(tmp_path / "pre").grey is False

    kept = runner.invoke(app, ["pretrain", str(data), *common, "--colour", "--out", str(tmp_path / "pre-colour")])
    assert kept.exit_code == 0, kept.output
    assert not is_grey_input(load_model(tmp_path / "pre-colour" / "student")[1])
    clash = runner.invoke(app, ["pretrain", str(data), *common, "--colour", "--arch-kwargs", "grey_input=true",
                                "--out", str(tmp_path / "pre-clash")])
    assert clash.exit_code == 1 and "disagree" in clash.output, clash.output

    student = runner.invoke(app, ["distill", str(data), "--teacher", str(tmp_path / "pre"), "--epochs", "1",
                                  "--batch-size", "16", "--workers", "0", "--no-progress", "--out",
                                  str(tmp_path / "distill")])
    assert student.exit_code == 0, student.output
    _, student_spec = load_model(tmp_path / "distill" / "student")
    assert is_grey_input(student_spec)
    quality = json.loads((tmp_path / "distill" / "quality.json").read_text())
    assert quality["heldout"]["raw_pixels"] == "grey", quality  # compared with the pixels it sees



def test_index_and_search_see_grey_through_a_grey_model(tmp_path):
    """The grey copy of a gallery image finds that image at a score of (nearly) one through a grey model,
    though its pixels lost their colours; through the same network seeing colour it does not. Random
    networks with their batch-norm statistics re-estimated on the images, so that the check does not
    wait for a training run."""
    from PIL import Image

    from compress_edge.data.datasets import open_dataset
    from compress_edge.eval.quality import random_weights_model

    data = write_folder(tmp_path / "letters", colour_is_class=False)
    original = data / "H" / "007.png"
    Image.open(original).convert("L").convert("RGB").save(tmp_path / "grey-copy.png")
    top = {}
    for grey in (True, False):
        net = create_model("mobilenet_v3_small", small_input=True, grey_input=grey)
        spec = spec_for(net, image_size=32)
        save_model(random_weights_model(spec, open_dataset(str(data), progress=False)), spec, tmp_path / f"m{grey}")
        built = runner.invoke(app, ["index", "build", str(tmp_path / f"m{grey}"), str(data), "--out",
                                    str(tmp_path / f"index{grey}"), "--no-progress"])
        assert built.exit_code == 0, built.output
        found = runner.invoke(app, ["search", str(tmp_path / f"index{grey}"), str(tmp_path / "grey-copy.png"),
                                    "-k", "1", "--json"])
        assert found.exit_code == 0, found.output
        [top[grey]] = json.loads(found.stdout)[0]["neighbours"]
    assert Path(top[True]["path"]).resolve() == original.resolve() and top[True]["score"] > 0.99, top
    assert top[False]["score"] < 0.99, top  # the colours were part of what the colour network saw
