"""Evaluation: kNN against brute-force NumPy, cluster alignment on hand-made cases, the linear probe,
teacher-student agreement, and the one feature extraction with its cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compress_edge.eval.agreement import neighbor_agreement
from compress_edge.eval.clustering import (
    adjusted_rand_index,
    cluster_accuracy,
    cluster_alignment,
    hungarian_match,
    normalized_mutual_info,
)
from compress_edge.eval.features import extract_features
from compress_edge.eval.knn import knn_eval, knn_from_neighbors
from compress_edge.eval.linear import linear_probe
from compress_edge.eval.neighbors import exact_topk, knn_predict, weighted_knn_vote
from compress_edge.models.spec import ModelSpec


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _blobs(n_per_class=40, classes=4, dim=16, spread=0.15, seed=0):
    """Well-separated clusters on the unit sphere: (features (N, D), labels (N,))."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(classes, dim)))
    x = np.concatenate([c + spread * rng.normal(size=(n_per_class, dim)) for c in centres])
    y = np.repeat(np.arange(classes), n_per_class)
    return _unit(x), y


# --------------------------------------------------------------------------------------------------
# kNN
# --------------------------------------------------------------------------------------------------
def _brute_force_knn(train, ytr, test, k, temperature, classes):
    """One query at a time, in plain NumPy loops: the reference."""
    preds = []
    for q in test:
        sims = train @ q
        order = np.argsort(-sims)[:k]
        scores = np.zeros(classes)
        for j in order:
            scores[ytr[j]] += np.exp(sims[j] / temperature)
        preds.append(int(np.argmax(scores)))
    return np.array(preds)


def test_weighted_vote_matches_a_loop_and_skips_unlabelled_neighbours():
    rng = np.random.default_rng(0)
    sims = rng.uniform(-1, 1, size=(7, 5))
    labels = rng.integers(-1, 3, size=(7, 5))
    got = weighted_knn_vote(sims, labels, 3, temperature=0.1)
    want = np.zeros((7, 3))
    for q in range(7):
        for j in range(5):
            if labels[q, j] >= 0:
                want[q, labels[q, j]] += np.exp(sims[q, j] / 0.1)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_knn_predict_ties_go_to_the_lower_class_and_no_vote_gives_minus_one():
    sims = np.array([[0.5, 0.5], [0.9, 0.1]])
    labels = np.array([[2, 1], [-1, -1]])
    assert knn_predict(sims, labels, 3).tolist() == [1, -1]
    empty = weighted_knn_vote(sims, np.full((2, 2), -1), 3)  # no labelled neighbour anywhere
    assert empty.dtype == np.float64 and not empty.any()
    with pytest.raises(ValueError, match="num_classes"):
        weighted_knn_vote(sims, np.array([[3, 0], [0, 0]]), 3)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_eval_matches_brute_force_numpy(k):
    rng = np.random.default_rng(k)
    train, test = _unit(rng.normal(size=(120, 8))), _unit(rng.normal(size=(30, 8)))
    ytr, yte = rng.integers(0, 4, size=120), rng.integers(0, 4, size=30)
    result = knn_eval(train, ytr, test, yte, ks=(k,), temperature=0.07, device="cpu")
    want = _brute_force_knn(train, ytr, test, k, 0.07, 4)
    assert result.knn[k]["top1"] == pytest.approx(float((want == yte).mean()))
    nn1 = _brute_force_knn(train, ytr, test, 1, 0.07, 4)
    assert result.nn_top1 == pytest.approx(float((nn1 == yte).mean()))
    assert (result.queries, result.gallery, result.num_classes) == (30, 120, 4)


def test_exact_topk_in_small_chunks_matches_a_full_sort_and_can_leave_queries_out():
    rng = np.random.default_rng(3)
    x = _unit(rng.normal(size=(50, 6)))
    sims, idx = exact_topk(x[:13], x, 7, device="cpu", block=60)  # one query per chunk
    full = x[:13] @ x.T
    np.testing.assert_array_equal(idx, np.argsort(-full, axis=1)[:, :7])
    np.testing.assert_allclose(sims, np.take_along_axis(full, idx, 1), rtol=1e-6)
    _, idx = exact_topk(x[:13], x, 7, device="cpu", self_index=np.arange(13))
    assert not (idx == np.arange(13)[:, None]).any()


def test_knn_of_separated_clusters_is_perfect_and_unlabelled_data_is_refused():
    x, y = _blobs()
    result = knn_eval(x[::2], y[::2], x[1::2], y[1::2], ks=(20,), device="cpu")
    assert result.nn_top1 == 1.0 and result.knn[20]["top1"] == 1.0
    from compress_edge.errors import DataError

    with pytest.raises(DataError, match="labels"):
        knn_eval(x, np.full(len(x), -1), x, y, device="cpu")


def test_knn_from_neighbors_ignores_missing_neighbours():
    sims = np.array([[0.9, 0.8, 0.7]], dtype=np.float32)
    labels = np.array([[-1, 1, 0]])
    result = knn_from_neighbors(sims, labels, np.array([1]), ks=(3,), num_classes=2)
    assert result.knn[3]["top1"] == 1.0
    assert result.nn_top1 == 0.0  # the top neighbour has no label: no prediction


# --------------------------------------------------------------------------------------------------
# clusters
# --------------------------------------------------------------------------------------------------
def test_cluster_accuracy_perfect_and_permuted_clusterings_score_one():
    labels = np.array([0, 0, 1, 1, 2, 2, 2])
    assert cluster_accuracy(labels, labels) == 1.0
    permuted = np.array([2, 0, 1])[labels]  # the same partition, clusters numbered otherwise
    assert cluster_accuracy(permuted, labels) == 1.0
    assert normalized_mutual_info(permuted, labels) == pytest.approx(1.0)
    assert adjusted_rand_index(permuted, labels) == pytest.approx(1.0)


def test_cluster_accuracy_of_a_hand_made_case():
    clusters = np.array([0, 0, 1, 1, 1, 2])
    labels = np.array([0, 0, 1, 1, 2, 2])
    # Best matching: 0->0 (2 right), 1->1 (2 right), 2->2 (1 right): 5 of 6.
    assert cluster_accuracy(clusters, labels) == pytest.approx(5 / 6)
    assert hungarian_match(clusters, labels).tolist() == [0, 1, 2]
    # More clusters than classes: the extra cluster is unmatched and its images count as wrong.
    assert hungarian_match(np.array([0, 1, 2, 3]), np.array([0, 0, 1, 1])).tolist().count(-1) == 2


def test_nmi_and_ari_against_known_values():
    # scikit-learn's documented examples (arithmetic NMI): a refinement of two classes into three.
    a, b = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 2])
    assert normalized_mutual_info(a, b) == pytest.approx(0.8, abs=1e-9)
    assert adjusted_rand_index(a, b) == pytest.approx(4 / 7, abs=1e-9)
    # Independent labellings: ARI about 0, NMI small.
    rng = np.random.default_rng(0)
    u, v = rng.integers(0, 5, 5000), rng.integers(0, 5, 5000)
    assert abs(adjusted_rand_index(u, v)) < 0.01
    assert normalized_mutual_info(u, v) < 0.01


def test_linear_probe_chooses_its_decay_on_a_sample_and_rescales_it_to_the_whole_set():
    x, y = _blobs(n_per_class=100, classes=4, dim=8)
    full = linear_probe(x, y, x, y, device="cpu", max_iter=50, search_images=10_000)
    sampled = linear_probe(x, y, x, y, device="cpu", max_iter=50, search_images=90)
    # The loss is a mean over images: a decay found on 90 images is worth 90/400 of it on all 400,
    # and without sampling the 360 fitted images of 400 give 0.9 of it.
    assert sampled.weight_decay * 400 / 90 == pytest.approx(float(max(sampled.validation, key=sampled.validation.get)))
    assert full.weight_decay * 400 / 360 == pytest.approx(float(max(full.validation, key=full.validation.get)))
    assert sampled.top1 >= 0.95 and full.top1 >= 0.95


def test_cluster_alignment_recovers_separated_classes_whatever_their_numbering():
    x, y = _blobs(n_per_class=50, classes=5)
    result = cluster_alignment(x[::2], y[::2], x[1::2], y[1::2], seed=0)
    assert result.accuracy == 1.0 and result.train_accuracy == 1.0
    assert result.nmi == pytest.approx(1.0) and result.ari == pytest.approx(1.0)
    relabel = np.array([3, 0, 4, 1, 2])
    again = cluster_alignment(x[::2], relabel[y[::2]], x[1::2], relabel[y[1::2]], seed=0)
    assert again.accuracy == 1.0
    # Random features: far from perfect, same answer for the same seed.
    noise = _unit(np.random.default_rng(1).normal(size=(200, 16)))
    r1 = cluster_alignment(noise, np.repeat(np.arange(5), 40), seed=3)
    r2 = cluster_alignment(noise, np.repeat(np.arange(5), 40), seed=3)
    assert r1.accuracy < 0.6 and r1.to_dict() | {"seconds": 0} == r2.to_dict() | {"seconds": 0}


# --------------------------------------------------------------------------------------------------
# linear probe
# --------------------------------------------------------------------------------------------------
def test_linear_probe_separates_separable_classes_and_not_random_labels():
    x, y = _blobs(n_per_class=60, classes=6, dim=12)
    result = linear_probe(x[::2], y[::2], x[1::2], y[1::2], device="cpu", max_iter=100)
    assert result.top1 >= 0.95 and result.top5 == 1.0
    tried = list(result.validation)
    assert tried == ["0.01", "0.001", "0.0001", "1e-05", "1e-06"][: len(tried)]  # strongest first
    accs = list(result.validation.values())
    if len(tried) < 5:  # the search stopped early: only after two decays in a row did worse
        assert accs[-1] <= max(accs[:-2]) and accs[-2] <= max(accs[:-2])
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(y)
    chance = linear_probe(x[::2], shuffled[::2], x[1::2], shuffled[1::2], weight_decay=1e-3, device="cpu")
    assert chance.top1 < 0.4 and chance.validation == {}


# --------------------------------------------------------------------------------------------------
# agreement
# --------------------------------------------------------------------------------------------------
def test_agreement_is_perfect_under_a_rotation_and_low_for_unrelated_features():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    teacher = _unit(rng.normal(size=(80, 8)))
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    student = np.concatenate([teacher @ rotation, np.zeros((80, 4))], axis=1).astype(np.float32)  # another dim
    same = neighbor_agreement(teacher, student, ks=(5, 20), device="cpu")
    assert same.overlap == {5: pytest.approx(1.0), 20: pytest.approx(1.0)}
    assert same.spearman == pytest.approx(1.0, abs=1e-6)

    other = _unit(rng.normal(size=(80, 8)))
    result = neighbor_agreement(teacher, other, ks=(5,), max_queries=10, seed=1, device="cpu")
    assert result.queries == 10 and result.overlap[5] < 0.3
    # The mean Spearman is the mean of scipy's per-query correlations (the query itself left out).
    queries = np.sort(np.random.default_rng(1).choice(80, size=10, replace=False))
    want = []
    for q in queries:
        keep = np.arange(80) != q
        want.append(spearmanr((teacher @ teacher[q])[keep], (other @ other[q])[keep]).statistic)
    assert result.spearman == pytest.approx(float(np.mean(want)), abs=1e-6)


# --------------------------------------------------------------------------------------------------
# extraction and its cache
# --------------------------------------------------------------------------------------------------
class CountingNet(nn.Module):
    """A tiny embedding net that counts its forward calls."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 6))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


SPEC = ModelSpec(arch="tiny", embed_dim=6, image_size=20, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_extract_features_normalises_caches_and_leaves_the_dataset_alone(class_folder, tmp_path):
    from compress_edge.data.datasets import open_dataset

    ds = open_dataset(str(class_folder))
    net = CountingNet()
    x, y = extract_features(net, ds, spec=SPEC, batch_size=5, device="cpu", cache_dir=tmp_path, progress=False)
    assert x.shape == (len(ds), 6) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(y, ds.labels)
    assert ds.transform is None  # the eval preprocessing went on a copy
    calls = net.calls
    assert calls == 4  # 18 images in batches of 5

    x2, y2 = extract_features(net, ds, spec=SPEC, batch_size=5, device="cpu", cache_dir=tmp_path, progress=False)
    assert net.calls == calls  # read from the cache
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert len(list(tmp_path.glob("*.npz"))) == 1

    other = CountingNet(seed=1)  # other weights: another cache entry
    x3, _ = extract_features(other, ds, spec=SPEC, batch_size=5, device="cpu", cache_dir=tmp_path, progress=False)
    assert other.calls == 4 and not np.allclose(x, x3)
    extract_features(net, ds, spec=SPEC.replace(image_size=16), batch_size=5, device="cpu", cache_dir=tmp_path,
                     progress=False)
    assert net.calls == calls + 4  # another preprocessing: another entry
    assert len(list(tmp_path.glob("*.npz"))) == 3


def test_an_embedder_gives_the_same_features_as_its_module(class_folder, tmp_path, monkeypatch):
    from compress_edge.data.datasets import open_dataset

    net = CountingNet().eval()

    class ArrayEmbedder:
        """Duck-typed: spec + embed(float32 array), what export's embedders offer."""

        name, precision, path = "fake", "fp32", ""

        def __init__(self):
            self.spec = SPEC
            self.model = net

        def embed(self, images):
            assert isinstance(images, np.ndarray) and images.dtype == np.float32
            with torch.no_grad():
                return net(torch.from_numpy(images)).numpy() * 3.0  # scale: normalised away

    ds = open_dataset(str(class_folder))
    want, _ = extract_features(net, ds, spec=SPEC, batch_size=7, device="cpu", use_cache=False, progress=False)
    got, labels = extract_features(ArrayEmbedder(), ds, batch_size=7, cache_dir=tmp_path, progress=False)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_array_equal(labels, ds.labels)
    monkeypatch.setenv("COMPRESS_EDGE_CACHE", str(tmp_path / "env"))
    extract_features(net, ds, spec=SPEC, batch_size=7, device="cpu", progress=False)
    assert len(list((tmp_path / "env" / "features").glob("*.npz"))) == 1


def test_extract_features_needs_a_spec():
    from compress_edge.errors import ModelError

    with pytest.raises(ModelError, match="ModelSpec"):
        extract_features(CountingNet(), [], progress=False)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(c) for c in fh.read().split()]
    except OSError:
        return []


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_stop_signal_to_the_process_group_during_eval_knn_ends_in_one_line(tmp_path, make_images, sig):
    # Ctrl-C reaches every process of the terminal's process group, the loader workers included: they
    # must leave it to the main process, so the command ends in one line, not a worker's traceback.
    import os
    import signal
    import subprocess
    import sys
    import time

    images = make_images(tmp_path / "images", per_class=400, size=24)  # 1200 real images
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "compress_edge", "eval", "knn", "resnet50", "--train", str(images),
           "--test", str(images), "--image-size", "224", "--workers", "2", "--batch-size", "4", "--device", "cpu",
           "--no-cache", "--no-progress"]
    def as_from_a_shell():  # the signal state a shell gives a command, whatever the test process holds
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, preexec_fn=as_from_a_shell)
    try:
        deadline = time.time() + 120
        while len(_children(proc.pid)) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None and len(_children(proc.pid)) >= 2, proc.communicate()[1][-2000:]
        time.sleep(2.0)  # the workers are past their start and loading images
        assert proc.poll() is None
        workers = _children(proc.pid)
        # What decides the outcome, read from the kernel: each loader worker ignores both signals
        # (without that, a worker hit by Ctrl-C can quit mid-transfer and print a thread's traceback).
        ignoring = [w for w in workers if _ignored_signals(w) >= {signal.SIGINT, signal.SIGTERM}]
        assert len(ignoring) >= 2, [(w, _ignored_signals(w)) for w in workers]
        os.killpg(proc.pid, getattr(signal, sig))
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if sig == "SIGINT":
        assert proc.returncode == 130, err
        assert "interrupted" in err.strip().splitlines()[-3:], err
    else:  # Python's default for SIGTERM: the main process ends at once; its workers follow
        assert proc.returncode == -signal.SIGTERM, err
    for bad in ("Traceback", "Exception ignored", "KeyboardInterrupt", "DataLoader worker", "internal error"):
        assert bad not in err, err
    deadline = time.time() + 30  # no worker is left behind (they notice the main process is gone)
    while any(os.path.exists(f"/proc/{w}") and "Z" not in _state(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not [w for w in workers if os.path.exists(f"/proc/{w}") and "Z" not in _state(w)]


def _ignored_signals(pid: int) -> set[int]:
    """The signals process ``pid`` ignores (SigIgn in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            mask = int(next(line for line in fh if line.startswith("SigIgn:")).split()[1], 16)
    except (OSError, StopIteration):
        return set()
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
