#!/usr/bin/env bash
# The GPU checks, one JSON line each, in under 8 minutes on one H100-class GPU:
#   1. train images/s of ResNet-50, SE-ResNet-50 and VGG-16 at 224 px in fp32 and in bf16
#      with channels_last (all four precision x memory-format variants), the fraction of step
#      time the loop waited for data, and the peak GPU memory (benchmarks/train_throughput.py);
#   2. FG-NET-sized LOPO: 82 subjects, 1,000 images at 224 px, mode b, 2 epochs per fold;
#   3. `torchrun --nproc-per-node 1` against a plain run of the same training, for overhead
#      (both with OMP_NUM_THREADS=1, torchrun's own choice for several processes: on a 2-core
#      CPU, torch's 2 threads in the one torchrun process ran 6x slower than in a plain one,
#      as the torchrun agent took a third of a core).
# Synthetic data (benchmarks/synthetic_store.py); nothing is downloaded.
#
#   benchmarks/gpu_check.sh [--dry-run]
#
# --dry-run: the same steps at toy sizes on whatever device there is (`make test` runs it on
# the CPU, so the script cannot rot between GPU sessions). PYTHON picks the interpreter
# (default .venv/bin/python); its bin folder must hold agecascade and torchrun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
BIN=$(cd "$(dirname "$PYTHON")" && pwd)
export PATH="$BIN:$PATH"

if [[ "${1:-}" == "--dry-run" ]]; then
  size=32 batch=4 steps=1 images=24 subjects=4 lopo_epochs=1 train_images=48 train_subjects=12
elif [[ $# -eq 0 ]]; then
  size=224 batch=64 steps=20 images=1000 subjects=82 lopo_epochs=2 train_images=4096 train_subjects=400
else
  echo "usage: $0 [--dry-run]" >&2; exit 2
fi
cores=$(nproc)
workers=$(( cores < 8 ? cores : 8 ))   # loader processes
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
seconds() { date +%s.%N; }

# 1. throughput per backbone and variant
"$PYTHON" benchmarks/train_throughput.py --backbones resnet50 senet50 vgg16 --size "$size" \
    --batch "$batch" --steps "$steps" --workers "$workers" --all-variants --json

# 2. FG-NET-sized leave-one-person-out, mode b from the backbone's own weights
"$PYTHON" benchmarks/synthetic_store.py "$work/fgnet" --images "$images" --subjects "$subjects" \
    --size "$size"
start=$(seconds)
agecascade lopo --manifest "$work/fgnet" --backbone resnet50 --mode b --epochs "$lopo_epochs" \
    --batch 32 --input-size "$size" --out "$work/lopo" --no-track > "$work/lopo.log" 2>&1 \
    || { cat "$work/lopo.log" >&2; exit 1; }
"$PYTHON" - "$work/lopo/metrics.json" "$(seconds)" "$start" "$images" "$subjects" "$lopo_epochs" <<'PY'
import json, sys
metrics, end, start, images, subjects, epochs = sys.argv[1:]
m = json.load(open(metrics))
print(json.dumps({"check": "lopo_mode_b", "subjects": int(subjects), "images": int(images),
                  "epochs_per_fold": int(epochs), "wall_s": round(float(end) - float(start), 1),
                  "mae": round(m["mae"], 2)}))
PY

# 3. the same training plainly and under torchrun with one process
"$PYTHON" benchmarks/synthetic_store.py "$work/train" --images "$train_images" --subjects "$train_subjects" \
    --size "$size"
export OMP_NUM_THREADS=1
for how in plain torchrun; do
  launcher=(agecascade)
  [[ $how == torchrun ]] && launcher=(torchrun --standalone --nproc-per-node 1 -m agecascade)
  start=$(seconds)
  "${launcher[@]}" train --manifest "$work/train" --backbone resnet50 --epochs 2 --lr 0.001 \
      --batch "$batch" --input-size "$size" --workers "$workers" --out "$work/$how" --no-track \
      > "$work/$how.log" 2>&1 || { cat "$work/$how.log" >&2; exit 1; }
  echo "$how $(seconds) $start" >> "$work/runs.txt"
done
"$PYTHON" - "$work" <<'PY'
import csv, json, sys
from pathlib import Path
work = Path(sys.argv[1])
row = {"check": "torchrun_overhead"}
for line in (work / "runs.txt").read_text().splitlines():
    how, end, start = line.split()
    history = list(csv.DictReader(open(work / how / "history.csv")))
    row[f"{how}_wall_s"] = round(float(end) - float(start), 1)
    row[f"{how}_img_s"] = round(float(history[-1]["train_images_per_s"]), 1)
row["overhead_s"] = round(row["torchrun_wall_s"] - row["plain_wall_s"], 1)
print(json.dumps(row))
PY
