#!/usr/bin/env bash
# Hugging Face -> Megatron-Core (TP2, PP2, EP4, grouped GEMM experts). Set the paths and the layout (or the environment), then, from any directory: bash examples/mcore/qwen3_moe/ckpt_convert_qwen3_moe_hf2mcore.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"  # REPO and PYTHON: runs from any directory
HF_DIR=${HF_DIR:-./model_from_hf/qwen3-30b-a3b-hf/}
MCORE_DIR=${MCORE_DIR:-./model_weights/qwen3-30b-a3b-mcore/}
TP=${TP:-2}
PP=${PP:-2}
EP=${EP:-4}

"${PYTHON}" "${REPO}/convert_ckpt.py" \
    --model-type GPT \
    --load-model-type hf \
    --save-model-type mg \
    --target-tensor-parallel-size "${TP}" \
    --target-pipeline-parallel-size "${PP}" \
    --target-expert-parallel-size "${EP}" \
    --moe-grouped-gemm \
    --model-type-hf qwen3-moe \
    --use-mcore-models \
    --load-dir "${HF_DIR}" \
    --save-dir "${MCORE_DIR}" \
    --tokenizer-model "${HF_DIR}/tokenizer.json"
