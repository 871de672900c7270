"""The MI core: sketches, estimators, sharded gather and MIRegularizer.

Pure torch + torch.distributed; imports no DeepSpeed, Ray or wandb, so it
drops into any torch training loop.
"""

from mi_scale.mi import estimators
from mi_scale.mi.regularizer import MIRegularizer, RegularizerError, match_layers

__all__ = ["estimators", "MIRegularizer", "RegularizerError", "match_layers"]
