#!/usr/bin/env bash
# One-command GPU check for the issue "medistill on GPUs", for a session lent a GPU machine.
# Prepare here (ignored folders, see /work/.library/device/README.md):
#   echo /.whl/ >> .git/info/exclude; echo /gpu_data/ >> .git/info/exclude
#   mkdir -p gpu_data && cp ../shared/data/isic9_64.npz gpu_data/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic pydantic-core annotated-types typing-inspection platformdirs captum
# Then: device run, carry [".whl", "gpu_data"], command "bash benchmarks/gpu_check.sh", timeout 540.
# Everything it reports lands in $OUT (summary.txt, pytest.txt, nvidia-smi.txt).
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export MEDISTILL_DATA_DIR=$PWD/gpu_data HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 MEDISTILL_CACHE_DIR=/tmp/mcache
RUNS=/tmp/gpu_runs
D=$MEDISTILL_DATA_DIR/isic9_64.npz
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
S="$OUT/summary.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" > "$S" 2>&1
ms() { python3 -m medistill "$@" >> "$OUT/commands.txt" 2>&1; echo "rc=$? medistill $*" >> "$S"; }
# 1. The headroom benchmark's ResNet-18 teacher config, 3 epochs, on the GPU: fp32 and bf16.
for amp in off bf16; do
  ms train configs/bench/headroom_isic9.yaml --device cuda --amp "$amp" --epochs 3 --out "$RUNS/r18_$amp" \
     --set data.name="$D" --set train.threads=8 --set train.latency=false
done
# 2. A 2-seed ensemble and KD from it into MobileNetV3-Small, on the GPU.
ms train configs/bench/headroom_isic9.yaml --device cuda --amp bf16 --epochs 2 --seeds 0,1 --out "$RUNS/ens" \
   --set data.name="$D" --set train.latency=false
ms distill configs/bench/headroom_isic9.yaml --teacher "$RUNS/ens" --method kd --device cuda --amp bf16 --epochs 2 \
   --out "$RUNS/kd" --set data.name="$D" --set students.0.model=mobilenetv3_small_100 --set students.0.small_input=auto \
   --set train.latency=false
# 3. fp16 with its gradient scaler.
ms train configs/bench/headroom_isic9.yaml --device cuda --amp fp16 --epochs 2 --out "$RUNS/r18_fp16" \
   --set data.name="$D" --set train.latency=false --set train.grad_clip=1.0
# 4. The device-resident loader against the per-image DataLoader (ResNet-18 at 64 px), and a
#    ScaleKD step on the GPU (a 1-epoch toy Swin teacher, then ScaleKD into ResNet-18).
python3 benchmarks/resident_loader.py --device cuda --model resnet18 --input-size 64 --threads 8 >> "$S" 2>&1
ms train --data "$D" --model swin_tiny_patch4_window7_224 --input-size 64 --epochs 1 --device cuda --out "$RUNS/swin" \
   --set 'students.0.kwargs={embed_dim: 48, depths: [2, 2, 2, 2], num_heads: [2, 4, 8, 16], window_size: 4}' \
   --set train.latency=false
ms distill --teacher "$RUNS/swin" --method scalekd --data "$D" --model resnet18 --input-size 32 --epochs 1 --device cuda \
   --amp bf16 --out "$RUNS/scalekd" --set students.0.small_input=stride16 --set data.resident=true \
   --set data.augment=dihedral --set train.latency=false
python3 - "$RUNS" >> "$S" 2>&1 <<'PY'
import json, sys
from pathlib import Path
for run in sorted(Path(sys.argv[1]).glob("*")):
    for r in [run, *sorted(run.glob("seed-*"))]:
        if not (r / "metrics.jsonl").is_file():
            continue
        log = [json.loads(l) for l in (r / "metrics.jsonl").read_text().splitlines() if l.strip()]
        info = json.loads((r / "run_info.json").read_text())
        m = json.loads((r / "metrics.json").read_text()) if (r / "metrics.json").is_file() else {}
        print(r.name if r == run else f"{run.name}/{r.name}", "device", info.get("device"), info.get("device_name"),
              "amp", info.get("amp"), "peak MB", info.get("peak_device_memory_mb"),
              "epoch s", [round(e["train_time_s"], 2) for e in log],
              "test bal.acc", round(m.get("test", {}).get("balanced_accuracy", float("nan")), 4))
PY
# 5. The device tests (their CUDA parts run only here).
python3 -m pytest -q -p no:cacheprovider tests/test_device.py > "$OUT/pytest.txt" 2>&1
echo "pytest rc=$?" >> "$S"
cat "$S"
