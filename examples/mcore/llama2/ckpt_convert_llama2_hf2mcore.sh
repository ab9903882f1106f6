#!/usr/bin/env bash
# Hugging Face -> Megatron-Core (TP2, PP4). Set the paths (or the environment), then: bash examples/mcore/llama2/ckpt_convert_llama2_hf2mcore.sh
set -euo pipefail
HF_DIR=${HF_DIR:-./model_from_hf/llama-2-7b-hf/}
MCORE_DIR=${MCORE_DIR:-./model_weights/llama-2-7b-mcore/}

python convert_ckpt.py \
    --model-type GPT \
    --load-model-type hf \
    --save-model-type mg \
    --target-tensor-parallel-size 2 \
    --target-pipeline-parallel-size 4 \
    --num-layer-list 8,8,8,8 \
    --model-type-hf llama2 \
    --use-mcore-models \
    --load-dir "${HF_DIR}" \
    --save-dir "${MCORE_DIR}" \
    --tokenizer-model "${HF_DIR}/tokenizer.model"
