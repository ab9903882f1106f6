"""hf -> mg (any layout) -> hf reproduces every original tensor bit for bit, and transformers loads it."""


import pytest
import torch
from transformers import AutoModelForCausalLM
from util import assert_same_tensors, hf_to_mg, load_hf_state, load_mg_state, mg_to_hf, read_json, run_convert

from modellink_ckpt.demo.models import build_hf_checkpoint, hf_logits, sample_tokens

FAMILY_FLAG = {"llama2": "llama2", "qwen25": "qwen25", "qwen3": "qwen3", "qwen25-tied": "qwen25"}

LAYOUTS = {
    "tp1pp1": [],
    "tp2pp2": ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"],
    "pp2vpp2": ["--target-pipeline-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
    "uneven": ["--target-pipeline-parallel-size", "2", "--num-layer-list", "1,3"],
    "noop": ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2", "--noop-layers", "1,5"],
}


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    cache = {}

    def get(family, dtype=torch.float32, **kwargs):
        key = (family, dtype, tuple(sorted(kwargs.items())))
        if key not in cache:
            name = f"{family}-{str(dtype)[6:]}-{len(cache)}"
            cache[key] = build_hf_checkpoint(family, root / name, dtype=dtype, **kwargs)
        return cache[key]

    return get


def round_trip(hf_dir, tmp_path, family, layout_flags):
    mg = hf_to_mg(hf_dir, tmp_path / "mg", FAMILY_FLAG[family], *layout_flags)
    out = tmp_path / "out"
    out.mkdir()
    return mg, mg_to_hf(mg, out, FAMILY_FLAG[family])


@pytest.mark.parametrize("family", ["llama2", "qwen25", "qwen3", "qwen25-tied"])
@pytest.mark.parametrize("layout", ["tp2pp2", "noop"])
def test_round_trip_is_bit_exact(hf_models, tmp_path, family, layout):
    hf_dir = hf_models(family)
    _, back = round_trip(hf_dir, tmp_path, family, LAYOUTS[layout])
    assert_same_tensors(load_hf_state(hf_dir), load_hf_state(back), f"{family} {layout}")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_round_trip_every_layout_bf16(hf_models, tmp_path, layout):
    hf_dir = hf_models("qwen3", torch.bfloat16)
    mg, back = round_trip(hf_dir, tmp_path, "qwen3", LAYOUTS[layout])
    assert_same_tensors(load_hf_state(hf_dir), load_hf_state(back), layout)
    ranks = load_mg_state(mg)
    assert all(r["args"].params_dtype == torch.bfloat16 for r in ranks.values())
    assert all(t.dtype == torch.bfloat16 for r in ranks.values() for k, m in r.items() if k.startswith("model")
               for t in m.values())


def test_transformers_loads_the_output_with_no_missing_keys_and_same_logits(hf_models, tmp_path):
    hf_dir = hf_models("qwen25-tied")
    # the mg checkpoint records --tokenizer-model; mg->hf into an empty folder carries the files over
    _, back = round_trip(hf_dir, tmp_path, "qwen25-tied",
                         LAYOUTS["tp2pp2"] + ["--tokenizer-model", hf_dir / "tokenizer.model"])
    model, info = AutoModelForCausalLM.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokens = sample_tokens(model.config.vocab_size)
    assert torch.equal(hf_logits(hf_dir, tokens), hf_logits(back, tokens))
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        assert (back / name).read_bytes() == (hf_dir / name).read_bytes()


@pytest.mark.parametrize("kwargs", [dict(weights_format="bin"), dict(weights_format="bin", max_shard_size="300KB"),
                                    dict(max_shard_size="300KB"), dict(config_style="v4")])
def test_every_hf_input_format(hf_models, tmp_path, kwargs):
    hf_dir = hf_models("llama2", **kwargs)
    _, back = round_trip(hf_dir, tmp_path, "llama2", LAYOUTS["tp2pp2"])
    assert_same_tensors(load_hf_state(hf_dir), load_hf_state(back), str(kwargs))


def test_v4_and_v5_configs_give_the_same_checkpoint(hf_models, tmp_path):
    a = hf_to_mg(hf_models("llama2"), tmp_path / "a", "llama2")
    b = hf_to_mg(hf_models("llama2", config_style="v4"), tmp_path / "b", "llama2")
    ra, rb = load_mg_state(a)["mp_rank_00"], load_mg_state(b)["mp_rank_00"]
    assert ra["args"] == rb["args"] and ra["args"].rotary_base == 10000.0
    assert_same_tensors(ra["model"], rb["model"])


def test_hf_output_without_original_folder_builds_config_from_args(hf_models, tmp_path):
    hf_dir = hf_models("qwen3")
    mg = hf_to_mg(hf_dir, tmp_path / "mg", "qwen3", "--target-tensor-parallel-size", "2")
    back = mg_to_hf(mg, tmp_path / "fresh", "qwen3")  # no config.json there
    config = read_json(back / "config.json")
    assert config["model_type"] == "qwen3" and config["head_dim"] == 16
    model, info = AutoModelForCausalLM.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tokens = sample_tokens(503)
    assert torch.equal(hf_logits(hf_dir, tokens), hf_logits(back, tokens))


def test_params_dtype_casts_only_when_asked(hf_models, tmp_path):
    hf_dir = hf_models("llama2")
    mg = hf_to_mg(hf_dir, tmp_path / "mg", "llama2", "--params-dtype", "bf16")
    rank = load_mg_state(mg)["mp_rank_00"]
    assert rank["args"].params_dtype == torch.bfloat16 and rank["args"].bf16
    assert rank["model"]["embedding.word_embeddings.weight"].dtype == torch.bfloat16
    back = mg_to_hf(mg, tmp_path / "out", "llama2")
    assert read_json(back / "config.json")["dtype"] == "bfloat16"
    original = load_hf_state(hf_dir)
    assert_same_tensors({k: v.to(torch.bfloat16) for k, v in original.items()}, load_hf_state(back))


def test_vocab_padding_is_recorded_and_removed(hf_models, tmp_path):
    hf_dir = hf_models("llama2")
    mg = hf_to_mg(hf_dir, tmp_path / "mg", "llama2", "--target-tensor-parallel-size", "2",
                  "--make-vocab-size-divisible-by", "128")
    ranks = load_mg_state(mg)
    assert ranks["mp_rank_00"]["args"].padded_vocab_size == 512
    assert ranks["mp_rank_00"]["args"].vocab_size == 503
    assert ranks["mp_rank_01"]["model"]["embedding.word_embeddings.weight"].shape == (256, 64)
    back = mg_to_hf(mg, tmp_path / "out", "llama2")
    assert_same_tensors(load_hf_state(hf_dir), load_hf_state(back))


def test_transformer_engine_names_round_trip(hf_models, tmp_path):
    hf_dir = hf_models("llama2")
    mg = hf_to_mg(hf_dir, tmp_path / "mg", "llama2", "--transformer-impl", "transformer_engine",
                  "--target-tensor-parallel-size", "2")
    names = set(load_mg_state(mg)["mp_rank_00"]["model"])
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in names
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in names)
    back = mg_to_hf(mg, tmp_path / "out", "llama2")
    assert_same_tensors(load_hf_state(hf_dir), load_hf_state(back))


def test_old_scripts_qwen_with_llama2_and_add_qkv_bias(hf_models, tmp_path):
    hf_dir = hf_models("qwen25")
    mg = hf_to_mg(hf_dir, tmp_path / "mg", "llama2", "--add-qkv-bias", "--target-tensor-parallel-size", "2")
    assert load_mg_state(mg)["mp_rank_00"]["args"].add_qkv_bias
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text((hf_dir / "config.json").read_text())
    back = mg_to_hf(mg, out, "llama2", "--add-qkv-bias")
    assert_same_tensors(load_hf_state(hf_dir), load_hf_state(back))


def test_extra_state_is_ignored_and_unknown_tensors_are_errors(hf_models, tmp_path):
    from modellink_ckpt.errors import ConvertError

    hf_dir = hf_models("llama2")
    mg = hf_to_mg(hf_dir, tmp_path / "mg", "llama2", "--target-tensor-parallel-size", "2")
    for rank in ("mp_rank_00", "mp_rank_01"):
        path = mg / "iter_0000001" / rank / "model_optim_rng.pt"
        state = torch.load(path, weights_only=False)
        state["model"]["decoder.layers.0.self_attention.linear_qkv._extra_state"] = None
        state["model"]["decoder.layers.1.mlp.linear_fc1._extra_state"] = torch.zeros(3, dtype=torch.uint8)
        torch.save(state, path)
    back = mg_to_hf(mg, tmp_path / "out", "llama2")
    assert_same_tensors(load_hf_state(hf_dir), load_hf_state(back))

    path = mg / "iter_0000001" / "mp_rank_01" / "model_optim_rng.pt"
    state = torch.load(path, weights_only=False)
    state["model"]["decoder.layers.0.mlp.router.weight"] = torch.zeros(4, 64)
    torch.save(state, path)
    with pytest.raises(ConvertError, match="unexpected tensor 'decoder.layers.0.mlp.router.weight'"):
        run_convert("--load-model-type", "mg", "--save-model-type", "hf", "--load-dir", mg,
                    "--save-dir", tmp_path / "out2")
    assert not (tmp_path / "out2" / "mg2hf").exists()


def test_hf_output_is_sharded_with_an_index(hf_models, tmp_path):
    hf_dir = hf_models("llama2")
    mg = hf_to_mg(hf_dir, tmp_path / "mg", "llama2")
    back = mg_to_hf(mg, tmp_path / "out", "llama2", "--max-shard-size", "200KB")
    shards = sorted(p.name for p in back.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = read_json(back / "model.safetensors.index.json")
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in load_hf_state(hf_dir).values())
    model, info = AutoModelForCausalLM.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_tensors(load_hf_state(hf_dir), load_hf_state(back))


def test_noop_layers_given_on_the_command_line_for_a_checkpoint_that_does_not_record_them(hf_models, tmp_path):
    hf_dir = hf_models("llama2")
    mg = hf_to_mg(hf_dir, tmp_path / "mg", "llama2", "--target-pipeline-parallel-size", "2", "--noop-layers", "2,5")
    for path in (mg / "iter_0000001").glob("*/model_optim_rng.pt"):  # as another tool would have written it
        state = torch.load(path, weights_only=False)
        state["args"].noop_layers = None
        torch.save(state, path)
    back = mg_to_hf(mg, tmp_path / "out", "llama2", "--noop-layers", "2,5")
    assert_same_tensors(load_hf_state(hf_dir), load_hf_state(back))


ARGS_READ_BACK_BY_TRAINING = """num_layers hidden_size ffn_hidden_size num_attention_heads num_query_groups
group_query_attention kv_channels max_position_embeddings position_embedding_type rotary_base normalization
norm_epsilon swiglu add_bias_linear add_qkv_bias qk_layernorm untie_embeddings_and_output_weights
padded_vocab_size make_vocab_size_divisible_by tensor_model_parallel_size pipeline_model_parallel_size
expert_model_parallel_size num_layers_per_virtual_pipeline_stage num_layer_list noop_layers params_dtype bf16 fp16
num_experts moe_router_topk moe_ffn_hidden_size moe_grouped_gemm n_shared_experts first_k_dense_replace
moe_layer_freq q_lora_rank kv_lora_rank qk_head_dim qk_pos_emb_head_dim v_head_dim iteration""".split()


def test_rank_files_hold_the_megatron_layout_and_args(hf_models, tmp_path):
    mg = hf_to_mg(hf_models("qwen3", torch.bfloat16), tmp_path / "mg", "qwen3", *LAYOUTS["noop"])
    assert (mg / "latest_checkpointed_iteration.txt").read_text() == "1"
    ranks = load_mg_state(mg)
    assert sorted(ranks) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    for rank in ranks.values():
        assert rank["checkpoint_version"] == 3.0 and rank["iteration"] == 1
        assert not [name for name in ARGS_READ_BACK_BY_TRAINING if not hasattr(rank["args"], name)]
        assert rank["args"].num_layers == 6 and rank["args"].noop_layers == "1,5"
        assert rank["args"].kv_channels == 16 and rank["args"].qk_layernorm
    stage0 = ranks["mp_rank_00_000"]["model"]
    assert "decoder.layers.1.input_layernorm.weight" not in stage0  # the noop slot has no keys
    assert {"decoder.layers.0.input_layernorm.weight", "decoder.layers.2.input_layernorm.weight"} <= set(stage0)
