"""Method names and the paper's defaults, torch-free so that the command line imports without torch
(a device runs ``compress-edge search`` and ``classify`` with onnxruntime, faiss and numpy only)."""

from types import MappingProxyType

METHODS = ("compress-2q", "compress-2q-nomomentum", "compress-1q", "regression", "regression-bn")
PAPER_QUEUE_SIZE = 128_000  # CompRess, NeurIPS 2020
PAPER_TEMPERATURE = 0.04
#: distill's method when --method is not given. compress-1q scores the student against the frozen
#: teacher's anchors; compress-2q (the paper's best at 130 epochs of ImageNet) scores it against
#: anchors from a momentum copy of itself, which on short runs drift together with the student into
#: a collapsed state (README, "Which method by default").
DEFAULT_METHOD = "compress-1q"

#: distill: SGD learning rate for a batch of 256, scaled to the batch by its square root (0.1 at 64,
#: 0.14 at 128), from the learning-rate sweep in the README (two data sets). The paper's 0.05 with
#: linear scaling left runs of a few hundred images far from fitting the teacher.
DISTILL_BASE_LR = 0.2
DISTILL_LR_SCALING = "sqrt"
#: distill: run length when --epochs is not given: at least this many optimizer steps and epochs. The
#: epochs are the paper's (130 on ImageNet): on the unrelated sets measured, the student was still
#: gaining at 60 to 120 epochs whatever the step count (README, "The run length"). The steps are for
#: sets of a few hundred images, where 130 epochs are few steps: with the teacher's centre view (the
#: default) 430 images at 130 epochs (1,690 steps) ended with the loss still falling, 37.0 and 34.7
#: weighted 10-NN on two generated sets, against 63.7 and 42.0 at 4,004 steps. At most
#: DISTILL_MAX_EPOCHS, so that a set of a few dozen images is not thousands of tiny epochs.
DISTILL_MIN_STEPS = 4000
DISTILL_MIN_EPOCHS = 130
DISTILL_MAX_EPOCHS = 400
#: distill: the automatic batch leaves at least this many optimizer steps in an epoch (at most 256
#: images, at least DISTILL_MIN_BATCH). The run length is counted in epochs, so on a set of a few
#: thousand images the batch decides how many steps the student gets: on 4,500 generated shapes at 130
#: epochs, batch 256 (17 steps an epoch) ended 11 points behind the teacher, 128 1.5 behind and 64
#: level with it, in the same CPU time (README, "The batch").
DISTILL_MIN_STEPS_PER_EPOCH = 64
#: distill: the smallest automatic batch. Batch 16 helped on 580 and 2,000 images but cost the suite's
#: 432-image check 6 points against batch 32 (batch-norm statistics of 16 images; README, "The batch").
DISTILL_MIN_BATCH = 32
#: distill's run-plan bounds as :func:`compress_edge.train.schedule.plan_run` takes them: one set for
#: the command and for the tests that check what it plans.
DISTILL_PLAN_LIMITS = MappingProxyType({
    "base_lr": DISTILL_BASE_LR, "lr_scaling": DISTILL_LR_SCALING, "min_steps": DISTILL_MIN_STEPS,
    "min_epochs": DISTILL_MIN_EPOCHS, "max_epochs": DISTILL_MAX_EPOCHS,
    "min_steps_per_epoch": DISTILL_MIN_STEPS_PER_EPOCH, "min_batch": DISTILL_MIN_BATCH,
})
#: distill: the student's embedding size when --embed-dim is not given (a linear head), so that an
#: on-device index costs 512 bytes an image in float32.
DEFAULT_STUDENT_EMBED = 128
#: distill and cache-teacher: the smallest random crop of the augmented views, as a share of the
#: image's area, when --crop-scale is not given. SimCLR / MoCo v2 crop down to 8-20 % to learn
#: invariances from scratch; a student copying its teacher in a few hundred steps learns more from
#: views near the whole images it will be asked about. Swept on two unrelated data sets (README,
#: "The augmented views"): 0.8 was the best on both.
DISTILL_CROP_SCALE = 0.8
#: distill: what a live teacher embeds. "augmented": the student's own augmented view, a new one each
#: step; "center": the whole image (resized, centre crop), the view the paper's cached teacher uses, so
#: the student learns to map every augmented view of an image to its teacher's embedding of the image.
#: Measured (README, "The teacher's view, measured"): higher in three settings (by 8 to 19 points), level in
#: two, in less time (the teacher runs once per image); with a teacher at chance both views were too.
TEACHER_VIEWS = ("augmented", "center")
DEFAULT_TEACHER_VIEW = "center"
#: distill: a centre-view teacher's embeddings are kept in memory after an image's first step when
#: they fit in this many bytes (float16), so the teacher runs once per image, not once per step.
TEACHER_MEMO_BYTES = 1 << 30
#: Share of labelled images held out to compare a trained model with its baselines at the end.
DEFAULT_HOLDOUT = 0.1

#: pretrain: SGD learning rate per 256 images of batch (scaled linearly) for SimCLR and MoCo v2.
PRETRAIN_BASE_LR = 0.3
#: pretrain: the smallest random crop of the two views, as a share of the image's area, when
#: --crop-scale is not given: MoCo v2's 0.2 (SimCLR's 0.08 is for ImageNet's 224 px).
PRETRAIN_CROP_SCALE = 0.2
#: pretrain: run length when --epochs is not given: at least this many optimizer steps and epochs.
#: Self-supervised learning from scratch is slow to learn: on about 1,000 real images (scikit-learn's
#: digits, a Fashion-MNIST sample) 4,000 steps scored 2.5 and 3.1 points above 1,000 (README,
#: "pretrain on a small data set"); sets of 50,000 images or more reach it in their 20 epochs anyway.
PRETRAIN_MIN_STEPS = 4000
PRETRAIN_MIN_EPOCHS = 20
PRETRAIN_MAX_EPOCHS = 800
#: pretrain: MoCo v2's key-encoder momentum at most (it follows the run length below it).
PRETRAIN_EMA = 0.99
