#!/usr/bin/env bash
# The CUDA paths, end to end, on a bare GPU machine with no network: installs nothing, runs on the
# python3 it finds (torch >= 2.11, torchvision >= 0.26) and finishes in about 8 minutes.
#   1. versions: what it runs on (torch, torchvision, onnxruntime and its providers, the GPU), and
#      run.py under torchrun (the process group, native bf16, the all-reduce);
#   2. world: a small toy world made with this machine's cores, or the one in $PROS_DATA/toy;
#   3. tests: the tests marked gpu (NCCL, bf16 step, IO binding, pinned loader, crops on the GPU,
#      CUDA RNG in checkpoints, no host sync in a step);
#   4. pretrain: 2 minutes of toy pretraining with the face-aware retrieval under torchrun, the
#      recogniser on the GPU with onnxruntime-gpu, else on the CPU provider (--arcface-device cpu);
#   5. attr, expr, align: one epoch of each fine-tuning task from that teacher;
#   6. bench: bench.py on the GPU (ours and timm's ViT-S/16 in the same run: images/s, peak memory;
#      the crops' and the augmentation's shares of the step; the recogniser's crops/s; the toy
#      pipeline's rate and its host syncs a step).
# Each part's output goes to $OUT/NAME.txt (default OUT=runs/gpu_check), its result to
# $OUT/summary.txt; the script goes on after a failed part and exits non-zero if any failed.
#
#   bash scripts/gpu_check.sh                      # PROS_DATA=DIR to reuse DIR/toy
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
export PYTHONUNBUFFERED=1
PY=$(command -v python3 || command -v python)
failed=()
part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  local start=$SECONDS
  if timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1; then
    echo "$name: ok ($((SECONDS - start)) s)" | tee -a "$OUT/summary.txt"
  else
    echo "$name: FAILED ($((SECONDS - start)) s, limit $limit s)" | tee -a "$OUT/summary.txt"
    tail -n 15 "$OUT/$name.txt"
    failed+=("$name")
  fi
}

part versions 60 "$PY" - <<'PYEOF'
import onnxruntime, torch, torchvision
print("python3", __import__("sys").version.split()[0], "torch", torch.__version__,
      "torchvision", torchvision.__version__, "onnxruntime", onnxruntime.__version__,
      onnxruntime.get_available_providers())
print("GPU", torch.cuda.get_device_name(0), "compute capability", torch.cuda.get_device_capability(0))
old = [(n, v) for n, v, need in (("torch", torch.__version__, (2, 11)),
                                 ("torchvision", torchvision.__version__, (0, 26)))
       if tuple(int(x) for x in v.split("+")[0].split(".")[:2]) < need]
assert not old, f"too old: {old}"
PYEOF
cat "$OUT/versions.txt" >>"$OUT/summary.txt"
part run 60 "$PY" -m torch.distributed.run --nproc_per_node 1 run.py
cat "$OUT/run.txt" >>"$OUT/summary.txt"

DATA=${PROS_DATA:-$OUT/data}
if [ ! -f "$DATA/toy/DONE" ]; then
  part world 180 "$PY" toyfaces.py --out "$DATA/toy" --images 1000 --recognizer-steps 300 \
    --workers "$(nproc)"
fi
export PROS_DATA=$DATA
ARCFACE_DEVICE=auto
"$PY" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in
o.get_available_providers())" 2>/dev/null || ARCFACE_DEVICE=cpu
echo "recogniser: --arcface-device $ARCFACE_DEVICE" | tee -a "$OUT/summary.txt"

part tests 150 "$PY" -m pytest -q test_all.py -m gpu -rs
part pretrain 150 "$PY" -m torch.distributed.run --nproc_per_node 1 pretrain.py --data toy \
  --arch vit_tiny --patch-size 8 --epochs 2 --batch-size 64 --global-size 64 --local-size 32 \
  --lr 8e-3 --warmup-epochs 0.5 --momentum-teacher 0.99 --n-prototypes 64 --workers 4 \
  --arcface "$DATA/toy/arcface.onnx" --arcface-device "$ARCFACE_DEVICE" --out "$OUT/pretrain"
grep -h "verdict\|at the end" "$OUT/pretrain.txt" >>"$OUT/summary.txt"
FT="--dataset toy --arch vit_tiny --img-size 64 --epochs 1 --batch-size 64 --workers 4 --runs 1"
FT="$FT --init $OUT/pretrain/teacher_backbone.pth"
part attr 60 "$PY" finetune_attr.py $FT --out "$OUT/attr"
part expr 60 "$PY" finetune_expr.py $FT --out "$OUT/expr"
part align 60 "$PY" finetune_align.py $FT --heatmap-size 32 --channels 128 --out "$OUT/align"
part bench 180 "$PY" bench.py --device cuda --steps 10 --warmup 3 --only step loader retrieval \
  pipeline
cat "$OUT/bench.txt" >>"$OUT/summary.txt"

if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" | tee -a "$OUT/summary.txt"
  exit 1
fi
echo "all parts passed" | tee -a "$OUT/summary.txt"
