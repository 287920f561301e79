"""Self-supervised pretraining: the losses against NumPy, a few real steps lower the loss."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from compress_edge.cli import app
from compress_edge.models.resolve import load_model
from compress_edge.train.losses import MoCoLoss, NTXent

runner = CliRunner()


def _norm(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ntxent_matches_numpy():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(5, 7)).astype(np.float32), rng.normal(size=(5, 7)).astype(np.float32)
    t = 0.3
    z = _norm(np.concatenate([z1, z2]))
    sim = z @ z.T / t
    losses = []
    for i in range(10):
        pos = (i + 5) % 10
        others = [j for j in range(10) if j != i]
        losses.append(-(sim[i, pos] - np.log(np.exp(sim[i, others]).sum())))
    got = NTXent(t)(torch.from_numpy(z1), torch.from_numpy(z2)).item()
    assert got == pytest.approx(float(np.mean(losses)), rel=1e-5)


def test_moco_loss_matches_numpy_and_enqueues_after_commit():
    rng = np.random.default_rng(1)
    loss_fn = MoCoLoss(dim=6, queue_size=9, temperature=0.2)
    queue = _norm(rng.normal(size=(9, 6))).astype(np.float32)
    loss_fn.queue.push(torch.from_numpy(queue))
    q, k = rng.normal(size=(4, 6)).astype(np.float32), rng.normal(size=(4, 6)).astype(np.float32)
    qn, kn = _norm(q), _norm(k)
    logits = np.concatenate([np.sum(qn * kn, axis=1, keepdims=True), qn @ queue.T], axis=1) / 0.2
    want = np.mean(-logits[:, 0] + np.log(np.exp(logits).sum(axis=1)))
    assert loss_fn(torch.from_numpy(q), torch.from_numpy(k)).item() == pytest.approx(float(want), rel=1e-5)
    loss_fn.commit()
    np.testing.assert_allclose(loss_fn.queue.bank[:4].numpy(), kn, atol=1e-6)


def test_moco_task_learns_a_generated_batch():
    from compress_edge.models.resolve import create_model
    from compress_edge.train.pretrain import MoCoTask

    torch.manual_seed(0)
    task = MoCoTask(create_model("mobilenet_v3_small", small_input=True, head="mlp", embed_dim=32), 32, 0.2, 0.9)
    task.train()
    opt = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    x = torch.randn(16, 2, 3, 32, 32)
    x[:, 1] = x[:, 0] + 0.3 * torch.randn(16, 3, 32, 32)  # two "views" of each image
    losses = []
    for _ in range(20):
        loss = task((x, None, None))
        opt.zero_grad()
        loss.backward()
        opt.step()
        task.after_step()
        losses.append(loss.item())
    assert losses[0] == 0.0  # empty queue: the positive is the only candidate
    assert losses[-1] < 0.6 * losses[1], losses
    before = [p.clone() for p in task.key_encoder.parameters()]
    task.after_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, task.key_encoder.parameters(), strict=True))


@pytest.mark.parametrize("method", ["simclr"])
def test_a_few_pretraining_steps_lower_the_loss(tmp_path, make_images, method):
    data = make_images(tmp_path / "imgs", classes=("a", "b", "c", "d"), per_class=12, size=32, seed=2)
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(data), "--arch", "mobilenet_v3_small", "--method", method,
                                 "--epochs", "8", "--batch-size", "16", "--queue-size", "32", "--image-size", "32",
                                 "--lr", "0.05", "--ema", "0.9", "--workers", "0", "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "epoch"]
    assert len(losses) == 8
    assert np.mean(losses[-2:]) < 0.95 * np.mean(losses[:2]), losses
    model, spec = load_model(out / "student")
    assert spec.source["kind"] == "pretrain" and spec.source["method"] == method
    assert spec.arch_kwargs.get("head") in (None, "none")  # the projection head is not kept
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, spec.embed_dim)


def test_unknown_pretrain_method_is_one_line(tmp_path, class_folder):
    result = runner.invoke(app, ["pretrain", str(class_folder), "--method", "byol", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "simclr" in result.output  # a value off the list: bad usage


def test_pretraining_can_start_from_a_saved_model(tmp_path, make_images):
    from compress_edge.models.files import save_model, spec_for
    from compress_edge.models.registry import create_model

    data = make_images(tmp_path / "imgs", classes=("a", "b"), per_class=8, size=32, seed=3)
    torch.manual_seed(5)
    start = create_model("mobilenet_v3_small", small_input=True).eval()
    save_model(start, spec_for(start, image_size=32), tmp_path / "start")
    out = tmp_path / "run"
    args = ["pretrain", str(data), "--arch", "mobilenet_v3_small", "--init", str(tmp_path / "start"), "--epochs", "1",
            "--batch-size", "8", "--lr", "1e-12", "--image-size", "32", "--workers", "0", "--no-progress",
            "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    model, spec = load_model(out / "student")
    assert spec.source["init"] == str(tmp_path / "start")
    trained = dict(model.named_parameters())
    for name, p in start.named_parameters():  # a learning rate of 1e-12 leaves the starting weights as they were
        torch.testing.assert_close(trained[name], p, atol=1e-6, rtol=0)
    shutil.rmtree(tmp_path / "start")  # a resumed run takes its weights from its checkpoint, not from --init
    resumed = runner.invoke(app, ["pretrain", "--resume", str(out), "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    save_model(start, spec_for(start, image_size=32), tmp_path / "start")
    wrong = runner.invoke(app, [*args[:3], "resnet18", *args[4:-1], str(tmp_path / "run2")])
    assert wrong.exit_code == 1 and "--arch mobilenet_v3_small" in wrong.output, wrong.output


def test_crop_scale_sets_the_views_and_is_checked(tmp_path, class_folder):
    from compress_edge.defaults import PRETRAIN_CROP_SCALE
    from compress_edge.errors import TrainingError
    from compress_edge.train.pretrain import PretrainOptions, resolve_pretraining

    def views(**kw):
        ready = resolve_pretraining(PretrainOptions(data=str(class_folder), out=str(tmp_path / "r"),
                                                    arch="mobilenet_v3_small", image_size=32, **kw))
        return ready.dataset.transform.augment.scale, ready.resolved["crop_scale"]

    assert views() == ((PRETRAIN_CROP_SCALE, 1.0), PRETRAIN_CROP_SCALE)
    assert views(crop_scale=0.5) == ((0.5, 1.0), 0.5)
    with pytest.raises(TrainingError, match="--crop-scale must be in"):
        views(crop_scale=1.5)
    result = runner.invoke(app, ["pretrain", str(class_folder), "--crop-scale", "0", "--out", str(tmp_path / "r2")])
    assert result.exit_code == 1 and "--crop-scale must be in (0, 1]" in result.output, result.output


def test_a_pretrained_model_below_raw_pixels_is_told_what_pretraining_needs(tmp_path, make_images):
    """The end-of-run check of pretrain says what helps pretraining (more images and steps, or a teacher
    pretrained elsewhere), not distill's "check the teacher": pretrain has none. One epoch of 120 images
    whose classes raw pixels tell apart at a glance leaves the model behind them."""
    data = make_images(tmp_path / "imgs", per_class=40, size=24, seed=3)
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", str(data), "--arch", "mobilenet_v3_small", "--epochs", "1",
                                 "--batch-size", "16", "--workers", "0", "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output
    heldout = json.loads((out / "quality.json").read_text())["heldout"]
    rows = heldout["rows"]
    assert rows["raw pixels"]["knn20"] >= rows["the pretrained model"]["knn20"], rows
    below = [w for w in heldout["warnings"] if "does not beat raw pixels" in w]
    assert len(below) == 1 and "pretrained on a large set" in below[0] and "check the teacher" not in below[0]


def test_the_automatic_small_input_stem_on_a_cpu_names_the_faster_choice():
    from compress_edge.train.pretrain import stem_hint

    hint = stem_hint("resnet18", {"small_input": True}, {}, "cpu")
    assert hint is not None and "--arch-kwargs small_input=false" in hint and hint.startswith("resnet18 ")
    assert stem_hint("resnet18", {"small_input": True}, {}, "cuda") is None  # a GPU: the default is the choice
    assert stem_hint("resnet18", {"small_input": True}, {"small_input": True}, "cpu") is None  # the user's choice
    assert stem_hint("resnet18", {"small_input": False}, {}, "cpu") is None  # ImageNet's stem: nothing to say
    assert stem_hint("vit_tiny_patch16_224", {"small_input": True}, {}, "cpu") is None  # a ViT has no stem
