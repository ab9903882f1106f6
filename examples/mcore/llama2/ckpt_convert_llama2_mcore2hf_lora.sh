#!/usr/bin/env bash
# Megatron-Core base + LoRA adapters -> one merged Hugging Face model. The merge is done per TP shard
# in fp32 and cast back to the weights' dtype. The weights land in ${HF_DIR}/mg2hf/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"  # REPO and PYTHON: runs from any directory
MCORE_DIR=${MCORE_DIR:-./model_weights/llama-2-7b-mcore/}
LORA_DIR=${LORA_DIR:-./ckpt/llama-2-7b-lora/}
HF_DIR=${HF_DIR:-./model_from_hf/llama-2-7b-hf/}

"${PYTHON}" "${REPO}/convert_ckpt.py" \
    --model-type GPT \
    --use-mcore-models \
    --load-model-type mg \
    --save-model-type hf \
    --model-type-hf llama2 \
    --load-dir "${MCORE_DIR}" \
    --lora-load "${LORA_DIR}" \
    --lora-r 16 \
    --lora-alpha 32 \
    --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2 \
    --target-tensor-parallel-size 1 \
    --target-pipeline-parallel-size 1 \
    --save-dir "${HF_DIR}"
