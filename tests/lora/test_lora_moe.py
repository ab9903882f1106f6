"""LoRA on mixture-of-experts models: adapters on every routed expert, merged and exported.

The checkpoints are REAL: a Mixtral-like megatron-core GPTModel (4 MoE layers, 4 experts top-2,
SequentialMLP experts) wrapped by peft's LoraParallelLinear and saved by its own ranks at EP2 (and
TP2 x EP2) in `mp_rank_TT[_EEE]` folders (`lora_fixtures.build_moe_lora_checkpoints`). peft's
suffix match wraps each expert's `linear_fc1` / `linear_fc2` as well as the attention; rank file
`mp_rank_TT_EEE` holds, per layer i and LOCAL expert j < E/EP (global expert e = EEE * E/EP + j)::

    decoder.layers.{i}.mlp.experts.local_experts.{j}.linear_fc1.lora_A.default.weight     [r, H]
    decoder.layers.{i}.mlp.experts.local_experts.{j}.linear_fc1.lora_B.default.weight     [2F/TP, r]  ([gate_t; up_t])
    decoder.layers.{i}.mlp.experts.local_experts.{j}.linear_fc1.lora_B.default._extra_state
    decoder.layers.{i}.mlp.experts.local_experts.{j}.linear_fc2.lora_A.default.weight     [r, F/TP]
    decoder.layers.{i}.mlp.experts.local_experts.{j}.linear_fc2.lora_A.default._extra_state
    decoder.layers.{i}.mlp.experts.local_experts.{j}.linear_fc2.lora_B.default.weight     [H, r]

(the `_extra_state` entries belong to the adapter's megatron parallel linears; a full checkpoint
has `...linear_fc{1,2}.base_layer.weight` / `._extra_state` too). Multi-process tests other than
the first are marked slow.

Checked here:
- the merge (`--lora-load` / full checkpoint, then mg -> mg at another EP / TP) runs in plain
  megatron-core with the LoRA-wrapped model's logits (fp32, 1e-4);
- `--save-lora-to-hf` writes one PEFT module per HF expert weight
  (`base_model.model.model.layers.{i}.block_sparse_moe.experts.{e}.w1|w2|w3.lora_A|B.weight`,
  e global, w1/w3 taking the gate/up halves of linear_fc1's B and both the same A), with exactly
  the trained values; applied by hand to the converter's HF base, W + alpha/r * B @ A per HF weight
  in fp32, it gives the converter's own merged HF output tensor by tensor. That is exact up to the
  summation order of B @ A, so the tolerance is 1e-6 relative to the tensor's largest value;
- peft 0.21.2 + transformers 5 CAN load that adapter into `MixtralForCausalLM`, although
  transformers 5 fuses the experts into 3-D parameters (`mlp.experts.gate_up_proj` [E, 2F, H],
  `mlp.experts.down_proj` [E, H, F]) and no `w1/w2/w3` modules exist: transformers' PEFT weight
  conversion turns the per-expert `w1/w3` / `w2` adapters into `target_parameters` LoRA on the fused
  parameters (`mlp.experts.base_layer.lora_A.default.weight` [E * 2r, H] for gate_up_proj, rank 2r
  and alpha 2 * alpha through `rank_pattern` / `alpha_pattern`; `mlp.experts.lora_A.default.weight`
  [E * r, F] for down_proj), no key is missing or unexpected (peft only warns that the
  `.*\\.gate_up_proj` rank/alpha patterns "did not match any targeted module", which is wrong: they
  are used), the q/k/v/o adapters load as they are, the logits are the Megatron model's, and
  `merge_and_unload()` equals the converter's merged HF model exactly;
- Qwen2-MoE-like (shared expert, slow): the same for the merge and the export (shared expert ->
  `mlp.shared_expert.gate_proj|up_proj|down_proj`), but peft 0.21.2 + transformers 5 DROP the
  routed-expert adapters of `Qwen2MoeForCausalLM`: transformers renames their keys to the fused
  form while peft converts the adapter config for Mixtral only, so `load_adapter` reports
  `...mlp.experts.{lora_A,lora_B,base_layer.lora_A,base_layer.lora_B}.weight` as unexpected and
  `from_pretrained` loads the rest without any warning (asserted precisely below);
- peft's unpatched forward at TP > 1 counts an expert linear_fc2's delta TP times (slow; why the
  fixture needs its fix 4).
"""

from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

import pytest
import torch
from lora_fixtures import MOE_FAMILIES, MOE_SIZES, base_to_hf, build_moe_lora_checkpoints, full_value, rank_files
from safetensors.torch import load_file
from util import load_hf_state, report_lines, run_convert

LOGIT_TOL = 1e-4
REL_TOL = 1e-6  # hand-applied adapter vs the converter's merge: fp32, summation order only
LAYERS, EXPERTS = MOE_SIZES["num_layers"], MOE_SIZES["num_experts"]
HIDDEN, FFN = MOE_SIZES["hidden_size"], MOE_SIZES["moe_ffn_hidden_size"]
PEFT = "base_model.model."
SEED = 0  # the fixtures' default seed (expected adapter values are recomputed from it)
# HF module names of one routed expert (gate, up, down) and of the shared expert, per family
HF_EXPERTS = {"mixtral": ("model.layers.{i}.block_sparse_moe.experts.{e}.", ("w1", "w3", "w2")),
              "qwen2-moe": ("model.layers.{i}.mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj"))}
HF_SHARED = {"qwen2-moe": "model.layers.{i}.mlp.shared_expert."}


def _lora_flags(fixture) -> list[str]:
    return ["--lora-r", str(fixture.r), "--lora-alpha", str(fixture.alpha), "--lora-target-modules",
            *fixture.target_modules]


def _common(fixture) -> list[str]:
    return ["--model-type", "GPT", "--load-model-type", "mg", "--model-type-hf", fixture.family, "--use-mcore-models"]


def _merge(fixture, save_dir: Path, save_type: str = "mg", *flags) -> Path:
    """The converter's merge: base in --load-dir (a full LoRA checkpoint is its own base), the
    adapters in it or in --lora-load."""
    base = fixture.full_dir or fixture.base_dir
    lora_load = [] if fixture.full_dir else ["--lora-load", fixture.lora_dir]
    run_convert(*_common(fixture), "--save-model-type", save_type, "--load-dir", base, *lora_load,
                *_lora_flags(fixture), "--save-dir", save_dir, *flags)
    return save_dir / "mg2hf" if save_type == "hf" else save_dir


def _export(fixture, save_dir: Path) -> Path:
    run_convert(*_common(fixture), "--save-model-type", "hf", "--load-dir", fixture.lora_load, *_lora_flags(fixture),
                "--load-checkpoint-loosely", "--save-lora-to-hf", "--save-dir", save_dir)
    return save_dir / "mg2hf"


def _timed(times: dict, what: str, fn, *args, **kwargs):
    started = time.monotonic()
    result = fn(*args, **kwargs)
    times[what] = time.monotonic() - started
    return result


# ---- the checks -----------------------------------------------------------------------------------

def _shared_ffn(fixture) -> int:
    return MOE_FAMILIES[fixture.family].get("shared_expert_ffn_hidden_size", 0)


def expected_expert_lora_keys(fixture, *, extra_state: bool = True) -> set[str]:
    """The expert LoRA keys peft gives every rank file (local expert indices; shared experts too)."""
    modules = [f"mlp.experts.local_experts.{j}." for j in range(EXPERTS // fixture.ep)]
    if _shared_ffn(fixture):
        modules.append("mlp.shared_experts.")
    keys = set()
    for i in range(LAYERS):
        for module in modules:
            prefix = f"decoder.layers.{i}.{module}"
            keys |= {f"{prefix}linear_fc{k}.lora_{ab}.default.weight" for k in (1, 2) for ab in "AB"}
            if extra_state:
                keys |= {f"{prefix}linear_fc1.lora_B.default._extra_state",
                         f"{prefix}linear_fc2.lora_A.default._extra_state"}
    return keys


def check_fixture_keys(fixture) -> None:
    folders = sorted(f"mp_rank_{t:02d}" + (f"_{e:03d}" if fixture.ep > 1 else "")
                     for t in range(fixture.tp) for e in range(fixture.ep))
    assert sorted(fixture.rank_keys) == folders
    assert [p.parent.name for p in rank_files(fixture.lora_load)] == folders
    assert [p.parent.name for p in rank_files(fixture.base_dir)] == folders
    for folder, keys in fixture.rank_keys.items():
        experts = {k for k in keys if (".mlp.experts." in k or ".mlp.shared_experts." in k) and ".lora_" in k}
        assert experts == expected_expert_lora_keys(fixture), folder
        assert not any(("router" in k or "gate_weight" in k) and "lora" in k for k in keys), "not parallel linears"
        assert any("self_attention.linear_qkv.lora_A" in k for k in keys)
        if fixture.full_dir:
            assert any(k.endswith("local_experts.0.linear_fc1.base_layer.weight") for k in keys)


def check_merged_mcore(fixture, save_dir: Path, *, tp: int, ep: int) -> float:
    """Merged by the converter at TP `tp` / EP `ep`, run by megatron-core (strict load): the
    LoRA-wrapped model's logits. Returns the max |logit diff|."""
    from mcore_harness import mcore_logits, read_args

    merged = _merge(fixture, save_dir, "mg", "--target-tensor-parallel-size", str(tp),
                    "--target-expert-parallel-size", str(ep))
    folders = sorted(f"mp_rank_{t:02d}" + (f"_{e:03d}" if ep > 1 else "") for t in range(tp) for e in range(ep))
    assert [p.parent.name for p in rank_files(merged)] == folders
    for path in rank_files(merged):
        state = torch.load(path, weights_only=False)["model"]
        assert not any("lora" in k or "base_layer" in k for k in state), path
        assert sum(".local_experts." in k for k in state) == LAYERS * (EXPERTS // ep) * 2, path
    args = read_args(merged)
    assert (args.num_experts, args.expert_model_parallel_size, args.tensor_model_parallel_size) == (EXPERTS, ep, tp)
    vocab = fixture.vocab_size
    got = mcore_logits(merged, fixture.tokens)[..., :vocab]
    diff = (got - fixture.logits[..., :vocab]).abs().max().item()
    assert diff <= LOGIT_TOL, f"merged TP{fixture.tp}xEP{fixture.ep} -> TP{tp}xEP{ep}: max |logit diff| {diff:.3g}"
    assert (fixture.logits - fixture.base_logits).abs().max().item() > 0.1  # the adapters matter
    return diff


def _hf_module(peft_name: str) -> str:
    return peft_name[len(PEFT):].rsplit(".lora_", 1)[0]


def _fc_adapters(fixture, mg_module: str, ffn: int) -> dict[str, torch.Tensor]:
    """The trained whole adapters of a (global) Megatron expert module, from the fixture's seed."""
    r = fixture.r
    return {"fc1_A": full_value(f"{mg_module}linear_fc1.lora_A.default.weight", (r, HIDDEN), SEED, r),
            "fc1_B": full_value(f"{mg_module}linear_fc1.lora_B.default.weight", (2 * ffn, r), SEED, r),
            "fc2_A": full_value(f"{mg_module}linear_fc2.lora_A.default.weight", (r, ffn), SEED, r),
            "fc2_B": full_value(f"{mg_module}linear_fc2.lora_B.default.weight", (HIDDEN, r), SEED, r)}


def check_exported_adapter(fixture, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Key set and shapes of the PEFT adapter; the expert adapters hold exactly the trained values
    (global expert index, gate/up halves of fc1's B, the same A for both)."""
    r = fixture.r
    expert_template, (gate, up, down) = HF_EXPERTS[fixture.family]
    shared_template, shared_ffn = HF_SHARED.get(fixture.family), _shared_ffn(fixture)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    expected, values = {}, {}
    heads, groups, kv = MOE_SIZES["num_attention_heads"], MOE_SIZES["num_query_groups"], MOE_SIZES["kv_channels"]
    for i in range(LAYERS):
        attn = f"model.layers.{i}.self_attn."
        for proj, rows, cols in (("q_proj", heads * kv, HIDDEN), ("k_proj", groups * kv, HIDDEN),
                                 ("v_proj", groups * kv, HIDDEN), ("o_proj", HIDDEN, heads * kv)):
            expected[f"{PEFT}{attn}{proj}.lora_A.weight"] = (r, cols)
            expected[f"{PEFT}{attn}{proj}.lora_B.weight"] = (rows, r)
        mlps = [(expert_template.format(i=i, e=e), f"decoder.layers.{i}.mlp.experts.local_experts.{e}.", FFN, gate, up,
                 down) for e in range(EXPERTS)]
        if shared_template:
            mlps.append((shared_template.format(i=i), f"decoder.layers.{i}.mlp.shared_experts.", shared_ffn,
                         "gate_proj", "up_proj", "down_proj"))
        for hf, mg, ffn, g, u, d in mlps:
            for w, rows, cols in ((g, ffn, HIDDEN), (u, ffn, HIDDEN), (d, HIDDEN, ffn)):
                expected[f"{PEFT}{hf}{w}.lora_A.weight"] = (r, cols)
                expected[f"{PEFT}{hf}{w}.lora_B.weight"] = (rows, r)
            trained = _fc_adapters(fixture, mg, ffn)
            values.update({f"{PEFT}{hf}{g}.lora_A.weight": trained["fc1_A"],
                           f"{PEFT}{hf}{g}.lora_B.weight": trained["fc1_B"][:ffn],
                           f"{PEFT}{hf}{u}.lora_A.weight": trained["fc1_A"],
                           f"{PEFT}{hf}{u}.lora_B.weight": trained["fc1_B"][ffn:],
                           f"{PEFT}{hf}{d}.lora_A.weight": trained["fc2_A"],
                           f"{PEFT}{hf}{d}.lora_B.weight": trained["fc2_B"]})
    assert sorted(tensors) == sorted(expected)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert all(t.dtype == torch.float32 for t in tensors.values())
    for name, value in values.items():
        assert torch.equal(tensors[name], value), name
    return tensors


def _routed(name: str) -> bool:
    return re.search(r"\.experts\.\d+\.", name) is not None


def check_hand_applied_adapter(fixture, base_hf: Path, merged_hf: Path, tensors: dict) -> float:
    """W + alpha/r * B @ A (fp32) for every adapted HF weight of the converter's base == the
    converter's merged HF output; every other tensor is the base's. Returns the max relative diff."""
    base, merged = load_hf_state(base_hf), load_hf_state(merged_hf)
    assert sorted(base) == sorted(merged)
    adapted = {_hf_module(name) for name in tensors}
    assert {f"{m}.weight" for m in adapted} <= set(base), sorted(adapted)[:3]
    worst = 0.0
    for name, weight in base.items():
        module = name[:-len(".weight")] if name.endswith(".weight") else None
        assert merged[name].dtype == weight.dtype == torch.float32, name
        if module not in adapted:
            assert torch.equal(merged[name], weight), f"{name}: not adapted, but changed by the merge"
            continue
        a, b = tensors[f"{PEFT}{module}.lora_A.weight"], tensors[f"{PEFT}{module}.lora_B.weight"]
        expected = weight + fixture.scale * (b @ a)
        rel = ((merged[name] - expected).abs().max() / expected.abs().max()).item()
        assert rel <= REL_TOL, f"{name}: merged HF vs base + alpha/r * B @ A: relative diff {rel:.3g}"
        assert (merged[name] - weight).abs().max().item() > 1e-2, f"{name}: the adapter changed nothing"
        worst = max(worst, rel)
    routed = [n for n in base if _routed(n)]
    assert len(routed) == LAYERS * EXPERTS * 3 and all(n[:-len(".weight")] in adapted for n in routed)
    return worst


def _load_peft(base_hf: Path, adapter_dir: Path):
    """PeftModel.from_pretrained + a second load_adapter (which reports missing / unexpected keys);
    returns (model, load result, warning messages)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_hf), dtype=torch.float32)
    params = dict(base.named_parameters())
    assert tuple(params["model.layers.0.mlp.experts.gate_up_proj"].shape) == (EXPERTS, 2 * FFN, HIDDEN)
    assert tuple(params["model.layers.0.mlp.experts.down_proj"].shape) == (EXPERTS, HIDDEN, FFN)
    assert not any(_routed(n + ".") for n, _ in base.named_modules())  # no per-expert modules in transformers 5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(adapter_dir))
        check = model.load_adapter(str(adapter_dir), adapter_name="check")
    model.delete_adapter("check")
    model.set_adapter("default")
    return model.eval(), check, [str(w.message) for w in caught]


def _check_loaded_as_exported(state: dict, tensors: dict, modules) -> None:
    for i in range(LAYERS):
        for module in modules:
            for ab in "AB":
                name = f"model.layers.{i}.{module}.lora_{ab}"
                assert torch.equal(state[f"{PEFT}{name}.default.weight"], tensors[f"{PEFT}{name}.weight"]), name


def _logit_diffs(model, fixture, reference) -> dict:
    vocab = fixture.vocab_size
    with torch.no_grad():
        logits = model(fixture.tokens).logits
        with model.disable_adapter():
            base_logits = model(fixture.tokens).logits
    return {"peft logits": (logits - reference).abs().max().item(),
            "peft disabled logits": (base_logits - fixture.base_logits[..., :vocab]).abs().max().item()}


def _max_rel(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)).item() for k in b)


def check_peft_loads_mixtral_adapter(fixture, base_hf: Path, adapter_dir: Path, merged_hf: Path,
                                     tensors: dict) -> dict:
    """peft + transformers 5 on `MixtralForCausalLM` (fused experts): everything loads (through
    peft's v4 -> v5 MoE conversion), with the Megatron model's logits, and `merge_and_unload()`
    equals the converter's merge. Returns the measured diffs."""
    from transformers import AutoModelForCausalLM

    model, check, messages = _load_peft(base_hf, adapter_dir)
    assert type(model.get_base_model()).__name__ == "MixtralForCausalLM"
    assert not [m for m in messages if "missing adapter keys" in m or "unexpected" in m.lower()], messages
    # peft's only complaint: the rank/alpha patterns of the converted gate_up_proj adapters "did
    # not match any targeted module" (they are used: see the shapes and logits below)
    unmatched = [m for m in messages if "did not match any targeted module" in m]
    assert all("gate_up_proj" in m for m in unmatched), unmatched
    assert check.missing_keys == [] and check.unexpected_keys == []

    config = model.peft_config["default"]
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert set(config.target_parameters) == {"gate_up_proj", "down_proj"}
    assert config.rank_pattern == {r".*\.gate_up_proj": 2 * fixture.r}
    assert config.alpha_pattern == {r".*\.gate_up_proj": 2 * fixture.alpha}
    state = model.state_dict()
    attention = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    loaded = sorted(k for k in state if ".lora_" in k)
    assert loaded == sorted(f"{PEFT}model.layers.{i}.{m}.lora_{ab}.default.weight" for i in range(LAYERS)
                            for ab in "AB" for m in (*attention, "mlp.experts.base_layer", "mlp.experts"))
    r, layer0 = fixture.r, f"{PEFT}model.layers.0.mlp.experts."
    assert tuple(state[f"{layer0}base_layer.lora_A.default.weight"].shape) == (EXPERTS * 2 * r, HIDDEN)  # gate_up
    assert tuple(state[f"{layer0}base_layer.lora_B.default.weight"].shape) == (2 * FFN, EXPERTS * 2 * r)
    assert tuple(state[f"{layer0}lora_A.default.weight"].shape) == (EXPERTS * r, FFN)  # down_proj
    assert tuple(state[f"{layer0}lora_B.default.weight"].shape) == (HIDDEN, EXPERTS * r)
    _check_loaded_as_exported(state, tensors, attention)

    diffs = _logit_diffs(model, fixture, fixture.logits[..., :fixture.vocab_size])
    assert diffs["peft logits"] <= LOGIT_TOL and diffs["peft disabled logits"] <= LOGIT_TOL, diffs
    ours = AutoModelForCausalLM.from_pretrained(str(merged_hf), dtype=torch.float32).state_dict()
    diffs["merge_and_unload rel"] = _max_rel(model.merge_and_unload().state_dict(), ours)
    assert diffs["merge_and_unload rel"] <= REL_TOL, diffs
    return diffs


def check_peft_drops_qwen2_moe_routed_experts(fixture, base_hf: Path, adapter_dir: Path, merged_hf: Path,
                                              tensors: dict, scratch: Path) -> dict:
    """peft 0.21.2 + transformers 5 on `Qwen2MoeForCausalLM`: transformers converts the routed
    experts' adapter keys to the fused form, but peft converts the CONFIG for Mixtral only
    (`_MODEL_TO_CONVERSION_PATTERN` has no qwen2_moe), so nothing targets the fused parameters: the
    routed-expert adapters are reported as unexpected keys and dropped (no warning from
    `from_pretrained`). The attention and shared-expert adapters load as exported, and the model
    is exactly the converter's merge with the routed experts left at the base."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model, check, messages = _load_peft(base_hf, adapter_dir)
    assert type(model.get_base_model()).__name__ == "Qwen2MoeForCausalLM"
    assert not [m for m in messages if "unexpected" in m.lower() or "experts" in m], messages  # silently
    assert check.missing_keys == []
    assert sorted(check.unexpected_keys) == sorted(
        f"{PEFT}model.layers.{i}.mlp.experts.{m}.weight" for i in range(LAYERS)
        for m in ("lora_A", "lora_B", "base_layer.lora_A", "base_layer.lora_B"))
    config = model.peft_config["default"]
    assert not config.target_parameters
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    state = model.state_dict()
    attention = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    shared = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj")
    assert sorted(k for k in state if ".lora_" in k) == sorted(
        f"{PEFT}model.layers.{i}.{m}.lora_{ab}.default.weight" for i in range(LAYERS) for ab in "AB"
        for m in (*attention, *shared))
    _check_loaded_as_exported(state, tensors, attention + shared)

    # the converter's merge with the routed experts put back to the base weights
    partial = scratch / "merged_without_routed"
    partial.mkdir(parents=True)
    for item in merged_hf.iterdir():
        if item.name.endswith(".json"):
            (partial / item.name).write_bytes(item.read_bytes())
    merged, base = load_hf_state(merged_hf), load_hf_state(base_hf)
    save_file({k: (base[k] if _routed(k) else v).contiguous() for k, v in merged.items()},
              str(partial / "model.safetensors"), metadata={"format": "pt"})
    reference_model = AutoModelForCausalLM.from_pretrained(str(partial), dtype=torch.float32).eval()
    with torch.no_grad():
        reference = reference_model(fixture.tokens).logits
    diffs = _logit_diffs(model, fixture, reference)
    diffs["peft vs LoRA model"] = (model(fixture.tokens).logits.detach()
                                   - fixture.logits[..., :fixture.vocab_size]).abs().max().item()
    assert diffs["peft logits"] <= LOGIT_TOL and diffs["peft disabled logits"] <= LOGIT_TOL, diffs
    assert diffs["peft vs LoRA model"] > 0.1, diffs  # the routed-expert adapters are missing
    diffs["merge_and_unload rel"] = _max_rel(model.merge_and_unload().state_dict(), reference_model.state_dict())
    assert diffs["merge_and_unload rel"] <= REL_TOL, diffs
    return diffs


def check_export(fixture, tmp_path: Path, times: dict) -> dict:
    base_hf = _timed(times, "mg->hf base", base_to_hf, fixture, tmp_path / "hf_base")
    adapter = _timed(times, "--save-lora-to-hf", _export, fixture, tmp_path / "adapter")
    merged_hf = _timed(times, "mg->hf merged", _merge, fixture, tmp_path / "hf_merged", "hf")
    tensors = check_exported_adapter(fixture, adapter)
    diffs = {"hand-applied rel": check_hand_applied_adapter(fixture, base_hf, merged_hf, tensors)}
    if fixture.family == "mixtral":
        diffs.update(_timed(times, "peft load+checks", check_peft_loads_mixtral_adapter, fixture, base_hf, adapter,
                            merged_hf, tensors))
    else:
        diffs.update(_timed(times, "peft load+checks", check_peft_drops_qwen2_moe_routed_experts, fixture, base_hf,
                            adapter, merged_hf, tensors, tmp_path / "partial"))
    return diffs


def _report(request, what: str, diffs: dict, times: dict) -> None:
    report_lines(request, [f"{what}: " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()),
                           f"{what} timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items())])


# ---- tests ----------------------------------------------------------------------------------------

def test_ep2_lora_only_checkpoint_merges_and_exports(tmp_path, request):
    """EP2 (two gloo ranks), LoRA-only + plain base: merged into EP1, megatron-core gives the
    LoRA-wrapped model's logits; the PEFT export is per expert and equals the converter's merge."""
    times = {}
    fixture = _timed(times, "fixture EP2", build_moe_lora_checkpoints, tmp_path / "ckpt", tp=1, ep=2, lora_only=True)
    check_fixture_keys(fixture)
    diffs = {"EP2->EP1 mcore": _timed(times, "merge+mcore EP1", check_merged_mcore, fixture, tmp_path / "ep1",
                                      tp=1, ep=1)}
    diffs.update(check_export(fixture, tmp_path, times))
    _report(request, "EP2 lora-only", diffs, times)


@pytest.mark.slow
def test_ep2_full_checkpoint_merges_into_tp2_ep2(tmp_path, request):
    times = {}
    fixture = _timed(times, "fixture EP2", build_moe_lora_checkpoints, tmp_path / "ckpt", tp=1, ep=2, lora_only=False)
    check_fixture_keys(fixture)
    diffs = {"EP2->TP2xEP2 mcore": _timed(times, "merge+mcore TP2xEP2", check_merged_mcore, fixture,
                                          tmp_path / "tp2ep2", tp=2, ep=2)}
    _report(request, "EP2 full", diffs, times)


@pytest.mark.slow
def test_tp2_ep2_checkpoint_merges_and_exports(tmp_path, request):
    """TP2 x EP2 (four gloo ranks, expert TP 2), full LoRA checkpoint."""
    times = {}
    fixture = _timed(times, "fixture TP2xEP2", build_moe_lora_checkpoints, tmp_path / "ckpt", tp=2, ep=2,
                     lora_only=False)
    check_fixture_keys(fixture)
    diffs = {"TP2xEP2->EP1 mcore": _timed(times, "merge+mcore EP1", check_merged_mcore, fixture, tmp_path / "ep1",
                                          tp=1, ep=1),
             "TP2xEP2->TP2xEP2 mcore": _timed(times, "merge+mcore TP2xEP2", check_merged_mcore, fixture,
                                              tmp_path / "tp2ep2", tp=2, ep=2)}
    diffs.update(check_export(fixture, tmp_path, times))
    _report(request, "TP2xEP2 full", diffs, times)


@pytest.mark.slow
def test_unpatched_peft_forward_counts_expert_fc2_delta_tp_times(tmp_path, request):
    """Why the fixture needs fix 4 (lora_fixtures docstring): without it, peft's forward at TP2
    is the model whose expert linear_fc2 deltas are doubled, i.e. W2 + TP * alpha/r * B @ A
    (shown by merging a copy of the checkpoint whose expert fc2 lora_B are multiplied by TP); the
    converter merges W2 + alpha/r * B @ A, as peft's own `merge` does."""
    from mcore_harness import mcore_logits

    tp = 2
    fixed = build_moe_lora_checkpoints(tmp_path / "fixed", tp=tp, ep=1, lora_only=True)
    unfixed = build_moe_lora_checkpoints(tmp_path / "unfixed", tp=tp, ep=1, lora_only=True, expert_comm_fix=False)
    assert (fixed.base_logits - unfixed.base_logits).abs().max().item() <= 1e-5
    apart = (fixed.logits - unfixed.logits).abs().max().item()
    assert apart > 0.1
    for path in rank_files(unfixed.lora_dir):  # scale the expert fc2 adapters by TP
        checkpoint = torch.load(path, weights_only=False)
        for name, tensor in checkpoint["model"].items():
            if ".local_experts." in name and name.endswith("linear_fc2.lora_B.default.weight"):
                checkpoint["model"][name] = tensor * tp
        torch.save(checkpoint, path)
    merged = _merge(unfixed, tmp_path / "merged", "mg", "--target-tensor-parallel-size", "1")
    vocab = unfixed.vocab_size
    diff = (mcore_logits(merged, unfixed.tokens)[..., :vocab] - unfixed.logits[..., :vocab]).abs().max().item()
    assert diff <= LOGIT_TOL, diff
    report_lines(request, [f"unpatched peft TP2: fixed vs unfixed forward {apart:.3g}; unfixed vs merge with "
                           f"TP * expert fc2 delta {diff:.3g}"])


@pytest.mark.slow
def test_qwen2_moe_tp2_ep2_shared_expert_checkpoint_merges_and_exports(tmp_path, request):
    """Qwen2-MoE-like (q/k/v bias, shared expert behind a sigmoid gate, no top-k renormalisation),
    TP2 x EP2, full LoRA checkpoint: the shared expert's linear_fc1 / linear_fc2 are LoRA-wrapped
    too (`mlp.shared_experts.linear_fc{1,2}.lora_*`) and exported as `mlp.shared_expert.*_proj`."""
    times = {}
    fixture = _timed(times, "fixture TP2xEP2", build_moe_lora_checkpoints, tmp_path / "ckpt", tp=2, ep=2,
                     lora_only=False, family="qwen2-moe")
    assert fixture.family == "qwen2-moe"
    check_fixture_keys(fixture)
    assert "decoder.layers.0.self_attention.linear_qkv.base_layer.bias" in fixture.keys
    diffs = {"TP2xEP2->EP1 mcore": _timed(times, "merge+mcore EP1", check_merged_mcore, fixture, tmp_path / "ep1",
                                          tp=1, ep=1)}
    diffs.update(check_export(fixture, tmp_path, times))
    _report(request, "qwen2-moe TP2xEP2 full", diffs, times)
