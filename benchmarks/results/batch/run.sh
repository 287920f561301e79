#!/bin/bash
# distill's automatic batch (an epoch of at least 64 steps, at least 32 images, instead of 8 steps and 16) measured on three data sets at
# the automatic 130 epochs, one thread a run, 2-core AMD EPYC, no GPU. From the repository root.
#   shapes: the paper table's generated shapes and teacher cache
#     (python benchmarks/paper_table.py --dataset shapes --work runs/paper-table-shapes);
#     batch 256 is benchmarks/results/run-length/shapes-defaults/
#   textures: benchmarks/heldout_check.py (batch 64 is run-length/textures-auto130.json)
#   Fashion-MNIST 2,000: the shipped teacher's 4-view cache (batch 128 is run-length/fashion-mnist-2000-auto130.json)
set -euo pipefail
export OMP_NUM_THREADS=1
D=runs/paper-table-shapes
for b in 128 64; do
    compress-edge distill $D/data/train --teacher-cache $D/teacher-cache --workers 0 --no-progress --batch-size $b \
        --out runs/S-b$b
    compress-edge eval knn runs/S-b$b/student --train $D/data/train --test $D/data/test --baselines
done
for b in 32 16; do
    python benchmarks/heldout_check.py --out runs/ho --tag b$b -- --batch-size $b
done
[ -e runs/fm/cache/meta.json ] || compress-edge cache-teacher fashion-mnist:train@2000 \
    --teacher compress_edge/assets/fashion-mnist-teacher --views 4 --crop-scale 0.8 --workers 1 --no-progress --out runs/fm/cache
for b in 32 16; do
    compress-edge distill fashion-mnist:train@2000 --teacher-cache runs/fm/cache --arch mobilenet_v2 \
        --arch-kwargs width_mult=0.5 --arch-kwargs small_input=true --student-image-size 32 --workers 1 --no-progress \
        --batch-size $b --out runs/fm/b$b
    compress-edge eval knn runs/fm/b$b --train fashion-mnist:train@2000 --test fashion-mnist:test@500 --baselines \
        --json > runs/fm/b$b.json
done
# the suite's check at batch 16: tests/test_heldout.py with --batch-size 16 added to its distill command
