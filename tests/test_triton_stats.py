"""The "triton" backend's attention_stats and attention_kl against the float64 references (interpreter on CPU).

Every check applies FlashAttention's rule (``rapkern.testing.assert_close_to_reference``): error(triton) <=
2 x error(the same dense math in the input dtype) + a floor, on entropy, key mass, the per-row KL and every
gradient (q, k, each prior tensor, alpha). The interpreter runs 32x32 tiles, so lengths 17, 33 and 47
straddle block edges; prior kind x causal x padding x GQA is covered pairwise, with lead shapes (), (H,),
(B, H), (1, H), as in test_triton_attention.py. bf16 is not run here (the interpreter's bf16 is broken).
"""

from __future__ import annotations

import functools
import os

import helpers
import pytest
import torch

import rapkern
from rapkern import dispatch
from rapkern.priors import BandedPrior, DensePrior
from rapkern.stats import check_kl, check_stats
from rapkern.testing import assert_close_to_reference, reference_attention_kl, reference_attention_stats

HAVE_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if HAVE_CUDA else "cpu"

pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not (HAVE_CUDA or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1"),
    pytest.mark.skipif(
        dispatch.get("triton").availability() is not None,
        reason=f"triton backend unavailable: {dispatch.get('triton').availability()}",
    ),
]

FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
gen = helpers.gen
make_prior = functools.partial(helpers.make_prior, device=DEVICE, dtype=torch.float32)


def rnd(*shape, dtype=torch.float32, seed=0, requires_grad=True):
    t = torch.randn(shape, generator=gen(seed), dtype=torch.float64).to(dtype).to(DEVICE)
    return t.requires_grad_(requires_grad)


def padding(b, lk, seed=0):
    m = torch.rand(b, lk, generator=gen(seed + 7)) < 0.3
    m[:, 0] = False
    return m.to(DEVICE)


def side(q, k, prior, alpha, dt):
    """Fresh leaves of (q, k, prior, alpha) in dtype ``dt``, and the (name, leaf) pairs that need a gradient."""
    qq, kk = helpers.leaf_like(q, dt), helpers.leaf_like(k, dt)
    pr = None if prior is None else prior.with_tensors(*(helpers.leaf_like(t, dt) for t in prior.tensors()))
    al = helpers.leaf_like(alpha, dt) if isinstance(alpha, torch.Tensor) else alpha
    named = [("q", qq), ("k", kk)] + [(f"prior[{i}]", t) for i, t in enumerate(() if pr is None else pr.tensors())]
    named.append(("alpha", al))
    return (qq, kk, pr, al), [(n, t) for n, t in named if isinstance(t, torch.Tensor) and t.requires_grad]


def grads_of(loss, want):
    gs = torch.autograd.grad(loss, [t for _, t in want], allow_unused=True)
    return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(want, gs)}


def compare(name, got, ref, low, dtype, reduce_len=1):
    """The 2x rule with a floor for the input ``dtype`` (statistics are float32 even for fp16 inputs)."""
    assert got.dtype == low.dtype, f"{name}: dtype {got.dtype}, expected {low.dtype}"
    floor = helpers.scaled_floor(FLOOR, dtype, ref, reduce_len)
    assert_close_to_reference(name, got.detach(), ref.detach(), low.detach(), floor)


def skip_if_declined(op, p):
    be = dispatch.get("triton")
    reasons = be.stats_reasons(p) if op == "stats" else be.kl_reasons(p)
    if reasons:
        pytest.skip("triton declines: " + "; ".join(reasons))


# ---------------------------------------------------------------------------------------------- statistics


def stats_case(q, k, *, prior=None, alpha=1.0, causal=False, key_padding_mask=None, use=("entropy", "key_mass"),
               seed=0):
    """Triton vs float64 reference vs the same math in q's dtype, on both outputs and every gradient of
    Σ g_H·entropy + Σ g_M·key_mass (only the outputs in ``use`` enter the loss)."""
    dt = q.dtype
    kw = dict(causal=causal, key_padding_mask=key_padding_mask)
    skip_if_declined("stats", check_stats(q, k, prior=prior, alpha=alpha, scale=None, **kw))
    b, hq, lq, lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    g = {"entropy": rnd(b, hq, lq, dtype=torch.float64, seed=seed + 1, requires_grad=False),
         "key_mass": rnd(b, hq, lk, dtype=torch.float64, seed=seed + 2, requires_grad=False)}

    def run(fn, cdt, **extra):
        args, want = side(q, k, prior, alpha, cdt)
        qq, kk, pr, al = args
        out = fn(qq, kk, prior=pr, alpha=al, **kw, **extra)
        loss = sum((getattr(out, n).double() * g[n]).sum() for n in use)
        return out, grads_of(loss, want)

    got = run(rapkern.attention_stats, dt, backend="triton")
    ref = run(reference_attention_stats, torch.float64)
    low = run(reference_attention_stats, dt, compute_dtype=dt)
    compare("entropy", got[0].entropy, ref[0].entropy, low[0].entropy, dt)
    compare("key_mass", got[0].key_mass, ref[0].key_mass, low[0].key_mass, dt)
    for n in ref[1]:
        compare(f"d{n}", got[1][n], ref[1][n], low[1][n], dt, reduce_len=max(lq, lk))
    return got


# (kind, mask, hq, hkv, lq, lk, lead, outputs in the loss): every prior kind meets plain/causal/padding/
# causal+padding, MHA and GQA, Lq < / = / > Lk, entropy-only and mass-only gradients.
STATS_GRID = [
    ("none", "plain", 2, 2, 1, 1, (), "both"),
    ("none", "causal+padding", 4, 2, 47, 33, (), "key_mass"),
    ("lag", "plain", 2, 1, 33, 47, (2,), "both"),
    ("lag", "causal+padding", 2, 2, 47, 47, (), "entropy"),
    ("banded", "causal", 2, 1, 47, 33, (2,), "both"),
    ("banded", "padding", 2, 2, 17, 47, (2, 1), "key_mass"),
    ("banded_masked", "plain", 2, 2, 47, 47, (), "both"),
    ("banded_masked", "causal+padding", 2, 1, 33, 47, (2,), "entropy"),
    ("lowrank", "padding", 2, 1, 47, 17, (), "both"),
    ("lowrank", "causal", 2, 1, 33, 33, (1, 2), "key_mass"),
    ("dense", "causal+padding", 2, 1, 33, 47, (2,), "both"),
    ("dense", "plain", 2, 2, 17, 33, (2, 2), "entropy"),
]


def _lead(lead, b):
    return tuple(b if x == 2 and i == 0 and len(lead) == 2 else x for i, x in enumerate(lead))


@pytest.mark.parametrize(
    "kind,mask,hq,hkv,lq,lk,lead,use", STATS_GRID,
    ids=[f"{c[0]}-{c[1]}-H{c[2]}x{c[3]}-Lq{c[4]}-Lk{c[5]}-lead{len(c[6])}-{c[7]}" for c in STATS_GRID],
)
def test_stats_fp32(kind, mask, hq, hkv, lq, lk, lead, use):
    b = 2 if len(lead) == 2 else 1
    q, k = rnd(b, hq, lq, 16, seed=lq), rnd(b, hkv, lk, 16, seed=lk + 1)
    prior = make_prior(kind, _lead(lead, b), lq, lk, gen=gen(lq + lk), w=3)
    alpha = torch.tensor([0.7, -1.3, 0.0, 2.0][:hq], device=DEVICE, requires_grad=True)
    kpm = padding(b, lk, seed=lq) if "padding" in mask else None
    stats_case(q, k, prior=prior, alpha=alpha, causal="causal" in mask, key_padding_mask=kpm,
               use=("entropy", "key_mass") if use == "both" else (use,))


@pytest.mark.parametrize("kind", ["lag", "banded_masked", "lowrank", "dense"])
def test_stats_fp16(kind):
    """Half inputs, head dim 40 (not a power of two), causal + padding + GQA."""
    q, k = rnd(1, 2, 33, 40, dtype=torch.float16, seed=21), rnd(1, 1, 40, 40, dtype=torch.float16, seed=22)
    prior = make_prior(kind, (2,), 33, 40, gen=gen(23), dtype=torch.float16)
    alpha = torch.tensor([0.9, 0.3], dtype=torch.float16, device=DEVICE, requires_grad=True)
    stats_case(q, k, prior=prior, alpha=alpha, causal=True, key_padding_mask=padding(1, 40))


def test_stats_wide_window_and_fully_masked_rows():
    """Lag window and masked band wider than a tile (W = 40); padding kills batch 1 and the masked band leaves
    rows past Lk + w with no key: entropy 0, no key mass, zero and finite gradients."""
    b, lq, lk, w = 2, 70, 17, 40
    q, k = rnd(b, 2, lq, 16, seed=3), rnd(b, 1, lk, 16, seed=4)
    kpm = torch.zeros(b, lk, dtype=torch.bool, device=DEVICE)
    kpm[1] = True
    stats_case(q[:1], k[:1], prior=make_prior("lag", (2,), lq, lk, gen=gen(5), w=w), alpha=0.9)
    prior = make_prior("banded_masked", (), lq, lk, gen=gen(6), w=w)
    (ent, mass), grads = stats_case(q, k, prior=prior, alpha=1.0, key_padding_mask=kpm)
    assert torch.all(ent[1] == 0) and torch.all(mass[1] == 0)
    assert torch.all(ent[0, :, lk + w:] == 0)
    assert torch.all(grads["q"][1] == 0) and torch.all(grads["q"][0, :, lk + w:] == 0)
    for g in grads.values():
        assert torch.isfinite(g).all()


def _cut(t, pad_front=3, pad_back=5):
    """``t`` copied into the middle of a NaN-filled (B, L, H, D + 7) buffer; the strided view (unit last stride)."""
    b, h, l, d = t.shape
    buf = torch.full((b, l + pad_front + pad_back, h, d + 7), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[:, pad_front:pad_front + l, :, 2:2 + d].permute(0, 2, 1, 3)
    view.copy_(t.detach())
    return view.requires_grad_()


def test_stats_strided_nan_padded_inputs():
    """(B, L, H, D) layouts cut out of NaN-padded buffers and a banded prior with padded row strides: an
    out-of-bounds read would show up as NaN."""
    q, k = _cut(rnd(2, 2, 33, 24, seed=30)), _cut(rnd(2, 1, 40, 24, seed=31))
    assert q.stride(-1) == 1 and not q.is_contiguous()
    buf = torch.full((2, 2, 33 + 6, 8), float("nan"), device=DEVICE)
    vals = buf[:, :, 3:36, 1:8]
    vals.copy_(torch.randn(vals.shape, generator=gen(32)))
    stats_case(q, k, prior=BandedPrior(vals.requires_grad_()), alpha=0.8, causal=True,
               key_padding_mask=padding(2, 40))


# ---------------------------------------------------------------------------------------------- KL


def kl_case(teacher, student, *, causal=False, key_padding_mask=None, temperature=1.0, seed=0):
    """teacher/student = (q, k, prior, alpha). Per-row KL and every student gradient of Σ g·KL, 2x rule."""
    qt, kt, pt, at = teacher
    dt = student[0].dtype
    kw = dict(causal=causal, key_padding_mask=key_padding_mask, temperature=temperature, reduction="none")
    p = check_kl(qt, kt, student[0], student[1], prior_t=pt, prior_s=student[2], alpha_t=at, alpha_s=student[3],
                 scale_t=None, scale_s=None, **kw)
    skip_if_declined("kl", p)
    b, hq, lq = student[0].shape[:3]
    g = rnd(b, hq, lq, dtype=torch.float64, seed=seed + 3, requires_grad=False)

    def run(fn, cdt_t, cdt_s, **extra):
        (tq, tk, tp, ta), _ = side(qt, kt, pt, at, cdt_t)
        (sq, sk, sp, sa), want = side(*student, cdt_s)
        rows = fn(tq, tk, sq, sk, prior_t=tp, prior_s=sp, alpha_t=ta, alpha_s=sa, **kw, **extra)
        return rows, grads_of((rows.double() * g).sum(), want)

    got = run(rapkern.attention_kl, qt.dtype, dt, backend="triton")
    ref = run(reference_attention_kl, torch.float64, torch.float64)
    low = run(reference_attention_kl, qt.dtype, dt, compute_dtype=dt)
    compare("kl", got[0], ref[0], low[0], dt)
    for n in ref[1]:
        compare(f"d{n}", got[1][n], ref[1][n], low[1][n], dt, reduce_len=max(lq, student[1].shape[2]))
    return got


def kl_side(kind, b, hq, hkv, lq, lk, d, *, dtype=torch.float32, seed=0, w=3, grad=True):
    q, k = rnd(b, hq, lq, d, dtype=dtype, seed=seed, requires_grad=grad), rnd(b, hkv, lk, d, dtype=dtype,
                                                                               seed=seed + 1, requires_grad=grad)
    prior = helpers.make_prior(kind, (hq,), lq, lk, gen=gen(seed + 2), w=w, dtype=dtype, device=DEVICE,
                               requires_grad=grad)
    alpha = torch.tensor([0.8, -0.6, 1.2, 0.0][:hq], dtype=dtype, device=DEVICE, requires_grad=grad)
    return q, k, prior, alpha


# (teacher kind, student kind, mask, hq, teacher hkv, student hkv, lq, lk, teacher D, student D, T): every
# student prior kind, each mask, GQA on either side, different head dims and temperatures.
KL_GRID = [
    ("none", "lag", "causal", 2, 2, 1, 33, 47, 16, 24, 1.0),
    ("lag", "banded", "padding", 2, 1, 2, 47, 33, 24, 16, 2.0),
    ("banded_masked", "banded_masked", "causal+padding", 2, 1, 1, 47, 47, 16, 16, 0.5),
    ("dense", "lowrank", "plain", 4, 2, 1, 17, 33, 16, 32, 1.5),
    ("lowrank", "dense", "causal", 2, 2, 2, 33, 17, 32, 16, 1.0),
    ("banded", "none", "padding", 2, 2, 1, 47, 17, 16, 16, 3.0),
]


@pytest.mark.parametrize(
    "kt,ks,mask,hq,ht,hs,lq,lk,dt,ds,temp", KL_GRID,
    ids=[f"{c[0]}-to-{c[1]}-{c[2]}-H{c[3]}x{c[4]}x{c[5]}-Lq{c[6]}-Lk{c[7]}-D{c[8]}x{c[9]}-T{c[10]}" for c in KL_GRID],
)
def test_kl_fp32(kt, ks, mask, hq, ht, hs, lq, lk, dt, ds, temp):
    b = 1
    # the teacher's band is narrower than the student's, so no teacher-visible key is masked by the student
    teacher = kl_side(kt, b, hq, ht, lq, lk, dt, seed=lq, w=2, grad=False)
    student = kl_side(ks, b, hq, hs, lq, lk, ds, seed=lk + 50, w=3)
    kpm = padding(b, lk, seed=lk) if "padding" in mask else None
    kl_case(teacher, student, causal="causal" in mask, key_padding_mask=kpm, temperature=temp)


@pytest.mark.parametrize("dt_t", [torch.float16, torch.float32], ids=["teacher-fp16", "teacher-fp32"])
def test_kl_fp16_student(dt_t):
    teacher = kl_side("lag", 1, 2, 1, 33, 40, 40, dtype=dt_t, seed=60, grad=False)
    student = kl_side("lowrank" if dt_t == torch.float16 else "banded", 1, 2, 2, 33, 40, 24, dtype=torch.float16,
                      seed=61)
    kl_case(teacher, student, causal=True, key_padding_mask=padding(1, 40), temperature=2.0)


def test_kl_dead_rows_and_student_only_masks():
    """Rows the teacher cannot see are 0 with zero gradient; a key the teacher sees and only the student's
    prior masks (a -inf in a dense bias) makes that row +inf, like the reference; no NaN anywhere."""
    b, h, lq, lk = 2, 2, 33, 17
    kpm = torch.zeros(b, lk, dtype=torch.bool, device=DEVICE)
    kpm[1] = True
    teacher = kl_side("lag", b, h, h, lq, lk, 16, seed=70, grad=False)
    student = kl_side("lag", b, h, 1, lq, lk, 16, seed=71)
    rows, grads = kl_case(teacher, student, key_padding_mask=kpm, causal=True)
    assert torch.all(rows[1] == 0) and torch.all(grads["q"][1] == 0)
    bias = torch.randn(lq, lk, generator=gen(72)).to(DEVICE)
    bias[4, 2] = float("-inf")
    qs, ks = (t.detach().requires_grad_() for t in student[:2])
    got = rapkern.attention_kl(*teacher[:2], qs, ks, prior_t=teacher[2], alpha_t=teacher[3], prior_s=DensePrior(bias),
                               reduction="none", backend="triton")
    want = reference_attention_kl(*teacher[:2], qs, ks, prior_t=teacher[2], alpha_t=teacher[3],
                                  prior_s=DensePrior(bias), reduction="none")
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.isinf(got[:, :, 4]).all()
    finite = torch.isfinite(want)
    assert (got[finite] - want[finite]).abs().max() < 1e-5
    g = torch.autograd.grad(got.masked_fill(~finite, 0.0).sum(), [qs, ks])
    assert all(torch.isfinite(x).all() for x in g)


def test_kl_reductions_match_reference():
    teacher = kl_side("banded_masked", 1, 2, 2, 33, 33, 16, seed=80, grad=False, w=1)
    student = kl_side("lag", 1, 2, 1, 33, 33, 16, seed=81)
    kw = dict(prior_t=teacher[2], alpha_t=teacher[3], prior_s=student[2], alpha_s=student[3], causal=True)
    for red in ("mean", "sum"):
        got = rapkern.attention_kl(*teacher[:2], *student[:2], reduction=red, backend="triton", **kw)
        ref = reference_attention_kl(*teacher[:2], *student[:2], reduction=red, **kw)
        assert abs(got.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item())), red


# ---------------------------------------------------------------------------------------------- determinism, reasons


def test_run_twice_bitwise():
    """No atomics: two runs give bitwise-equal outputs and gradients (lag-table and alpha partials included)."""
    q, k = rnd(1, 2, 40, 16, seed=90), rnd(1, 1, 33, 16, seed=91)
    prior = make_prior("lag", (1, 2), 40, 33, gen=gen(92), w=5)
    alpha = torch.tensor([0.5, -2.0], device=DEVICE, requires_grad=True)
    teacher = kl_side("dense", 1, 2, 2, 40, 33, 16, seed=93, grad=False)

    def once():
        ent, mass = rapkern.attention_stats(q, k, prior=prior, alpha=alpha, causal=True, backend="triton")
        kl = rapkern.attention_kl(*teacher[:2], q, k, prior_t=teacher[2], alpha_t=teacher[3], prior_s=prior,
                                  alpha_s=alpha, causal=True, reduction="none", backend="triton")
        leaves = [q, k, prior.table, alpha]
        return [ent, mass, kl, *torch.autograd.grad(ent.sum() + mass.square().sum() + kl.sum(), leaves)]

    for x, y in zip(once(), once()):
        assert torch.equal(x, y)


def test_reasons():
    be = dispatch.get("triton")
    base = dict(prior=None, alpha=1.0, causal=False, key_padding_mask=None, scale=None)
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    assert be.stats_reasons(check_stats(q, q, **base)) == []
    d64 = q.double()
    assert any("dtype" in r for r in be.stats_reasons(check_stats(d64, d64, **base)))
    big = torch.randn(1, 2, 8, 257, device=DEVICE)
    assert any("<= 256" in r for r in be.stats_reasons(check_stats(big, big, **base)))
    ok = torch.randn(1, 2, 8, 256, device=DEVICE)
    kl_kw = dict(prior_t=None, prior_s=None, alpha_t=1.0, alpha_s=1.0, causal=False, key_padding_mask=None,
                 temperature=1.0, reduction="none", scale_t=None, scale_s=None)
    assert be.kl_reasons(check_kl(q, q, q, q, **kl_kw)) == []
    assert any(r.startswith("teacher: dtype") for r in be.kl_reasons(check_kl(d64, d64, q, q, **kl_kw)))
    assert any(r.startswith("student: head dim") for r in be.kl_reasons(check_kl(q, q, big, big, **kl_kw)))
    assert not any("<= 256" in r for r in be.stats_reasons(check_stats(ok, ok, **base)))
    with pytest.raises(NotImplementedError, match="backend 'triton' cannot run attention_stats"):
        rapkern.attention_stats(d64, d64, backend="triton")


@pytest.mark.skipif(HAVE_CUDA, reason="CPU-only dispatch behaviour")
def test_cpu_needs_interpreter_and_auto_skips_triton(monkeypatch):
    be = dispatch.get("triton")
    q = torch.randn(1, 2, 8, 16)
    p = check_stats(q, q, prior=None, alpha=1.0, causal=False, key_padding_mask=None, scale=None)
    assert dispatch.choose("attention_stats", p, "auto").name != "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)" in be.stats_reasons(p)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    qb = q.bfloat16()
    pb = check_stats(qb, qb, prior=None, alpha=1.0, causal=False, key_padding_mask=None, scale=None)
    assert any("bfloat16" in r for r in be.stats_reasons(pb))


def test_cuda_launches_without_a_verified_config_are_declined():
    """On CUDA a launch is served only with a spill-free config from stats.CONFIGS (checked ahead of time in
    test_triton_stats_compile.py); a missing one is a reason, so "auto" falls back to the torch backend."""
    from rapkern.backends.triton_attention import stats as S

    cuda = torch.device("cuda")
    assert S._config_reasons(cuda, ("fwd", "mass", "dq", "dk"), 64, False, "lowrank") == []
    assert S._config_reasons(cuda, ("klfwd", "dq", "dk"), 40, True, "dense") == []
    why = S._config_reasons(cuda, ("fwd", "mass", "dq", "dk"), 256, False, "lowrank")
    assert why == ["no spill-free config of the dq, dk kernel(s) for head dim 256 with 16-bit inputs and a "
                   "'lowrank' prior"]
    assert S._config_reasons(cuda, ("klfwd", "dq", "dk"), 65, True, "none")[0].startswith(
        "no spill-free config of the klfwd, dq, dk kernel(s) for head dim 65 with fp32 inputs")
    assert S._config_reasons(torch.device("cpu"), ("dq",), 256, False, "lowrank") == []  # the interpreter's tiles
