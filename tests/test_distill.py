"""Distillation: the task, the engine (resume, DDP, NaN), the teacher cache, and a tiny real run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from compress_edge.cli import app
from compress_edge.errors import DataError, TrainingError
from compress_edge.models.resolve import create_model, load_model
from compress_edge.train.config import TrainConfig
from compress_edge.train.distill import DistillOptions, DistillTask, run_distill, run_length_check
from compress_edge.train.engine import Trainer
from compress_edge.train.losses import build_loss
from compress_edge.train.method import ema_update

runner = CliRunner()


class TinyStudent(nn.Module):
    """No batch norm, so a 2-process run can match a 1-process run exactly."""

    def __init__(self, dim: int = 12):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(8, dim))

    def forward(self, x):
        return self.net(x)


class TensorSet(torch.utils.data.Dataset):
    def __init__(self, n=48, teacher_dim=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, 16, 16, generator=g)
        self.teacher = torch.randn(n, teacher_dim, generator=g)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.teacher[i], i


def _config(**kw):
    base = dict(epochs=2, batch_size=8, lr=0.05, warmup_epochs=0.0, workers=0, device="cpu", log_every=1, progress=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_only_the_student_learns_and_the_key_encoder_follows_by_ema(tmp_path):
    torch.manual_seed(0)
    teacher = create_model("resnet18", small_input=True)
    student = create_model("mobilenet_v3_small", small_input=True)
    task = DistillTask(student, build_loss("compress-2q", teacher.embed_dim, student.embed_dim, queue_size=16),
                       teacher=teacher, momentum_encoder=True, ema=0.9)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = [p.detach().clone() for p in student.parameters()]
    key_before = [p.detach().clone() for p in task.key_encoder.parameters()]

    images = torch.randn(16, 3, 32, 32)
    ds = torch.utils.data.TensorDataset(images, torch.zeros(16, dtype=torch.long), torch.arange(16))
    Trainer(task, _config(epochs=1, batch_size=4), tmp_path / "run").fit(ds)

    for k, v in teacher.state_dict().items():  # weights and batch-norm statistics untouched
        torch.testing.assert_close(v, teacher_before[k])
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for p in task.key_encoder.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(key_before, task.key_encoder.parameters(), strict=True))


def test_ema_update_formula():
    target, source = nn.Linear(3, 2), nn.Linear(3, 2)
    old = [p.detach().clone() for p in target.parameters()]
    ema_update(target, source, 0.75)
    for o, t, s in zip(old, target.parameters(), source.parameters(), strict=True):
        torch.testing.assert_close(t.detach(), 0.75 * o + 0.25 * s.detach())


def test_non_finite_loss_stops_with_the_step(tmp_path):
    ds = TensorSet()
    ds.teacher[20:] = float("nan")
    task = DistillTask(TinyStudent(), build_loss("compress-2q", 16, 12, queue_size=16))
    with pytest.raises(TrainingError, match=r"epoch 1, step \d+.*--lr"):
        Trainer(task, _config(), tmp_path / "run").fit(ds)


_DDP_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[3])
    from test_distill import TensorSet, TinyStudent, _config
    from compress_edge.train.distill import DistillTask
    from compress_edge.train.losses import build_loss
    from compress_edge.train.distributed import init_distributed
    from compress_edge.train.engine import Trainer
    out, batch = sys.argv[1], int(sys.argv[2])
    info = init_distributed("cpu")
    torch.manual_seed(0)
    task = DistillTask(TinyStudent(), build_loss("compress-2q", 16, 12, queue_size=40), momentum_encoder=True, ema=0.9)
    Trainer(task, _config(batch_size=batch), out + "/run").fit(TensorSet())
    torch.save({"teacher": task.criterion.teacher_queue.bank, "student": task.criterion.student_queue.bank,
                "ids": task.criterion.teacher_queue.ids, "weights": task.student.state_dict()},
               f"{out}/rank{info.rank}.pt")
""")


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_two_process_gloo_run_matches_one_process_on_the_same_global_batch(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(_DDP_SCRIPT)
    tests_dir = str(Path(__file__).parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = subprocess.run([*torchrun, str(script), str(tmp_path / "two"), "4", tests_dir], env=env,
                         capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), "8", tests_dir], env=env,
                         capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]

    r0, r1 = (torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    for key in ("teacher", "student"):
        assert torch.equal(r0[key], r1[key]), f"{key} queues differ across ranks"
        torch.testing.assert_close(r0[key], single[key], atol=1e-5, rtol=1e-4)
    # The image ids travel with the keys: gathered in rank order, the same queue as one process.
    assert torch.equal(r0["ids"], r1["ids"]) and torch.equal(r0["ids"], single["ids"])
    assert (r0["ids"] >= 0).all()
    losses_two, losses_one = _losses(tmp_path / "two" / "run"), _losses(tmp_path / "one" / "run")
    assert len(losses_two) == len(losses_one) == 12
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-4, atol=1e-6)
    assert max(losses_one) > 0.05  # a real loss, not zeros
    for k, v in single["weights"].items():
        torch.testing.assert_close(r0["weights"][k], v, atol=1e-5, rtol=1e-4)


def _options(data, out, teacher, **kw):
    train = dict(epochs=2, batch_size=6, workers=0, device="cpu", progress=False, lr=0.05, warmup_epochs=0.0)
    train.update(kw.pop("train", {}))
    base = dict(data=str(data), out=str(out), teacher=None if teacher is None else str(teacher), student_arch="mobilenet_v2",
                student_kwargs={"width_mult": 0.35}, queue_size=12, train=TrainConfig(**train))
    base.update(kw)
    return DistillOptions(**base)


def test_the_python_api_defaults_are_the_commands_auto_settings(tmp_path):
    """DistillOptions() and a bare TrainConfig() leave batch, run length, lr and warm-up on auto, as the
    CLI does; the engine refuses unresolved settings with what to do instead of training on a guess."""
    from compress_edge.train.pretrain import PretrainOptions

    for train in (DistillOptions(data="d", out="o").train, PretrainOptions(data="d", out="o").train, TrainConfig()):
        assert (train.epochs, train.batch_size, train.lr, train.warmup_epochs) == (None, None, None, None)
    with pytest.raises(TrainingError, match="epochs, batch_size, lr, warmup_epochs left on auto.*with_plan"):
        Trainer(nn.Linear(2, 2), TrainConfig(device="cpu"), tmp_path / "run")


def test_two_epochs_equal_one_epoch_resume_one_epoch(tmp_path, class_folder, saved_teacher):
    straight = run_distill(_options(class_folder, tmp_path / "a", saved_teacher))
    assert straight.epochs_done == 2
    first = run_distill(_options(class_folder, tmp_path / "b", saved_teacher), stop_after_epochs=1)
    assert first.epochs_done == 1
    from compress_edge.train.distill import load_options

    second = run_distill(load_options(tmp_path / "b"), resume=True)
    assert second.epochs_done == 2 and second.global_step == straight.global_step
    a, _ = load_model(tmp_path / "a" / "student")
    b, _ = load_model(tmp_path / "b" / "student")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, msg=f"{k} differs after resume")
    ca = torch.load(tmp_path / "a" / "checkpoints" / "last.pt", weights_only=True)["task"]
    cb = torch.load(tmp_path / "b" / "checkpoints" / "last.pt", weights_only=True)["task"]
    torch.testing.assert_close(ca["criterion.teacher_queue.bank"], cb["criterion.teacher_queue.bank"])
    assert not any(k.startswith("teacher.") for k in ca)  # the frozen teacher is not checkpointed


def test_a_run_started_with_relative_paths_resumes_from_another_directory(tmp_path, class_folder, saved_teacher,
                                                                          monkeypatch):
    from compress_edge.train.distill import load_options

    monkeypatch.chdir(tmp_path)
    data, teacher = os.path.relpath(class_folder), os.path.relpath(saved_teacher)
    run_distill(_options(f"{data}@12", "run", teacher), stop_after_epochs=1)
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["distill"]
    assert recorded["data"] == f"{class_folder.resolve()}@12" and recorded["teacher"] == str(saved_teacher.resolve())
    monkeypatch.chdir(tmp_path / "run")  # the relative paths name nothing here
    assert run_distill(load_options(tmp_path / "run"), resume=True).epochs_done == 2


def test_without_a_progress_bar_epochs_log_lines_with_the_time_left(tmp_path, class_folder, saved_teacher, caplog,
                                                                     monkeypatch):
    import logging

    from compress_edge.train import engine

    monkeypatch.setattr(engine, "EPOCH_LINE_SECONDS", 1e9)  # between the first and last epochs: none
    with caplog.at_level(logging.INFO, logger="compress_edge.train.engine"):
        run_distill(_options(class_folder, tmp_path / "run", saved_teacher, train={"epochs": 3}))  # progress=False
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 2 and lines[0].startswith("epoch 1/3: loss ") and "images/s" in lines[0], lines
    assert lines[1].startswith("epoch 3/3: ") and " left" in lines[0] and " left" not in lines[1]


def test_a_long_first_epoch_gives_the_time_left_from_its_middle(tmp_path, class_folder, saved_teacher, caplog,
                                                                 monkeypatch):
    import logging

    from compress_edge.train import engine

    monkeypatch.setattr(engine, "FIRST_LINE_SECONDS", 0.0)  # every first epoch is "long" here
    monkeypatch.setattr(engine, "EPOCH_LINE_SECONDS", 1e9)
    with caplog.at_level(logging.INFO, logger="compress_edge.train.engine"):
        run_distill(_options(class_folder, tmp_path / "run", saved_teacher, train={"epochs": 3}))  # 3 steps an epoch
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 3 and lines[0].startswith("epoch 1/3: step 1/3, loss ") and lines[0].endswith(" left"), lines
    assert lines[1].startswith("epoch 1/3: loss ") and lines[2].startswith("epoch 3/3: loss "), lines


def test_resuming_a_finished_run_says_there_was_nothing_left(tmp_path, class_folder, saved_teacher):
    out = tmp_path / "run"
    args = ["distill", str(class_folder), "--teacher", str(saved_teacher), "--arch", "mobilenet_v3_small",
            "--epochs", "1", "--batch-size", "6", "--queue-size", "12", "--workers", "0", "--no-progress",
            "--holdout", "0", "--out", str(out)]
    first = runner.invoke(app, args)
    assert first.exit_code == 0 and "last loss" in first.stdout, first.output
    again = runner.invoke(app, ["distill", "--resume", str(out), "--no-progress"])
    assert again.exit_code == 0 and "nothing left to train" in again.stdout and "nan" not in again.stdout, again.output


def test_durations_read_as_a_person_writes_them():
    from compress_edge.progress import format_duration

    assert [format_duration(s) for s in (0.4, 42, 425, 12_000)] == ["0 s", "42 s", "7 min 5 s", "3 h 20 min"]


def test_a_run_folder_is_not_overwritten(tmp_path, class_folder, saved_teacher):
    run_distill(_options(class_folder, tmp_path / "a", saved_teacher, train={"epochs": 1}))
    with pytest.raises(TrainingError, match="--resume"):
        run_distill(_options(class_folder, tmp_path / "a", saved_teacher, train={"epochs": 1}))


def test_random_architecture_teacher_is_refused(tmp_path, class_folder):
    with pytest.raises(TrainingError, match="--teacher-weights"):
        run_distill(_options(class_folder, tmp_path / "a", "resnet18"))


def _cache(tmp_path, data, teacher, out="cache", *extra):
    result = runner.invoke(app, ["cache-teacher", str(data), "--teacher", str(teacher), "--out", str(tmp_path / out),
                                 "--workers", "0", "--no-progress", "--batch-size", "8", *extra])
    assert result.exit_code == 0, result.output
    return tmp_path / out


def test_cache_with_views_replays_the_teachers_pixels(tmp_path, class_folder, saved_teacher):
    from compress_edge.data.datasets import open_dataset
    from compress_edge.data.transforms import TrainAugment
    from compress_edge.train.teacher_cache import CachedTeacherDataset, open_cache

    cache = open_cache(_cache(tmp_path, class_folder, saved_teacher, "cache", "--views", "3", "--shard-rows", "7"))
    assert len(cache) == 18 and cache.views == 3 and len(cache.meta["emb_shards"]) == 3
    teacher, spec = load_model(saved_teacher)
    ds = open_dataset(str(class_folder))
    augment = TrainAugment(spec.image_size, spec.mean, spec.std)
    replay = CachedTeacherDataset(ds, cache, augment)
    torch.manual_seed(0)
    for i in (0, 9, 17):
        image, emb, index = replay[i]
        assert index == i
        with torch.no_grad():
            fresh = torch.nn.functional.normalize(teacher(image[None]), dim=1)[0]
        # The student's image, embedded by the teacher now, is one of the recorded views: same pixels.
        assert torch.nn.functional.cosine_similarity(fresh, emb, dim=0) > 0.999


def test_centre_cache_holds_the_features_evaluation_extracts(tmp_path, class_folder, saved_teacher):
    """One extraction loop: the paper's centre-view cache and ``extract_features`` embed alike."""
    from compress_edge.data.datasets import open_dataset
    from compress_edge.eval.features import extract_features
    from compress_edge.train.teacher_cache import open_cache

    cache = open_cache(_cache(tmp_path, class_folder, saved_teacher, "cache", "--shard-rows", "5"))
    teacher, spec = load_model(saved_teacher)
    feats, _ = extract_features(teacher, open_dataset(str(class_folder)), spec=spec, device="cpu", use_cache=False,
                                progress=False)
    np.testing.assert_allclose(cache.all_embeddings(), feats, atol=2e-3)  # float16


def test_cache_fingerprint_mismatch_is_refused(tmp_path, class_folder, saved_teacher, make_images):
    cache = _cache(tmp_path, class_folder, saved_teacher)
    with pytest.raises(DataError, match="another transform"):
        run_distill(_options(class_folder, tmp_path / "run", None, teacher_cache=str(cache), image_size=48))
    other = tmp_path / "other"
    make_images(other, per_class=6, seed=5)
    with pytest.raises(DataError, match="other data"):
        run_distill(_options(other, tmp_path / "run2", None, teacher_cache=str(cache)))


def test_crop_scale_is_recorded_by_the_cache_and_followed_by_the_student(tmp_path, class_folder, saved_teacher):
    from compress_edge.defaults import DISTILL_CROP_SCALE
    from compress_edge.train.distill import resolve_distillation as setup
    from compress_edge.train.teacher_cache import open_cache

    cache = _cache(tmp_path, class_folder, saved_teacher, "cache", "--views", "2", "--crop-scale", "0.6")
    assert open_cache(cache).meta["parts"]["transform"]["augment"]["scale"] == [0.6, 1.0]
    # Every recorded view keeps at least 60 % of the image's area.
    params = np.load(cache / "params-00000.npy")
    height, width = params[..., 2], params[..., 3]  # slots: top, left, height, width
    assert (height * width >= 0.6 * 24 * 24 - 2 * 24).all()  # the images are 24 px; rounding costs a row
    run = setup(_options(class_folder, tmp_path / "run", None, teacher_cache=str(cache)))
    assert run.resolved["crop_scale"] == 0.6  # the cache's, with no option given
    with pytest.raises(DataError, match="another transform"):  # another scale is another transform
        setup(_options(class_folder, tmp_path / "run2", None, teacher_cache=str(cache), crop_scale=0.2))
    with pytest.raises(TrainingError, match="--crop-scale must be in"):
        setup(_options(class_folder, tmp_path / "run3", saved_teacher, crop_scale=1.5))
    live = setup(_options(class_folder, tmp_path / "run4", saved_teacher))
    assert live.resolved["crop_scale"] == DISTILL_CROP_SCALE
    old = _cache(tmp_path, class_folder, saved_teacher, "old", "--views", "2", "--crop-scale", "0.2")
    assert setup(_options(class_folder, tmp_path / "run5", None, teacher_cache=str(old))).resolved["crop_scale"] == 0.2


def test_a_cache_made_without_a_bar_logs_each_shard_with_the_time_left(tmp_path, class_folder, saved_teacher):
    result = runner.invoke(app, ["cache-teacher", str(class_folder), "--teacher", str(saved_teacher), "--out",
                                 str(tmp_path / "cache"), "--workers", "0", "--no-progress", "--shard-rows", "5"],
                           env={"COLUMNS": "200"})  # 18 images: 4 shards
    assert result.exit_code == 0, result.output
    lines = [" ".join(line.split()[1:]) for line in result.output.splitlines() if "teacher cache: shard" in line]
    assert len(lines) == 4 and lines[0].startswith("teacher cache: shard 1/4 written (5 of 18 images); about "), lines
    assert lines[-1] == "teacher cache: shard 4/4 written (18 of 18 images)", lines


def test_interrupted_cache_resumes_from_complete_shards(tmp_path, class_folder, saved_teacher):
    out = _cache(tmp_path, class_folder, saved_teacher, "cache", "--shard-rows", "5")
    first = np.load(out / "emb-00001.npy")
    (out / "meta.json").unlink()  # as if stopped before the end
    (out / "emb-00003.npy").unlink()
    mtime = (out / "emb-00001.npy").stat().st_mtime_ns
    _cache(tmp_path, class_folder, saved_teacher, "cache", "--shard-rows", "5")
    assert (out / "emb-00001.npy").stat().st_mtime_ns == mtime  # kept, not recomputed
    assert np.array_equal(np.load(out / "emb-00001.npy"), first)
    assert (out / "emb-00003.npy").is_file() and (out / "meta.json").is_file()


def _leave_one_out_1nn(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Cosine 1-NN accuracy of each image against all the others."""
    x = torch.nn.functional.normalize(x, dim=1)
    sim = x @ x.T
    sim.fill_diagonal_(-2)
    return float((labels[sim.argmax(1)] == labels).float().mean())


def test_tiny_distillation_lowers_the_loss_on_training_and_clean_images(tmp_path, make_images):
    from compress_edge.data.datasets import open_dataset
    from compress_edge.data.synthetic import train_labelled_teacher
    from compress_edge.data.transforms import eval_transform
    from compress_edge.models.resolve import recalibrate_batchnorm
    from compress_edge.train.distill import load_teacher

    data = make_images(tmp_path / "imgs", classes=("a", "b", "c", "d"), per_class=16, size=32, seed=3)
    # A teacher with something to teach: a torchvision resnet18 trained on the folder's labels, loaded
    # the way a user's third-party checkpoint is (--teacher resnet18 --teacher-weights FILE).
    weights = train_labelled_teacher(data, tmp_path / "teacher.pth", image_size=32, epochs=15, batch_size=16)
    teacher, spec = load_teacher("resnet18", str(weights), str(data), 32)
    ds = open_dataset(str(data), transform=eval_transform(32, spec.mean, spec.std))
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    labels = torch.as_tensor(ds.labels)
    torch.manual_seed(0)
    with torch.no_grad():
        assert _leave_one_out_1nn(teacher(images), labels) > 0.9  # the teacher learned the classes
        # The baseline the project reports: the same student, random weights, batch norm re-estimated.
        before = recalibrate_batchnorm(create_model("mobilenet_v2", small_input=True, width_mult=0.35), images)
        acc_before = _leave_one_out_1nn(before(images), labels)

    opts = _options(data, tmp_path / "run", "resnet18", teacher_weights=str(weights), image_size=32,
                    queue_size=48, train={"epochs": 12, "batch_size": 16, "lr": 0.1})
    run_distill(opts)
    student, student_spec = load_model(tmp_path / "run" / "student")
    assert student_spec.source["method"] == "compress-1q" and student_spec.image_size == 32
    with torch.no_grad():
        acc_after = _leave_one_out_1nn(student(images), labels)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epoch_losses = [r["loss"] for r in records if r["kind"] == "epoch"]
    assert np.mean(epoch_losses[-3:]) < 0.8 * np.mean(epoch_losses[1:3]), epoch_losses
    assert acc_after > acc_before + 0.25, (acc_before, acc_after)


def test_distill_cli_end_to_end_and_errors(tmp_path, class_folder, saved_teacher):
    out = tmp_path / "run"
    args = ["distill", str(class_folder), "--teacher", str(saved_teacher), "--student-arch", "mobilenet_v3_small",
            "--epochs", "1", "--batch-size", "6", "--queue-size", "12", "--workers", "0", "--no-progress",
            "--out", str(out), "--method", "compress-1q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "student" / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["distill"]["method"] == "compress-1q" and "git_commit" in config["code"] or "compress_edge" in config["code"]
    bad = runner.invoke(app, [*args[:-2], "--out", str(tmp_path / "r2"), "--method", "nope"])
    assert bad.exit_code == 2 and "compress-2q" in bad.output
    bad = runner.invoke(app, ["distill", str(class_folder), "--teacher", str(saved_teacher), "--student-kwargs", "oops"])
    assert bad.exit_code == 1 and "key=value" in bad.output


def test_sigint_saves_a_checkpoint_and_the_run_resumes(tmp_path, class_folder, saved_teacher):
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "compress_edge", "distill", str(class_folder), "--teacher", str(saved_teacher),
           "--student-arch", "mobilenet_v3_small", "--epochs", "200", "--batch-size", "6", "--queue-size", "12",
           "--workers", "0", "--no-progress", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 4):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "--resume" in err and "Traceback" not in err
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < state["global_step"] < 200 * 3
    assert (out / "student" / "model.safetensors").is_file()  # a usable student is there already

    resumed = runner.invoke(app, ["distill", "--resume", str(out), "--stop-after", "1", "--no-progress"])
    assert resumed.exit_code == 0, resumed.output
    after = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert after["global_step"] > state["global_step"]
    assert after["epoch"] == state["epoch"] + 1 and after["batch_in_epoch"] == 0


def _epoch_lines(losses, first_epoch=1):
    return "".join(json.dumps({"kind": "epoch", "epoch": first_epoch + i, "step": 10 * (first_epoch + i), "loss": loss})
                   + "\n" + json.dumps({"kind": "train", "epoch": first_epoch + i, "loss": 9.0}) + "\n"
                   for i, loss in enumerate(losses))


def test_the_end_of_run_check_warns_when_the_loss_still_fell(tmp_path, caplog):
    import logging

    still_falling = tmp_path / "short"
    still_falling.mkdir()
    # 12 epochs falling at the same pace to the end; epoch 12 logged twice (a resume), the last line counts.
    (still_falling / "metrics.jsonl").write_text(_epoch_lines([2.6 - 0.1 * e for e in range(11)] + [3.0])
                                                 + _epoch_lines([1.5], first_epoch=12))
    with caplog.at_level(logging.WARNING, logger="compress_edge.train.distill"):
        record = run_length_check(still_falling, 12)
    assert record["still_falling"] and record["late_fall"] == pytest.approx(0.3 / 1.1, abs=1e-4)
    assert "--epochs 24" in caplog.text and record["try"] == "--epochs 24"
    assert json.loads((still_falling / "quality.json").read_text())["run_length"] == record
    # a caller that started the run another way (the demo) names its own longer run
    record = run_length_check(still_falling, 12, longer="compress-edge distill data --epochs {epochs} --out x")
    assert record["try"] == "compress-edge distill data --epochs 24 --out x"

    caplog.clear()
    finished = tmp_path / "long"
    finished.mkdir()
    (finished / "metrics.jsonl").write_text(_epoch_lines([0.1 + 2.5 * np.exp(-e / 10) for e in range(130)]))
    with caplog.at_level(logging.WARNING, logger="compress_edge.train.distill"):
        record = run_length_check(finished, 130)
    assert not record["still_falling"] and "still falling" not in caplog.text
    assert run_length_check(tmp_path, 130) is None  # no metrics: nothing to judge


def test_the_teacher_clock_times_the_steps_after_the_first_and_reports_once():
    from compress_edge.train.teacher_cost import TeacherClock

    reports = []
    clock = TeacherClock(lambda teacher_s, step_s: reports.append((teacher_s, step_s)), steps=3)
    # Steps start every 2 s (the first at 0 s, 10 s of warm-up); the teacher takes 0.5 s of each.
    for start in (0.0, 10.0, 12.0, 14.0, 16.0, 18.0, 20.0):
        clock.record(start, start + 0.5)
    assert reports == [(0.5, 2.0)]


def test_the_cache_estimate_and_when_it_is_suggested():
    from compress_edge.train.teacher_cost import cache_estimate

    # 1,000 steps of 1 s, 0.6 s of it the teacher at batch 32; a 16-view cache of 500 images costs
    # 16 * 500 * 0.6 / 32 = 150 s, and the steps then 0.4 s: 550 s instead of 1,000.
    est = cache_estimate(0.6, 1.0, steps_left=1000, images=500, batch_size=32, dim=512)
    assert (est["live_seconds"], est["cache_seconds"], est["cached_seconds"]) == (1000.0, 150.0, 550.0)
    assert est["teacher_share"] == 0.6 and est["suggest_cache"]
    assert est["cache_bytes"] == 2 * 16 * 500 * 512  # float16
    # The same cache where the disk has less than twice its size free: not suggested.
    assert not cache_estimate(0.6, 1.0, steps_left=1000, images=500, batch_size=32, dim=512,
                              free_bytes=2 * est["cache_bytes"] - 1)["suggest_cache"]
    # The same share on a run of 100 steps saves 45 s: not worth a second command.
    assert not cache_estimate(0.6, 1.0, steps_left=100, images=500, batch_size=32, dim=512)["suggest_cache"]
    # A run of few epochs: the cache would run the teacher about as often as the run does.
    assert not cache_estimate(0.6, 1.0, steps_left=320, images=500, batch_size=32, dim=512)["suggest_cache"]
    # A cheap teacher (10 % of the step) saves less than a quarter of the run.
    assert not cache_estimate(0.1, 1.0, steps_left=100_000, images=2000, batch_size=32, dim=512)["suggest_cache"]


def test_a_live_teacher_is_timed_and_a_cache_suggested_when_it_pays(tmp_path, class_folder, saved_teacher, caplog,
                                                                    monkeypatch):
    import logging

    from compress_edge.train import teacher_cost

    monkeypatch.setattr(teacher_cost, "TIMED_STEPS", 3)  # a tiny run: 3 steps an epoch
    # the teacher embeds the student's view, every step
    aug = {"teacher_view": "augmented"}
    run_distill(_options(class_folder, tmp_path / "short", saved_teacher, **aug))  # 6 steps: nothing to suggest
    short = json.loads((tmp_path / "short" / "quality.json").read_text())["teacher_cost"]
    assert 0 < short["teacher_share"] < 1 and short["steps_left"] == 2 and not short["suggest_cache"]

    monkeypatch.setattr(teacher_cost, "HINT_SECONDS", 0.0)  # any saving is worth it here
    monkeypatch.setattr(teacher_cost, "HINT_SHARE", 0.0)
    with caplog.at_level(logging.INFO, logger="compress_edge.train.teacher_cost"):
        run_distill(_options(class_folder, tmp_path / "long", saved_teacher, train={"epochs": 24}, **aug))
    cost = json.loads((tmp_path / "long" / "quality.json").read_text())["teacher_cost"]
    assert cost["steps_left"] == 68 and cost["suggest_cache"], cost  # 72 steps, 4 of them done
    assert cost["cached_seconds"] < cost["live_seconds"]
    assert cost["commands"][0].startswith(f"compress-edge cache-teacher {class_folder} --teacher {saved_teacher}")
    assert f"--teacher-cache {tmp_path / 'teacher-cache'} --out {tmp_path / 'long'}-cached" in cost["commands"][1]
    said = [r.getMessage() for r in caplog.records if "live teacher takes" in r.getMessage()]
    assert len(said) == 1 and cost["commands"][0] in said[0], said

    cache = _cache(tmp_path, class_folder, saved_teacher, "cache", "--views", "2")
    run_distill(_options(class_folder, tmp_path / "cached", None, teacher_cache=str(cache)))
    assert "teacher_cost" not in json.loads((tmp_path / "cached" / "quality.json").read_text())
    # The default centre view runs the teacher once per image: nothing to time...
    run_distill(_options(class_folder, tmp_path / "center", saved_teacher, train={"epochs": 24}))
    assert "teacher_cost" not in json.loads((tmp_path / "center" / "quality.json").read_text())
    # ...unless its embeddings are too many to keep in memory: then a centre-view cache is what pays
    from compress_edge.train import distill

    monkeypatch.setattr(distill, "TEACHER_MEMO_BYTES", 0)
    run_distill(_options(class_folder, tmp_path / "big", saved_teacher, train={"epochs": 24}))
    big = json.loads((tmp_path / "big" / "quality.json").read_text())["teacher_cost"]
    assert big["suggest_cache"] and big["views"] == 1 and "--views 0" in big["commands"][0], big


def test_the_heldout_check_of_a_cached_run_has_its_architecture_name_teacher(tmp_path, make_images):
    """A cache made from `--teacher resnet18 --teacher-weights FILE`: the end-of-run check loads that
    teacher again for its row (it used to look for a folder named resnet18 and leave the row out)."""
    import torchvision

    data = make_images(tmp_path / "images", per_class=40, size=24)  # 120 labelled images: 12 held out
    weights = tmp_path / "r18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    result = runner.invoke(app, ["cache-teacher", str(data), "--teacher", "resnet18", "--teacher-weights", str(weights),
                                 "--image-size", "32", "--views", "1", "--out", str(tmp_path / "cache"), "--workers",
                                 "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    run_distill(_options(data, tmp_path / "run", None, teacher_cache=str(tmp_path / "cache"), train={"epochs": 1}))
    rows = json.loads((tmp_path / "run" / "quality.json").read_text())["heldout"]["rows"]
    assert {"the student", "teacher", "raw pixels", "same network, random weights"} <= set(rows), rows


def test_a_teacher_named_beside_a_cache_must_be_the_one_it_was_made_from(tmp_path, class_folder, saved_teacher):
    import shutil

    cache = _cache(tmp_path, class_folder, saved_teacher, "cache", "--views", "1")
    other = tmp_path / "other-teacher"
    shutil.copytree(saved_teacher, other)
    args = ["distill", str(class_folder), "--teacher-cache", str(cache), "--epochs", "1", "--batch-size", "6",
            "--queue-size", "12", "--workers", "0", "--no-progress", "--holdout", "0"]
    refused = runner.invoke(app, [*args, "--teacher", str(other), "--out", str(tmp_path / "a")])
    assert refused.exit_code == 1 and "was made from" in refused.output, refused.output
    assert "leave out --teacher" in refused.output and not (tmp_path / "a").exists()
    # The same teacher, named by another path to it, is the cache's: accepted.
    same = runner.invoke(app, [*args, "--teacher", os.path.relpath(saved_teacher), "--out", str(tmp_path / "b")])
    assert same.exit_code == 0, same.output

