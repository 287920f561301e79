#!/bin/bash
# The paper table's compress-1q student on the generated shapes, 4x the steps (120 epochs = 2,280
# steps instead of 30 = 570), from the table's own teacher cache (python benchmarks/paper_table.py
# --dataset shapes --work runs/paper-table-shapes). One thread (the machine's other core ran CI).
set -euo pipefail
export OMP_NUM_THREADS=1
D=runs/paper-table-shapes
compress-edge distill $D/data/train --teacher $D/teacher-supervised/model --teacher-cache $D/teacher-cache \
    --arch mobilenet_v2 --arch-kwargs width_mult=0.5 --arch-kwargs small_input=false --embed-dim 128 \
    --holdout 0 --epochs 120 --workers 0 --no-progress --out runs/shapes-1q-120ep
compress-edge eval knn runs/shapes-1q-120ep/student --train $D/data/train --test $D/data/test
# the same with --epochs 60 --out runs/shapes-1q-60ep (1,140 steps): 60-epochs/
