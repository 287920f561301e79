"""Distil your own self-supervised checkpoint into a small student, on your own image folder.

    python examples/distill_your_checkpoint.py --images photos/ --teacher-arch resnet50 \
        --teacher-weights moco_v2_800ep_pretrain.pth.tar --out runs/my-student

The checkpoint's format (torchvision, MoCo, SimCLR, SwAV, DINO, Lightning) is detected; loading it
reports how many tensors matched and refuses one whose backbone did not load.
"""

import argparse

from compress_edge.models.resolve import load_model
from compress_edge.train.config import TrainConfig
from compress_edge.train.distill import DistillOptions, run_distill

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--images", required=True, help="an image folder (class subfolders or not)")
parser.add_argument("--teacher-arch", default="resnet50")
parser.add_argument("--teacher-weights", required=True, help="your checkpoint file")
parser.add_argument("--student-arch", default="mobilenet_v2")
parser.add_argument("--image-size", type=int, default=224)
# None is distill's "auto": batch, run length, learning rate and queue follow the data set (README,
# "Defaults that fit the run"); give numbers to override them.
parser.add_argument("--epochs", type=int, default=None, help="default: the paper's 130, at least 4,000 steps")
parser.add_argument("--batch-size", type=int, default=None, help="default: at most 256, 64 steps an epoch, at least 32")
parser.add_argument("--queue-size", type=int, default=None, help="default: the data set, at most 128,000")
parser.add_argument("--out", default="runs/my-student")
args = parser.parse_args()

# 1. Describe the run: a live teacher from your checkpoint, the default method (compress-1q).
options = DistillOptions(
    data=args.images,
    out=args.out,
    teacher=args.teacher_arch,
    teacher_weights=args.teacher_weights,
    student_arch=args.student_arch,
    image_size=args.image_size,
    queue_size=args.queue_size,
    train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, workers=2, progress=False),
)

# 2. Train. The run folder gets the student, config.json, metrics.jsonl and checkpoints/.
result = run_distill(options)
print(f"trained {result.epochs_done} epochs ({result.global_step} steps), last loss {result.last_loss:.4f}")

# 3. The student is an ordinary model folder: every other command and example takes it.
student, spec = load_model(f"{args.out}/student")
print(f"student: {spec.arch}, {spec.embed_dim}-d embeddings at {spec.image_size} px -> {args.out}/student")
