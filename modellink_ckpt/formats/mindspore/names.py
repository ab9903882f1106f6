"""How MindSpore Transformers (MindFormers) names and lays out a model's tensors, as data.

Messages carry Megatron tensors; a MindFormers checkpoint spells them one of a few ways, each a
*naming* in `model_cfg.json` (section `mindspore` of a family entry, inherited through
`__base__`): `mcore` (MindFormers' Megatron-like names; default), `mcore-contiguous` (the same with
`use_interleaved_weight_layout_mlp: False`: fc1 as [gate; up]), `legacy` (the `convert_weight.py`
models: Llama `attention.wq`, `feed_forward.w1`, ...) and `legacy-concat` (legacy with
`qkv_concat`: `w_qkv`, `w_gate_hidden`). A naming is a list of rules

    {"ms": <MindSpore name(s)>, "mg": <Megatron name(s)>, "transform": <name>}

with the templates `[layer_idx]` (`.L`, the global layer) and `[expert_idx]` (`.e`). A Megatron
template with `[expert_idx]` whose MindSpore side has none stands for all experts, in order (a
stacked tensor). A rule applies where every Megatron tensor it names is in the model; tensors no
rule names keep their Megatron names under `mcore` and are an error under the legacy namings.
Transforms are inverse pairs on whole tensors (`transforms.py`), also valid on meta tensors, so the
files and shapes of a target are known before any data is read.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.model import mapping
from modellink_ckpt.model import transforms as T

NAMINGS = ("mcore", "mcore-contiguous", "legacy", "legacy-concat")  # defined in the base entry
LAYER = "decoder.layers"

# MindSpore tensors that are no model weights: training state and router statistics. A source may
# hold them; they are reported and not converted.
TRAINING_STATE_PREFIXES = ("adam_m.", "adam_v.", "accu_grads.", "exp_avg.", "exp_avg_sq.", "moments.")
TRAINING_STATE_NAMES = ("global_step", "epoch_num", "step_num", "scale_sense", "loss_scale", "learning_rate",
                        "current_iterator_step", "last_overflow_iterator_step", "beta1_power", "beta2_power")
BUFFER_SUFFIXES = ("router.fi_accu", "router.expert_load", "router.local_tokens_per_expert")


def is_training_state(name: str) -> bool:
    return name.startswith(TRAINING_STATE_PREFIXES) or name in TRAINING_STATE_NAMES or name.endswith(BUFFER_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class Transform:
    """`to_ms(parts, ctx)` -> MindSpore tensors; `from_ms(tensors, part_shapes, ctx)` -> parts."""

    to_ms: Callable
    from_ms: Callable


def _qkv_sizes(ctx):
    return ctx.num_attention_heads, ctx.num_query_groups, ctx.kv_channels


TRANSFORMS = {
    "rename": Transform(lambda p, c: list(p), lambda t, s, c: list(t)),
    "interleave_halves": Transform(lambda p, c: [T.interleave_halves(p[0])],
                                   lambda t, s, c: [T.deinterleave_halves(t[0])]),
    "split_qkv": Transform(lambda p, c: list(T.split_qkv(p[0], *_qkv_sizes(c))),
                           lambda t, s, c: [T.merge_qkv(*t, c.num_query_groups)]),
    # one tensor, [Q; K; V] one after the other (ChatGLM's query_key_value) <-> Megatron's per-group order
    "contiguous_qkv": Transform(lambda p, c: [T.cat(list(T.split_qkv(p[0], *_qkv_sizes(c))), dim=0)],
                                lambda t, s, c: [T.merge_qkv(*T.unpack_hf_qkv(t[0], *_qkv_sizes(c)),
                                                             c.num_query_groups)]),
    "split_halves": Transform(lambda p, c: list(T.split_gate_up(p[0])),
                              lambda t, s, c: [T.cat(list(t), dim=0)]),
    "cat_rows": Transform(lambda p, c: [T.cat(list(p), dim=0)],
                          lambda t, s, c: list(torch.split(t[0], [shape[0] for shape in s], dim=0))),
    "stack_transposed": Transform(lambda p, c: [T.stack_transposed(list(p))],
                                  lambda t, s, c: T.unstack_transposed(t[0], len(s))),
    "stack": Transform(lambda p, c: [T.stack(list(p))], lambda t, s, c: list(t[0].unbind(0))),
    "stack_halves": Transform(lambda p, c: list(T.stack_halves(list(p))),
                              lambda t, s, c: T.unstack_halves(t[0], t[1])),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    ms: tuple[str, ...]
    mg: tuple[str, ...]
    transform: str = "rename"
    when: str | None = None  # a ModelDims field that must be true (e.g. "swiglu")

    @classmethod
    def from_json(cls, entry: dict, where: str) -> "Rule":
        try:
            ms, mg = entry["ms"], entry["mg"]
        except (KeyError, TypeError):
            raise UsageError(f"{where}: a MindSpore naming rule needs 'ms' and 'mg' ({entry!r})") from None
        rule = cls(tuple([ms] if isinstance(ms, str) else ms), tuple([mg] if isinstance(mg, str) else mg),
                   entry.get("transform", "rename"), entry.get("when"))
        if rule.transform not in TRANSFORMS:
            raise UsageError(f"{where}: unknown transform {rule.transform!r} (known: {', '.join(TRANSFORMS)})")
        return rule


@dataclasses.dataclass(frozen=True)
class Instance:
    """A rule applied to one layer (and expert): concrete names."""

    ms: tuple[str, ...]
    mg: tuple[str, ...]
    transform: Transform


def _fill(template: str, layer: int | None, expert: int | None = None) -> str:
    if layer is not None:
        template = template.replace("[layer_idx]", f".{layer}")
    if expert is not None:
        template = template.replace("[expert_idx]", f".{expert}")
    return template


class MsNaming:
    """One naming of one family: Megatron message tensors <-> MindSpore tensors."""

    def __init__(self, name: str, rules: list[Rule], family: str):
        self.name, self.rules, self.family = name, rules, family
        self.keeps_megatron_names = name.startswith("mcore")

    def instances(self, layer: int | None, present: set[str], dims) -> list[Instance]:
        """The rules that apply to a message whose Megatron (global) names are `present`."""
        found, num_experts = [], dims.num_experts
        for rule in self.rules:
            if rule.when is not None and not getattr(dims, rule.when):
                continue
            stacked = any("[expert_idx]" in t for t in rule.mg) and not any("[expert_idx]" in t for t in rule.ms)
            experts = [None] if stacked or not any("[expert_idx]" in t for t in rule.mg) else range(num_experts)
            for expert in experts:
                if stacked:
                    mg = tuple(_fill(t, layer, e) for t in rule.mg for e in range(num_experts))
                else:
                    mg = tuple(_fill(t, layer, expert) for t in rule.mg)
                if mg and all(name in present for name in mg) and \
                        all(("[layer_idx]" in t) == (layer is not None) for t in rule.mg):
                    found.append(Instance(tuple(_fill(t, layer, expert) for t in rule.ms), mg,
                                          TRANSFORMS[rule.transform]))
        return found

    def plan(self, kind: str, layer: int | None, message: dict, dims) -> list[Instance]:
        """Every Megatron tensor of one message, covered once: the rules' instances plus renames."""
        names = set(message)
        instances = self.instances(layer, names, dims)
        covered = [name for inst in instances for name in inst.mg]
        if len(covered) != len(set(covered)):
            twice = sorted({n for n in covered if covered.count(n) > 1})[0]
            raise UsageError(f"model_cfg.json: MindSpore naming '{self.name}' of '{self.family}' names "
                             f"'{twice}' in two rules")
        left = sorted(names - set(covered))
        if left and not self.keeps_megatron_names:
            raise UsageError(f"MindSpore naming '{self.name}' of --model-type-hf {self.family} has no name for "
                             f"'{left[0]}' ({len(left)} tensor(s) in all); use --ms-naming mcore or add a rule "
                             f"to model_cfg.json")
        return instances + [Instance((name,), (name,), TRANSFORMS["rename"]) for name in left]


def global_message(kind: str, layer: int | None, tensors: dict) -> dict:
    """A message's tensors under their global Megatron names (layer tensors get `decoder.layers.L.`)."""
    if kind == "layer":
        return {f"{LAYER}.{layer}.{name}": tensor for name, tensor in tensors.items()}
    if kind == "mtp_layer":
        raise UsageError("MindSpore targets and sources: multi-token-prediction layers are not supported")
    return dict(tensors)


def local_name(kind: str, layer: int | None, name: str) -> str:
    return name[len(f"{LAYER}.{layer}."):] if kind == "layer" else name


def to_ms(naming: MsNaming, kind: str, layer: int | None, tensors: dict, dims) -> dict[str, torch.Tensor]:
    """{MindSpore name: tensor} of one message (works on meta tensors too)."""
    return dict(to_ms_items(naming, kind, layer, tensors, dims))


def to_ms_items(naming: MsNaming, kind: str, layer: int | None, tensors: dict, dims,
                gather: Callable[[Instance, list], list | None] | None = None):
    """(MindSpore name, tensor) of one message, a rule instance at a time: an instance's tensors
    are made only once the caller has taken the previous one's. `gather(instance, Megatron
    tensors)`, where given, may make an instance's MindSpore tensors itself (None: the transform)."""
    message = global_message(kind, layer, tensors)
    for inst in naming.plan(kind, layer, message, dims):
        parts = [message[n] for n in inst.mg]
        made = gather(inst, parts) if gather is not None else None
        for name, tensor in zip(inst.ms, made if made is not None else inst.transform.to_ms(parts, dims)):
            yield name, T.as_tensor(tensor)


# transforms whose MindSpore tensors are row blocks of the Megatron ones (bytes unchanged)
ROW_BLOCKS = ("rename", "split_halves")


def reordered_names(naming: MsNaming, dims) -> set[str]:
    """The Megatron message tensors (message-local names) that `naming` may reorder or join on the
    way to MindSpore, rather than take their bytes as they are (from the rules alone: a hint)."""
    prefix, found = f"{LAYER}[layer_idx].", set()
    for rule in naming.rules:
        if rule.transform in ROW_BLOCKS or (rule.when is not None and not getattr(dims, rule.when)):
            continue
        for template in rule.mg:
            local = template.removeprefix(prefix)
            experts = range(dims.num_experts or 0) if "[expert_idx]" in local else [None]
            found.update(_fill(local, None, expert) for expert in experts)
    return found


def model_ms_tensors(naming: MsNaming, family, dims, dtypes: "mapping.TensorDtypes"):
    """(kind, layer, {MindSpore name: meta tensor}) of every message: names, shapes and dtypes of
    the MindSpore checkpoint, from the model sizes alone."""
    for kind, layer, tensors in mapping.model_messages(family, dims, dtypes.default):
        typed = {name: t.to(dtypes.of(kind, layer, name)) for name, t in tensors.items()}
        yield kind, layer, to_ms(naming, kind, layer, typed, dims)


def from_ms(naming: MsNaming, kind: str, layer: int | None, shapes: dict[str, tuple], dims,
            read: Callable[[str], torch.Tensor],
            place: Callable[[Instance, list], list | None] | None = None) -> dict[str, torch.Tensor]:
    """One message's tensors (local names) from MindSpore tensors that `read(name)` returns;
    `shapes` are the message tensors' shapes (global names as `global_message` gives them).
    `place(instance, part shapes)`, where given, may build an instance's parts itself (the loader
    reads them straight into the message's memory); None leaves them to the transform."""
    out = {}
    for inst in naming.plan(kind, layer, shapes, dims):
        part_shapes = [shapes[n] for n in inst.mg]
        parts = place(inst, part_shapes) if place is not None else None
        if parts is None:
            parts = inst.transform.from_ms([read(name) for name in inst.ms], part_shapes, dims)
        for name, part in zip(inst.mg, parts):
            if tuple(part.shape) != tuple(shapes[name]):
                raise ConvertError(f"MindSpore tensor(s) {', '.join(inst.ms)} give '{name}' {list(part.shape)}, "
                                   f"expected {list(shapes[name])} (another model or naming?)")
            out[local_name(kind, layer, name)] = part
    return out


def _moved_rows(transform: Transform, run: Callable[[list], list], shapes: list[tuple]) -> list | None:
    """`run` (a transform's one direction) applied to the row numbers of tensors of `shapes` (rows:
    vectors along the last dimension, which they all share), taken one after the other: its
    outputs as row numbers, where it only moves whole rows; None where it does anything else."""
    if transform is TRANSFORMS["stack_transposed"] or any(len(s) < 2 or s[-1] != shapes[0][-1] for s in shapes):
        return None
    numbers, start = [], 0
    for shape in shapes:
        count = torch.Size(shape[:-1]).numel()
        numbers.append(torch.arange(start, start + count).reshape(*shape[:-1], 1))
        start += count
    outputs = [T.as_tensor(out) for out in run(numbers)]
    if any(out.dim() < 2 or out.shape[-1] != 1 for out in outputs):
        return None
    return outputs


def row_order(transform: Transform, ms_shapes: list[tuple], part_shapes: list[tuple], dims) -> list | None:
    """Where `transform.from_ms` only moves whole rows, each part's rows as indices into the rows
    of the MindSpore tensors taken one after the other; None for any other transform. Found by
    running the transform on row numbers: whatever it does to rows, it does to their numbers."""
    if any(len(s) < 2 or s[-1] != ms_shapes[0][-1] for s in part_shapes):
        return None
    parts = _moved_rows(transform, lambda numbers: transform.from_ms(
        numbers, [(*s[:-1], 1) for s in part_shapes], dims), list(ms_shapes))
    if parts is None or [tuple(p.shape) for p in parts] != [(*s[:-1], 1) for s in part_shapes]:
        return None
    return [p.reshape(-1).contiguous() for p in parts]


def row_places(transform: Transform, part_shapes: list[tuple], dims) -> tuple[list, torch.Tensor, torch.Tensor] \
        | None:
    """Where `transform.to_ms` only moves whole rows, once each: (the MindSpore tensors' shapes,
    where each row of the parts goes, which part row each MindSpore row takes), the rows of each
    side taken one after the other; None for any other transform."""
    outputs = _moved_rows(transform, lambda numbers: transform.to_ms(numbers, dims), list(part_shapes))
    if outputs is None:
        return None
    order, total = torch.cat([out.reshape(-1) for out in outputs]), sum(torch.Size(s[:-1]).numel() for s in part_shapes)
    if len(order) != total or (total and (order.min() < 0 or order.max() >= total)):
        return None
    places = torch.full((total,), -1)
    places[order] = torch.arange(total)
    if (places < 0).any():
        return None  # a row repeated, another dropped: not a move
    width = part_shapes[0][-1]
    return [(*out.shape[:-1], width) for out in outputs], places, order


def load_naming(family, name: str) -> MsNaming:
    """The MindSpore naming `name` of a family (`family.mindspore` from model_cfg.json)."""
    known = sorted(set(NAMINGS) | set(family.mindspore or {}))
    if name not in known:
        raise UsageError(f"--ms-naming {name}: unknown for --model-type-hf {family.name} (known: {', '.join(known)})")
    return MsNaming(name, _rules(family, name, ()), family.name)


def _rules(family, name: str, seen: tuple) -> list[Rule]:
    """The rules of naming `name`; `{"extends": other}` first takes `other`'s, which the naming's
    own rules replace where they name the same Megatron tensors."""
    entries = (family.mindspore or {}).get(name)
    if entries is None:
        if name == "mcore":
            return []
        raise UsageError(f"--model-type-hf {family.name}: model_cfg.json defines no MindSpore naming '{name}'")
    if name in seen:
        raise UsageError(f"model_cfg.json '{family.name}': MindSpore naming '{name}' extends itself")
    rules: list[Rule] = []
    where = f"model_cfg.json '{family.name}' mindspore.{name}"
    for entry in entries:
        if isinstance(entry, dict) and set(entry) == {"extends"}:
            rules += _rules(family, entry["extends"], seen + (name,))
            continue
        rule = Rule.from_json(entry, where)
        rules = [r for r in rules if r.mg != rule.mg] + [rule]
    return rules


def detect_naming(names) -> str:
    """`legacy`, `legacy-concat`, `legacy-split` or `mcore`, from a checkpoint's tensor names (`mcore-contiguous`
    has `mcore`'s names: a checkpoint in it needs `--ms-naming mcore-contiguous`)."""
    names = set(names)
    if any(n.startswith("model.tok_embeddings.") or ".attention." in n and n.startswith("model.layers.") for n in names):
        return "legacy-concat" if any(".attention.w_qkv." in n for n in names) else "legacy"
    if any(n.startswith("transformer.encoder.") for n in names):  # ChatGLM's names (convert_weight.py --model glm-n)
        return "legacy-split" if any(".self_attention.wq." in n for n in names) else "legacy"
    return "mcore"


def message_shapes(naming, family, dims):
    """(kind, layer, {global Megatron name: shape}) of every message."""
    for kind, layer, tensors in mapping.model_messages(family, dims, torch.float32):
        yield kind, layer, {name: tuple(t.shape) for name, t in global_message(kind, layer, tensors).items()}
