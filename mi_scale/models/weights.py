"""Weight files of a local Hugging Face model directory, read one file and
one tensor at a time; safetensors files written one tensor at a time.

    src = open_hf_dir(path)          # or None when `path` holds no HF weights
    for file in src.files:           # in order; each file's tensors by name
        for name in src.names[file]:
            t = src.read(file, name)  # that tensor only
        src.release()                # closes the file

Formats: model.safetensors.index.json + shards, a single model.safetensors,
pytorch_model.bin.index.json + shards or a single pytorch_model.bin.
safetensors tensors are read with plain file reads at the offsets of the
file's header (a memory map would keep every page read so far resident
until the file is closed). .bin files load weights-only and memory-mapped:
a pickle that would run code is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mi_scale.models.errors import invalid

FIELD = "model.init_from"
_LAYOUTS = (("model.safetensors.index.json", "safetensors"), ("model.safetensors", "safetensors"),
            ("pytorch_model.bin.index.json", "bin"), ("pytorch_model.bin", "bin"))


@dataclass
class HFWeights:
    root: Path
    fmt: str  # "safetensors" | "bin"
    files: list[str]
    names: dict[str, list[str]]  # file -> tensor names in it
    shapes: dict[str, torch.Size] = field(default_factory=dict)
    _open: dict = field(default_factory=dict)

    def _handle(self, file: str):
        if file not in self._open:
            path = self.root / file
            try:
                if self.fmt == "safetensors":
                    self._open[file] = _SafetensorsFile(path)
                else:
                    self._open[file] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # noqa: BLE001 - safetensors' own error type, a refused pickle, a bad zip
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise invalid(FIELD, str(self.root), f"weight file {path} is corrupt, unsafe to unpickle or "
                              f"unreadable ({first}); restore it or save the model again") from None
        return self._open[file]

    def read(self, file: str, name: str) -> torch.Tensor:
        h = self._handle(file)
        return h.read(name) if self.fmt == "safetensors" else h[name]

    def release(self) -> None:
        for h in self._open.values():
            if isinstance(h, _SafetensorsFile):
                h.close()
        self._open.clear()


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class _SafetensorsFile:
    """The safetensors layout: 8 bytes of header length (little-endian), a JSON
    header {name: {dtype, shape, data_offsets}}, then the data."""

    def __init__(self, path: Path):
        self.f = open(path, "rb")
        n = int.from_bytes(self.f.read(8), "little")
        self.header = json.loads(self.f.read(n))
        self.header.pop("__metadata__", None)
        self.base = 8 + n
        size = path.stat().st_size
        for name, h in self.header.items():
            if h["dtype"] not in _ST_DTYPES or self.base + h["data_offsets"][1] > size:
                raise ValueError(f"tensor {name}: dtype {h['dtype']} or its bytes beyond the end of the file")

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self.header[name]["shape"])

    def read(self, name: str) -> torch.Tensor:
        h = self.header[name]
        start, end = h["data_offsets"]
        buf = torch.empty(end - start, dtype=torch.uint8)
        self.f.seek(self.base + start)
        if self.f.readinto(buf.numpy()) != end - start:
            raise ValueError(f"{self.f.name}: tensor {name} is cut short")
        return buf.view(_ST_DTYPES[h["dtype"]]).reshape(h["shape"])

    def close(self) -> None:
        self.f.close()


def open_hf_dir(path: str | Path) -> HFWeights | None:
    """The weight files of a local HF model dir, their tensor names and shapes
    (read from headers only), or None when it has none of the known layouts."""
    root = Path(path)
    for fname, fmt in _LAYOUTS:
        if not (root / fname).is_file():
            continue
        if fname.endswith(".index.json"):
            try:
                weight_map = json.loads((root / fname).read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise invalid(FIELD, str(root), f"{root / fname} is not a weight index ({e}); save the model "
                              f"again with save_pretrained") from None
            files = list(dict.fromkeys(weight_map.values()))
            names = {f: [n for n, g in weight_map.items() if g == f] for f in files}
        else:
            files, names = [fname], {}
        src = HFWeights(root, fmt, files, names)
        for f in files:
            if not (root / f).is_file():
                raise invalid(FIELD, str(root), f"weight file {root / f} named by its index is missing; "
                              f"copy it there or save the model again")
            h = src._handle(f)
            if fmt == "safetensors":
                listed = h.keys()
                src.shapes.update({n: h.shape(n) for n in listed})
            else:
                listed = list(h.keys())
                src.shapes.update({n: h[n].shape for n in listed})
            src.names[f] = src.names.get(f) or listed
            src.release()
        return src
    return None


def write_safetensors(path: Path, specs: list[tuple[str, torch.dtype, torch.Size]], tensors, metadata: dict) -> None:
    """A safetensors file whose header is computed from `specs` (name, dtype,
    shape) before any data exists, then filled from the iterable `tensors`
    (in spec order), so only one tensor is in memory at a time."""
    names = {dtype: name for name, dtype in _ST_DTYPES.items()}
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in specs:
        size = shape.numel() * dtype.itemsize
        header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the format's own writer does
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for (name, dtype, shape), t in zip(specs, tensors, strict=True):
            if t.dtype != dtype or t.shape != shape:
                raise ValueError(f"{name}: got {t.dtype} {tuple(t.shape)}, the header says {dtype} {tuple(shape)}")
            f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
