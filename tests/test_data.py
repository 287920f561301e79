"""compress_edge.data: datasets, Fashion-MNIST files and download, transforms, loaders."""

from __future__ import annotations

import functools
import gzip
import http.server
import pickle
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compress_edge.data import datasets as D
from compress_edge.data import fashion_mnist as F
from compress_edge.data import loaders as L
from compress_edge.data import transforms as T
from compress_edge.data.images import open_image, preprocess_eval
from compress_edge.errors import DataError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SYSTEM_FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_system_fmnist = pytest.mark.skipif(
    not (SYSTEM_FMNIST / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install dataset-fashion-mnist",
)


@pytest.fixture
def no_fmnist(tmp_path, monkeypatch):
    """Hide every copy of Fashion-MNIST on this machine: system folder, cache, $COMPRESS_EDGE_DATA."""
    monkeypatch.setattr(F, "SYSTEM_DATA_DIRS", ())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(F.DATA_ENV, raising=False)
    monkeypatch.delenv(F.FMNIST_URL_ENV, raising=False)
    return tmp_path


def write_idx(folder: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool = False) -> None:
    """Write an IDX pair as the Fashion-MNIST files of ``split``."""
    folder.mkdir(parents=True, exist_ok=True)
    stems = F._FMNIST_FILES[split]
    n, r, c = images.shape
    blobs = [
        (0x803).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, r, c)) + images.tobytes(),
        (0x801).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.astype(np.uint8).tobytes(),
    ]
    for stem, blob in zip(stems, blobs, strict=True):
        if gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(blob))
        else:
            (folder / stem).write_bytes(blob)


def small_fmnist(n=7, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


# -- folders ------------------------------------------------------------------------------------------------


def test_class_folder_dataset_items(class_folder):
    ds = D.open_dataset(str(class_folder))
    assert ds.kind == "class-folder" and ds.has_labels and len(ds) == 18
    assert ds.classes == ["circle", "square", "stripes"]
    assert ds.labels.dtype == np.int64
    np.testing.assert_array_equal(ds.labels, [0] * 6 + [1] * 6 + [2] * 6)
    assert ds.class_counts() == [6, 6, 6]
    img, label, index = ds[7]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (24, 24)
    assert (label, index) == (1, 7)
    assert Path(ds.files[7]).parent.name == "square"
    np.testing.assert_array_equal(np.asarray(img), np.asarray(Image.open(ds.files[7]).convert("RGB")))
    assert ds[-1][2] == 17
    with pytest.raises(IndexError):
        ds[18]


def test_unlabelled_folder_dataset(tmp_path):
    for i, sub in enumerate(["", "x", "x/y"]):
        d = tmp_path / "imgs" / sub
        d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10 + i, 8), (i * 40, 0, 0)).save(d / f"{i}.png")
    ds = D.open_dataset(str(tmp_path / "imgs"), transform=T.eval_transform(8, MEAN, STD))
    assert ds.kind == "image-folder" and not ds.has_labels and ds.classes == []
    np.testing.assert_array_equal(ds.labels, [-1, -1, -1])
    img, label, index = ds[2]
    assert isinstance(img, torch.Tensor) and img.shape == (3, 8, 8) and img.dtype == torch.float32
    assert (label, index) == (-1, 2)


def test_a_near_class_folder_read_without_labels_says_why(class_folder, caplog):
    import logging
    import shutil

    shutil.copy(sorted((class_folder / "circle").iterdir())[0], class_folder / "stray.png")
    (class_folder / "empty").mkdir()
    with caplog.at_level(logging.WARNING, logger="compress_edge"):
        ds = D.open_dataset(str(class_folder))
    assert ds.kind == "image-folder" and not ds.has_labels
    (line,) = [r.getMessage() for r in caplog.records if "unlabelled image folder" in r.getMessage()]
    assert "1 image(s) at its top level (stray.png)" in line and "without images (empty)" in line
    # Many images at the top: a folder meant to be read without labels, and no warning.
    for i in range(4):
        shutil.copy(class_folder / "stray.png", class_folder / f"more{i}.png")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="compress_edge"):
        D.open_dataset(str(class_folder))
    assert not [r for r in caplog.records if "unlabelled image folder" in r.getMessage()]


def test_folder_dataset_skips_unreadable(class_folder):
    (class_folder / "square" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = D.open_dataset(str(class_folder))
    assert len(ds) == 18 and len(ds.skipped) == 1
    assert ds.skipped[0][0].endswith("broken.png")
    assert ds.describe()["skipped"][0]["path"].endswith("broken.png")


def test_folder_fingerprint(class_folder):
    a = D.open_dataset(str(class_folder)).fingerprint()
    assert len(a) == 64
    assert D.open_dataset(str(class_folder) + "/").fingerprint() == a
    Image.new("RGB", (5, 5)).save(class_folder / "circle" / "zzz.png")
    assert D.open_dataset(str(class_folder)).fingerprint() != a


def test_relative_folder_under_data_root(class_folder, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path / "images" / "circle")
    ds = D.open_dataset("images", data_root=tmp_path)
    assert len(ds) == 18


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("cifar10:train", "unknown dataset 'cifar10:train'; DATA is a class folder"),
        ("fashion-mnist", "say which split"),
        ("fashion-mnist:val", "unknown Fashion-MNIST split"),
        ("/no/such/folder", "no such folder.*fashion-mnist:train"),
        ("", "DATA is empty"),
    ],
)
def test_bad_data_argument(data, message):
    with pytest.raises(DataError, match=message):
        D.open_dataset(data)


def test_download_flag_with_a_folder(class_folder):
    with pytest.raises(DataError, match="--download only applies"):
        D.open_dataset(str(class_folder), download=True)


def test_dataset_is_picklable(class_folder):
    ds = D.open_dataset(str(class_folder), transform=T.TrainAugment(16, MEAN, STD))
    back = pickle.loads(pickle.dumps(ds))
    assert back.files == ds.files and back.classes == ds.classes
    torch.manual_seed(0)
    a = ds[3][0]
    torch.manual_seed(0)
    b = back[3][0]
    assert torch.equal(a, b)


# -- Fashion-MNIST ----------------------------------------------------------------------------------------------


@needs_system_fmnist
def test_fashion_mnist_from_system_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(F.DATA_ENV, raising=False)
    train = D.open_dataset("fashion-mnist:train")
    test = D.open_dataset("fashion-mnist:test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.location == str(SYSTEM_FMNIST)
    assert train.classes == F.FASHION_MNIST_CLASSES and len(train.classes) == 10
    assert train.has_labels
    assert test.labels.min() == 0 and test.labels.max() == 9
    assert test.class_counts() == [1000] * 10
    img, label, index = test[0]
    assert img.mode == "RGB" and img.size == (28, 28)
    arr = np.asarray(img)
    np.testing.assert_array_equal(arr[..., 0], arr[..., 2])
    assert arr.max() > 0  # not a blank image
    assert label == 9 and index == 0  # the first test image is an ankle boot
    assert test.files[42] == "fashion-mnist:test/00042"
    assert len(test.fingerprint()) == 64 and test.fingerprint() != train.fingerprint()


def test_fashion_mnist_from_data_root(no_fmnist):
    images, labels = small_fmnist()
    write_idx(no_fmnist / "mydata" / "fashion-mnist", "test", images, labels)
    ds = D.open_dataset("fashion-mnist:test", data_root=no_fmnist / "mydata")
    assert len(ds) == 7
    assert ds.location == str(no_fmnist / "mydata" / "fashion-mnist")
    np.testing.assert_array_equal(ds.labels, labels)
    for i in (0, 6):
        np.testing.assert_array_equal(np.asarray(ds.get_image(i))[..., 1], images[i])
    # The same data gzipped gives the same fingerprint (it hashes the IDX payload).
    write_idx(no_fmnist / "gz", "test", images, labels, gz=True)
    assert D.open_dataset("fashion-mnist:test", data_root=no_fmnist / "gz").fingerprint() == ds.fingerprint()


@needs_system_fmnist
def test_fashion_mnist_from_data_root_copy_of_debian_files(no_fmnist):
    root = no_fmnist / "copy"
    root.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(SYSTEM_FMNIST / name, root / name)
    ds = D.open_dataset("fashion-mnist:test", data_root=root)
    assert len(ds) == 10000 and ds.location == str(root)
    with pytest.raises(DataError, match="not found"):
        D.open_dataset("fashion-mnist:train", data_root=root)  # only the test split was copied


def test_fashion_mnist_env_folder(no_fmnist, monkeypatch):
    images, labels = small_fmnist(3)
    write_idx(no_fmnist / "envdata", "train", images, labels, gz=True)
    monkeypatch.setenv(F.DATA_ENV, str(no_fmnist / "envdata"))
    assert len(D.open_dataset("fashion-mnist:train")) == 3


@pytest.mark.parametrize("damage", ["magic", "short", "gzip", "count", "label"])
def test_damaged_idx_refused(no_fmnist, damage):
    images, labels = small_fmnist()
    folder = no_fmnist / "bad"
    write_idx(folder, "test", images, labels, gz=(damage == "gzip"))
    img_file = folder / ("t10k-images-idx3-ubyte" + (".gz" if damage == "gzip" else ""))
    raw = img_file.read_bytes()
    if damage == "magic":
        img_file.write_bytes((0x801).to_bytes(4, "big") + raw[4:])
        expected = "is damaged .*apt-get install --reinstall dataset-fashion-mnist"
    elif damage == "short":
        img_file.write_bytes(raw[:-100])
        expected = r"is damaged \(shape '\[7, 28, 28\]' is invalid"
    elif damage == "gzip":
        img_file.write_bytes(raw[: len(raw) // 2])
        expected = "is damaged"
    elif damage == "count":
        write_idx(folder, "test", images[:5], labels[:5])
        write_idx(folder / "tmp", "test", images, labels)
        shutil.copy(folder / "tmp" / "t10k-labels-idx1-ubyte", folder / "t10k-labels-idx1-ubyte")
        expected = "holds 5 images but"
    else:
        write_idx(folder, "test", images, np.full(7, 12, dtype=np.uint8))
        expected = "has label 12"
    with pytest.raises(DataError, match=expected):
        D.open_dataset("fashion-mnist:test", data_root=folder)


def test_labels_file_in_place_of_images_is_named(no_fmnist):
    images, labels = small_fmnist()
    folder = no_fmnist / "swapped"
    write_idx(folder, "test", images, labels)
    shutil.copy(folder / "t10k-labels-idx1-ubyte", folder / "t10k-images-idx3-ubyte")
    with pytest.raises(DataError, match="is not an IDX images file"):
        D.open_dataset("fashion-mnist:test", data_root=folder)


@needs_system_fmnist
def test_fashion_mnist_matches_torchvisions_dataset_on_the_debian_files(no_fmnist):
    # torchvision's FashionMNIST class reads the raw files its download step unpacks; unpack Debian's
    # .gz files the same way and compare every pixel and label with what open_dataset gives.
    from torchvision.datasets import FashionMNIST

    raw = no_fmnist / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte",
                 "train-labels-idx1-ubyte"):  # torchvision checks that all four are there
        with gzip.open(SYSTEM_FMNIST / (name + ".gz"), "rb") as src:
            (raw / name).write_bytes(src.read())
    reference = FashionMNIST(str(no_fmnist / "tv"), train=False, download=False)
    ours = D.open_dataset("fashion-mnist:test", data_root=SYSTEM_FMNIST)
    assert ours.location == str(SYSTEM_FMNIST)
    np.testing.assert_array_equal(ours.images, reference.data.numpy())
    np.testing.assert_array_equal(ours.labels, reference.targets.numpy())
    assert list(reference.classes) == F.FASHION_MNIST_CLASSES
    # The raw (unpacked) files read the same as the .gz ones.
    raw_ds = D.open_dataset("fashion-mnist:test", data_root=raw)
    np.testing.assert_array_equal(raw_ds.images, ours.images)
    assert raw_ds.fingerprint() == ours.fingerprint()


def test_fashion_mnist_is_read_with_torchvisions_reader():
    import inspect

    source = inspect.getsource(F._read_idx_cached)
    assert "read_image_file" in source and "read_label_file" in source
    assert "frombuffer" not in source and "from_bytes" not in source  # no hand-written IDX parser left


def test_no_progress_hides_the_checking_images_bar(tmp_path, capfd):
    from compress_edge.data.images import _PROGRESS_MIN_FILES

    rng = np.random.default_rng(0)
    for i in range(_PROGRESS_MIN_FILES):
        Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(tmp_path / f"{i:04d}.png")
    assert len(D.open_dataset(str(tmp_path), progress=False)) == _PROGRESS_MIN_FILES
    assert "checking images" not in capfd.readouterr().err
    assert len(D.open_dataset(str(tmp_path))) == _PROGRESS_MIN_FILES
    assert "checking images" in capfd.readouterr().err
    # A command's --no-progress reaches bars in code it does not pass the flag to.
    from compress_edge.progress import bars, bars_enabled

    with bars(False):
        assert len(D.open_dataset(str(tmp_path))) == _PROGRESS_MIN_FILES
        with bars(True):  # an inner "on" does not override the command's "off"
            assert not bars_enabled()
    assert "checking images" not in capfd.readouterr().err
    assert bars_enabled()


def test_missing_fashion_mnist_message(no_fmnist):
    with pytest.raises(DataError) as info:
        D.open_dataset("fashion-mnist:train")
    msg = str(info.value)
    assert "apt-get install dataset-fashion-mnist, or pass --download, or --data-root DIR" in msg
    assert str(no_fmnist / "cache" / "compress-edge") in msg


class _Server:
    """A local http.server on 127.0.0.1 serving ``folder`` (in a thread)."""

    def __init__(self, folder: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requested: list[str] = []

    def log_message(self, *args) -> None:
        _QuietHandler.requested.append(self.path)


@pytest.fixture
def served(tmp_path):
    folder = tmp_path / "www"
    folder.mkdir()
    server = _Server(folder)
    _QuietHandler.requested = []
    yield folder, server.url
    server.close()


@needs_system_fmnist
def test_download_from_local_server(no_fmnist, served, monkeypatch):
    www, url = served
    shutil.copytree(SYSTEM_FMNIST, www / "mirror")
    # The first base URL has nothing (404): the mirror must be tried next.
    monkeypatch.setenv(F.FMNIST_URL_ENV, f"{url}missing,{url}mirror/")
    with pytest.raises(DataError, match="pass --download"):
        D.open_dataset("fashion-mnist:test")
    ds = D.open_dataset("fashion-mnist:test", download=True)
    dest = no_fmnist / "cache" / "compress-edge" / "fashion-mnist"
    assert ds.location == str(dest) and len(ds) == 10000
    assert sorted(p.name for p in dest.iterdir()) == sorted(F._FMNIST_GZ_MD5)  # no temporary files left
    for p in dest.iterdir():
        assert p.read_bytes() == (SYSTEM_FMNIST / p.name).read_bytes()
    assert "/missing/t10k-images-idx3-ubyte.gz" in _QuietHandler.requested
    # Found now without downloading again.
    _QuietHandler.requested = []
    assert len(D.open_dataset("fashion-mnist:train", download=True)) == 60000
    assert _QuietHandler.requested == []


def test_download_refuses_bad_checksum(no_fmnist, served, monkeypatch):
    www, url = served
    for name in F._FMNIST_GZ_MD5:
        (www / name).write_bytes(gzip.compress(b"not fashion-mnist"))
    monkeypatch.setenv(F.FMNIST_URL_ENV, url)
    dest = no_fmnist / "dl"
    with pytest.raises(DataError, match="could not download train-images-idx3-ubyte.gz.*checksum mismatch"):
        D.open_dataset("fashion-mnist:test", data_root=dest, download=True)
    assert not any((dest / "fashion-mnist").iterdir())  # nothing half-written left behind


# -- transforms -------------------------------------------------------------------------------------------------


def _photo(w=40, h=30, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.uint8)
    arr = (arr // 2 + rng.integers(0, 128, arr.shape)).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize("size", [(40, 30), (28, 28), (17, 50)])
def test_eval_transform_equals_preprocess_eval(size):
    img = _photo(*size)
    t = T.eval_transform(24, MEAN, STD)
    out = t(img)
    assert out.dtype == torch.float32 and out.shape == (3, 24, 24)
    ref = preprocess_eval(img, 24, MEAN, STD)
    assert np.array_equal(out.numpy(), ref)  # bit-identical, not just close


def test_eval_transform_on_dataset_matches_device_path(class_folder):
    ds = D.open_dataset(str(class_folder), transform=T.eval_transform(16, MEAN, STD))
    tensor = ds[4][0]
    device_side = preprocess_eval(open_image(ds.files[4]), 16, MEAN, STD)
    assert np.array_equal(tensor.numpy(), device_side)


def test_train_augment_replay_is_exact():
    aug = T.TrainAugment(32, MEAN, STD)
    img = _photo()
    params = aug.sample_params(np.random.default_rng(5), *img.size)
    assert params.shape == (T.PARAM_DIM,) and params.dtype == np.float32
    a, b = aug.apply(img, params), aug.apply(img, params.copy())
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    # The same seed gives the same parameters; a round trip through float32 storage changes nothing.
    again = aug.sample_params(np.random.default_rng(5), *img.size)
    np.testing.assert_array_equal(params, again)
    stored = np.frombuffer(params.tobytes(), dtype=np.float32)
    assert torch.equal(aug.apply(img, stored), a)


def test_train_augment_different_seeds_differ():
    aug = T.TrainAugment(32, MEAN, STD)
    img = _photo()
    p1 = aug.sample_params(np.random.default_rng(1), *img.size)
    p2 = aug.sample_params(np.random.default_rng(2), *img.size)
    assert not np.array_equal(p1, p2)
    assert not torch.equal(aug.apply(img, p1), aug.apply(img, p2))
    # __call__ follows torch's RNG: same torch seed, same view; different seed, different view.
    torch.manual_seed(0)
    v1 = aug(img)
    torch.manual_seed(0)
    v2 = aug(img)
    torch.manual_seed(1)
    v3 = aug(img)
    assert torch.equal(v1, v2) and not torch.equal(v1, v3)


def test_train_augment_params_are_sane():
    aug = T.TrainAugment(32, MEAN, STD, scale=(0.3, 0.9))
    rng = np.random.default_rng(0)
    S = T.SLOTS
    ps = np.stack([aug.sample_params(rng, 60, 40) for _ in range(400)])
    assert (ps[:, S.top] >= 0).all() and (ps[:, S.top] + ps[:, S.height] <= 40).all()
    assert (ps[:, S.left] >= 0).all() and (ps[:, S.left] + ps[:, S.width] <= 60).all()
    area = ps[:, S.height] * ps[:, S.width] / (60 * 40)
    assert area.min() > 0.25 and area.max() < 0.95
    # The probabilities: flip 0.5, jitter 0.8, gray 0.2, blur 0.5 (loose bounds for 400 draws).
    assert 0.4 < ps[:, S.flip].mean() < 0.6
    assert 0.7 < ps[:, S.jitter].mean() < 0.9
    assert 0.12 < ps[:, S.gray].mean() < 0.28
    blurred = ps[:, S.blur] > 0
    assert 0.4 < blurred.mean() < 0.6 and ps[blurred, S.blur].min() >= 0.1 and ps[:, S.blur].max() <= 2.0
    for row in ps[:5]:
        assert sorted(row[S.order : S.order + 4].astype(int)) == [0, 1, 2, 3]
    off = ps[ps[:, S.jitter] == 0]
    np.testing.assert_array_equal(off[:, S.brightness : S.hue + 1], np.tile([1, 1, 1, 0], (len(off), 1)))


def test_train_augment_without_randomness_is_the_eval_view():
    # Everything switched off and the whole square image cropped: only resize + the shared conversion.
    aug = T.TrainAugment(
        16, MEAN, STD, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0, jitter_p=0, gray_p=0, blur_p=0
    )
    img = _photo(30, 30)
    out = aug.apply(img, aug.sample_params(np.random.default_rng(0), 30, 30))
    assert torch.equal(out, T.eval_transform(16, MEAN, STD)(img))


def test_train_augment_rejects_params_for_another_size():
    aug = T.TrainAugment(16, MEAN, STD)
    params = aug.sample_params(np.random.default_rng(0), 40, 30)
    with pytest.raises(ValueError, match="drawn for a 40x30 image"):
        aug.apply(_photo(30, 40), params)
    with pytest.raises(ValueError, match="shape"):
        aug.apply(_photo(), params[:-1])


def test_flip_and_gray_do_what_they_say():
    aug = T.TrainAugment(16, MEAN, STD, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0, blur_p=0)
    img = _photo(20, 20)
    base = aug.sample_params(np.random.default_rng(0), 20, 20)
    base[T.SLOTS.flip] = 0
    base[T.SLOTS.gray] = 0
    plain = aug.apply(img, base)
    flipped = base.copy()
    flipped[T.SLOTS.flip] = 1
    assert torch.equal(aug.apply(img, flipped), plain.flip(-1))
    gray = base.copy()
    gray[T.SLOTS.gray] = 1
    g = aug.apply(img, gray)
    # Three equal channels before normalisation.
    raw = g * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    torch.testing.assert_close(raw[0], raw[1], atol=1e-5, rtol=0)


# -- loaders ------------------------------------------------------------------------------------------------------


def test_make_loader_batches(class_folder):
    ds = D.open_dataset(str(class_folder), transform=T.eval_transform(16, MEAN, STD))
    loader = L.make_loader(ds, batch_size=5, shuffle=True, workers=0, seed=0)
    seen = []
    for images, labels, index in loader:
        assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.float32
        np.testing.assert_array_equal(labels.numpy(), ds.labels[index.numpy()])
        seen.extend(index.tolist())
    assert sorted(seen) == list(range(18)) and seen != list(range(18))
    assert len(L.make_loader(ds, batch_size=5, workers=0, drop_last=True)) == 3


def test_make_loader_workers_give_distinct_views(class_folder):
    ds = D.open_dataset(str(class_folder), transform=T.TrainAugment(16, MEAN, STD))
    sub = torch.utils.data.Subset(ds, [0] * 4)  # the same image four times
    loader = L.make_loader(sub, batch_size=1, workers=2)
    assert loader.persistent_workers
    views = [b[0][0] for b in loader]
    assert len(views) == 4
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[2], views[3])


def test_subset_syntax_takes_n_images_in_order():
    full = D.open_dataset("fashion-mnist:test")
    sub = D.open_dataset("fashion-mnist:test@500")
    assert len(sub) == 500 and sub.classes == full.classes
    assert list(sub.files) == sorted(sub.files)  # original order kept
    i = 123
    j = full.files.index(sub.files[i])
    assert sub.labels[i] == full.labels[j]
    assert np.array_equal(np.asarray(sub.get_image(i)), np.asarray(full.get_image(j)))
    assert sub.fingerprint() != full.fingerprint()
    assert sub.fingerprint() == D.open_dataset("fashion-mnist:test@500").fingerprint()
    assert len(np.unique(sub.labels)) == 10
    with pytest.raises(DataError, match="has 10000"):
        D.open_dataset("fashion-mnist:test@20000")


def test_class_folders_that_are_symlinks_into_each_other_keep_their_labels(tmp_path, class_folder):
    # The real class folders live elsewhere; DATA holds symlinks to them, and each links into the next.
    root = tmp_path / "linked"
    root.mkdir()
    for name in ("circle", "square", "stripes"):
        (root / name).symlink_to(class_folder / name, target_is_directory=True)
    (class_folder / "circle" / "see-square").symlink_to("../square", target_is_directory=True)
    (class_folder / "square" / "see-stripes").symlink_to(root / "stripes", target_is_directory=True)
    (class_folder / "stripes" / "see-circle").symlink_to(class_folder / "circle", target_is_directory=True)
    (class_folder / "stripes" / "loop").symlink_to(root, target_is_directory=True)
    ds = D.open_dataset(str(root))
    assert ds.kind == "class-folder" and ds.classes == ["circle", "square", "stripes"]
    assert ds.class_counts() == [6, 6, 6] and len(ds) == 18
    for path, label in zip(ds.files, ds.labels, strict=True):  # each image under the class it is stored in
        assert Path(path).parent.name == ds.classes[label], path
    # Read as an unlabelled folder, every image still comes once.
    assert len(D.open_dataset(str(root), labelled=False)) == 18


@pytest.mark.parametrize("target", ["square", "."])
def test_a_class_folder_that_is_a_second_name_is_refused_naming_it(class_folder, target):
    from typer.testing import CliRunner

    from compress_edge.cli import app

    alias = class_folder / "zz-alias"
    alias.symlink_to(class_folder / target, target_is_directory=True)
    with pytest.raises(DataError, match=rf"the class folder {alias} is a symlink to .*; remove the link"):
        D.open_dataset(str(class_folder))
    result = CliRunner().invoke(app, ["data", "info", str(class_folder)])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(alias) in result.output and "Traceback" not in result.output, result.output
