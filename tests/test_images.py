"""compress_edge.data.images: decoding odd files, scanning folders, the eval preprocessing (no torch needed)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from compress_edge.data.images import (
    IMAGE_EXTENSIONS,
    UnreadableImage,
    open_image,
    preprocess_batch,
    preprocess_eval,
    scan_images,
)
from compress_edge.errors import DataError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _noise(h=32, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save(path, arr=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_noise() if arr is None else arr).save(path, **kw)
    return path


@pytest.fixture
def propagate_logs():
    """The CLI turns propagation off for its own handler; caplog listens on the root logger."""
    log = logging.getLogger("compress_edge")
    propagate, level = log.propagate, log.level
    log.propagate = True
    log.setLevel(logging.DEBUG)
    yield
    log.propagate = propagate
    log.setLevel(level)


# -- open_image: files that are not usable images -------------------------------------------------------


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(UnreadableImage, match="empty file"):
        open_image(p)


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_truncated_file(tmp_path, fmt):
    full = _save(tmp_path / f"full.{fmt}", _noise(64, 64))
    data = full.read_bytes()
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(data[: len(data) // 2])
    open_image(full)  # the intact file reads
    with pytest.raises(UnreadableImage, match="truncated"):
        open_image(cut)


def test_non_image_file(tmp_path):
    p = tmp_path / "noise.png"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(UnreadableImage, match="not an image"):
        open_image(p)


def test_text_file_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("these are my holiday notes, not a photo\n", encoding="utf-8")
    with pytest.raises(UnreadableImage, match="not an image") as info:
        open_image(p)
    assert info.value.path == str(p)
    assert isinstance(info.value, DataError)


def test_missing_file(tmp_path):
    with pytest.raises(UnreadableImage, match="not found"):
        open_image(tmp_path / "nope.png")


@pytest.mark.parametrize("side", [16, 12], ids=["over-2x-limit-error", "over-limit-warning"])
def test_decompression_bomb(tmp_path, monkeypatch, side):
    p = _save(tmp_path / "big.png", _noise(side, side))
    small = _save(tmp_path / "small.png", _noise(8, 8))
    # 16x16 = 256 > 2 * 100: PIL raises; 12x12 = 144 > 100: PIL only warns, and we still refuse it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(UnreadableImage, match="decompression-bomb limit"):
            open_image(p)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert open_image(small).size == (8, 8)  # the limit itself is left alone
    assert Image.MAX_IMAGE_PIXELS == 100


# -- open_image: colour modes ---------------------------------------------------------------------------


def test_grayscale_becomes_three_equal_channels(tmp_path):
    g = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    p = tmp_path / "gray.png"
    Image.fromarray(g).save(p)
    img = open_image(p)
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (8, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(arr[..., c], g)


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.paste((0, 0, 0, 255), (0, 0, 8, 16))  # left half black
    cmyk.save(p, quality=95)
    assert Image.open(p).mode == "CMYK"
    arr = np.asarray(open_image(p)).astype(int)
    assert arr.shape == (16, 16, 3)
    np.testing.assert_allclose(arr[8, 13], [255, 0, 0], atol=12)
    np.testing.assert_allclose(arr[8, 2], [0, 0, 0], atol=12)


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 30000], [32768, 50000, 65000, 65535]], dtype=np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(values).save(p)
    assert Image.open(p).mode.startswith("I")
    arr = np.asarray(open_image(p))
    expected = np.rint(values / 257.0).astype(np.uint8)  # 65535 -> 255, 1000 -> 4 (clipping gives 255)
    for c in range(3):
        np.testing.assert_array_equal(arr[..., c], expected)
    assert arr[0, 2, 0] == 4


def test_palette_png_with_transparency(tmp_path):
    pal = Image.new("P", (4, 2))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    pal.putdata([0, 0, 1, 1, 0, 1, 0, 1])
    p = tmp_path / "pal.png"
    pal.save(p, transparency=0)  # index 0 (red) is fully transparent
    src = Image.open(p)
    assert src.mode == "P" and "transparency" in src.info
    arr = np.asarray(open_image(p))
    np.testing.assert_array_equal(arr[0, 0], [255, 255, 255])  # transparent -> white, not red
    np.testing.assert_array_equal(arr[0, 2], [0, 0, 255])


def test_palette_png_without_transparency(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    pal.putdata([0, 1])
    p = tmp_path / "pal.png"
    pal.save(p)
    arr = np.asarray(open_image(p))
    np.testing.assert_array_equal(arr[0], [[10, 20, 30], [200, 100, 50]])


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)  # invisible red
    rgba[0, 1] = (0, 0, 255, 255)  # opaque blue
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black
    rgba[1, 1] = (0, 200, 0, 255)
    p = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(p)
    arr = np.asarray(open_image(p)).astype(int)
    np.testing.assert_array_equal(arr[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(arr[0, 1], [0, 0, 255])
    np.testing.assert_allclose(arr[1, 0], [127, 127, 127], atol=1)
    np.testing.assert_array_equal(arr[1, 1], [0, 200, 0])


def test_la_composited_on_white(tmp_path):
    la = np.array([[[0, 0], [0, 255]]], dtype=np.uint8)
    p = tmp_path / "la.png"
    Image.fromarray(la, "LA").save(p)
    arr = np.asarray(open_image(p))
    np.testing.assert_array_equal(arr[0], [[255, 255, 255], [0, 0, 0]])


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((10, 20, 3), dtype=np.uint8)  # stored 20 wide, 10 high
    arr[:5, :5] = (255, 0, 0)  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    p = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(p, exif=exif, quality=95)
    img = open_image(p)
    assert img.size == (10, 20)  # displayed 10 wide, 20 high
    out = np.asarray(img).astype(int)
    assert out[2, 7, 0] > 200 and out[2, 7, 1] < 60  # top-left went to top-right
    assert out[2, 2, 0] < 60


# What a viewer shows for each EXIF orientation of the stored pixels (the EXIF 2.3 table), written
# with numpy so the test does not lean on PIL's own table.
_UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1, :],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, k=-1),  # turn 90 degrees clockwise to view
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the other diagonal
    8: lambda a: np.rot90(a, k=1),  # turn 90 degrees counter-clockwise to view
}


@pytest.mark.parametrize("orientation", sorted(_UPRIGHT))
def test_every_exif_orientation_of_a_png_is_undone(tmp_path, orientation):
    stored = np.random.default_rng(orientation).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"o{orientation}.png"
    Image.fromarray(stored).save(p, exif=exif)
    with Image.open(p) as check:  # the tag really is in the file
        check.load()
        assert check.getexif().get(0x0112) == orientation
    np.testing.assert_array_equal(np.asarray(open_image(p)), _UPRIGHT[orientation](stored))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_of_a_jpeg_is_undone(tmp_path, orientation):
    stored = np.zeros((16, 32, 3), dtype=np.uint8)
    stored[:8, :8] = (255, 0, 0)  # one red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(p, exif=exif, quality=95)
    got = np.asarray(open_image(p)).astype(int)
    want = _UPRIGHT[orientation](stored).astype(int)
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < 8  # JPEG is lossy; a wrong turn would differ by far more


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_damaged_exif_keeps_the_pixels(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    p = tmp_path / "bad-exif.png"
    Image.fromarray(arr).save(p, exif=b"Exif\x00\x00MM\x00*garbage")
    np.testing.assert_array_equal(np.asarray(open_image(p)), arr)



def test_orientation_comes_from_pil_not_a_hand_written_table():
    import inspect

    import compress_edge.data.images as images

    assert "ImageOps.exif_transpose" in inspect.getsource(images._exif_transpose)
    assert not hasattr(images, "_ORIENTATION")


# -- scanning folders --------------------------------------------------------------------------------------


def test_class_folder_labels(class_folder):
    scan = scan_images(class_folder)
    assert scan.labelled
    assert scan.classes == ["circle", "square", "stripes"]
    assert scan.labels == [0] * 6 + [1] * 6 + [2] * 6
    assert [p.parent.name for p in scan.files] == ["circle"] * 6 + ["square"] * 6 + ["stripes"] * 6
    assert [p.name for p in scan.files[:2]] == ["circle_000.png", "circle_001.png"]
    assert scan.skipped == []


def test_unlabelled_recursive_folder(tmp_path):
    root = tmp_path / "photos"
    _save(root / "b.png")
    _save(root / "a.jpg")
    _save(root / "trip" / "c.png")
    _save(root / "trip" / "deeper" / "d.bmp")
    (root / "notes.txt").write_text("not an image")
    scan = scan_images(root)
    assert not scan.labelled
    assert scan.classes == []
    assert scan.labels == [-1] * 4
    assert [p.relative_to(root).as_posix() for p in scan.files] == [
        "a.jpg",
        "b.png",
        "trip/c.png",
        "trip/deeper/d.bmp",
    ]


def test_one_subfolder_is_not_a_class_folder(tmp_path):
    _save(tmp_path / "only" / "x.png")
    assert not scan_images(tmp_path).labelled
    forced = scan_images(tmp_path, labelled=True)
    assert forced.classes == ["only"] and forced.labels == [0]


def test_forced_labelled_reports_loose_images(class_folder):
    _save(class_folder / "loose.png")
    auto = scan_images(class_folder)
    assert not auto.labelled and len(auto.files) == 19
    forced = scan_images(class_folder, labelled=True)
    assert len(forced.files) == 18
    assert forced.skipped == [(str(class_folder / "loose.png"), "outside the class subfolders")]


def test_hidden_files_ignored(tmp_path):
    _save(tmp_path / "a.png")
    _save(tmp_path / ".hidden.png")
    _save(tmp_path / ".thumbs" / "t.png")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    scan = scan_images(tmp_path)
    assert [p.name for p in scan.files] == ["a.png"]
    assert scan.skipped == []


def test_unicode_file_names(tmp_path):
    a = _save(tmp_path / "вещи" / "ünïcødé_图像.png")
    b = _save(tmp_path / "뷰" / "🙂 smile.jpg")
    scan = scan_images(tmp_path)
    assert scan.labelled and scan.classes == sorted(["вещи", "뷰"])
    assert set(scan.files) == {a, b}
    assert open_image(scan.files[0]).size == (32, 32)


def test_symlink_loop_terminates(tmp_path):
    root = tmp_path / "root"
    _save(root / "a" / "img.png")
    _save(root / "top.png")
    os.symlink(root, root / "a" / "loop")  # a/loop -> root -> a -> ...
    os.symlink(root / "a", root / "alias")  # a second name for a folder already read
    scan = scan_images(root)
    assert sorted(p.name for p in scan.files) == ["img.png", "top.png"]


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files.*pass a folder of images"):
        scan_images(tmp_path / "empty")


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        scan_images(tmp_path / "missing")


def test_file_instead_of_folder(tmp_path):
    p = _save(tmp_path / "x.png")
    with pytest.raises(DataError, match="is a file, not a folder"):
        scan_images(p)


def test_only_unreadable_files(tmp_path):
    (tmp_path / "a.jpg").write_text("text")
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(DataError, match="none of the 2 image files"):
        scan_images(tmp_path)


def test_unreadable_files_skipped_with_one_warning(tmp_path, caplog, propagate_logs):
    for i in range(3):
        _save(tmp_path / f"good{i}.png", _noise(seed=i))
    (tmp_path / "bad1.jpg").write_text("text")
    (tmp_path / "bad2.png").write_bytes(b"")
    with caplog.at_level(logging.DEBUG, logger="compress_edge"):
        scan = scan_images(tmp_path, workers=4)
    assert [p.name for p in scan.files] == ["good0.png", "good1.png", "good2.png"]
    assert [os.path.basename(p) for p, _ in scan.skipped] == ["bad1.jpg", "bad2.png"]
    warnings_ = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings_) == 1
    assert "skipped 2 unreadable image files" in warnings_[0].getMessage()
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("bad1.jpg" in m and "not an image" in m for m in debug)
    assert any("bad2.png" in m and "empty file" in m for m in debug)


def test_progress_bar_path(tmp_path):
    for i in range(5):
        _save(tmp_path / f"{i}.png", _noise(8, 8, seed=i))
    assert len(scan_images(tmp_path, progress=True).files) == 5


def test_extensions():
    assert {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"} == set(
        IMAGE_EXTENSIONS
    )


# -- eval preprocessing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(37, 23), (23, 37), (30, 30), (9, 12)])
def test_preprocess_eval_matches_torchvision(hw):
    tv = pytest.importorskip("torchvision.transforms")
    img = Image.fromarray(_noise(*hw, seed=3))
    out = preprocess_eval(img, 16, MEAN, STD)
    assert out.shape == (3, 16, 16) and out.dtype == np.float32
    ref = tv.Compose([tv.Resize(16), tv.CenterCrop(16), tv.ToTensor(), tv.Normalize(MEAN, STD)])(img)
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5)


def test_preprocess_eval_values():
    img = Image.new("RGB", (40, 20), (255, 0, 128))
    out = preprocess_eval(img, 10, (0.5, 0.5, 0.5), (0.5, 0.25, 0.5))
    np.testing.assert_allclose(out[0], 1.0, atol=1e-6)  # (1 - .5) / .5
    np.testing.assert_allclose(out[1], -2.0, atol=1e-6)  # (0 - .5) / .25
    np.testing.assert_allclose(out[2], (128 / 255 - 0.5) / 0.5, atol=1e-6)


def test_preprocess_batch_paths_and_images(tmp_path):
    paths = [_save(tmp_path / f"{i}.png", _noise(20 + i, 30, seed=i)) for i in range(5)]
    batch = preprocess_batch(paths, 12, MEAN, STD, workers=3)
    assert batch.shape == (5, 3, 12, 12) and batch.dtype == np.float32
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(batch[i], preprocess_eval(open_image(p), 12, MEAN, STD))
    mixed = preprocess_batch([open_image(paths[0]), str(paths[1])], 12, MEAN, STD)
    np.testing.assert_array_equal(mixed, batch[:2])
    assert preprocess_batch([], 12, MEAN, STD).shape == (0, 3, 12, 12)
    (tmp_path / "bad.jpg").write_text("x")
    with pytest.raises(UnreadableImage):
        preprocess_batch([paths[0], tmp_path / "bad.jpg"], 12, MEAN, STD)


def test_images_module_imports_without_torch(tmp_path):
    p = _save(tmp_path / "x.png", _noise(10, 14))
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # any 'import torch' now fails
        "sys.modules['torchvision'] = None\n"
        "from compress_edge.data.images import open_image, preprocess_eval, scan_images\n"
        f"img = open_image({str(p)!r})\n"
        "out = preprocess_eval(img, 8, (0.5,) * 3, (0.5,) * 3)\n"
        f"assert len(scan_images({str(tmp_path)!r}).files) == 1\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print(out.shape)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "(3, 8, 8)"
