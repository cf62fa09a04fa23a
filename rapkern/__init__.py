"""rapkern: attention with an additive, gated prior on the logits, and a batched LDA routing softmax.

    out = softmax(scale · Q Kᵀ + α_h · B + M) V
"""

from . import backends as _backends  # noqa: F401  (registers the backends)
from . import testing  # noqa: F401
from .functional import attention, lda_route
from .priors import BandedPrior, DensePrior, LowRankPrior, RelativeLagPrior
from .stats import AttentionStats, attention_kl, attention_stats

__version__ = "0.1.0"

__all__ = [
    "attention",
    "lda_route",
    "attention_stats",
    "attention_kl",
    "AttentionStats",
    "RelativeLagPrior",
    "BandedPrior",
    "LowRankPrior",
    "DensePrior",
    "testing",
    "__version__",
]
