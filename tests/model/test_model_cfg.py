"""Model families are data: a new family whose parts exist is one JSON entry, no code."""

import json

import pytest
from mcore_harness import mcore_logits
from transformers import AutoModelForCausalLM, Phi3Config
from util import assert_same_tensors, hf_to_mg, load_hf_state, mg_to_hf

from modellink_ckpt.demo.models import hf_logits, randomize_, sample_tokens
from modellink_ckpt.errors import UsageError
from modellink_ckpt.model.families import DEFAULT_MODEL_CFG, dims_from_hf_config, load_family

# Phi-3 fuses q/k/v as [Q; K; V] (`qkv_proj`) and gate/up as [gate; up] (`gate_up_proj`): both
# parts are known, so the family needs nothing but this entry.
PHI3_ENTRY = {"__base__": "base",
              "config_set_value": {"qkv_type": "pack_gqa", "fc_type": "gate_up", "hf_model_type": "phi3",
                                   "hf_architectures": ["Phi3ForCausalLM"]}}


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    root = tmp_path_factory.mktemp("phi3")
    cfg = json.loads(DEFAULT_MODEL_CFG.read_text())
    cfg["model_mappings"]["phi3-json-only"] = PHI3_ENTRY
    cfg_path = root / "model_cfg.json"
    cfg_path.write_text(json.dumps(cfg))
    config = Phi3Config(hidden_size=64, intermediate_size=160, num_attention_heads=8, num_key_value_heads=4,
                        num_hidden_layers=4, vocab_size=503, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        tie_word_embeddings=False)
    model = randomize_(AutoModelForCausalLM.from_config(config), seed=3)
    model.save_pretrained(root / "hf")
    return root / "hf", cfg_path


def test_json_only_family_round_trips_and_megatron_core_matches(phi3, tmp_path):
    hf, cfg = phi3
    mg = hf_to_mg(hf, tmp_path / "mg", "phi3-json-only", "--model-cfg", cfg, "--target-tensor-parallel-size", "2")
    tokens = sample_tokens(503)
    diff = (mcore_logits(mg, tokens)[..., :503] - hf_logits(hf, tokens)).abs().max().item()
    assert diff <= 1e-4, diff
    out = tmp_path / "out"
    out.mkdir()
    back = mg_to_hf(mg, out, "phi3-json-only", "--model-cfg", cfg)
    assert_same_tensors(load_hf_state(hf), load_hf_state(back))
    assert json.loads((back / "config.json").read_text())["model_type"] == "phi3"


def test_families_inherit_from_base_and_read_both_config_spellings():
    family = load_family("qwen3")
    assert family.settings["qk_layernorm"] and family.qkv_type == "unpack"
    assert family.hf_name("layers_self_attention_q_layernorm", layer=5) == "model.layers.5.self_attn.q_norm.weight"
    v4 = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 8, "vocab_size": 10, "rope_theta": 5e5}
    v5 = {**{k: v for k, v in v4.items() if k != "rope_theta"},
          "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    assert dims_from_hf_config(family, v4) == dims_from_hf_config(family, v5)
    assert dims_from_hf_config(family, v5).rotary_base == 5e5


def test_bad_entries_are_clear_errors(tmp_path):
    cfg = tmp_path / "model_cfg.json"
    cfg.write_text(json.dumps({"model_mappings": {"a": {"__base__": "b"}, "b": {"__base__": "a"},
                                                  "c": {"__base__": "nope"},
                                                  "d": {"config_set_value": {"qkv_type": "weird"}}}}))
    with pytest.raises(UsageError, match="cycle"):
        load_family("a", cfg)
    with pytest.raises(UsageError, match="unknown __base__ 'nope'"):
        load_family("c", cfg)
    with pytest.raises(UsageError, match="qkv_type 'weird'"):
        load_family("d", cfg)
    with pytest.raises(UsageError, match="unknown model family"):
        load_family("zzz", cfg)
