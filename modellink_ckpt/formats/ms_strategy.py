"""MindSpore strategy files: which slice of every parameter each rank holds.

A strategy file is the protobuf `ParallelStrategyMap` (`mindspore.straspb`): per parameter a
device matrix `D`, a tensor map (per tensor dimension: the device axis that splits it, counted from
the right, or -1), an optimizer-shard group (`opt_weight_shard_size` S, `opt_weight_shard_step` P)
and, through the strategy items, the pipeline stage. One formula serves every parameter:

    r_local = rank mod prod(D)                  (rank = stage * prod(D) + r_local)
    coord_k = (r_local // prod(D[n-k:])) mod D[n-1-k]
    tensor dim i with map k >= 0 is cut into D[n-1-k] equal chunks; the rank holds chunk coord_k
    optimizer shard: that slice's dim 0 is cut again into S chunks (S = -1: all the devices that
    hold the same slice); the rank holds chunk (r_local // P) mod S

Read from a strategy file (`.ckpt` protobuf or `.json`), a pipeline-merged file (names
`"<stage>-<param>"`), or a folder of per-rank files (`ckpt_strategy_rank_*.ckpt`); written by
`write_strategy` (hand-made targets, tests). No MindSpore or protobuf package is needed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

from modellink_ckpt.errors import ConvertError, UsageError
from modellink_ckpt.formats import protobuf_wire as W

_MERGED_NAME = re.compile(r"^(\d+)-(.+)$")


# ---- protobuf wire format (just what these messages use) ----------------------------------------


def _fields(data: bytes, where: str) -> list[tuple[int, int, int | bytes]]:
    """[(field number, wire type, int or bytes)] of one message."""
    out, pos = [], 0

    def varint() -> int:
        nonlocal pos
        value, pos = W.read_varint(data, pos, len(data), where)
        return value

    while pos < len(data):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            out.append((field, wire, varint()))
        elif wire == 2:
            length = varint()
            if pos + length > len(data):
                raise ConvertError(f"{where}: corrupt strategy file (a field runs past the end)")
            out.append((field, wire, data[pos:pos + length]))
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ConvertError(f"{where}: not a strategy file (wire type {wire})")
    return out


def _ints(message: bytes, where: str) -> list[int]:
    """The repeated `dim = 1` of DevMatrix / TensorMap / ..., packed or not."""
    values = []
    for field, wire, value in _fields(message, where):
        if field == 1 and wire == 0:
            values.append(W.signed(value))
        elif field == 1 and wire == 2:
            values += [W.signed(v) for v in _packed_values(value, where)]
    return values


def _packed_values(data: bytes, where: str) -> list[int]:
    values, pos = [], 0
    while pos < len(data):
        value, pos = W.read_varint(data, pos, len(data), where)
        values.append(value)
    return values


def _ints_message(values) -> bytes:
    return b"".join(W.scalar(1, v) for v in values)


# ---- the model ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParamLayout:
    """Where the slices of one parameter live."""

    dev_matrix: tuple[int, ...]
    tensor_map: tuple[int, ...]
    opt_shard_step: int = 0
    opt_shard_size: int = 0
    stage: int = 0

    @property
    def devices(self) -> int:
        return math.prod(self.dev_matrix)

    def splits(self) -> tuple[int, ...]:
        """Into how many chunks each tensor dimension is cut (before the optimizer shard)."""
        n = len(self.dev_matrix)
        return tuple(1 if k < 0 else self.dev_matrix[n - 1 - k] for k in self.tensor_map)

    def opt_shards(self) -> int:
        size = self.opt_shard_size
        if size == -1:
            return self.devices // math.prod(self.splits())
        return max(size, 1)

    def local_slice(self, shape: tuple[int, ...], local_rank: int) -> tuple[tuple[int, int], ...]:
        """[(start, stop)] per dimension of the slice device `local_rank` of the stage holds."""
        n = len(self.dev_matrix)
        ranges = []
        for dim, (length, k) in enumerate(zip(shape, self.tensor_map)):
            if k < 0:
                ranges.append((0, length))
                continue
            parts = self.dev_matrix[n - 1 - k]
            coord = (local_rank // math.prod(self.dev_matrix[n - k:])) % parts
            size = length // parts
            ranges.append((coord * size, (coord + 1) * size))
        if self.opt_shard_size and ranges:
            shards = self.opt_shards()
            start, stop = ranges[0]
            size = (stop - start) // shards
            chunk = (local_rank // max(self.opt_shard_step, 1)) % shards
            ranges[0] = (start + chunk * size, start + (chunk + 1) * size)
        return tuple(ranges)

    def check_shape(self, shape: tuple[int, ...], name: str, source: str) -> None:
        if len(shape) != len(self.tensor_map):
            raise ConvertError(f"{source}: '{name}' has {len(shape)} dimensions, its tensor map {list(self.tensor_map)} "
                               f"has {len(self.tensor_map)} (the strategy is for another model)")
        splits = list(self.splits())
        if self.opt_shard_size and splits:
            splits[0] *= self.opt_shards()
        for length, parts in zip(shape, splits):
            if length % parts:
                raise ConvertError(f"{source}: '{name}' {list(shape)} does not split into {splits} equal slices "
                                   f"(the strategy is for another model)")


@dataclasses.dataclass
class Strategy:
    """Every parameter's layout; ranks are `stage * devices + local rank`."""

    layouts: dict[str, ParamLayout]
    source: str

    @property
    def stages(self) -> int:
        return 1 + max((layout.stage for layout in self.layouts.values()), default=0)

    @property
    def devices(self) -> int:
        """Devices per stage (every parameter's device matrix covers them)."""
        return max((layout.devices for layout in self.layouts.values()), default=1)

    @property
    def world_size(self) -> int:
        return self.stages * self.devices

    def holds(self, name: str, rank: int) -> bool:
        """Whether `rank` holds a slice of `name` (parameters not in the strategy: every rank)."""
        layout = self.layouts.get(name)
        return layout is None or rank // self.devices == layout.stage

    def slice_of(self, name: str, shape: tuple[int, ...], rank: int) -> tuple[tuple[int, int], ...]:
        layout = self.layouts.get(name)
        if layout is None:
            return tuple((0, n) for n in shape)
        return layout.local_slice(shape, rank % self.devices)

    def holders(self, name: str, shape: tuple[int, ...]) -> dict[tuple[tuple[int, int], ...], list[int]]:
        """{distinct slice: every rank that holds it (its replicas)}."""
        found: dict[tuple[tuple[int, int], ...], list[int]] = {}
        for rank in range(self.world_size):
            if self.holds(name, rank):
                found.setdefault(self.slice_of(name, shape, rank), []).append(rank)
        return found

    def check(self) -> None:
        sizes = {layout.devices for layout in self.layouts.values()}
        if len(sizes) > 1:
            raise ConvertError(f"{self.source}: device matrices of different sizes {sorted(sizes)} in one strategy")


def _layout_of(message: bytes, where: str) -> tuple[ParamLayout, dict]:
    dev, maps, extra = [], [], {"field": 0, "split": [], "offset": []}
    step = size = 0
    for field, _, value in _fields(message, where):
        if field == 1:
            dev.append(_ints(value, where))
        elif field == 2:
            maps.append(_ints(value, where))
        elif field == 3:
            extra["split"] += _ints(value, where)
        elif field == 4:
            extra["offset"] += _ints(value, where)
        elif field == 5:
            extra["field"] = W.signed(value, 32)
        elif field == 6:
            step = W.signed(value, 32)
        elif field == 7:
            size = W.signed(value, 32)
    if len(dev) != 1 or not maps:
        raise ConvertError(f"{where}: a parameter layout without one device matrix and a tensor map")
    return ParamLayout(tuple(dev[0]), tuple(maps[0]), step, size), {**extra, "maps": len(maps)}


def _parse_proto(data: bytes, where: str) -> tuple[int, dict[str, tuple[ParamLayout, dict]], list[int]]:
    current_stage, layouts, stages = 0, {}, []
    for field, _, value in _fields(data, where):
        if field == 1:
            current_stage = value
        elif field == 2:  # ParallelStrategyItem: node name, ParallelStrategys{stage, ...}
            for f, _, v in _fields(value, where):
                if f == 2:
                    stages += [s for ff, _, s in _fields(v, where) if ff == 1]
        elif field == 3:  # ParallelLayoutItem: param name, ParallelLayouts
            name, body = None, None
            for f, _, v in _fields(value, where):
                if f == 1:
                    name = v.decode("utf-8", "replace")
                elif f == 2:
                    body = v
            if name is None or body is None:
                raise ConvertError(f"{where}: a parameter layout item without a name or layout")
            layouts[name] = _layout_of(body, f"{where} '{name}'")
    return current_stage, layouts, stages


def _parse_json(text: str, where: str):
    try:
        data = json.loads(text)
        items = data.get("parallel_layout_item") or {}
        layouts = {}
        for name, item in items.items():
            maps = item["tensor_map"]
            if maps and isinstance(maps[0], list):
                maps = maps if len(maps) > 1 else maps[0]
            layout = ParamLayout(tuple(item["dev_matrix"]), tuple(maps) if not isinstance(maps[0], list) else (),
                                 int(item.get("opt_weight_shard_step", 0)), int(item.get("opt_weight_shard_size", 0)))
            extra = {"field": int(item.get("field", 0)), "split": list(item.get("param_split_shape") or []),
                     "offset": list(item.get("indices_offset") or []),
                     "maps": len(item["tensor_map"]) if maps and isinstance(item["tensor_map"][0], list) else 1}
            layouts[name] = (layout, extra)
        stages = [int(v.get("stage", 0)) for v in (data.get("parallel_strategy_item") or {}).values()]
        return int(data.get("current_stage", 0)), layouts, stages
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ConvertError(f"{where}: not a MindSpore strategy JSON ({type(exc).__name__}: {exc})") from None


def _read_one(path: Path) -> dict[str, ParamLayout]:
    where = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConvertError(f"{path}: cannot read ({exc.strerror})") from None
    if not raw:
        raise ConvertError(f"{path}: empty strategy file")
    current, items, _ = _parse_json(raw.decode("utf-8", "replace"), where) if path.suffix == ".json" \
        else _parse_proto(raw, where)
    if not items:
        raise ConvertError(f"{path}: the strategy file holds no parameter layouts")
    merged = all(_MERGED_NAME.match(name) for name in items)
    layouts = {}
    for name, (layout, extra) in items.items():
        if extra["maps"] > 1:
            raise ConvertError(f"{path}: '{name}' splits one dimension over several device axes, which is not supported")
        if extra["field"] or extra["split"] or extra["offset"]:
            raise ConvertError(f"{path}: '{name}' uses a field / manual split layout, which is not supported")
        stage = current
        if merged:
            match = _MERGED_NAME.match(name)
            stage, name = int(match.group(1)), match.group(2)
        layouts[name] = dataclasses.replace(layout, stage=stage)
    return layouts


def load_strategy(path: str | Path, flag: str = "--src-strategy") -> Strategy:
    """A strategy from a file, a merged file or a folder of per-rank files."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.ckpt")) + sorted(path.glob("*.json"))
        if not files:
            raise UsageError(f"{flag} {path}: no strategy files (*.ckpt, *.json) in that folder")
        layouts: dict[str, ParamLayout] = {}
        for file in files:
            for name, layout in _read_one(file).items():
                if name in layouts and layouts[name] != layout:
                    raise ConvertError(f"{file}: '{name}' is laid out differently than in another file of {path}")
                layouts[name] = layout
    elif path.is_file():
        layouts = _read_one(path)
    else:
        raise UsageError(f"{flag} {path}: no such strategy file or folder")
    strategy = Strategy(layouts, str(path))
    strategy.check()
    return strategy


def write_strategy(path: str | Path, layouts: dict[str, ParamLayout], stage: int | None = None,
                   merged: bool = False) -> None:
    """A strategy file as MindSpore writes one (`merged`: pipeline-merged names `<stage>-<param>`;
    else the layouts of one stage, `stage`)."""
    stages = sorted({layout.stage for layout in layouts.values()}) if merged else [stage or 0]
    body = W.scalar(1, 1 if merged else (stage or 0))
    for s in stages:  # MindSpore refuses a file without a strategy item carrying the stage
        strategys = W.scalar(1, s) + W.message(2, W.message(1, _ints_message([1])))
        body += W.message(2, W.message(1, f"Default/stage-{s}".encode()) + W.message(2, strategys))
    for name, layout in layouts.items():
        item = (W.message(1, _ints_message(layout.dev_matrix)) + W.message(2, _ints_message(layout.tensor_map))
                + W.message(3, b"") + W.message(4, b"") + W.scalar(5, 0)
                + W.scalar(6, layout.opt_shard_step) + W.scalar(7, layout.opt_shard_size))
        key = f"{layout.stage}-{name}" if merged else name
        body += W.message(3, W.message(1, key.encode()) + W.message(2, item))
    Path(path).write_bytes(body)
