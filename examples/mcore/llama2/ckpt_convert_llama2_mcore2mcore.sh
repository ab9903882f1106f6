#!/usr/bin/env bash
# Megatron-Core -> Megatron-Core at another layout (here TP2/PP4 -> TP4/PP2 with 2 virtual stages).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"  # REPO and PYTHON: runs from any directory
SRC_DIR=${SRC_DIR:-./model_weights/llama-2-7b-mcore/}
DST_DIR=${DST_DIR:-./model_weights/llama-2-7b-mcore-tp4pp2-vpp/}
TP=${TP:-4}
PP=${PP:-2}
VPP_LAYERS=${VPP_LAYERS-8}  # layers per virtual pipeline chunk; VPP_LAYERS= for none

"${PYTHON}" "${REPO}/convert_ckpt.py" \
    --model-type GPT \
    --load-model-type mg \
    --save-model-type mg \
    --model-type-hf llama2 \
    --use-mcore-models \
    --load-dir "${SRC_DIR}" \
    --save-dir "${DST_DIR}" \
    --target-tensor-parallel-size "${TP}" \
    --target-pipeline-parallel-size "${PP}" \
    ${VPP_LAYERS:+--num-layers-per-virtual-pipeline-stage "${VPP_LAYERS}"}
