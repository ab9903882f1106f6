#!/usr/bin/env bash
# Megatron-Core (any layout, read from the checkpoint) -> Hugging Face.
# The weights land in ${HF_DIR}/mg2hf/; config.json and tokenizer files are taken from ${HF_DIR}.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"  # REPO and PYTHON: runs from any directory
MCORE_DIR=${MCORE_DIR:-./model_weights/qwen2.5-7b-mcore/}
HF_DIR=${HF_DIR:-./model_from_hf/qwen2.5-7b-hf/}

"${PYTHON}" "${REPO}/convert_ckpt.py" \
    --model-type GPT \
    --load-model-type mg \
    --save-model-type hf \
    --model-type-hf qwen25 \
    --use-mcore-models \
    --load-dir "${MCORE_DIR}" \
    --target-tensor-parallel-size 1 \
    --target-pipeline-parallel-size 1 \
    --save-dir "${HF_DIR}"
