"""``swap_attention``: put ``BiasedMultiheadAttention`` in place of a model's ``nn.MultiheadAttention`` layers."""

from __future__ import annotations

import inspect

from torch import nn

from .attention import BiasedMultiheadAttention

__all__ = ["swap_attention"]


def swap_attention(model: nn.Module, prior=None, gate=None) -> int:
    """Replace every ``nn.MultiheadAttention`` inside ``model`` in place; return how many were replaced.

    Weights are copied (``requires_grad`` flags too); device, dtype, train/eval mode and every constructor
    setting (batch_first, kdim/vdim, dropout, add_bias_kv, ...) are kept. ``prior`` and ``gate`` are each None,
    a module (shared by all replaced layers), or a factory called once per replaced layer with that layer's
    index in model order (``named_modules`` order, from 0), or with no argument if it takes none; a module
    that lands on another device than its layer is moved there (its dtype is kept). A float or tensor gate is
    used as is by every layer.

    ``BiasedMultiheadAttention`` layers (e.g. from an earlier call) and subclasses of ``nn.MultiheadAttention``
    with their own ``forward`` are left alone and not counted, so calling twice replaces nothing the second time;
    to change the prior of a swapped layer, set its ``.prior``. A layer shared by several parents is replaced
    once, by one new module, everywhere. Hooks registered on a replaced layer are not carried over.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.MultiheadAttention):
        raise TypeError("model is itself an nn.MultiheadAttention: there is no parent to swap it in; build a "
                        "BiasedMultiheadAttention and load its state_dict instead")
    prior_f = _as_factory("prior", prior)
    gate_f = _as_factory("gate", gate)

    targets = [m for _, m in model.named_modules() if _replaceable(m)]
    new = {}
    for index, old in enumerate(targets):
        new[id(old)] = _replacement(old, prior_f(index), gate_f(index))
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if id(child) in new:
                setattr(parent, name, new[id(child)])
    return len(targets)


def _replaceable(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.MultiheadAttention)
        and not isinstance(m, BiasedMultiheadAttention)
        and type(m).forward is nn.MultiheadAttention.forward
    )


def _as_factory(name, arg):
    """None, a module or a constant -> a function of the layer index."""
    if arg is None or isinstance(arg, nn.Module) or not callable(arg):
        return lambda index: arg
    try:
        sig = inspect.signature(arg)
    except (TypeError, ValueError):  # some builtins have no signature: assume it takes the index
        return arg
    for args in ((0,), ()):
        try:
            sig.bind(*args)
        except TypeError:
            continue
        return arg if args else (lambda index: arg())
    raise TypeError(f"{name} factory must take the layer index or no argument, got signature {sig}")


def _replacement(old: nn.MultiheadAttention, prior, gate) -> BiasedMultiheadAttention:
    weight = old.in_proj_weight if old._qkv_same_embed_dim else old.q_proj_weight
    device, dtype = weight.device, weight.dtype
    prior = prior.to(device) if isinstance(prior, nn.Module) else prior
    gate = gate.to(device) if isinstance(gate, nn.Module) else gate
    new = BiasedMultiheadAttention(
        old.embed_dim,
        old.num_heads,
        dropout=old.dropout,
        bias=old.in_proj_bias is not None,
        add_bias_kv=old.bias_k is not None,
        add_zero_attn=old.add_zero_attn,
        kdim=old.kdim,
        vdim=old.vdim,
        batch_first=old.batch_first,
        device=device,
        dtype=dtype,
        prior=prior,
        gate=gate,
    )
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    if unexpected or any(not k.startswith(("prior.", "gate")) for k in missing):  # only prior/gate are new
        raise RuntimeError(f"cannot copy {type(old).__name__}: missing {missing}, unexpected {unexpected}")
    old_params = dict(old.named_parameters())
    for name, p in new.named_parameters():
        if name in old_params:
            p.requires_grad_(old_params[name].requires_grad)
    return new.train(old.training)
