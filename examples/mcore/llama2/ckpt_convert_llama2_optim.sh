#!/usr/bin/env bash
# A distributed-optimizer training checkpoint (model_optim_rng.pt + distrib_optim.pt per rank) ->
# the same run at another layout: model weights from the fp32 master weights, and a distrib_optim.pt
# per target rank laid out for the new TP/PP and data-parallel size (Adam state and step kept).
# Resume it with the same --use-distributed-optimizer, --overlap-grad-reduce and --ddp-bucket-size
# as before (or pass --target-overlap-grad-reduce / --target-ddp-bucket-size for the new run).
# For Hugging Face weights from the master weights instead: --save-model-type hf.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"  # REPO and PYTHON: runs from any directory
LOAD_DIR=${LOAD_DIR:-./ckpt/llama-2-7b-pretrain/}
SAVE_DIR=${SAVE_DIR:-./ckpt/llama-2-7b-pretrain-tp2pp4/}
TP=${TP:-2}
PP=${PP:-4}
DP=${DP:-4}

"${PYTHON}" "${REPO}/convert_ckpt.py" \
    --model-type GPT \
    --use-mcore-models \
    --load-model-type optim \
    --save-model-type mg \
    --model-type-hf llama2 \
    --load-dir "${LOAD_DIR}" \
    --save-dir "${SAVE_DIR}" \
    --target-tensor-parallel-size "${TP}" \
    --target-pipeline-parallel-size "${PP}" \
    --target-data-parallel-size "${DP}"
