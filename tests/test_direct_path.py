"""rapkern.attention's direct path (issue 10's per-call cost): arguments go straight to a kernel that validates
them itself (``Backend.validates_in_kernel``), and the Python checks run only to word an error.

What makes that safe is tested here: the kernel raises, before computing, on every invalid input of
tests/test_validation.py that the direct path would hand it (the Python checks out of the way), so no check
that guards against a wrong result is skipped; a valid call takes the direct path and computes what the checked
path computes; anything else takes the checked path.
"""

from __future__ import annotations

import pytest
import torch
from test_validation import ATTENTION_ERRORS, base

import rapkern
from rapkern import _ext, dispatch, functional
from rapkern.priors import BandedPrior, DensePrior, LowRankPrior, RelativeLagPrior

pytestmark = pytest.mark.skipif(_ext.load() is not None, reason=str(_ext.load()))


def _direct_args(over: dict):
    kw = {**base(), "prior": None, "alpha": 1.0, "causal": False, "key_padding_mask": None, "scale": None,
          "dropout_p": 0.0, "return_lse": False, "backend": "auto", **over}
    return kw


def _direct_backend(kw):
    return functional._direct_backend(kw["q"], kw["prior"], kw["alpha"], kw["causal"], kw["scale"],
                                      kw["dropout_p"], kw["return_lse"], kw["backend"])


@pytest.mark.parametrize("over", [c[1] for c in ATTENTION_ERRORS], ids=[c[0] for c in ATTENTION_ERRORS])
def test_kernel_rejects_every_invalid_input_it_is_given(over):
    kw = _direct_args(over())
    direct = _direct_backend(kw)
    if direct is None:
        pytest.skip("these arguments take the checked path (test_validation covers them)")
    assert direct.validates_in_kernel
    q = kw["q"]
    scale = kw["scale"]
    with pytest.raises(Exception):  # noqa: B017,PT011  (any error before computing; the wording is checked below)
        if scale is None:
            scale = 1.0 / q.shape[-1] ** 0.5
        direct.attention_direct(q, kw["k"], kw["v"], kw["prior"], kw["alpha"], kw["causal"],
                                kw["key_padding_mask"], scale, kw["dropout_p"])


def test_most_error_cases_reach_the_kernel():
    """The test above must not skip its way to green: most invalid inputs are of the usual types."""
    reached = sum(_direct_backend(_direct_args(c[1]())) is not None for c in ATTENTION_ERRORS)
    assert reached >= len(ATTENTION_ERRORS) * 2 // 3, reached


@pytest.mark.parametrize("name", [c[0] for c in ATTENTION_ERRORS if c[0] in
                                  ("k-dtype-mismatch", "k-meta-device", "scale-nan", "alpha-inf", "dv-zero",
                                   "lag-heads-Hkv", "lowrank-v-meta", "kpm-shape-Lq")])
def test_documented_error_replaces_the_kernel_error(name):
    over, exc, match = next(c[1:] for c in ATTENTION_ERRORS if c[0] == name)
    kw = _direct_args(over())
    assert _direct_backend(kw) is not None
    q, k, v = kw.pop("q"), kw.pop("k"), kw.pop("v")
    with pytest.raises(exc, match=match) as info:
        rapkern.attention(q, k, v, **kw)
    assert info.value.__suppress_context__  # the kernel's wording is not shown after the documented one


PRIORS = {
    "none": lambda: None,
    "lag": lambda: RelativeLagPrior(torch.randn(4, 5, requires_grad=True)),
    "banded": lambda: BandedPrior(torch.randn(5, 3, requires_grad=True), mask_outside=True),
    "lowrank": lambda: LowRankPrior(torch.randn(5, 2, requires_grad=True), torch.randn(2, 1, 7, 2)),
    "dense": lambda: DensePrior(torch.randn(2, 4, 5, 7, requires_grad=True)),
}


@pytest.mark.parametrize("kind", list(PRIORS))
def test_valid_call_takes_the_direct_path_and_matches_the_checked_path(kind, monkeypatch):
    torch.manual_seed(0)
    kw = base()
    q, k, v = (kw[n].requires_grad_() for n in ("q", "k", "v"))
    prior = PRIORS[kind]()
    alpha = torch.tensor([0.5, 1.0, 1.5, 2.0], requires_grad=True)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 5:] = True
    args = dict(prior=prior, alpha=alpha, causal=True, key_padding_mask=mask, return_lse=True)

    def checked_path_runs(*a, **k):
        raise AssertionError("check_attention ran on a valid call")

    with monkeypatch.context() as m:
        m.setattr(functional, "check_attention", checked_path_runs)
        out, lse = rapkern.attention(q, k, v, **args)
    leaves = [q, k, v] + ([] if prior is None else [alpha] + [t for t in prior.tensors() if t.requires_grad])
    grads = torch.autograd.grad((out.square().sum() + lse.sum()), leaves)
    ref_out, ref_lse = rapkern.attention(q, k, v, backend="torch", **args)
    ref_grads = torch.autograd.grad((ref_out.square().sum() + ref_lse.sum()), leaves)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("over", [
    dict(alpha=1),  # an int: the checked path converts it
    dict(causal=1),
    dict(dropout_p=0),
    dict(scale=1),
    dict(q=torch.randn(2, 4, 5, 8, dtype=torch.float64)),  # float64: the torch backend
    dict(backend="torch"),
], ids=["alpha-int", "causal-int", "dropout-int", "scale-int", "float64", "backend-torch"])
def test_other_arguments_take_the_checked_path(over):
    assert _direct_backend(_direct_args(over)) is None


def test_environment_backend_is_read_per_call(monkeypatch):
    kw = _direct_args({})
    assert _direct_backend(kw) is dispatch.get("cpp")
    monkeypatch.setenv("RAPKERN_BACKEND", "torch")
    assert _direct_backend(kw) is None
    monkeypatch.delenv("RAPKERN_BACKEND")
    assert _direct_backend(kw) is dispatch.get("cpp")


def test_bad_prior_values_raise_the_prior_message_through_the_direct_path():
    kw = base()
    table = torch.randn(5)
    table[2] = float("nan")
    with pytest.raises(ValueError, match=r"RelativeLagPrior\.table must not contain non-finite values"):
        rapkern.attention(kw["q"], kw["k"], kw["v"], prior=RelativeLagPrior(table))
