"""What every backend declares: which inputs it can serve, and why not when it cannot."""

from __future__ import annotations

import os

import torch

from ..validate import AttentionProblem, RouteProblem


def apply_attention_function(fn, p: AttentionProblem, seed_max: int):
    """Call an attention ``autograd.Function`` with the signature every backend shares:
    ``fn.apply(cfg, q, k, v, alpha_tensor_or_None, key_padding_mask, *prior_tensors)``.

    The dropout seed is drawn from torch's default generator (so ``torch.manual_seed`` reproduces a run)
    and kept in ``cfg`` for the backward to regenerate the same mask.
    """
    alpha_t = p.alpha if isinstance(p.alpha, torch.Tensor) else None
    seed = int(torch.randint(0, seed_max, (1,)).item()) if p.dropout_p > 0 else 0
    cfg = {
        "prior": p.prior,
        "alpha": p.alpha if alpha_t is None else None,
        "causal": p.causal,
        "scale": p.scale,
        "dropout_p": p.dropout_p,
        "seed": seed,
    }
    prior_tensors = () if p.prior is None else p.prior.tensors()
    # Self-attention as attention(x, x, x): torch.compile cannot trace an autograd.Function given the same
    # tensor twice, so aliases become views (free; gradients still add up on x).
    q, k, v = p.q, p.k, p.v
    if k is q:
        k = k.view_as(k)
    if v is q or v is p.k:
        v = v.view_as(v)
    return fn.apply(cfg, q, k, v, alpha_t, p.key_padding_mask, *prior_tensors)


def alpha_grad(alpha_t, dalpha, heads: int, needed: bool):
    """The gradient returned for the alpha input: per-head ``dalpha`` (None when no prior term depends on
    alpha: zeros), summed for a scalar alpha, in alpha's dtype; None when alpha needs none."""
    if alpha_t is None or not needed:
        return None
    if dalpha is None:
        dalpha = torch.zeros(heads, dtype=alpha_t.dtype, device=alpha_t.device)
    return (dalpha.sum() if alpha_t.dim() == 0 else dalpha).to(alpha_t.dtype)


def unnormalize_grad(x, g, r):
    """The gradient w.r.t. x from ``g``, its gradient with the scale r = 1/max(|x|, eps) held fixed:
    ``g - r²(x·g) x`` where |x| > eps (the clamp has no gradient)."""
    xf = x.float()
    proj = (xf * g).sum(-1, keepdim=True) * r.square().unsqueeze(-1)
    live = xf.norm(dim=-1, keepdim=True) > 1e-8  # lda_route's norm clamp
    return g - torch.where(live, proj, torch.zeros_like(proj)) * xf


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on first-order gradients whose own backward raises: rapkern's backward passes are not
    differentiable, and saying so beats an internal ATen message (or silently wrong second derivatives)."""

    @staticmethod
    def forward(ctx, n_anchor, *tensors):
        ctx.n_anchor = n_anchor
        return tuple(t.clone() for t in tensors[n_anchor:])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            "rapkern: double backward (create_graph=True, higher-order gradients) through rapkern.attention "
            "is not supported; compute first-order gradients only, or use rapkern.testing.reference_attention "
            "(float64, O(L²) memory) where second derivatives are needed"
        )


def guard_double_backward(grads: tuple, anchors) -> tuple:
    """Return ``grads`` unchanged under plain backward. Under ``create_graph=True`` the backward ran with
    no graph (see the Functions); its results are then tied to the inputs through ``_NoDoubleBackward`` so
    that differentiating them raises a clear error, while using them as values still works."""
    if not torch.is_grad_enabled():
        return grads
    anchor = [a for a in anchors if isinstance(a, torch.Tensor) and a.requires_grad]
    idx = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
    if not anchor or not idx:
        return grads
    guarded = _NoDoubleBackward.apply(len(anchor), *anchor, *(grads[i] for i in idx))
    out = list(grads)
    for i, g in zip(idx, guarded):
        out[i] = g
    return tuple(out)


def triton_reasons(devices: tuple[str, ...], device_type: str, dtype: torch.dtype) -> list[str]:
    """The device and dtype reasons every Triton backend shares: CPU tensors only through the interpreter
    (which has no bfloat16), and only 16/32-bit floats."""
    why = []
    if device_type not in devices:
        why.append(f"device type {device_type!r} not in {devices}")
    elif device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        why.append("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)")
    elif device_type == "cpu" and dtype == torch.bfloat16:
        why.append("bfloat16 is not supported by the Triton interpreter (CPU tensors)")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        why.append(f"dtype {dtype} not supported (float16, bfloat16, float32)")
    return why


class Backend:
    """A backend answers ``*_reasons(problem) -> list[str]`` (empty = can serve) and runs the op.

    Capability attributes are descriptive (shown by ``python -m rapkern.info``); the reasons
    functions are what dispatch trusts.
    """

    name: str = "?"
    devices: tuple[str, ...] = ()
    # Device types on which "auto" may pick this backend (e.g. Triton serves CPU tensors only through the
    # interpreter, for tests, and only when asked for by name).
    auto_devices: tuple[str, ...] | None = None  # None: same as ``devices``
    dtypes: tuple[str, ...] = ()
    prior_kinds: tuple[str, ...] = ("none", "lag", "banded", "lowrank", "dense")
    supports_prior_grad: bool = True
    supports_dropout: bool = True
    deterministic: bool = True
    # The kernel itself rejects bad prior values (Prior.check_values's errors) before computing, so
    # rapkern.attention skips the Python check (a reduction and a host read per call) for this backend.
    checks_prior_values: bool = False
    # Every ``*_reasons`` and ``auto_reasons`` answer depends only on the device type and dtype of the input
    # (and on ``availability``): "auto" then asks once per (op, device type, dtype) and remembers.
    verdict_by_device_dtype: bool = False
    # ``attention_direct(q, k, v, prior, alpha, causal, key_padding_mask, scale, dropout_p)`` exists and its
    # kernel checks every condition rapkern/validate.py checks (raising before computing), so rapkern.attention
    # may call it on the user's arguments and run the Python checks only to word an error (functional.py).
    validates_in_kernel: bool = False

    def availability(self) -> str | None:
        """None if the backend can run on this machine at all, else why not."""
        return None

    def attention_reasons(self, p: AttentionProblem) -> list[str]:
        return ["attention is not implemented by this backend"]

    def attention(self, p: AttentionProblem):
        """Return ``(out, lse)``; differentiable through autograd."""
        raise NotImplementedError

    def auto_reasons(self, p: AttentionProblem) -> list[str]:
        """Why ``backend="auto"`` should leave an attention input it *can* serve to the next backend (a
        measured speed rule, never a run-time timing); empty = take it. Explicit requests ignore this."""
        return []

    def route_reasons(self, p: RouteProblem) -> list[str]:
        return ["lda_route is not implemented by this backend"]

    def route(self, p: RouteProblem, return_weights: bool = False):
        """Return ``(out, weights, indices)`` with a leading group dim; weights/indices may be None."""
        raise NotImplementedError

    # Attention statistics (rapkern.attention_stats) and attention distillation (rapkern.attention_kl).
    # The problem objects are defined in rapkern/stats.py (StatsProblem, KLProblem).
    def stats_reasons(self, p) -> list[str]:
        return ["attention_stats is not implemented by this backend"]

    def attention_stats(self, p):
        """Return ``(entropy (B, Hq, Lq), key_mass (B, Hq, Lk))`` in ``p.out_dtype``, differentiable."""
        raise NotImplementedError

    def kl_reasons(self, p) -> list[str]:
        return ["attention_kl is not implemented by this backend"]

    def attention_kl(self, p):
        """Return the per-row KL(teacher || student) ``(B, H, Lq)`` in ``p.out_dtype``, differentiable w.r.t. the
        student; the public function applies the reduction."""
        raise NotImplementedError
