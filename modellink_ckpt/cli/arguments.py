"""The `convert_ckpt.py` command line: its flags, MindSpeed-LLM's names and meanings.

Light to import on purpose (no torch): `--help` answers at once, before anything heavy loads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modellink_ckpt import __version__, registry
from modellink_ckpt.model.families import UNSAFE_FLAG

# The values these flags take. The modules that act on them key their tables by the same names
# (megatron_args.DTYPE_FLAGS, mg_names.MLA_SPELLINGS, file_io.HASHES; a test holds them equal):
# importing those here would load torch for --help.
DTYPE_NAMES = ("bf16", "fp16", "fp32")
MLA_SPELLINGS = ("mindspeed", "mcore")
HASH_NAMES = ("blake3", "sha256")

SOURCE_HELP = {"hf": "(Hugging Face folder)", "mg": "(Megatron-Core / MindSpeed-LLM, torch or torch_dist)",
               "ms": "(MindSpore / MindFormers .ckpt or safetensors)",
               "optim": "(a Megatron training checkpoint with its distributed-optimizer state)"}
TARGET_HELP = {"hf": "(Hugging Face safetensors in <save-dir>/mg2hf)",
               "mg": "(Megatron-Core rank files, or torch_dist with --ckpt-format)",
               "ms": "(MindSpore / MindFormers)"}


class Parser(argparse.ArgumentParser):
    """One line and exit code 2 for a bad command line, not a usage dump."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="convert_ckpt.py",
        description="Convert model checkpoints between Hugging Face, Megatron-Core / MindSpeed-LLM (legacy torch\n"
                    "rank files or torch_dist, at any TP/PP/EP/VPP layout) and MindSpore / MindFormers (complete or\n"
                    "split by a strategy); merge or export LoRA adapters; re-lay out distributed-optimizer state.",
        epilog="Other commands:\n"
               "  convert_ckpt.py inspect PATH    what a checkpoint of any format holds (see inspect --help)\n"
               "  convert_ckpt.py verify PATH     re-check a checkpoint against its manifest and its own args or\n"
               "                                  config.json (also --verify PATH; see verify --help)\n"
               "MindFormers' command lines: convert_weight.py, transform_checkpoint.py, transform_ckpt_lora.py, "
               "unified_safetensors.py (each with --help).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s (modellink-ckpt) {__version__}")
    p.add_argument("--model-type", default="GPT", choices=["GPT"], help="only decoder-only GPT models")
    p.add_argument("--load-model-type", required=True, choices=sorted(registry.SOURCES),
                   help="source format: " + "; ".join(f"{name} {text}" for name, text in SOURCE_HELP.items()))
    p.add_argument("--save-model-type", required=True, choices=registry.SAVE_MODEL_TYPES,
                   help="target format: " + "; ".join(f"{name} {text}" for name, text in TARGET_HELP.items()))
    p.add_argument("--ckpt-format", choices=["torch", "torch_dist"], default="torch",
                   help="Megatron output: the legacy torch layout (rank files; default) or torch_dist (megatron-core's "
                        "dist_checkpointing store, Megatron-LM's default --ckpt-format); inputs are detected")
    p.add_argument("--model-type-hf", default=None,
                   help="entry of configs/checkpoint/model_cfg.json (default: the one the source's config.json or "
                        "stored args name, printed)")
    p.add_argument(UNSAFE_FLAG, action="store_true",
                   help="unsafe: convert with --model-type-hf although the source's config.json, stored args or "
                        "recorded family describe a model that family does not convert (the output may compute "
                        "something else)")
    p.add_argument("--model-cfg", dest="model_cfg", default=None,
                   help="another model_cfg.json (default: configs/checkpoint/model_cfg.json)")
    p.add_argument("--load-dir", required=True, type=Path,
                   help="source: an HF model folder, a Megatron checkpoint folder (or its iter_* folder), a MindSpore "
                        "checkpoint file or folder")
    p.add_argument("--save-dir", required=True, type=Path,
                   help="target folder; for --save-model-type hf the original HF folder, output goes to <save-dir>/mg2hf")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1,
                   help="Megatron target: tensor-parallel size (default 1; from a Megatron source to HF it is read "
                        "from the checkpoint and this is ignored)")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1,
                   help="Megatron target: pipeline stages (default 1; uneven with --num-layer-list or --noop-layers)")
    p.add_argument("--target-expert-parallel-size", "--target-expert-model-parallel-size",
                   dest="target_expert_parallel_size", type=int, default=1,
                   help="Megatron target: expert-parallel size, which must divide the routed experts (default 1)")
    p.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="Megatron target: tensor-parallel size of the routed experts, 1 or the TP (default: the TP)")
    p.add_argument("--target-data-parallel-size", type=int, default=None,
                   help="with --load-model-type optim: lay the optimizer state out for this DP size "
                        "(default: the source's)")
    p.add_argument("--target-overlap-grad-reduce", choices=["on", "off"], default=None,
                   help="with --load-model-type optim: whether the resumed run uses --overlap-grad-reduce "
                        "(it decides the buffer buckets; default: as the source run)")
    p.add_argument("--target-ddp-bucket-size", type=int, default=None,
                   help="with --load-model-type optim: the resumed run's --ddp-bucket-size (default: as the source run)")
    p.add_argument("--num-layer-list", default=None, help="layers per pipeline stage, e.g. 8,8,8,8")
    p.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="layers per virtual pipeline chunk (VPP; written as model0, model1, ... in each rank file)")
    p.add_argument("--noop-layers", default=None, help="comma list of empty Megatron layer slots")
    p.add_argument("--use-mcore-models", action="store_true", help="accepted; mcore is the only format")
    p.add_argument("--params-dtype", choices=DTYPE_NAMES, default=None,
                   help="cast floating weights (default: keep the source dtype)")
    p.add_argument("--tokenizer-model", default=None, help="tokenizer file carried over to HF output")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="pad the vocabulary to a multiple of this x TP (default: from hf 1, from a Megatron source its own)")
    p.add_argument("--add-qkv-bias", action="store_true", default=None,
                   help="the model has q/k/v biases (default: as the family and config.json say; old MindSpeed-LLM "
                        "scripts pass it with --model-type-hf llama2 for Qwen2.5)")
    p.add_argument("--add-dense-bias", action="store_true", default=None,
                   help="the linear layers have biases (default: as the family and config.json say)")
    p.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local",
                   help="Megatron target: tensor names of Megatron-Core's local spec (default) or of its Transformer "
                        "Engine spec (norms fused into the next linear)")
    p.add_argument("--moe-grouped-gemm", action="store_true",
                   help="write routed experts in the grouped layout (weight1/weight2; with transformer_engine: "
                        "linear_fc1.weight<j>)")
    p.add_argument("--mla-spelling", choices=MLA_SPELLINGS, default="mindspeed",
                   help="MLA tensor names: MindSpeed-LLM's fused linear_qkv (default) or upstream Megatron-Core's "
                        "linear_q_down_proj/linear_kv_down_proj")
    p.add_argument("--max-queue-size", type=int, default=50, help="loader->saver queue capacity in messages")
    p.add_argument("--max-queue-gb", type=float, default=1.0, help="at most this many GB in flight")
    p.add_argument("--max-shard-size", default="5GB", help="largest HF output shard (e.g. 5GB, 500MB)")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel loader/saver pairs, each writing some pipeline stages (or rank files) of a "
                        "Megatron target, some ranks of a MindSpore target split by --dst-strategy, or the tensors "
                        "of some layers of an HF, torch_dist or complete MindSpore safetensors target (default: "
                        "one per two cores, as memory allows; at most one per part of the target, said when fewer "
                        "run than asked; same output bytes for any N)")
    p.add_argument("--hash", choices=HASH_NAMES, default=None,
                   help="digest of every output file in the manifest (default: blake3, sha256 where the blake3 "
                        "package is missing; --verify reads both)")
    p.add_argument("--no-kernel-copy", action="store_true",
                   help="move every byte through memory, also those a Megatron, HF or MindSpore safetensors target "
                        "takes unchanged from the source (by default copied file to file inside the kernel; the "
                        "output is the same bytes)")
    p.add_argument("--hf-cfg-dir", type=Path, default=None, help="folder with the HF config.json for HF output")
    p.add_argument("--overwrite", action="store_true", help="replace an existing target")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything, print the plan (files, layers per stage, bytes) and write nothing")
    p.add_argument("--mtp-num-layers", type=int, default=None,
                   help="convert this many multi-token-prediction layers (DeepSeek-V3, GLM-4.5); 0 leaves the ones a "
                        "checkpoint holds out on purpose (without the flag such a checkpoint is refused)")
    ms = p.add_argument_group("MindSpore / MindFormers (--load-model-type ms, --save-model-type ms)")
    ms.add_argument("--ms-format", choices=["safetensors", "ckpt", "checkpoint2"], default="safetensors",
                    help="MindSpore output file format (default safetensors, as MindFormers recommends); checkpoint2: "
                         "a MindFormers Checkpoint 2.0 folder (latest_checkpointed_iteration.txt, iteration_<N>/"
                         "model-0000000-0000001.safetensors) for mindformers.checkpoint.load_checkpoint")
    ms.add_argument("--ms-naming", default=None,
                    help="MindFormers tensor names: mcore (default for output; detected for input), mcore-contiguous "
                         "(fc1 not interleaved), legacy (convert_weight.py models: attention.wq, feed_forward.w1, ...) "
                         "or legacy-concat (w_qkv, w_gate_hidden); any naming model_cfg.json defines")
    ms.add_argument("--src-strategy", type=Path, default=None,
                    help="strategy of a distributed MindSpore source: a strategy file, a merged one, or a folder "
                         "of ckpt_strategy_rank_*.ckpt")
    ms.add_argument("--iteration", type=int, default=None,
                    help="the iteration of a MindFormers Checkpoint 2.0 folder to read (default: the one "
                         "latest_checkpointed_iteration.txt names)")
    ms.add_argument("--file-suffix", default=None,
                    help="where a MindSpore rank folder holds one file per saved step (<prefix>-<epoch>_<step>), "
                         "the step to read: the end of its file name, e.g. 2_2")
    ms.add_argument("--dst-strategy", type=Path, default=None,
                    help="write a distributed MindSpore checkpoint laid out by this strategy (file or folder); "
                         "without it the checkpoint is complete")
    ms.add_argument("--ms-prefix", default="checkpoint_",
                    help="file name prefix of distributed output: rank_<r>/<prefix><r>.<format>")
    lora = p.add_argument_group("LoRA (with --load-model-type mg or ms)")
    lora.add_argument("--lora-load", type=Path, default=None,
                      help="LoRA checkpoint (full or adapters only) to merge into the --load-dir base")
    lora.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: the one the checkpoint records)")
    lora.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the recorded one)")
    lora.add_argument("--lora-target-modules", nargs="*", default=None,
                      help="linear_qkv linear_proj linear_fc1 linear_fc2 (default: the recorded ones, else all four)")
    lora.add_argument("--lora-scaling", type=float, default=None,
                      help="MindSpore sources: merge MindFormers LoRA adapters with W + scaling * B @ A "
                           "(MindFormers' convention; or give --lora-r and --lora-alpha)")
    lora.add_argument("--save-lora-to-hf", action="store_true",
                      help="export only the adapters, as a PEFT adapter folder in <save-dir>/mg2hf")
    lora.add_argument("--load-checkpoint-loosely", action="store_true",
                      help="accepted (MindSpeed-LLM needs it for adapter-only checkpoints)")
    # accepted for compatibility with existing scripts; they change nothing here
    for flag in ("--spec", "--load-hf-from-config"):
        kwargs = {"nargs": "*"} if flag == "--spec" else {"action": "store_true"}
        p.add_argument(flag, help=argparse.SUPPRESS, **kwargs)
    return p


