#!/usr/bin/env bash
# Megatron-Core -> Megatron-Core at another layout (here TP2/PP4 -> TP4/PP2 with 2 virtual stages).
set -euo pipefail
SRC_DIR=${SRC_DIR:-./model_weights/llama-2-7b-mcore/}
DST_DIR=${DST_DIR:-./model_weights/llama-2-7b-mcore-tp4pp2-vpp/}

python convert_ckpt.py \
    --model-type GPT \
    --load-model-type mg \
    --save-model-type mg \
    --model-type-hf llama2 \
    --use-mcore-models \
    --load-dir "${SRC_DIR}" \
    --save-dir "${DST_DIR}" \
    --target-tensor-parallel-size 4 \
    --target-pipeline-parallel-size 2 \
    --num-layers-per-virtual-pipeline-stage 8
