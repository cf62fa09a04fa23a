"""Step 4 of the seed: bound, sparsify and band a score matrix before it becomes a prior.

Order: band (|Δt| ≤ w, other entries 0) → normalize (``maxabs``: into [-1, 1]; ``std``: divide by the standard
deviation of the entries) → clip to ±clip → sparsify (keep the ``keep_top`` fraction of entries of largest
magnitude, and/or those with |s| ≥ ``threshold``) → multiply by ``strength``.
"""

from __future__ import annotations

import numpy as np

NORMALIZE = ("maxabs", "std", None)


def check_params(*, normalize, clip, keep_top, threshold, band, strength) -> None:
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
        raise ValueError(f"clip must be a positive number or None, got {clip!r}")
    if keep_top is not None and not (isinstance(keep_top, (int, float)) and 0 < keep_top <= 1):
        raise ValueError(f"keep_top must be a fraction in (0, 1] or None, got {keep_top!r}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and threshold >= 0):
        raise ValueError(f"threshold must be a non-negative number or None, got {threshold!r}")
    if band is not None and not (isinstance(band, int) and not isinstance(band, bool) and band >= 0):
        raise ValueError(f"band must be a non-negative int (max |Δt|) or None, got {band!r}")
    if not (isinstance(strength, (int, float)) and np.isfinite(strength)):
        raise ValueError(f"strength must be a finite number, got {strength!r}")


def regularize(S: np.ndarray, *, time_of: np.ndarray, normalize="maxabs", clip=None, keep_top=None,
               threshold=None, band=None, strength=1.0) -> np.ndarray:
    """Regularized copy of the square score ``S``; ``time_of[i]`` is token i's time step (for the band)."""
    S = np.array(S, dtype=np.float64)
    if band is not None:
        S[np.abs(time_of[:, None] - time_of[None, :]) > band] = 0.0
    if normalize == "maxabs":
        m = np.abs(S).max()
        S = S / m if m > 0 else S
    elif normalize == "std":
        sd = S.std()
        S = S / sd if sd > 0 else S
    if clip is not None:
        S = np.clip(S, -clip, clip)
    mag = np.abs(S)
    if keep_top is not None and keep_top < 1:
        k = max(1, int(round(keep_top * S.size)))
        cut = np.partition(mag.ravel(), S.size - k)[S.size - k]
        S[mag < cut] = 0.0
    if threshold is not None:
        S[mag < threshold] = 0.0
    return S * strength
