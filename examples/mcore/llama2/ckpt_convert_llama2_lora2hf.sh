#!/usr/bin/env bash
# LoRA adapters only (trained with --lora-ckpt-filter) -> a PEFT adapter folder in ${HF_DIR}/mg2hf/
# (adapter_config.json + adapter_model.safetensors) that peft.PeftModel.from_pretrained loads.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"  # REPO and PYTHON: runs from any directory
LORA_DIR=${LORA_DIR:-./ckpt/llama2_lora_filter/}
HF_DIR=${HF_DIR:-./model_from_hf/llama-2-7b-hf/}

"${PYTHON}" "${REPO}/convert_ckpt.py" \
    --model-type GPT \
    --use-mcore-models \
    --load-model-type mg \
    --save-model-type hf \
    --model-type-hf llama2 \
    --load-dir "${LORA_DIR}" \
    --lora-r 16 \
    --lora-alpha 32 \
    --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2 \
    --target-tensor-parallel-size 1 \
    --target-pipeline-parallel-size 1 \
    --load-checkpoint-loosely \
    --save-lora-to-hf \
    --save-dir "${HF_DIR}"
