"""mi-scale: inter-layer mutual-information regularized training."""
__version__ = "0.1.0"
