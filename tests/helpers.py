"""Helpers shared by the attention test files: seeded priors, leaf copies and the rounding floor."""

from __future__ import annotations

import math

import torch

from rapkern.priors import BandedPrior, DensePrior, LowRankPrior, RelativeLagPrior


def gen(seed):
    return torch.Generator().manual_seed(seed)


def make_prior(kind, lead, lq, lk, *, gen, dtype=torch.float64, w=3, r=4, requires_grad=True, device="cpu"):
    """A prior of ``kind`` whose tensors have leading dims ``lead``; tensors are float64-seeded leaves."""

    def rnd(*shape):
        t = torch.randn(*lead, *shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
        return t.requires_grad_(requires_grad)

    if kind == "none":
        return None
    if kind == "lag":
        return RelativeLagPrior(rnd(2 * w + 1))
    if kind == "banded":
        return BandedPrior(rnd(lq, 2 * w + 1))
    if kind == "banded_masked":
        return BandedPrior(rnd(lq, 2 * w + 1), mask_outside=True)
    if kind == "lowrank":
        return LowRankPrior(rnd(lq, r), rnd(lk, r))
    if kind == "dense":
        return DensePrior(rnd(lq, lk))
    raise AssertionError(kind)


def leaf_like(t, dtype):
    return t.detach().to(dtype).requires_grad_(t.requires_grad)


def scaled_floor(table, dtype, ref, reduce_len=1):
    """table[dtype] x max(1, max|ref|), x sqrt(length) for gradients summed over a sequence.

    A gradient can be exactly 0 in the reference while the kernel's is a sum of ``reduce_len`` rounding
    errors (e.g. Lk = 1: softmax is exactly 1; FA issue #1253), hence the sqrt(length) factor.
    """
    ref = ref.detach()
    finite = ref[torch.isfinite(ref)]
    mag = float(finite.abs().max()) if finite.numel() else 0.0
    return table[dtype] * max(1.0, mag) * math.sqrt(reduce_len)
