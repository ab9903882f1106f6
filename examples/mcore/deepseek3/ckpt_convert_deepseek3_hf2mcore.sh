#!/usr/bin/env bash
# Hugging Face -> Megatron-Core (TP2, PP2 with an uneven split of the 61 layers, EP2; MindSpeed-LLM MLA
# names, or add --mla-spelling mcore for the upstream Megatron-Core ones). Set the paths (or the environment), then: bash examples/mcore/deepseek3/ckpt_convert_deepseek3_hf2mcore.sh
set -euo pipefail
HF_DIR=${HF_DIR:-./model_from_hf/deepseek-v3-hf/}
MCORE_DIR=${MCORE_DIR:-./model_weights/deepseek-v3-mcore/}
NUM_LAYER_LIST=${NUM_LAYER_LIST:-31,30}
MTP_NUM_LAYERS=${MTP_NUM_LAYERS:-1}  # DeepSeek-V3's multi-token-prediction layer (model.layers.61); 0 leaves it out

python convert_ckpt.py \
    --model-type GPT \
    --load-model-type hf \
    --save-model-type mg \
    --target-tensor-parallel-size 2 \
    --target-pipeline-parallel-size 2 \
    --target-expert-parallel-size 2 \
    --num-layer-list "${NUM_LAYER_LIST}" \
    --mtp-num-layers "${MTP_NUM_LAYERS}" \
    --model-type-hf deepseek3 \
    --use-mcore-models \
    --load-dir "${HF_DIR}" \
    --save-dir "${MCORE_DIR}" \
    --tokenizer-model "${HF_DIR}/tokenizer.json"
