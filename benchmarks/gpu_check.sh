#!/usr/bin/env bash
# One command for a machine with a CUDA GPU (about 6-8 minutes on one H200): the CUDA tests,
# training speed of the three methods with their paper backbones at bf16 and fp32, and a
# 2-epoch `agpctl train` on generated data with the default (auto) GPU setting; one summary.
#
#   bash benchmarks/gpu_check.sh                 # PYTHON=... to choose the interpreter
#
# The machine needs torch with CUDA plus this project's dependencies. Where nothing can be
# installed from the network (the device machines here have torch, timm and pytest, not ray),
# download wheels here into .whl/ (see /work/.library/device/README.md) and set
# AGP_WHEELS=.whl: they are installed into /tmp/agp-site first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp/agp-gpu-check}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${AGP_WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/agp-site "$AGP_WHEELS"/*.whl \
    && export PYTHONPATH="/tmp/agp-site:$PYTHONPATH" || { echo "could not install the wheels in $AGP_WHEELS"; exit 2; }
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "no CUDA GPU visible to $PY: nothing to check"; exit 2; }
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

summary=()
step() {  # name, timeout (s), command...
  local name=$1 limit=$2; shift 2
  local started=$SECONDS
  echo; echo "=== $name"
  timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  summary+=("$(printf '%-14s %-6s %4ss' "$name" "$([ "$rc" = 0 ] && echo ok || echo "rc=$rc")" $((SECONDS - started)))")
}

step cuda-tests 150 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/unit/agpctl/test_cuda.py \
  tests/unit/agpctl/test_precision.py tests/unit/agp_models/test_reference_maps.py
step train-speed 300 "$PY" benchmarks/train_speed.py --device cuda --precision bf16,fp32 --batch 32 --steps 10
DATA=$(mktemp -d)
step agpctl-train 150 "$PY" -m agpctl.cli train --method agpnet --dataset synthetic --epochs 2 \
  --set data.synthetic.size=256 --set data.synthetic.train=64 --out "$DATA/runs" --name gpu-check

echo; echo "=== summary"
printf '%s\n' "${summary[@]}"
grep -E "^(agpnet|onenip|rlr) " "$OUT_DIR/train-speed.log" || true
grep -E "cuda|images/s|I-AUROC|mean" "$OUT_DIR/agpctl-train.log" | head -8 || true
rm -rf "$DATA"
