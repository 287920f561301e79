#!/bin/bash
# What a live teacher embeds: the student's augmented view (--teacher-view augmented) or the whole image
# (--teacher-view center), everything else distill's automatic plan; one thread a run, 2-core AMD EPYC, no GPU.
# From the repository root. README: "The teacher's view".
set -euo pipefail
export OMP_NUM_THREADS=1
# held-out textures and shapes (580 training / 1,000 test images at 64 px, a supervised torchvision resnet18 teacher)
for set in textures shapes; do
    for v in augmented center; do
        python benchmarks/heldout_check.py --dataset $set --out runs/tv-$set --tag $v -- --teacher-view $v > $set-$v.json
    done
done
# held-out textures (the same images) with a SimCLR teacher made by `compress-edge pretrain` with its automatic
# plan (112 epochs = 1,008 steps; ImageNet's stem at 64 px, as the demo's teacher: the small-image stem would
# take hours here)
T=runs/tv-textures-pretrain
compress-edge pretrain runs/tv-textures/data/train --arch-kwargs small_input=false --image-size 64 --out $T/pretrain \
    --workers 1 --no-progress
for v in augmented center; do
    compress-edge distill runs/tv-textures/data/train --teacher $T/pretrain --image-size 64 --teacher-view $v \
        --out $T/distill-$v --workers 1 --no-progress
    compress-edge eval knn $T/distill-$v --train runs/tv-textures/data/train --test runs/tv-textures/data/test --baselines \
        --json > textures-pretrain-$v.json
done
compress-edge eval knn $T/pretrain --train runs/tv-textures/data/train --test runs/tv-textures/data/test \
    --json > textures-pretrain-teacher.json
# scikit-learn's handwritten digits (1,078 train / 719 test at 64 px); the augmented run is benchmarks/results/heldout-digits
python benchmarks/heldout_check.py --dataset digits --out runs/tv-digits --tag center -- --teacher-view center > digits-center.json
# Fashion-MNIST, 2,000 training and 2,000 test images, the shipped teacher, the demo's student
for v in augmented center; do
    compress-edge distill fashion-mnist:train@2000 --teacher compress_edge/assets/fashion-mnist-teacher --arch mobilenet_v2 \
        --arch-kwargs width_mult=0.5 --arch-kwargs small_input=true --student-image-size 32 --workers 1 --no-progress \
        --teacher-view $v --out runs/tv-fm/$v
    compress-edge eval knn runs/tv-fm/$v --train fashion-mnist:train@2000 --test fashion-mnist:test@2000 --baselines \
        --json > fashion-mnist-2000-$v.json
done
compress-edge eval knn compress_edge/assets/fashion-mnist-teacher --train fashion-mnist:train@2000 \
    --test fashion-mnist:test@2000 --json > fashion-mnist-2000-teacher.json
# the suite's small set (tests/test_heldout.py: textures at 32 px, 48 / 30 per class, seeds 11 / 12, a
# supervised resnet18 trained 30 epochs): the centre view at the automatic 130 epochs and at 260 (the
# run-length check's advice), and the augmented view; weighted 10-NN as the test measures
python - <<'PY'
from compress_edge.data.synthetic import make_textures, train_labelled_teacher
make_textures("runs/tv-t32/train", 48, size=32, seed=11); make_textures("runs/tv-t32/test", 30, size=32, seed=12)
train_labelled_teacher("runs/tv-t32/train", "runs/tv-t32/teacher.pth", image_size=32, epochs=30)
PY
for run in "center-130 --teacher-view center" "center-260 --teacher-view center --epochs 260" \
           "augmented-130 --teacher-view augmented"; do
    set -- $run; name=$1; shift
    compress-edge distill runs/tv-t32/train --teacher resnet18 --teacher-weights runs/tv-t32/teacher.pth --image-size 32 \
        "$@" --out runs/tv-t32/$name --workers 0 --no-progress
    compress-edge eval knn runs/tv-t32/$name --train runs/tv-t32/train --test runs/tv-t32/test -k 10 --json > textures32-$name.json
done
# the same small set of shapes (make_shapes instead of make_textures, same seeds and sizes): the centre view
# at the automatic 130 epochs and at 260
python - <<'PY'
from compress_edge.data.synthetic import make_shapes, train_labelled_teacher
make_shapes("runs/tv-s32/train", 48, size=32, seed=11); make_shapes("runs/tv-s32/test", 30, size=32, seed=12)
train_labelled_teacher("runs/tv-s32/train", "runs/tv-s32/teacher.pth", image_size=32, epochs=30)
PY
for run in "center-130" "center-260 --epochs 260"; do
    set -- $run; name=$1; shift
    compress-edge distill runs/tv-s32/train --teacher resnet18 --teacher-weights runs/tv-s32/teacher.pth --image-size 32 \
        "$@" --out runs/tv-s32/$name --workers 0 --no-progress
    compress-edge eval knn runs/tv-s32/$name --train runs/tv-s32/train --test runs/tv-s32/test -k 10 --baselines \
        --json > shapes32-$name.json
done
compress-edge eval knn resnet18 --weights runs/tv-s32/teacher.pth --image-size 32 --train runs/tv-s32/train \
    --test runs/tv-s32/test -k 10 --json > shapes32-teacher.json
