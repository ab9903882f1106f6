"""MoE and MLA families with expert parallelism: bit-exact round trips, resharding between expert
layouts / EP sizes / MLA spellings, the rank-file layout, and one-line errors.

Logit parity with Megatron-Core for these families is in test_mcore_parity.py.
"""

import shutil

import pytest
import torch
from hf_builders import with_mtp_layer
from util import (assert_one_line_error, assert_same_checkpoint, assert_same_tensors, hf_to_mg, load_hf_state,
                  load_mg_state, mg_to_hf, mg_to_mg, run_cli)

from modellink_ckpt.cli.convert import convert
from modellink_ckpt.demo.models import build_hf_checkpoint

FAMILIES = ("mixtral", "qwen2-moe", "qwen3-moe", "deepseek2-lite", "deepseek3")
MLA = ("deepseek2-lite", "deepseek3")

TP2_EP2_PP2 = ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2",
               "--target-pipeline-parallel-size", "2"]
GROUPED_EP2_NOOP = ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2", "--moe-grouped-gemm",
                    "--target-pipeline-parallel-size", "2", "--noop-layers", "1,3"]
TE_GROUPED_ETP1_VPP = ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "4",
                       "--expert-tensor-parallel-size", "1", "--moe-grouped-gemm",
                       "--transformer-impl", "transformer_engine", "--target-pipeline-parallel-size", "2",
                       "--num-layers-per-virtual-pipeline-stage", "1"]
UNEVEN_EP4_MCORE_MLA = ["--target-expert-parallel-size", "4", "--target-pipeline-parallel-size", "2",
                        "--num-layer-list", "1,3", "--mla-spelling", "mcore"]

LAYOUTS = {"tp2ep2pp2": TP2_EP2_PP2, "grouped-noop": GROUPED_EP2_NOOP, "te-grouped-etp1-vpp": TE_GROUPED_ETP1_VPP,
           "uneven-ep4-mcore-mla": UNEVEN_EP4_MCORE_MLA}
FAST = {("mixtral", "grouped-noop"), ("deepseek3", "tp2ep2pp2"), ("qwen2-moe", "te-grouped-etp1-vpp")}


def _cases():
    for family in FAMILIES:
        for name in LAYOUTS:
            marks = () if (family, name) in FAST else (pytest.mark.slow,)
            yield pytest.param(family, name, id=f"{family}-{name}", marks=marks)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """One tiny bf16 checkpoint per family (4 layers, 4 or 8 experts), built once."""
    root = tmp_path_factory.mktemp("moe_hf")
    return lambda family: build_hf_checkpoint(family, root / family, dtype=torch.bfloat16, num_layers=4,
                                              tokenizer=False) if not (root / family).exists() else root / family


@pytest.mark.parametrize("family,layout", list(_cases()))
def test_round_trip_is_bit_exact(tmp_path, hf_models, family, layout):
    hf = hf_models(family)
    mg = hf_to_mg(hf, tmp_path / "mg", family, *LAYOUTS[layout])
    back = mg_to_hf(mg, tmp_path / "back", family)
    assert_same_tensors(load_hf_state(hf), load_hf_state(back), f"{family} {layout}")
    verified = run_cli("--verify", mg)
    assert verified.returncode == 0, verified.stderr


def _expert_keys(state: dict, layer: int) -> list[str]:
    return sorted(k for k in state if k.startswith(f"decoder.layers.{layer}.mlp.experts."))


def test_rank_files_hold_the_experts_of_their_ep_rank(tmp_path, hf_models):
    """EP rank r holds experts [r*E/EP, (r+1)*E/EP) under local indices; everything else is copied
    into every EP rank's file; grouped GEMM stacks transposed per-expert shards (megatron-format §8)."""
    hf = hf_models("mixtral")
    hf_state = load_hf_state(hf)
    experts = sum(1 for k in hf_state if k.startswith("model.layers.0.") and k.endswith(".w1.weight"))
    ep = 2
    per_rank = experts // ep
    plain = load_mg_state(hf_to_mg(hf, tmp_path / "plain", "mixtral", "--target-expert-parallel-size", str(ep),
                                   "--target-tensor-parallel-size", "2"))
    grouped = load_mg_state(hf_to_mg(hf, tmp_path / "grouped", "mixtral", "--target-expert-parallel-size", str(ep),
                                     "--target-tensor-parallel-size", "2", "--moe-grouped-gemm"))
    assert sorted(plain) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    for tp in range(2):
        for r in range(ep):
            state = plain[f"mp_rank_{tp:02d}_{r:03d}"]["model"]
            assert _expert_keys(state, 0) == sorted(f"decoder.layers.0.mlp.experts.local_experts.{j}.linear_fc{k}.weight"
                                                    for j in range(per_rank) for k in (1, 2))
            for j in range(per_rank):
                e = r * per_rank + j
                gate = hf_state[f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight"]
                up = hf_state[f"model.layers.0.block_sparse_moe.experts.{e}.w3.weight"]
                down = hf_state[f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"]
                fc1 = state[f"decoder.layers.0.mlp.experts.local_experts.{j}.linear_fc1.weight"]
                half = gate.shape[0] // 2
                assert torch.equal(fc1, torch.cat([gate[tp * half:(tp + 1) * half], up[tp * half:(tp + 1) * half]]))
                fc2 = state[f"decoder.layers.0.mlp.experts.local_experts.{j}.linear_fc2.weight"]
                assert torch.equal(fc2, down[:, tp * half:(tp + 1) * half])
                g = grouped[f"mp_rank_{tp:02d}_{r:03d}"]["model"]
                hidden = gate.shape[1]
                assert torch.equal(g["decoder.layers.0.mlp.experts.weight1"].view(per_rank, hidden, -1)[j].t(), fc1)
                assert torch.equal(g["decoder.layers.0.mlp.experts.weight2"].view(per_rank, -1, hidden)[j].t(), fc2)
            other = plain[f"mp_rank_{tp:02d}_{1 - r:03d}"]["model"]
            for name in ("decoder.layers.0.mlp.router.weight", "decoder.layers.0.self_attention.linear_qkv.weight",
                         "embedding.word_embeddings.weight"):
                assert torch.equal(state[name], other[name])
    args = plain["mp_rank_00_000"]["args"]
    assert (args.num_experts, args.expert_model_parallel_size, args.moe_grouped_gemm) == (experts, ep, False)
    assert grouped["mp_rank_00_000"]["args"].moe_grouped_gemm is True


@pytest.mark.parametrize("family", [pytest.param("mixtral"), pytest.param("deepseek3"),
                                    pytest.param("qwen2-moe", marks=pytest.mark.slow)])
def test_mg_to_mg_between_expert_layouts_equals_direct(tmp_path, hf_models, family):
    """Each step changes the expert layout, the EP size and (for MLA) the spelling; each result
    equals converting the HF model straight to that target."""
    hf = hf_models(family)
    chain = [TP2_EP2_PP2, GROUPED_EP2_NOOP, TE_GROUPED_ETP1_VPP, UNEVEN_EP4_MCORE_MLA, ["--target-expert-parallel-size", "1"]]
    previous = hf_to_mg(hf, tmp_path / "step0", family, *chain[0])
    for step, flags in enumerate(chain[1:], start=1):
        current = mg_to_mg(previous, tmp_path / f"step{step}", family, *flags)
        assert_same_checkpoint(current, hf_to_mg(hf, tmp_path / f"direct{step}", family, *flags))
        previous = current


def test_mla_spellings(tmp_path, hf_models):
    hf = hf_models("deepseek3")
    hf_state = load_hf_state(hf)
    mindspeed = load_mg_state(hf_to_mg(hf, tmp_path / "ms", "deepseek3", "--target-tensor-parallel-size", "2"))
    mcore = load_mg_state(hf_to_mg(hf, tmp_path / "mc", "deepseek3", "--target-tensor-parallel-size", "2",
                                   "--mla-spelling", "mcore"))
    q_a = hf_state["model.layers.0.self_attn.q_a_proj.weight"]
    kv_a = hf_state["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    q_b = hf_state["model.layers.0.self_attn.q_b_proj.weight"]
    for tp in range(2):
        ms = mindspeed[f"mp_rank_{tp:02d}"]["model"]
        mc = mcore[f"mp_rank_{tp:02d}"]["model"]
        assert torch.equal(ms["decoder.layers.0.self_attention.linear_qkv.weight"], torch.cat([q_a, kv_a]))  # replicated
        assert torch.equal(mc["decoder.layers.0.self_attention.linear_q_down_proj.weight"], q_a)
        assert torch.equal(mc["decoder.layers.0.self_attention.linear_kv_down_proj.weight"], kv_a)
        for state in (ms, mc):
            assert torch.equal(state["decoder.layers.0.self_attention.linear_q_up_proj.weight"], q_b.chunk(2)[tp])
        assert "decoder.layers.0.self_attention.linear_qkv.weight" not in mc
    assert mcore["mp_rank_00"]["args"].mla_spelling == "mcore"


def _fails(argv, *, fragment):
    result = run_cli(*argv)
    line = assert_one_line_error(result.returncode, result.stderr, " ".join(map(str, argv)))
    assert result.returncode == 2, line
    assert fragment in line, line


def test_clear_errors(tmp_path, hf_models):
    mixtral, deepseek = hf_models("mixtral"), hf_models("deepseek3")
    dense = build_hf_checkpoint("llama2", tmp_path / "dense", num_layers=2, tokenizer=False)
    base = ["--load-model-type", "hf", "--save-model-type", "mg", "--save-dir", tmp_path / "out"]
    _fails([*base, "--model-type-hf", "mixtral", "--load-dir", mixtral, "--target-expert-parallel-size", "3"],
           fragment="--target-expert-parallel-size 3 does not divide the 4 experts")
    _fails([*base, "--model-type-hf", "llama2", "--load-dir", dense, "--target-expert-parallel-size", "2"],
           fragment="the model has no experts")
    _fails([*base, "--model-type-hf", "llama2", "--load-dir", dense, "--moe-grouped-gemm"],
           fragment="--moe-grouped-gemm: the model has no experts")
    _fails([*base, "--model-type-hf", "mixtral", "--load-dir", mixtral, "--moe-grouped-gemm", "--save-lora-to-hf"],
           fragment="--save-lora-to-hf and --moe-grouped-gemm are exclusive")
    _fails([*base, "--model-type-hf", "deepseek3", "--load-dir", deepseek, "--target-tensor-parallel-size", "3"],
           fragment="does not divide the 4 attention heads")
    _fails([*base, "--model-type-hf", "mixtral", "--load-dir", mixtral, "--target-tensor-parallel-size", "2",
            "--expert-tensor-parallel-size", "3"], fragment="--expert-tensor-parallel-size 3: must be 1 or")
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_expert_rank_files(tmp_path, hf_models, capsys):
    convert(["--load-model-type", "hf", "--save-model-type", "mg", "--model-type-hf", "mixtral",
             "--load-dir", str(hf_models("mixtral")), "--save-dir", str(tmp_path / "out"),
             "--target-expert-parallel-size", "2", "--target-pipeline-parallel-size", "2", "--dry-run"])
    out = capsys.readouterr().out
    assert "EP2" in out and "mp_rank_00_001_001/model_optim_rng.pt" in out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", [pytest.param(f, marks=() if f == "deepseek3" else pytest.mark.slow) for f in FAMILIES])
def test_hf_output_without_original_config(tmp_path, family):
    """mg -> hf with no config.json at hand: the config built from the stored args gives a model
    transformers loads and that computes the original logits."""
    from modellink_ckpt.demo.models import hf_logits, sample_tokens

    hf = build_hf_checkpoint(family, tmp_path / "hf", tokenizer=False)
    out = mg_to_hf(hf_to_mg(hf, tmp_path / "mg", family), tmp_path / "out", family)
    tokens = sample_tokens(503)
    assert torch.equal(hf_logits(hf, tokens), hf_logits(out, tokens))


@pytest.mark.parametrize("spelling", ["mindspeed", "mcore"])
def test_deepseek3_mtp_layers_round_trip(tmp_path, hf_models, spelling):
    hf, layers = with_mtp_layer(hf_models("deepseek3"), tmp_path / "hf")
    flags = [*TP2_EP2_PP2, "--mtp-num-layers", "1", "--mla-spelling", spelling]
    mg = hf_to_mg(hf, tmp_path / "mg", "deepseek3", *flags)
    last = load_mg_state(mg)["mp_rank_01_001_001"]["model"]
    final_norm = "mtp.final_layernorms.0.weight" if spelling == "mindspeed" else "mtp.layers.0.final_layernorm.weight"
    assert {"mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.eh_proj.weight", final_norm} <= set(last)
    assert any(k.startswith("mtp.layers.0.transformer_layer.mlp.experts.local_experts.") for k in last)
    assert load_mg_state(mg)["mp_rank_00_001_001"]["args"].mtp_num_layers == 1
    back = mg_to_hf(mg, tmp_path / "back", "deepseek3")
    assert_same_tensors(load_hf_state(hf), load_hf_state(back), f"MTP {spelling}")
    # --mtp-num-layers 0 leaves the MTP layer out on purpose (without the flag: refused, test_accounting)
    plain = mg_to_hf(hf_to_mg(hf, tmp_path / "mg_plain", "deepseek3", "--mtp-num-layers", "0"), tmp_path / "back_plain",
                     "deepseek3")
    assert not any(k.startswith(f"model.layers.{layers}.") for k in load_hf_state(plain))


def _with_router_dtypes(hf_dir, out_dir, router_dtype: torch.dtype):
    """A copy of a bf16 checkpoint whose routers (`mlp.gate.weight`) are stored in `router_dtype`
    (transformers 5.24 writes DeepSeek-V3's in fp32, older versions in bf16) and whose expert
    score bias is fp32 (as DeepSeek-V3 ships it); everything else bf16."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(hf_dir, out_dir)
    for weights in sorted(out_dir.glob("*.safetensors")):
        state = load_file(weights)
        for name, value in state.items():
            if name.endswith("mlp.gate.weight"):
                state[name] = value.to(router_dtype)
            elif "e_score_correction_bias" in name:
                state[name] = value.float()
            else:
                state[name] = value.to(torch.bfloat16)
        save_file(state, weights, metadata={"format": "pt"})
    return out_dir


def _assert_dtypes(state: dict, router_dtype: torch.dtype, what: str) -> None:
    """Routers in `router_dtype`, expert biases fp32, everything else bf16 (HF or Megatron names)."""
    for name, value in state.items():
        if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
            want = router_dtype
        elif name.endswith(("e_score_correction_bias", "router.expert_bias")):
            want = torch.float32
        else:
            want = torch.bfloat16
        assert value.dtype == want, f"{what}: {name} is {value.dtype}, expected {want}"


@pytest.mark.parametrize("router_dtype", [torch.float32, torch.bfloat16], ids=["fp32-routers", "bf16-routers"])
@pytest.mark.parametrize("spelling", ["mindspeed", "mcore"])
def test_every_tensor_keeps_its_dtype(tmp_path, hf_models, router_dtype, spelling):
    """DeepSeek-V3 with MTP layers, routers fp32 (transformers >= 5.24) or bf16 (older), expert
    bias fp32, the rest bf16: hf -> mg -> mg (other layout) -> hf changes no tensor's dtype, in
    regular and MTP layers alike; --verify accepts every output."""
    hf_mtp, _ = with_mtp_layer(hf_models("deepseek3"), tmp_path / "mtp")
    hf = _with_router_dtypes(hf_mtp, tmp_path / "hf", router_dtype)
    mtp = ["--mtp-num-layers", "1"]
    mg = hf_to_mg(hf, tmp_path / "mg", "deepseek3", *TP2_EP2_PP2, *mtp, "--mla-spelling", spelling)
    for rank, state in load_mg_state(mg).items():
        _assert_dtypes(state["model"], router_dtype, f"hf->mg {rank}")
        assert state["args"].params_dtype == torch.bfloat16
    assert "mtp.layers.0.transformer_layer.mlp.router.weight" in load_mg_state(mg)["mp_rank_00_001_000"]["model"]
    resharded = mg_to_mg(mg, tmp_path / "mg2", "deepseek3", "--target-expert-parallel-size", "4",
                         "--target-pipeline-parallel-size", "1", "--moe-grouped-gemm")
    for rank, state in load_mg_state(resharded).items():
        _assert_dtypes(state["model"], router_dtype, f"mg->mg {rank}")
    back = mg_to_hf(resharded, tmp_path / "back", "deepseek3")
    assert_same_tensors(load_hf_state(hf), load_hf_state(back), "mixed dtypes")
    for folder in (mg, resharded, back):
        verified = run_cli("--verify", folder)
        assert verified.returncode == 0, verified.stderr
    # a cast is a cast of everything, and only when asked
    cast = mg_to_hf(mg, tmp_path / "cast", "deepseek3", "--params-dtype", "fp32")
    assert {t.dtype for t in load_hf_state(cast).values()} == {torch.float32}
