"""What the teacher embeds (``distill --teacher-view``): the whole image by default, once per image
(kept in memory), or the student's own augmented view; and how that meets a teacher cache, an old run
folder and the teacher clock."""

from __future__ import annotations

import json

import torch
from test_distill import TinyStudent, _cache, _options  # the distillation tests' helpers
from torch import nn
from typer.testing import CliRunner

from compress_edge.cli import app
from compress_edge.train.distill import DistillTask, run_distill
from compress_edge.train.losses import build_loss

runner = CliRunner()


class CountingTeacher(nn.Module):
    """A frozen-style teacher that counts the images it embedded."""

    def __init__(self, dim: int = 16):
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, dim))
        self.images = 0

    def forward(self, x):
        self.images += len(x)
        return self.net(x)


def test_a_centre_view_teacher_runs_once_per_image_and_its_memo_returns_its_embeddings():
    teacher = CountingTeacher()
    task = DistillTask(TinyStudent(), build_loss("compress-1q", 16, 12, queue_size=16), teacher=teacher,
                       memo_images=10)
    views = torch.randn(10, 3, 16, 16)
    with torch.no_grad():
        expected = teacher.net(views)
    seen = []
    for index in (torch.tensor([0, 1, 2, 3]), torch.tensor([2, 3, 4, 5]), torch.tensor([9, 0, 5, 1])):
        with torch.no_grad():
            seen.append(task._remembered(views[index], index))
        torch.testing.assert_close(seen[-1], expected[index], atol=2e-3, rtol=2e-3)  # kept as float16
    assert teacher.images == 7  # 0-5 and 9, each once
    # A second epoch runs the teacher on nothing and returns the same targets bit for bit.
    with torch.no_grad():
        again = task._remembered(views[torch.tensor([9, 0, 5, 1])], torch.tensor([9, 0, 5, 1]))
    assert teacher.images == 7 and torch.equal(again, seen[-1])
    assert not any(k.startswith("memo") or k.startswith("known") for k in task.checkpoint_state())


def test_distill_by_default_trains_on_augmented_views_against_the_teachers_whole_image(tmp_path, class_folder,
                                                                                      saved_teacher):
    from compress_edge.data.datasets import open_dataset
    from compress_edge.data.transforms import eval_transform
    from compress_edge.train.distill import resolve_distillation

    opts = _options(class_folder, tmp_path / "run", saved_teacher, holdout=0.0)  # the default view
    ready = resolve_distillation(opts)
    assert ready.resolved["teacher_view"] == "center" and ready.resolved["teacher_memo"]
    assert ready.task.memo_images == len(ready.dataset) == 18
    image = open_dataset(str(class_folder)).get_image(4)
    student_view, teacher_view, index = ready.train_set[4]
    centre = eval_transform(32, ready.teacher_spec.mean, ready.teacher_spec.std)
    assert torch.equal(teacher_view, centre(image))  # the whole image, as evaluation sees it
    assert index == 4 and not torch.equal(student_view, teacher_view)  # the student gets a random view

    result = run_distill(opts)
    assert result.epochs_done == 2
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert resolved["teacher_view"] == "center" and resolved["teacher_memo"] is True
    # --teacher-view augmented: the teacher embeds the student's own view, run every step
    aug = resolve_distillation(_options(class_folder, tmp_path / "aug", saved_teacher, holdout=0.0,
                                        teacher_view="augmented"))
    assert aug.resolved["teacher_view"] == "augmented" and not aug.task.memo_images
    assert aug.train_set is aug.dataset and aug.train_set[4][1] == 0  # the student's view, then its label


def test_a_run_started_before_the_teacher_view_option_resumes_with_the_view_it_had(tmp_path):
    from compress_edge.train.distill import load_options

    run = tmp_path / "old"
    run.mkdir()
    old = {"data": "images", "out": str(run), "teacher": "t", "mask_self": True}
    (run / "config.json").write_text(json.dumps({"distill": old}))
    assert load_options(run).teacher_view == "augmented"
    (run / "config.json").write_text(json.dumps({"distill": {**old, "teacher_view": None}}))
    assert load_options(run).teacher_view is None  # recorded as auto: resolved as any new run
    (run / "config.json").write_text(json.dumps({"distill": {**old, "teacher_cache": "cache"}}))
    assert load_options(run).teacher_view is None  # the cache's own view, whichever it holds


def test_a_teacher_view_that_contradicts_the_cache_is_refused(tmp_path, class_folder, saved_teacher):
    cache = _cache(tmp_path, class_folder, saved_teacher, "cache", "--views", "2")
    args = ["distill", str(class_folder), "--teacher-cache", str(cache), "--epochs", "1", "--batch-size", "6",
            "--queue-size", "12", "--workers", "0", "--no-progress", "--holdout", "0"]
    refused = runner.invoke(app, [*args, "--teacher-view", "center", "--out", str(tmp_path / "a")])
    assert refused.exit_code == 1 and "holds augmented views" in refused.output, refused.output
    assert "--views 0" in refused.output and not (tmp_path / "a").exists()
    agreed = runner.invoke(app, [*args, "--teacher-view", "augmented", "--out", str(tmp_path / "b")])
    assert agreed.exit_code == 0, agreed.output
