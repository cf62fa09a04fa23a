"""Drop-in ``torch.nn`` modules: biased multi-head attention, swapping it into a model, priors and gates."""

from .attention import BiasedMultiheadAttention
from .gate import Gate
from .priors import BandPrior, FactorPrior, FixedPrior, LagPrior, PriorModule
from .routing import HierarchicalRouter, LDARouter
from .swap import swap_attention

__all__ = [
    "BiasedMultiheadAttention",
    "swap_attention",
    "PriorModule",
    "LagPrior",
    "BandPrior",
    "FactorPrior",
    "FixedPrior",
    "Gate",
    "LDARouter",
    "HierarchicalRouter",
]
