#!/usr/bin/env bash
# The GPU goal of issue 12 in one run: CRAFT / LoRA <= 1.00 and CRAFT / floor <= 1.10 on one GPU,
# RoBERTa-base shape at 16 x 128 and 64 x 256 in fp32 and bf16 autocast, and a LLaMA-shaped model
# (2048 wide, 16 layers, GQA) with bf16 weights. Appends every report to $1 (default gpu_goal.md).
# About 10 minutes on an H100-class GPU.
set -euo pipefail
out="${1:-gpu_goal.md}"
here="$(cd "$(dirname "$0")" && pwd)"
run() { python "$here/step_time.py" --device cuda --rounds 30 --output "$out" "$@"; }
run
run --bf16
run --batch 64 --seq 256 --rounds 15
run --batch 64 --seq 256 --rounds 15 --bf16
run --shape llama --model-dtype bfloat16 --rounds 15
python "$here/kernel_count.py" --output "$out"
