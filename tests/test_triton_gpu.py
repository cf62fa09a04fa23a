"""GPU tests of the "triton" backend (``@pytest.mark.gpu``; skipped without CUDA).

The interpreter grid of test_triton_attention.py runs on the GPU too (it picks CUDA when present); this
file adds what the interpreter cannot do: bf16, head dims 128 and 256, long sequences (up to 8192),
autotuned block sizes, a 100-repeat bitwise determinism check of the backward, and the torch.compile
(inductor, fullgraph) path through the registered ops (rapkern/backends/triton_attention/ops.py).
"""

from __future__ import annotations

import pytest
import torch

import rapkern
from rapkern.priors import DensePrior, RelativeLagPrior

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

if torch.cuda.is_available():  # the helpers pick CUDA tensors on a GPU machine
    from test_triton_attention import (
        PRIOR_KINDS,
        _gen,
        make_prior,
        padding_mask,
        qkv,
        run_case,
        skip_if_declined_on_gpu,
    )
else:  # pragma: no cover
    PRIOR_KINDS = []


DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("kind", PRIOR_KINDS)
@pytest.mark.parametrize("mask", ["plain", "causal+padding"])
def test_kinds_dtypes(kind, dtype, mask):
    lq, lk = 257, 200
    q, k, v = qkv(2, 4, 2, lq, lk, 64, dtype=dtype, seed=1)
    prior = make_prior(kind, (4,), lq, lk, gen=_gen(2), dtype=dtype, w=17, r=8)
    alpha = torch.tensor([0.7, 0.0, -1.3, 2.0], dtype=dtype, device="cuda", requires_grad=True)
    kpm = padding_mask(2, lk) if mask != "plain" else None
    run_case(q, k, v, prior=prior, alpha=alpha, causal=mask != "plain", key_padding_mask=kpm)


@pytest.mark.parametrize("d", [80, 128, 256])
@pytest.mark.parametrize("kind", ["lag", "banded_masked", "lowrank", "dense"])
def test_large_head_dims(kind, d):
    q, k, v = qkv(1, 2, 1, 300, 300, d, dtype=torch.bfloat16, seed=d)
    prior = make_prior(kind, (), 300, 300, gen=_gen(d), dtype=torch.float32, w=33)
    run_case(q, k, v, prior=prior, alpha=0.8, causal=True)


@pytest.mark.parametrize("length", [1025, 4096, 8192])
@pytest.mark.parametrize("kind", ["none", "lag", "banded_masked"])
def test_long_sequences(kind, length):
    q, k, v = qkv(1, 2, 2, length, length, 64, dtype=torch.float16, seed=length)
    prior = make_prior(kind, (2,), length, length, gen=_gen(3), dtype=torch.float32, w=64)
    run_case(q, k, v, prior=prior, alpha=torch.tensor([0.5, 1.0], device="cuda", requires_grad=True),
             causal=True)


@pytest.mark.parametrize("kind", ["lag", "banded_masked", "lowrank", "dense"])
def test_backward_bitwise_100_repeats(kind):
    q, k, v = qkv(2, 8, 2, 1000, 1000, 64, dtype=torch.float16, seed=4)
    prior = make_prior(kind, (8,), 1000, 1000, gen=_gen(5), dtype=torch.float32, w=40)
    alpha = torch.rand(8, device="cuda").requires_grad_()
    leaves = [q, k, v, alpha, *prior.tensors()]
    g = torch.randn(2, 8, 1000, 64, device="cuda", dtype=torch.float16)

    def grads():
        out = rapkern.attention(q, k, v, prior=prior, alpha=alpha, causal=True, backend="triton")
        return torch.autograd.grad(out, leaves, g)

    first = grads()
    for _ in range(99):
        for a, b in zip(first, grads()):
            assert torch.equal(a, b)


def test_auto_prefers_triton_on_cuda():
    from rapkern import dispatch
    from rapkern.validate import check_attention

    q = torch.randn(1, 2, 64, 64, device="cuda", dtype=torch.float16)
    p = check_attention(q, q, q, prior=None, alpha=1.0, causal=False, key_padding_mask=None, scale=None,
                        dropout_p=0.0)
    assert dispatch.choose("attention", p, "auto").name == "triton"


def test_dense_broadcast_and_lag_bf16_dropout_reproducible():
    q, k, v = qkv(2, 4, 4, 513, 513, 64, dtype=torch.bfloat16, seed=6)
    bias = torch.randn(513, 513, device="cuda")
    for prior in (DensePrior(bias), RelativeLagPrior(torch.randn(4, 129, device="cuda"))):
        torch.manual_seed(0)
        a = rapkern.attention(q, k, v, prior=prior, dropout_p=0.1, backend="triton")
        torch.manual_seed(0)
        b = rapkern.attention(q, k, v, prior=prior, dropout_p=0.1, backend="triton")
        assert torch.equal(a, b)


def test_compile_fullgraph_inductor_matches_eager_without_recompiling_or_retuning(monkeypatch):
    """torch.compile(fullgraph=True) with inductor over rapkern.attention(backend="triton"): the ops
    (rapkern_triton::attention_fwd/bwd) stay opaque nodes, so out, lse and every gradient equal eager mode
    bitwise; a second call with new values neither recompiles nor makes the autotuner benchmark again."""
    from triton.runtime.autotuner import Autotuner

    torch._dynamo.reset()
    b, hq, hkv, lq, lk, d = 2, 4, 2, 300, 257, 64
    q, k, v = qkv(b, hq, hkv, lq, lk, d, dtype=torch.float16, seed=70)
    table = torch.randn(hq, 33, device="cuda", requires_grad=True)
    alpha = torch.tensor([0.7, 0.0, -1.3, 2.0], device="cuda", requires_grad=True)
    kpm = padding_mask(b, lk)
    skip_if_declined_on_gpu(q, k, v, RelativeLagPrior(table), alpha, causal=True, key_padding_mask=kpm)

    def f(q, k, v, table, alpha):
        return rapkern.attention(q, k, v, prior=RelativeLagPrior(table), alpha=alpha, causal=True,
                                 key_padding_mask=kpm, backend="triton", return_lse=True)

    leaves = [q, k, v, table, alpha]
    gout = torch.randn(b, hq, lq, d, device="cuda", dtype=torch.float16)
    glse = torch.randn(b, hq, lq, device="cuda")

    def run(fn, scale=1.0):
        out, lse = fn(q * scale, k, v, table, alpha)
        loss = (out.float() * gout).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * glse).sum()
        return [out, lse, *torch.autograd.grad(loss, leaves)]

    want = run(f)  # eager first: the autotuner's cache is warm for these launch keys
    compiled = torch.compile(f, fullgraph=True)
    got = run(compiled)
    for name, x, y in zip(["out", "lse", "dq", "dk", "dv", "dtable", "dalpha"], got, want):
        assert torch.equal(x, y), f"{name}: compiled and eager differ"

    def no_bench(*args, **kwargs):
        raise AssertionError("the Triton autotuner benchmarked again on a repeated launch key")

    assert hasattr(Autotuner, "_bench")
    monkeypatch.setattr(Autotuner, "_bench", no_bench)
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = run(compiled, scale=0.5)
    assert not torch.equal(again[0], got[0])
