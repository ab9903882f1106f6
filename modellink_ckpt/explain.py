"""`convert_ckpt.py inspect PATH --explain TENSOR` (with a conversion's flags): where one tensor of
the model goes, computed by the rules a conversion uses rather than described.

The tensor's rows and columns are traced: every element of the HF tensor (and of the other HF
tensors feeding the same message tensor) is given its part, row and column as an integer, and the
integers go through the conversion's own code, the family's tensor rule (HF -> message tensor)
and the target's placement (message tensor -> files: TP / EP split, padding, fused layouts). What
arrives in each piece of the target says which rows and columns of the tensor it holds, and where.
"""

from __future__ import annotations

import dataclasses
import difflib

import torch

from modellink_ckpt import registry
from modellink_ckpt.errors import UsageError
from modellink_ckpt.model import mapping

_PART = 1 << 40  # code = (HF part + 1) * _PART + row (or column); 0 is a padding or unrelated element


def find_rule(plan, name: str) -> tuple[str, int | None, mapping.TensorRule, int]:
    """(message kind, layer, rule, part index) of HF tensor `name` in this model."""
    names = []
    for kind, layer, _ in mapping.model_messages(plan.family, plan.dims, torch.float32):
        for rule in mapping.message_rules(kind, plan.family, plan.dims, layer):
            if name in rule.hf:
                return kind, layer, rule, rule.hf.index(name)
            names += rule.hf
    close = difflib.get_close_matches(name, names, n=3)
    raise UsageError(f"--explain {name}: not a tensor of this model as --model-type-hf {plan.family.name} names it"
                     + (f" (did you mean {', '.join(close)}?)" if close else ""))


def _traced_parts(rule: mapping.TensorRule, axis: int) -> list[torch.Tensor]:
    """The rule's HF parts (of a fused expert tensor: the one expert's slab the loader hands it) with
    every element's code along `axis`."""
    parts = []
    shapes = [rule.shape] if rule.is_rename else [tuple(t.shape) for t in rule.to_hf(torch.empty(rule.shape,
                                                                                                 device="meta"))]
    for index, shape in enumerate(shapes):
        ids = torch.arange(shape[axis] if len(shape) > axis else 1, dtype=torch.int64) + (index + 1) * _PART
        view = [1] * max(len(shape), 1)
        view[axis if len(shape) > axis else 0] = -1
        parts.append((ids.view(view) if len(shape) > axis else ids[:1].view(view)).expand(shape).contiguous())
    return parts


def _ranges(values) -> str:
    """`0-15, 32-47` of sorted unique integers."""
    values = sorted(set(int(v) for v in values))
    runs, start = [], None
    for i, value in enumerate(values):
        if start is None:
            start = value
        if i + 1 == len(values) or values[i + 1] != value + 1:
            runs.append(f"{start}-{value}" if value != start else f"{start}")
            start = None
    return ", ".join(runs)


def _held(piece_rows: torch.Tensor, piece_cols: torch.Tensor, part: int) -> tuple[str, str, str, str] | None:
    """(its rows, its columns, at piece rows, at piece columns) of HF part `part` in one piece."""
    rows, cols = piece_rows.reshape(piece_rows.shape[0] if piece_rows.dim() else 1, -1), \
        piece_cols.reshape(piece_cols.shape[0] if piece_cols.dim() else 1, -1)
    mask = (rows // _PART) == part + 1
    if not mask.any():
        return None
    at_rows = mask.any(dim=1).nonzero().flatten().tolist()
    at_cols = mask.any(dim=0).nonzero().flatten().tolist()
    return (_ranges((rows[mask] % _PART).tolist()), _ranges((cols[mask] % _PART).tolist()),
            _ranges(at_rows), _ranges(at_cols))


@dataclasses.dataclass
class Trace:
    """Where HF tensor `name` (part `part` of `rule`) goes: the message tensor's and every target
    piece's element codes, along rows and along columns (`part_of`, `index_of` decode them)."""

    name: str
    kind: str
    layer: int | None
    rule: mapping.TensorRule
    part: int
    message: tuple[torch.Tensor, torch.Tensor]
    pieces: list[tuple[str, str, torch.Tensor, torch.Tensor]]  # (file, tensor name, row codes, column codes)


def part_of(codes: torch.Tensor) -> torch.Tensor:
    """The HF part (0-based) each element comes from; -1 for padding."""
    return codes // _PART - 1


def index_of(codes: torch.Tensor) -> torch.Tensor:
    """The row (or column) in its HF part each element comes from."""
    return codes % _PART


def trace(plan, name: str) -> Trace:
    """Row and column ids of HF tensor `name` (and of the other parts of its rule) through the
    family's rule and the target's placement."""
    kind, layer, rule, part = find_rule(plan, name)
    message = tuple(rule.to_mcore(parts) if not rule.is_rename else parts[0]
                    for parts in (_traced_parts(rule, 0), _traced_parts(rule, 1)))
    target = registry.target(plan.target.format)
    by_axis = [target.pieces(plan, kind, layer, {rule.mcore: codes}) for codes in message]
    pieces = [(file, piece, rows, cols) for (file, piece, rows), (_, _, cols) in zip(*by_axis)]
    return Trace(name, kind, layer, rule, part, message, pieces)


def explain(plan, name: str) -> list[str]:
    """The lines `inspect --explain` prints for HF tensor `name` under `plan`."""
    found = trace(plan, name)
    rule, part = found.rule, found.part
    where = f"layer {found.layer}" if found.layer is not None else found.kind
    lines = [f"{name}: --model-type-hf {plan.family.name}, rule '{rule.mcore}' of {where} "
             f"({'renamed' if rule.is_rename else 'built from ' + ', '.join(rule.hf)}; TP split: {rule.tp})"]
    rows, cols = found.message
    held = _held(rows, cols, part)
    lines.append(f"  message tensor '{rule.mcore}' {list(rows.shape)}: its rows {held[0]} at rows {held[2]}"
                 + (f", columns {held[3]}" if rows.dim() > 1 else ""))
    count = 0
    for file, piece, rows, cols in found.pieces:
        held = _held(rows, cols, part)
        if held is None:
            continue
        count += 1
        its_rows, its_cols, at_rows, at_cols = held
        two_d = rows.dim() > 1
        lines.append(f"  {file}: {piece} {list(rows.shape)}: its rows {its_rows}"
                     + (f" columns {its_cols}" if two_d else "")
                     + f" at rows {at_rows}" + (f", columns {at_cols}" if two_d else ""))
    target = registry.target(plan.target.format)
    lines.append(f"{count} piece(s) in the {target.selected_by.split()[0]} target ({target.where(plan)})")
    return lines
