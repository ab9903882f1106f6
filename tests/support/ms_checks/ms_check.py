"""Checks run by the real MindSpore 2.10 / MindFormers 2.1.0 in the MindSpore test venv (test helper).

    ms_check.py resave SRC DST              mindspore.load_checkpoint(SRC) written again by
                                            mindspore.save_checkpoint to DST (.ckpt): what MindSpore read
    ms_check.py transform SRC DST SRC_STRATEGY DST_STRATEGY FORMAT
                                            mindspore.transform_checkpoints (strategy 'none': complete)
    ms_check.py by-rank SRC_FILE DST_STRATEGY RANK OUT
                                            mindspore.transform_checkpoint_by_rank of a complete checkpoint
    ms_check.py unify SRC STRATEGY DST [True|False] [PREFIX]
                                            mindspore.unified_safetensors (merge distributed safetensors;
                                            False: a redundancy-free source; PREFIX: names left out)
    ms_check.py merge-strategies SRC_DIR DST_FILE
                                            mindspore.merge_pipeline_strategys
    ms_check.py mf-qwen3 HF_CONFIG CKPT IDS OUT [interleaved|contiguous]
                                            MindFormers mcore Qwen3: strict load, logits
    ms_check.py mf-llama HF_CONFIG CKPT IDS OUT [concat]
                                            MindFormers legacy Llama: strict load, logits
    ms_check.py lora-merge SRC_CKPT DST_DIR SCALING  MindFormers' tools/transform_ckpt_lora.py merge
    ms_check.py mf-save-checkpoint2 HF_CONFIG IDS ROOT LOGITS_OUT
                                            MindFormers' save_checkpoint (Checkpoint 2.0, with optimizer)
    ms_check.py mf-split-checkpoint2 SRC_ROOT DST_ROOT   a one-rank Checkpoint 2.0 as four ranks save it
    ms_check.py mf-load-checkpoint2 HF_CONFIG FOLDER IDS LOGITS_OUT
                                            MindFormers' load_checkpoint of a Checkpoint 2.0 folder, logits

Nothing here imports torch or the converter.
"""

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _format(path):
    return "safetensors" if path.endswith(".safetensors") else "ckpt"


def resave(src, dst):
    import mindspore as ms

    params = ms.load_checkpoint(src, format=_format(src))
    ms.save_checkpoint([{"name": name, "data": param} for name, param in params.items()], dst)
    print(json.dumps(sorted(params)))


def transform(src, dst, src_strategy, dst_strategy, fmt):
    import mindspore as ms

    none = lambda s: None if s == "none" else s  # noqa: E731
    ms.transform_checkpoints(src, dst, "checkpoint_", none(src_strategy), none(dst_strategy),
                             output_format=fmt)


def by_rank(src_file, dst_strategy, rank, out):
    import mindspore as ms

    ms.transform_checkpoint_by_rank(int(rank), {0: src_file}, out, None, dst_strategy)


def unify(src, strategy, dst, with_redundancy="True", drop_prefix=""):
    import mindspore as ms

    choice = (lambda name: not name.startswith(drop_prefix)) if drop_prefix else None  # as MindFormers' script
    ms.unified_safetensors(src, strategy, dst, merge_with_redundancy=with_redundancy == "True", choice_func=choice)


def merge_strategies(src_dir, dst_file):
    import mindspore as ms

    ms.merge_pipeline_strategys(src_dir, dst_file)


def _run_logits(net, ckpt, ids_path, out):
    import mindspore as ms

    params = ms.load_checkpoint(ckpt, format=_format(ckpt))
    missing, unused = ms.load_param_into_net(net, params, strict_load=True)
    if missing or unused:
        raise SystemExit(f"strict load failed: missing {missing[:5]}, unused {unused[:5]}")
    ids = np.load(ids_path).astype(np.int32)
    logits = net(ms.Tensor(ids, ms.int32))
    logits = logits[0] if isinstance(logits, tuple) else logits
    np.save(out, logits.asnumpy().astype(np.float32))


def _hf(config_path):
    with open(config_path) as f:
        hf = json.load(f)
    theta = (hf.get("rope_parameters") or {}).get("rope_theta") or hf.get("rope_theta", 10000.0)
    return hf, theta


def _mf_qwen3_net(config_path, seq, fc1_layout="interleaved"):
    sys.path.insert(0, HERE)
    from mindformers.core.context.build_context import build_context

    build_context({"use_legacy": False, "run_mode": "predict", "use_parallel": False,
                   "context": {"mode": "GRAPH_MODE", "device_target": "CPU", "device_id": 0},
                   "parallel": {}, "parallel_config": {}})
    import mf_cpu_shims

    mf_cpu_shims.apply()
    from mindformers.models.qwen3.configuration_qwen3 import Qwen3Config
    from mindformers.models.qwen3.modeling_qwen3_train import TrainingQwen3ForCausalLM

    hf, theta = _hf(config_path)
    config = Qwen3Config(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf["num_key_value_heads"], head_dim=hf["head_dim"], max_position_embeddings=64,
        seq_length=seq, rms_norm_eps=hf["rms_norm_eps"], rope_theta=theta,
        tie_word_embeddings=hf.get("tie_word_embeddings", False), compute_dtype="float32", params_dtype="float32",
        layernorm_compute_dtype="float32", softmax_compute_dtype="float32", rotary_dtype="float32",
        use_interleaved_weight_layout_mlp=fc1_layout == "interleaved")
    net = TrainingQwen3ForCausalLM(config)
    net.set_train(False)
    return net


def mf_qwen3(config_path, ckpt, ids_path, out, fc1_layout="interleaved"):
    net = _mf_qwen3_net(config_path, int(np.load(ids_path).shape[1]), fc1_layout)
    _run_logits(net, ckpt, ids_path, out)


def _logits(net, ids_path, out):
    import mindspore as ms

    logits = net(ms.Tensor(np.load(ids_path).astype(np.int32), ms.int32))
    logits = logits[0] if isinstance(logits, tuple) else logits
    np.save(out, logits.asnumpy().astype(np.float32))


def mf_save_checkpoint2(config_path, ids_path, root, logits_out):
    """A Checkpoint 2.0 folder as MindFormers training writes it: a Qwen3 MindFormers builds and
    initialises itself, saved with an AdamW optimizer by `mindformers.checkpoint.save_checkpoint`
    at iteration 3; its logits on IDS (MindFormers' own) to LOGITS_OUT."""
    import mindspore as ms
    from mindformers.checkpoint.checkpoint import CommonInfo, save_checkpoint

    net = _mf_qwen3_net(config_path, int(np.load(ids_path).shape[1]))
    for name, param in net.parameters_and_names():  # norms away from 1 so a dropped one shows
        if "norm" in name:
            param.set_data(ms.Tensor(1.0 + 0.1 * np.random.default_rng(len(name)).standard_normal(param.shape),
                                     param.dtype))
    optimizer = ms.nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-3)
    common = CommonInfo()
    common.epoch_num, common.step_num, common.global_step = 1, 3, 3
    save_checkpoint(3, net, optimizer=optimizer, common_info=common, save_checkpoint_path=root)
    _logits(net, ids_path, logits_out)


def mf_split_checkpoint2(src_root, dst_root):
    """The iteration of a one-rank Checkpoint 2.0 at SRC_ROOT as four ranks (dp 2 x mp 2) save it:
    each matrix split on both axes (`Layout(...)("dp", "mp")`), vectors held by every rank. Which
    rank holds which slice, and its offset, come from MindFormers' own layout functions; each rank's
    file is written by `mindspore.save_checkpoint` and `metadata.json` by MindFormers' `save_metadata`."""
    import mindspore as ms
    from mindformers.checkpoint.metadata import save_metadata
    from mindformers.checkpoint.reshard import infer_slice_area_by_rank
    from mindformers.checkpoint.sharded_tensor import _get_layout_shard_info, build_sharded_tensor
    from mindspore.parallel import Layout

    world, devices = 4, (2, 2)
    iteration = open(os.path.join(src_root, "latest_checkpointed_iteration.txt")).read().strip()
    folder = f"iteration_{int(iteration):08d}"
    params = ms.load_checkpoint(os.path.join(src_root, folder, "model-0000000-0000001.safetensors"),
                                format="safetensors")
    os.makedirs(os.path.join(dst_root, folder), exist_ok=True)
    metas, mappings, pieces = {r: {} for r in range(world)}, [], {r: [] for r in range(world)}
    for name, param in params.items():
        data = param.asnumpy()
        layout = Layout(devices, ("dp", "mp"), list(range(world)))
        splits = data.ndim == 2 and data.shape[0] % 2 == 0 and data.shape[1] % 2 == 0  # (503-row tables whole)
        layout = layout("dp", "mp") if splits else layout(*["None"] * data.ndim)
        fragments, local_shape, offsets, replicas = _get_layout_shard_info(name, layout, data.shape)
        tensor_map = layout.to_dict()["tensor_map"]
        for rank in range(world):
            area = infer_slice_area_by_rank(devices, tensor_map, rank, data.shape)
            pieces[rank].append({"name": name, "data": ms.Tensor(data[tuple(slice(a, b) for a, b in area)])})
            metas[rank][name] = build_sharded_tensor(name, param.dtype, local_shape, data.shape, fragments,
                                                     (offsets[rank],), replica_id=replicas[rank], layout=layout)
            holders = [r for r in range(world) if offsets[r] == offsets[rank]]
            mappings.append((f"model-{rank:07d}-{world:07d}.safetensors", rank, holders, (name, (offsets[rank],))))
    for rank in range(world):
        ms.save_checkpoint(pieces[rank], os.path.join(dst_root, folder, f"model-{rank:07d}-{world:07d}"),
                           format="safetensors")
    save_metadata(metas, mappings, os.path.join(dst_root, folder, "metadata.json"))
    with open(os.path.join(dst_root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(iteration)


def mf_load_checkpoint2(config_path, folder, ids_path, logits_out):
    """`mindformers.checkpoint.load_checkpoint(FOLDER, net)` into a freshly initialised Qwen3: every
    parameter must come from the folder (none left as initialised); then its logits on IDS."""
    from mindformers.checkpoint.checkpoint import load_checkpoint

    net = _mf_qwen3_net(config_path, int(np.load(ids_path).shape[1]))
    before = {name: p.asnumpy().copy() for name, p in net.parameters_and_names()}
    load_checkpoint(folder, net)
    unchanged = [name for name, p in net.parameters_and_names() if np.array_equal(p.asnumpy(), before[name])]
    if unchanged:
        raise SystemExit(f"not loaded from {folder}: {unchanged[:5]} ({len(unchanged)} in all)")
    _logits(net, ids_path, logits_out)


def mf_llama(config_path, ckpt, ids_path, out, concat=""):
    sys.path.insert(0, HERE)
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    import mf_cpu_shims

    mf_cpu_shims.apply_legacy()
    from mindformers.models.llama import LlamaConfig, LlamaForCausalLM

    hf, theta = _hf(config_path)
    ids = np.load(ids_path)
    config = LlamaConfig(
        batch_size=ids.shape[0], seq_length=ids.shape[1], vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"], n_kv_heads=hf["num_key_value_heads"],
        intermediate_size=hf["intermediate_size"], rms_norm_eps=hf["rms_norm_eps"], theta=theta,
        max_position_embedding=64, use_flash_attention=False, fused_rms_norm=False, use_past=False,
        compute_dtype="float32", layernorm_compute_type="float32", softmax_compute_type="float32",
        rotary_dtype="float32", param_init_type="float32", qkv_concat=concat == "concat", tie_word_embeddings=False)
    net = LlamaForCausalLM(config)
    net.set_train(False)
    _run_logits(net, ckpt, ids_path, out)


def mf_glm(config_path, ckpt, ids_path, out):
    """MindFormers' legacy ChatGLM2/GLM-4 model (`convert_weight.py --model glm-n` names), built from
    the ChatGLM-format config.json: every weight must load strictly (its kv caches are buffers).
    The logits are saved, but on CPU they do not match transformers' GLM even at position 0 (max
    diff ~5; not explained yet), so the caller checks the strict load only."""
    sys.path.insert(0, HERE)
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_device("CPU")
    import mf_cpu_shims

    mf_cpu_shims.apply_legacy()
    mf_cpu_shims.apply_glm()
    from mindformers.models.glm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration

    with open(config_path) as f:
        hf = json.load(f)
    ids = np.load(ids_path)
    config = ChatGLM2Config(
        batch_size=ids.shape[0], seq_length=ids.shape[1], num_layers=hf["num_layers"],
        padded_vocab_size=hf["padded_vocab_size"], hidden_size=hf["hidden_size"], ffn_hidden_size=hf["ffn_hidden_size"],
        kv_channels=hf["kv_channels"], num_attention_heads=hf["num_attention_heads"],
        multi_query_attention=hf["multi_query_attention"], multi_query_group_num=hf["multi_query_group_num"],
        add_qkv_bias=hf["add_qkv_bias"], layernorm_epsilon=hf["layernorm_epsilon"], rope_ratio=hf.get("rope_ratio", 1),
        use_past=False, use_flash_attention=False, compute_dtype="float32", layernorm_compute_type="float32",
        param_init_type="float32", rotary_dtype="float32", residual_dtype="float32")
    net = ChatGLM2ForConditionalGeneration(config)
    net.set_train(False)
    params = ms.load_checkpoint(ckpt, format=_format(ckpt))
    missing, unused = ms.load_param_into_net(net, params, strict_load=True)
    missing = [name for name in missing if "paged_attention_mgr" not in name]  # kv caches
    if missing or unused:
        raise SystemExit(f"strict load failed: missing {missing[:5]}, unused {unused[:5]}")
    logits = net(ms.Tensor(ids.astype(np.int32), ms.int32))
    logits = logits[0] if isinstance(logits, tuple) else logits
    np.save(out, logits.asnumpy().astype(np.float32))


def lora_merge(src_ckpt, dst_dir, scaling):
    """MindFormers' own LoRA merge script, run as its users run it."""
    import subprocess

    import mindformers

    script = os.path.join(os.path.dirname(mindformers.__file__), "tools", "transform_ckpt_lora.py")
    os.makedirs(dst_dir, exist_ok=True)  # the tool writes into it without creating it
    subprocess.run([sys.executable, script, "--src_ckpt_path_or_dir", src_ckpt, "--dst_ckpt_dir", dst_dir,
                    "--lora_scaling", scaling], check=True)


COMMANDS = {"resave": resave, "transform": transform, "by-rank": by_rank, "unify": unify,
            "merge-strategies": merge_strategies, "mf-qwen3": mf_qwen3, "mf-llama": mf_llama, "mf-glm": mf_glm,
            "lora-merge": lora_merge, "mf-save-checkpoint2": mf_save_checkpoint2,
            "mf-load-checkpoint2": mf_load_checkpoint2, "mf-split-checkpoint2": mf_split_checkpoint2}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
