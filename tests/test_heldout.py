"""Distillation on a data set nobody tuned for, with distill's defaults: the check a new user's first run is.

Generated textures (not Fashion-MNIST, not the benchmark's shapes), a torchvision resnet18 trained
with labels in the test (the kind of checkpoint a user brings), then ``compress-edge distill DATA
--teacher resnet18 --teacher-weights FILE --image-size S`` and nothing else. The student must beat
raw pixels and its own random weights on held-out test images, must stay within 12 points of its
teacher, and must not collapse (benchmarks/heldout_check.py measures the same on a larger set; see the
README).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from compress_edge.cli import app
from compress_edge.data.datasets import open_dataset
from compress_edge.data.synthetic import make_textures, train_labelled_teacher
from compress_edge.eval.features import extract_features
from compress_edge.eval.knn import knn_eval
from compress_edge.eval.quality import random_weights_model, raw_pixel_features
from compress_edge.models.resolve import load_model, resolve_model

#: 32 px keeps the suite's time: distill's automatic run (308 epochs, 4,004 steps here) at 64 px would
#: take several minutes more on 2 cores; benchmarks/heldout_check.py measures the same at 64 px.
SIZE = 32


def _weighted_knn(gallery, gallery_labels, queries, query_labels) -> float:
    return 100 * knn_eval(gallery, gallery_labels, queries, query_labels, ks=(10,), device="cpu").knn[10]["top1"]


def _features(model, spec, ds):
    return extract_features(model, ds, spec=spec, batch_size=64, device="cpu", workers=0, use_cache=False,
                            progress=False)


@pytest.mark.slow
def test_distill_defaults_transfer_to_unseen_textures(tmp_path, caplog):
    import logging

    train = make_textures(tmp_path / "train", 48, size=SIZE, seed=11)
    test = make_textures(tmp_path / "test", 30, size=SIZE, seed=12)
    weights = train_labelled_teacher(train, tmp_path / "teacher.pth", image_size=SIZE, epochs=30)

    out = tmp_path / "run"
    # The command's logging does not propagate to the root logger: listen on the distillation's own.
    distill_log = logging.getLogger("compress_edge.train.distill")
    distill_log.addHandler(caplog.handler)
    try:
        result = CliRunner().invoke(app, ["distill", str(train), "--teacher", "resnet18", "--teacher-weights",
                                          str(weights), "--image-size", str(SIZE), "--out", str(out), "--no-progress",
                                          "--workers", "0"])
    finally:
        distill_log.removeHandler(caplog.handler)
    assert result.exit_code == 0, result.output

    teacher, t_spec = resolve_model("resnet18", weights=weights, image_size=SIZE)
    student, s_spec = load_model(out / "student")
    ds_train, ds_test = open_dataset(str(train)), open_dataset(str(test))
    scores = {}
    for name, (model, spec) in {"teacher": (teacher, t_spec), "student": (student, s_spec),
                                "random": (random_weights_model(s_spec, ds_train), s_spec)}.items():
        g, gl = _features(model, spec, ds_train)
        q, ql = _features(model, spec, ds_test)
        scores[name] = _weighted_knn(g, gl, q, ql)
    scores["raw pixels"] = _weighted_knn(raw_pixel_features(ds_train, SIZE), np.asarray(ds_train.labels),
                                         raw_pixel_features(ds_test, SIZE), np.asarray(ds_test.labels))
    quality = json.loads((out / "quality.json").read_text())
    assert "heldout" in quality and "teacher" in quality
    assert scores["teacher"] > scores["raw pixels"] + 10, scores  # the set is one where a model matters
    assert scores["student"] > scores["raw pixels"] + 5, scores
    assert scores["student"] > scores["random"] + 5, scores
    # Measured at 32 px with the teacher's centre view (the default) and the automatic 4,004 steps: student
    # 63.7, teacher 35.0, raw pixels 12.3, random weights 9.7. At the earlier 130 epochs (1,690 steps) the
    # student scored 37.0, and 21.0 with the teacher given the student's view (the default before that).
    assert scores["student"] > scores["teacher"] + 10, scores
    assert quality["heldout"]["rows"]["the student"]["spread"]["mean_cosine"] < 0.9, quality  # not collapsed
    # Before the run, the teacher was scored against raw pixels on the same held-out images and gallery as
    # the end-of-run check (both all 430 training images), and found better: no warning.
    before = quality["teacher"]["heldout"]
    assert before["rows"]["the teacher"] == quality["heldout"]["rows"]["teacher"], quality
    assert before["rows"]["raw pixels"] == quality["heldout"]["rows"]["raw pixels"], quality
    assert before["rows"]["the teacher"]["knn20"] > before["rows"]["raw pixels"]["knn20"], before
    assert not any("does not beat raw pixels" in w for w in before["warnings"]), before
    # The run length: at least 4,000 optimizer steps, so these 430 images get 308 epochs, not 130. The
    # end-of-run check still finds the loss falling on sets this small (measured: 8.9 % of its fall in the
    # last quarter); when it does, the user must be told, with the longer run to try.
    run_length = quality["run_length"]
    assert run_length["epochs"] == 308, run_length
    warned = [r.getMessage() for r in caplog.records if "still falling" in r.getMessage()]
    assert bool(warned) == run_length["still_falling"], (run_length, warned)
    assert all("--epochs 616" in w for w in warned), warned
