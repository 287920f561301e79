"""variant.py SET_DIR NAME [key=value ...]: compress-edge pretrain on SET_DIR/train (resnet18, ImageNet stem),
with pretrain's automatic plan except the settings given, then eval knn --baselines on SET_DIR/test into
SET_DIR/NAME.eval. Settings: lr, epochs, t (temperature), method, and the augmentation's jitter
(brightness,contrast,saturation,hue), jitter_p and gray (grayscale probability), which the command does
not take as options (the one reason this is a script and not a command line)."""

import subprocess
import sys
import time
from pathlib import Path

from compress_edge.cli.common import setup_logging
from compress_edge.data import transforms
from compress_edge.train.config import TrainConfig
from compress_edge.train.pretrain import PretrainOptions, run_pretrain

root, name = Path(sys.argv[1]), sys.argv[2]
settings = dict(a.split("=", 1) for a in sys.argv[3:])
augment = {}
if "jitter" in settings:
    augment["jitter"] = tuple(float(v) for v in settings.pop("jitter").split(","))
if "jitter_p" in settings:
    augment["jitter_p"] = float(settings.pop("jitter_p"))
if "gray" in settings:
    augment["gray_p"] = float(settings.pop("gray"))
if augment:
    plain = transforms.TrainAugment.for_image_size.__func__
    transforms.TrainAugment.for_image_size = classmethod(lambda cls, *a, **k: plain(cls, *a, **{**k, **augment}))
train = TrainConfig(weight_decay=5e-4, workers=0, progress=False,
                    lr=float(settings.pop("lr")) if "lr" in settings else None,
                    epochs=int(settings.pop("epochs")) if "epochs" in settings else None)
opts = PretrainOptions(data=str(root / "train"), out=str(root / name), arch_kwargs={"small_input": False}, train=train,
                       temperature=float(settings.pop("t", 0.2)), method=settings.pop("method", "simclr"))
if settings:
    raise SystemExit(f"unknown settings: {settings}")
setup_logging(False)
start = time.time()
run_pretrain(opts)
print("seconds", round(time.time() - start))
scores = subprocess.run([sys.executable, "-m", "compress_edge", "eval", "knn", str(root / name / "student"),
                         "--train", str(root / "train"), "--test", str(root / "test"), "--baselines", "--no-progress"],
                        capture_output=True, text=True, check=True).stdout
(root / f"{name}.eval").write_text(scores)
