#!/bin/bash
# The generated shapes with distill's defaults (the automatic run length: 130 epochs of 17 steps =
# 2,210 steps) from the paper table's teacher cache (python benchmarks/paper_table.py --dataset shapes
# --work runs/paper-table-shapes), one thread; the earlier default (612 steps) scored 54.8.
set -euo pipefail
export OMP_NUM_THREADS=1
D=runs/paper-table-shapes
compress-edge distill $D/data/train --teacher-cache $D/teacher-cache --workers 0 --no-progress --out runs/shapes-defaults
compress-edge eval knn runs/shapes-defaults/student --train $D/data/train --test $D/data/test --baselines
