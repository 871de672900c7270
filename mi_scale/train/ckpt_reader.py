"""Read a model's full tensors out of a DeepSpeed checkpoint, one at a time.

Works for a checkpoint written at any ZeRO stage by any number of ranks, in
one plain process: no ranks, no Ray, no GPU. Every file is opened
memory-mapped and weights-only (ckpt_files.safe_deepspeed_loads), so a
tensor costs its own bytes, not the checkpoint's: Adam moments are never
read. `release()` unmaps the files; callers do it after each output shard,
so the pages read so far leave this process's memory.

Where a tensor's values are:
- ZeRO 0: whole in mp_rank_00_model_states.pt (`module`);
- ZeRO 1/2: the fp32 master in each rank's optimizer file, a contiguous
  slice per rank (`param_slice_mappings` says which);
- ZeRO 3: the fp32 master in each rank's optimizer file: each parameter
  split into W equal chunks (the last one padded), one per rank, laid one
  after another in parameter order (the scheme of DeepSpeed's zero_to_fp32).
"""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from pathlib import Path

import torch

from mi_scale.train.ckpt_files import META, CheckpointError, complete_checkpoints, safe_deepspeed_loads


def pick_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """The run's newest complete checkpoint, or the one of `step`."""
    found = complete_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir} holds no complete checkpoint (checkpoints/step-*/{META}): "
                              f"pass the run dir of a run that saved one")
    if step is None:
        return found[0]
    for ckpt in found:
        if int(ckpt.name.split("-")[1]) == step:
            return ckpt
    steps = ", ".join(str(int(c.name.split("-")[1])) for c in found)
    raise CheckpointError(f"--step: invalid value {step}: {run_dir} has checkpoints at steps {steps}")


class CheckpointReader:
    """shapes: {name: torch.Size} in the model's parameter order (buffers
    last); tensor(name) -> the full tensor (fp32 master at ZeRO 1-3)."""

    def __init__(self, ckpt: Path):
        self.ckpt = Path(ckpt)
        try:
            meta = json.loads((self.ckpt / META).read_text())
            self.world = int(meta["world_size"])
            self.stage = int(meta["training_keys"]["deepspeed.zero_stage"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint file {self.ckpt / META} is unreadable ({e}): "
                                  f"export another step (--step) or a complete run") from None
        self._check_files()
        self._open: dict[Path, dict] = {}
        # every file opened once now (a memory map and its small index): a
        # corrupt one is refused before anything is written
        for rank in range(self.world):
            if self.stage == 3 or rank == 0:
                self._load(self._model_file(rank))
            if self.stage > 0:
                self._load(self._optim_file(rank))
        first = self._load(self._model_file(0))
        self._buffers: dict = {}
        if self.stage == 0:
            self.shapes = {k: v.shape for k, v in first["module"].items()}
            return
        self.shapes = {k: torch.Size(v) for group in first["param_shapes"] for k, v in group.items()}
        self._buffers = {k: first["module"][k].shape for k in first.get("buffer_names") or []}
        self.shapes.update(self._buffers)
        if self.stage == 3:  # each rank's chunk of parameter i sits after its chunks of parameters < i
            self._offset, off = {}, 0
            for name in self.shapes:
                if name not in self._buffers:
                    self._offset[name] = off
                    off += math.ceil(self.shapes[name].numel() / self.world)
        self.release()

    # -- files ----------------------------------------------------------------

    def _model_file(self, rank: int) -> Path:
        if self.stage == 3:
            return self.ckpt / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
        return self.ckpt / "mp_rank_00_model_states.pt"

    def _optim_file(self, rank: int) -> Path | None:
        """DeepSpeed names them with a prefix per precision (bf16_...); one per rank."""
        found = sorted(self.ckpt.glob(f"*zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
        return found[0] if found else None

    def _check_files(self) -> None:
        """Every file this checkpoint needs exists, before anything is read."""
        needed = [self._model_file(r) for r in range(self.world if self.stage == 3 else 1)]
        missing = [p for p in needed if not p.is_file()]
        if self.stage > 0:
            for rank in range(self.world):
                if self._optim_file(rank) is None:
                    missing.append(self.ckpt / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        if missing:
            raise CheckpointError(
                f"checkpoint file {missing[0]} is missing ({len(missing)} of the files that {self.world} ranks "
                f"wrote at ZeRO-{self.stage} are): the checkpoint is incomplete; export another step (--step) "
                f"or copy the missing files from the host that wrote them")

    def _load(self, path: Path) -> dict:
        if path not in self._open:
            try:
                with safe_deepspeed_loads():
                    self._open[path] = torch.load(path, map_location="cpu", mmap=True)
            except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable ({first}): export "
                                      f"another step (--step), or restore the file") from None
        return self._open[path]

    def _optim(self, rank: int) -> dict:
        return self._load(self._optim_file(rank))["optimizer_state_dict"]

    def release(self) -> None:
        """Unmap every file read so far."""
        self._open.clear()

    # -- tensors --------------------------------------------------------------

    def tensor(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if self.stage == 0 or name in self._buffers:
            return self._load(self._model_file(0))["module"][name].clone()
        if self.stage == 3:
            part = math.ceil(shape.numel() / self.world)
            pieces = [_read_range(self._optim(r)["fp32_flat_groups"], self._offset[name], part)
                      for r in range(self.world)]
        else:
            pieces = []
            for r in range(self.world):
                osd = self._optim(r)
                for group, flat in zip(osd["param_slice_mappings"], osd["single_partition_of_fp32_groups"]):
                    if name in group:
                        frag = group[name]
                        pieces.append(flat.narrow(0, frag.start, frag.numel))
        flat = torch.cat(pieces)[:shape.numel()]
        if flat.numel() != shape.numel():
            raise CheckpointError(f"checkpoint {self.ckpt} holds {flat.numel()} of the {shape.numel()} values of "
                                  f"{name}: the files are inconsistent (an NVMe-offloaded optimizer keeps its "
                                  f"master weights outside them); export another step (--step)")
        return flat.view(shape)


def _read_range(flats: list[torch.Tensor], start: int, numel: int) -> torch.Tensor:
    """Values [start, start + numel) of the concatenation of `flats`, without concatenating them."""
    out, pos = [], 0
    for flat in flats:
        lo, hi = max(start, pos), min(start + numel, pos + flat.numel())
        if lo < hi:
            out.append(flat.narrow(0, lo - pos, hi - lo))
        pos += flat.numel()
    return torch.cat(out) if out else torch.empty(0)
