#!/usr/bin/env bash
# The CUDA paths, end to end, on one GPU machine (meant to finish in under 8 minutes):
#   1. onnxruntime-gpu in place of onnxruntime (from PyPI, or from wheels in .whl/ offline),
#   2. the tests marked gpu (NCCL, bf16 step, IO binding, pinned loader, crops on the GPU, CUDA RNG
#      in checkpoints),
#   3. a short toy pretraining with the face-aware retrieval under torchrun --nproc_per_node 1,
#   4. one epoch of each fine-tuning task from its teacher,
#   5. bench.py on the GPU (ViT-S/16 at the paper's sizes, batch 64, bf16; ours vs timm; the
#      crops' and the batched augmentation's shares of the step; the toy pipeline before/after).
# Each part's output goes to $OUT (default runs/gpu_check); the script goes on after a failed part
# and exits non-zero if any failed.
#
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
failed=()
part() {  # part NAME COMMAND...: run, log to $OUT/NAME.txt, remember a failure
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  if "$@" >"$OUT/$name.txt" 2>&1; then
    echo "   ok ($((SECONDS - start)) s)"
  else
    echo "   FAILED ($((SECONDS - start)) s); the end of $OUT/$name.txt:"
    tail -n 15 "$OUT/$name.txt"
    failed+=("$name")
  fi
}

has_cuda_provider() {
  python -c "import onnxruntime as o, sys
sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"
}
if ! has_cuda_provider 2>/dev/null; then
  pip uninstall -y -q onnxruntime onnxruntime-gpu
  pip install -q onnxruntime-gpu || pip install -q --no-index --find-links .whl onnxruntime-gpu
fi
python - <<'EOF' | tee "$OUT/versions.txt"
import onnxruntime
import torch
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))
print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
EOF

part tests python -m pytest -q test_all.py -m gpu -rs
part pretrain torchrun --nproc_per_node 1 pretrain.py --data toy --arch vit_tiny --epochs 1 \
  --n-images 2048 \
  --batch-size 64 --global-size 64 --local-size 32 --workers 4 --arcface data/toy/arcface.onnx \
  --out "$OUT/pretrain"
INIT="$OUT/pretrain/teacher_backbone.pth"
FT="--dataset toy --arch vit_tiny --img-size 64 --epochs 1 --batch-size 64 --workers 4 --runs 1"
FT="$FT --init $INIT"
part attr python finetune_attr.py $FT --out "$OUT/attr"
part expr python finetune_expr.py $FT --out "$OUT/expr"
part align python finetune_align.py $FT --heatmap-size 32 --channels 128 --out "$OUT/align"
part bench python bench.py --device cuda --steps 10 --warmup 3

echo "== bench"
cat "$OUT/bench.txt"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "all parts passed"
