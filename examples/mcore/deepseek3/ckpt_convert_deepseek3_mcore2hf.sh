#!/usr/bin/env bash
# Megatron-Core (any TP/PP/EP layout and expert format, read from the checkpoint) -> Hugging Face.
# The weights land in ${HF_DIR}/mg2hf/; config.json and tokenizer files are taken from ${HF_DIR}.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"  # REPO and PYTHON: runs from any directory
MCORE_DIR=${MCORE_DIR:-./model_weights/deepseek-v3-mcore/}
HF_DIR=${HF_DIR:-./model_from_hf/deepseek-v3-hf/}

"${PYTHON}" "${REPO}/convert_ckpt.py" \
    --model-type GPT \
    --load-model-type mg \
    --save-model-type hf \
    --model-type-hf deepseek3 \
    --use-mcore-models \
    --load-dir "${MCORE_DIR}" \
    --target-tensor-parallel-size 1 \
    --target-pipeline-parallel-size 1 \
    --target-expert-parallel-size 1 \
    --save-dir "${HF_DIR}"
