"""Quality checks: spread, the teacher's softmax over anchors, held-out split, baselines, warnings."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from compress_edge.eval.quality import (
    Comparison,
    anchor_entropy,
    comparison_warnings,
    embedding_spread,
    holdout_split,
    raw_pixel_features,
    spread_warnings,
    temperature_warnings,
)


def test_spread_tells_a_collapsed_set_from_a_spread_one():
    rng = np.random.default_rng(0)
    spread_out = embedding_spread(rng.normal(size=(500, 64)))
    assert abs(spread_out.mean_cosine) < 0.05 and spread_out.effective_rank > 40 and not spread_out.collapsed
    base = rng.normal(size=64)
    collapsed = embedding_spread(base + 0.05 * rng.normal(size=(500, 64)))
    assert collapsed.mean_cosine > 0.95 and collapsed.collapsed


def test_spread_flags_embeddings_that_use_a_few_directions_but_not_ten_classes():
    rng = np.random.default_rng(3)
    few = rng.normal(size=(500, 3)) @ rng.normal(size=(3, 64)) + 0.01 * rng.normal(size=(500, 64))
    squeezed = embedding_spread(few)
    assert squeezed.mean_cosine < 0.9 and squeezed.effective_rank < 4 and squeezed.collapsed  # dimensional collapse
    centres = rng.normal(size=(10, 64))  # ten well separated classes: about ten directions, not collapsed
    classes = embedding_spread(centres[rng.integers(0, 10, 500)] + 0.1 * rng.normal(size=(500, 64)))
    assert classes.effective_rank > 5 and not classes.collapsed
    # A narrow cone along a few directions: neither bound alone is crossed, together they are collapse.
    cone = embedding_spread(4.0 + rng.normal(size=(500, 5)) @ rng.normal(size=(5, 64)))
    assert 0.5 < cone.mean_cosine < 0.9 and 4 < cone.effective_rank < 8 and cone.collapsed, cone
    # A cone alone is a likely collapse to check with a kNN (one good student measured inside it), the
    # crossed bounds a collapse.
    (cone_warning,) = spread_warnings(cone, "the student")
    assert "narrow cone" in cone_warning and "eval knn" in cone_warning, cone_warning
    (squeezed_warning,) = spread_warnings(squeezed, "the student")
    assert "nearly collapsed" in squeezed_warning and "narrow cone" not in squeezed_warning
    assert spread_warnings(classes, "the student") == []
    # A random network's kind of features: one cone, but many directions: not collapsed.
    wide = embedding_spread(1.0 + rng.normal(size=(500, 64)))
    assert wide.mean_cosine > 0.4 and wide.effective_rank > 30 and not wide.collapsed, wide


def test_spread_mean_cosine_is_the_average_over_distinct_pairs():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    n = x / np.linalg.norm(x, axis=1, keepdims=True)
    g = n @ n.T
    want = (g.sum() - 3) / 6
    assert embedding_spread(x).mean_cosine == pytest.approx(want, abs=1e-4)


def test_anchor_entropy_is_near_uniform_at_a_high_temperature_and_one_hot_at_a_low_one():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 16))
    hot = anchor_entropy(x[:50], x, temperature=1e-3)
    flat = anchor_entropy(x[:50], x, temperature=100.0)
    assert hot["effective"] < 1.2 and flat["share"] > 0.95
    assert "near uniform" in temperature_warnings(flat, 100.0)[0]
    assert "one-hot" in temperature_warnings(hot, 1e-3)[0]
    assert temperature_warnings(anchor_entropy(x[:50], x, temperature=0.1), 0.1) == []


def test_anchor_entropy_leaves_the_query_itself_out():
    x = np.eye(4)
    # Each query's only close anchor is itself; without it the other three are equally likely.
    assert anchor_entropy(x, x, temperature=0.01)["effective"] == pytest.approx(3.0, rel=1e-3)


def test_anchor_entropy_of_a_collapsed_teacher_is_uniform_not_nan():
    x = np.ones((6, 4))  # every embedding the same: each query would leave out every anchor
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = anchor_entropy(x[:3], x, temperature=0.1)
    assert got["effective"] == pytest.approx(6.0) and temperature_warnings(got, 0.1)


def test_holdout_is_stratified_capped_and_skipped_for_small_or_unlabelled_data():
    labels = np.repeat(np.arange(4), 250)
    train, held = holdout_split(labels, 0.1)
    assert len(held) == 100 and len(train) == 900 and not set(train) & set(held)
    assert np.bincount(labels[held]).tolist() == [25, 25, 25, 25]
    assert len(holdout_split(np.repeat(np.arange(10), 10_000), 0.1)[1]) == 1000  # capped
    assert len(holdout_split(labels[:60], 0.1)[1]) == 0  # too few images to spare
    assert len(holdout_split(np.full(1000, -1), 0.1)[1]) == 0  # unlabelled
    again = holdout_split(labels, 0.1)[1]
    assert np.array_equal(held, again)  # the same images every time


def test_raw_pixels_are_plain_unit_vectors(class_folder):
    from compress_edge.data.datasets import open_dataset

    ds = open_dataset(str(class_folder))
    x = raw_pixel_features(ds, 24)
    assert x.shape == (len(ds), 3 * 24 * 24)
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    assert (x >= 0).all()  # pixels in [0, 1], no mean subtracted


def test_raw_pixels_of_gray_images_keep_one_channel_and_the_same_cosines():
    from compress_edge.data.datasets import open_dataset

    ds = open_dataset("fashion-mnist:test@50")
    gray = raw_pixel_features(ds, 28)
    assert gray.shape == (50, 28 * 28)
    from compress_edge.data.images import preprocess_eval

    rgb = np.stack([preprocess_eval(ds.get_image(i), 28, (0, 0, 0), (1, 1, 1)).ravel() for i in range(50)])
    rgb /= np.linalg.norm(rgb, axis=1, keepdims=True)
    assert np.allclose(gray @ gray.T, rgb @ rgb.T, atol=1e-5)


def _row(knn20, mean_cos=0.3, rank=20.0):
    return {"nn": knn20, "knn20": knn20, "spread": {"mean_cosine": mean_cos, "effective_rank": rank, "dim": 128,
                                                    "images": 100}}


def test_warnings_say_plainly_when_a_model_does_not_beat_its_baselines():
    worse = Comparison(rows={"the student": _row(40.0, mean_cos=0.97), "teacher": _row(60.0),
                             "same network, random weights": _row(45.0), "raw pixels": _row(50.0)},
                       gallery=900, queries=100)
    text = " ".join(comparison_warnings(worse, "the student"))
    assert "does not beat raw pixels" in text and "does not beat same network, random weights" in text
    assert "trails its teacher by 20.0 points" in text and "collapsed" in text
    better = Comparison(rows={"the student": _row(58.0), "teacher": _row(60.0),
                              "same network, random weights": _row(45.0), "raw pixels": _row(50.0)},
                        gallery=900, queries=100)
    assert comparison_warnings(better, "the student") == []


def _hits(n, right, seed):
    """n queries of which ``right`` were answered correctly, in a random order."""
    out = np.zeros(n, dtype=bool)
    out[np.random.default_rng(seed).choice(n, size=right, replace=False)] = True
    return out


@pytest.mark.parametrize(("queries", "noisy"), [(60, True), (1000, False)])
def test_a_lead_within_the_noise_of_few_held_out_images_is_called_so(queries, noisy):
    """The case measured: a teacher at chance on 1,000 test images led raw pixels by 6.7 points (15.0 % against
    8.3 %) on its run's 60 held-out images. The same rates on 1,000 images are a lead the check can trust."""
    rates = {"model": 0.15, "raw pixels": 0.0833, "same network, random weights": 0.10}
    hits = {who: _hits(queries, int(round(rate * queries)), seed) for seed, (who, rate) in enumerate(rates.items())}
    rows = {who: _row(round(100 * h.mean(), 2)) for who, h in hits.items()}
    result = Comparison(rows=rows, gallery=580, queries=queries, hits=hits)
    margin = result.margin("model", "raw pixels")
    d = hits["model"].astype(float) - hits["raw pixels"].astype(float)
    assert margin["points"] == pytest.approx(100 * d.mean(), abs=0.01)
    assert margin["standard_error"] == pytest.approx(100 * d.std(ddof=1) / np.sqrt(queries), abs=0.01)
    text = " ".join(comparison_warnings(result, "model"))
    assert ("too few images to tell" in text) is noisy, text
    assert "does not beat" not in text
    assert set(result.to_dict()["margins"]) == {"model - raw pixels", "model - same network, random weights"}


@pytest.mark.parametrize(("queries", "noisy"), [(60, True), (1000, False)])
def test_a_deficit_within_the_noise_of_few_held_out_images_is_called_so(queries, noisy):
    """The mirror case, measured: a pretrained model 4 points behind raw pixels on its run's 50 held-out images
    was 5 ahead on 720 test images. A deficit that few images cannot tell still says what to do, after a
    check on a test set; the same rates on 1,000 images are a deficit the check can trust."""
    rates = {"model": 0.0833, "raw pixels": 0.15, "same network, random weights": 0.05}
    hits = {who: _hits(queries, int(round(rate * queries)), seed) for seed, (who, rate) in enumerate(rates.items())}
    result = Comparison(rows={who: _row(round(100 * h.mean(), 2)) for who, h in hits.items()}, gallery=580,
                        queries=queries, hits=hits)
    below = [w for w in comparison_warnings(result, "model") if "does not beat raw pixels" in w]
    assert len(below) == 1 and "check the teacher" in below[0], below  # the advice, either way
    assert ("too few images to be sure" in below[0] and "eval knn" in below[0]) is noisy, below[0]


def test_a_narrow_cone_warns_only_when_the_knn_check_does_not_pass():
    cone = {"mean_cos": 0.52, "rank": 7.1}  # the shapes table's compress-2q: 93.0 against its teacher's 93.8
    passed = Comparison(rows={"the student": _row(58.0, **cone), "teacher": _row(60.0),
                              "same network, random weights": _row(45.0), "raw pixels": _row(50.0)},
                        gallery=900, queries=100)
    assert comparison_warnings(passed, "the student") == []
    failed = Comparison(rows={"the student": _row(48.0, **cone), "teacher": _row(60.0),
                              "same network, random weights": _row(45.0), "raw pixels": _row(50.0)},
                        gallery=900, queries=100)
    text = " ".join(comparison_warnings(failed, "the student"))
    assert "does not beat raw pixels" in text and "narrow cone" in text, text
    squeezed = Comparison(rows={"the student": _row(58.0, mean_cos=0.3, rank=3.0), "teacher": _row(60.0),
                                "same network, random weights": _row(45.0), "raw pixels": _row(50.0)},
                          gallery=900, queries=100)
    assert "nearly collapsed" in " ".join(comparison_warnings(squeezed, "the student"))


def test_a_run_without_held_out_images_says_why(class_folder):
    from compress_edge.data.datasets import open_dataset
    from compress_edge.eval.quality import HOLDOUT_MINIMUM, heldout_check
    from compress_edge.models.files import spec_for
    from compress_edge.models.registry import create_model

    ds = open_dataset(str(class_folder))
    assert ds.has_labels and len(ds) < HOLDOUT_MINIMUM
    model = create_model("mobilenet_v3_small", small_input=True).eval()
    spec = spec_for(model, image_size=24)
    record = heldout_check("the student", model, spec, ds, np.array([], dtype=int))
    assert record["no_heldout_check"] == f"{len(ds)} labelled images, fewer than {HOLDOUT_MINIMUM}"
    assert "knn20" not in str(record)


def test_distill_says_before_the_run_when_its_teacher_does_not_beat_raw_pixels():
    """A teacher's neighbourhoods are built here to answer an exact share of the held-out images right (a
    one-hot of the class for those, of another class for the rest): below raw pixels it warns that a
    student cannot do better; a small lead is called noise; a clear lead passes."""
    from compress_edge.data.datasets import SubsetDataset, open_dataset
    from compress_edge.eval.quality import teacher_against_pixels

    ds = open_dataset("fashion-mnist:test@300")
    rest, held = holdout_split(ds.labels, 0.2)
    gallery = SubsetDataset("gallery", ds, indices=rest)
    queries = SubsetDataset("held out", ds, indices=held)
    eye = np.eye(10, dtype=np.float32)

    def teacher(right: int):
        wrong = np.ones(len(held), dtype=bool)
        wrong[:right] = False
        guess = np.where(wrong, (queries.labels + 1) % 10, queries.labels)
        return eye[gallery.labels], eye[guess]

    def check(right: int):
        return teacher_against_pixels(teacher(right), gallery, queries, 28)

    pixels = check(0)["rows"]["raw pixels"]["knn20"]
    assert 50 < pixels < 95  # Fashion-MNIST: raw pixels are a real baseline, below a perfect teacher
    at = int(np.ceil(pixels / 100 * len(held)))
    below = check(at - 3)
    assert below["rows"]["the teacher"]["knn20"] == pytest.approx(100 * (at - 3) / len(held), abs=0.01)
    assert len(below["warnings"]) == 1 and "does not beat raw pixels" in below["warnings"][0]
    assert "bring a stronger teacher" in below["warnings"][0]
    # 3 of 60 images behind is within the noise of 60 images: it says to check on a test set first
    assert "too few images to be sure" in below["warnings"][0] and "eval knn" in below["warnings"][0]
    far_below = check(0)  # every held-out image wrong: no doubt, no test set needed
    assert len(far_below["warnings"]) == 1 and "bring a stronger teacher" in far_below["warnings"][0]
    assert "too few images" not in far_below["warnings"][0]
    close = check(at + 1)
    assert len(close["warnings"]) == 1 and "leads raw pixels by only" in close["warnings"][0], close["warnings"]
    clear = check(len(held))
    assert clear["warnings"] == [] and clear["margins"]["the teacher - raw pixels"]["points"] > 0
