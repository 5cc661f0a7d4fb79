#!/usr/bin/env bash
# The exact commands that made the shipped skip-trained default (skipray/assets/smollm2-skip).
# CPU, one torch thread (2 threads were no faster on 2 cores and collapse when anything else runs).
# Each step checkpoints; re-running a `skipray train` line with --resume continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
STEPS=${STEPS:-500}

# 1. prompts the project writes: 1905 training prompts, 120 held-out prompts on topics never trained on
.venv/bin/python examples/make_train_prompts.py
# 2. self-distillation data: the full-depth model's greedy answers to 512 training prompts (~5 min)
.venv/bin/skipray distill-data --prompts examples/train_prompts.parquet --out runs/distill/train.parquet \
    --limit 512 --max-new-tokens 80 --batch-size 32
# 3. LoRA distillation under the ~2x schedule (16 -> 6 layers over 64 tokens, 4 warm-up layers)
.venv/bin/skipray train --data runs/distill/train.parquet --out runs/skip2x --model smollm2-base \
    --max-layers 16 --min-layers 6 --decay-tokens 64 --warmup-layers 4 --lora-r 32 --lora-alpha 64 \
    --lr 4e-4 --steps "$STEPS" --batch-size 8 --warmup-steps 20 --save-every 20 --kl-weight 1.0 --ce-weight 0.0 \
    ${RESUME:+--resume}
# 4. held-out quality and speed against full depth
.venv/bin/skipray eval --model runs/skip2x --prompts examples/heldout_prompts.parquet --limit 64 \
    --schedule full --schedule trained --out runs/eval-skip2x
# 5. package: fp16 adapter + skipray.json into the package
.venv/bin/python scripts/package_adapter.py runs/skip2x skipray/assets/smollm2-skip
