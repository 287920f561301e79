"""What the methods on the engine (``distill``, ``pretrain``) share: options kept in the run folder for
``--resume``, the held-out split and the run plan, the frozen and momentum encoders, and the run itself
(the folder's lock and guard, seeding, the engine, the checks before and after training)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress_edge.errors import TrainingError
from compress_edge.train.checkpoints import seed_everything
from compress_edge.train.config import TrainConfig
from compress_edge.train.distributed import current_dist
from compress_edge.train.engine import Trainer, TrainResult
from compress_edge.train.run_folder import run_folder

#: Options that name a file or folder (besides ``data``), recorded as absolute paths.
_PATH_OPTIONS = ("teacher", "teacher_weights", "teacher_cache", "data_root", "init")


class RunOptions:
    """A method's options (a dataclass with a ``train: TrainConfig`` field), saved in config.json."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def recorded(self) -> dict[str, Any]:
        """The options as config.json keeps them: :meth:`to_dict` with the data and every existing file
        or folder made absolute, so that ``--resume`` works from any working directory."""
        from compress_edge.data.grammar import absolute_data, absolute_if_exists

        d = self.to_dict()
        for key in _PATH_OPTIONS:
            if isinstance(d.get(key), str):
                d[key] = absolute_if_exists(d[key])
        if isinstance(d.get("data"), str):
            d["data"] = absolute_data(d["data"], d.get("data_root"))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        d = dict(d)
        d["train"] = TrainConfig(**d.get("train", {}))
        return cls(**d)


def check_method(method: str, methods: tuple[str, ...]) -> None:
    if method not in methods:
        raise TrainingError(f"unknown --method {method!r}; choose one of: {', '.join(methods)}")


def crop_range(crop_scale: float | None, default: float) -> tuple[float, float]:
    """--crop-scale (the smallest random crop's share of the image's area, in (0, 1]; None: the
    command's ``default``) as the (min, max) area range of the augmented views."""
    value = default if crop_scale is None else float(crop_scale)
    if not 0 < value <= 1:
        raise TrainingError(f"--crop-scale must be in (0, 1] (a share of the image's area), got {crop_scale}")
    return value, 1.0


def holdout_and_plan(dataset, images, opts, **limits) -> tuple[Any, Any, Any]:
    """The training set (``images``, the dataset as the method reads it, less the held-out images: up to
    ``opts.holdout`` of a labelled dataset), the held-out indices and the run plan (``limits``: the
    method's base lr and run length bounds, see :func:`compress_edge.train.schedule.plan_run`)."""
    from torch.utils.data import Subset

    from compress_edge.eval.quality import holdout_split
    from compress_edge.train.schedule import plan_run

    train_idx, heldout = holdout_split(dataset.labels, opts.holdout if dataset.has_labels else 0.0,
                                       seed=opts.train.seed)
    train_set = images if len(heldout) == 0 else Subset(images, train_idx.tolist())
    plan = plan_run(len(train_set), batch_size=opts.train.batch_size, epochs=opts.train.epochs, lr=opts.train.lr,
                    world_size=current_dist().world_size, max_steps_per_epoch=opts.train.max_steps_per_epoch,
                    **limits)
    return train_set, heldout, plan


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target = momentum * target + (1 - momentum) * source, over parameters (key encoder, MoCo)."""
    t_params = [p for p in target.parameters()]
    s_params = [p.detach() for p in source.parameters()]
    if len(t_params) != len(s_params):
        raise TrainingError("EMA target and source do not have the same parameters")
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def frozen(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients, for a teacher."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


Check = Callable[[Any, Path, torch.device], None]


def run_method(command: str, opts, resolve: Callable[[Any], Any], *, resume: bool, stop_after_epochs: int | None,
               write_model: Callable[[Any, Path], None], announce: Callable[[Any, Trainer], None],
               check_after: Check, check_before: Check | None = None) -> TrainResult:
    """Train ``compress-edge COMMAND`` into ``opts.out``, holding its lock for the whole run (one writer
    per run folder): a new run, or with ``resume`` the one there. ``resolve(opts)`` builds the run (an
    object with ``task``, ``train_set``, ``plan`` and ``resolved``) after seeding, so that the initial
    weights follow ``--seed``; ``write_model(ready, run_dir)`` runs after each checkpoint, ``announce``
    logs the run; ``check_before`` (a new run) and ``check_after`` (a finished one) record its checks.
    """
    with run_folder(opts.out, command, resume=resume) as run_dir:
        seed_everything(opts.train.seed)
        ready = resolve(opts)
        config = opts.train.with_plan(ready.plan)
        trainer = Trainer(ready.task, config, run_dir, on_checkpoint=lambda folder: write_model(ready, folder),
                          extra_config={command: opts.recorded(), "plan": ready.plan.to_dict(),
                                        "resolved": ready.resolved})
        announce(ready, trainer)
        if check_before is not None and not resume and trainer.dist.is_main:
            check_before(ready, run_dir, trainer.device)
        result = trainer.fit(ready.train_set, resume=resume, stop_after_epochs=stop_after_epochs)
        if result.epochs_done >= config.epochs and trainer.dist.is_main:
            check_after(ready, run_dir, trainer.device)
    return result
