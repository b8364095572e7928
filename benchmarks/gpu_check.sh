#!/usr/bin/env bash
# Wrapper of benchmarks/gpu_check.py for a lent GPU machine (the device tool; its image has torch,
# timm, onnxruntime, … but not pydantic, captum, platformdirs or onnx). Prepare here first:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic pydantic-core annotated-types typing-inspection platformdirs captum onnx
# Then: device run, carry [".whl"], command "bash benchmarks/gpu_check.sh", timeout 540.
# The check makes its own synthetic data; everything it reports lands in $OUT.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.txt"
