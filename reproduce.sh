#!/usr/bin/env bash
# The paper's claims in miniature (§4), on the toy world, on a CPU: ProS pretraining (with and without
# the face-aware retrieval) against random init, fine-tuned on attributes, expressions and landmarks at
# two label fractions, several seeds. Writes runs/repro/table.md and the figures. See README.
#
#   bash reproduce.sh            # OUT=runs/repro SEEDS=3
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-runs/repro}
SEEDS=${SEEDS:-3}
mkdir -p "$OUT"
start=$(date +%s)

# 1. pretraining: ViT-Ti on 64px global / 32px local crops of the toy MS1M (4,000 images), 10 epochs
PRE="--data toy --arch vit_tiny --epochs 10 --batch-size 64 --global-size 64 --local-size 32 --workers 1 --knn-every 5"
python pretrain.py $PRE --arcface data/toy/arcface.onnx --out "$OUT/pretrain-pros"
python pretrain.py $PRE --out "$OUT/pretrain-pros_noretrieval"

# 2. fine-tuning: two label fractions per task, from random init and from each pretrained teacher
FT="--dataset toy --arch vit_tiny --img-size 64 --batch-size 32 --workers 1 --runs $SEEDS"
for init in random pros pros_noretrieval; do
  ckpt=random
  [ "$init" != random ] && ckpt="$OUT/pretrain-$init/teacher_backbone.pth"
  for frac in 0.01 0.1; do
    epochs=$([ "$frac" = 0.01 ] && echo 60 || echo 12)
    python finetune_attr.py $FT --init "$ckpt" --frac $frac --epochs $epochs --out "$OUT/attr-$init-$frac"
    python finetune_expr.py $FT --init "$ckpt" --frac $frac --epochs $epochs --out "$OUT/expr-$init-$frac"
  done
  for frac in 0.1 0.3; do
    epochs=$([ "$frac" = 0.1 ] && echo 20 || echo 8)
    python finetune_align.py $FT --init "$ckpt" --frac $frac --epochs $epochs --heatmap-size 32 --out "$OUT/align-$init-$frac"
  done
done

# 3. the table and the figures
python figures.py table --dir "$OUT"
python figures.py curves --log "$OUT/pretrain-pros/log.jsonl" --out "$OUT/curves.png"
python figures.py fig3 --arcface data/toy/arcface.onnx --out "$OUT/fig3.png"
python figures.py fig5 --checkpoint "$OUT/pretrain-pros/checkpoint.pth" --out "$OUT/fig5.png"
python figures.py fig6 --checkpoint "$OUT/pretrain-pros/teacher_backbone.pth" --arch vit_tiny --size 64 \
  --finetuned "$OUT/attr-pros-0.1/run0/checkpoint.pth" --out "$OUT/fig6.png"
echo "reproduce.sh: $(( ($(date +%s) - start) / 60 )) minutes"
