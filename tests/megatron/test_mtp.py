"""Multi-token prediction (DeepSeek-V3's MTP layer) in the legacy torch format at PP > 1: the
stage holding the MTP layers carries its own copy of the word embedding, the final norms are
named as each spelling's model defines them (Megatron-Core 0.16.1's `decoder.final_layernorm` /
`mtp.layers.<k>.final_layernorm`, MindSpeed-LLM's top-level `final_layernorm` /
`mtp.final_layernorms.<k>`), and the stored args rebuild the model that loads the files.

The consumer is megatron-core itself: a GPTModel with the MTP block on its last chunk, built from
the stored args alone, loads every rank strictly and gives transformers' main-head logits."""

import shutil
import subprocess

import pytest
import torch
from hf_builders import with_mtp_layer
from mcore_harness import mcore_logits, read_args
from safetensors.torch import load_file, save_file
from util import (assert_one_line_error, assert_same_tensors, cli_argv, hf_to_mg, load_hf_state, load_mg_state,
                  mg_to_hf, mg_to_mg, run_cli)

from modellink_ckpt.demo.models import build_hf_checkpoint, hf_logits, sample_tokens
from modellink_ckpt.formats.megatron.args import module_contradictions

PP2 = ["--target-pipeline-parallel-size", "2", "--target-expert-parallel-size", "2"]
PP2_VPP2 = ["--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]
MTP = ["--mtp-num-layers", "1"]


@pytest.fixture(scope="module")
def hf_mtp(tmp_path_factory):
    """A tiny DeepSeek-V3 (MLA, sigmoid router with bias, 4 layers, the first dense) with one MTP layer."""
    root = tmp_path_factory.mktemp("mtp")
    base = build_hf_checkpoint("deepseek3", root / "base", tokenizer=False)
    return with_mtp_layer(base, root / "hf")[0]


def _last_chunk(mg, layout: str) -> dict:
    """The model dict of the chunk holding the MTP layers (TP rank 0, EP rank 0)."""
    states = load_mg_state(mg)
    rank = "mp_rank_00_001_000" if layout == "pp2" else "mp_rank_00_001"
    return states[rank]["model" if layout == "pp2" else "model1"]


@pytest.mark.parametrize("spelling", ["mcore", "mindspeed"])
@pytest.mark.parametrize("layout", ["pp2", "pp2vpp2"])
def test_megatron_core_loads_mtp_output_at_pp2_and_vpp_and_matches_transformers(tmp_path, hf_mtp, layout, spelling):
    flags = {"pp2": PP2, "pp2vpp2": PP2_VPP2}[layout]
    mg = hf_to_mg(hf_mtp, tmp_path / "mg", "deepseek3", *flags, *MTP, "--mla-spelling", spelling)
    last = _last_chunk(mg, layout)
    assert "embedding.word_embeddings.weight" in last  # the MTP chunk's own embedding
    norms = {"mcore": {"decoder.final_layernorm.weight", "mtp.layers.0.final_layernorm.weight"},
             "mindspeed": {"final_layernorm.weight", "mtp.final_layernorms.0.weight"}}[spelling]
    assert norms <= set(last) and not ({"decoder.final_layernorm.weight", "final_layernorm.weight",
                                        "mtp.layers.0.final_layernorm.weight", "mtp.final_layernorms.0.weight"}
                                       - norms) & set(last)
    args = read_args(mg)
    assert args.qk_layernorm is True and args.mtp_num_layers == 1  # MLA's q/kv norms exist
    tokens = sample_tokens(503, batch=2, seq=8)
    expected = hf_logits(hf_mtp, tokens)
    got = mcore_logits(mg, tokens)  # every size and flag from the stored args
    diff = (got[..., :expected.shape[-1]] - expected).abs().max().item()
    assert diff <= 1e-4, f"{layout} {spelling}: max |logit diff| {diff:.3g}"
    assert_same_tensors(load_hf_state(hf_mtp), load_hf_state(mg_to_hf(mg, tmp_path / "back", "deepseek3")))
    result = run_cli("verify", mg)
    assert result.returncode == 0, result.stderr


def test_without_the_mtp_chunks_embedding_megatron_core_refuses_the_file(tmp_path, hf_mtp):
    """The consumer check fails when the copy is missing (what this output lacked before)."""
    mg = hf_to_mg(hf_mtp, tmp_path / "mg", "deepseek3", *PP2, *MTP)
    for rank in ("mp_rank_00_001_000", "mp_rank_00_001_001"):
        path = mg / "iter_0000001" / rank / "model_optim_rng.pt"
        state = torch.load(path, weights_only=False)
        del state["model"]["embedding.word_embeddings.weight"]
        torch.save(state, path)
    with pytest.raises(Exception, match=r"Missing key\(s\) in state_dict: \"embedding.word_embeddings.weight\""):
        mcore_logits(mg, sample_tokens(503, batch=1, seq=4))


@pytest.mark.parametrize("spelling", ["mcore", "mindspeed"])
def test_mtp_output_reshards_between_spellings_and_layouts(tmp_path, hf_mtp, spelling):
    """mg -> mg keeps the MTP layer at any layout, in either spelling, and the args agree with it."""
    mg = hf_to_mg(hf_mtp, tmp_path / "mg", "deepseek3", *PP2, *MTP, "--mla-spelling", "mindspeed")
    other = "mcore" if spelling == "mindspeed" else "mindspeed"
    out = mg_to_mg(mg, tmp_path / "out", "deepseek3", *PP2_VPP2, "--mla-spelling", other)
    assert "embedding.word_embeddings.weight" in _last_chunk(out, "pp2vpp2")
    assert module_contradictions(read_args(out), {n for s in load_mg_state(out).values()
                                                  for k, m in s.items() if k.startswith("model") for n in m}) == []
    assert_same_tensors(load_hf_state(hf_mtp), load_hf_state(mg_to_hf(out, tmp_path / "back", "deepseek3")))


def test_stored_args_that_contradict_the_tensors_are_reported_by_verify(tmp_path, hf_mtp):
    mg = hf_to_mg(hf_mtp, tmp_path / "mg", "deepseek3", *PP2, *MTP)
    for path in (mg / "iter_0000001").glob("mp_rank_*/model_optim_rng.pt"):
        state = torch.load(path, weights_only=False)
        state["args"].qk_layernorm = False  # what this tool stored for MLA models before
        state["args"].moe_router_enable_expert_bias = False
        torch.save(state, path)
    result = run_cli("verify", mg, "--no-hash")
    assert result.returncode == 1
    assert "stored args say qk_layernorm=False, but the tensors hold 'decoder.layers.0.self_attention." in result.stderr
    assert "stored args say moe_router_enable_expert_bias=False, but the tensors hold" in result.stderr


def test_an_mtp_layers_own_embedding_that_is_not_a_copy_stops_the_run(tmp_path, hf_mtp):
    source = shutil.copytree(hf_mtp, tmp_path / "hf")
    (weights,) = sorted(source.glob("*.safetensors"))
    state = load_file(weights)
    state["model.layers.4.embed_tokens.weight"][7, 3] += 1
    save_file(state, weights, metadata={"format": "pt"})
    result = subprocess.run(cli_argv("hf", "mg", source, tmp_path / "mg", *MTP, "--model-type-hf", "deepseek3"),
                            capture_output=True, text=True, timeout=300)
    line = assert_one_line_error(result.returncode, result.stderr)
    assert "'model.layers.4.embed_tokens.weight' differs from 'model.embed_tokens.weight' (in rows 0-" in line, line
    assert not (tmp_path / "mg").exists()
