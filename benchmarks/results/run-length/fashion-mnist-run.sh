#!/bin/bash
# Fashion-MNIST, 2,000 training images, the shipped teacher cached with 4 views at crop 0.8, distill's
# automatic plan (130 epochs of 14 steps = 1,820 steps, batch 128, lr 0.14), one thread; the same
# setting as benchmarks/results/crop-sweep/fashion-mnist-run.sh with the automatic run length of now.
#   usage: fashion-mnist-run.sh      (from the repository root)
set -e
OUT=runs/run-length; export OMP_NUM_THREADS=1
[ -e $OUT/cache/meta.json ] || python -m compress_edge cache-teacher fashion-mnist:train@2000 \
    --teacher compress_edge/assets/fashion-mnist-teacher --views 4 --crop-scale 0.8 --workers 1 --no-progress \
    --out $OUT/cache
[ -e $OUT/auto130/student/model.safetensors ] || python -m compress_edge distill fashion-mnist:train@2000 \
    --teacher-cache $OUT/cache --arch mobilenet_v2 --arch-kwargs width_mult=0.5 --arch-kwargs small_input=true \
    --student-image-size 32 --workers 1 --no-progress --out $OUT/auto130
python -m compress_edge eval knn $OUT/auto130 --train fashion-mnist:train@2000 --test fashion-mnist:test@500 \
    --baselines --json > $OUT/fashion-mnist-2000-auto130.json
