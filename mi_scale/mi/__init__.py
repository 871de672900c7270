"""The MI core: sketches, estimators, sharded gather and MIRegularizer.

Pure torch + torch.distributed; imports no DeepSpeed, Ray or wandb, so it
drops into any torch training loop. Of ours it imports only mi_scale.errors,
which imports nothing, for the one base class of user-fixable errors.
"""

from mi_scale.mi import estimators
from mi_scale.mi.regularizer import MIRegularizer, RegularizerError, match_layers

__all__ = ["estimators", "MIRegularizer", "RegularizerError", "match_layers"]
