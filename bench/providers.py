"""Provider registry: a name -> a builder that returns the callable to time for one config.

Attention providers (``attention_providers()``):

* ``rapkern-<backend>``: every backend in ``rapkern.dispatch.backends()`` but the float64 reference,
  found at run time (``torch``, ``triton``, and any added later). One that cannot serve a config is
  reported with its own reasons (``availability()`` / ``attention_reasons()``).
* ``eager``: ``rapkern.testing.reference_attention`` computed in the input dtype (everything materialized).
* ``sdpa_dense``: builds the dense bias α·B (+ causal -inf) from the compact prior, passes it to SDPA as
  ``attn_mask``. Building the bias is inside the timed call: it is what a user without rapkern pays.
* ``sdpa_nobias``: SDPA on the same q, k, v without any bias: the floor a biased kernel can approach
  (FlashAttention forced for fp16/bf16 on CUDA).
* ``flex``: ``torch.compile(flex_attention)`` with the prior as ``score_mod`` (captured tensors, learnable
  when the config asks for prior gradients) and causal / band masks as a ``BlockMask`` (built once,
  outside the timed call). Compile time is excluded from timing and reported as ``warmup_s``.
* ``sdpa_lowrank_concat`` (low-rank priors only): the exact route ``SDPA([q·scale, α·u], [k, v_f], v,
  scale=1)``.
* ``rapkern-auto`` (asked for by name, not in the default list): ``rapkern.attention(..., backend="auto")``,
  what a user gets without choosing; :func:`auto_choice` says which backend it picked.

Config keys read by :func:`make_attention_inputs` beyond the shape: ``learnable`` (prior tensors require
grad in the backward modes) and ``learn_alpha`` (the per-head α requires grad too).

Routing providers (``route_providers()``): ``rapkern-<backend>`` and ``eager``
(``reference_lda_route`` in the input dtype).

A builder raises ``harness.Unavailable(reason)`` when it cannot run a config.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import rapkern
from rapkern import dispatch
from rapkern.priors import BandedPrior, DensePrior, LowRankPrior, RelativeLagPrior
from rapkern.testing import reference_attention, reference_lda_route
from rapkern.validate import check_attention, check_route

from .harness import Unavailable

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}

BASELINES = ["eager", "sdpa_dense", "sdpa_nobias", "flex", "sdpa_lowrank_concat"]


def rapkern_backends() -> list:
    return [b for b in dispatch.backends() if b.name != "reference"]


def attention_providers() -> list[str]:
    return [f"rapkern-{b.name}" for b in rapkern_backends()] + BASELINES


AUTO = "rapkern-auto"


def rapkern_providers(include_auto: bool = False) -> list[str]:
    """``rapkern-<backend>`` for every registered backend (but the reference), plus ``rapkern-auto``."""
    return [f"rapkern-{b.name}" for b in rapkern_backends()] + ([AUTO] if include_auto else [])


def route_providers() -> list[str]:
    return [f"rapkern-{b.name}" for b in rapkern_backends()] + ["eager"]


def applicable(provider: str, params: dict) -> bool:
    """Whether a job for this provider makes sense at all (others are not even listed)."""
    prior = params.get("prior", "none")
    if provider == "sdpa_lowrank_concat":
        return prior == "lowrank"
    if provider == "sdpa_dense":
        return prior != "none"
    return True


# ----------------------------------------------------------------------------------------------------
# Inputs


def band_of(params: dict) -> int | None:
    """Half width of the visible band when a banded prior masks outside it (for the FLOP model)."""
    if params.get("prior") == "banded" and params.get("mask_outside"):
        return int(params["w"])
    return None


def make_attention_inputs(params: dict, device: str) -> dict:
    """Random q, k, v (B, H, L, D), a per-head alpha > 0 and the compact prior, seeded by the config."""
    torch.manual_seed(0)
    dt = DTYPES[params["dtype"]]
    b, h, L, d = params["B"], params["H"], params["L"], params["D"]
    grad = params["mode"] != "fwd"
    q, k, v = (torch.randn(b, h, L, d, device=device, dtype=dt).requires_grad_(grad) for _ in range(3))
    alpha = (torch.rand(h, device=device) + 0.5).to(torch.float32)
    alpha.requires_grad_(grad and bool(params.get("learn_alpha")))
    learn = grad and bool(params.get("learnable"))
    kind = params.get("prior", "none")
    tensors = []
    if kind == "lag":
        tensors = [torch.randn(h, 2 * params["W"] + 1, device=device, dtype=dt) * 0.5]
    elif kind == "banded":
        tensors = [torch.randn(h, L, 2 * params["w"] + 1, device=device, dtype=dt) * 0.5]
    elif kind == "lowrank":
        r = params["r"]
        tensors = [torch.randn(h, L, r, device=device, dtype=dt) / math.sqrt(r) for _ in range(2)]
    elif kind == "dense":
        tensors = [torch.randn(h, L, L, device=device, dtype=dt) * 0.5]
    elif kind != "none":
        raise ValueError(f"prior must be one of none, lag, banded, lowrank, dense; got {kind!r}")
    tensors = [t.requires_grad_(learn) for t in tensors]
    prior = None
    if kind == "lag":
        prior = RelativeLagPrior(tensors[0])
    elif kind == "banded":
        prior = BandedPrior(tensors[0], mask_outside=bool(params.get("mask_outside")))
    elif kind == "lowrank":
        prior = LowRankPrior(*tensors)
    elif kind == "dense":
        prior = DensePrior(tensors[0])
    leaves = [t for t in (q, k, v, alpha, *tensors) if t.requires_grad]
    return {"q": q, "k": k, "v": v, "alpha": alpha, "prior": prior, "prior_tensors": tensors,
            "causal": bool(params.get("causal")), "scale": 1.0 / math.sqrt(d), "leaves": leaves}


def predicted_bytes(provider: str, params: dict) -> int:
    """Rough peak of the L x L providers (to skip hopeless configs before allocating; RLIMIT_AS is the net)."""
    esize = torch.finfo(DTYPES[params["dtype"]]).bits // 8
    n = params["B"] * params["H"] * params["L"] ** 2 * esize
    nh = params["H"] * params["L"] ** 2 * esize
    bwd = params["mode"] != "fwd"
    extra = nh if params.get("prior") == "dense" else 0  # the dense prior input itself
    if provider == "eager":
        return int((6 if bwd else 3) * n + extra)
    if provider == "sdpa_dense":
        return int((4 if bwd else 1.1) * nh + extra)
    return extra


# ----------------------------------------------------------------------------------------------------
# Attention builders: each returns forward() -> out


def backend_unavailable(name: str, device: str) -> str | None:
    """Why a rapkern backend cannot be benchmarked on this device at all (None if it can)."""
    backend = dispatch.get(name)
    why = backend.availability()
    if why:
        return why
    auto_devices = backend.devices if backend.auto_devices is None else backend.auto_devices
    if device not in auto_devices:
        return f"no {device} kernel ({device} only through a test interpreter)"
    return None


def precheck(params: dict, device: str) -> str | None:
    """Cheap, input-free reasons a job cannot run (checked in the parent, no child started)."""
    prov = params["provider"]
    if prov == AUTO:
        return None
    if prov.startswith("rapkern-"):
        return backend_unavailable(prov[len("rapkern-"):], device)
    return None


def _rapkern_kwargs(x: dict) -> dict:
    return dict(prior=x["prior"], alpha=x["alpha"], causal=x["causal"], scale=x["scale"])


def auto_choice(x: dict) -> str:
    """The backend ``backend="auto"`` picks for these inputs (or why none can serve them)."""
    try:
        problem = check_attention(x["q"], x["k"], x["v"], key_padding_mask=None, dropout_p=0.0, **_rapkern_kwargs(x))
        return dispatch.choose("attention", problem, "auto").name
    except NotImplementedError as e:
        return f"none ({str(e)[:200]})"


def _rapkern_auto(x: dict, device: str):
    chosen = auto_choice(x)
    if chosen.startswith("none"):
        raise Unavailable(f"backend='auto': {chosen}")
    kw = _rapkern_kwargs(x)
    return lambda: rapkern.attention(x["q"], x["k"], x["v"], backend="auto", **kw)


def _rapkern(name: str, x: dict, device: str):
    if name == "auto":
        return _rapkern_auto(x, device)
    backend = dispatch.get(name)
    why = backend_unavailable(name, device)
    if why:
        raise Unavailable(why)
    kw = dict(prior=x["prior"], alpha=x["alpha"], causal=x["causal"], scale=x["scale"])
    reasons = backend.attention_reasons(check_attention(x["q"], x["k"], x["v"], key_padding_mask=None,
                                                        dropout_p=0.0, **kw))
    if reasons:
        raise Unavailable("; ".join(reasons))
    return lambda: rapkern.attention(x["q"], x["k"], x["v"], backend=name, **kw)


def _eager(x: dict, device: str):
    return lambda: reference_attention(x["q"], x["k"], x["v"], prior=x["prior"], alpha=x["alpha"],
                                       causal=x["causal"], scale=x["scale"], compute_dtype=x["q"].dtype)


def dense_bias(x: dict) -> torch.Tensor:
    """α·B with the prior's -inf holes and the causal mask, (1 or B, H, L, L) in q's dtype."""
    q = x["q"]
    b, h, L, _ = q.shape
    bias = x["prior"].materialize(b, h, L, L)
    a = x["alpha"].to(bias.dtype).view(1, h, 1, 1)  # alpha > 0 here, so -inf stays -inf
    # In place when the bias is a fresh tensor (one L x L copy, not two); never into the user's dense input.
    fresh = all(bias.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in x["prior_tensors"])
    bias = bias.mul_(a) if fresh else bias * a
    if x["causal"]:
        upper = torch.ones(L, L, dtype=torch.bool, device=q.device).triu_(1)
        bias = bias.masked_fill_(upper, float("-inf"))
    return bias.to(q.dtype)


def _sdpa_dense(x: dict, device: str):
    return lambda: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=dense_bias(x), scale=x["scale"])


def _sdpa_nobias(x: dict, device: str):
    q = x["q"]
    if device == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def fwd():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, x["k"], x["v"], is_causal=x["causal"], scale=x["scale"])

        return fwd
    return lambda: F.scaled_dot_product_attention(q, x["k"], x["v"], is_causal=x["causal"], scale=x["scale"])


def _sdpa_lowrank_concat(x: dict, device: str):
    if x["prior"] is None or x["prior"].kind != "lowrank":
        raise Unavailable("only for low-rank priors")
    q, k, v = x["q"], x["k"], x["v"]
    b, h = q.shape[:2]
    u, vf = x["prior_tensors"]

    def fwd():
        a = x["alpha"].to(q.dtype).view(h, 1, 1)
        q2 = torch.cat([q * x["scale"], (a * u).to(q.dtype).expand(b, -1, -1, -1)], dim=-1)
        k2 = torch.cat([k, vf.to(k.dtype).expand(b, -1, -1, -1)], dim=-1)
        return F.scaled_dot_product_attention(q2, k2, v, is_causal=x["causal"], scale=1.0)

    return fwd


_FLEX = {}


def _flex_fn(dynamic):
    import torch._dynamo

    for attr in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, attr):
            setattr(torch._dynamo.config, attr, max(getattr(torch._dynamo.config, attr), 256))
    if dynamic not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX[dynamic] = torch.compile(flex_attention, dynamic=dynamic)
    return _FLEX[dynamic]


# FlexAttention's score_mod / mask_mod are module-level functions reading module globals: torch.compile
# guards on the function's identity, so fresh closures per job would recompile every time, while a global
# tensor swapped for another of the same shape is just a new input (checked: same results, no recompile).
_ALPHA = _T0 = _T1 = None
_W = _BAND = 0
_R = 1


def _sm_lag(score, b, h, qi, ki):
    return score + _ALPHA[h] * _T0[h, _W + torch.clamp(qi - ki, -_W, _W)]


def _sm_banded(score, b, h, qi, ki):
    off = ki - qi + _W
    inside = (off >= 0) & (off <= 2 * _W)
    return score + torch.where(inside, _ALPHA[h] * _T0[h, qi, torch.clamp(off, 0, 2 * _W)], 0.0)


def _sm_lowrank(score, b, h, qi, ki):
    acc = _T0[h, qi, 0] * _T1[h, ki, 0]
    for i in range(1, _R):
        acc = acc + _T0[h, qi, i] * _T1[h, ki, i]
    return score + _ALPHA[h] * acc


def _sm_dense(score, b, h, qi, ki):
    return score + _ALPHA[h] * _T0[h, qi, ki]


def _mm_causal(b, h, qi, ki):
    return ki <= qi


def _mm_band(b, h, qi, ki):
    return (ki - qi <= _BAND) & (qi - ki <= _BAND)


def _mm_causal_band(b, h, qi, ki):
    return (ki <= qi) & (qi - ki <= _BAND)


def flex_mods(x: dict):
    """(score_mod, mask_mod or None) for the config's prior; both index the captured compact tensors."""
    global _ALPHA, _T0, _T1, _W, _BAND, _R
    prior, causal = x["prior"], x["causal"]
    kind = "none" if prior is None else prior.kind
    ts = x["prior_tensors"]
    _ALPHA = x["alpha"]
    _T0 = ts[0] if ts else None
    _T1 = ts[1] if len(ts) > 1 else None
    band = None
    score_mod = {"none": None, "lag": _sm_lag, "banded": _sm_banded, "lowrank": _sm_lowrank,
                 "dense": _sm_dense}[kind]
    if kind == "lag":
        _W = prior.window
    elif kind == "banded":
        _W = prior.half_width
        band = _W if prior.mask_outside else None
    elif kind == "lowrank":
        _R = prior.rank
    if band is not None:
        _BAND = band
    mask_mod = None
    if causal:
        mask_mod = _mm_causal if band is None else _mm_causal_band
    elif band is not None:
        mask_mod = _mm_band
    return score_mod, mask_mod


def _flex(x: dict, device: str, dynamic=False):
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as e:
        raise Unavailable(f"torch.nn.attention.flex_attention unavailable: {e}") from e
    q = x["q"]
    score_mod, mask_mod = flex_mods(x)
    L = q.shape[2]
    block_mask = None
    if mask_mod is not None:
        block_mask = create_block_mask(mask_mod, None, None, L, L, device=device)
    fn = _flex_fn(dynamic)
    return lambda: fn(q, x["k"], x["v"], score_mod=score_mod, block_mask=block_mask, scale=x["scale"])


def build_attention(provider: str, x: dict, device: str, *, flex_dynamic=False):
    """forward() for ``provider`` over inputs ``x`` (from :func:`make_attention_inputs`)."""
    if provider.startswith("rapkern-"):
        return _rapkern(provider[len("rapkern-"):], x, device)
    if provider == "flex":
        return _flex(x, device, dynamic=flex_dynamic)
    builders = {"eager": _eager, "sdpa_dense": _sdpa_dense, "sdpa_nobias": _sdpa_nobias,
                "sdpa_lowrank_concat": _sdpa_lowrank_concat}
    if provider not in builders:
        raise ValueError(f"unknown attention provider {provider!r}; known: {attention_providers() + [AUTO]}")
    if provider == "sdpa_dense" and x["prior"] is None:
        raise Unavailable("needs a prior (without one it is sdpa_nobias)")
    return builders[provider](x, device)


def with_mode(forward, x: dict, mode: str):
    """The callable to time: forward, backward only (graph built once, retained), or both."""
    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return forward()
        return fn
    if mode == "fwd+bwd":
        dout = None

        def fn():
            nonlocal dout
            out = forward()
            if dout is None:
                dout = torch.randn_like(out)
            out.backward(dout)
        return fn
    if mode == "bwd":
        out = forward()
        dout = torch.randn_like(out)
        return lambda: out.backward(dout, retain_graph=True)
    raise ValueError(f"mode must be fwd, bwd or fwd+bwd; got {mode!r}")


# ----------------------------------------------------------------------------------------------------
# Routing


def make_route_inputs(params: dict, device: str) -> dict:
    torch.manual_seed(0)
    dt = DTYPES[params["dtype"]]
    g, n_q, n, d, e = params["G"], params["N"], params["n"], params["d"], params["e"]
    grad = params["mode"] != "fwd"
    q = torch.randn(g, n_q, d, device=device, dtype=dt).requires_grad_(grad)
    c = torch.randn(g, n, d, device=device, dtype=dt).requires_grad_(grad)
    a = torch.randn(g, n, e, device=device, dtype=dt).requires_grad_(grad)
    top_k = params.get("top_k") or None
    return {"q": q, "c": c, "a": a, "top_k": top_k, "tau": params.get("tau", 0.1),
            "leaves": [t for t in (q, c, a) if t.requires_grad]}


def build_route(provider: str, x: dict, device: str):
    kw = dict(tau=x["tau"], top_k=x["top_k"])
    if provider == "eager":
        return lambda: reference_lda_route(x["q"], x["c"], x["a"], compute_dtype=x["q"].dtype, **kw)
    if not provider.startswith("rapkern-"):
        raise ValueError(f"unknown routing provider {provider!r}; known: {route_providers()}")
    name = provider[len("rapkern-"):]
    backend = dispatch.get(name)
    why = backend_unavailable(name, device)
    if why:
        raise Unavailable(why)
    reasons = backend.route_reasons(check_route(x["q"], x["c"], x["a"], normalize=True, **kw))
    if reasons:
        raise Unavailable("; ".join(reasons))
    return lambda: rapkern.lda_route(x["q"], x["c"], x["a"], backend=name, **kw)
