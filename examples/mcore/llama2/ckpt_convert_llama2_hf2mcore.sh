#!/usr/bin/env bash
# Hugging Face -> Megatron-Core (TP2, PP4). Set the paths and the layout (or the environment), then, from any directory: bash examples/mcore/llama2/ckpt_convert_llama2_hf2mcore.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"  # REPO and PYTHON: runs from any directory
HF_DIR=${HF_DIR:-./model_from_hf/llama-2-7b-hf/}
MCORE_DIR=${MCORE_DIR:-./model_weights/llama-2-7b-mcore/}
TP=${TP:-2}
PP=${PP:-4}
NUM_LAYER_LIST=${NUM_LAYER_LIST-8,8,8,8}  # layers per stage (uneven split); NUM_LAYER_LIST= for an even one

"${PYTHON}" "${REPO}/convert_ckpt.py" \
    --model-type GPT \
    --load-model-type hf \
    --save-model-type mg \
    --target-tensor-parallel-size "${TP}" \
    --target-pipeline-parallel-size "${PP}" \
    ${NUM_LAYER_LIST:+--num-layer-list "${NUM_LAYER_LIST}"} \
    --model-type-hf llama2 \
    --use-mcore-models \
    --load-dir "${HF_DIR}" \
    --save-dir "${MCORE_DIR}" \
    --tokenizer-model "${HF_DIR}/tokenizer.model"
