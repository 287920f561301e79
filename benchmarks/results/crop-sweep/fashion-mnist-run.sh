#!/bin/bash
# The Fashion-MNIST half of the crop sweep: 2,000 training images, the shipped teacher cached with 4
# views at --crop-scale CROP, distill's automatic plan (batch 128, 600 steps, lr 0.14), one thread.
#   usage: fashion-mnist-run.sh CROP TAG      (from the repository root)
set -e
CROP=$1; TAG=$2; OUT=runs/crop-sweep
export OMP_NUM_THREADS=1
[ -e $OUT/cache-$CROP/meta.json ] || python -m compress_edge cache-teacher fashion-mnist:train@2000 \
    --teacher compress_edge/assets/fashion-mnist-teacher --views 4 --crop-scale $CROP --workers 1 --no-progress \
    --out $OUT/cache-$CROP
[ -e $OUT/$TAG/student/model.safetensors ] || python -m compress_edge distill fashion-mnist:train@2000 \
    --teacher-cache $OUT/cache-$CROP --arch mobilenet_v2 --arch-kwargs width_mult=0.5 --arch-kwargs small_input=true \
    --student-image-size 32 --workers 1 --no-progress --out $OUT/$TAG
python -m compress_edge eval knn $OUT/$TAG --train fashion-mnist:train@2000 --test fashion-mnist:test@500 \
    --baselines --json > $OUT/$TAG.json
