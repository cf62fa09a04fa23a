"""rapkern as a Hugging Face transformers attention implementation, with priors and gates per layer.

``enable(model, prior=..., gate=..., stats=...)`` registers two functions under the name ``"rapkern"`` and
switches the model to it:

* a mask function (``transformers.AttentionMaskInterface``). transformers describes every mask by a factory
  (``mask_function``) plus a 2-D padding mask. When the factory is transformers' own plain causal or
  bidirectional one (checked by identity), no L×L tensor is built: padding becomes a ``(B, Lk)``
  ``key_padding_mask`` (True = ignore) and causality rapkern's ``causal`` flag. Any other factory (sliding
  window, packed sequences, image-token overlays, ...) is arbitrary as far as rapkern knows, and is built
  densely by ``masking_utils.sdpa_mask`` and applied as a dense ``-inf`` bias.
* the attention function (``transformers.AttentionInterface``): ``rapkern.attention`` with the layer's prior
  and gate, grouped-query heads passed as they come (not repeated).

KV caches: transformers' causal mask is bottom-right aligned (query i sits at position ``q_offset + i``, key j
at ``kv_offset + j``); rapkern's ``causal`` is top-left. With ``d = q_offset - kv_offset``: d = 0 is rapkern's
causal; a query block that sees every key (one-token decoding, d >= Lk - 1) needs no mask; anything between
(chunked prefill against a cache) gets a dense (Lq, Lk) causal mask. Priors are taken at the same global
positions: a lag table is shifted by d (exact and still compact); other prior kinds are cut to their
(Lq, Lk) tile, which is small when Lq is (decoding).

Priors and gates (one module for all layers, a dict by ``layer_idx``, or a factory called with the layer
index) apply to self-attention; cross-attention modules run through rapkern without a prior. They live once
each (shared modules are not duplicated) in ``model.rapkern`` (a ``RapkernAttachments``), so they train, move
and save with the model: ``state_dict()`` / ``save_pretrained`` hold them under ``rapkern.``, and
``load_priors(model, folder)`` reads them back into a model that ``enable`` has prepared the same way.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import rapkern
from rapkern.priors import DensePrior, Prior, RelativeLagPrior

__all__ = ["enable", "disable", "load_priors", "RapkernAttachments", "RapkernMask", "NAME"]

NAME = "rapkern"
ATTR = "rapkern"
_IMPORT_HINT = (
    "rapkern.integrations.transformers needs Hugging Face transformers (>= 5.0); install the extra: "
    "pip install 'rapkern[hf]'"
)
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")


def _transformers():
    """Import transformers lazily, so that rapkern never needs it unless this integration is used."""
    try:
        import transformers
        from transformers import masking_utils
    except ImportError as err:
        raise ImportError(_IMPORT_HINT) from err
    if not hasattr(transformers, "AttentionMaskInterface"):
        raise ImportError(_IMPORT_HINT + f"; found transformers {transformers.__version__}")
    return transformers, masking_utils


# ---------------------------------------------------------------------------------------------------------------
# The mask function: what reaches the attention function in place of transformers' L×L mask.


@dataclass(frozen=True)
class RapkernMask:
    """The mask of one forward call as rapkern takes it (built once, shared by all layers)."""

    key_padding_mask: Tensor | None  # bool (B, Lk), True = ignore; None when no key is padded
    causal: bool  # rapkern's top-left causal flag
    dense: Tensor | None  # bool (B or 1, 1, Lq, Lk), True = attend: only for masks rapkern cannot express
    q_offset: int  # global position of query 0 (KV cache)
    kv_offset: int  # global position of key 0
    q_length: int
    kv_length: int


def _mask_interface(
    batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
    device="cpu", **kwargs,
) -> RapkernMask:
    _, mu = _transformers()
    q_offset, kv_offset = int(q_offset), int(kv_offset)  # a static cache passes a tensor
    plain_causal = mask_function is mu.causal_mask_function
    if not (plain_causal or mask_function is mu.bidirectional_mask_function):
        dense = mu.sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
            mask_function=mask_function, attention_mask=attention_mask, allow_is_causal_skip=False,
            allow_is_bidirectional_skip=False, use_vmap=kwargs.get("use_vmap", False), device=device,
        )
        return RapkernMask(None, False, dense, q_offset, kv_offset, q_length, kv_length)
    kpm = None
    padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is not None:
        kpm = ~padding[:, kv_offset : kv_offset + kv_length]
        kpm = kpm if bool(kpm.any()) else None
    causal, dense = _causal_at(plain_causal, q_offset - kv_offset, q_length, kv_length, device)
    return RapkernMask(kpm, causal, dense, q_offset, kv_offset, q_length, kv_length)


def _causal_at(causal: bool, d: int, lq: int, lk: int, device) -> tuple[bool, Tensor | None]:
    """Bottom-right causality (key j visible to query i iff j <= i + d) as rapkern's flag, or a dense mask."""
    if not causal or d >= lk - 1:  # every key visible to every query
        return False, None
    if d == 0:
        return True, None
    i = torch.arange(lq, device=device)[:, None]
    return False, (torch.arange(lk, device=device)[None, :] <= i + d).view(1, 1, lq, lk)


def _resolve_mask(module, mask, lq: int, lk: int, device, is_causal) -> RapkernMask:
    """Whatever transformers hands the attention function, as a RapkernMask for this layer's shapes."""
    if isinstance(mask, RapkernMask):
        if (mask.q_length, mask.kv_length) != (lq, lk):
            raise ValueError(
                f"the rapkern mask was built for (Lq, Lk) = ({mask.q_length}, {mask.kv_length}) but this attention "
                f"layer has ({lq}, {lk}); this model builds masks rapkern's integration does not support"
            )
        return mask
    causal = bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    d = lk - lq  # without a mask object, queries are taken as the last Lq positions (transformers' convention)
    if mask is None:  # the model built no mask (its own code path, or nothing to mask)
        flag, dense = _causal_at(causal, d, lq, lk, device)
        return RapkernMask(None, flag, dense, d, 0, lq, lk)
    if isinstance(mask, Tensor) and mask.dim() == 4:  # a 4-D mask the user built: transformers passes it as is
        return RapkernMask(None, False, mask, d, 0, lq, lk)
    raise TypeError(
        f"attention_mask reaching rapkern's attention must be a RapkernMask, a 4-D tensor or None, got "
        f"{type(mask).__name__}{tuple(mask.shape) if isinstance(mask, Tensor) else ''}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Priors at global positions and the dense fallback.


def _shift_lag(table: Tensor, d: int) -> Tensor:
    """A table T' with B'[i, j] = B[i + d, j] (clamping preserved): T'[W' + l] = T[W + clamp(l + d, -W, W)]."""
    w = (table.shape[-1] - 1) // 2
    wn = w + abs(d)
    idx = (torch.arange(-wn, wn + 1, device=table.device) + d).clamp(-w, w) + w
    return table[..., idx]


def _prior_at(module: nn.Module, q_offset: int, kv_offset: int, lq: int, lk: int) -> Prior:
    prior = module(q_offset + lq, kv_offset + lk)
    if not isinstance(prior, Prior):
        raise TypeError(f"a prior module must return a rapkern prior object, {type(module).__name__} returned "
                        f"{type(prior).__name__}")
    if q_offset == 0 and kv_offset == 0:
        return prior
    if isinstance(prior, RelativeLagPrior):
        return RelativeLagPrior(_shift_lag(prior.table, q_offset - kv_offset))
    return DensePrior(_tile(prior, q_offset, kv_offset, lq, lk, prior.tensors()[0].dtype))


def _tile(prior: Prior, i0: int, j0: int, lq: int, lk: int, dtype) -> Tensor:
    """Prior rows i0.. and columns j0.. as a dense (Bp, Hp, lq, lk) bias, -inf where the prior masks a key."""
    tile = prior.block(i0, i0 + lq, j0, j0 + lk, dtype)
    vis = prior.visible(i0, i0 + lq, j0, j0 + lk)
    return tile if vis is None else tile.masked_fill(~vis, float("-inf"))


def _dense_prior(mask: Tensor, prior: Prior | None, alpha, heads: int, lq: int, lk: int, dtype) -> DensePrior:
    """``α·B + M`` as one dense bias (alpha folded in, so the call uses α = 1); built only for arbitrary masks."""
    bias = torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf")) \
        if mask.dtype == torch.bool else mask.to(dtype)
    if prior is not None:
        tile = prior.block(0, lq, 0, lk, dtype)
        a = alpha.to(dtype).reshape(-1, 1, 1) if isinstance(alpha, Tensor) else alpha
        bias = bias + a * tile
        vis = prior.visible(0, lq, 0, lk)
        if vis is not None:  # a band mask excludes keys whatever α (α·(-inf) is -inf, also for α = 0)
            bias = bias.masked_fill(~vis, float("-inf"))
    if bias.dim() == 2:
        bias = bias.view(1, 1, lq, lk)
    return DensePrior(bias)


# ---------------------------------------------------------------------------------------------------------------
# The attention function.


@dataclass
class _LayerHook:
    """What one attention module knows about rapkern (a plain attribute: the modules themselves are
    registered once, in ``model.rapkern``)."""

    owner: "RapkernAttachments"
    layer: int
    prior: nn.Module | None
    gate: nn.Module | None
    cross: bool


def _attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"rapkern attention does not support {name}= (passed by {type(module).__name__}); use the model's "
                "default attention implementation for this model"
            )
    _, hq, lq, _ = query.shape
    lk = key.shape[2]
    mask = _resolve_mask(module, attention_mask, lq, lk, query.device, kwargs.get("is_causal"))
    hook = getattr(module, "_rapkern", None)
    prior, alpha = None, 1.0
    if hook is not None and hook.prior is not None:
        prior = _prior_at(hook.prior, mask.q_offset, mask.kv_offset, lq, lk)
        alpha = hook.gate() if hook.gate is not None else 1.0
    if mask.dense is not None:
        prior, alpha = _dense_prior(mask.dense, prior, alpha, hq, lq, lk, query.dtype), 1.0
    common = dict(prior=prior, alpha=alpha, causal=mask.causal, key_padding_mask=mask.key_padding_mask,
                  scale=scaling)
    out = rapkern.attention(query, key, value, dropout_p=float(dropout), **common)
    if hook is not None and hook.owner.record_stats and not hook.cross:
        with torch.no_grad():
            detached = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in common.items()}
            if prior is not None:
                detached["prior"] = prior.with_tensors(*(t.detach() for t in prior.tensors()))
            hook.owner.stats[hook.layer] = rapkern.attention_stats(query.detach(), key.detach(), **detached)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    transformers, _ = _transformers()
    transformers.AttentionInterface.register(NAME, _attention_forward)
    transformers.AttentionMaskInterface.register(NAME, _mask_interface)


# ---------------------------------------------------------------------------------------------------------------
# enable / disable / load_priors.


class RapkernAttachments(nn.Module):
    """The prior and gate modules ``enable`` attached (each once), the implementation to restore on
    ``disable``, and, with ``stats=True``, the last forward's statistics by layer index."""

    def __init__(self, previous: str | None, record_stats: bool):
        super().__init__()
        self.priors = nn.ModuleList()
        self.gates = nn.ModuleList()
        self.previous = previous
        self.record_stats = record_stats
        self.stats: dict = {}  # layer_idx -> rapkern.attention_stats(...) of the last forward (detached)
        self.layers: dict[int, tuple[int | None, int | None]] = {}  # layer_idx -> (prior index, gate index)

    def add(self, which: nn.ModuleList, m: nn.Module | None) -> int | None:
        if m is None:
            return None
        for i, held in enumerate(which):
            if held is m:
                return i
        which.append(m)
        return len(which) - 1

    def extra_repr(self) -> str:
        return f"previous={self.previous!r}, record_stats={self.record_stats}, layers={self.layers}"


def _per_layer(spec, what: str, layers: set[int]):
    """``spec`` as a function of the layer index: one shared module, a dict by layer_idx, or a factory."""
    if spec is None:
        return lambda i: None
    if isinstance(spec, nn.Module):
        return lambda i: spec
    if isinstance(spec, dict):
        extra = sorted((k for k in spec if not isinstance(k, int) or k not in layers), key=repr)
        if extra:
            raise ValueError(f"{what} dict has keys {extra} that are not self-attention layer indices {sorted(layers)}")
        return spec.get
    if callable(spec):
        try:
            n = len(inspect.signature(spec).parameters)
        except (TypeError, ValueError):
            n = 1
        return (lambda i: spec()) if n == 0 else spec
    raise TypeError(
        f"{what} must be None, an nn.Module, a dict {{layer_idx: module}} or a factory called with the layer "
        f"index, got {type(spec).__name__}"
    )


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that call transformers' attention interface: they carry ``layer_idx`` and ``is_causal``
    (BERT, Llama, Qwen2, ... all do). The innermost such module when they nest."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "is_causal")]
    names = [n for n, _ in found]
    return [(n, m) for n, m in found if not any(o.startswith(n + ".") for o in names)]


def _heads(m: nn.Module) -> int | None:
    for attr in ("num_attention_heads", "num_heads"):
        if isinstance(getattr(m, attr, None), int):
            return getattr(m, attr)
    return getattr(getattr(m, "config", None), "num_attention_heads", None)


def _check_heads(what: str, layer: int, m: nn.Module | None, heads: int | None) -> None:
    if m is None:
        return
    if not isinstance(m, nn.Module):
        raise TypeError(f"{what} for layer {layer} must be an nn.Module, got {type(m).__name__}")
    n = getattr(m, "num_heads", None)
    if heads is not None and n is not None and n not in (1, heads):
        raise ValueError(f"{what} for layer {layer} has num_heads = {n}, but the layer has {heads} heads")


def enable(model, prior=None, gate=None, stats: bool = False) -> int:
    """Run ``model``'s attention through rapkern; returns how many attention modules now do.

    ``prior``/``gate``: None, one module for every layer, a dict ``{layer_idx: module}``, or a factory called
    with the layer index (a zero-argument callable is accepted too); a factory may return None for a layer.
    A prior module is called as ``prior(lq, lk)`` and returns a rapkern prior; a gate as ``gate()`` and returns
    α (``()`` or ``(num_heads,)``). Without a gate α = 1. ``stats=True`` keeps each self-attention layer's last
    ``rapkern.attention_stats`` in ``model.rapkern.stats[layer_idx]`` (detached; no attention weights built).
    """
    transformers, _ = _transformers()
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not isinstance(stats, bool):
        raise TypeError(f"stats must be a bool, got {type(stats).__name__}")
    if isinstance(getattr(model, ATTR, None), RapkernAttachments):
        raise ValueError("rapkern is already enabled on this model; call disable(model) first")
    modules = _attention_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no attention module that routes through transformers' attention "
            "interface (modules with layer_idx and is_causal)"
        )
    cross = {n: bool(getattr(m, "is_cross_attention", False) or "Cross" in type(m).__name__) for n, m in modules}
    layers = {m.layer_idx for n, m in modules if not cross[n]}
    prior_of, gate_of = _per_layer(prior, "prior", layers), _per_layer(gate, "gate", layers)

    plan = []
    for n, m in modules:
        p = g = None
        if not cross[n]:
            p = prior_of(m.layer_idx)
            g = gate_of(m.layer_idx) if p is not None else None
            _check_heads("prior", m.layer_idx, p, _heads(m))
            _check_heads("gate", m.layer_idx, g, _heads(m))
        plan.append((m, p, g, cross[n]))
    if gate is not None and not any(g is not None for _, _, g, _ in plan):
        raise ValueError("gate was given but no layer has a prior: a gate only scales a prior")

    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        raise ValueError(f"{type(model).__name__} does not let its attention implementation be set (transformers "
                         "declined); it does not use the attention interface")
    owner = RapkernAttachments(previous, stats)
    for m, p, g, is_cross in plan:
        ip, ig = owner.add(owner.priors, p), owner.add(owner.gates, g)
        if p is not None:
            owner.layers[m.layer_idx] = (ip, ig)
        m._rapkern = _LayerHook(owner, m.layer_idx, p, g, is_cross)
    param = next(model.parameters(), None)
    if param is not None:
        owner.to(param.device)
    owner.train(model.training)
    setattr(model, ATTR, owner)
    return len(plan)


def disable(model) -> RapkernAttachments:
    """Undo ``enable``: restore the previous attention implementation and detach the priors and gates
    (returned, so trained ones can be kept)."""
    owner = getattr(model, ATTR, None)
    if not isinstance(owner, RapkernAttachments):
        raise ValueError("rapkern is not enabled on this model")
    model.set_attn_implementation(owner.previous or "sdpa")
    for m in model.modules():
        if isinstance(getattr(m, "_rapkern", None), _LayerHook):
            del m._rapkern
    delattr(model, ATTR)
    return owner


def load_priors(model, folder) -> None:
    """Load the priors and gates that ``save_pretrained`` wrote into ``folder`` into ``model``, which
    ``enable`` must have prepared with modules of the same shapes (strict: missing or extra keys raise)."""
    owner = getattr(model, ATTR, None)
    if not isinstance(owner, RapkernAttachments):
        raise ValueError("rapkern is not enabled on this model: call enable(model, prior=..., gate=...) first")
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {folder}")
    prefix = ATTR + "."
    state = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            state.update({k[len(prefix):]: fh.get_tensor(k) for k in fh.keys() if k.startswith(prefix)})
    owner.load_state_dict(state, strict=True)
