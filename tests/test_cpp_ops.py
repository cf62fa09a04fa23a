"""rapkern._C's ops as torch.library ops: opcheck, torch.compile(fullgraph=True), FakeTensorMode on "cuda",
a missing build reported by ``rapkern.info`` (with everything still running on the torch backend), and the
OpenMP runtime the kernels use being torch's own."""

from __future__ import annotations

import helpers
import pytest
import torch

import rapkern
from rapkern import _ext
from rapkern.backends.cpp.attention import KIND

NEEDS_EXT = pytest.mark.skipif(_ext.load() is not None, reason=str(_ext.load()))
KINDS = ["none", "lag", "banded", "banded_masked", "lowrank", "dense"]


def _prior_views(kind, b, hq, lq, lk, g, requires_grad=True):
    """The op's prior arguments (float32 (Bp, Hp, ...) views) for ``kind``; mixed leading dims."""
    def r(*s):
        return torch.randn(*s, generator=g).requires_grad_(requires_grad)

    if kind == "none":
        return None, None, False
    if kind == "lag":
        return r(1, hq, 7), None, False
    if kind.startswith("banded"):
        return r(b, 1, lq, 5), None, kind == "banded_masked"
    if kind == "lowrank":
        return r(1, hq, lq, 3), r(b, 1, lk, 3), False
    return r(b, hq, lq, lk), None, False


def _fwd_args(kind, requires_grad=True, dtype=torch.float32, seed=0):
    g = helpers.gen(seed)
    b, hq, hkv, lq, lk, d = 2, 4, 2, 9, 11, 8
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(dtype).requires_grad_(requires_grad)
               for h, n in ((hq, lq), (hkv, lk), (hkv, lk)))
    kpm = torch.zeros(b, lk, dtype=torch.bool)
    kpm[1, -3:] = True
    alpha = torch.tensor([0.5, 0.0, -1.0, 2.0], requires_grad=requires_grad)
    p0, p1, mo = _prior_views(kind, b, hq, lq, lk, g, requires_grad)
    return (q, k, v, kpm, alpha, 0.0, KIND[kind.split("_")[0]], p0, p1, mo, True, 0.3, 0.0, 0)


@NEEDS_EXT
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck_fwd(kind):
    torch.library.opcheck(torch.ops.rapkern.attention_fwd.default, _fwd_args(kind))


@NEEDS_EXT
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck_bwd(kind):
    args = _fwd_args(kind, requires_grad=False, seed=1)
    out, lse = torch.ops.rapkern.attention_fwd.default(*args)
    q, k, v, kpm, alpha, av, kd, p0, p1, mo, causal, scale, dp, seed = args
    dout = torch.randn(out.shape, generator=helpers.gen(2))
    dlse = torch.randn(lse.shape, generator=helpers.gen(3))
    need = (kd % 2 == 0, kd != 0, kd != 0)  # qkv grads for some kinds only, so both answers get checked
    bwd_args = (dout, dlse, q, k, v, out, lse, kpm, alpha, av, kd, p0, p1, mo, causal, scale, dp, seed, *need)
    torch.library.opcheck(torch.ops.rapkern.attention_bwd.default, bwd_args)


@NEEDS_EXT
@pytest.mark.parametrize("kind", ["lag", "lowrank"])
def test_compile_fullgraph_forward_backward(kind):
    """torch.compile(fullgraph=True) through AOTAutograd (fake impls, the C++ autograd's backward op in the
    backward graph) agrees with eager, forward and every gradient."""
    q, k, v, kpm, alpha, _, _, p0, p1, *_ = _fwd_args(kind, seed=4)
    prior = rapkern.RelativeLagPrior(p0[0]) if kind == "lag" else rapkern.LowRankPrior(p0, p1)
    leaves = [q, k, v, alpha, *prior.tensors()]

    def f(q, k, v, alpha, *pt):
        out, lse = rapkern.attention(q, k, v, prior=prior.with_tensors(*pt), alpha=alpha, causal=True,
                                     key_padding_mask=kpm, return_lse=True, backend="cpp")
        return out, lse

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (f, compiled):
        out, lse = fn(*leaves)
        loss = out.square().sum() + torch.where(torch.isfinite(lse), lse, 0).sum()
        results.append([out, lse, *torch.autograd.grad(loss, leaves)])
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"result {i}")


@NEEDS_EXT
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_fake_tensor_mode_cuda(kind, dtype):
    """The fake impls give shapes and dtypes on any device (here "cuda", with or without a GPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _fwd_args(kind, requires_grad=False, dtype=dtype)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fargs = [mode.from_tensor(a).to("cuda") if isinstance(a, torch.Tensor) else a for a in args]
        q, k, v, kpm, alpha, av, kd, p0, p1, mo, causal, scale, dp, seed = fargs
        out, lse = torch.ops.rapkern.attention_fwd.default(*fargs)
        assert out.device.type == "cuda" and out.shape == (2, 4, 9, 8) and out.dtype == dtype
        assert lse.device.type == "cuda" and lse.shape == (2, 4, 9) and lse.dtype == torch.float32
        grads = torch.ops.rapkern.attention_bwd.default(out, lse, q, k, v, out, lse, kpm, alpha, av, kd, p0, p1, mo,
                                                         causal, scale, dp, seed, True, True, True)
    want = [q, k, v]
    for g, ref in zip(grads[:3], want):
        assert g.device.type == "cuda" and g.shape == ref.shape and g.dtype == ref.dtype
    for g, ref in zip(grads[3:5], (p0, p1)):
        shape = (0,) if ref is None else ref.shape
        assert g.shape == shape and g.dtype == torch.float32
    assert grads[5].shape == (4,) and grads[5].dtype == torch.float32


@pytest.fixture
def no_ext(monkeypatch):
    """Simulate a machine where rapkern._C is not built."""
    monkeypatch.setenv("RAPKERN_DISABLE_EXT", "1")
    _ext._reset_for_tests()
    yield
    monkeypatch.delenv("RAPKERN_DISABLE_EXT")
    _ext._reset_for_tests()


def test_missing_build_reported_and_torch_serves(no_ext):
    from rapkern import info

    text = info.report()
    assert "_C       rapkern._C not built: disabled by RAPKERN_DISABLE_EXT=1" in text
    assert "cpp        unavailable: rapkern._C not built" in text
    g = helpers.gen(0)
    q = torch.randn(1, 2, 9, 8, generator=g, requires_grad=True)
    table = torch.randn(2, 5, generator=g, requires_grad=True)
    out = rapkern.attention(q, q, q, prior=rapkern.RelativeLagPrior(table), causal=True)  # auto -> torch
    ref = rapkern.attention(q, q, q, prior=rapkern.RelativeLagPrior(table), causal=True, backend="torch")
    assert torch.equal(out, ref)
    torch.autograd.grad(out.sum(), (q, table))
    with pytest.raises(NotImplementedError, match="backend 'cpp' cannot run attention.*rapkern._C not built"):
        rapkern.attention(q, q, q, backend="cpp")


def test_build_note_is_the_reason(monkeypatch, tmp_path):
    """A failed build leaves its compiler output in rapkern/_C_build.txt: the first line is the short reason,
    the rest is in details() and rapkern.info."""
    (tmp_path / "_C_build.txt").write_text("the build failed: attention_fwd.cpp:12: error: boom\ncompiler output\n")
    monkeypatch.setattr(_ext, "_HERE", tmp_path)

    def fail(name):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    monkeypatch.setattr(_ext.importlib, "import_module", fail)
    _ext._reset_for_tests()
    try:
        assert _ext.load() == ("rapkern._C not built: the build failed: attention_fwd.cpp:12: error: boom; "
                               "`python -m rapkern.info` shows the rest")
        assert "compiler output" in _ext.details()
        (tmp_path / "_C_build.txt").unlink()
        _ext._reset_for_tests()
        assert "not in the installed package" in _ext.load()
    finally:
        monkeypatch.undo()
        _ext._reset_for_tests()


@NEEDS_EXT
def test_one_openmp_runtime():
    """The kernels' OpenMP pragmas run on the libgomp torch loaded (torch.set_num_threads governs them)."""
    with open("/proc/self/maps") as f:
        gomp = {line.split()[-1] for line in f if "libgomp" in line}
    assert len(gomp) == 1, gomp
