#!/usr/bin/env bash
# Hugging Face -> Megatron-Core (TP2, PP2). Set the paths (or the environment), then: bash examples/mcore/qwen3/ckpt_convert_qwen3_hf2mcore.sh
set -euo pipefail
HF_DIR=${HF_DIR:-./model_from_hf/qwen3-8b-hf/}
MCORE_DIR=${MCORE_DIR:-./model_weights/qwen3-8b-mcore/}

python convert_ckpt.py \
    --model-type GPT \
    --load-model-type hf \
    --save-model-type mg \
    --target-tensor-parallel-size 2 \
    --target-pipeline-parallel-size 2 \
    --model-type-hf qwen3 \
    --use-mcore-models \
    --load-dir "${HF_DIR}" \
    --save-dir "${MCORE_DIR}" \
    --tokenizer-model "${HF_DIR}/tokenizer.json"
