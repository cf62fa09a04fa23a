"""rapkern.attention_stats and rapkern.attention_kl (torch backend) against the float64 references.

Values and every gradient (q, k, prior tensors, alpha) follow FlashAttention's 2x rule, as in
test_attention_torch.py: error <= 2 x error of the same eager math in the input dtype + a floor.
"""

from __future__ import annotations

import math

import helpers
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import rapkern
from rapkern import BandedPrior, DensePrior, LowRankPrior, RelativeLagPrior
from rapkern.backends.torch_blocked import TorchBackend
from rapkern.stats import check_kl, check_stats
from rapkern.testing import (
    assert_close_to_reference,
    reference_attention_kl,
    reference_attention_stats,
)

FLOOR = {torch.float64: 1e-11, torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}
PRIOR_KINDS = ["none", "lag", "banded", "banded_masked", "lowrank", "dense"]
MASKS = ["plain", "causal+padding"]
LENGTHS = [(1, 1), (17, 97), (97, 17)]
LEN_IDS = [f"Lq{a}-Lk{b}" for a, b in LENGTHS]

gen = helpers.gen
leaf_like = helpers.leaf_like


@pytest.fixture
def many_blocks(monkeypatch):
    """The smallest query blocks (16 rows), so every length > 16 walks several tiles."""
    monkeypatch.setenv("RAPKERN_TORCH_TILE_MB", "0.001")


def rnd(*shape, dtype=torch.float32, seed=0, requires_grad=True):
    t = torch.randn(shape, generator=gen(seed), dtype=torch.float64).to(dtype)
    return t.requires_grad_(requires_grad)


def padding(b, lk, seed=0, dead_batch=None):
    m = torch.rand(b, lk, generator=gen(seed + 7)) < 0.3
    m[:, 0] = False
    if dead_batch is not None:
        m[dead_batch] = True  # every row of that batch entry sees nothing
    return m


def floor(dtype, ref, reduce_len=1):
    return helpers.scaled_floor(FLOOR, dtype, ref, reduce_len)


def copy_side(q, k, prior, alpha, dt):
    """Fresh leaves of q, k, prior tensors and alpha in dtype ``dt``; and the leaves that need a gradient."""
    qq, kk = leaf_like(q, dt), leaf_like(k, dt)
    pr = None if prior is None else prior.with_tensors(*(leaf_like(t, dt) for t in prior.tensors()))
    al = leaf_like(alpha, dt) if isinstance(alpha, torch.Tensor) else alpha
    names = ["q", "k"] + [f"prior[{i}]" for i in range(0 if pr is None else len(pr.tensors()))] + ["alpha"]
    leaves = [qq, kk] + ([] if pr is None else list(pr.tensors())) + [al]
    want = [(n, t) for n, t in zip(names, leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
    return (qq, kk, pr, al), want


def grads_of(loss, want):
    gs = torch.autograd.grad(loss, [t for _, t in want], allow_unused=True)
    return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(want, gs)}


def compare(name, got, ref, low, reduce_len=1):
    dtype = low.dtype
    assert got.dtype == low.dtype, f"{name}: dtype {got.dtype}, expected {low.dtype}"
    assert not torch.isnan(got).any(), f"{name}: NaN"
    assert_close_to_reference(name, got.detach(), ref.detach(), low.detach(), floor(dtype, ref, reduce_len))


# ------------------------------------------------------------------------------------------ statistics


def stats_case(q, k, *, prior=None, alpha=1.0, causal=False, key_padding_mask=None, scale=None, seed=0):
    """Backend vs float64 reference vs eager-in-dtype reference: entropy, key_mass and all gradients of
    a random combination of both outputs. Returns the backend's (entropy, key_mass)."""
    kw = dict(causal=causal, key_padding_mask=key_padding_mask, scale=scale)

    def run(fn, dt, **extra):
        (qq, kk, pr, al), want = copy_side(q, k, prior, alpha, dt)
        ent, mass = fn(qq, kk, prior=pr, alpha=al, **kw, **extra)
        g_ent = rnd(*ent.shape, dtype=ent.dtype, seed=seed + 1, requires_grad=False)
        g_mass = rnd(*mass.shape, dtype=mass.dtype, seed=seed + 2, requires_grad=False)
        return ent, mass, grads_of((ent * g_ent).sum() + (mass * g_mass).sum(), want)

    dtype = q.dtype
    got = run(rapkern.attention_stats, dtype, backend="torch")
    ref = run(reference_attention_stats, torch.float64)
    low = run(reference_attention_stats, dtype, compute_dtype=dtype)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert got[0].dtype == got[1].dtype == out_dtype
    assert got[0].shape == q.shape[:3] and got[1].shape == (*q.shape[:2], k.shape[2])
    compare("entropy", got[0], ref[0], low[0])
    compare("key_mass", got[1], ref[1], low[1])
    assert set(got[2]) == set(ref[2])
    for n in ref[2]:
        compare(f"d{n}", got[2][n], ref[2][n], low[2][n], reduce_len=max(q.shape[2], k.shape[2]))
    return got[0].detach(), got[1].detach()


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("lq,lk", LENGTHS, ids=LEN_IDS)
@pytest.mark.parametrize("kind", PRIOR_KINDS)
def test_stats_fp32(kind, lq, lk, mask, many_blocks):
    """Every prior x masks x Lq != Lk, GQA (4 query heads on 2 kv heads), per-head alpha with a zero head."""
    b, hq, hkv, d = 2, 4, 2, 16
    q, k = rnd(b, hq, lq, d, seed=lq), rnd(b, hkv, lk, d, seed=lk + 1)
    prior = helpers.make_prior(kind, (hq,), lq, lk, gen=gen(lq + lk), dtype=torch.float32)
    alpha = torch.tensor([0.7, 0.0, -1.3, 2.0], requires_grad=True)
    kpm = padding(b, lk, seed=lq) if mask != "plain" else None
    ent, mass = stats_case(q, k, prior=prior, alpha=alpha, causal=mask != "plain", key_padding_mask=kpm)
    assert (ent >= -1e-5).all() and (ent <= math.log(lk) + 1e-5).all()


@pytest.mark.parametrize("kind", PRIOR_KINDS)
def test_stats_float64_batch_head_prior(kind, many_blocks):
    """float64 in and out; prior leading dims (B, Hq); scalar alpha tensor; explicit scale."""
    b, h, lq, lk = 2, 2, 37, 29
    q, k = rnd(b, h, lq, 8, dtype=torch.float64, seed=3), rnd(b, h, lk, 8, dtype=torch.float64, seed=4)
    prior = helpers.make_prior(kind, (b, h), lq, lk, gen=gen(5))
    alpha = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    stats_case(q, k, prior=prior, alpha=alpha, causal=True, key_padding_mask=padding(b, lk), scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("kind", ["lag", "dense"])
def test_stats_half_precision(kind, dtype, many_blocks):
    """Half inputs are computed in float32; results are float32, gradients in the inputs' dtype."""
    lq, lk = 41, 23
    q, k = rnd(2, 2, lq, 16, dtype=dtype, seed=21), rnd(2, 1, lk, 16, dtype=dtype, seed=22)
    prior = helpers.make_prior(kind, (2,), lq, lk, gen=gen(23), dtype=dtype)
    alpha = torch.tensor([0.9, 0.3], dtype=dtype, requires_grad=True)
    stats_case(q, k, prior=prior, alpha=alpha, causal=True, key_padding_mask=padding(2, lk))


def test_stats_and_kl_strided_inputs(many_blocks):
    """Transposed q (column-major last two dims) and k expanded over the batch (stride 0)."""
    b, h, lq, lk, d = 3, 2, 19, 26, 8
    q = rnd(b, h, d, lq, seed=13, requires_grad=False).mT.requires_grad_()
    k = rnd(1, 1, lk, d, seed=14, requires_grad=False).expand(b, 1, lk, d).requires_grad_()
    assert not q.is_contiguous() and k.stride(0) == 0
    prior = helpers.make_prior("lag", (h,), lq, lk, gen=gen(15), dtype=torch.float32)
    stats_case(q, k, prior=prior, alpha=0.5, causal=True)
    teacher = side(b, h, h, lq, lk, 4, kind="dense", seed=16)
    kl_case(teacher, dict(q=q, k=k, prior=prior), causal=True, reduction="mean")


def dead_row_prior(lq, lk):
    """A dense bias whose -inf entries kill row 3 for head 1 only (masks hold whatever alpha is)."""
    bias = torch.randn(2, lq, lk, generator=gen(9), dtype=torch.float64)
    bias[1, 3, :] = float("-inf")
    bias[0, :, 5] = float("-inf")
    return DensePrior(bias.float().requires_grad_())


def test_stats_fully_masked_rows(many_blocks):
    """Rows with no visible key (a fully padded batch entry, causal row 0 with key 0 padded, rows past a
    masking band, -inf rows of a dense bias): entropy exactly 0, no mass, zero gradients, never NaN."""
    b, h, lq, lk = 3, 2, 40, 20
    q, k = rnd(b, h, lq, 8, seed=31), rnd(b, h, lk, 8, seed=32)
    kpm = padding(b, lk, seed=1, dead_batch=2)
    kpm[1, 0] = True  # causal row 0 of batch 1 sees nothing
    band = BandedPrior(rnd(h, lq, 5, seed=33), mask_outside=True)  # rows i > lk + 1 see nothing
    alpha = torch.tensor([1.0, 0.0], requires_grad=True)
    for prior, causal in ((band, False), (dead_row_prior(lq, lk), True)):
        ent, mass = stats_case(q, k, prior=prior, alpha=alpha, causal=causal, key_padding_mask=kpm)
        p = check_stats(q, k, prior=prior, alpha=alpha, causal=causal, key_padding_mask=kpm, scale=None)
        live = p.live_rows()
        assert not live[2].any() and (ent[~live] == 0).all()
        # every live row hands out exactly one unit of attention
        torch.testing.assert_close(mass.sum(-1), live.sum(-1).float(), rtol=1e-5, atol=1e-5)
    assert (mass[2] == 0).all()


@pytest.mark.parametrize("kind", ["lag", "banded_masked", "lowrank", "dense"])
def test_stats_gradcheck(kind):
    lq, lk = 5, 4
    q, k = rnd(1, 2, lq, 3, dtype=torch.float64, seed=41), rnd(1, 1, lk, 3, dtype=torch.float64, seed=42)
    prior = helpers.make_prior(kind, (2,), lq, lk, gen=gen(43), w=1, r=2)
    alpha = torch.tensor([0.8, -0.4], dtype=torch.float64, requires_grad=True)
    kpm = torch.tensor([[False, False, True, False]])
    n = len(prior.tensors())

    def f(q, k, alpha, *pt):
        return rapkern.attention_stats(q, k, prior=prior.with_tensors(*pt), alpha=alpha, causal=True,
                                       key_padding_mask=kpm, backend="torch")

    assert torch.autograd.gradcheck(f, (q, k, alpha, *prior.tensors()[:n]))


# ------------------------------------------------------------------------------------------ KL


def kl_case(teacher, student, *, causal=False, key_padding_mask=None, temperature=1.0, reduction="none", seed=0):
    """``teacher``/``student``: dicts with q, k and optionally prior, alpha, scale. Compares the KL and the
    student's gradients (of a random weighting for "none"); returns the backend's KL."""

    def run(fn, dt_t, dt_s, **extra):
        (qt, kt, pt, at), _ = copy_side(teacher["q"], teacher["k"], teacher.get("prior"), teacher.get("alpha", 1.0),
                                        dt_t)
        (qs, ks, ps, as_), want = copy_side(student["q"], student["k"], student.get("prior"),
                                            student.get("alpha", 1.0), dt_s)
        kl = fn(qt, kt, qs, ks, prior_t=pt, prior_s=ps, alpha_t=at, alpha_s=as_, causal=causal,
                key_padding_mask=key_padding_mask, temperature=temperature, reduction=reduction,
                scale_t=teacher.get("scale"), scale_s=student.get("scale"), **extra)
        g = rnd(*kl.shape, dtype=kl.dtype, seed=seed + 3, requires_grad=False)
        finite = torch.isfinite(kl)
        loss = (kl * g).masked_fill(~finite, 0.0).sum() if reduction == "none" else kl * (1.0 if finite else 0.0)
        return kl, grads_of(loss, want)

    dt_t, dt_s = teacher["q"].dtype, student["q"].dtype
    got = run(rapkern.attention_kl, dt_t, dt_s, backend="torch")
    ref = run(reference_attention_kl, torch.float64, torch.float64)
    low = run(reference_attention_kl, dt_t, dt_s, compute_dtype=torch.promote_types(dt_t, dt_s))
    b, h, lq = student["q"].shape[:3]
    assert got[0].shape == ((b, h, lq) if reduction == "none" else ())
    compare("kl", got[0], ref[0], low[0])
    for n in ref[1]:
        compare(f"d{n}", got[1][n], ref[1][n], low[1][n], reduce_len=max(lq, student["k"].shape[2]))
    return got[0].detach()


def side(b, hq, hkv, lq, lk, d, *, kind="none", dtype=torch.float32, seed=0, alpha=None, scale=None):
    prior = helpers.make_prior(kind, (hq,), lq, lk, gen=gen(seed + 5), dtype=dtype)
    if alpha is None:
        alpha = torch.linspace(-1.0, 1.5, hq, dtype=dtype).requires_grad_()
    return dict(q=rnd(b, hq, lq, d, dtype=dtype, seed=seed), k=rnd(b, hkv, lk, d, dtype=dtype, seed=seed + 1),
                prior=prior, alpha=alpha, scale=scale)


TEACHER_KIND = {"none": "dense", "lag": "none", "banded": "lag", "banded_masked": "banded_masked",
                "lowrank": "banded", "dense": "lowrank"}


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("lq,lk", LENGTHS, ids=LEN_IDS)
@pytest.mark.parametrize("kind", PRIOR_KINDS)
def test_kl_fp32(kind, lq, lk, mask, many_blocks):
    """Student prior of every kind against another teacher prior; teacher head dim 24 and 1 kv head,
    student head dim 16 and 2 kv heads (default scales differ); per-row KL and gradients."""
    b, h = 2, 4
    teacher = side(b, h, 1, lq, lk, 24, kind=TEACHER_KIND[kind], seed=lq)
    teacher["q"].requires_grad_(False)
    student = side(b, h, 2, lq, lk, 16, kind=kind, seed=lk + 100)
    kpm = padding(b, lk, seed=lq) if mask != "plain" else None
    kl = kl_case(teacher, student, causal=mask != "plain", key_padding_mask=kpm, temperature=1.5)
    assert kl.dtype == torch.float32 and torch.isfinite(kl).all() and (kl >= -1e-5).all()


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("temperature", [0.5, 3.0])
def test_kl_temperature_and_reductions(temperature, reduction, many_blocks):
    """Reductions over rows with dead teacher rows (a fully padded batch entry, causal row 0 with key 0
    padded): they add 0 and do not count in the mean."""
    b, h, lq, lk = 3, 2, 33, 21
    kpm = padding(b, lk, seed=2, dead_batch=2)
    kpm[1, 0] = True
    teacher = side(b, h, h, lq, lk, 8, kind="lag", seed=1)
    student = side(b, h, 1, lq, lk, 8, kind="lowrank", seed=2)
    kl_case(teacher, student, causal=True, key_padding_mask=kpm, temperature=temperature, reduction=reduction)
    if reduction == "mean":  # the same number from the unreduced rows and the reference's count of live rows
        kw = dict(prior_t=teacher["prior"], prior_s=student["prior"], alpha_t=teacher["alpha"],
                  alpha_s=student["alpha"], causal=True, key_padding_mask=kpm, temperature=temperature)
        args = (teacher["q"], teacher["k"], student["q"], student["k"])
        rows = rapkern.attention_kl(*args, **kw, reduction="none")
        live = check_kl(*args, **kw, reduction="mean", scale_t=None, scale_s=None).teacher.live_rows()
        assert 0 < int(live.sum()) < live.numel()
        mean = rapkern.attention_kl(*args, **kw, reduction="mean")
        torch.testing.assert_close(mean, rows.sum() / live.sum(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", PRIOR_KINDS)
def test_kl_float64(kind, many_blocks):
    b, h, lq, lk = 2, 2, 37, 29
    teacher = side(b, h, h, lq, lk, 8, kind="dense", dtype=torch.float64, seed=7)
    student = side(b, h, 1, lq, lk, 12, kind=kind, dtype=torch.float64, seed=8, scale=0.4)
    kl = kl_case(teacher, student, causal=True, key_padding_mask=padding(b, lk), temperature=2.0)
    assert kl.dtype == torch.float64


@pytest.mark.parametrize("kind", ["lag", "banded", "lowrank", "dense"])
def test_kl_gradcheck(kind):
    lq, lk = 5, 4
    qt, kt = rnd(1, 2, lq, 4, dtype=torch.float64, seed=51, requires_grad=False), rnd(
        1, 2, lk, 4, dtype=torch.float64, seed=52, requires_grad=False)
    qs, ks = rnd(1, 2, lq, 3, dtype=torch.float64, seed=53), rnd(1, 1, lk, 3, dtype=torch.float64, seed=54)
    prior = helpers.make_prior(kind, (2,), lq, lk, gen=gen(55), w=1, r=2)
    alpha = torch.tensor([0.8, -0.4], dtype=torch.float64, requires_grad=True)
    kpm = torch.tensor([[False, True, False, False]])

    def f(qs, ks, alpha, *pt):
        return rapkern.attention_kl(qt, kt, qs, ks, prior_s=prior.with_tensors(*pt), alpha_s=alpha, causal=True,
                                    key_padding_mask=kpm, temperature=0.7, reduction="none", backend="torch")

    assert torch.autograd.gradcheck(f, (qs, ks, alpha, *prior.tensors()))


@pytest.mark.parametrize("dt_t,dt_s", [(torch.float16, torch.float32), (torch.float32, torch.float64),
                                       (torch.bfloat16, torch.float16)], ids=["fp16-fp32", "fp32-fp64", "bf16-fp16"])
def test_kl_mixed_dtypes(dt_t, dt_s, many_blocks):
    """Teacher and student dtypes may differ: float64 if either side is float64, else float32."""
    teacher = side(2, 2, 2, 29, 31, 16, kind="lag", dtype=dt_t, seed=61)
    student = side(2, 2, 1, 29, 31, 16, kind="banded", dtype=dt_s, seed=62)
    kl = kl_case(teacher, student, causal=True, key_padding_mask=padding(2, 31))
    assert kl.dtype == (torch.float64 if torch.float64 in (dt_t, dt_s) else torch.float32)


def test_kl_no_gradient_to_teacher():
    teacher = side(1, 2, 2, 9, 11, 8, kind="lag", seed=71)
    student = side(1, 2, 2, 9, 11, 8, kind="lag", seed=72)
    kl = rapkern.attention_kl(teacher["q"], teacher["k"], student["q"], student["k"], prior_t=teacher["prior"],
                              prior_s=student["prior"], alpha_t=teacher["alpha"], alpha_s=student["alpha"])
    kl.backward()
    assert all(t.grad is None for t in (teacher["q"], teacher["k"], teacher["alpha"], teacher["prior"].table))
    assert all(t.grad is not None for t in (student["q"], student["k"], student["alpha"], student["prior"].table))


def test_kl_of_identical_attention_is_zero(many_blocks):
    s = side(2, 2, 1, 40, 35, 8, kind="banded", seed=81)
    kl = rapkern.attention_kl(s["q"], s["k"], s["q"], s["k"], prior_t=s["prior"], prior_s=s["prior"],
                              alpha_t=s["alpha"], alpha_s=s["alpha"], causal=True, reduction="none")
    assert kl.abs().max() < 1e-6
    (dq,) = torch.autograd.grad(kl.sum(), [s["q"]])
    assert dq.abs().max() < 1e-5


def test_kl_infinite_where_only_the_student_masks(many_blocks):
    """A key the teacher attends to and the student's band masks: that row's KL is +inf, as in the
    reference; rows inside the band stay finite; gradients stay finite."""
    lq = lk = 30
    teacher = side(1, 2, 2, lq, lk, 8, kind="lag", seed=91)
    student = side(1, 2, 2, lq, lk, 8, kind="banded_masked", seed=92)
    args = (teacher["q"], teacher["k"], student["q"], student["k"])
    kw = dict(prior_t=teacher["prior"], prior_s=student["prior"], alpha_t=teacher["alpha"], alpha_s=student["alpha"],
              causal=True, reduction="none")
    kl = rapkern.attention_kl(*args, **kw)
    ref = reference_attention_kl(*args, **kw)
    assert torch.equal(torch.isposinf(kl), torch.isposinf(ref)) and not torch.isnan(kl).any()
    w = student["prior"].half_width
    assert torch.isposinf(kl[..., w + 1 :]).all() and torch.isfinite(kl[..., : w + 1]).all()
    fin = torch.isfinite(ref)
    torch.testing.assert_close(kl[fin], ref[fin].float(), rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(kl.masked_fill(torch.isinf(kl), 0).sum() + kl[0, 0, -1].detach(), [student["q"]])[0]
    assert torch.isfinite(g).all()


def test_kl_mean_with_no_live_row_is_zero():
    teacher = side(2, 2, 2, 6, 5, 8, seed=95)
    student = side(2, 2, 2, 6, 5, 8, seed=96)
    kl = rapkern.attention_kl(teacher["q"], teacher["k"], student["q"], student["k"],
                              key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    assert kl.item() == 0.0
    (dq,) = torch.autograd.grad(kl, [student["q"]])
    assert (dq == 0).all()


# ------------------------------------------------------------------------------------------ properties


@pytest.mark.parametrize("kind", PRIOR_KINDS)
def test_live_rows_match_reference(kind):
    """StatsProblem.live_rows (it counts the rows of the KL mean) agrees with the dense reference."""
    from rapkern.testing import _reference_logits

    b, h, lq, lk = 2, 2, 23, 9
    prior = helpers.make_prior(kind, (h,), lq, lk, gen=gen(3), w=2) if kind != "dense" else dead_row_prior(lq, lk)
    kpm = padding(b, lk, seed=4)
    kpm[0, :3] = True
    q, k = rnd(b, h, lq, 4, seed=5), rnd(b, h, lk, 4, seed=6)
    for causal in (False, True):
        p = check_stats(q, k, prior=prior, alpha=0.5, causal=causal, key_padding_mask=kpm, scale=None)
        dead = _reference_logits(p, torch.float64)[1].squeeze(-1)
        assert torch.equal(p.live_rows(), ~dead)
        assert dead.any() or kind not in ("banded_masked", "dense") or not causal


def test_deterministic(many_blocks):
    s = side(2, 4, 2, 50, 40, 8, kind="lag", seed=101)
    t = side(2, 4, 1, 50, 40, 8, kind="banded", seed=102)

    def run():
        (q, k, pr, al), want = copy_side(s["q"], s["k"], s["prior"], s["alpha"], torch.float32)
        st = rapkern.attention_stats(q, k, prior=pr, alpha=al, causal=True)
        kl = rapkern.attention_kl(t["q"], t["k"], q, k, prior_t=t["prior"], prior_s=pr, alpha_s=al, causal=True)
        loss = st.entropy.sum() + st.key_mass.square().sum() + kl
        return [st.entropy, st.key_mass, kl.detach()] + list(grads_of(loss, want).values())

    for a, b in zip(run(), run()):
        assert torch.equal(a.detach(), b.detach())


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_lq_by_lk_tensor(many_blocks):
    """Forward and backward of both ops only hold tiles (16 rows here), never an Lq×Lk tensor; the same
    probe sees the reference's dense one."""
    lq = lk = 256
    s = side(1, 1, 1, lq, lk, 8, kind="lag", seed=111)
    t = side(1, 1, 1, lq, lk, 8, kind="banded", seed=112)
    with _LargestTensor() as probe:
        st = rapkern.attention_stats(s["q"], s["k"], prior=s["prior"], alpha=s["alpha"], causal=True)
        kl = rapkern.attention_kl(t["q"], t["k"], s["q"], s["k"], prior_t=t["prior"], prior_s=s["prior"],
                                  alpha_s=s["alpha"], causal=True)
        (st.entropy.sum() + st.key_mass.square().sum() + kl).backward()
    assert 0 < probe.largest <= 2 * 16 * lk  # a tile of 16 rows (the lag prior's gradient pads it to bq + nk)
    with _LargestTensor() as probe:
        reference_attention_stats(s["q"], s["k"], prior=s["prior"], alpha=s["alpha"], causal=True)
    assert probe.largest >= lq * lk


# ------------------------------------------------------------------------------------------ validation

B, HQ, HKV, LQ, LK, D = 2, 4, 2, 5, 7, 8


def t_(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


@pytest.fixture
def no_compute(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a backend ran although the input was invalid")

    monkeypatch.setattr(TorchBackend, "attention_stats", boom)
    monkeypatch.setattr(TorchBackend, "attention_kl", boom)


STATS_ERRORS = [
    ("q-not-tensor", dict(q=[1.0]), TypeError, r"q must be a torch\.Tensor"),
    ("q-3d", dict(q=t_(B, LQ, D)), ValueError, r"q must be 4-D"),
    ("k-dtype", dict(k=t_(B, HKV, LK, D, dtype=torch.float64)), TypeError, r"k must have the same dtype as q"),
    ("batch", dict(k=t_(B + 1, HKV, LK, D)), ValueError, r"q and k must share the batch size: got 2 and 3"),
    ("gqa", dict(k=t_(B, 3, LK, D)), ValueError, r"multiple of the key/value heads Hkv = 3"),
    ("head-dim", dict(k=t_(B, HKV, LK, D + 1)), ValueError, r"k must have the same head dim as q"),
    ("kpm-shape", dict(key_padding_mask=torch.zeros(B, LK + 1, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \(B, Lk\) = \(2, 7\)"),
    ("kpm-dtype", dict(key_padding_mask=torch.zeros(B, LK)), TypeError, r"key_padding_mask must have dtype"),
    ("causal", dict(causal=1), TypeError, r"causal must be a bool"),
    ("alpha-shape", dict(alpha=torch.ones(HQ + 1)), ValueError, r"alpha must have shape \(\) or \(Hq,\)"),
    ("alpha-nan", dict(alpha=float("nan")), ValueError, r"alpha must be finite"),
    ("scale-type", dict(scale="0.1"), TypeError, r"scale must be a float or None"),
    ("prior-type", dict(prior=torch.zeros(LQ, LK)), TypeError, r"prior must be None or a rapkern prior"),
    ("band-rows", dict(prior=BandedPrior(torch.zeros(LQ + 1, 3))), ValueError, r"BandedPrior\.values must have Lq"),
    ("lag-inf", dict(prior=RelativeLagPrior(torch.tensor([0.0, float("-inf"), 0.0]))), ValueError,
     r"RelativeLagPrior\.table must not contain non-finite"),
    ("backend", dict(backend="nope"), ValueError, r"backend must be 'auto' or one of"),
]


@pytest.mark.parametrize("over,exc,match", [c[1:] for c in STATS_ERRORS], ids=[c[0] for c in STATS_ERRORS])
def test_stats_errors(over, exc, match, no_compute):
    kw = dict(q=t_(B, HQ, LQ, D), k=t_(B, HKV, LK, D))
    kw.update(over)
    with pytest.raises(exc, match=match):
        rapkern.attention_stats(kw.pop("q"), kw.pop("k"), **kw)


def kl_args(**over):
    kw = dict(q_t=t_(B, HQ, LQ, D), k_t=t_(B, HKV, LK, D), q_s=t_(B, HQ, LQ, 2 * D), k_s=t_(B, 1, LK, 2 * D))
    kw.update(over)
    return (kw.pop("q_t"), kw.pop("k_t"), kw.pop("q_s"), kw.pop("k_s")), kw


KL_ERRORS = [
    ("q_t-3d", dict(q_t=t_(B, LQ, D)), ValueError, r"attention_kl teacher \(q = q_t, .*\): q must be 4-D"),
    ("q_s-not-tensor", dict(q_s=1.0), TypeError, r"attention_kl student \(q = q_s, .*\): q must be a torch\.Tensor"),
    ("k_s-batch", dict(k_s=t_(B + 1, 1, LK, 2 * D)), ValueError, r"q_s and k_s must share the batch size"),
    ("k_t-head-dim", dict(k_t=t_(B, HKV, LK, D + 1)), ValueError, r"teacher .*k must have the same head dim as q"),
    ("prior_s-lk", dict(prior_s=LowRankPrior(torch.zeros(LQ, 2), torch.zeros(LK + 1, 2))), ValueError,
     r"attention_kl student .*LowRankPrior\.v must have Lk = 7"),
    ("prior_t-heads", dict(prior_t=DensePrior(torch.zeros(3, LQ, LK))), ValueError,
     r"attention_kl teacher .*DensePrior\.bias leading dims"),
    ("alpha_t-shape", dict(alpha_t=torch.ones(2)), ValueError, r"attention_kl teacher .*alpha must have shape"),
    ("alpha_s-type", dict(alpha_s="1"), TypeError, r"attention_kl student .*alpha must be a float"),
    ("scale_s-nan", dict(scale_s=float("nan")), ValueError, r"attention_kl student .*scale must be finite"),
    ("B", dict(q_s=t_(B + 1, HQ, LQ, 2 * D), k_s=t_(B + 1, 1, LK, 2 * D)), ValueError,
     r"teacher and student must agree in the batch size B .*: q_t/k_t give 2, q_s/k_s give 3"),
    ("Hq", dict(q_s=t_(B, 2, LQ, 2 * D)), ValueError, r"agree in the query heads Hq"),
    ("Lq", dict(q_s=t_(B, HQ, LQ + 1, 2 * D)), ValueError, r"agree in the query length Lq"),
    ("Lk", dict(k_s=t_(B, 1, LK + 1, 2 * D)), ValueError, r"agree in the key length Lk"),
    ("device", dict(q_s=t_(B, HQ, LQ, 2 * D, device="meta"), k_s=t_(B, 1, LK, 2 * D, device="meta")), ValueError,
     r"q_s must be on the same device as q_t"),
    ("kpm", dict(key_padding_mask=torch.zeros(B, LQ, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \(B, Lk\)"),
    ("causal", dict(causal=None), TypeError, r"causal must be a bool"),
    ("T-zero", dict(temperature=0.0), ValueError, r"temperature must be finite and > 0, got 0\.0"),
    ("T-neg", dict(temperature=-1), ValueError, r"temperature must be finite and > 0"),
    ("T-inf", dict(temperature=float("inf")), ValueError, r"temperature must be finite and > 0"),
    ("T-bool", dict(temperature=True), TypeError, r"temperature must be a float, got bool"),
    ("T-str", dict(temperature="2"), TypeError, r"temperature must be a float, got str"),
    ("reduction", dict(reduction="avg"), ValueError, r"reduction must be one of 'none', 'sum', 'mean', got 'avg'"),
    ("reduction-type", dict(reduction=None), TypeError, r"reduction must be a str"),
    ("backend", dict(backend=3), TypeError, r"backend must be a str"),
]


@pytest.mark.parametrize("over,exc,match", [c[1:] for c in KL_ERRORS], ids=[c[0] for c in KL_ERRORS])
def test_kl_errors(over, exc, match, no_compute):
    args, kw = kl_args(**over)
    with pytest.raises(exc, match=match):
        rapkern.attention_kl(*args, **kw)


@pytest.mark.parametrize(
    "over",
    [dict(temperature=1e-3), dict(temperature=7), dict(reduction="sum"), dict(reduction="none"),
     dict(alpha_t=torch.ones(HQ), alpha_s=torch.tensor(0.5), prior_t=DensePrior(torch.zeros(HQ, LQ, LK)),
          prior_s=LowRankPrior(torch.zeros(LQ, 2), torch.zeros(LK, 2))),
     dict(q_t=t_(B, HQ, LQ, D, dtype=torch.float16), k_t=t_(B, HQ, LK, D, dtype=torch.float16))],
    ids=["T-small", "T-int", "sum", "none", "priors", "fp16-teacher"],
)
def test_kl_boundary_cases_pass(over):
    args, kw = kl_args(**over)
    kl = rapkern.attention_kl(*args, **kw)
    assert torch.isfinite(kl).all()
