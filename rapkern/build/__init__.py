"""The RAP prior builder: event windows → critical ranges (``cutlass.Rectifier``) → dependency scores →
compact priors for ``rapkern.attention``, fit on training rows only, with a leakage guard and an audit log;
plus the seed's "mode B" Q/K warm start.

Needs the ``build`` extra (``cutlass``, ``pandas``) only when fitting; importing this package does not import it.
"""

from .builder import RAPBuilder
from .guard import LeakageError
from .shapes import relative_error, stack_priors, to_band_prior, to_dense_prior, to_lag_prior, to_lowrank_prior
from .warmstart import qk_prior_correlation, warm_start_qk

__all__ = [
    "RAPBuilder",
    "LeakageError",
    "warm_start_qk",
    "qk_prior_correlation",
    "stack_priors",
    "to_lag_prior",
    "to_band_prior",
    "to_lowrank_prior",
    "to_dense_prior",
    "relative_error",
]
