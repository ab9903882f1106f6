"""Loader for Hugging Face checkpoints: `*.safetensors` (sharded or single) or `pytorch_model*.bin`.

Tensors are read lazily, one layer at a time, straight into shared memory; the HF model is
never built and the checkpoint is never held whole.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch

from modellink_ckpt import registry
from modellink_ckpt.engine import workers
from modellink_ckpt.engine.pipeline import message_bytes
from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats import kernel_copy, quantized
from modellink_ckpt.formats.huggingface import TOKENIZER_FILES
from modellink_ckpt.formats.safetensors_io import SafetensorsFile
from modellink_ckpt.formats.torch_zip import LazyTensor, load_lazy
from modellink_ckpt.model import mapping
from modellink_ckpt.model.families import ModelDims, ModelFamily, dims_from_hf_config, families_for_config, load_family


class TorchStateFile:
    """A `pytorch_model*.bin` file read like a `SafetensorsFile`: through the restricted unpickler,
    each tensor read on demand straight into the caller's memory."""

    def __init__(self, path: Path):
        self.path = path
        state = load_lazy(path)
        if not isinstance(state, dict):
            raise ConvertError(f"{path}: expected a dict of tensors")
        self.tensors = {k: v for k, v in state.items() if isinstance(v, (torch.Tensor, LazyTensor))}

    def keys(self):
        return self.tensors.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return tuple(self.tensors[name].shape), self.tensors[name].dtype

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        tensor = self.tensors[name]
        if isinstance(tensor, LazyTensor):
            tensor.read_rows(start, stop, out)
        else:  # an old non-zip file, loaded whole
            out.copy_(tensor[start:stop])


class HfSource:
    """An HF model directory: its config and where each tensor lives. FP8 weights with block scales
    read as `dequantize_to` (default: the model's dtype)."""

    def __init__(self, directory: str | Path, dequantize_to: torch.dtype | None = None):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise UsageError(f"--load-dir {self.dir}: " + ("not a directory" if self.dir.exists() else "does not exist"))
        config_path = self.dir / "config.json"
        try:
            self.config = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise UsageError(f"--load-dir {self.dir}: no config.json (is this a Hugging Face model directory?)") from None
        except ValueError as exc:
            raise ConvertError(f"{config_path}: not valid JSON ({exc})") from None
        self._open: dict[str, object] = {}
        self.weight_map = self._find_weights()
        self._dequantize_to = dequantize_to
        self.quantized = self._find_quantized()  # {FP8 weight: (stored dtype, scale dtype)}
        self.mxfp4 = self._find_mxfp4()  # {tensor: (blocks, scales)}

    def _find_quantized(self) -> dict:
        scales = {name for name in self.weight_map if name.endswith(quantized.SCALE_SUFFIX)}
        if not scales:
            return {}
        self.block = quantized.block_size(self.config, str(self.dir / "config.json"))
        found = {}
        for scale in scales:
            weight = scale[:-len(quantized.SCALE_SUFFIX)]
            if weight not in self.weight_map:
                raise ConvertError(f"{self.dir}: '{scale}' scales '{weight}', which the checkpoint lacks")
            (shape, stored), (scale_shape, scale_dtype) = map(self.stored_shape_dtype, (weight, scale))
            if stored not in quantized.FP8_DTYPES:
                raise ConvertError(f"{self.dir}: '{weight}' is {str(stored).replace('torch.', '')} but has a "
                                   f"block scale; only FP8 weights are dequantized")
            quantized.check_scale(weight, shape, scale_shape, self.block, str(self.dir))
            found[weight] = (stored, scale_dtype)
        return found

    def _find_mxfp4(self) -> dict:
        pairs = quantized.mxfp4_pairs(self.weight_map)
        if pairs:
            quantized.block_size(self.config, str(self.dir / "config.json"))  # refuses another quant_method
        for name, (blocks, scales) in pairs.items():
            if name in self.weight_map:
                raise ConvertError(f"{self.dir}: holds '{name}' and its MXFP4 blocks")
            quantized.check_mxfp4(name, self.stored_shape_dtype(blocks), self.stored_shape_dtype(scales), str(self.dir))
        return pairs

    def tensor_names(self) -> list[str]:
        """The checkpoint's tensors as read: FP8 block scales aside (read with their weights), MXFP4
        blocks and scales as the one tensor they make."""
        packed = {part for pair in self.mxfp4.values() for part in pair}
        return [name for name in self.weight_map
                if not (name.endswith(quantized.SCALE_SUFFIX) and name[:-len(quantized.SCALE_SUFFIX)] in self.quantized)
                and name not in packed] + list(self.mxfp4)

    def _find_weights(self) -> dict[str, str]:
        """{tensor name: file name}, from an index json or by listing the weight files."""
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = self.dir / index_name
            if index_path.exists():
                try:
                    weight_map = json.loads(index_path.read_text())["weight_map"]
                    if not isinstance(weight_map, dict):
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    raise ConvertError(f"{index_path}: not a valid index (needs a 'weight_map' object)") from None
                missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
                if missing:
                    raise ConvertError(f"{index_path}: lists shard {missing[0]}, which is missing")
                return weight_map
        files = sorted(self.dir.glob("*.safetensors")) or sorted(self.dir.glob("pytorch_model*.bin"))
        if not files:
            raise UsageError(f"--load-dir {self.dir}: no *.safetensors or pytorch_model*.bin weights found")
        weight_map = {}
        for path in files:
            for name in self._file(path.name).keys():
                weight_map[name] = path.name
        return weight_map

    def _file(self, file_name: str):
        if file_name not in self._open:
            path = self.dir / file_name
            self._open[file_name] = SafetensorsFile(path) if file_name.endswith(".safetensors") else TorchStateFile(path)
        return self._open[file_name]

    def _locate(self, name: str):
        try:
            file_name = self.weight_map[name]
        except KeyError:
            raise ConvertError(f"{self.dir}: tensor '{name}' not found in the checkpoint") from None
        source = self._file(file_name)
        if name not in source:
            raise ConvertError(f"{self.dir / file_name}: tensor '{name}' (listed in the index) is missing")
        return source

    def stored_shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self._locate(name).shape_dtype(name)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype as read (an FP8 weight, an MXFP4 tensor: dequantized)."""
        if name in self.mxfp4:
            blocks, scales = (self.stored_shape_dtype(part) for part in self.mxfp4[name])
            return quantized.check_mxfp4(name, blocks, scales, str(self.dir)), self._dequantize_to or self.dtype()
        shape, dtype = self.stored_shape_dtype(name)
        if name in self.quantized:
            return shape, self._dequantize_to or self.dtype()
        if dtype in quantized.FP8_DTYPES:
            raise ConvertError(f"{self.dir}: '{name}' is {str(dtype).replace('torch.', '')} without a block scale "
                               f"('{quantized.scale_name(name)}'); it cannot be dequantized")
        return shape, dtype

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        if name in self.mxfp4:
            stored = self.stored_shape_dtype(self.mxfp4[name][0])[0]
            quantized.dequantize_mxfp4_rows(self._read_stored, self.mxfp4[name], stored, start, stop, out)
        elif name in self.quantized:
            stored, scale_dtype = self.quantized[name]
            quantized.dequantize_rows(self._read_stored, name, self.stored_shape_dtype(name)[0], start, stop, out,
                                      self.block, stored, scale_dtype)
        else:
            self._read_stored(name, start, stop, out)

    def _read_stored(self, name: str, start: int, stop: int, out: torch.Tensor) -> None:
        self._locate(name).read_rows(name, start, stop, out)

    def hf_layer_count(self, family: ModelFamily) -> int:
        indices = {i for i in map(family.layer_of, self.weight_map) if i is not None}
        return max(indices) + 1 if indices else 0

    def dims(self, family: ModelFamily, overrides: dict | None = None) -> ModelDims:
        dims = dims_from_hf_config(family, self.config, source=str(self.dir / "config.json"), overrides=overrides)
        found = self.hf_layer_count(family)
        mtp_found = found - dims.num_layers
        if mtp_found and mtp_found != int(self.config.get("num_nextn_predict_layers") or 0):
            raise ConvertError(f"{self.dir}: config.json says {dims.num_layers} layers but the weights hold {found}")
        if dims.mtp_num_layers > mtp_found:
            raise UsageError(f"--mtp-num-layers {dims.mtp_num_layers}: {self.dir} holds "
                             f"{mtp_found} multi-token-prediction layer(s)")
        return dims

    def unconverted_mtp_layers(self, family: ModelFamily, dims: ModelDims) -> int:
        """MTP layers the checkpoint holds beyond the ones asked for."""
        return self.hf_layer_count(family) - dims.num_layers - dims.mtp_num_layers

    def check_accounted(self, family: ModelFamily, dims: ModelDims, mtp_asked: bool) -> None:
        """Stop unless the family converts every tensor of the checkpoint (or it is derivable, or
        in an MTP layer the user chose to leave out) and finds every tensor it needs."""
        skipped = self.unconverted_mtp_layers(family, dims)
        if skipped and not mtp_asked:
            first = dims.num_layers + dims.mtp_num_layers
            raise UsageError(f"--load-dir {self.dir}: holds {skipped} multi-token-prediction layer(s) "
                             f"(model.layers.{first}.*); pass --mtp-num-layers {skipped + dims.mtp_num_layers} to "
                             f"convert them, or --mtp-num-layers {dims.mtp_num_layers} to leave them out")
        kept = dims.num_layers + dims.mtp_num_layers
        missing, left = mapping.hf_accounting(family, dims, self.tensor_names(), range(kept, kept + skipped))
        if not missing and not left:
            return

        named = families_for_config(self.config, family.cfg_path)  # the ones config.json names come first
        fitting = sorted(mapping.families_fitting(self.config, self.tensor_names(), family.cfg_path),
                         key=lambda name: name not in named)
        # of those, the ones that also convert the model config.json describes, where any do
        fitting = [n for n in fitting if load_family(n, family.cfg_path).fits_config(self.config)] or fitting
        hint = (f"families that convert it whole: {', '.join(fitting)}" if fitting
                else "no family in the model config converts it whole")
        if left:
            shown = ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
            raise UsageError(f"--load-dir {self.dir}: --model-type-hf {family.name} would leave behind "
                             f"{len(left)} tensor(s): {shown} ({hint})")
        raise UsageError(f"--load-dir {self.dir}: --model-type-hf {family.name} needs tensor '{missing[0]}' "
                         f"({len(missing)} missing in all) ({hint})")

    def check_mtp_copies(self, family: ModelFamily, dims: ModelDims, block_bytes: int = 64 << 20) -> None:
        """Stop unless every converted MTP layer's embedding and output head are copies of the main
        model's: Megatron's MTP layers share those, so a different copy would be left behind.
        Compared a block of rows at a time (memory: two blocks)."""
        main = {mapping.EMBEDDING: family.hf_name("embedding_word_embeddings"),
                mapping.OUTPUT_LAYER: family.hf_name("embedding_word_embeddings" if dims.tie_word_embeddings
                                                     else "output_layer")}
        for k in range(dims.mtp_num_layers):
            for rule in mapping.mtp_rules(family, dims, k):
                if rule.mcore not in mapping.MTP_COPIES or rule.hf[0] not in self.weight_map:
                    continue
                copy, original = rule.hf[0], main[rule.mcore]
                (shape, dtype), (main_shape, main_dtype) = self.shape_dtype(copy), self.shape_dtype(original)
                if (shape, dtype) != (main_shape, main_dtype):
                    raise ConvertError(f"{self.dir}: '{copy}' {list(shape)} {dtype} is not a copy of '{original}' "
                                       f"{list(main_shape)} {main_dtype}; Megatron's MTP layers share the main "
                                       f"model's, so it would be left behind")
                rows = max(1, block_bytes // max(1, math.prod(shape[1:]) * dtype.itemsize))
                a, b = torch.empty((rows, *shape[1:]), dtype=dtype), torch.empty((rows, *shape[1:]), dtype=dtype)
                for start in range(0, shape[0], rows):
                    stop = min(start + rows, shape[0])
                    self.read_rows(copy, start, stop, a[:stop - start])
                    self.read_rows(original, start, stop, b[:stop - start])
                    if not torch.equal(a[:stop - start].view(torch.uint8), b[:stop - start].view(torch.uint8)):
                        raise ConvertError(f"{self.dir}: '{copy}' differs from '{original}' (in rows {start}-{stop - 1});"
                                           f" Megatron's MTP layers share the main model's, so it would be left behind")

    def dtype(self, family: ModelFamily | None = None) -> torch.dtype:
        """The model's dtype: its embedding's (a few tensors may be stored in another, e.g. the
        fp32 routers transformers 5.24 writes into a bf16 DeepSeek-V3; FP8 weights read as this)."""
        embedding = family.hf_name("embedding_word_embeddings") if family else "model.embed_tokens.weight"
        if embedding not in self.weight_map:
            embedding = next((n for n in self.weight_map if n not in self.quantized), next(iter(self.weight_map)))
        dtype = self.stored_shape_dtype(embedding)[1]
        return torch.bfloat16 if dtype in quantized.FP8_DTYPES else dtype

    def tokenizer_files(self) -> list[Path]:
        return [self.dir / name for name in TOKENIZER_FILES if (self.dir / name).is_file()]


def _read_slab(source: HfSource, rule: mapping.TensorRule, stored: tuple, out: torch.Tensor) -> None:
    """One routed expert's tensor from its slab of a fused HF tensor (one expert's bytes read)."""
    (shape, dtype), (index, count) = stored, rule.slab
    if shape[0] != count:
        raise RuntimeError(f"expected {count} stacked experts")
    slab = torch.empty((1, *shape[1:]), dtype=dtype)
    source.read_rows(rule.hf[0], index, index + 1, slab)
    rule.to_mcore([slab[0]], out=out)


def _gather(source: HfSource, rules: list[mapping.TensorRule], dims: ModelDims, arena,
            computed=lambda rule: True) -> dict:
    """The message tensors for `rules`, built in `arena`; bytes of those the target does not
    compute on (`computed`) may stay in their file for the saver (the kernel-copy path)."""
    tensors = {}
    for rule in rules:
        expected = rule.shape
        shapes = [source.shape_dtype(name) for name in rule.hf]
        for name, (_, dtype) in zip(rule.hf, shapes):
            if not dtype.is_floating_point:
                raise ConvertError(f"{source.dir}: tensor '{name}' is {str(dtype).replace('torch.', '')}; "
                                   f"model weights must be floating point")
        described = ", ".join(f"{n} {list(shape)}" for n, (shape, _) in zip(rule.hf, shapes))
        out = arena.alloc(expected, shapes[0][1])
        try:
            if rule.slab is not None:
                _read_slab(source, rule, shapes[0], out)
            else:  # every HF row range is read straight to its place: no merge copy
                unchanged = rule.fold is None and not computed(rule) and \
                    not any(n in source.quantized or n in source.mxfp4 for n in rule.hf)
                with kernel_copy.placing() if unchanged else contextlib.nullcontext():
                    for name, (shape, _), targets in zip(rule.hf, shapes, rule.part_targets(out)):
                        if sum(stop - start for start, stop, _ in targets) != shape[0] \
                                or any(tuple(shape[1:]) != tuple(view.shape[1:]) for _, _, view in targets):
                            raise RuntimeError("shape mismatch")
                        for start, stop, view in targets:
                            source.read_rows(name, start, stop, view)
        except RuntimeError as exc:
            raise ConvertError(f"{source.dir}: cannot build {rule.mcore} {list(expected)} from {described} "
                               f"({str(exc).splitlines()[0]})") from None
        if rule.fold is not None:
            rule.fold(out)
        tensors[rule.mcore] = out
    return tensors


def load(plan, sender) -> dict:
    """Stream the HF checkpoint in `plan.source.path` as whole Megatron tensors."""
    source = HfSource(plan.source.path, dequantize_to=plan.target.params_dtype)
    family, dims = plan.family, plan.dims
    dtype = source.dtype(family)
    messages = list(mapping.model_messages(family, dims, dtype))
    largest = max(message_bytes(t.nbytes for t in tensors.values()) for _, _, tensors in messages)
    sender.plan(largest)
    dtypes = {}  # tensors stored in another dtype (e.g. an fp32 router bias in a bf16 model)
    for kind, layer, _ in messages:
        for rule in mapping.message_rules(kind, family, dims, layer):
            own = source.shape_dtype(rule.hf[0])[1]
            if own != dtype:
                dtypes[mapping.message_key(kind, layer, rule.mcore)] = own
    config = {k: v for k, v in source.config.items() if k != "quantization_config"}  # written dequantized
    sender.send("meta", dims=dims.to_dict(), source="hf", hf_config=config, dtype=dtype, dtypes=dtypes)
    cast = plan.target.params_dtype is not None and plan.target.params_dtype != dtype  # every tensor computed on

    def computed(rule):
        return cast or rule.mcore in plan.target.computed

    for kind, layer, _ in messages:
        if not workers.wanted(plan, kind, layer):  # another worker's (--workers)
            continue
        arena = sender.arena()
        tensors = _gather(source, mapping.message_rules(kind, family, dims, layer), dims, arena, computed)
        sender.send(kind, tensors, arena, layer=layer)
    sender.send("done")
    return {}


class HfSourceFormat(registry.SourceFormat):
    name = "hf"
    description = "Hugging Face model folder (*.safetensors or pytorch_model*.bin, config.json)"
    loader = "modellink_ckpt.loaders.hf:load"

    def describe(self, request: registry.SourceRequest) -> registry.SourceInfo:
        source = HfSource(request.path)
        dims = source.dims(request.family, request.overrides)
        source.check_accounted(request.family, dims, mtp_asked=request.overrides.get("mtp_num_layers") is not None)
        source.check_mtp_copies(request.family, dims)
        return registry.SourceInfo(dims=dims, dtype=source.dtype(request.family),
                                   config_path=source.dir / "config.json")

    def family_hint(self, path: Path, cfg_path=None) -> tuple[str, str] | None:
        source = HfSource(path)
        try:
            return mapping.family_of_hf(source.config, source.tensor_names(), cfg_path)
        except UsageError as exc:
            raise UsageError(f"--load-dir {path}: {exc} (see README: model families)") from None

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / "config.json").is_file() and \
            (any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")))

    def inspect(self, path: Path) -> dict:
        source = HfSource(path)
        files = {}
        for name in sorted(set(source.weight_map.values())):
            files[name] = (path / name).stat().st_size
        dtypes, params = registry.census(source.stored_shape_dtype(name) for name in source.weight_map)
        config = source.config
        try:
            family = "{} ({})".format(*self.family_hint(path))
        except UsageError:
            family = "no entry converts it"
        return {"format": "hf", "model_type": config.get("model_type"), "architectures": config.get("architectures"),
                "family (--model-type-hf)": family,
                "layers": config.get("num_hidden_layers"), "hidden": config.get("hidden_size"),
                "tensors": len(source.weight_map), "parameters": params, "dtypes": dtypes, "files": files}


SOURCE = HfSourceFormat()
