#!/usr/bin/env bash
# GPU check, one command, a few minutes on one GPU machine (no internet needed):
#   1. trains 2 epochs (1 head + 1 fine-tune) on generated demo faces with 1 GPU worker
#      (Ray Train's GPU path: NCCL process group, mixed precision; the ImageNet weights
#      shipped in the package, so the model's scores vary as a trained one's do);
#   2. scores N generated 256x256 JPEGs with --use-gpu (uint8 batches of 256 to the GPU,
#      normalized there, bf16 autocast on compute capability >= 8.0, else fp16) while
#      nvidia-smi samples GPU utilisation;
#      then 2,000 of them again with --pipeline fused (decode threads in the GPU actor);
#   3. checks the GPU probabilities against the PyTorch CPU engine on 200 of the images:
#      the job's (autocast) within 1e-2, and the same model on the GPU in float32 within 1e-3
#      (TF32 convolutions), so a wrong GPU path cannot hide in the autocast's rounding; prints
#      img/s and utilisation.
#
# Usage (from anywhere):
#   bash bench/gpu_check.sh [WORKDIR]
# Environment: PYTHON (default python3), N_IMAGES (default 20000), BATCH (default 256).
# Exit status 0 when every step ran and the check passed.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
N_IMAGES=${N_IMAGES:-20000}
BATCH=${BATCH:-256}
WORK=${1:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
START=$SECONDS

command -v nvidia-smi >/dev/null || { echo "gpu_check: nvidia-smi not found: no NVIDIA GPU here" >&2; exit 1; }
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader
"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device"
from artifact_core.model import amp_dtype
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, capability "
      f"{torch.cuda.get_device_capability()}, autocast {amp_dtype(torch.device('cuda'))}")
EOF

echo "== 1/3 training: 2 epochs, 1 GPU worker ($WORK/runs)"
T=$SECONDS
"$PY" jobs/train.py --use-gpu --num-workers 1 --cpus-per-worker 4 --loader-workers 3 \
    --weights bundled --head-epochs 1 --finetune-epochs 1 --patience 0 --batch-size 64 \
    --demo-train-images 400 --storage-path "$WORK/runs" --name gpu_check
BUNDLE="$WORK/runs/gpu_check/model"
test -f "$BUNDLE/model.pt" || { echo "gpu_check: training wrote no bundle at $BUNDLE" >&2; exit 1; }
echo "training took $((SECONDS - T)) s"

echo "== 2/3 scoring $N_IMAGES generated JPEGs with --use-gpu"
T=$SECONDS
"$PY" - "$WORK/jpegs" "$N_IMAGES" <<'EOF'
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

from artifact_core.demo_data import render_face

folder, n = sys.argv[1], int(sys.argv[2])
# Drawing a face costs more than encoding it: draw 64, vary each file with its own noise.
# The forked writers inherit them (fork: this script has no importable module to spawn from).
BASES = [np.asarray(render_face(seed, size=256), dtype=np.int16) for seed in range(64)]


def write(i: int) -> None:
    path = os.path.join(folder, f"img_{i:06d}.jpg")
    if os.path.exists(path):
        return
    base = BASES[i % len(BASES)]
    noise = np.random.default_rng(i).integers(-12, 13, base.shape)
    Image.fromarray((base + noise).clip(0, 255).astype(np.uint8)).save(path, quality=90)


os.makedirs(folder, exist_ok=True)
with ProcessPoolExecutor(os.cpu_count(), mp_context=mp.get_context("fork")) as pool:
    list(pool.map(write, range(n), chunksize=256))
print(f"{n} JPEGs in {folder}")
EOF
echo "generating took $((SECONDS - T)) s"

SMI_LOG="$WORK/gpu_util.csv"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 250 >"$SMI_LOG" &
SMI_PID=$!
trap 'kill "$SMI_PID" 2>/dev/null || true' EXIT
T=$SECONDS
"$PY" jobs/score.py --model "$BUNDLE" --input "$WORK/jpegs" --output "$WORK/pred" --use-gpu \
    --batch-size "$BATCH" --overwrite
kill "$SMI_PID" 2>/dev/null || true
wait "$SMI_PID" 2>/dev/null || true
echo "scoring took $((SECONDS - T)) s"
# The fused pipeline too (auto chooses split on a GPU): decode threads in the GPU actor, whole batches to the GPU
N_FUSED=$(( N_IMAGES < 2000 ? N_IMAGES : 2000 ))
mkdir -p "$WORK/jpegs_fused"
# (sed reads all of ls's output: head would end the pipe early, which pipefail turns into a failure)
ls "$WORK/jpegs" | sed -n "1,${N_FUSED}p" | while read -r f; do ln -f "$WORK/jpegs/$f" "$WORK/jpegs_fused/$f"; done
"$PY" jobs/score.py --model "$BUNDLE" --input "$WORK/jpegs_fused" --output "$WORK/pred_fused" --use-gpu \
    --pipeline fused --batch-size "$BATCH" --overwrite --no-report

echo "== 3/3 GPU vs CPU probabilities on 200 images, throughput, utilisation"
"$PY" - "$BUNDLE" "$WORK/pred" "$SMI_LOG" "$WORK/pred_fused" <<'EOF'
import json, os, sys

import numpy as np
import pyarrow.csv as pacsv

from artifact_core.predict import ArtifactPredictor, predict_paths

bundle, pred_dir, smi_log, fused_dir = sys.argv[1:5]
summary = json.load(open(os.path.join(pred_dir, "summary.json")))
table = pacsv.read_csv(os.path.join(pred_dir, "predictions.csv")).to_pydict()
assert summary["errors"] == 0, f"{summary['errors']} error rows: {summary['error_examples']}"
assert summary["engine"] == "torch", f"--use-gpu ran engine {summary['engine']!r}"
rows = sorted(zip(table["path"], table["prob_artifact_free"]))[:200]
paths = [p for p, _ in rows]
gpu = np.asarray([q for _, q in rows], dtype=np.float64)
cpu = predict_paths(ArtifactPredictor(bundle, engine="torch", use_gpu=False), paths)
diff = float(np.max(np.abs(gpu - cpu)))
print(f"GPU (job, autocast) vs CPU on {len(paths)} images: max abs probability difference {diff:.2e} "
      f"(limit 1e-2), CPU probabilities std {cpu.std():.3f}")
fp32 = ArtifactPredictor(bundle, engine="torch", use_gpu=True)
dtype = fp32.engine.autocast_dtype
fp32.engine.autocast_dtype = None  # the same GPU path (pinned uint8, normalized on the GPU), no autocast
diff32 = float(np.max(np.abs(predict_paths(fp32, paths) - cpu)))
print(f"GPU float32 vs CPU: max abs probability difference {diff32:.2e} (limit 1e-3); the job's autocast: {dtype}")
fused = json.load(open(os.path.join(fused_dir, "summary.json")))
ftable = pacsv.read_csv(os.path.join(fused_dir, "predictions.csv")).to_pydict()
split_by_name = {os.path.basename(p): q for p, q in zip(table["path"], table["prob_artifact_free"])}
fdiff = max(abs(q - split_by_name[os.path.basename(p)]) for p, q in zip(ftable["path"], ftable["prob_artifact_free"]))
assert fused["errors"] == 0 and fused["pipeline"]["mode"] == "fused", fused["pipeline"]
print(f"fused pipeline: {fused['files']} images, {fused['images_per_second']:.0f} img/s whole job; "
      f"max abs difference to the split pipeline {fdiff:.2e} (limit 1e-2: both autocast, batched apart)")

util = []
for line in open(smi_log):
    parts = [p.strip() for p in line.split(",")]
    if parts and parts[0].isdigit():
        util.append(int(parts[0]))
util = np.asarray(util or [0])
busy = util[util > 0]
print(f"scoring: {summary['files']} images in {summary['wall_seconds']:.1f} s whole job, start-up included: "
      f"{summary['images_per_second']:.0f} img/s")
print(f"GPU utilisation ({len(util)} samples, 250 ms): mean {util.mean():.0f} %, "
      f"mean while busy {busy.mean() if busy.size else 0:.0f} %, max {util.max()} %")
if not (diff <= 1e-2 and diff32 <= 1e-3 and fdiff <= 1e-2):
    sys.exit("gpu_check: FAILED, GPU probabilities differ from CPU ones by more than the limits above")
print("gpu_check: PASSED")
EOF
echo "total $((SECONDS - START)) s (target: under 300 s); outputs in $WORK"
