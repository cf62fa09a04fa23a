"""The Triton attention as torch.library ops (rapkern/backends/triton_attention/ops.py, function.py).

On the CPU: the ops are registered under ``rapkern_triton`` (not the C++ extension's ``rapkern``), their fake
implementations give the real kernels' shapes, dtypes and layouts for every prior kind (FakeTensorMode with
``device="cuda"``: no GPU needed), ``torch.library.opcheck`` passes through the Triton interpreter, and
``torch.compile(fullgraph=True)`` over ``rapkern.attention(backend="triton")`` traces without a graph break,
agrees bitwise with eager mode (forward and every gradient, dropout included) and does not recompile for
new values. The compiled path on a GPU (inductor) is in test_triton_gpu.py.
"""

from __future__ import annotations

import os

import helpers
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import rapkern
from rapkern import dispatch
from rapkern.priors import BandedPrior, DensePrior, LowRankPrior, RelativeLagPrior

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(
    dispatch.get("triton").availability() is not None,
    reason=f"triton backend unavailable: {dispatch.get('triton').availability()}",
)
needs_kernels = pytest.mark.skipif(
    torch.cuda.is_available() or not INTERPRET, reason="CPU interpreter runs (the GPU runs test_triton_gpu.py)"
)

KINDS = ["none", "lag", "banded", "banded_masked", "lowrank", "dense"]
KIND_CODE = {"none": 0, "lag": 1, "banded": 2, "banded_masked": 2, "lowrank": 3, "dense": 4}


def _ops():
    from rapkern.backends.triton_attention import ops

    return ops


def _prior_tensors(kind, lead, lq, lk, device, dtype=torch.float32, w=2, r=3):
    mk = lambda *s: torch.randn(*lead, *s, device=device, dtype=dtype)  # noqa: E731
    return {
        "none": [],
        "lag": [mk(2 * w + 1)],
        "banded": [mk(lq, 2 * w + 1)],
        "banded_masked": [mk(lq, 2 * w + 1)],
        "lowrank": [mk(lq, r), mk(lk, r)],
        "dense": [mk(lq, lk)],
    }[kind]


def _fwd_args(q, k, v, kind, tensors, alpha=None, kpm=None, causal=False, dropout_p=0.0, seed=None):
    p0, p1 = (tensors + [None, None])[:2]
    return (q, k, v, alpha, kpm, p0, p1, KIND_CODE[kind], kind == "banded_masked", 1.0, causal, 0.25, dropout_p, seed)


def test_registered_under_own_namespace():
    _ops()
    assert _ops().NAMESPACE == "rapkern_triton"
    for name in ("attention_fwd", "attention_bwd"):
        op = getattr(torch.ops.rapkern_triton, name).default
        assert op.name() == f"rapkern_triton::{name}"
        assert "Tensor" in str(op._schema)
    assert _ops().PRIOR_KINDS == {"none": 0, "lag": 1, "banded": 2, "lowrank": 3, "dense": 4}  # csrc/ops.cpp codes


def test_make_prior_rejects_unknown_kind():
    with pytest.raises(ValueError, match="prior_kind must be one of \\[0, 1, 2, 3, 4\\], got 7"):
        _ops().make_prior(7, False, None, None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("kind", KINDS)
def test_fake_shapes_on_cuda(kind, dtype):
    """Shapes, dtypes, devices and contiguity of both ops' fake outputs, with every gradient asked for and
    with none, for a per-head α, a scalar α and a float α."""
    b, hq, hkv, lq, lk, d, dv = 2, 4, 2, 17, 23, 40, 24
    with FakeTensorMode():
        q = torch.empty(b, hq, lq, d, device="cuda", dtype=dtype)
        k = torch.empty(b, hkv, lk, d, device="cuda", dtype=dtype).transpose(1, 2).contiguous().transpose(1, 2)
        v = torch.empty(b, hkv, lk, dv, device="cuda", dtype=dtype)
        kpm = torch.zeros(b, lk, dtype=torch.bool, device="cuda")
        tensors = _prior_tensors(kind, (hq,), lq, lk, "cuda")
        for alpha in (torch.empty(hq, device="cuda", dtype=dtype), torch.empty((), device="cuda"), None):
            out, lse = torch.ops.rapkern_triton.attention_fwd(*_fwd_args(q, k, v, kind, tensors, alpha, kpm))
            assert out.shape == (b, hq, lq, dv) and out.dtype == dtype and out.is_contiguous()
            assert lse.shape == (b, hq, lq) and lse.dtype == torch.float32 and lse.is_contiguous()
            assert out.device.type == "cuda" and lse.device.type == "cuda"
            p0, p1 = (tensors + [None, None])[:2]
            for need in (True, False):
                grads = torch.ops.rapkern_triton.attention_bwd(
                    out, lse, q, k, v, out, lse, alpha, kpm, p0, p1, KIND_CODE[kind], kind == "banded_masked", 1.0,
                    False, 0.25, 0.0, None, need, need, need,
                )
                dq, dk, dv_, da, dp0, dp1 = grads
                for g, t in ((dq, q), (dk, k), (dv_, v)):
                    assert g.shape == t.shape and g.dtype == t.dtype and g.is_contiguous()
                if need and alpha is not None and kind != "none":
                    assert da.shape == alpha.shape and da.dtype == alpha.dtype
                else:
                    assert da.numel() == 0
                for g, t in ((dp0, p0), (dp1, p1)):
                    if need and t is not None:
                        assert g.shape == t.shape and g.dtype == t.dtype and g.is_contiguous()
                    else:
                        assert g.numel() == 0


def _small(kind, lead=(2,), dtype=torch.float32, seed=0):
    g = helpers.gen(seed)
    b, hq, hkv, lq, lk, d = 2, 2, 1, 9, 11, 16
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    q, k, v = rnd(b, hq, lq, d), rnd(b, hkv, lk, d), rnd(b, hkv, lk, d)
    tensors = [t.to(torch.float32) for t in _prior_tensors(kind, lead, lq, lk, "cpu", w=2, r=3)]
    return q, k, v, tensors


@needs_kernels
@pytest.mark.parametrize("kind,dropout_p", [(k, 0.0) for k in KINDS] + [("lag", 0.25)],
                         ids=KINDS + ["lag-dropout"])
def test_opcheck_forward(kind, dropout_p):
    """Schema, fake-vs-real metadata, autograd registration and AOT dispatch of attention_fwd."""
    q, k, v, tensors = _small(kind, seed=KINDS.index(kind))
    alpha = torch.tensor([0.7, -0.4])
    kpm = torch.zeros(2, 11, dtype=torch.bool)
    kpm[1, 3] = True
    leaves = [t.requires_grad_() for t in (q, k, v, alpha, *tensors)]
    seed = torch.tensor([12345]) if dropout_p else None
    args = _fwd_args(*leaves[:3], kind, leaves[4:], leaves[3], kpm, causal=True, dropout_p=dropout_p, seed=seed)
    torch.library.opcheck(torch.ops.rapkern_triton.attention_fwd.default, args)


@needs_kernels
@pytest.mark.parametrize("kind", ["lag", "lowrank", "dense"])
def test_opcheck_backward(kind):
    q, k, v, tensors = _small(kind, lead=(), seed=10 + KINDS.index(kind))
    alpha = torch.tensor(0.6)
    out, lse = torch.ops.rapkern_triton.attention_fwd(*_fwd_args(q, k, v, kind, tensors, alpha))
    dout = torch.randn(out.shape, generator=helpers.gen(3))
    p0, p1 = (tensors + [None, None])[:2]
    args = (dout, torch.randn(lse.shape, generator=helpers.gen(4)), q, k, v, out, lse, alpha, None, p0, p1,
            KIND_CODE[kind], False, 1.0, False, 0.25, 0.0, None, True, True, True)
    torch.library.opcheck(torch.ops.rapkern_triton.attention_bwd.default, args)


@needs_kernels
def test_unused_output_gets_no_zero_filled_gradient(monkeypatch):
    """set_materialize_grads(False): a loss through the LSE alone hands dout=None to the backward op (no zero
    tensor of the output's size), and one through out alone hands dlse=None."""
    from rapkern.backends.triton_attention import function

    seen = []
    real = function.attention_bwd

    def spy(dout, dlse, *rest):
        seen.append((dout is None, dlse is None))
        return real(dout, dlse, *rest)

    monkeypatch.setattr(function, "attention_bwd", spy)
    q, k, v, (table,) = _small("lag")
    q.requires_grad_()
    out, lse = rapkern.attention(q, k, v, prior=RelativeLagPrior(table), backend="triton", return_lse=True)
    torch.autograd.grad(lse.sum(), q, retain_graph=True)
    torch.autograd.grad(out.sum(), q)
    assert seen == [(True, False), (False, True)]


PRIORS = {
    "lag": lambda t: RelativeLagPrior(t[0]),
    "banded_masked": lambda t: BandedPrior(t[0], mask_outside=True),
    "lowrank": lambda t: LowRankPrior(t[0], t[1]),
    "dense": lambda t: DensePrior(t[0]),
}


def _grads(fn, q, k, v, tensors, alpha, make, dropout_p, gout, glse):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, alpha, *tensors)]
    torch.manual_seed(11)
    out, lse = fn(*leaves, make=make, dropout_p=dropout_p)
    loss = (out * gout).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * glse).sum()
    return [out.detach(), lse.detach(), *torch.autograd.grad(loss, leaves)]


def _attn(q, k, v, alpha, *tensors, make, dropout_p):
    return rapkern.attention(q, k, v, prior=make(tensors), alpha=alpha, causal=True, dropout_p=dropout_p,
                             backend="triton", return_lse=True)


@needs_kernels
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("kind", list(PRIORS))
def test_compile_fullgraph_matches_eager(kind, dropout_p):
    """torch.compile(fullgraph=True) (AOTAutograd, no inductor on the CPU): one graph, out, lse and every
    gradient (q, k, v, α, prior tensors; dlse included) bitwise equal to eager mode, the dropout seed drawn
    in the graph from the same generator; a second call with new values does not recompile."""
    torch._dynamo.reset()
    q, k, v, tensors = _small(kind, seed=20 + len(kind))
    alpha = torch.tensor([0.5, -1.0])
    g = helpers.gen(5)
    gout, glse = torch.randn(2, 2, 9, 16, generator=g), torch.randn(2, 2, 9, generator=g)
    make = PRIORS[kind]
    compiled = torch.compile(_attn, fullgraph=True, backend="aot_eager")
    got = _grads(compiled, q, k, v, tensors, alpha, make, dropout_p, gout, glse)
    want = _grads(_attn, q, k, v, tensors, alpha, make, dropout_p, gout, glse)
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"result {i} differs between compiled and eager"
    if dropout_p:
        assert (got[0] == 0).any()
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = _grads(compiled, q + 1, k, v, tensors, alpha, make, dropout_p, gout, glse)
    assert not torch.equal(again[0], got[0])


@needs_kernels
def test_compile_fullgraph_self_attention_and_float_alpha():
    """attention(x, x, x) with a float α and no prior traces as one graph; gradients add up on x."""
    torch._dynamo.reset()
    x = torch.randn(1, 2, 9, 16, generator=helpers.gen(8)).requires_grad_()

    def f(x):
        return rapkern.attention(x, x, x, alpha=0.5, causal=True, backend="triton")

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    ref_out = f(x)
    (ref_gx,) = torch.autograd.grad(ref_out.square().sum(), x)
    assert torch.equal(out, ref_out) and torch.equal(gx, ref_gx)
