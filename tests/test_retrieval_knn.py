"""Weighted kNN classification: the vote against a hand computation, labelled synthetic clusters,
approximate index beside exact search, leave-one-out."""

from __future__ import annotations

import numpy as np
import pytest
from compress_edge.retrieval.index import build_index_from_array, open_index
from compress_edge.retrieval.knn import knn_classify, knn_vote
from compress_edge.retrieval.shards import l2_normalize

from compress_edge.errors import CompressEdgeError


def labelled_clusters(n_per_class: int = 200, classes: int = 5, d: int = 16, noise: float = 0.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d))
    labels = np.repeat(np.arange(classes), n_per_class)
    x = centres[labels] + noise * rng.standard_normal((len(labels), d))
    order = rng.permutation(len(labels))
    return l2_normalize(x[order].astype(np.float32)), labels[order]


def test_vote_matches_a_hand_computation():
    sims = np.array([[0.9, 0.8, 0.1], [0.5, 0.4, 0.3]])
    labels = np.array([[0, 1, 1], [2, -1, 2]])
    scores = knn_vote(sims, labels, num_classes=3, temperature=0.1)
    w = np.exp(np.array([0.9, 0.8, 0.1]) / 0.1)
    expected0 = np.array([w[0], w[1] + w[2], 0.0]) / w.sum()
    np.testing.assert_allclose(scores[0], expected0)
    np.testing.assert_allclose(scores[1], [0, 0, 1])  # label -1 does not vote
    # a large temperature is a plain majority vote, a small one follows the nearest neighbour
    assert knn_vote(sims, labels, 3, temperature=100.0)[0].argmax() == 1
    assert knn_vote(sims, labels, 3, temperature=0.01)[0].argmax() == 0
    # nothing to vote with: a zero row, not NaN
    np.testing.assert_array_equal(knn_vote(np.array([[0.3]]), np.array([[-1]]), 2), [[0.0, 0.0]])
    with pytest.raises(CompressEdgeError, match="temperature"):
        knn_vote(sims, labels, 3, temperature=0)


def test_knn_on_labelled_clusters_over_an_array():
    x, y = labelled_clusters()
    gallery, gy, queries, qy = x[:800], y[:800], x[800:], y[800:]
    result = knn_classify(gallery, queries, labels=gy, k=20, temperature=0.07)
    assert result.accuracy(qy) >= 0.95
    assert result.scores.shape == (200, 5)
    np.testing.assert_allclose(result.scores.sum(axis=1), 1.0)
    assert result.neighbour_ids.shape == (200, 20)
    assert (result.confidence > 0.2).all()
    with pytest.raises(CompressEdgeError, match="labels"):
        knn_classify(gallery, queries)


def test_knn_through_the_index_matches_exact_search(tmp_path):
    x, y = labelled_clusters(n_per_class=400)
    build_index_from_array(x, tmp_path / "idx", index="IVF16,Flat", labels=y.tolist(),
                           classes=[f"c{i}" for i in range(5)], queries=200)
    idx = open_index(tmp_path / "idx")
    q = np.arange(0, 2000, 10)
    approx = knn_classify(idx, x[q], query_ids=q)
    exact = knn_classify(idx, x[q], query_ids=q, exact=True)
    assert not (approx.neighbour_ids == q[:, None]).any()  # leave-one-out: never its own entry
    assert not (exact.neighbour_ids == q[:, None]).any()
    acc_a, acc_e = approx.accuracy(y[q]), exact.accuracy(y[q])
    assert acc_e >= 0.95 and abs(acc_a - acc_e) <= 0.03
    # The array path and the index's exact path agree.
    arr = knn_classify(x, x[q], labels=y, query_ids=q)
    np.testing.assert_array_equal(arr.predictions, exact.predictions)
    # more probes: the same answers as exact search
    wide = knn_classify(idx, x[q], query_ids=q, params={"nprobe": 16})
    np.testing.assert_array_equal(wide.predictions, exact.predictions)


def test_index_without_labels_cannot_classify(tmp_path):
    x, _ = labelled_clusters(n_per_class=20)
    build_index_from_array(x, tmp_path / "idx")
    with pytest.raises(CompressEdgeError, match="holds no labels"):
        knn_classify(open_index(tmp_path / "idx"), x[:3])
