"""Weight files of a local Hugging Face model directory, read one file and
one tensor at a time.

    src = open_hf_dir(path)          # or None when `path` holds no HF weights
    for file in src.files:           # in order; each file's tensors by name
        for name in src.names[file]:
            t = src.read(file, name)  # that tensor only
        src.release()                # closes the file

Formats: model.safetensors.index.json + shards, a single model.safetensors,
pytorch_model.bin.index.json + shards or a single pytorch_model.bin. .bin
files load weights-only and memory-mapped: a pickle that would run code is
refused, and a tensor costs its own bytes.
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
                    from safetensors import safe_open
                    self._open[file] = safe_open(str(path), framework="pt", device="cpu")
                else:
                    self._open[file] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # noqa: BLE001 - safetensors' own error type, a refused pickle, a bad zip
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise invalid(FIELD, str(self.root), f"weight file {path} is corrupt, unsafe to unpickle or "
                              f"unreadable ({first}); restore it or save the model again") from None
        return self._open[file]

    def read(self, file: str, name: str) -> torch.Tensor:
        h = self._handle(file)
        return h.get_tensor(name) if self.fmt == "safetensors" else h[name]

    def release(self) -> None:
        self._open.clear()


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
                listed = list(h.keys())
                src.shapes.update({n: torch.Size(h.get_slice(n).get_shape()) for n in listed})
            else:
                listed = list(h.keys())
                src.shapes.update({n: h[n].shape for n in listed})
            src.names[f] = src.names.get(f) or listed
            src.release()
        return src
    return None
