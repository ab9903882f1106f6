#!/usr/bin/env bash
# Hugging Face -> Megatron-Core (TP2, PP2, EP2). Set the paths (or the environment), then: bash examples/mcore/mixtral/ckpt_convert_mixtral_hf2mcore.sh
set -euo pipefail
HF_DIR=${HF_DIR:-./model_from_hf/mixtral-8x7b-hf/}
MCORE_DIR=${MCORE_DIR:-./model_weights/mixtral-8x7b-mcore/}

python convert_ckpt.py \
    --model-type GPT \
    --load-model-type hf \
    --save-model-type mg \
    --target-tensor-parallel-size 2 \
    --target-pipeline-parallel-size 2 \
    --target-expert-parallel-size 2 \
    --model-type-hf mixtral \
    --use-mcore-models \
    --load-dir "${HF_DIR}" \
    --save-dir "${MCORE_DIR}" \
    --tokenizer-model "${HF_DIR}/tokenizer.json"
