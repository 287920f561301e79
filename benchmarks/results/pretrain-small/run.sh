#!/bin/bash
# pretrain's defaults on small data sets: does the model beat raw pixels and its random weights?
# Run from the repository root: bash benchmarks/results/pretrain-small/run.sh OUT   (one thread a run, two at a time)
# resnet18 with the ImageNet stem at 32 px (--arch-kwargs small_input=false: the default's small-input stem
# costs about 16x more per image, hours a run on these cores); every other setting pretrain's automatic plan
# unless the variant names it. Scores: compress-edge eval knn MODEL --train TRAIN --test TEST --baselines.
# The committed *.eval files (SET-NAME.eval) came from these settings; the rows without augmentation settings were
# run as the command line, compress-edge pretrain TRAIN --arch-kwargs small_input=false --workers 0 [--lr X]
# [--epochs N] [--method moco-v2], the others through variant.py (the same run_pretrain). seconds.txt: run times.
set -eu
OUT=${1:-runs/pretrain-small}
HERE=$(cd "$(dirname "$0")" && pwd)
export OMP_NUM_THREADS=1
PY=${PY:-python}
mkdir -p "$OUT"
$PY - "$OUT" <<'PYEOF'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from compress_edge.data.synthetic import make_shapes, make_textures
from heldout_check import write_digits
out = Path(sys.argv[1])
if not (out / "tex").exists():
    make_textures(out / "tex/train", 48, size=32, seed=21); make_textures(out / "tex/test", 30, size=32, seed=22)
    make_shapes(out / "shp/train", 48, size=32, seed=23); make_shapes(out / "shp/test", 30, size=32, seed=24)
    write_digits(out / "dig/train", out / "dig/test", 32)
PYEOF
run() {  # run SET NAME [variant.py settings]
  local set=$1 name=$2; shift 2
  [ -f "$OUT/$set/$name.eval" ] && return 0
  $PY "$HERE/variant.py" "$OUT/$set" "$name" "$@" > "$OUT/$set/$name.log" 2>&1
}
run tex base & run tex sqrt lr=0.106; wait
run shp base & run shp sqrt lr=0.106; wait
run tex colour lr=0.106 jitter=0.8,0.8,0.8,0.5 gray=0.5 & run tex long lr=0.106 epochs=308; wait
run dig base & run tex t05 t=0.5; wait
run dig sqrt lr=0.15 & run dig t05 t=0.5; wait
run dig long epochs=268 & run dig moco method=moco-v2; wait
grep -H "1-NN top\|20-NN top-1\|raw pixels\|random weights" "$OUT"/*/*.eval
