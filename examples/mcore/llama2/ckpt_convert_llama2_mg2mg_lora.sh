#!/usr/bin/env bash
# Megatron-Core base + LoRA adapters -> one merged Megatron-Core checkpoint, at any layout (here TP1/PP2).
# LoRA and base must be sharded alike (the layout they were trained with).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"  # REPO and PYTHON: runs from any directory
MCORE_DIR=${MCORE_DIR:-./model_weights/llama-2-7b-mcore/}
LORA_DIR=${LORA_DIR:-./ckpt/llama-2-7b-lora/}
MERGED_DIR=${MERGED_DIR:-./model_weights/llama-2-7b-lora2mcore/}
TP=${TP:-1}
PP=${PP:-2}

"${PYTHON}" "${REPO}/convert_ckpt.py" \
    --model-type GPT \
    --use-mcore-models \
    --load-model-type mg \
    --save-model-type mg \
    --model-type-hf llama2 \
    --load-dir "${MCORE_DIR}" \
    --lora-load "${LORA_DIR}" \
    --lora-r 16 \
    --lora-alpha 32 \
    --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2 \
    --target-tensor-parallel-size "${TP}" \
    --target-pipeline-parallel-size "${PP}" \
    --save-dir "${MERGED_DIR}"
