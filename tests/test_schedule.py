"""Run settings that follow the data: batch, run length, key-encoder momentum, queue, learning rate."""

from __future__ import annotations

import pytest

from compress_edge.defaults import (
    DISTILL_MAX_EPOCHS,
    DISTILL_MIN_BATCH,
    DISTILL_MIN_EPOCHS,
    DISTILL_MIN_STEPS,
    DISTILL_MIN_STEPS_PER_EPOCH,
    DISTILL_PLAN_LIMITS,
)
from compress_edge.train.schedule import (
    LATE_FALL_WARN,
    auto_batch_size,
    auto_queue_size,
    key_encoder_momentum,
    late_fall,
    plan_run,
    scaled_lr,
    steps_per_epoch,
)


@pytest.mark.parametrize(("images", "batch"), [(100, 16), (500, 32), (640, 64), (2_000, 128), (20_000, 256),
                                               (2_000_000, 256)])
def test_the_batch_leaves_at_least_eight_steps_an_epoch(images, batch):
    assert auto_batch_size(images) == batch
    assert steps_per_epoch(images, batch) >= 8 or batch == 16


def test_a_set_smaller_than_the_smallest_batch_still_makes_a_step():
    assert auto_batch_size(20, smallest=32) == 16
    assert auto_batch_size(20, world_size=2, smallest=32) == 8
    assert steps_per_epoch(20, auto_batch_size(20, smallest=32)) == 1


def test_the_batch_is_per_process_and_counts_every_process():
    assert auto_batch_size(2_000, world_size=4) == 32  # 4 x 32 x 8 <= 2,000 < 4 x 64 x 8


@pytest.mark.parametrize(("images", "batch", "epochs"), [(432, 32, 308), (580, 32, 223), (1_078, 32, 130),
                                                         (1_800, 32, 130), (4_500, 64, 130), (8_192, 128, 130),
                                                         (20_000, 256, 130), (2_000_000, 256, 130)])
def test_distills_batch_gives_a_few_thousand_images_their_steps(images, batch, epochs):
    """distill's plan: 130 epochs at a batch that leaves 64 steps an epoch, never under 32 images (the
    README's measurements: on 4,500 shapes batch 256 ended 11 points behind the teacher, 64 level with it,
    in the same CPU time; batch 16 cost a 432-image set 6 points), and more epochs where 130 are fewer
    than 4,000 steps (430 images at 1,690 steps ended with the loss still falling, 20 points short)."""
    plan = plan_run(images, batch_size=None, epochs=None, lr=None, **DISTILL_PLAN_LIMITS)
    assert plan.batch_size == batch
    assert plan.steps_per_epoch >= DISTILL_MIN_STEPS_PER_EPOCH or batch == DISTILL_MIN_BATCH
    assert plan.epochs == epochs >= DISTILL_MIN_EPOCHS
    assert plan.steps >= DISTILL_MIN_STEPS
    # the fewest epochs that give those steps: one epoch less would not
    assert epochs == DISTILL_MIN_EPOCHS or (epochs - 1) * plan.steps_per_epoch < DISTILL_MIN_STEPS
    # pretrain keeps the larger batch (SimCLR, its default method, takes its negatives from the batch)
    assert auto_batch_size(images) >= batch


@pytest.mark.parametrize("images", [40, 100, 300])
def test_a_few_dozen_images_are_not_thousands_of_epochs(images):
    plan = plan_run(images, batch_size=None, epochs=None, lr=None, **DISTILL_PLAN_LIMITS)
    assert plan.epochs == DISTILL_MAX_EPOCHS and plan.steps < DISTILL_MIN_STEPS


@pytest.mark.parametrize("steps", [20, 200, 1_000, 20_000, 650_000])
def test_the_key_encoder_forgets_its_initialisation_well_before_the_end(steps):
    m = key_encoder_momentum(steps)
    assert 0 <= m <= 0.999
    # The share of the random initialisation left in the key encoder halfway through the run.
    assert m ** (steps / 2) < 1e-3 or m == 0.999
    if steps >= 20_000:
        assert m == pytest.approx(0.999)  # long runs keep the paper's momentum


def test_a_short_run_does_not_keep_the_papers_momentum():
    # 800 steps at 0.999 would leave 45 % of the random initialisation in the key encoder at the end.
    assert 0.999**800 > 0.4
    assert key_encoder_momentum(800) ** 800 < 1e-6


def test_queue_is_the_papers_or_the_whole_data():
    assert auto_queue_size(640) == 640
    assert auto_queue_size(2_000_000) == 128_000


@pytest.mark.parametrize("images", [500, 2_000, 20_000, 2_000_000])
def test_plan_counts_steps_not_epochs(images):
    plan = plan_run(images, batch_size=None, epochs=None, lr=None, base_lr=0.05, min_steps=600, min_epochs=10,
                    max_epochs=200)
    assert plan.steps >= 600 or plan.epochs == 200
    assert plan.epochs >= 10
    assert plan.lr == pytest.approx(0.05 * plan.batch_size / 256)
    assert set(plan.automatic) == {"batch", "epochs", "lr"}
    assert plan.steps == plan.epochs * plan.steps_per_epoch
    assert 0 < plan.warmup_steps < plan.steps


def test_sqrt_scaling_keeps_small_batches_learning():
    assert scaled_lr(0.2, 256, rule="sqrt") == pytest.approx(0.2)
    assert scaled_lr(0.2, 64, rule="sqrt") == pytest.approx(0.1)
    assert scaled_lr(0.2, 64, world_size=4, rule="sqrt") == pytest.approx(0.2)
    assert scaled_lr(0.05, 64) == pytest.approx(0.0125)
    plan = plan_run(640, batch_size=None, epochs=None, lr=None, base_lr=0.2, min_steps=600, min_epochs=10,
                    max_epochs=200, lr_scaling="sqrt")
    assert plan.batch_size == 64 and plan.lr == pytest.approx(0.1)
    with pytest.raises(ValueError):
        scaled_lr(0.2, 64, rule="cube")


def test_a_given_setting_is_kept():
    plan = plan_run(20_000, batch_size=100, epochs=3, lr=0.2, base_lr=0.05, min_steps=600, min_epochs=10,
                    max_epochs=200)
    assert (plan.batch_size, plan.epochs, plan.lr, plan.steps) == (100, 3, 0.2, 600)
    assert plan.automatic == ()
    assert "batch 100" in plan.describe() and "600 steps" in plan.describe()



def test_a_run_stopped_while_the_loss_still_fell_is_told_from_a_finished_one():
    import math

    # Stopped mid-descent: the loss falls at the same pace to the end (a quarter of its fall in the last quarter).
    assert late_fall([2.6 - 0.05 * e for e in range(30)]) == pytest.approx(8 / 29)  # epochs 22 to 30 of 30
    # Finished: the loss levelled off long before the end.
    assert late_fall([0.1 + 2.5 * math.exp(-e / 10) for e in range(130)]) < LATE_FALL_WARN / 10
    # A loss that fell only in the last quarter.
    assert late_fall([2.0] * 9 + [1.0] * 3) == pytest.approx(1.0)
    assert late_fall([2.0] * 7) is None  # too few epochs to tell
    assert late_fall([1.0] * 10 + [1.5]) is None  # the loss did not fall
