#!/bin/bash
# A live teacher against teacher caches of K recorded views (K = 4, 8, 16) and of the centre view only (the
# paper's cached teacher), with distill's automatic plan otherwise; one thread a run, 2-core AMD EPYC, no GPU.
# From the repository root. README: "When a cache pays".
set -euo pipefail
export OMP_NUM_THREADS=1
# held-out textures (580 training images at 64 px, a supervised torchvision resnet18 teacher)
python benchmarks/heldout_check.py --out runs/ho --tag live > textures-live.json
for k in 4 8 16; do
    python benchmarks/heldout_check.py --out runs/ho --tag cache$k --cache-views $k > textures-cache$k.json
done
compress-edge cache-teacher runs/ho/data/train --teacher resnet18 --teacher-weights runs/ho/teacher.pth --image-size 64 \
    --views 0 --out runs/ho/cache-views0 --no-progress
compress-edge distill runs/ho/data/train --teacher-cache runs/ho/cache-views0 --image-size 64 --out runs/ho/distill-cache0 \
    --no-progress
compress-edge eval knn runs/ho/distill-cache0 --train runs/ho/data/train --test runs/ho/data/test --image-size 64 \
    --json > textures-cache0.json
# Fashion-MNIST, 2,000 training images (the shipped teacher; the student of the batch table's rows)
for v in 0 4; do
    compress-edge cache-teacher fashion-mnist:train@2000 --teacher compress_edge/assets/fashion-mnist-teacher --views $v \
        --crop-scale 0.8 --workers 1 --no-progress --out runs/fm/cache$v
    compress-edge distill fashion-mnist:train@2000 --teacher-cache runs/fm/cache$v --arch mobilenet_v2 \
        --arch-kwargs width_mult=0.5 --arch-kwargs small_input=true --student-image-size 32 --workers 1 --no-progress \
        --out runs/fm/d$v
    compress-edge eval knn runs/fm/d$v --train fashion-mnist:train@2000 --test fashion-mnist:test@500 --baselines \
        --json > fashion-mnist-2000-cache$v.json
done
