"""LoRA: merging adapters into Megatron weights (per TP shard, in fp32) and exporting them to PEFT.

The multi-process tests use REAL LoRA checkpoints: megatron-core GPTModels wrapped by peft's
LoraParallelLinear and saved by their ranks (`lora_fixtures`); the merged checkpoint runs in a
plain megatron-core GPTModel, the exported adapter in `peft` on the HF model.
"""

import warnings

import pytest
import torch
from lora_fixtures import base_to_hf, build_lora_checkpoints, full_value, rank_files, shard_of, shard_rule
from util import assert_one_line_error, load_hf_state, run_cli, run_convert

from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats.megatron.lora import (MergedLoraTensor, check_same_layout, merge_adapter_shards, merge_lora,
                                                  spec_from_args)
from modellink_ckpt.formats.torch_zip import load_lazy
from modellink_ckpt.model import mapping
from modellink_ckpt.model import transforms as T
from modellink_ckpt.model.families import ModelDims, load_family
from modellink_ckpt.model.lora import LoraSpec, bf16_ulp, merge_weight, peft_layer_tensors
from modellink_ckpt.savers.peft import write_peft_adapter

SPEC = LoraSpec(4, 6.0)
R = SPEC.r
# layer 0 of the fixture model: H 64, qkv rows (4 + 2*2) * 16 = 128, ffn 96
SHAPES = {"self_attention.linear_qkv": (128, 64), "self_attention.linear_proj": (64, 64),
          "mlp.linear_fc1": (192, 64), "mlp.linear_fc2": (64, 96)}
PREFIX = "decoder.layers.0."


def whole_layer(seed=0):
    """Whole (TP = 1) base weights and adapters of one layer, with their peft key names."""
    base, lora = {}, {}
    for module, (rows, cols) in SHAPES.items():
        name = f"{PREFIX}{module}"
        base[f"{name}.base_layer.weight"] = full_value(f"{name}.base_layer.weight", (rows, cols), seed, R)
        lora[f"{name}.lora_A.default.weight"] = full_value(f"{name}.lora_A.default.weight", (R, cols), seed, R)
        lora[f"{name}.lora_B.default.weight"] = full_value(f"{name}.lora_B.default.weight", (rows, R), seed, R)
    base[f"{PREFIX}input_layernorm.weight"] = torch.ones(64)
    return base, lora


def shard_state(state, tp, rank):
    return {name: shard_of(t, shard_rule(name), tp, rank) for name, t in state.items()}


def whole_merge(base, lora, module, spec=SPEC):
    name = f"{PREFIX}{module}"
    return merge_weight(base[f"{name}.base_layer.weight"], lora[f"{name}.lora_A.default.weight"],
                        lora[f"{name}.lora_B.default.weight"], spec.scale)


def tp_merge(shards, name):
    kind = shard_rule(name)
    return T.TP_SPLIT[kind][1](list(shards))


# ---- merging: pure ------------------------------------------------------------------------------

@pytest.mark.parametrize("tp", [1, 2, 4])
def test_per_shard_merge_equals_whole_merge_fp32(tp):
    base, lora = whole_layer()
    merged_shards = []
    for rank in range(tp):
        models = {"model": {**shard_state(base, tp, rank), **shard_state(lora, tp, rank)}}
        merged_shards.append(merge_lora(models, models, SPEC, "rank.pt")["model"])  # a full checkpoint
    for state in merged_shards:
        assert not any("lora" in k or "base_layer" in k for k in state)
        assert all(isinstance(state[f"{PREFIX}{m}.weight"], MergedLoraTensor) for m in SHAPES)
    for module in SHAPES:
        name = f"{PREFIX}{module}.weight"
        got = tp_merge([s[name].load() for s in merged_shards], f"{PREFIX}{module}.base_layer.weight")
        expected = whole_merge(base, lora, module)
        exact = (base[f"{PREFIX}{module}.base_layer.weight"].double()
                 + SPEC.scale * lora[f"{PREFIX}{module}.lora_B.default.weight"].double()
                 @ lora[f"{PREFIX}{module}.lora_A.default.weight"].double())
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-6, module
        assert (got.double() - exact).abs().max().item() <= 1e-6, module
        assert (got - base[f"{PREFIX}{module}.base_layer.weight"]).abs().max().item() > 1e-2, "LoRA changed nothing"


def test_merged_tensor_reads_rows_lazily_from_files(tmp_path):
    base, lora = whole_layer()
    torch.save({"model": base}, tmp_path / "base.pt")
    torch.save({"model": lora}, tmp_path / "lora.pt")
    lazy_base, lazy_lora = load_lazy(tmp_path / "base.pt"), load_lazy(tmp_path / "lora.pt")
    merged = merge_lora({"model": lazy_base["model"]}, {"model": lazy_lora["model"]}, SPEC, tmp_path / "base.pt",
                        tmp_path / "lora.pt")
    merged_eager = merge_lora({"model": base}, {"model": lora}, SPEC, "base.pt", "lora.pt")
    for module in SHAPES:
        name = f"{PREFIX}{module}.weight"
        tensor = merged["model"][name]
        whole = tensor.load()
        assert torch.equal(whole, merged_eager["model"][name].load())
        assert tensor.shape == whole.shape and tensor.dtype == torch.float32 and tensor.nbytes == whole.nbytes
        rows = torch.empty((5, whole.shape[1]), dtype=whole.dtype)
        assert torch.equal(tensor.read_rows(3, 8, rows), whole[3:8])
        with pytest.raises(ConvertError):
            tensor.read_rows(3, 8, torch.empty((5, whole.shape[1]), dtype=torch.bfloat16))


def test_plain_base_and_lora_only_checkpoint_give_the_same_merge():
    base, lora = whole_layer()
    plain = {k.replace(".base_layer.", "."): v for k, v in base.items()}
    models = {"model": {**base, **lora}}
    full = merge_lora(models, models, SPEC, "full.pt")
    split = merge_lora({"model": plain}, {"model": lora}, SPEC, "base.pt", "lora.pt")
    overlay = merge_lora({"model": plain}, models, SPEC, "base.pt", "full.pt")  # a full LoRA checkpoint over a base
    assert sorted(full["model"]) == sorted(split["model"]) == sorted(overlay["model"]) == sorted(plain)
    for name, tensor in full["model"].items():
        value = tensor.load() if hasattr(tensor, "load") else tensor
        for other in (split["model"][name], overlay["model"][name]):
            assert torch.equal(value, other.load() if hasattr(other, "load") else other)


def test_bf16_merge_is_within_one_bf16_ulp_of_the_fp32_exact_merge():
    base, lora = whole_layer(seed=3)
    for adapter_dtype in (torch.bfloat16, torch.float32):
        for module in SHAPES:
            name = f"{PREFIX}{module}"
            weight = base[f"{name}.base_layer.weight"].to(torch.bfloat16)
            a = lora[f"{name}.lora_A.default.weight"].to(adapter_dtype)
            b = lora[f"{name}.lora_B.default.weight"].to(adapter_dtype)
            merged = merge_lora({"model": {f"{name}.weight": weight}},
                                {"model": {f"{name}.lora_A.default.weight": a, f"{name}.lora_B.default.weight": b}},
                                LoraSpec(R, SPEC.alpha, (module.rsplit(".", 1)[-1],)), "b.pt", "l.pt")
            got = merged["model"][f"{name}.weight"].load()
            assert got.dtype == torch.bfloat16
            exact = weight.float() + SPEC.scale * (b.float() @ a.float())  # the fp32-exact merge
            ulp = bf16_ulp(exact)
            assert ((got.double() - exact.double()).abs() <= ulp).all(), module
            assert ((got.double() - exact.double()).abs() <= ulp / 2).all(), module  # rounded once, to nearest
            # the check has teeth: a merge in half precision (delta and sum in bf16) is many ulps off
            naive = weight + (SPEC.scale * (b.to(torch.bfloat16) @ a.to(torch.bfloat16)))
            assert ((naive.double() - exact.double()).abs() > ulp).any(), module


# ---- merging: errors ----------------------------------------------------------------------------

def test_lora_sharded_unlike_the_base_is_a_clear_error():
    base, lora = whole_layer()
    plain = {k.replace(".base_layer.", "."): v for k, v in base.items()}
    lora_tp2_rank0 = shard_state(lora, 2, 0)
    with pytest.raises(ConvertError) as err:
        merge_lora({"model": plain}, {"model": lora_tp2_rank0}, SPEC, "base/mp_rank_00/model_optim_rng.pt",
                   "lora/mp_rank_00/model_optim_rng.pt")
    message = str(err.value)
    assert "lora/mp_rank_00/model_optim_rng.pt" in message and "sharded differently" in message
    assert "decoder.layers.0." in message and "lora_" in message


def test_lora_without_base_weight_is_a_clear_error():
    _, lora = whole_layer()
    with pytest.raises(ConvertError, match=r"lora\.pt: LoRA tensor 'decoder\.layers\.0\..*lora_A.*' has no base weight"):
        merge_lora({"model": {f"{PREFIX}input_layernorm.weight": torch.ones(64)}}, {"model": lora}, SPEC,
                   "base.pt", "lora.pt")


def test_rank_differing_from_lora_r_is_a_clear_error():
    base, lora = whole_layer()
    with pytest.raises(ConvertError, match=r"full\.pt: '.*lora_A\.default\.weight' \[4, 64\] has rank 4, but --lora-r is 8"):
        models = {"model": {**base, **lora}}
        merge_lora(models, models, LoraSpec(8, 16), "full.pt")
    args = type("Args", (), {"lora_r": 4, "lora_alpha": 6.0, "lora_target_modules": ["linear_qkv"]})()
    with pytest.raises(ConvertError, match="trained with lora_r 4, but --lora-r is 8"):
        spec_from_args(args, r=8, source="lora_dir")
    assert spec_from_args(args) == LoraSpec(4, 6.0, ("linear_qkv",))
    assert spec_from_args(args, alpha=12).scale == 3.0
    with pytest.raises(UsageError, match="--lora-r is required"):
        spec_from_args(None, alpha=1)


def test_incomplete_or_unknown_adapters_are_clear_errors():
    base, lora = whole_layer()
    qkv_b = f"{PREFIX}self_attention.linear_qkv.lora_B.default.weight"
    no_b = {k: v for k, v in lora.items() if k != qkv_b}
    with pytest.raises(ConvertError, match="linear_qkv.lora_A.default.weight' has no matching lora_B"):
        merge_lora({"model": base}, {"model": no_b}, SPEC, "base.pt", "lora.pt")
    no_qkv = {k: v for k, v in lora.items() if "linear_qkv" not in k}
    with pytest.raises(ConvertError, match="LoRA-wrapped weight without adapters"):
        merge_lora({"model": base}, {"model": no_qkv}, SPEC, "base.pt", "lora.pt")
    plain = {k.replace(".base_layer.", "."): v for k, v in base.items()}
    with pytest.raises(ConvertError, match="lora.pt: no LoRA adapter for '.*linear_qkv'"):
        merge_lora({"model": plain}, {"model": no_qkv}, SPEC, "base.pt", "lora.pt")
    with pytest.raises(ConvertError, match="not in --lora-target-modules"):
        merge_lora({"model": plain}, {"model": lora}, LoraSpec(4, 6, ("linear_qkv", "linear_fc1")), "b.pt", "l.pt")
    grouped = {"decoder.layers.0.mlp.experts.weight1_lora_a": torch.zeros(4, 64)}
    with pytest.raises(ConvertError, match="grouped-GEMM"):
        merge_lora({"model": plain}, {"model": grouped}, SPEC, "base.pt", "lora.pt")
    with pytest.raises(ConvertError, match="only one adapter"):
        merge_lora({"model": plain}, {"model": {**lora, qkv_b.replace("default", "other"): lora[qkv_b]}}, SPEC,
                   "base.pt", "lora.pt")


def test_layouts_of_lora_and_base_must_match():
    ns = lambda tp, pp: type("Args", (), {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                                          "num_layers": 4})()
    check_same_layout(ns(2, 1), ns(2, 1), "base", "lora")
    with pytest.raises(ConvertError, match="--lora-load lora: tensor_model_parallel_size is 1, but the base "
                                           "checkpoint base has 2"):
        check_same_layout(ns(2, 1), ns(1, 1), "base", "lora")


def test_moe_expert_and_shared_expert_adapters_are_merged():
    torch.manual_seed(0)
    state, expected = {}, {}
    for module, (rows, cols) in {"mlp.experts.local_experts.0.linear_fc1": (32, 64),
                                 "mlp.experts.local_experts.1.linear_fc2": (64, 16),
                                 "mlp.shared_experts.linear_fc1": (48, 64),
                                 "mlp.shared_experts.linear_fc2": (64, 24)}.items():
        name = f"{PREFIX}{module}"
        w, a, b = torch.randn(rows, cols), torch.randn(R, cols), torch.randn(rows, R)
        state.update({f"{name}.base_layer.weight": w, f"{name}.lora_A.default.weight": a,
                      f"{name}.lora_B.default.weight": b})
        expected[f"{name}.weight"] = w + SPEC.scale * (b @ a)
    state[f"{PREFIX}mlp.router.weight"] = torch.randn(2, 64)
    models = {"model": state}
    merged = merge_lora(models, models, LoraSpec(R, 6.0, ("linear_fc1", "linear_fc2")), "ep.pt")["model"]
    assert sorted(merged) == sorted([*expected, f"{PREFIX}mlp.router.weight"])
    for name, value in expected.items():
        assert (merged[name].load() - value).abs().max() <= 1e-5


# ---- export to PEFT: pure -----------------------------------------------------------------------

def _dims(**extra):
    values = dict(num_layers=1, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                  kv_channels=16, vocab_size=250, max_position_embeddings=128, norm_epsilon=1e-5,
                  rotary_base=1e4, tie_word_embeddings=False, add_qkv_bias=False, add_dense_bias=False,
                  qk_layernorm=False, swiglu=True)
    values.update(extra)
    return ModelDims(**values)


def _phi3_like():
    """A family that fuses q/k/v (`pack_gqa`) and gate/up (`gate_up`) in HF, as Phi-3 does."""
    import dataclasses

    family = load_family("llama2")
    return dataclasses.replace(family, name="phi3-like",
                               settings={**family.settings, "qkv_type": "pack_gqa", "fc_type": "gate_up"})


@pytest.mark.parametrize("family_name", ["llama2", "qwen3", "phi3-like", "qwen2-moe"])
def test_peft_adapters_split_exactly_like_the_weights(family_name):
    """For every HF module, B_part @ A equals the HF part of the fused delta B @ A: the adapter
    follows the weight through the same mapping rules."""
    family = _phi3_like() if family_name == "phi3-like" else load_family(family_name)
    moe = family_name == "qwen2-moe"
    dims = _dims(num_experts=2, moe_ffn_hidden_size=32, moe_router_topk=1, moe_layers=(0,),
                 shared_expert_ffn_hidden_size=48, shared_expert_gate=True) if moe else _dims()
    rules = {r.mcore[:-len(".weight")]: r for r in mapping.layer_rules(family, dims, 0)
             if r.mcore.endswith(".weight") and r.mcore.rsplit(".", 2)[-2] in SPEC.target_modules}
    assert len(rules) == (2 + 2 * 2 + 2 if moe else 4)  # attention, 2 routed experts, the shared expert
    torch.manual_seed(1)
    adapters = {module: (torch.randn(R, rule.shape[1]), torch.randn(rule.shape[0], R)) for module, rule in rules.items()}
    tensors = peft_layer_tensors(family, dims, 0, adapters)
    for module, rule in rules.items():
        a, b = adapters[module]
        parts = [T.as_tensor(p) for p in rule.to_hf(b @ a)]
        assert len(parts) == len(rule.hf)
        for hf_name, part in zip(rule.hf, parts):
            peft_name = f"base_model.model.{hf_name[:-len('.weight')]}"
            assert torch.equal(tensors[f"{peft_name}.lora_A.weight"], a)
            delta = tensors[f"{peft_name}.lora_B.weight"] @ tensors[f"{peft_name}.lora_A.weight"]
            assert torch.allclose(delta, part, atol=1e-5), hf_name
    assert len(tensors) == 2 * sum(len(rule.hf) for rule in rules.values())


def test_adapter_shards_merge_with_the_tp_rules():
    base, lora = whole_layer()
    for module in SHAPES:
        a_name, b_name = f"{PREFIX}{module}.lora_A.default.weight", f"{PREFIX}{module}.lora_B.default.weight"
        shards = [shard_state({a_name: lora[a_name], b_name: lora[b_name]}, 2, rank) for rank in range(2)]
        a, b = merge_adapter_shards(module, [s[a_name] for s in shards], [s[b_name] for s in shards])
        assert torch.equal(a, lora[a_name]) and torch.equal(b, lora[b_name]), module


def test_adapter_config_is_peft_own(tmp_path):
    from peft import LoraConfig, PeftConfig

    tensors = peft_layer_tensors(load_family("llama2"), _dims(), 0,
                                 {m: (torch.zeros(R, c), torch.zeros(r, R)) for m, (r, c) in SHAPES.items()})
    out = write_peft_adapter(tmp_path / "adapter", tensors, SPEC, "some/base")
    config = PeftConfig.from_pretrained(str(out))
    assert isinstance(config, LoraConfig)
    assert (config.peft_type, config.task_type, config.r, config.lora_alpha, config.lora_dropout, config.bias) == \
        ("LORA", "CAUSAL_LM", 4, 6, 0.0, "none")
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert config.base_model_name_or_path == "some/base"
    first = (out / "adapter_config.json").read_text()
    write_peft_adapter(tmp_path / "again", tensors, SPEC, "some/base")
    assert (tmp_path / "again" / "adapter_config.json").read_text() == first  # deterministic


# ---- real checkpoints (megatron-core + peft, multi-process) -------------------------------------

def _lora_flags(fixture) -> list[str]:
    """The LoRA flags a MindSpeed-LLM user passes (r, alpha and targets as trained)."""
    return ["--lora-r", str(fixture.r), "--lora-alpha", str(fixture.alpha), "--lora-target-modules",
            *fixture.target_modules]


def _merge(fixture, save_dir, save_type="mg", *flags):
    """The converter's merge: the base in --load-dir, the adapters in it (full LoRA checkpoint) or
    in --lora-load (LoRA-only)."""
    lora_load = [] if fixture.full_dir else ["--lora-load", fixture.lora_dir]
    run_convert("--model-type", "GPT", "--load-model-type", "mg", "--save-model-type", save_type,
                "--model-type-hf", "llama2", "--use-mcore-models", "--load-dir", _base(fixture), *lora_load,
                *_lora_flags(fixture), "--save-dir", save_dir, *flags)
    return save_dir / "mg2hf" if save_type == "hf" else save_dir


def _export(fixture, save_dir):
    """`--save-lora-to-hf`, as in the MindSpeed-LLM documentation; the adapter lands in <save-dir>/mg2hf."""
    from modellink_ckpt.cli.main import summary_line

    result = run_convert("--model-type", "GPT", "--load-model-type", "mg", "--save-model-type", "hf", "--model-type-hf",
                         "llama2", "--use-mcore-models", "--load-dir", fixture.lora_load, *_lora_flags(fixture),
                         "--load-checkpoint-loosely", "--save-lora-to-hf", "--save-dir", save_dir)
    line = summary_line(result)  # done in this process: its own peak, never "loader 0.0 MB / saver 0.0 MB"
    assert line.startswith("done: wrote ") and "peak memory" in line and "0.0 MB" not in line, line
    return save_dir / "mg2hf"


def _peft_model(hf_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    check = model.load_adapter(str(adapter_dir), adapter_name="check")
    assert check.missing_keys == [] and check.unexpected_keys == []
    model.delete_adapter("check")
    model.set_adapter("default")
    return model.eval()


def _base(fixture):
    """A full LoRA checkpoint is its own base (`X.base_layer.weight`); LoRA-only needs the plain one."""
    return fixture.full_dir or fixture.base_dir


def _check_merged_mcore(fixture, tmp_path, target_tp=None):
    """Merged by the converter into a plain checkpoint at `target_tp` (default: the source's),
    loaded by megatron-core with strict=True: the LoRA-wrapped model's logits."""
    from mcore_harness import mcore_logits

    target_tp = target_tp or fixture.tp
    merged = _merge(fixture, tmp_path / f"merged_tp{target_tp}", "mg", "--target-tensor-parallel-size", str(target_tp))
    for path in rank_files(merged):
        assert not any("lora" in k or "base_layer" in k for k in torch.load(path, weights_only=False)["model"])
    vocab = fixture.vocab_size  # the merged output's padding follows its own TP
    got = mcore_logits(merged, fixture.tokens)[..., :vocab]
    diff = (got - fixture.logits[..., :vocab]).abs().max().item()
    assert diff <= 1e-4, f"merged TP{fixture.tp} -> TP{target_tp} checkpoint: max |logit diff| {diff:.3g}"
    assert (fixture.logits - fixture.base_logits).abs().max().item() > 0.1  # the adapters matter
    return merged


def _check_peft_export(fixture, tmp_path):
    hf_dir = base_to_hf(fixture, tmp_path / "hf")
    adapter = _export(fixture, tmp_path / "adapter")
    with torch.no_grad():
        logits = _peft_model(hf_dir, adapter)(fixture.tokens).logits
    diff = (logits - fixture.logits[..., :fixture.vocab_size]).abs().max().item()
    assert diff <= 1e-4, f"PEFT adapter exported from TP{fixture.tp}: max |logit diff| {diff:.3g}"
    return hf_dir, adapter


def test_tp2_lora_only_checkpoint_merges_and_exports(tmp_path):
    """TP2 (two gloo ranks), LoRA-only + plain base: the merged checkpoint in megatron-core and the
    exported adapter in peft both give the peft-wrapped Megatron model's logits."""
    fixture = build_lora_checkpoints(tmp_path / "ckpt", tp=2, lora_only=True)
    assert fixture.keys and all("lora" in k for k in fixture.keys)
    _check_merged_mcore(fixture, tmp_path, target_tp=1)  # merged per TP2 shard, written at TP1
    _check_peft_export(fixture, tmp_path)
    # adapters outside --lora-target-modules: an error for the export as for the merge, never dropped

    for save_type, extra in (("hf", ["--save-lora-to-hf"]), ("mg", ["--lora-load", fixture.lora_dir])):
        load = fixture.lora_dir if extra[0] == "--save-lora-to-hf" else fixture.base_dir
        result = run_cli("--load-model-type", "mg", "--save-model-type", save_type, "--load-dir", load, *extra,
                         "--lora-r", fixture.r, "--lora-alpha", fixture.alpha, "--lora-target-modules", "linear_qkv",
                         "linear_proj", "--save-dir", tmp_path / f"partial-{save_type}")
        line = assert_one_line_error(result.returncode, result.stderr, save_type)
        assert "linear_fc1" in line and "--lora-target-modules" in line, line


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_full_lora_checkpoint_merges_and_exports(tmp_path, tp):
    fixture = build_lora_checkpoints(tmp_path / "ckpt", tp=tp, lora_only=False)
    assert any(k.endswith(".base_layer.weight") for k in fixture.keys)
    _check_merged_mcore(fixture, tmp_path)
    _check_peft_export(fixture, tmp_path)


@pytest.mark.slow
def test_tp1_lora_only_checkpoint_merges(tmp_path):
    _check_merged_mcore(build_lora_checkpoints(tmp_path / "ckpt", tp=1, lora_only=True), tmp_path)


@pytest.mark.slow
def test_merged_hf_equals_peft_merge_and_unload(tmp_path):
    """Our merge, converted to HF by the converter, equals peft's own merge of the exported adapter
    into the HF base, tensor by tensor, and has its logits."""
    fixture = build_lora_checkpoints(tmp_path / "ckpt", tp=2, lora_only=False)
    hf_merged = _merge(fixture, tmp_path / "hf_merged", "hf")  # mg (TP2, with adapters) -> merged HF
    hf_dir, adapter = _check_peft_export(fixture, tmp_path)
    peft_merged = _peft_model(hf_dir, adapter).merge_and_unload()
    ours = load_hf_state(hf_merged)
    theirs = {k: v for k, v in peft_merged.state_dict().items()}
    assert sorted(ours) == sorted(theirs)
    differ = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    worst = max([(ours[k] - theirs[k]).abs().max().item() for k in differ], default=0.0)
    assert not differ, f"merged HF vs peft merge_and_unload: {len(differ)} tensors differ, by up to {worst:.3g}"
    with torch.no_grad():
        logits = peft_merged(fixture.tokens).logits
    assert (logits - fixture.logits[..., :fixture.vocab_size]).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_bf16_checkpoint_merge_is_within_one_ulp(tmp_path):
    fixture = build_lora_checkpoints(tmp_path / "ckpt", tp=2, dtype=torch.bfloat16, lora_only=False)
    spec = LoraSpec(fixture.r, fixture.alpha, fixture.target_modules)
    merged = _merge(fixture, tmp_path / "merged", "mg", "--target-tensor-parallel-size", "2")
    checked = 0
    for source, result in zip(rank_files(fixture.full_dir), rank_files(merged)):
        state = torch.load(source, weights_only=False)["model"]
        out = torch.load(result, weights_only=False)["model"]
        for name, weight in state.items():
            if not name.endswith(".base_layer.weight"):
                continue
            module = name[:-len(".base_layer.weight")]
            a, b = state[f"{module}.lora_A.default.weight"], state[f"{module}.lora_B.default.weight"]
            assert weight.dtype == a.dtype == torch.bfloat16
            exact = weight.float() + spec.scale * (b.float() @ a.float())
            got = out[f"{module}.weight"]
            assert got.dtype == torch.bfloat16
            assert ((got.double() - exact.double()).abs() <= bf16_ulp(exact)).all(), name
            checked += 1
    assert checked == 2 * 4 * 4
