"""REAL MindSpeed-style LoRA checkpoints, written by megatron-core + peft themselves (test helper).

`build_lora_checkpoints(root, tp=2, dtype=torch.float32, lora_only=True)` builds, in `tp` genuine
gloo processes (`mcore_harness.spawn_ranks`), a tiny llama-like megatron-core `GPTModel` (4 layers,
hidden 64, 4 heads / 2 query groups, ffn 96, swiglu, RMSNorm, vocab 250 padded to 256), wraps it
with peft exactly as MindSpeed-LLM does::

    LoraConfig(r, lora_alpha, target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
               lora_dropout=0.0, bias="none", megatron_config=<the TransformerConfig>,
               megatron_core="megatron.core")
    get_peft_model(gpt_model, config)      # peft's LoraParallelLinear around every target

fills base and adapters with seeded random values (lora_B non-zero), runs the LoRA model forward
on `tokens` (logits gathered over TP, fp32) and saves each rank's `GPTModel.state_dict()` (what
Megatron's `state_dict_for_save_checkpoint` stores) in the legacy layout:

    <root>/full/   X.base_layer.weight + X.lora_A.default.weight + X.lora_B.default.weight (+ _extra_state)
    <root>/lora/   only the keys containing "lora" (MindSpeed's --lora-ckpt-filter)
    <root>/base/   the same base model without LoRA (plain X.weight), as pre-training wrote it

(`full/` or `lora/` according to `lora_only`; `base/` always). Values are drawn per tensor from a
generator seeded with (seed, name) as a WHOLE (TP = 1) tensor and then sharded with Megatron's TP
rules (fc1 and its lora_B as [gate_r; up_r]), so the same seed gives the same model at every TP.

peft 0.21.2's Megatron path needs three adaptations on megatron-core 0.16.1; each one only works
around a peft bug, the modules, shapes and keys are peft's own:

1. `dispatch_megatron` reads `kwargs["fan_in_fan_out"]`, which `LoraModel` stopped passing in
   peft 0.19 (KeyError). The config registers peft's own `dispatch_megatron` for megatron's
   Column/RowParallelLinear through `LoraConfig._register_custom_module`, adding that one kwarg.
2. `LoraParallelLinear.update_layer` never sets `lora_bias[adapter]` (since peft 0.14), which the
   default init reads (KeyError): `init_lora_weights=False`; the fixture sets every value anyway.
3. `LoraParallelLinear.forward` computes `lora_B(lora_A(x)) * scaling`, but megatron-core's
   Column/RowParallelLinear return `(output, bias)` (peft <= 0.13 unpacked it; later versions do
   not): a forward hook on the adapter's parallel linear returns `output` alone.
4. (MoE only) peft builds the adapter's parallel linears without the base layer's `is_expert`.
   An expert's `linear_fc2` is a RowParallelLinear that does NOT all-reduce over TP (megatron
   leaves that sum to the token dispatcher, `explicit_expert_comm`), but peft's `lora_A` under it
   does: at TP > 1 every TP rank adds the WHOLE delta and the dispatcher's sum counts it TP times
   (the forward computes W2 + TP * scale * B @ A, while peft's own `merge` adds scale * B @ A
   once). The fixture gives the adapter's parallel linears the base layer's `is_expert` /
   `explicit_expert_comm` (a no-op at TP 1).

Mixture of experts: `build_moe_lora_checkpoints(root, tp=1, ep=2, ...)` does the same for a tiny
Mixtral-like model (`MOE_SIZES`: 4 layers, every one MoE, 4 experts top-2, softmax router
renormalised over the top-k, expert ffn 48, no shared expert; `family="qwen2-moe"`: q/k/v bias,
no renormalisation, one shared expert of ffn 96 behind a sigmoid gate, see `MOE_FAMILIES`), in
TP * EP gloo processes (the data-parallel size is EP). The model is built from the stored `args`
through the harness's own `transformer_config_from_args` (SequentialMLP experts, allgather
dispatcher, fp32 router), so args and model agree. Expert TP is TP (megatron's default): peft
builds the adapters' parallel linears on the dense TP group, so with expert TP 1 at TP 2 the
expert's whole output (2F rows) meets a lora_B output split over TP (2F/2 rows) and peft's forward
fails with a size mismatch; no such LoRA checkpoint can be trained this way. peft's suffix match
wraps every expert's `linear_fc1` / `linear_fc2` too::

    decoder.layers.{i}.mlp.experts.local_experts.{j}.linear_fc1.lora_A.default.weight   [r, H]
    decoder.layers.{i}.mlp.experts.local_experts.{j}.linear_fc1.lora_B.default.weight   [2F/TP, r]
    decoder.layers.{i}.mlp.experts.local_experts.{j}.linear_fc2.lora_A.default.weight   [r, F/TP]
    decoder.layers.{i}.mlp.experts.local_experts.{j}.linear_fc2.lora_B.default.weight   [H, r]
    (+ linear_fc1.lora_B.default._extra_state, linear_fc2.lora_A.default._extra_state: the
    adapters' megatron parallel linears; a full checkpoint also has linear_fc{1,2}.base_layer.*)

with `j` local to the EP rank (global expert `e = ep_rank * E / EP + j`); the shared expert's are
`decoder.layers.{i}.mlp.shared_experts.linear_fc{1,2}.lora_{A,B}.default.weight`. The router
(`mlp.router.weight`) and the shared-expert gate (`mlp.shared_experts.gate_weight`) are not
parallel linears and are not wrapped. Values are seeded by the GLOBAL expert name, so the same
seed gives the same model at every TP / EP. Rank folders are `mp_rank_TT[_EEE]` (`_EEE` only when
EP > 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import os
import re
import shutil
import zlib
from pathlib import Path

import mcore_harness
import torch

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
SIZES = dict(num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
             kv_channels=16, vocab_size=250, max_position_embeddings=128)
# Mixtral-like: every layer MoE, no dense MLP (ffn_hidden_size = the expert ffn, as in Mixtral)
MOE_SIZES = dict(SIZES, ffn_hidden_size=48, num_experts=4, moe_ffn_hidden_size=48, moe_router_topk=2)
# the MoE model of each family (`build_moe_lora_checkpoints(family=...)`): ModelDims fields
MOE_FAMILIES = {
    # Mixtral: softmax -> top-k -> renormalise, no shared expert
    "mixtral": dict(num_experts=4, moe_ffn_hidden_size=48, moe_router_topk=2, router_pre_softmax=False),
    # Qwen2-MoE: q/k/v bias, softmax over all experts without renormalisation (norm_topk_prob False),
    # one shared expert (ffn 96) behind a sigmoid gate
    "qwen2-moe": dict(num_experts=4, moe_ffn_hidden_size=48, moe_router_topk=2, router_pre_softmax=True,
                      shared_expert_ffn_hidden_size=96, shared_expert_gate=True, add_qkv_bias=True),
}
DIVISIBLE_BY = 128
ITERATION = 1


@dataclasses.dataclass
class LoraFixture:
    root: Path
    tp: int
    dtype: torch.dtype
    r: int
    alpha: float
    target_modules: tuple[str, ...]
    base_dir: Path              # plain base checkpoint (X.weight)
    full_dir: Path | None       # base_layer + lora (lora_only=False)
    lora_dir: Path | None       # LoRA-only (lora_only=True)
    tokens: torch.Tensor
    logits: torch.Tensor        # the peft-wrapped megatron model's logits [b, s, padded vocab], fp32
    base_logits: torch.Tensor   # the same model with the adapters disabled
    keys: list[str]             # rank 0's keys of the LoRA checkpoint as saved (full or filtered)
    vocab_size: int
    padded_vocab_size: int
    ep: int = 1
    num_experts: int = 0
    family: str = "llama2"      # --model-type-hf of the model
    rank_keys: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # rank folder -> saved keys

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    @property
    def lora_load(self) -> Path:
        """What `--lora-load` points at."""
        return self.full_dir if self.full_dir is not None else self.lora_dir


def make_fixture_args(tp: int, dtype: torch.dtype, lora: tuple[int, float, tuple] | None, *, ep: int = 1,
                      moe: bool | str = False) -> argparse.Namespace:
    """The `args` a MindSpeed run stores: the converter's own `make_args` fields (+ the LoRA ones).
    `moe`: a `MOE_FAMILIES` name (True: "mixtral"), the `MOE_SIZES` model of that family
    (model_type_hf the family), at expert-parallel size `ep`."""
    from modellink_ckpt.formats.megatron.args import make_args
    from modellink_ckpt.model.families import ModelDims
    from modellink_ckpt.model.layout import ParallelLayout

    family = ("mixtral" if moe is True else moe) if moe else "llama2"
    sizes = MOE_SIZES if moe else SIZES
    experts = {"add_qkv_bias": False, **MOE_FAMILIES[family], "moe_layers": tuple(range(sizes["num_layers"])),
               "router_score_function": "softmax"} if moe else {"add_qkv_bias": False}
    dims = ModelDims(num_layers=sizes["num_layers"], hidden_size=sizes["hidden_size"],
                     ffn_hidden_size=sizes["ffn_hidden_size"], num_attention_heads=sizes["num_attention_heads"],
                     num_query_groups=sizes["num_query_groups"], kv_channels=sizes["kv_channels"],
                     vocab_size=sizes["vocab_size"], max_position_embeddings=sizes["max_position_embeddings"],
                     norm_epsilon=1e-5, rotary_base=10000.0, tie_word_embeddings=False,
                     add_dense_bias=False, qk_layernorm=False, swiglu=True, **experts)
    layout = ParallelLayout.build(dims.num_layers, tp=tp, ep=ep, num_heads=dims.num_attention_heads,
                                  num_query_groups=dims.num_query_groups, num_experts=dims.num_experts)
    if "spelling" in inspect.signature(make_args).parameters:
        from modellink_ckpt.formats.megatron.names import Spelling

        impl = {"spelling": Spelling(transformer_impl="local")}
    else:
        impl = {"transformer_impl": "local"}
    args = make_args(dims, layout, padded_vocab=layout.padded_vocab(dims.vocab_size, DIVISIBLE_BY),
                     divisible_by=DIVISIBLE_BY, dtype=dtype, model_type_hf=family,
                     iteration=ITERATION, **impl)
    if lora is not None:
        args.lora_r, args.lora_alpha, args.lora_target_modules = lora[0], lora[1], list(lora[2])
    return args


# ---- values ------------------------------------------------------------------------------------

_TARGET_PARAM = re.compile(r"\.(?P<leaf>linear_qkv|linear_proj|linear_fc1|linear_fc2)\."
                           r"(?:(?:base_layer\.)?(?P<param>weight|bias)|lora_(?P<ab>[AB])\.[^.]+\.weight)$")


def shard_rule(name: str) -> str:
    """How `name` (a GPTModel parameter, LoRA-wrapped or not) is split over TP."""
    if name.endswith(("word_embeddings.weight", "output_layer.weight")):
        return "column"
    match = _TARGET_PARAM.search(name)
    if match is None:
        return "replicated"
    leaf, ab = match["leaf"], match["ab"]
    column = leaf in ("linear_qkv", "linear_fc1")
    if match["param"] == "bias":  # split like the output rows (row-parallel: whole)
        return ("gated_column" if leaf == "linear_fc1" else "column") if column else "replicated"
    if ab is None:  # the base weight
        return ("gated_column" if leaf == "linear_fc1" else "column") if column else "row"
    if column:  # lora_A whole, lora_B split like the base rows
        return "replicated" if ab == "A" else ("gated_column" if leaf == "linear_fc1" else "column")
    return "row" if ab == "A" else "replicated"


def full_value(name: str, shape, seed: int, r: int) -> torch.Tensor:
    """The whole (TP = 1) value of parameter `name`, from a generator seeded by (seed, name)."""
    canonical = name.replace(".base_layer.", ".")
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(canonical.encode())) % (2 ** 63))
    x = torch.randn(tuple(shape), generator=generator)
    if name.endswith("layernorm.weight"):
        return 1.0 + 0.1 * x
    if name.endswith(".bias"):
        return 0.1 * x
    if ".lora_A." in name:
        return x / math.sqrt(shape[1])
    if ".lora_B." in name:
        return 0.2 * x / math.sqrt(r)
    if name.endswith("word_embeddings.weight"):
        return x
    return x / math.sqrt(shape[1])


def shard_of(full: torch.Tensor, rule: str, tp: int, rank: int) -> torch.Tensor:
    from modellink_ckpt.model import transforms as T

    split = T.TP_SPLIT[rule][0]
    return T.as_tensor(split(full, tp)[rank]).contiguous()


def full_shape(local_shape, rule: str, tp: int) -> tuple[int, ...]:
    shape = list(local_shape)
    if rule in ("column", "gated_column"):
        shape[0] *= tp
    elif rule == "row":
        shape[1] *= tp
    return tuple(shape)


# ---- the rank worker ---------------------------------------------------------------------------

def wrap_with_peft(model, config, r: int, alpha: float, target_modules=TARGETS, expert_comm_fix: bool = True):
    """peft LoRA around a megatron-core model, the way MindSpeed-LLM does it (+ the fixes in the
    module docstring; `expert_comm_fix=False` leaves out fix 4, for MoE). Returns the PeftModel."""
    from megatron.core import tensor_parallel
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.tp_layer import LoraParallelLinear, dispatch_megatron

    lora_config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0,
                             bias="none", megatron_config=config, megatron_core="megatron.core",
                             init_lora_weights=False)

    def megatron_dispatch(target, adapter_name, config, **kwargs):  # fix 1
        kwargs.setdefault("fan_in_fan_out", config.fan_in_fan_out)
        return dispatch_megatron(target, adapter_name, config, **kwargs)

    lora_config._register_custom_module({tensor_parallel.ColumnParallelLinear: megatron_dispatch,
                                         tensor_parallel.RowParallelLinear: megatron_dispatch})
    peft_model = get_peft_model(model, lora_config)
    parallel = (tensor_parallel.ColumnParallelLinear, tensor_parallel.RowParallelLinear)
    wrapped = 0
    for module in peft_model.modules():
        if isinstance(module, LoraParallelLinear):
            wrapped += 1
            for adapter in (module.lora_A["default"], module.lora_B["default"]):
                if isinstance(adapter, parallel):  # fix 3
                    adapter.register_forward_hook(lambda _module, _inputs, output: output[0])
                    base = module.get_base_layer()
                    if expert_comm_fix and getattr(base, "is_expert", False):  # fix 4
                        adapter.is_expert = True
                        adapter.explicit_expert_comm = base.explicit_expert_comm
    if wrapped == 0:
        raise RuntimeError("peft wrapped no megatron parallel linear layer")
    return peft_model


_LOCAL_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def global_expert_name(name: str, ep_rank: int, local_experts: int) -> str:
    """`...local_experts.{j}...` of EP rank `ep_rank` -> `...local_experts.{ep_rank * E/EP + j}...`
    (the name the value generator is seeded with)."""
    return _LOCAL_EXPERT.sub(lambda m: f".local_experts.{ep_rank * local_experts + int(m[1])}.", name)


def _rank_folder(tp_rank: int, ep_rank: int, ep: int) -> str:
    return f"mp_rank_{tp_rank:02d}" + (f"_{ep_rank:03d}" if ep > 1 else "")


def _save_rank(folder: Path, rank_folder: str, args, state: dict) -> None:
    path = folder / f"iter_{ITERATION:07d}" / rank_folder / mcore_harness.CHECKPOINT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": ITERATION, "model": state}, path)


def _fixture_worker(rank: int, world: int, out_dir: str, payload: dict) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    tp, ep = payload.get("tp", world), payload.get("ep", 1)
    if tp * ep != world:
        raise RuntimeError(f"world {world} != TP {tp} * EP {ep}")
    args, r, alpha, seed = payload["args"], payload["r"], payload["alpha"], payload["seed"]
    _, etp = mcore_harness.expert_sizes(args)
    if ep > 1 or mcore_harness.num_experts(args):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                                 expert_tensor_parallel_size=etp)
    else:
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank() if ep > 1 else 0
    local_experts = (mcore_harness.num_experts(args) or 0) // ep
    dtype = payload["dtype"]
    config = mcore_harness.transformer_config_from_args(args, mcore_harness.layer_slots(args))
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm",
                                      vp_stage=None, pp_rank=0)
    gpt = GPTModel(config, spec, vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                   pre_process=True, post_process=True, share_embeddings_and_output_weights=False,
                   position_embedding_type="rope", rotary_base=int(args.rotary_base))
    peft_model = wrap_with_peft(gpt, config, r, alpha, payload["targets"], payload.get("expert_comm_fix", True))

    with torch.no_grad():
        for name, param in gpt.named_parameters():
            rule = shard_rule(name)
            value = full_value(global_expert_name(name, ep_rank, local_experts), full_shape(param.shape, rule, tp),
                               seed, r)
            value = shard_of(value, rule, tp, tp_rank)
            if value.shape != param.shape:
                raise RuntimeError(f"{name}: shard {tuple(value.shape)} vs parameter {tuple(param.shape)}")
            param.copy_(value.to(dtype).float())  # a bf16 fixture computes with the bf16 values

    tokens = payload["tokens"]
    b, s = tokens.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s)
    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(tokens, position_ids, mask, runtime_gather_output=True)
        with peft_model.disable_adapter():
            base_logits = peft_model(tokens, position_ids, mask, runtime_gather_output=True)

    state = {name: (t.detach().to(dtype).clone() if torch.is_tensor(t) else t) for name, t in gpt.state_dict().items()}
    root = Path(payload["root"])
    folder = _rank_folder(tp_rank, ep_rank, ep)
    if payload["lora_only"]:
        _save_rank(root / "lora", folder, payload["lora_args"], {k: v for k, v in state.items() if "lora" in k})
    else:
        _save_rank(root / "full", folder, payload["lora_args"], state)
    plain = {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora" not in k}
    _save_rank(root / "base", folder, args, plain)
    torch.save(list(state), os.path.join(out_dir, f"keys_{folder}.pt"))
    dist.barrier()
    if rank == 0:
        torch.save({"logits": logits.float().contiguous(), "base_logits": base_logits.float().contiguous(),
                    "keys": list(state), "lora_keys": [k for k in state if "lora" in k]},
                   os.path.join(out_dir, "result.pt"))


def _build(root, *, tp: int, ep: int, moe: bool | str, dtype: torch.dtype, lora_only: bool, tokens, r: int,
           alpha: float, target_modules, seed: int, timeout: float, expert_comm_fix: bool = True) -> LoraFixture:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if tokens is None:
        tokens = torch.randint(0, SIZES["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(seed + 1))
    args = make_fixture_args(tp, dtype, None, ep=ep, moe=moe)
    lora_args = make_fixture_args(tp, dtype, (r, alpha, tuple(target_modules)), ep=ep, moe=moe)
    payload = {"args": args, "lora_args": lora_args, "r": r, "alpha": alpha, "seed": seed, "dtype": dtype,
               "targets": tuple(target_modules), "tokens": tokens.clone(), "lora_only": lora_only, "root": str(root),
               "tp": tp, "ep": ep, "expert_comm_fix": expert_comm_fix}
    out_dir = mcore_harness.spawn_ranks(_fixture_worker, tp * ep, payload, timeout=timeout)
    try:
        result = torch.load(os.path.join(out_dir, "result.pt"), weights_only=True)
        rank_keys = {p.name[len("keys_"):-len(".pt")]: torch.load(p, weights_only=True)
                     for p in sorted(Path(out_dir).glob("keys_*.pt"))}
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    if lora_only:
        rank_keys = {folder: [k for k in keys if "lora" in k] for folder, keys in rank_keys.items()}
    for folder in ("full", "lora", "base"):
        if (root / folder).is_dir():
            (root / folder / mcore_harness.TRACKER_FILE).write_text(str(ITERATION))
    return LoraFixture(root=root, tp=tp, dtype=dtype, r=r, alpha=alpha, target_modules=tuple(target_modules),
                       base_dir=root / "base", full_dir=None if lora_only else root / "full",
                       lora_dir=root / "lora" if lora_only else None, tokens=tokens, logits=result["logits"],
                       base_logits=result["base_logits"],
                       keys=result["lora_keys"] if lora_only else result["keys"],
                       vocab_size=args.vocab_size, padded_vocab_size=args.padded_vocab_size,
                       ep=ep, num_experts=mcore_harness.num_experts(args) or 0,
                       family=args.model_type_hf, rank_keys=rank_keys)


def build_lora_checkpoints(root, *, tp: int = 1, dtype: torch.dtype = torch.float32, lora_only: bool = False,
                           tokens: torch.Tensor | None = None, r: int = 4, alpha: float = 6.0,
                           target_modules=TARGETS, seed: int = 0, timeout: float = 300) -> LoraFixture:
    """Write the checkpoints under `root` (see the module docstring) and return what tests need."""
    return _build(root, tp=tp, ep=1, moe=False, dtype=dtype, lora_only=lora_only, tokens=tokens, r=r, alpha=alpha,
                  target_modules=target_modules, seed=seed, timeout=timeout)


def build_moe_lora_checkpoints(root, *, tp: int = 1, ep: int = 2, dtype: torch.dtype = torch.float32,
                               lora_only: bool = False, tokens: torch.Tensor | None = None, r: int = 4,
                               alpha: float = 6.0, target_modules=TARGETS, seed: int = 0, timeout: float = 300,
                               expert_comm_fix: bool = True, family: str = "mixtral") -> LoraFixture:
    """The MoE model (`MOE_SIZES`, `MOE_FAMILIES[family]`: Mixtral-like by default) in TP * EP
    ranks, LoRA-wrapped by peft (experts included), saved like `build_lora_checkpoints` in
    `mp_rank_TT[_EEE]` folders (see the module docstring); `fixture.rank_keys` holds every rank
    file's keys as saved. `expert_comm_fix=False`: the reference logits of peft's forward without
    fix 4 (wrong at TP > 1, see the docstring)."""
    return _build(root, tp=tp, ep=ep, moe=family, dtype=dtype, lora_only=lora_only, tokens=tokens, r=r, alpha=alpha,
                  target_modules=target_modules, seed=seed, timeout=timeout, expert_comm_fix=expert_comm_fix)


# ---- helpers for the tests ---------------------------------------------------------------------

def rank_files(folder) -> list[Path]:
    it_dir = Path(mcore_harness.iteration_dir(str(folder)))
    return sorted(it_dir.glob(f"mp_rank_*/{mcore_harness.CHECKPOINT_FILE}"))


def base_to_hf(fixture: LoraFixture, save_dir) -> Path:
    """The plain base checkpoint converted to HF by the converter itself (-> `<save_dir>/mg2hf`)."""
    from util import mg_to_hf

    return mg_to_hf(fixture.base_dir, save_dir, fixture.family)
