#!/usr/bin/env bash
# Hugging Face -> Megatron-Core (TP2, PP2 with an uneven split of the 61 layers, EP2; MindSpeed-LLM MLA
# names, or add --mla-spelling mcore for the upstream Megatron-Core ones). Set the paths and the layout (or the environment), then, from any directory: bash examples/mcore/deepseek3/ckpt_convert_deepseek3_hf2mcore.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"  # REPO and PYTHON: runs from any directory
HF_DIR=${HF_DIR:-./model_from_hf/deepseek-v3-hf/}
MCORE_DIR=${MCORE_DIR:-./model_weights/deepseek-v3-mcore/}
NUM_LAYER_LIST=${NUM_LAYER_LIST-31,30}  # layers per stage (uneven split); NUM_LAYER_LIST= for an even one
MTP_NUM_LAYERS=${MTP_NUM_LAYERS:-1}  # DeepSeek-V3's multi-token-prediction layer (model.layers.61); 0 leaves it out
TP=${TP:-2}
PP=${PP:-2}
EP=${EP:-2}

"${PYTHON}" "${REPO}/convert_ckpt.py" \
    --model-type GPT \
    --load-model-type hf \
    --save-model-type mg \
    --target-tensor-parallel-size "${TP}" \
    --target-pipeline-parallel-size "${PP}" \
    --target-expert-parallel-size "${EP}" \
    ${NUM_LAYER_LIST:+--num-layer-list "${NUM_LAYER_LIST}"} \
    --mtp-num-layers "${MTP_NUM_LAYERS}" \
    --model-type-hf deepseek3 \
    --use-mcore-models \
    --load-dir "${HF_DIR}" \
    --save-dir "${MCORE_DIR}" \
    --tokenizer-model "${HF_DIR}/tokenizer.json"
