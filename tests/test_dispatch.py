"""Backend choice: "auto", explicit names, RAPKERN_BACKEND, and the errors when nothing can serve."""

from __future__ import annotations

import pytest
import torch

import rapkern
from rapkern import RelativeLagPrior, dispatch
from rapkern.backends.reference import ReferenceBackend
from rapkern.backends.torch_blocked import TorchBackend
from rapkern.testing import reference_attention, reference_lda_route


def _qkv(device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 4, generator=g, dtype=dtype) for n in (5, 6, 6))
    return q.to(device), k.to(device), v.to(device)


def _route(device="cpu"):
    g = torch.Generator().manual_seed(0)
    q, c, a = torch.randn(7, 3, generator=g), torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)
    return q.to(device), c.to(device), a.to(device)


@pytest.fixture
def spy(monkeypatch):
    """Record which backend's run method is called (still running it)."""
    calls = []
    for cls in (TorchBackend, ReferenceBackend):
        for meth in ("attention", "route"):
            orig = getattr(cls, meth)

            def wrapper(self, *a, _orig=orig, _name=f"{cls.name}.{meth}", **k):
                calls.append(_name)
                return _orig(self, *a, **k)

            monkeypatch.setattr(cls, meth, wrapper)
    monkeypatch.delenv("RAPKERN_BACKEND", raising=False)
    return calls


def test_registry_order_and_get():
    """Other backends (e.g. triton) may be registered too; the float64 oracle always comes last."""
    names = [b.name for b in dispatch.backends()]
    assert "torch" in names and names[-1] == "reference"
    assert dispatch.get("torch").name == "torch"
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \[.*'reference'.*'torch'.*\], got 'xyz'"):
        dispatch.get("xyz")


def test_auto_picks_torch_on_cpu_never_reference(spy):
    q, k, v = _qkv()
    rapkern.attention(q, k, v)
    rapkern.lda_route(*_route())
    assert spy == ["torch.attention", "torch.route"]


def test_explicit_backend_names(spy):
    q, k, v = _qkv()
    a = rapkern.attention(q, k, v, backend="reference")
    b = rapkern.attention(q, k, v, backend="torch")
    assert spy == ["reference.attention", "torch.attention"]
    torch.testing.assert_close(a, b)
    assert torch.equal(a, reference_attention(q, k, v))


def test_reference_backend_route(spy):
    q, c, a = _route()
    out, (w, idx) = rapkern.lda_route(q, c, a, top_k=2, return_weights=True, backend="reference")
    assert spy == ["reference.route"]
    ref = reference_lda_route(q, c, a, top_k=2, return_weights=True)
    assert torch.equal(out, ref[0]) and torch.equal(w, ref[1][0]) and torch.equal(idx, ref[1][1])
    out, w = rapkern.lda_route(q, c, a, return_weights=True, backend="reference")
    assert w.shape == (7, 4)
    assert rapkern.lda_route(q, c, a, backend="reference").shape == (7, 2)


def test_env_var_overrides_auto(spy, monkeypatch):
    q, k, v = _qkv()
    monkeypatch.setenv("RAPKERN_BACKEND", "reference")
    rapkern.attention(q, k, v)
    rapkern.lda_route(*_route())
    assert spy == ["reference.attention", "reference.route"]


def test_env_var_does_not_override_explicit_backend(spy, monkeypatch):
    monkeypatch.setenv("RAPKERN_BACKEND", "reference")
    rapkern.attention(*_qkv(), backend="torch")
    assert spy == ["torch.attention"]


@pytest.mark.parametrize("value", ["", "auto"], ids=["empty", "auto"])
def test_env_var_empty_or_auto_means_auto(spy, monkeypatch, value):
    monkeypatch.setenv("RAPKERN_BACKEND", value)
    rapkern.attention(*_qkv())
    assert spy == ["torch.attention"]


def test_env_var_unknown_name_raises(monkeypatch):
    monkeypatch.setenv("RAPKERN_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of .*got 'nope'"):
        rapkern.attention(*_qkv())
    with pytest.raises(ValueError, match=r"got 'nope'"):
        rapkern.lda_route(*_route())


def test_unknown_backend_argument_raises():
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of .*got 'flash'"):
        rapkern.attention(*_qkv(), backend="flash")
    with pytest.raises(TypeError, match=r"backend must be a str, got int"):
        rapkern.attention(*_qkv(), backend=0)


def test_explicit_backend_that_cannot_serve_raises_with_reasons(monkeypatch):
    """backend="torch" on 'meta' tensors: NotImplementedError naming the backend, op and reason."""
    monkeypatch.delenv("RAPKERN_BACKEND", raising=False)
    q, k, v = _qkv("meta")
    with pytest.raises(NotImplementedError, match=r"backend 'torch' cannot run attention for q\(1, 2, 5, 4\).*meta"
                                                  r".*device type 'meta' not in \('cpu', 'cuda'\)"):
        rapkern.attention(q, k, v, backend="torch")
    with pytest.raises(NotImplementedError, match=r"backend 'torch' cannot run lda_route .*device type 'meta'"):
        rapkern.lda_route(*_route("meta"), backend="torch")
    # boundary: the same call on CPU tensors is served
    assert rapkern.attention(*_qkv(), backend="torch").shape == (1, 2, 5, 4)


def test_auto_with_no_backend_lists_every_reason(monkeypatch):
    monkeypatch.delenv("RAPKERN_BACKEND", raising=False)
    q, k, v = _qkv("meta")
    with pytest.raises(NotImplementedError, match=r"(?s)no backend can run attention for .*\n  torch: not chosen "
                                                  r"automatically for meta tensors"):
        rapkern.attention(q, k, v, prior=RelativeLagPrior(torch.zeros(3, device="meta", dtype=torch.float64)))
    with pytest.raises(NotImplementedError, match=r"no backend can run lda_route"):
        rapkern.lda_route(*_route("meta"))


def test_backend_reasons_reported(monkeypatch):
    """A backend declaring reasons is skipped by auto, and named with them when asked explicitly."""
    monkeypatch.delenv("RAPKERN_BACKEND", raising=False)
    monkeypatch.setattr(TorchBackend, "attention_reasons", lambda self, p: ["head dim 4 too small", "no luck"])
    with pytest.raises(NotImplementedError, match=r"torch: head dim 4 too small; no luck"):
        rapkern.attention(*_qkv())
    with pytest.raises(NotImplementedError,
                       match=r"backend 'torch' cannot run attention .*: head dim 4 too small; no luck"):
        rapkern.attention(*_qkv(), backend="torch")
    monkeypatch.setattr(TorchBackend, "availability", lambda self: "not installed")
    with pytest.raises(NotImplementedError, match=r"backend 'torch' cannot run attention .*: not installed"):
        rapkern.attention(*_qkv(), backend="torch")


def test_auto_falls_through_to_next_backend(monkeypatch, spy):
    """With a second (fake) backend registered after torch, auto takes it when torch declines."""

    class Fake(TorchBackend):
        name = "fake"

    monkeypatch.setattr(dispatch, "_REGISTRY", {})  # an isolated registry: torch, fake, reference
    monkeypatch.setattr(dispatch, "_PRIORITY", [])
    dispatch.register(TorchBackend(), priority=0)
    dispatch.register(ReferenceBackend(), priority=99)
    dispatch.register(Fake(), priority=1)
    assert [b.name for b in dispatch.backends()] == ["torch", "fake", "reference"]
    monkeypatch.setattr(TorchBackend, "attention_reasons",
                        lambda self, p: ["declined"] if type(self) is TorchBackend else [])
    rapkern.attention(*_qkv())
    assert spy == ["torch.attention"]  # Fake inherits TorchBackend.attention: the run is Fake's
    assert dispatch.choose("attention", _problem(), "auto").name == "fake"


def _problem():
    from rapkern.validate import check_attention

    q, k, v = _qkv()
    return check_attention(q, k, v, prior=None, alpha=1.0, causal=False, key_padding_mask=None, scale=None,
                           dropout_p=0.0)


def test_outputs_identical_across_auto_and_explicit_torch(monkeypatch):
    monkeypatch.delenv("RAPKERN_BACKEND", raising=False)
    q, k, v = _qkv()
    assert torch.equal(rapkern.attention(q, k, v, causal=True), rapkern.attention(q, k, v, causal=True,
                                                                                backend="torch"))
