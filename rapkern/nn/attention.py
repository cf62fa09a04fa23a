"""``BiasedMultiheadAttention``: ``torch.nn.MultiheadAttention`` with a gated prior, run by ``rapkern.attention``.

It subclasses ``nn.MultiheadAttention`` (same constructor, parameters, state_dict keys and forward), so
``isinstance`` checks in user code and in torch's Transformer modules still pass; only ``forward`` differs.
Masks are mapped onto rapkern's arguments instead of being merged into one dense tensor:

* bool ``key_padding_mask`` -> ``key_padding_mask``; a float one: its ``-inf`` entries -> ``key_padding_mask``,
  its finite part is folded into q/k as one extra head-dim column (``q·k + 1·b_j``), so no L×S tensor;
* ``is_causal=True`` (a hint that requires ``attn_mask``, as in torch) -> ``causal=True``; the mask is trusted
  to be causal, as torch's SDPA path does;
* a float ``attn_mask`` is the user's tensor, used as ``rapkern.DensePrior`` (α = 1); a general bool
  ``attn_mask`` is converted to a float ``-inf`` bias of the same shape (one tensor like the user's);
* a prior module AND an ``attn_mask`` (without the causal hint): ``α·prior + mask`` is materialized as one
  ``DensePrior`` of shape ``(B·)H × L × S`` (rapkern.attention takes one prior with one α);
* keys appended by ``add_bias_kv``/``add_zero_attn`` get no prior term and no mask (torch pads the masks with
  0 for them): the real keys run through rapkern.attention with ``return_lse=True`` and the ≤ 2 extra keys are
  merged in by their log-sum-exp, exactly (dropout included).

``need_weights=True`` materializes the weights, as torch does. Differences from torch: a query row with no
visible key gives 0 (torch: NaN); with ``is_causal=True`` the appended keys stay visible in every path (torch's
SDPA path masks them causally, its weights path does not).
"""

from __future__ import annotations

import math
from collections import namedtuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rapkern
from rapkern.priors import DensePrior, Prior

__all__ = ["BiasedMultiheadAttention", "AttentionStats"]

# rapkern.attention_stats's result type; a same-shaped stand-in where this rapkern predates it
AttentionStats = getattr(rapkern, "AttentionStats", None) or namedtuple("AttentionStats", ["entropy", "key_mass"])


def _keep_forward(module, args):
    """No-op pre-hook. ``nn.TransformerEncoderLayer`` skips its fused inference kernel (which reads
    ``in_proj_weight`` itself and would bypass ``forward``, dropping the prior) when any submodule has hooks."""
    return None


def _neg_inf_safe_gate(bias: Tensor, alpha) -> Tensor:
    """``α·bias`` where ``-inf`` stays ``-inf`` for every α (also 0), without NaN in α's gradient."""
    hole = bias == float("-inf")
    a = alpha.reshape(-1, 1, 1) if isinstance(alpha, Tensor) else alpha
    return (bias.masked_fill(hole, 0.0) * a).masked_fill(hole, float("-inf"))


class BiasedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` computing ``softmax(QKᵀ/√d + α_h·B + M) V`` through ``rapkern.attention``.

    Extra keyword arguments:

    * ``prior``: None or a module called as ``prior(L, S)`` that returns a rapkern prior with leading dims
      ``(num_heads,)``, ``(1,)`` or ``()`` (e.g. ``rapkern.nn.LagPrior``; a prior object goes through
      ``rapkern.nn.FixedPrior``).
    * ``gate``: α per head: None (1.0 when a prior is given), a float, a tensor ``()``/``(num_heads,)`` (a
      Parameter is trained, another tensor is a buffer) or a module returning one (``rapkern.nn.Gate``).
    * ``track_stats``: keep the last call's ``AttentionStats(entropy, key_mass)`` (detached, from the undropped
      softmax, over the keys the softmax sees: real keys, then appended ones) in ``last_stats``.

    With no prior the outputs match ``nn.MultiheadAttention`` with the same weights. The state_dict holds
    torch's keys, plus ``prior.*``/``gate*`` when those are set (load with ``strict=False`` across the two then).
    ``nn.TransformerEncoderLayer``'s fused inference path is disabled for layers holding this module (a no-op
    forward pre-hook), so the prior is always applied. Nested (batch_first) self-attention inputs are padded and
    run with a key padding mask. ``track_stats`` with appended keys (and no ``need_weights``) materializes the
    weights: ``rapkern.attention_stats`` has no notion of the appended keys.
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        dropout=0.0,
        bias=True,
        add_bias_kv=False,
        add_zero_attn=False,
        kdim=None,
        vdim=None,
        batch_first=False,
        device=None,
        dtype=None,
        *,
        prior=None,
        gate=None,
        track_stats=False,
    ) -> None:
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        _check_prior_arg(prior, num_heads)
        _check_gate_arg(gate, num_heads, prior)
        if not isinstance(track_stats, bool):
            raise TypeError(f"track_stats must be a bool, got {type(track_stats).__name__}")
        super().__init__(
            embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first, device, dtype
        )
        self.prior = prior if prior is None or device is None else prior.to(device)
        if isinstance(gate, Tensor) and not isinstance(gate, nn.Parameter):
            self.register_buffer("gate", gate if device is None else gate.to(device))
        elif isinstance(gate, (int, float)):
            self.gate = float(gate)
        else:
            self.gate = gate if gate is None or device is None else gate.to(device)
        self.track_stats = track_stats
        self.last_stats = None
        self.register_forward_pre_hook(_keep_forward)

    def extra_repr(self) -> str:
        s = f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"
        if self.kdim != self.embed_dim or self.vdim != self.embed_dim:
            s += f", kdim={self.kdim}, vdim={self.vdim}"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if isinstance(self.gate, (float, Tensor)):
            s += f", gate={self.gate if isinstance(self.gate, float) else tuple(self.gate.shape)}"
        return s + (", track_stats=True" if self.track_stats else "")

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Same arguments and returns as ``nn.MultiheadAttention.forward``."""
        if query.is_nested or key.is_nested or value.is_nested:
            return self._forward_nested(query, key, value, key_padding_mask, need_weights, attn_mask,
                                        average_attn_weights)
        batched = _check_inputs(self, query, key, value, key_padding_mask, attn_mask, is_causal)
        self_attn = query is key and key is value
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, lq, _ = query.shape
        lk = key.shape[1]
        _check_masks(self, b, lq, lk, key_padding_mask, attn_mask)

        prior, alpha = self._prior_and_alpha(b, lq, lk, query.device)  # user errors surface before any math
        q, k, v = self._project(query, key, value, self_attn)
        kpm_bool, kpm_bias = _split_key_padding(key_padding_mask)
        causal = bool(is_causal) and not need_weights  # the weights path uses the mask itself, as torch does
        mask = None if causal else _float_mask(attn_mask, q.dtype, b, self.num_heads)
        extra = self._extra_kv(q)
        dropout_p = float(self.dropout) if self.training else 0.0
        scale = math.sqrt(1.0 / q.shape[-1])

        weights = None
        if need_weights:
            probs = _eager_probs(q, k, extra, scale, prior, alpha, mask, kpm_bool, kpm_bias)
            self._record(lambda: probs, None, batched)
            weights = F.dropout(probs, dropout_p) if dropout_p > 0 else probs
            v_all = v if extra is None else torch.cat([v, extra[1]], dim=2)
            out = torch.matmul(weights, v_all)
            weights = weights.mean(dim=1) if average_attn_weights else weights
            if not batched:
                weights = weights.squeeze(0)
        else:
            if prior is not None and mask is not None:
                dense = prior.materialize(b, self.num_heads, lq, lk)
                prior, alpha, mask = DensePrior(_neg_inf_safe_gate(dense, alpha) + mask), 1.0, None
            if prior is None and mask is not None:
                prior, mask = DensePrior(mask), None
            qf, kf = _fold_key_bias(q, k, kpm_bias, scale)
            args = dict(prior=prior, alpha=alpha, causal=causal, key_padding_mask=kpm_bool, scale=scale)
            res = rapkern.attention(qf, kf, v, **args, dropout_p=dropout_p, return_lse=extra is not None)
            out = res if extra is None else _merge_extra_keys(*res, q, extra, scale, dropout_p)
            if self.track_stats:
                if extra is None:
                    self._record(None, lambda: _stats_fn()(qf, kf, **args), batched)
                else:
                    self._record(lambda: _eager_probs(q, k, extra, scale, prior, alpha, mask, kpm_bool, kpm_bias,
                                                      causal=causal), None, batched)

        out = F.linear(out.transpose(1, 2).flatten(2), self.out_proj.weight, self.out_proj.bias)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _prior_and_alpha(self, b, lq, lk, device):
        if self.prior is None:
            return None, 1.0
        prior = self.prior(lq, lk)
        if not isinstance(prior, Prior):
            raise TypeError(
                f"prior module {type(self.prior).__name__} must return a rapkern prior, got {type(prior).__name__}"
            )
        prior.check(b, self.num_heads, lq, lk, device)
        gate = self.gate
        if gate is None:
            return prior, 1.0
        alpha = gate() if isinstance(gate, nn.Module) else gate
        if isinstance(alpha, Tensor) and (alpha.dim() > 1 or alpha.numel() not in (1, self.num_heads)):
            raise ValueError(
                f"gate must give α of shape () or (num_heads,) = ({self.num_heads},), got {tuple(alpha.shape)}"
            )
        return prior, alpha.reshape(()) if isinstance(alpha, Tensor) and alpha.numel() == 1 else alpha

    def _project(self, query, key, value, self_attn):
        """In-projections, split into heads: (B, H, L, D) each."""
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if self._qkv_same_embed_dim:
            if self_attn:
                q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
                return tuple(self._heads(t) for t in (q, k, v))
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        return (
            self._heads(F.linear(query, w_q, b_q)),
            self._heads(F.linear(key, w_k, b_k)),
            self._heads(F.linear(value, w_v, b_v)),
        )

    def _heads(self, x):
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def _extra_kv(self, q):
        """Keys/values appended by add_bias_kv then add_zero_attn, as (k_e, v_e) of shape (B, H, E, D), or None."""
        b, h, _, d = q.shape
        ks, vs = [], []
        if self.bias_k is not None:
            ks.append(self.bias_k.reshape(1, h, 1, d).expand(b, h, 1, d).to(q.dtype))
            vs.append(self.bias_v.reshape(1, h, 1, d).expand(b, h, 1, d).to(q.dtype))
        if self.add_zero_attn:
            ks.append(q.new_zeros(b, h, 1, d))
            vs.append(q.new_zeros(b, h, 1, d))
        return (torch.cat(ks, dim=2), torch.cat(vs, dim=2)) if ks else None

    def _record(self, probs_fn, stats_fn, batched):
        if not self.track_stats:
            return
        with torch.no_grad():
            if probs_fn is not None:
                probs = probs_fn()
                entropy, key_mass = torch.special.entr(probs).sum(-1), probs.sum(-2)
            else:
                entropy, key_mass = stats_fn()
        if not batched:
            entropy, key_mass = entropy.squeeze(0), key_mass.squeeze(0)
        self.last_stats = AttentionStats(entropy.detach(), key_mass.detach())

    def _forward_nested(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights):
        """Nested self-attention (what nn.TransformerEncoder hands its layers in eval): pad, mask, re-nest."""
        if not (query is key and key is value and self.batch_first and key_padding_mask is None
                and attn_mask is None):
            raise ValueError(
                "nested tensor inputs are supported for batch_first self-attention (query is key is value) "
                "without key_padding_mask or attn_mask"
            )
        lengths = [t.shape[0] for t in query.unbind()]
        padded = torch.nested.to_padded_tensor(query, 0.0)
        pad = torch.arange(padded.shape[1], device=padded.device)[None, :] >= torch.tensor(
            lengths, device=padded.device
        )[:, None]
        out, weights = self.forward(padded, padded, padded, key_padding_mask=pad, need_weights=need_weights,
                                    average_attn_weights=average_attn_weights)
        nested = torch.nested.as_nested_tensor([o[:n] for o, n in zip(out, lengths)], layout=query.layout)
        return nested, weights


def _stats_fn():
    fn = getattr(rapkern, "attention_stats", None)
    if fn is None:
        raise NotImplementedError("track_stats needs rapkern.attention_stats, which this rapkern does not have")
    return fn


def _check_prior_arg(prior, num_heads):
    if prior is None:
        return
    if isinstance(prior, Prior):
        raise TypeError(
            f"prior must be a module returning a rapkern prior; wrap the {type(prior).__name__} object in "
            "rapkern.nn.FixedPrior"
        )
    if not isinstance(prior, nn.Module):
        raise TypeError(f"prior must be None or an nn.Module called as prior(L, S), got {type(prior).__name__}")
    hp = getattr(prior, "num_heads", None)
    if hp is not None and hp not in (1, num_heads):
        raise ValueError(f"prior.num_heads must be num_heads = {num_heads} (or 1, shared by all heads), got {hp}")


def _check_gate_arg(gate, num_heads, prior):
    if gate is None:
        return
    if prior is None:
        raise ValueError("gate was given without a prior: α scales the prior, so it needs prior=")
    if isinstance(gate, bool) or not isinstance(gate, (int, float, Tensor, nn.Module)):
        raise TypeError(
            f"gate must be None, a float, a tensor () or (num_heads,), or a module, got {type(gate).__name__}"
        )
    if isinstance(gate, (int, float)) and not math.isfinite(gate):
        raise ValueError(f"gate must be finite, got {gate}")
    if isinstance(gate, Tensor):
        if not gate.is_floating_point():
            raise TypeError(f"gate must be a floating tensor, got dtype {gate.dtype}")
        if gate.dim() > 1 or (gate.dim() == 1 and gate.shape[0] != num_heads):
            raise ValueError(f"gate must have shape () or (num_heads,) = ({num_heads},), got {tuple(gate.shape)}")
    hg = getattr(gate, "num_heads", None) if isinstance(gate, nn.Module) else None
    if hg is not None and hg != num_heads:
        raise ValueError(f"gate.num_heads must be num_heads = {num_heads}, got {hg}")


def _check_inputs(mha, query, key, value, key_padding_mask, attn_mask, is_causal) -> bool:
    """torch's shape rules (``F._mha_shape_check``) as ValueError/TypeError; returns whether inputs are batched."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if query.dim() not in (2, 3):
        raise ValueError(f"query must be 3-D (batched) or 2-D (unbatched), got shape {tuple(query.shape)}")
    batched = query.dim() == 3
    for name, t in (("key", key), ("value", value)):
        if t.dim() != query.dim():
            raise ValueError(f"{name} must be {query.dim()}-D like query, got shape {tuple(t.shape)}")
    for name, t in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if t is not None and (not isinstance(t, Tensor) or not (t.dtype == torch.bool or t.is_floating_point())):
            raise TypeError(f"{name} must be a bool or floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
        want = "(N, S)" if batched else "(S,)"
        got = tuple(key_padding_mask.shape)
        raise ValueError(f"key_padding_mask must be {want} for {query.dim()}-D query, got {got}")
    if attn_mask is not None and attn_mask.dim() not in (2, 3):
        raise ValueError(f"attn_mask must be 2-D (L, S) or 3-D (N·num_heads, L, S), got {tuple(attn_mask.shape)}")
    if is_causal and attn_mask is None:
        raise ValueError(
            "Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention); you may use "
            "nn.Transformer.generate_square_subsequent_mask to create it"
        )
    e = query.shape[-1]
    if e != mha.embed_dim:
        raise ValueError(f"query must have embed_dim = {mha.embed_dim} features, got {e}")
    if key.shape[-1] != mha.kdim or value.shape[-1] != mha.vdim:
        raise ValueError(
            f"key and value must have kdim = {mha.kdim} and vdim = {mha.vdim} features, "
            f"got {key.shape[-1]} and {value.shape[-1]}"
        )
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(
            f"key and value must share their leading dims, got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    bdim = 0 if mha.batch_first else 1
    if batched and key.shape[bdim] != query.shape[bdim]:
        raise ValueError(f"query and key must share the batch size, got {query.shape[bdim]} and {key.shape[bdim]}")
    return batched


def _check_masks(mha, b, lq, lk, key_padding_mask, attn_mask):
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (b, lk):
        raise ValueError(f"key_padding_mask must have shape (N, S) = ({b}, {lk}), got {tuple(key_padding_mask.shape)}")
    if attn_mask is not None:
        want = (lq, lk) if attn_mask.dim() == 2 else (b * mha.num_heads, lq, lk)
        if tuple(attn_mask.shape) != want:
            got = tuple(attn_mask.shape)
            raise ValueError(f"attn_mask of {attn_mask.dim()} dims must have shape {want}, got {got}")


def _split_key_padding(kpm):
    """A float key padding mask -> (bool mask of its -inf entries or None, finite additive part or None)."""
    if kpm is None or kpm.dtype == torch.bool:
        return kpm, None
    if bool((torch.isnan(kpm) | torch.isposinf(kpm)).any()):
        raise ValueError("a float key_padding_mask must not contain NaN or +inf")
    hole = torch.isneginf(kpm)
    bias = kpm.masked_fill(hole, 0.0)
    return (hole if bool(hole.any()) else None), (bias if bool((bias != 0).any()) else None)


def _float_mask(attn_mask, dtype, b, h):
    """attn_mask as an additive bias: (L, S) or (B, H, L, S); a bool mask becomes 0 / -inf (one new tensor)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(
            attn_mask, float("-inf")
        )
    return attn_mask.unflatten(0, (b, h)) if attn_mask.dim() == 3 else attn_mask


def _fold_key_bias(q, k, kpm_bias, scale):
    """Fold a per-key additive bias b_j into the dot product: [q, 1]·[k, b_j/scale] = q·k + b_j/scale."""
    if kpm_bias is None:
        return q, k
    b, h, lk, _ = k.shape
    ones = q.new_ones(q.shape[:-1] + (1,))
    col = (kpm_bias.to(k.dtype) / scale)[:, None, :, None].expand(b, h, lk, 1)
    return torch.cat([q, ones], dim=-1), torch.cat([k, col], dim=-1)


def _eager_probs(q, k, extra, scale, prior, alpha, mask, kpm_bool, kpm_bias, causal=False):
    """The undropped softmax over real + appended keys, (B, H, L, S + E); rows with no visible key give 0."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    s = torch.matmul(q * scale, k.transpose(-1, -2))
    if prior is not None:
        s = s + _neg_inf_safe_gate(prior.materialize(b, h, lq, lk).to(s.dtype), alpha)
    if mask is not None:
        s = s + mask
    if kpm_bias is not None:
        s = s + kpm_bias[:, None, None, :]
    if kpm_bool is not None:
        s = s.masked_fill(kpm_bool[:, None, None, :], float("-inf"))
    if causal:
        s = s.masked_fill(torch.ones(lq, lk, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    if extra is not None:
        s = torch.cat([s, torch.matmul(q * scale, extra[0].transpose(-1, -2))], dim=-1)
    dead = s.amax(-1, keepdim=True) == float("-inf")
    return torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)


def _merge_extra_keys(out_r, lse_r, q, extra, scale, dropout_p):
    """Combine attention over the real keys (out_r, lse_r) with the appended keys by their log-sum-exp.

    out_r = Σ_j drop_j·exp(s_j − lse_r)·v_j, so rescaling by exp(lse_r − lse) gives the real keys' share of the
    full softmax (with the same dropout); the appended keys' probabilities get their own dropout.
    """
    k_e, v_e = extra
    ct = torch.promote_types(q.dtype, torch.float32)
    lse_r = lse_r.to(ct)  # float32 from rapkern, also for float64 inputs: that bounds the float64 merge to ~1e-7
    s_e = torch.matmul(q.to(ct) * scale, k_e.to(ct).transpose(-1, -2))  # (B, H, L, E)
    lse = torch.logaddexp(lse_r, torch.logsumexp(s_e, dim=-1))  # finite: the appended keys are always visible
    p_e = torch.exp(s_e - lse.unsqueeze(-1))
    if dropout_p > 0:
        p_e = F.dropout(p_e, dropout_p)
    out = torch.exp(lse_r - lse).unsqueeze(-1) * out_r.to(ct) + torch.matmul(p_e, v_e.to(ct))
    return out.to(out_r.dtype)
