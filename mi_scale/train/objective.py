"""Task loss + MI term in one module, so the engine runs both in forward.

Computing the MI term inside the engine's forward keeps ZeRO-3 correct:
trainable regularizer parts (learned sketches, infonce critics) are
submodules here, so ZeRO-3 gathers them like any other parameter.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mi_scale.mi import MIRegularizer


class Objective(nn.Module):
    def __init__(self, model: nn.Module, regularizer: MIRegularizer, task: str, control: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.regularizer = regularizer
        self.task = task  # "classify" or "lm"
        # mi.control: a DeepSupervision (train/control.py) that replaces the MI
        # term in the loss by probes of matched gradient norm
        self.control = control
        self.extras: dict[str, float] = {}  # the last step's control numbers, logged by the worker

    def forward(self, x: torch.Tensor, y: torch.Tensor, step: int):
        self.regularizer.set_step(step)  # hooks keep only this step's sampled tokens
        logits = self.model(x)
        task_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        reg_loss, mi = self.regularizer.loss(step)
        if self.control is not None:
            reg_loss, self.extras = self.control.loss(y, reg_loss, step)
        return task_loss + reg_loss, task_loss.detach(), reg_loss.detach(), mi

    @torch.no_grad()
    def evaluate_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, int]:
        """(summed loss, correct predictions, count) for one held-out batch."""
        logits = self.model(x)
        flat = logits.reshape(-1, logits.shape[-1]).float()
        target = y.reshape(-1)
        loss = F.cross_entropy(flat, target, reduction="sum")
        correct = (flat.argmax(-1) == target).sum()
        return float(loss), float(correct), int(target.numel())
