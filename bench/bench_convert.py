#!/usr/bin/env python
"""Benchmark the checkpoint converter against a plain `cp -r`, on a random Llama- or Mixtral-shaped checkpoint.

    python bench/bench_convert.py                       # TinyLlama-1.1B shape (~2.2 GB), every step once
    python bench/bench_convert.py --shape llama2-7b --repeat 3 --json bench-7b.json
    python bench/bench_convert.py --shape mixtral-2g    # Mixtral-like, 8 experts (~2 GB), EP layouts
    python bench/bench_convert.py --only hf2mg --layout TP4PP1
    python bench/bench_convert.py --quick               # tiny model, a few seconds: a smoke test for CI
    python bench/bench_convert.py --quick-moe           # the same with 4 experts

Steps (all selected ones run in one invocation, after the page cache has been warmed):
  copy   `cp -r HF COPY`, the floor: what moving the bytes costs with no conversion at all
  hf2mg  HF -> Megatron-Core at --layout (default TP2PP2; MoE shapes TP2PP2EP2)
  mg2hf  the source checkpoint (TP2PP2; MoE TP2PP2EP2) -> HF, into a fresh folder holding a copy of config.json
  mg2mg  the source checkpoint -> --mg2mg-layout (default TP1PP4; MoE shapes TP1PP4EP4)
  hf2ms  HF -> a complete MindSpore safetensors checkpoint (MindFormers mcore names)
  ms2hf  that MindSpore checkpoint -> HF
  hf2dist  HF -> Megatron torch_dist (--ckpt-format torch_dist, vocabulary padded for --layout's TP)
  dist2hf  that torch_dist checkpoint -> HF

For every run the whole process tree (the command and all its descendants) is sampled from /proc
every --interval seconds; the table reports the peak of the summed RSS and of the summed PSS.
A run counts only if it exited 0 and its output is complete. Exit code: 0 when every selected
step succeeded, 1 otherwise. This is a benchmark, not a test: the outputs' contents are not checked.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
GENERATOR_VERSION = 1
MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size="5GB"

# Sizes as the published config.json of each model has them (dtype: bfloat16 here). `family` is the
# converter's --model-type-hf and picks the config.json and the tensor names (see FAMILIES).
SHAPES = {
    "tinyllama": dict(family="llama2", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                      max_position_embeddings=2048, rms_norm_eps=1e-05, rope_theta=10000.0),
    "llama2-7b": dict(family="llama2", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096, rms_norm_eps=1e-05, rope_theta=10000.0),
    # Llama-3.2-3B (tied embeddings: no lm_head on disk), 6.4 GB: source and output both fit in the page cache
    "llama3.2-3b": dict(family="llama2", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                        num_attention_heads=24, num_key_value_heads=8, vocab_size=128256,
                        max_position_embeddings=131072, rms_norm_eps=1e-05, rope_theta=500000.0, tied=True),
    # Llama-2-70B's layer dimensions and vocabulary, 4 of its 80 layers (1.71 GB a layer, 7.9 GB in all):
    # memory at scale (a layer this wide must not cost more than about two layers plus 1 GB)
    "llama2-70b-4l": dict(family="llama2", hidden_size=8192, intermediate_size=28672, num_hidden_layers=4,
                          num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                          max_position_embeddings=4096, rms_norm_eps=1e-05, rope_theta=10000.0),
    # One DeepSeek-V3 layer (MLA, 256 routed experts of ffn 2048 and a shared one, 22.5 GB of experts)
    # with its vocabulary: memory at scale for the largest MoE layer in common use (26.7 GB on disk,
    # more than this machine's RAM; `intermediate_size` is the experts' ffn, as for Mixtral)
    "deepseek-v3-1l": dict(family="deepseek3", hidden_size=7168, intermediate_size=2048, num_hidden_layers=1,
                           num_attention_heads=128, num_key_value_heads=128, vocab_size=129280,
                           max_position_embeddings=163840, rms_norm_eps=1e-06, rope_theta=10000.0,
                           num_local_experts=256, num_experts_per_tok=8, dense_intermediate_size=18432,
                           q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                           v_head_dim=128),
    # Not a published model: Mixtral-like at ~2 GB, with Mixtral-8x7B's 8 experts, top-2, 8 kv heads and
    # vocabulary, scaled down to hidden 1024 (16 heads of 64); 8 layers (PP2 and PP4 divide them), expert
    # ffn 4608 (4.5 x hidden, Mixtral has 3.5) so the bf16 weights come to 1.99 GB, 0.23 GB of experts a layer.
    "mixtral-2g": dict(family="mixtral", hidden_size=1024, intermediate_size=4608, num_hidden_layers=8,
                       num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
                       max_position_embeddings=32768, rms_norm_eps=1e-05, rope_theta=1000000.0,
                       num_local_experts=8, num_experts_per_tok=2),
    # --quick: 4 layers so that PP4 works without --num-layer-list; divisible by TP2
    "quick": dict(family="llama2", hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=1024, max_position_embeddings=512,
                  rms_norm_eps=1e-05, rope_theta=10000.0),
    # --quick-moe: the same, with 4 experts (top-2) of ffn 512, so that EP2 and EP4 divide them
    "quick-moe": dict(family="mixtral", hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=1024, max_position_embeddings=512,
                      rms_norm_eps=1e-05, rope_theta=1000000.0, num_local_experts=4, num_experts_per_tok=2),
}
STEPS = ("copy", "hf2mg", "mg2hf", "mg2mg", "hf2ms", "ms2hf", "hf2dist", "dist2hf")
SHARED_STEPS = ("hf2mg", "mg2mg", "mg2hf", "hf2dist")  # the steps --workers applies to
KERNEL_COPY_STEPS = STEPS[1:]  # the steps whose unchanged bytes may be copied in the kernel (all but cp)
STEADY_MIN_S = 1.0  # the shortest steady state whose cores busy the scaling table estimates
# Per family: the default layouts (TP, PP, EP) of hf2mg (--layout) and of mg2mg (--mg2mg-layout), and the
# Megatron checkpoint mg2hf and mg2mg start from. Dense: TP2PP2, TP1PP4 and TP2PP2; MoE: the same with
# the experts spread over EP2 (hf2mg, source) and EP4 (mg2mg: TP1PP4EP4, each rank file holds 1/16 of
# all the experts).
FAMILIES = {
    "llama2": dict(moe=False, hf2mg=(2, 2, 1), mg2mg=(1, 4, 1), source=(2, 2, 1)),
    "mixtral": dict(moe=True, hf2mg=(2, 2, 2), mg2mg=(1, 4, 4), source=(2, 2, 2)),
    # one layer: PP1; EP1, as every EP rank holds its own copy of the 3.9 GB of dense weights (EP8: 56 GB)
    "deepseek3": dict(moe=True, hf2mg=(1, 1, 1), mg2mg=(1, 1, 2), source=(1, 1, 1)),
}


# ---------------------------------------------------------------------------------------------
# the random HF checkpoint
# ---------------------------------------------------------------------------------------------

def hf_config(shape: dict) -> dict:
    """config.json as transformers writes it for the shape's family: LlamaForCausalLM or
    MixtralForCausalLM (the hub's 4.x spelling, which transformers 5 also reads, keys sorted;
    `dtype` is the 4.56+/5 name of `torch_dtype`, both are written)."""
    config = {
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
        "hidden_act": "silu",
        "hidden_size": shape["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": shape["intermediate_size"],  # Mixtral: the ffn of one expert
        "max_position_embeddings": shape["max_position_embeddings"],
        "num_attention_heads": shape["num_attention_heads"],
        "num_hidden_layers": shape["num_hidden_layers"],
        "num_key_value_heads": shape["num_key_value_heads"],
        "rms_norm_eps": shape["rms_norm_eps"],
        "rope_theta": shape["rope_theta"],
        "tie_word_embeddings": shape.get("tied", False),
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": shape["vocab_size"],
    }
    family = shape["family"]
    if family == "llama2":
        config.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
                       "mlp_bias": False, "pretraining_tp": 1, "rope_scaling": None})
    elif family == "mixtral":
        config.update({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                       "num_local_experts": shape["num_local_experts"],
                       "num_experts_per_tok": shape["num_experts_per_tok"], "output_router_logits": False,
                       "router_aux_loss_coef": 0.02, "router_jitter_noise": 0.0, "sliding_window": None})
    elif family == "deepseek3":  # DeepseekV3ForCausalLM, every layer MoE, no MTP layer
        config.update({"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                       "intermediate_size": shape["dense_intermediate_size"],
                       "moe_intermediate_size": shape["intermediate_size"],
                       "n_routed_experts": shape["num_local_experts"], "n_shared_experts": 1,
                       "num_experts_per_tok": shape["num_experts_per_tok"], "first_k_dense_replace": 0,
                       "moe_layer_freq": 1, "n_group": 8, "topk_group": 4, "norm_topk_prob": True,
                       "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
                       "num_nextn_predict_layers": 0, "attention_bias": False,
                       **{k: shape[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                                                "qk_rope_head_dim", "v_head_dim")},
                       "head_dim": shape["qk_rope_head_dim"]})
    else:
        raise ValueError(f"unknown family {family!r}")
    return dict(sorted(config.items()))


def mlp_tensors(shape: dict, prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    """The feed-forward weights of one layer: Llama's MLP, or Mixtral's router and experts."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    if shape["family"] == "llama2":
        return [(prefix + "mlp.gate_proj.weight", (i, h)), (prefix + "mlp.up_proj.weight", (i, h)),
                (prefix + "mlp.down_proj.weight", (h, i))]
    if shape["family"] == "deepseek3":
        mlp, experts = prefix + "mlp.", shape["num_local_experts"]
        out = [(mlp + "gate.weight", (experts, h)), (mlp + "gate.e_score_correction_bias", (experts,))]
        for owner in [f"experts.{e}." for e in range(experts)] + ["shared_experts."]:
            out += [(mlp + owner + "gate_proj.weight", (i, h)), (mlp + owner + "up_proj.weight", (i, h)),
                    (mlp + owner + "down_proj.weight", (h, i))]
        return out
    moe = prefix + "block_sparse_moe."
    out = [(moe + "gate.weight", (shape["num_local_experts"], h))]
    for e in range(shape["num_local_experts"]):
        # w1 gate, w2 down, w3 up, in the order of MixtralBlockSparseTop2MLP's state_dict
        out += [(moe + f"experts.{e}.w1.weight", (i, h)), (moe + f"experts.{e}.w2.weight", (h, i)),
                (moe + f"experts.{e}.w3.weight", (i, h))]
    return out


def attention_tensors(shape: dict, prefix: str, kv: int) -> list[tuple[str, tuple[int, ...]]]:
    """One layer's attention weights: q/k/v/o, or DeepSeek's MLA (low-rank q and kv with their norms)."""
    h = shape["hidden_size"]
    if shape["family"] != "deepseek3":
        return [(prefix + "q_proj.weight", (h, h)), (prefix + "k_proj.weight", (kv, h)),
                (prefix + "v_proj.weight", (kv, h)), (prefix + "o_proj.weight", (h, h))]
    heads, q, c = shape["num_attention_heads"], shape["q_lora_rank"], shape["kv_lora_rank"]
    nope, rope, v = shape["qk_nope_head_dim"], shape["qk_rope_head_dim"], shape["v_head_dim"]
    return [(prefix + "q_a_proj.weight", (q, h)), (prefix + "q_a_layernorm.weight", (q,)),
            (prefix + "q_b_proj.weight", (heads * (nope + rope), q)),
            (prefix + "kv_a_proj_with_mqa.weight", (c + rope, h)), (prefix + "kv_a_layernorm.weight", (c,)),
            (prefix + "kv_b_proj.weight", (heads * (nope + v), c)), (prefix + "o_proj.weight", (h, heads * v))]


def hf_tensors(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight, in the order transformers' state_dict has them."""
    h, v = shape["hidden_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(shape["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [*attention_tensors(shape, p + "self_attn.", kv),
                *mlp_tensors(shape, p),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,))] + ([] if shape.get("tied") else [("lm_head.weight", (v, h))])
    return out


def experts_bytes_per_layer(shape: dict) -> int:
    """bf16 bytes of one layer's routed experts (0 for a dense shape)."""
    return 3 * shape.get("num_local_experts", 0) * shape["hidden_size"] * shape["intermediate_size"] * 2


def nbytes_bf16(dims: tuple[int, ...]) -> int:
    n = 2
    for d in dims:
        n *= d
    return n


def plan_shards(tensors, max_bytes: int = MAX_SHARD_BYTES) -> list[tuple[str, list]]:
    """Split like transformers/huggingface_hub: a new shard when the next tensor would overflow."""
    shards: list[list] = [[]]
    size = 0
    for name, dims in tensors:
        n = nbytes_bf16(dims)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += n
    if len(shards) == 1:
        return [("model.safetensors", shards[0])]
    count = len(shards)
    return [(f"model-{k:05d}-of-{count:05d}.safetensors", s) for k, s in enumerate(shards, start=1)]


class Filler:
    """Writes finite bf16 values fast: slices of one small randn block at moving (even) offsets.

    The block is also kept in a small file so the bytes can be copied in the kernel
    (`copy_file_range`, several times faster than `write` from user space); `write` where that fails.
    """

    BLOCK = 8 << 20  # bytes

    def __init__(self, folder: Path, seed: int = 0):
        values = np.random.default_rng(seed).standard_normal(self.BLOCK // 2, dtype=np.float32) * 0.02
        bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)  # truncation to bf16: always finite
        doubled = np.concatenate([bf16, bf16]).view(np.uint8)  # any window of BLOCK bytes is contiguous
        self._buf = memoryview(doubled)
        self._pos = 0
        self._template = folder / ".bench-fill-block"
        self._template.write_bytes(doubled.tobytes())
        self._src = os.open(self._template, os.O_RDONLY)
        self._in_kernel = hasattr(os, "copy_file_range")

    def close(self) -> None:
        os.close(self._src)
        self._template.unlink(missing_ok=True)

    def _copy(self, f, n: int) -> None:
        if self._in_kernel:
            done = 0
            try:
                while done < n:
                    got = os.copy_file_range(self._src, f.fileno(), n - done, self._pos + done)
                    if not got:
                        break
                    done += got
            except OSError:
                pass
            if done == n:
                return
            self._in_kernel = False
            n -= done
            start = self._pos + done
        else:
            start = self._pos
        view = self._buf[start:start + n]
        while view:
            view = view[f.write(view):]

    def write(self, f, nbytes: int) -> None:
        while nbytes:
            n = min(nbytes, self.BLOCK)
            self._copy(f, n)
            nbytes -= n
            self._pos = (self._pos + n + 2 * 7919) % self.BLOCK  # n and the step are even: bf16 stays aligned


def write_safetensors(path: Path, tensors, filler: Filler) -> int:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in tensors:
        n = nbytes_bf16(dims)
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb", buffering=0) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, dims in tensors:
            filler.write(f, nbytes_bf16(dims))
    os.replace(tmp, path)
    return path.stat().st_size


def ensure_hf_checkpoint(folder: Path, shape_name: str, shape: dict) -> tuple[int, bool]:
    """Generate (or reuse) the checkpoint; returns (bytes of weights, reused)."""
    config = hf_config(shape)
    tensors = hf_tensors(shape)
    shards = plan_shards(tensors)
    marker = folder / "bench_meta.json"
    want = {"generator": GENERATOR_VERSION, "shape": shape_name, "config": config,
            "files": {}}  # sizes filled in after writing
    if marker.is_file():
        try:
            have = json.loads(marker.read_text())
            if (have.get("generator") == GENERATOR_VERSION and have.get("config") == config
                    and set(have.get("files", {})) == {name for name, _ in shards}
                    and all((folder / n).is_file() and (folder / n).stat().st_size == s
                            for n, s in have["files"].items())
                    and json.loads((folder / "config.json").read_text()) == config):
                return sum(have["files"].values()), True
        except (ValueError, OSError, KeyError, AttributeError):
            pass
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    sizes = {}
    weight_map = {}
    total = sum(nbytes_bf16(d) for _, d in tensors)
    started = time.perf_counter()
    filler = Filler(folder)
    try:
        for file_name, members in shards:
            sizes[file_name] = write_safetensors(folder / file_name, members, filler)
            weight_map.update({name: file_name for name, _ in members})
    finally:
        filler.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "max_length": shape["max_position_embeddings"]}, indent=2) + "\n")
    want["files"] = sizes
    marker.write_text(json.dumps(want, indent=2) + "\n")  # last: a folder without it is regenerated
    seconds = time.perf_counter() - started
    log(f"generated {folder} ({fmt_bytes(sum(sizes.values()))} in {len(shards)} file(s)) in {seconds:.1f} s "
        f"({sum(sizes.values()) / 1e9 / max(seconds, 1e-9):.2f} GB/s)")
    return sum(sizes.values()), False


# ---------------------------------------------------------------------------------------------
# measuring a process tree
# ---------------------------------------------------------------------------------------------

def _ppid(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split(b" ", 2)[1])  # after "pid (comm) state "


def descendants(root: int) -> list[int]:
    """The root and every process below it (one pass over /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = _ppid(entry)
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


HAVE_ROLLUP = os.path.exists("/proc/self/smaps_rollup")  # Linux 4.14+
PSS_PARTS = (b"Pss_Anon:", b"Pss_File:", b"Pss_Shmem:")  # Linux 5.13+


def memory_of(pid: int) -> dict | None:
    """{"rss", "pss", "pss_anon", "pss_file", "pss_shmem"} in bytes (what the kernel tells; statm's RSS
    alone on kernels without smaps_rollup); None for a process that is gone or a zombie."""
    try:
        if HAVE_ROLLUP:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                text = f.read()
            found = {}
            for line in text.splitlines():
                key = line.split(b":", 1)[0] + b":"
                if key in (b"Rss:", b"Pss:") + PSS_PARTS:
                    found[key[:-1].decode().lower()] = int(line.split()[1]) * 1024
            return found if "rss" in found and "pss" in found else None
        with open(f"/proc/{pid}/statm", "rb") as f:
            return {"rss": int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")}
    except (OSError, ValueError, IndexError):
        return None


def shm_used() -> int:
    try:
        st = os.statvfs("/dev/shm")
        return (st.f_blocks - st.f_bfree) * st.f_frsize
    except OSError:
        return 0


class TreeSampler(threading.Thread):
    """Samples the summed memory of a process tree every `interval` s until stopped.

    `peak[k]` is the largest sum of field k over the tree seen in one sample (the fields peak
    independently, so the parts of PSS need not add up to the PSS peak)."""

    FIELDS = ("rss", "pss", "pss_anon", "pss_file", "pss_shmem")

    def __init__(self, root: int, interval: float):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self.known = set(self.FIELDS)  # fields every process reported
        self.peak_shm = self.samples = self.max_procs = 0
        self._shm0 = shm_used()
        self._stop_event = threading.Event()

    def sample(self) -> None:
        total = dict.fromkeys(self.FIELDS, 0)
        procs = descendants(self.root)
        for pid in procs:
            got = memory_of(pid)
            if got is None:
                continue
            self.known &= set(got)
            for key, value in got.items():
                total[key] += value
        for key in self.FIELDS:
            self.peak[key] = max(self.peak[key], total[key])
        self.peak_shm = max(self.peak_shm, shm_used() - self._shm0)
        self.max_procs = max(self.max_procs, len(procs))
        self.samples += 1

    def result(self) -> dict:
        return {f"peak_{k}": (self.peak[k] if k in self.known else None) for k in self.FIELDS}

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def measure(cmd: list[str], log_dir: Path, interval: float, settle: float = 0.0) -> dict:
    """Run `cmd`, sampling its process tree; returns rc, wall seconds, peaks and the output tail."""
    os.sync()  # the previous step's dirty pages are not flushed on this run's time
    # On a VM with free-page reporting, memory freed a moment ago (the previous step's deleted
    # output) is still backed and fast to reuse; after a few seconds it is handed back to the host
    # and every step pays to fault it in again. Settling puts every step, `cp` included, in the
    # same state.
    time.sleep(settle)
    with tempfile.TemporaryFile(dir=log_dir) as out:
        # CPU time of the whole tree: the converter waits for its loader and saver, so their time
        # (threads included) is in its children's, and so in ours once we have waited for it
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)
        sampler = TreeSampler(proc.pid, interval)
        sampler.start()
        try:
            rc = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()  # the converter stops its loader and saver on SIGTERM
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            sampler.stop()
            raise
        wall = time.perf_counter() - started
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        sampler.stop()
        out.seek(0)
        text = out.read().decode(errors="replace").replace(str(REPO) + os.sep, "")  # repo-relative paths
    summary = next((line for line in text.splitlines() if line.startswith("done:")), None)
    first = re.search(r"first byte read ([0-9.]+) s after start", summary or "")
    return {"rc": rc, "wall_s": wall, "first_byte_s": float(first.group(1)) if first else None,
            "cpu_user_s": cpu_after.ru_utime - cpu_before.ru_utime, "cpu_sys_s": cpu_after.ru_stime - cpu_before.ru_stime,
            **sampler.result(), "peak_shm_delta": sampler.peak_shm,
            "max_processes": sampler.max_procs, "samples": sampler.samples, "converter_summary": summary,
            "output_tail": text[-2000:] if rc else ""}


# ---------------------------------------------------------------------------------------------
# outputs and their completeness
# ---------------------------------------------------------------------------------------------

def dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def largest_file(folder: Path) -> int:
    return max((p.stat().st_size for p in folder.rglob("*") if p.is_file()), default=0) if folder.is_dir() else 0


def drop_caches() -> None:
    """Empty the page cache (root only), so the timed run reads its source from the disk."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def warm_tools(converter: str) -> None:
    """Read the converter's own code (Python, torch) back into the cache after `drop_caches`: the
    cold runs measure a checkpoint not yet read, with the tools as warm as `cp`'s."""
    subprocess.run([sys.executable, "-c", "import modellink_ckpt.cli.convert"], cwd=Path(converter).parent, check=True,
                   stdout=subprocess.DEVNULL)


def read_cache(folder: Path) -> None:
    """Read every file once (untimed) so the timed run starts with a warm page cache."""
    buf = bytearray(16 << 20)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def copy_complete(src: Path, dst: Path) -> bool:
    files = [p for p in src.rglob("*") if p.is_file()]
    return all((dst / p.relative_to(src)).is_file()
               and (dst / p.relative_to(src)).stat().st_size == p.stat().st_size for p in files)


def rank_dir(tp_rank: int, pp_rank: int, ep_rank: int, pp: int, ep: int) -> str:
    """`mp_rank_TT[_PPP][_EEE]`: the PP part when PP > 1, the EP part when EP > 1."""
    return f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "") + (f"_{ep_rank:03d}" if ep > 1 else "")


def mg_complete(folder: Path, tp: int, pp: int, ep: int = 1) -> bool:
    tracker = folder / "latest_checkpointed_iteration.txt"
    if not tracker.is_file():
        return False
    text = tracker.read_text().strip()
    iter_dir = folder / ("release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else "?")
    return all((iter_dir / rank_dir(t, p, e, pp, ep) / "model_optim_rng.pt").is_file()
               for t in range(tp) for p in range(pp) for e in range(ep))


def dist_complete(folder: Path) -> bool:
    return (folder / "latest_checkpointed_iteration.txt").is_file() and any(folder.glob("iter_*/metadata.json"))


def ms_complete(folder: Path) -> bool:
    return (folder / "convert_manifest.json").is_file() and any(folder.glob("model*.safetensors"))


def hf_complete(folder: Path) -> bool:
    out = folder / "mg2hf"
    if not (out / "config.json").is_file() or not list(out.glob("model*.safetensors")):
        return False
    index = out / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError):
            return False
        return all((out / s).is_file() for s in shards)
    return (out / "model.safetensors").is_file()


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------

def parse_layout(text: str) -> tuple[int, int, int]:
    """`TP2PP2` or `TP2PP2EP2` -> (tp, pp, ep); EP defaults to 1."""
    match = re.fullmatch(r"\s*tp(\d+)\s*pp(\d+)\s*(?:ep(\d+)\s*)?", text, re.IGNORECASE)
    if not match or min(int(g) for g in match.groups(default="1")) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a layout like TP2PP2 or TP2PP2EP2")
    return int(match[1]), int(match[2]), int(match[3] or 1)


def fmt_layout(layout: tuple[int, int, int], moe: bool) -> str:
    """TP2PP2 for a dense model; a MoE model's layouts always show EP (TP2PP2EP1 included)."""
    tp, pp, ep = layout
    return f"TP{tp}PP{pp}" + (f"EP{ep}" if moe or ep > 1 else "")


def layer_list(layers: int, pp: int) -> list[str]:
    """`--num-layer-list` when PP does not divide the layers (TinyLlama: 22 layers, PP4 -> 6,6,5,5)."""
    if layers % pp == 0 or pp > layers:
        return []
    base, extra = divmod(layers, pp)
    return ["--num-layer-list", ",".join(str(base + (k < extra)) for k in range(pp))]


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def shown(cmd: list) -> str:
    """The command as a portable string for the record: repo-relative paths, `python` for the interpreter."""
    words = ["python" if str(c) == sys.executable else str(c) for c in cmd]
    root = str(REPO) + os.sep
    return " ".join(w[len(root):] if w.startswith(root) else w for w in words)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Step:
    """A planned step: its record (label, command, runs) and how to run and check it."""

    result: dict
    cmd: list[str]
    source: Path
    out: Path
    complete: Callable[[], bool]
    prepare: Callable[[], None] | None
    keep_as: Path | None  # where its first complete output is kept, as another step's source


class Bench:
    def __init__(self, args, shape_name: str, shape: dict):
        self.args, self.shape = args, shape
        self.family = shape["family"]
        self.moe = FAMILIES[self.family]["moe"]
        self.source = FAMILIES[self.family]["source"]  # the layout mg2hf and mg2mg start from
        self.work = Path(args.work_dir).resolve()
        self.hf = self.work / f"hf-{shape_name}"
        self.runs = self.work / f"runs-{shape_name}"
        self.mg_src = self.runs / f"mg-src-{self.name(self.source).lower()}"
        self.ms_src = self.runs / "ms-src"
        self.dist_src = self.runs / "dist-src"
        self.converter = [sys.executable, str(Path(args.converter).resolve())]
        self.layers = shape["num_hidden_layers"]

    def name(self, layout: tuple[int, int, int]) -> str:
        return fmt_layout(layout, self.moe)

    def convert_cmd(self, *flags) -> list[str]:
        # one worker unless a shared step asks for more (appended later: the last flag counts), so
        # that a machine with more cores times the same thing
        return self.converter + ["--model-type", "GPT", "--model-type-hf", self.family, "--use-mcore-models",
                                 *map(str, flags), "--workers", "1", "--quiet"]

    def layout_flags(self, layout: tuple[int, int, int]) -> list:
        tp, pp, ep = layout
        flags = ["--target-tensor-parallel-size", tp, "--target-pipeline-parallel-size", pp]
        if ep > 1:
            flags += ["--target-expert-parallel-size", ep]
        return flags + layer_list(self.layers, pp)

    def hf2mg_cmd(self, out: Path, layout: tuple[int, int, int]) -> list[str]:
        return self.convert_cmd("--load-model-type", "hf", "--save-model-type", "mg", "--load-dir", self.hf,
                                "--save-dir", out, *self.layout_flags(layout))

    def ensure_mg_source(self) -> bool:
        """The source checkpoint mg2hf and mg2mg read (kept from hf2mg, else made untimed)."""
        if mg_complete(self.mg_src, *self.source):
            return True
        remove(self.mg_src)
        log(f"making the {self.name(self.source)} source checkpoint (untimed)")
        run = measure(self.hf2mg_cmd(self.mg_src, self.source), self.runs, self.args.interval, self.args.settle)
        ok = run["rc"] == 0 and mg_complete(self.mg_src, *self.source)
        if not ok:
            log(f"could not make the source checkpoint (rc {run['rc']}):\n{run['output_tail']}")
        return ok

    def hf2ms_cmd(self, out: Path) -> list[str]:
        return self.convert_cmd("--load-model-type", "hf", "--save-model-type", "ms", "--load-dir", self.hf,
                                "--save-dir", out)

    def hf2dist_cmd(self, out: Path) -> list[str]:
        return self.convert_cmd("--load-model-type", "hf", "--save-model-type", "mg", "--ckpt-format", "torch_dist",
                                "--load-dir", self.hf, "--save-dir", out)

    def ensure_dist_source(self) -> bool:
        """The torch_dist checkpoint dist2hf reads (kept from hf2dist, else made untimed)."""
        if dist_complete(self.dist_src):
            return True
        remove(self.dist_src)
        log("making the torch_dist source checkpoint (untimed)")
        run = measure(self.hf2dist_cmd(self.dist_src), self.runs, self.args.interval, self.args.settle)
        ok = run["rc"] == 0 and dist_complete(self.dist_src)
        if not ok:
            log(f"could not make the torch_dist source checkpoint (rc {run['rc']}):\n{run['output_tail']}")
        return ok

    def ensure_ms_source(self) -> bool:
        """The MindSpore checkpoint ms2hf reads (kept from hf2ms, else made untimed)."""
        if ms_complete(self.ms_src):
            return True
        remove(self.ms_src)
        log("making the MindSpore source checkpoint (untimed)")
        run = measure(self.hf2ms_cmd(self.ms_src), self.runs, self.args.interval, self.args.settle)
        ok = run["rc"] == 0 and ms_complete(self.ms_src)
        if not ok:
            log(f"could not make the MindSpore source checkpoint (rc {run['rc']}):\n{run['output_tail']}")
        return ok

    def plan(self, key: str, workers: int = 1, kernel_copy: bool = True) -> Step:
        """One timed step; the SHARED_STEPS run with `--workers workers` (every other step, and the
        untimed sources, with one worker, whatever the machine's default); `kernel_copy` False
        adds --no-kernel-copy."""
        layout, layout2 = self.args.layout, self.args.mg2mg_layout
        if key == "copy":
            label, source, out = "cp -r HF (floor)", self.hf, self.runs / "copy"
            cmd = ["cp", "-r", str(self.hf), str(out)]
            complete = lambda: copy_complete(self.hf, out)  # noqa: E731
            prepare = None
        elif key == "hf2mg":
            label, source = f"hf→mg {self.name(layout)}", self.hf
            out = self.runs / f"mg-{self.name(layout).lower()}"
            cmd = self.hf2mg_cmd(out, layout)
            complete = lambda: mg_complete(out, *layout)  # noqa: E731
            prepare = None
        elif key == "mg2hf":
            label, source, out = f"mg→hf {self.name(self.source)}→HF", self.mg_src, self.runs / "hf-out"
            cmd = self.convert_cmd("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", self.mg_src,
                                   "--save-dir", out)
            complete = lambda: hf_complete(out)  # noqa: E731

            def prepare():
                out.mkdir(parents=True)
                shutil.copy2(self.hf / "config.json", out / "config.json")
        elif key == "hf2ms":
            label, source, out = "hf→ms (MindSpore safetensors, complete)", self.hf, self.runs / "ms-out"
            cmd = self.hf2ms_cmd(out)
            complete = lambda: ms_complete(out)  # noqa: E731
            prepare = None
        elif key == "hf2dist":
            label, source, out = "hf→mg torch_dist", self.hf, self.runs / "dist-out"
            cmd = self.hf2dist_cmd(out)
            complete = lambda: dist_complete(out)  # noqa: E731
            prepare = None
        elif key == "dist2hf":
            label, source, out = "mg torch_dist→hf", self.dist_src, self.runs / "hf-from-dist"
            cmd = self.convert_cmd("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", self.dist_src,
                                   "--save-dir", out)
            complete = lambda: hf_complete(out)  # noqa: E731
            prepare = None
        elif key == "ms2hf":
            label, source, out = "ms→hf", self.ms_src, self.runs / "hf-from-ms"
            cmd = self.convert_cmd("--load-model-type", "ms", "--save-model-type", "hf", "--load-dir", self.ms_src,
                                   "--save-dir", out)
            complete = lambda: hf_complete(out)  # noqa: E731
            prepare = None
        else:
            label = f"mg→mg {self.name(self.source)}→{self.name(layout2)}"
            source, out = self.mg_src, self.runs / f"mg-{self.name(layout2).lower()}"
            cmd = self.convert_cmd("--load-model-type", "mg", "--save-model-type", "mg", "--load-dir", self.mg_src,
                                   "--save-dir", out, *self.layout_flags(layout2))
            complete = lambda: mg_complete(out, *layout2)  # noqa: E731
            prepare = None
        if "--num-layer-list" in cmd:
            label += " (" + cmd[cmd.index("--num-layer-list") + 1] + ")"
        if key in KERNEL_COPY_STEPS and not kernel_copy:
            cmd += ["--no-kernel-copy"]
            label += ", no kernel copy"
        if key in SHARED_STEPS:
            cmd += ["--workers", str(workers)]
            label += f", {workers} worker{'s' if workers > 1 else ''}" if len(self.args.workers) > 1 else ""
        result = {"step": key, "label": label, "command": shown(cmd), "runs": [], "workers": workers,
                  "kernel_copy": kernel_copy and key in KERNEL_COPY_STEPS}
        # an output that is another step's source is kept (its first complete run's)
        keeps = {self.mg_src: key == "hf2mg" and layout == self.source, self.ms_src: key == "hf2ms",
                 self.dist_src: key == "hf2dist"}
        return Step(result, cmd, source, out, complete, prepare, next((k for k, v in keeps.items() if v), None))

    def has_source(self, step: Step) -> bool:
        """Whether the step's source exists (made untimed if need be); if not, the step FAILED."""
        for path, ensure, error in (
                (self.dist_src, self.ensure_dist_source, "no torch_dist source checkpoint (hf→torch_dist failed)"),
                (self.ms_src, self.ensure_ms_source, "no MindSpore source checkpoint (hf→ms failed)"),
                (self.mg_src, self.ensure_mg_source, f"no source checkpoint (hf→mg {self.name(self.source)} failed)")):
            if step.source == path and not ensure():
                step.result.update(status="FAILED", error=error)
                return False
        return True

    def run(self, step: Step, k: int) -> None:
        """The step's run number k (0-based), logged and added to its record."""
        if "error" in step.result or (k == 0 and not self.has_source(step)):
            return
        result, out, key, label = step.result, step.out, step.result["step"], step.result["label"]
        remove(out)
        if step.prepare:
            step.prepare()
        if self.args.cache == "cold":
            drop_caches()
            warm_tools(self.args.converter)
        else:
            read_cache(step.source)
        run = measure(step.cmd, self.runs, self.args.interval, self.args.settle)
        run["complete"] = run["rc"] == 0 and step.complete()
        written = out / "mg2hf" if key in ("mg2hf", "ms2hf", "dist2hf") else out
        run["bytes"], run["largest_file_bytes"] = dir_bytes(written), largest_file(written)
        result["runs"].append(run)
        state = "ok" if run["complete"] else f"FAILED (rc {run['rc']}{', output incomplete' if run['rc'] == 0 else ''})"
        log(f"{label} run {k + 1}/{self.args.repeat}: {run['wall_s']:.2f} s, peak RSS {fmt_bytes(run['peak_rss'])},"
            f" PSS {fmt_bytes(run['peak_pss'])} (peaks of its parts: anon {fmt_bytes(run['peak_pss_anon'])},"
            f" file {fmt_bytes(run['peak_pss_file'])}, shmem {fmt_bytes(run['peak_pss_shmem'])}),"
            f" largest output file {fmt_bytes(run['largest_file_bytes'])}, {state}"
            + (f"\n  {run['converter_summary']}" if run["converter_summary"] else ""))
        if not run["complete"] and run["output_tail"]:
            log("  " + run["output_tail"].strip().replace("\n", "\n  "))
        if step.keep_as and run["complete"] and not step.keep_as.exists():
            os.replace(out, step.keep_as)
        else:
            remove(out)

    @staticmethod
    def summary(step: Step) -> dict:
        """The step's record: the fastest good run's time and bytes, the largest peaks of all good runs."""
        result = step.result
        if "error" in result:
            return result
        good = [r for r in result["runs"] if r["complete"]]
        result["status"] = "ok" if len(good) == len(result["runs"]) else "FAILED"
        if good:
            best = min(good, key=lambda r: r["wall_s"])
            result.update(wall_s=best["wall_s"], bytes=best["bytes"], largest_file_bytes=best["largest_file_bytes"],
                          first_byte_s=best.get("first_byte_s"), cpu_s=best["cpu_user_s"] + best["cpu_sys_s"])
            for key in [f"peak_{k}" for k in TreeSampler.FIELDS] + ["peak_shm_delta"]:
                values = [r[key] for r in good]
                result[key] = None if None in values else max(values)
        return result


def machine() -> dict:
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "cpu": cpu, "ram_bytes": mem,
            "kernel": platform.release(), "python": platform.python_version()}


def steady(r: dict) -> tuple[float | None, float | None]:
    """A step's rate after start-up (GB/s), and the cores its process tree kept busy meanwhile:
    start-up is one process importing, one core, so the rest of the CPU time is the steady state's
    (None where that state lasts under STEADY_MIN_S: too short to tell apart from start-up)."""
    start = r.get("first_byte_s")
    if start is None or r["wall_s"] <= start:
        return None, None
    rest = r["wall_s"] - start
    cores = (r["cpu_s"] - start) / rest if r.get("cpu_s") is not None and rest >= STEADY_MIN_S else None
    return r["bytes"] / 1e9 / rest, cores if cores and cores > 0 else None


def table(results: list[dict], copy_wall: float | None) -> str:
    """One row per step: wall time against the copy, overall GB/s, start-up (process start to the
    first checkpoint byte read, from the converter's summary), the steady rate after it, and the
    CPU time (user + system) of the whole process tree."""
    rows = ["| step | bytes | wall s | × copy | GB/s | start-up s | steady GB/s | CPU s | peak RSS tree | peak PSS tree |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "wall_s" not in r:
            rows.append(f"| {r['label']} | – | FAILED | – | – | – | – | – | – | – |")
            continue
        wall = f"{r['wall_s']:.2f}" + ("" if r["status"] == "ok" else " FAILED")
        ratio = f"{r['wall_s'] / copy_wall:.2f}" if copy_wall else "–"
        rate = f"{r['bytes'] / 1e9 / max(r['wall_s'], 1e-9):.2f}"
        start, (rate_after, _), cpu = r.get("first_byte_s"), steady(r), r.get("cpu_s")
        rows.append(f"| {r['label']} | {fmt_bytes(r['bytes'])} | {wall} | {ratio} | {rate} | "
                    f"{'–' if start is None else f'{start:.2f}'} | {'–' if rate_after is None else f'{rate_after:.2f}'} | "
                    f"{'–' if cpu is None else f'{cpu:.2f}'} | "
                    f"{fmt_bytes(r['peak_rss'])} | {fmt_bytes(r['peak_pss'])} |")
    return "\n".join(rows)


def scaling_table(results: list[dict], cores: int) -> str:
    """Throughput of each shared step against its number of workers, relative to one worker, in all
    and after start-up (one import of torch in the parent, whatever the number of workers). The ceiling
    is what `cores` allow: one worker keeps k cores busy after start-up, so W workers can at best
    run min(W, cores / k) times as fast."""
    rows = ["| step | workers | wall s | GB/s | × 1 worker | steady GB/s | steady × 1 worker | cores busy | ceiling × |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key in SHARED_STEPS:
        runs = [r for r in results if r["step"] == key and r.get("status") == "ok" and "wall_s" in r]
        for r in sorted(runs, key=lambda r: not r.get("kernel_copy", True)):  # each variant against its own
            one = next((o for o in runs if o["workers"] == 1 and o.get("kernel_copy") == r.get("kernel_copy")), None)
            rate = r["bytes"] / 1e9 / max(r["wall_s"], 1e-9)
            speedup = f"{one['wall_s'] / r['wall_s']:.2f}" if one else "–"
            (rate_after, busy), (one_after, one_busy) = steady(r), steady(one) if one else (None, None)
            steady_speedup = f"{rate_after / one_after:.2f}" if rate_after and one_after else "–"
            ceiling = f"{min(r['workers'], cores / one_busy):.2f}" if one_busy else "–"
            rows.append(f"| {r['label'].rsplit(',', 1)[0]} | {r['workers']} | {r['wall_s']:.2f} | {rate:.2f} | "
                        f"{speedup} | {'–' if rate_after is None else f'{rate_after:.2f}'} | {steady_speedup} | "
                        f"{'–' if busy is None else f'{busy:.2f}'} | {ceiling} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    quick = p.add_mutually_exclusive_group()
    quick.add_argument("--quick", action="store_true",
                       help="--shape quick: tiny model (4 layers, hidden 256), a few seconds: CI smoke")
    quick.add_argument("--quick-moe", action="store_true",
                       help="--shape quick-moe: the same with 4 experts (Mixtral), a few seconds: CI smoke")
    p.add_argument("--work-dir", default=str(REPO / "bench_out"), help="where the checkpoint and outputs go")
    p.add_argument("--repeat", type=int, default=1, help="runs per step; the fastest good one is reported")
    p.add_argument("--only", default=None, help=f"comma list of steps to run, from {','.join(STEPS)}")
    p.add_argument("--layout", type=parse_layout, default=None,
                   help="hf→mg target layout, TPxPPy[EPz] (default TP2PP2; MoE shapes TP2PP2EP2)")
    p.add_argument("--mg2mg-layout", type=parse_layout, default=None,
                   help="mg→mg target layout (default TP1PP4; MoE shapes TP1PP4EP4)")
    p.add_argument("--interval", type=float, default=0.25, help="memory sampling period in seconds")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds to wait (after sync) before each timed run, so every step starts alike")
    p.add_argument("--workers", default="1", type=lambda text: [int(n) for n in text.split(",")],
                   help="comma list: hf2mg, mg2mg, mg2hf and hf2dist run once per number of workers "
                        "(e.g. 1,2,4,8); a scaling table follows")
    p.add_argument("--kernel-copy", default="on", choices=["on", "off", "both"],
                   type=str, help="hf2mg, mg2hf and mg2mg with the kernel-copy path (on, the converter's default), "
                                  "with --no-kernel-copy (off), or each both ways")
    p.add_argument("--cache", default="warm", choices=["warm", "cold"],
                   help="warm: read the step's source before each timed run; cold: empty the page cache instead "
                        "(root only; the converter's own code is read back), so the source comes from the disk")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="also draw the table (GB/s per step beside cp -r, and the --workers scaling) as a PNG")
    p.add_argument("--converter", default=str(REPO / "convert_ckpt.py"), help="the convert_ckpt.py to time")
    p.add_argument("--clean", action="store_true", help="also delete the generated HF checkpoint at the end")
    p.add_argument("--generate-only", action="store_true", help="make the checkpoint and stop")
    args = p.parse_args(argv)
    args.kernel_copy = {"on": [True], "off": [False], "both": [True, False]}[args.kernel_copy]
    if args.cache == "cold" and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        p.error("--cache cold: emptying the page cache needs root (/proc/sys/vm/drop_caches is not writable)")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    steps = STEPS if not args.only else tuple(s.strip() for s in args.only.split(",") if s.strip())
    bad = [s for s in steps if s not in STEPS]
    if bad:
        p.error(f"--only {','.join(bad)}: unknown step (choose from {','.join(STEPS)})")
    shape_name = "quick" if args.quick else "quick-moe" if args.quick_moe else args.shape
    shape = SHAPES[shape_name]
    family = FAMILIES[shape["family"]]
    experts = shape.get("num_local_experts", 0)
    for flag, key, default in (("--layout", "layout", family["hf2mg"]),
                               ("--mg2mg-layout", "mg2mg_layout", family["mg2mg"])):
        if getattr(args, key) is None:
            setattr(args, key, default)
        ep = getattr(args, key)[2]
        if experts and experts % ep:
            p.error(f"{flag} {fmt_layout(getattr(args, key), True)}: EP {ep} does not divide the {experts} experts "
                    f"of {shape_name}")
        if not experts and ep > 1:
            p.error(f"{flag} {fmt_layout(getattr(args, key), True)}: {shape_name} has no experts (EP must be 1)")
    bench = Bench(args, shape_name, shape)

    # disk: the checkpoint, plus one output, and the source checkpoint beside it for the steps that read one
    weights = sum(nbytes_bf16(d) for _, d in hf_tensors(shape))
    bench.work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(bench.work).free
    alive = 2 if set(steps) - {"copy", "hf2mg"} or args.repeat > 1 else 1  # a kept source beside an output
    need = (0 if (bench.hf / "bench_meta.json").is_file() else weights) + (alive * weights if not args.generate_only else 0)
    if free < need * 1.05:
        log(f"error: {bench.work}: {fmt_bytes(free)} free, the benchmark needs about {fmt_bytes(int(need * 1.05))}")
        return 2

    hf_bytes, reused = ensure_hf_checkpoint(bench.hf, shape_name, shape)
    if reused:
        log(f"reusing {bench.hf} ({fmt_bytes(hf_bytes)})")
    if args.generate_only:
        return 0
    remove(bench.runs)  # outputs of earlier runs
    bench.runs.mkdir(parents=True)
    info = machine()
    planned = [bench.plan(key, workers, copying) for key in steps
               for workers in (args.workers if key in SHARED_STEPS else [1])
               for copying in (args.kernel_copy if key in KERNEL_COPY_STEPS else [True])]
    try:
        # round by round (every step's first run, then every step's second...): a machine whose
        # speed drifts during the benchmark then slows every step alike, not all runs of one
        for k in range(args.repeat):
            for step in planned:
                bench.run(step, k)
        results = [bench.summary(step) for step in planned]
    finally:
        remove(bench.runs)
        if args.clean:
            remove(bench.hf)

    copy = next((r for r in results if r["step"] == "copy" and r["status"] == "ok"), None)
    ffn = (f"{experts} experts (top-{shape['num_experts_per_tok']}) of ffn {shape['intermediate_size']}, "
           f"{fmt_bytes(experts_bytes_per_layer(shape))} a layer" if experts else f"ffn {shape['intermediate_size']}")
    dims = (f"{shape['family']}, hidden {shape['hidden_size']}, {ffn}, {shape['num_hidden_layers']} layers, "
            f"{shape['num_attention_heads']} heads / {shape['num_key_value_heads']} kv, vocab {shape['vocab_size']}, "
            f"bf16, {fmt_bytes(hf_bytes)} on disk")
    header = (f"shape: {shape_name} ({dims})\n"
              f"machine: {info['cpus_usable']} cores ({info['cpu']}), {info['ram_bytes'] / 2**30:.1f} GiB RAM, "
              f"Linux {info['kernel']}, Python {info['python']}\n"
              f"{args.cache} page cache; wall = fastest good run of {args.repeat}; memory = peak over good runs, "
              f"whole process tree sampled every {args.interval * 1000:.0f} ms")
    text = header + "\n\n" + table(results, copy["wall_s"] if copy else None)
    if len(args.workers) > 1:
        text += "\n\n" + scaling_table(results, info["cpus_usable"])
    print(text)
    if args.plot:
        from plot import render  # bench/plot.py, beside this script

        Path(args.plot).write_bytes(render(results, f"{shape_name}: {dims}"))
        log(f"chart: {args.plot}")
    if args.json:
        record = {"shape": shape_name, "dims": shape, "hf_bytes": hf_bytes, "machine": info, "repeat": args.repeat,
                  "interval_s": args.interval, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "steps": results,
                  "table": text}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
