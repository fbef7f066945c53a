#!/usr/bin/env python3
"""Writes the `.pth` test fixtures of turbo-models without PyTorch.

`torch.save` writes a zip archive (entries stored, not compressed) holding
`<stem>/data.pkl` (the state dict, pickle protocol 2), one `<stem>/data/<key>` entry per
storage, `<stem>/byteorder` and `<stem>/version`. Tensors pickle as
`torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`, parameters
as `torch._utils._rebuild_parameter(tensor, requires_grad, hooks)`, and storages as persistent ids
`('storage', torch.<Kind>Storage, key, 'cpu', numel)`. Stand-ins for the `torch` classes and
functions are registered in `sys.modules`, so the standard pickler emits exactly those globals.

Outputs (run from the repository root: `python3 scripts/make_pth_fixture.py`):
- fixtures/pth/tensors.pth: float32, bfloat16, int8, float64, int64 tensors, a parameter, two
  views into one storage (one at an offset), and the `_metadata` torch attaches to state dicts.
- fixtures/pth/noncontiguous.pth: one transposed tensor (the reader must refuse it by name).
- fixtures/pth/damaged_{offset,shape,claim}.pth: a storage offset, a shape and a size that lie
  about the 4 bytes stored (the reader must refuse each when the file is opened).
- fixtures/pth/damaged_pickle_length.pth: a `data.pkl` string claiming 2.8 GB (found by
  fuzzing), refused before anything is allocated.
- fixtures/pth/dit_t2v_sla-quant.pth: the weights of fixtures/golden/dit_t2v_sla.safetensors in
  the layout of a TurboDiffusion `-quant` release: every block linear except `proj_l` as
  `int8_weight` (int8) + `scale` (f32, one per 128x128 tile) + `bias`, quantised as
  TurboDiffusion does (scale = amax/128, q = clamp(round_half_even(w*128/amax), -128, 127)).
"""

import array
import collections
import io
import json
import pickle
import struct
import sys
import types
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "pth"
GOLDEN = ROOT / "fixtures" / "golden" / "dit_t2v_sla.safetensors"


def _install_fake_torch():
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    tensor_module = types.ModuleType("torch._tensor")
    torch.Tensor = type("Tensor", (), {"__module__": "torch", "__qualname__": "Tensor"})
    storage_classes = {}
    for kind in ["Float", "Double", "Half", "BFloat16", "Byte", "Char", "Int", "Long"]:
        name = f"{kind}Storage"
        cls = type(name, (), {"__module__": "torch", "__qualname__": name})
        setattr(torch, name, cls)
        storage_classes[name] = cls

    def _rebuild_tensor_v2(*args):
        raise NotImplementedError

    def _rebuild_parameter(*args):
        raise NotImplementedError

    def _rebuild_from_type_v2(*args):
        raise NotImplementedError

    for fn, module in [(_rebuild_tensor_v2, utils), (_rebuild_parameter, utils),
                       (_rebuild_from_type_v2, tensor_module)]:
        fn.__module__ = module.__name__
        fn.__qualname__ = fn.__name__
        setattr(module, fn.__name__, fn)
    torch._utils, torch._tensor = utils, tensor_module
    sys.modules["torch"] = torch
    sys.modules["torch._utils"] = utils
    sys.modules["torch._tensor"] = tensor_module
    return torch, utils, tensor_module


TORCH, TORCH_UTILS, TORCH_TENSOR = _install_fake_torch()

# storage class -> (struct format of one element, bytes per element)
ELEMENT = {
    "FloatStorage": ("f", 4),
    "DoubleStorage": ("d", 8),
    "BFloat16Storage": (None, 2),
    "CharStorage": ("b", 1),
    "LongStorage": ("q", 8),
}


class Storage:
    def __init__(self, kind, data: bytes):
        self.kind, self.data, self.key = kind, data, None

    @property
    def numel(self):
        return len(self.data) // ELEMENT[self.kind][1]


class Tensor:
    def __init__(self, storage, shape, stride=None, offset=0):
        self.storage, self.shape, self.offset = storage, tuple(shape), offset
        self.stride = tuple(stride) if stride is not None else row_major_stride(shape)

    def __reduce__(self):
        args = (self.storage, self.offset, self.shape, self.stride, False,
                collections.OrderedDict())
        return TORCH_UTILS._rebuild_tensor_v2, args


class Parameter:
    def __init__(self, tensor):
        self.tensor = tensor

    def __reduce__(self):
        return TORCH_UTILS._rebuild_parameter, (self.tensor, True, collections.OrderedDict())


class SubclassTensor(Tensor):
    """A tensor subclass: pickled through `torch._tensor._rebuild_from_type_v2`."""

    def __reduce__(self):
        function, args = super().__reduce__()
        return TORCH_TENSOR._rebuild_from_type_v2, (function, TORCH.Tensor, args, {})


def row_major_stride(shape):
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= size
    return tuple(reversed(stride))


class StateDictPickler(pickle.Pickler):
    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.storages = []

    def persistent_id(self, obj):
        if not isinstance(obj, Storage):
            return None
        if obj.key is None:
            obj.key = str(len(self.storages))
            self.storages.append(obj)
        return ("storage", getattr(TORCH, obj.kind), obj.key, "cpu", obj.numel)


def save(state_dict, path: Path):
    """Writes `state_dict` as `torch.save` would."""
    buffer = io.BytesIO()
    pickler = StateDictPickler(buffer)
    pickler.dump(state_dict)
    stem = path.stem
    entries = [(f"{stem}/data.pkl", buffer.getvalue()), (f"{stem}/byteorder", b"little")]
    entries += [(f"{stem}/data/{s.key}", s.data) for s in pickler.storages]
    entries.append((f"{stem}/version", b"3\n"))
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in entries:
            # A fixed timestamp keeps the fixtures byte-identical from one run to the next.
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)


def packed(fmt, values):
    return struct.pack(f"<{len(values)}{fmt}", *values)


def bf16_bytes(values):
    """bf16 is the upper half of an f32; the values used are exact in bf16."""
    out = bytearray()
    for v in values:
        bits = struct.unpack("<I", struct.pack("<f", v))[0]
        assert bits & 0xFFFF == 0, f"{v} is not exact in bf16"
        out += struct.pack("<H", bits >> 16)
    return bytes(out)


def state_dict(items):
    sd = collections.OrderedDict(items)
    sd._metadata = collections.OrderedDict([("", {"version": 1})])
    return sd


def tensors_fixture():
    shared = Storage("FloatStorage", packed("f", [0.5 * i for i in range(10)]))
    return state_dict([
        ("float32", Tensor(Storage("FloatStorage", packed("f", [i * 0.25 - 1 for i in range(6)])),
                           (2, 3))),
        ("bfloat16", Tensor(Storage("BFloat16Storage", bf16_bytes([1.0, -2.5, 0.15625, 3072.0])),
                            (4,))),
        ("int8", Tensor(Storage("CharStorage", packed("b", [-128, -1, 0, 1, 127, 42])), (3, 2))),
        ("float64", Tensor(Storage("DoubleStorage", packed("d", [0.1, -0.2])), (2,))),
        ("int64", Tensor(Storage("LongStorage", packed("q", [-(2 ** 40), 7])), (2,))),
        ("param", Parameter(Tensor(Storage("FloatStorage", packed("f", [3.0, -4.0])), (1, 2)))),
        ("subclass", SubclassTensor(Storage("FloatStorage", packed("f", [5.0, 6.0])), (2,))),
        ("view_head", Tensor(shared, (2, 2))),
        ("view_tail", Tensor(shared, (3, 2), offset=4)),
        ("step", 1000),
    ])


def noncontiguous_fixture():
    storage = Storage("FloatStorage", packed("f", [float(i) for i in range(6)]))
    return state_dict([("transposed", Tensor(storage, (3, 2), stride=(1, 3)))])


def damaged_fixtures():
    """One file per way a header can lie about its sizes; the reader must refuse each when
    opened (these used to read element 0, load an empty tensor, or abort on allocation)."""
    four = Storage("FloatStorage", packed("f", [1.0]))
    return {
        # offset * 4 bytes wraps to 0 in 64 bits.
        "damaged_offset.pth": state_dict([("far", Tensor(four, (1,), offset=2 ** 62))]),
        # 2^32 * 2^32 elements wrap to 0.
        "damaged_shape.pth": state_dict([("empty", Tensor(four, (2 ** 32, 2 ** 32)))]),
        # 32 GiB claimed, 4 bytes stored.
        "damaged_claim.pth": state_dict([("huge", Tensor(four, (2 ** 33,)))]),
    }


def save_raw_pickle(pickle_bytes, path: Path):
    """An archive whose `data.pkl` is `pickle_bytes` as given (with a correct CRC)."""
    stem = path.stem
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in [(f"{stem}/data.pkl", pickle_bytes), (f"{stem}/version", b"3\n")]:
            archive.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), data)


# What `scripts/fuzz.sh` (pth_reader) found: a string claiming 0xA9000000 bytes (2.8 GB), which
# candle's unpickler allocated before reading.
PICKLE_LENGTH_LIE = b"\x80\x02}q\x00(X\x00\x00\x00\xa9abc"


def read_safetensors(path: Path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    body = data[8 + length:]
    tensors = collections.OrderedDict()
    for name in sorted(header):
        if name == "__metadata__":
            continue
        info = header[name]
        assert info["dtype"] == "F32", name
        start, end = info["data_offsets"]
        tensors[name] = (info["shape"], array.array("f", body[start:end]))
    return tensors


def to_f32(values):
    """Rounds doubles to the nearest f32 (what an f32 division would give)."""
    return array.array("f", values)


AMAX_FLOOR = struct.unpack("<f", struct.pack("<f", 1e-8))[0]
TILE = 128


def quantize(shape, values):
    """TurboDiffusion's tile quantiser: one scale per 128x128 tile, f32 arithmetic."""
    rows, cols = shape
    row_tiles, col_tiles = -(-rows // TILE), -(-cols // TILE)
    amax = [[AMAX_FLOOR] * col_tiles for _ in range(row_tiles)]
    for r in range(rows):
        for c in range(cols):
            tile = amax[r // TILE]
            tile[c // TILE] = max(tile[c // TILE], abs(values[r * cols + c]))
    # v*128 is exact in f32; the division is rounded once to f32 (double rounding through a
    # double is innocuous for a quotient of two f32 values).
    quotients = to_f32([values[r * cols + c] * 128.0 / amax[r // TILE][c // TILE]
                        for r in range(rows) for c in range(cols)])
    q = [max(-128, min(127, round(v))) for v in quotients]  # round() is half-to-even
    scales = to_f32([a / 128.0 for row in amax for a in row])
    return q, (row_tiles, col_tiles), scales


def is_block_linear(name):
    parts = name.split(".")
    return (parts[0] == "blocks" and parts[-1] == "weight" and "proj_l" not in parts
            and len(parts) == 5 and parts[2] in ("self_attn", "cross_attn", "ffn")
            and parts[3] in ("q", "k", "v", "o", "0", "2"))


def quant_dit_fixture():
    items = []
    for name, (shape, values) in read_safetensors(GOLDEN).items():
        if name.startswith(("in.", "out.")):
            continue
        if is_block_linear(name):
            prefix = name[: -len(".weight")]
            q, scale_shape, scales = quantize(shape, values)
            items.append((f"{prefix}.int8_weight",
                          Tensor(Storage("CharStorage", packed("b", q)), shape)))
            items.append((f"{prefix}.scale",
                          Tensor(Storage("FloatStorage", scales.tobytes()), scale_shape)))
        else:
            items.append((name, Tensor(Storage("FloatStorage", values.tobytes()), shape)))
    return state_dict(items)


def main():
    assert sys.byteorder == "little"
    OUT.mkdir(parents=True, exist_ok=True)
    save(tensors_fixture(), OUT / "tensors.pth")
    save(noncontiguous_fixture(), OUT / "noncontiguous.pth")
    save(quant_dit_fixture(), OUT / "dit_t2v_sla-quant.pth")
    for name, damaged in damaged_fixtures().items():
        save(damaged, OUT / name)
    save_raw_pickle(PICKLE_LENGTH_LIE, OUT / "damaged_pickle_length.pth")


if __name__ == "__main__":
    main()
