#!/usr/bin/env bash
# Hugging Face -> Megatron-Core (TP2, PP2). Set the paths and the layout (or the environment), then, from any directory: bash examples/mcore/qwen3/ckpt_convert_qwen3_hf2mcore.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"  # REPO and PYTHON: runs from any directory
HF_DIR=${HF_DIR:-./model_from_hf/qwen3-8b-hf/}
MCORE_DIR=${MCORE_DIR:-./model_weights/qwen3-8b-mcore/}
TP=${TP:-2}
PP=${PP:-2}

"${PYTHON}" "${REPO}/convert_ckpt.py" \
    --model-type GPT \
    --load-model-type hf \
    --save-model-type mg \
    --target-tensor-parallel-size "${TP}" \
    --target-pipeline-parallel-size "${PP}" \
    --model-type-hf qwen3 \
    --use-mcore-models \
    --load-dir "${HF_DIR}" \
    --save-dir "${MCORE_DIR}" \
    --tokenizer-model "${HF_DIR}/tokenizer.json"
