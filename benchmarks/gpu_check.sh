#!/usr/bin/env bash
# The GPU check, prepared for one call on a lent GPU machine (a bare image with PyTorch, no network).
#
# What it measures: the demo's teacher trained on a GPU for a fixed time instead of 2 CPU cores
# (issue 11: the shipped SimCLR teacher levelled off 2.6 points above raw pixels after 31 to 53
# epochs on the CPU; the goal is 3). Same recipe as the shipped teacher (resnet18, ImageNet stem,
# 64 px, batch 256, bfloat16 autocast), the number of epochs chosen from the throughput measured in a
# one-epoch probe so that the run fits PRETRAIN_SECONDS, then its kNN on the demo's split with raw
# pixels and its random weights beside it, and the model as the float16 asset.
#
# Here, once, before the call (Fashion-MNIST's files and the wheels the device image lacks, into .gpu/,
# which git ignores and the call carries; about 32 MB):
#     benchmarks/gpu_check.sh --prepare
# The call (the device tool's run):
#     command: bash benchmarks/gpu_check.sh      carry: [".gpu"]      timeout_s: 600
# What comes back in $OUT: gpu_check.log, probe.json, knn.json (the demo split), quality.json (the run's
# own held-out check), metrics.jsonl, the asset's model.json and its model.safetensors in two parts
# (the file limit is 16 MB: `cat model.safetensors.part-* > model.safetensors`, then
# `benchmarks/ship_teacher.py`-made model.json beside it is already the asset's spec, sha256 included).
#
# The run starts from the shipped teacher (--init; its 19 CPU epochs, on which 12 to 34 more CPU epochs left the
# demo's split within 0.2 points), so the GPU's epochs add to it; GPU_CHECK_INIT=none trains from random weights.
#
# GPU_CHECK_SMOKE=1 runs every step on this machine's CPU at a tiny size (2,000 images, a 120 s budget):
# the check of the script itself that needs no GPU. PRETRAIN_SECONDS (default 300) sets the budget.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
GPU_DIR=$ROOT/.gpu

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p "$GPU_DIR/data" "$GPU_DIR/whl"
    PY=${PYTHON:-.venv/bin/python}
    # The four IDX files, from wherever this machine keeps them: each folder once (both splits usually share one).
    "$PY" -c "from compress_edge.data.fashion_mnist import fashion_mnist_folder as f
print('\n'.join(sorted({str(f(s)) for s in ('train', 'test')})))" | while read -r folder; do
        cp -p "$folder"/*-ubyte* "$GPU_DIR/data/"
    done
    # fvcore (the profile's FLOP counter) and the packages it needs that the device image lacks: pure Python.
    "$PY" -m pip wheel -q --no-deps -w "$GPU_DIR/whl" fvcore==0.1.5.post20221221 iopath==0.1.10 yacs termcolor
    du -sh "$GPU_DIR"
    exit 0
fi

if ! compgen -G "$GPU_DIR/whl/*.whl" > /dev/null || ! compgen -G "$GPU_DIR/data/*-ubyte*" > /dev/null; then
    echo "error: $GPU_DIR lacks the carried data or wheels: run 'bash benchmarks/gpu_check.sh --prepare' here first," \
        "then carry .gpu" >&2
    exit 2
fi
OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
SMOKE=${GPU_CHECK_SMOKE:-0}
BUDGET=${PRETRAIN_SECONDS:-$([[ "$SMOKE" == 1 ]] && echo 120 || echo 300)}
WORK=${GPU_CHECK_WORK:-/tmp/gpu-check}
rm -rf "$WORK" && mkdir -p "$WORK"
started=$(date +%s)
say() { echo "[gpu_check $(( $(date +%s) - started ))s] $*"; }

if [[ "$SMOKE" == 1 ]]; then
    PY=${PYTHON:-$ROOT/.venv/bin/python}
    TRAIN=fashion-mnist:train@2000 GALLERY=fashion-mnist:train@2000 QUERIES=fashion-mnist:test@200
    EXTRA=(--amp off --workers 1 --batch-size 64)
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    PY=python3
    TRAIN=fashion-mnist:train GALLERY=fashion-mnist:train@20000 QUERIES=fashion-mnist:test@2000
    EXTRA=(--amp bf16 --workers "$(( $(nproc) - 2 ))" --batch-size 256)
fi
say "installing the project and the carried wheels (no network)"
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$WORK/site" "$GPU_DIR"/whl/*.whl "$ROOT"
export PYTHONPATH=$WORK/site COMPRESS_EDGE_DATA=$GPU_DIR/data
# -P: the installed package, not the source folder in the working directory (which lacks
# compress_edge.export and compress_edge.retrieval: they install from export/ and retrieval/).
CE=("$PY" -P -m compress_edge)
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

INIT=${GPU_CHECK_INIT:-compress_edge/assets/fashion-mnist-teacher}
INIT_ARGS=() PREVIOUS=()
if [[ "$INIT" != none ]]; then
    INIT_ARGS=(--init "$INIT") PREVIOUS=(--previous "$INIT")  # relative to $ROOT, where every command runs
fi
RECIPE=(--arch resnet18 --arch-kwargs small_input=false --image-size 64 --method simclr "${EXTRA[@]}" --no-progress)

say "probe: one epoch, to measure images per second"
"${CE[@]}" pretrain "$TRAIN" "${RECIPE[@]}" --epochs 1 --holdout 0 --out "$WORK/probe" > "$WORK/probe.txt"
EPOCHS=$("$PY" - "$WORK/probe/metrics.jsonl" "$BUDGET" "$OUT/probe.json" <<'EOF'
import json, sys
[epoch] = [row for row in map(json.loads, open(sys.argv[1])) if row["kind"] == "epoch"]
budget = float(sys.argv[2])
epochs = max(1, int(0.9 * budget / float(epoch["seconds"])))  # as many of the probe's epochs as fit
json.dump({"images_per_s": round(epoch["images_per_s"], 1), "epoch_s": round(epoch["seconds"], 1),
           "budget_s": budget, "epochs": epochs}, open(sys.argv[3], "w"))
print(epochs)
EOF
)
say "probe: $(cat "$OUT/probe.json"); training $EPOCHS epochs"

COMMAND="compress-edge pretrain $TRAIN ${INIT_ARGS[*]} ${RECIPE[*]} --epochs $EPOCHS --out runs/teacher-gpu"
"${CE[@]}" pretrain "$TRAIN" "${INIT_ARGS[@]}" "${RECIPE[@]}" --epochs "$EPOCHS" --out "$WORK/teacher"
say "trained; kNN on the demo's split (raw pixels and random weights beside it)"
"${CE[@]}" eval knn "$WORK/teacher/student" --train "$GALLERY" --test "$QUERIES" --baselines --json \
    --no-progress > "$OUT/knn.json"
cat "$OUT/knn.json"
cp "$WORK/teacher/quality.json" "$WORK/teacher/metrics.jsonl" "$OUT/"

say "the float16 asset"
"$PY" benchmarks/ship_teacher.py "$WORK/teacher" --command "$COMMAND" "${PREVIOUS[@]}" --out "$WORK/asset" \
    --machine "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo cpu), $(nproc) CPU cores"
cp "$WORK/asset/model.json" "$OUT/"
split -b 15M -d "$WORK/asset/model.safetensors" "$OUT/model.safetensors.part-"
say "done"
