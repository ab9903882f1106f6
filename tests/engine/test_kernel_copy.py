"""The kernel-copy path (modellink_ckpt/formats/kernel_copy.py): bytes a Megatron, HF or MindSpore
safetensors target takes unchanged stay in their source file and are copied file to file inside the
kernel; anything else that looks at them reads them first. The output is the same bytes with the
path on and off."""

import errno
import json
import os

import pytest
import torch
from ms_fixtures import strategy_for
from util import MEGATRON_LM_FIXTURES, hf_to_mg, run_convert

from modellink_ckpt.demo.models import build_hf_checkpoint
from modellink_ckpt.formats import file_io, kernel_copy


def _manifest_files(folder):
    (manifest,) = list(folder.glob("iter_*/convert_manifest.json")) or list(folder.glob("mg2hf/convert_manifest.json")) \
        or [folder / "convert_manifest.json"]
    return json.loads(manifest.read_text())["files"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("kernel_copy")
    return {family: build_hf_checkpoint(family, root / family, num_layers=4, tokenizer=False, dtype=torch.bfloat16)
            for family in ("llama2", "mixtral", "qwen25-tied")}


def _both_ways(flags, save_dir):
    """(result with the kernel-copy path, result without it, manifest files of each)."""
    on = run_convert(*flags, "--save-dir", save_dir / "on")
    off = run_convert(*flags, "--save-dir", save_dir / "off", "--no-kernel-copy")
    return on, off, _manifest_files(save_dir / "on"), _manifest_files(save_dir / "off")


HF_TO_MG = {
    "dense-tp2pp2": ("llama2", ("--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")),
    "tied-tp2pp2": ("qwen25-tied", ("--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2")),
    "moe-tp2ep2pp2": ("mixtral", ("--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
                                  "--target-expert-parallel-size", "2")),
}


@pytest.mark.parametrize("case", HF_TO_MG)
def test_hf_to_mg_is_the_same_bytes_with_and_without_kernel_copies(tmp_path, models, case):
    family, layout = HF_TO_MG[case]
    flags = ("--model-type", "GPT", "--load-model-type", "hf", "--save-model-type", "mg", "--use-mcore-models",
             "--model-type-hf", {"qwen25-tied": "qwen25"}.get(family, family), "--load-dir", models[family], *layout)
    on, off, files_on, files_off = _both_ways(flags, tmp_path)
    assert files_on == files_off
    # about half of these tiny models' bytes went file to file (row-parallel shards, which reorder
    # bytes, and the vocabulary's padding rows go through memory; 48% for the dense one)
    assert on["kernel_copied"] > 0.4 * on["bytes"], (on["kernel_copied"], on["bytes"])
    assert off["kernel_copied"] == 0


@pytest.mark.parametrize("family", ["llama2", "mixtral", "qwen25-tied"])
@pytest.mark.parametrize("save_type", ["hf", "mg"])
def test_from_megatron_is_the_same_bytes_with_and_without_kernel_copies(tmp_path, models, family, save_type):
    flag = {"qwen25-tied": "qwen25"}.get(family, family)
    ep = ("--target-expert-parallel-size", "2") if family == "mixtral" else ()
    source = hf_to_mg(models[family], tmp_path / "src", flag, "--target-tensor-parallel-size", "2",
                      "--target-pipeline-parallel-size", "2", *ep)
    flags = ("--model-type", "GPT", "--load-model-type", "mg", "--save-model-type", save_type, "--use-mcore-models",
             "--model-type-hf", flag, "--load-dir", source)
    if save_type == "mg":  # re-layout: TP2 PP2 (EP2) -> TP1 PP4 (EP1)
        flags += ("--target-tensor-parallel-size", "1", "--target-pipeline-parallel-size", "4",
                  *(("--target-expert-parallel-size", "1") if ep else ()))
    on, off, files_on, files_off = _both_ways(flags, tmp_path)
    assert files_on == files_off
    assert on["kernel_copied"] > 0 and off["kernel_copied"] == 0


MS_TARGETS = {
    "complete-mcore": ("safetensors", "mcore", None),
    "complete-legacy-concat": ("safetensors", "legacy-concat", None),
    "pp2mp2": ("safetensors", "mcore", dict(pp=2, mp=2)),
    "ckpt": ("ckpt", "mcore", None),
}


@pytest.mark.parametrize("source_type", ["hf", "mg"])
@pytest.mark.parametrize("case", MS_TARGETS)
def test_mindspore_targets_are_the_same_bytes_with_and_without_kernel_copies(tmp_path, models, source_type, case):
    """MindSpore safetensors take renamed tensors and row blocks file to file (the rows the naming
    reorders, and a strategy's column slices, through memory); a `.ckpt` checksums every byte, so
    nothing goes through the kernel there."""
    fmt, naming, layout = MS_TARGETS[case]
    source = models["llama2"] if source_type == "hf" else \
        hf_to_mg(models["llama2"], tmp_path / "src", "llama2", "--target-tensor-parallel-size", "2",
                 "--target-pipeline-parallel-size", "2")
    flags = ("--load-model-type", source_type, "--save-model-type", "ms", "--model-type-hf", "llama2",
             "--load-dir", source, "--ms-format", fmt, "--ms-naming", naming)
    if layout:
        flags += ("--dst-strategy", strategy_for(tmp_path, models["llama2"], "llama2", naming, **layout)[0])
    on, off, files_on, files_off = _both_ways(flags, tmp_path)
    assert files_on == files_off
    assert (on["kernel_copied"] > 0.3 * on["bytes"]) == (fmt == "safetensors"), (on["kernel_copied"], on["bytes"])
    assert off["kernel_copied"] == 0


def test_the_mindspore_hint_names_the_tensors_a_naming_reorders(models):
    """The loader reads these at once (the saver computes on them) and leaves the rest in the file."""
    from modellink_ckpt.formats.mindspore import names as ms_names
    from modellink_ckpt.model.families import dims_from_hf_config, load_family

    family = load_family("mixtral")
    dims = dims_from_hf_config(family, json.loads((models["mixtral"] / "config.json").read_text()))
    experts = {f"mlp.experts.local_experts.{e}.linear_fc1.weight" for e in range(dims.num_experts)}
    hinted = {naming: ms_names.reordered_names(ms_names.load_naming(family, naming), dims)
              for naming in ("mcore", "mcore-contiguous", "legacy", "legacy-concat")}
    assert experts <= hinted["mcore"] and experts <= hinted["mcore-contiguous"]  # stacked, transposed
    assert "mlp.linear_fc1.weight" in hinted["mcore"]  # gate/up rows interleaved
    assert "self_attention.linear_qkv.weight" in hinted["legacy"]  # split into wq, wk, wv
    assert "self_attention.linear_qkv.weight" not in hinted["legacy-concat"]  # w_qkv: Megatron's rows
    assert not {"self_attention.linear_proj.weight", "input_layernorm.weight"} & set().union(*hinted.values())


@pytest.mark.parametrize("save_type", ["hf", "mg"])
@pytest.mark.parametrize("case", MS_TARGETS)
def test_from_mindspore_is_the_same_bytes_with_and_without_kernel_copies(tmp_path, models, save_type, case):
    """A MindSpore source (`.ckpt` too: its tensors are raw bytes at an offset) leaves the tensors
    the naming only renames in their files for the saver."""
    fmt, naming, layout = MS_TARGETS[case]
    strategy = ("--dst-strategy", strategy_for(tmp_path, models["llama2"], "llama2", naming, **layout)[0]) \
        if layout else ()
    source = tmp_path / "src"
    run_convert("--load-model-type", "hf", "--save-model-type", "ms", "--model-type-hf", "llama2", "--load-dir",
                models["llama2"], "--save-dir", source, "--ms-format", fmt, "--ms-naming", naming, *strategy)
    flags = ("--load-model-type", "ms", "--save-model-type", save_type, "--model-type-hf", "llama2",
             "--load-dir", source, "--ms-naming", naming, *(("--src-strategy", strategy[1]) if layout else ()),
             *(("--target-tensor-parallel-size", "2") if save_type == "mg" else ()))
    on, off, files_on, files_off = _both_ways(flags, tmp_path)
    assert files_on == files_off
    assert on["kernel_copied"] > 0.1 * on["bytes"], (on["kernel_copied"], on["bytes"])
    assert off["kernel_copied"] == 0


@pytest.mark.parametrize("save_type", ["hf", "mg"])
def test_from_a_training_torch_dist_store_is_the_same_bytes_with_and_without_kernel_copies(tmp_path, save_type):
    """Megatron-LM's own torch_dist save (chunks in two data files): a chunk part that is one run of
    its bytes (a layer of a stacked tensor, a whole chunk) stays in the file for the saver."""
    flags = ("--load-model-type", "mg", "--save-model-type", save_type, "--model-type-hf", "llama2",
             "--load-dir", MEGATRON_LM_FIXTURES / "torch_dist",
             *(("--target-tensor-parallel-size", "2") if save_type == "mg" else ()))
    on, off, files_on, files_off = _both_ways(flags, tmp_path)
    assert files_on == files_off
    assert on["kernel_copied"] > 0.3 * on["bytes"], (on["kernel_copied"], on["bytes"])
    assert off["kernel_copied"] == 0


def test_a_saver_that_computes_on_the_bytes_sees_them(tmp_path, models):
    """--params-dtype casts every tensor in the saver: each deferred byte is read before the cast."""
    flags = ("--model-type", "GPT", "--load-model-type", "hf", "--save-model-type", "mg", "--use-mcore-models",
             "--model-type-hf", "llama2", "--load-dir", models["llama2"], "--params-dtype", "fp16",
             "--target-tensor-parallel-size", "2")
    on, off, files_on, files_off = _both_ways(flags, tmp_path)
    assert files_on == files_off
    assert on["kernel_copied"] == 0  # nothing is written unchanged


# ---- the mechanism, in one process -----------------------------------------------------------

def _digest(algorithm: str, data: bytes) -> str:
    _, hasher = file_io.new_hash(algorithm)
    hasher.update(data)
    return f"{algorithm}:{hasher.hexdigest()}"


@pytest.fixture
def message(tmp_path):
    """A 4 KiB message arena whose bytes [0, 1000) and [2000, 3000) are still in `source` (at
    offsets 77 and 5000), the rest in memory; FillOnTouch active as in a saver."""
    source = tmp_path / "source.bin"
    data = os.urandom(8192)
    source.write_bytes(data)
    storage = torch.UntypedStorage(4096)
    arena = torch.empty(0, dtype=torch.uint8).set_(storage)
    arena[1000:2000] = torch.arange(1000) % 251
    arena[3000:] = 7
    expected = bytearray(arena.numpy().tobytes())
    expected[0:1000], expected[2000:3000] = data[77:1077], data[5000:6000]
    with kernel_copy.saver_fills_on_touch(True):
        kernel_copy.receive(storage, [(2000, 1000, str(source), 5000), (0, 1000, str(source), 77)])
        yield arena, bytes(expected)
    kernel_copy._saver["on"] = False


def test_views_read_nothing_and_any_other_operation_reads_first(message):
    arena, expected = message
    pending = kernel_copy._current[0]
    as_bf16 = arena.view(torch.bfloat16).reshape(64, 32)
    rows = as_bf16[2:4]
    assert rows.shape == (2, 32) and rows.is_contiguous() and len(pending.segments) == 2  # views: nothing read
    want = torch.frombuffer(bytearray(expected), dtype=torch.bfloat16).reshape(64, 32)
    assert torch.equal(rows.clone().view(torch.int16), want[2:4].view(torch.int16))  # a copy reads what it covers
    assert [s[0] for s in pending.segments] == [2000]
    gathered = as_bf16[:, :3].contiguous()  # a strided gather reads its whole extent
    assert torch.equal(gathered.view(torch.int16), want[:, :3].contiguous().view(torch.int16))
    assert not pending.segments


def test_untyped_storage_reads_every_deferred_byte(message):
    arena, expected = message
    arena[1500:1501].untyped_storage()
    assert not kernel_copy._current[0].segments
    assert arena.numpy().tobytes() == expected


def test_a_written_tensor_has_its_bytes_and_digest_through_the_kernel(message, tmp_path):
    arena, expected = message
    before = file_io.kernel_copied[0]
    arena[3500:3510].add_(1)  # an in-place change in memory: those bytes are memory from now on
    expected = expected[:3500] + bytes((b + 1) % 256 for b in expected[3500:3510]) + expected[3510:]
    for algorithm in ("blake3", "sha256"):
        file_io.use_hash(algorithm)
        try:
            out = file_io.HashedFile(tmp_path / f"out-{algorithm}")
            out.write(b"header")
            out.write_tensor(arena[500:4096])  # file, memory, file, memory
            size, digest = out.close()
        finally:
            file_io.use_hash(file_io.DEFAULT_HASH)
        written = (tmp_path / f"out-{algorithm}").read_bytes()
        assert written == b"header" + expected[500:] and size == len(written)
        assert digest == _digest(algorithm, written)
    assert file_io.kernel_copied[0] - before == 2 * (500 + 1000)
    assert len(kernel_copy._current[0].segments) == 2  # written without reading them into memory


def test_copy_falls_back_to_memory_where_the_kernel_refuses(message, tmp_path, monkeypatch):
    arena, expected = message

    def refuse(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    before = file_io.kernel_copied[0]
    out = file_io.HashedFile(tmp_path / "out")
    out.write_tensor(arena)
    size, digest = out.close()
    assert (tmp_path / "out").read_bytes() == expected and size == len(expected)
    assert digest == _digest(file_io.DEFAULT_HASH, expected)
    assert file_io.kernel_copied[0] == before


def test_a_loader_defers_only_placed_reads_into_the_message(tmp_path):
    """Reads outside `placing()`, or into memory that is not the message's, happen at once."""
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 4)
    reader = file_io.FileReader(source)
    buffer = torch.zeros(1024, dtype=torch.uint8)
    scratch = torch.zeros(16, dtype=torch.uint8)
    kernel_copy.defer_reads(True)
    try:
        kernel_copy.begin_message(buffer)
        reader.read_into(0, buffer[:16])  # not placing: read now
        with kernel_copy.placing():
            reader.read_into(16, buffer[16:32])
            reader.read_into(32, buffer[32:48])  # continues the previous range: one segment
            reader.read_into(100, scratch)  # not the message's memory
        assert buffer[:16].tolist() == list(range(16)) and scratch.tolist() == list(range(100, 116))
        assert buffer[16:48].tolist() == [0] * 32
        assert kernel_copy.take_segments(buffer) == [(16, 32, str(source), 16)]
    finally:
        kernel_copy.defer_reads(False)
