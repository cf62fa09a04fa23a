"""rapkern.nn.swap_attention: torch's Transformer stacks and torchvision's ViT keep their outputs after the swap
(train and eval), what is kept (weights, device, dtype, mode, flags), factories, idempotence, and training a
swapped encoder with a learnable lag prior and gate."""

from __future__ import annotations

import copy

import helpers
import pytest
import torch
from torch import nn

from rapkern.nn import BiasedMultiheadAttention, Gate, LagPrior, swap_attention

E, H, L, N = 16, 4, 9, 2

pytestmark = [  # torch's own warnings about the models built here, not about the swap
    pytest.mark.filterwarnings("ignore:Support for mismatched src_key_padding_mask and mask"),
    pytest.mark.filterwarnings("ignore:enable_nested_tensor is True, but self.use_nested_tensor is False"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage"),
]


def _rel_err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _randomize_biases(model, seed=0):
    """torch zero-initializes the attention biases; random ones make the parity checks see them."""
    g = helpers.gen(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "bias_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _swapped(model, **kw):
    other = copy.deepcopy(model)
    n = swap_attention(other, **kw)
    return other, n


def _attn_types(model):
    return [type(m) for m in model.modules() if isinstance(m, nn.MultiheadAttention)]


def _encoder(batch_first, norm_first, dropout=0.0):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout, batch_first=batch_first, norm_first=norm_first)
    return _randomize_biases(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))


def _decoder(batch_first, dropout=0.0):
    torch.manual_seed(1)
    layer = nn.TransformerDecoderLayer(E, H, 32, dropout, batch_first=batch_first)
    return _randomize_biases(nn.TransformerDecoder(layer, 2))


def _seq(n_len, batch_first, seed):
    x = torch.randn(N, n_len, E, generator=helpers.gen(seed))
    return x if batch_first else x.transpose(0, 1)


def _padding(n_len):
    pad = torch.zeros(N, n_len, dtype=torch.bool)
    pad[1, -3:] = True
    return pad


def _stack_cases(batch_first, dropout=0.0):
    """(name, model, call) for the torch stacks; call(model) runs one forward with masks."""
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    src, tgt, mem = _seq(L, batch_first, 1), _seq(L, batch_first, 2), _seq(L + 4, batch_first, 3)
    enc = _encoder(batch_first, False, dropout)
    enc_pre = _encoder(batch_first, True, dropout)
    dec = _decoder(batch_first, dropout)
    torch.manual_seed(2)
    full = _randomize_biases(nn.Transformer(E, H, 2, 2, 32, dropout, batch_first=batch_first))
    return [
        ("encoder", enc, lambda m: m(src, mask=causal, src_key_padding_mask=_padding(L))),
        ("encoder_norm_first", enc_pre, lambda m: m(src, src_key_padding_mask=_padding(L))),
        ("decoder", dec, lambda m: m(tgt, mem, tgt_mask=causal, memory_key_padding_mask=_padding(L + 4))),
        ("transformer", full, lambda m: m(src, tgt, tgt_mask=causal, src_key_padding_mask=_padding(L),
                                          memory_key_padding_mask=_padding(L))),
    ]


STACKS = ["encoder", "encoder_norm_first", "decoder", "transformer"]


@pytest.mark.parametrize("mode", ["eval_no_grad", "eval", "train"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("stack", STACKS)
def test_torch_stacks_unchanged(stack, batch_first, mode):
    """Same outputs (and gradients in train mode, dropout 0) as the unswapped stack, with no prior."""
    name, model, call = next(c for c in _stack_cases(batch_first) if c[0] == stack)
    model.train(mode == "train")
    swapped, n = _swapped(model)
    assert n == {"encoder": 2, "encoder_norm_first": 2, "decoder": 4, "transformer": 6}[stack]
    assert set(_attn_types(swapped)) == {BiasedMultiheadAttention}
    with torch.set_grad_enabled(mode != "eval_no_grad"):
        want, got = call(model), call(swapped)
    assert got.shape == want.shape and _rel_err(got, want) <= 1e-5
    if mode == "train":
        probe = torch.linspace(-1, 1, E)
        (want * probe).sum().backward()
        (got * probe).sum().backward()
        for (pn, p), (_, q) in zip(model.named_parameters(), swapped.named_parameters()):
            assert _rel_err(q.grad, p.grad) <= 1e-5, pn


@pytest.mark.parametrize("stack", STACKS)
def test_torch_stacks_train_with_dropout(stack):
    """With dropout in training: finite, differs from eval (dropout is applied), gradients flow."""
    name, model, call = next(c for c in _stack_cases(True, dropout=0.3) if c[0] == stack)
    swapped, _ = _swapped(model.train())
    torch.manual_seed(0)
    out = call(swapped)
    assert torch.isfinite(out).all()
    with torch.no_grad():
        ref = call(swapped.eval())
    assert _rel_err(out, ref) > 1e-3
    out.square().mean().backward()
    attn = next(m for m in swapped.modules() if isinstance(m, BiasedMultiheadAttention))
    assert attn.in_proj_weight.grad is not None and torch.isfinite(attn.in_proj_weight.grad).all()


def _vit_head(vit):
    """torchvision zero-initializes the classifier head, which would make every output (and gradient) constant."""
    with torch.no_grad():
        vit.heads.head.weight.copy_(torch.randn(vit.heads.head.weight.shape, generator=helpers.gen(9)) * 0.1)
    return _randomize_biases(vit)


def _small_vit(dropout=0.0):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32,
                                      mlp_dim=64, dropout=dropout, attention_dropout=dropout, num_classes=10)
    return _vit_head(vit)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_small_vision_transformer_unchanged(mode):
    vit = _small_vit().train(mode == "train")
    swapped, n = _swapped(vit)
    assert n == 2
    x = torch.randn(2, 3, 32, 32, generator=helpers.gen(4))
    want, got = vit(x), swapped(x)
    assert _rel_err(got, want) <= 1e-5
    if mode == "train":
        want.sum().backward()
        got.sum().backward()
        for (pn, p), (_, q) in zip(vit.named_parameters(), swapped.named_parameters()):
            assert _rel_err(q.grad, p.grad) <= 1e-5, pn


def test_small_vision_transformer_with_a_prior_trains():
    """ViT with attention dropout in training and a learnable lag prior: runs, the prior gets a gradient."""
    vit = _small_vit(dropout=0.1).train()
    priors = []
    swap_attention(vit, prior=lambda i: priors.append(LagPrior(4, 4, init="alibi")) or priors[-1])
    out = vit(torch.randn(2, 3, 32, 32, generator=helpers.gen(5)))
    out.square().mean().backward()
    assert len(priors) == 2 and all(float(p.table.grad.abs().max()) > 0 for p in priors)


def test_vit_b_16_unchanged():
    """torchvision's vit_b_16 proper (random init), one eval forward on a 224×224 image."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    vit = _vit_head(tv.models.vit_b_16()).eval()
    swapped, n = _swapped(vit)
    assert n == 12
    x = torch.randn(1, 3, 224, 224, generator=helpers.gen(6))
    with torch.no_grad():
        want, got = vit(x), swapped(x)
    assert _rel_err(got, want) <= 1e-5


# -- what the swap keeps and how it is configured ---------------------------------------------------------------


class _Custom(nn.MultiheadAttention):
    def forward(self, *args, **kwargs):  # its own behaviour: must not be replaced
        return super().forward(*args, **kwargs)


class _Inherits(nn.MultiheadAttention):
    pass


def test_what_is_kept():
    torch.manual_seed(0)
    shared = nn.MultiheadAttention(E, H)
    model = nn.ModuleDict({
        "a": nn.MultiheadAttention(E, H, dropout=0.2, bias=False, add_bias_kv=True, add_zero_attn=True,
                                   kdim=8, vdim=12, batch_first=True),
        "b": nn.Sequential(shared, nn.Linear(E, E)),
        "c": shared,
        "custom": _Custom(E, H),
        "inherits": _Inherits(E, H),
    }).double()
    model["a"].eval()
    model["b"][0].k_proj_weight = None  # packed weights in b/c; a uses q/k/v_proj_weight
    model["b"][0].in_proj_weight.requires_grad_(False)  # frozen weights stay frozen
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert swap_attention(model) == 3
    a, b, c = model["a"], model["b"][0], model["c"]
    assert type(a) is type(b) is BiasedMultiheadAttention and b is c  # shared: one new module, everywhere
    assert type(model["custom"]) is _Custom and type(model["inherits"]) is BiasedMultiheadAttention
    assert not a.training and b.training
    assert (a.dropout, a.batch_first, a.kdim, a.vdim, a.add_zero_attn) == (0.2, True, 8, 12, True)
    assert a.in_proj_bias is None and a.bias_k is not None and not a._qkv_same_embed_dim
    assert a.q_proj_weight.dtype == torch.float64 and not b.in_proj_weight.requires_grad
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert swap_attention(model) == 0 and model["a"] is a  # a second call replaces nothing


def test_factories_get_the_index_in_model_order():
    torch.manual_seed(0)
    model = nn.Transformer(E, H, 1, 1, 32, 0.0)
    order = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    seen = []

    def prior_factory(index):
        seen.append(index)
        return LagPrior(H, index + 1)

    shared_gate = Gate(H, init=0.3, mode="learnable")
    assert swap_attention(model, prior=prior_factory, gate=shared_gate) == len(order) == 3
    assert seen == [0, 1, 2]
    swapped = [model.get_submodule(n) for n in order]
    assert [m.prior.max_lag for m in swapped] == [1, 2, 3]
    assert all(m.gate is shared_gate for m in swapped)

    model2 = nn.Transformer(E, H, 1, 1, 32, 0.0)
    made = []
    swap_attention(model2, prior=lambda: made.append(LagPrior(H, 2)) or made[-1], gate=0.5)
    assert len(made) == 3 and len({id(m) for m in made}) == 3
    assert [model2.get_submodule(n).prior for n in order] == made
    assert all(model2.get_submodule(n).gate == 0.5 for n in order)


def test_swap_errors_leave_the_model_untouched():
    model = nn.Sequential(nn.TransformerEncoderLayer(E, H, 32, batch_first=True))
    with pytest.raises(ValueError, match=r"prior.num_heads must be num_heads = 4 \(or 1"):
        swap_attention(model, prior=LagPrior(2, 3))
    with pytest.raises(ValueError, match="gate.num_heads must be num_heads = 4, got 8"):
        swap_attention(model, prior=LagPrior(H, 3), gate=lambda i: Gate(8))
    assert _attn_types(model) == [nn.MultiheadAttention]
    with pytest.raises(TypeError, match="prior factory must take the layer index or no argument"):
        swap_attention(model, prior=lambda a, b: None)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        swap_attention([model])
    with pytest.raises(TypeError, match="model is itself an nn.MultiheadAttention"):
        swap_attention(nn.MultiheadAttention(E, H))


@pytest.mark.gpu
def test_device_is_kept_on_cuda():
    model = nn.TransformerEncoderLayer(E, H, 32, batch_first=True).cuda()
    swap_attention(model, prior=lambda i: LagPrior(H, 3))  # built on the CPU, moved with its layer
    assert model.self_attn.prior.table.device.type == "cuda"
    model(torch.randn(N, L, E, device="cuda")).sum().backward()


def test_training_a_swapped_encoder_with_lag_prior_and_gate():
    """A few Adam steps (predict the input 2 steps back): the prior tables and α of the selected heads get
    gradients (the unselected heads' α none), they change, and the loss goes down."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 32, dropout=0.1, batch_first=True)
    model = nn.Sequential(nn.Linear(1, E), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False),
                          nn.Linear(E, 1))
    priors, gates = [], []
    n = swap_attention(
        model,
        prior=lambda i: priors.append(LagPrior(H, 4, init="alibi")) or priors[-1],  # B ≠ 0: α has a gradient
        gate=lambda i: gates.append(Gate(H, init=0.5, mode="learnable", heads=[0, 1])) or gates[-1],
    )
    assert n == 2 and model.training
    g = helpers.gen(7)
    x = torch.randn(16, 24, 1, generator=g)
    y = torch.roll(x, 2, dims=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tables0 = [p.table.detach().clone() for p in priors]
    losses = []
    for step in range(15):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        if step == 0:
            for p, gt in zip(priors, gates):
                assert float(p.table.grad.abs().max()) > 0
                assert float(gt.alpha.grad[:2].abs().min()) > 0 and float(gt.alpha.grad[2:].abs().max()) == 0
        opt.step()
        losses.append(loss.item())
    assert max(losses[-3:]) < 0.85 * losses[0], losses
    assert all(not torch.equal(p.table, t0) for p, t0 in zip(priors, tables0))
    assert all(not torch.equal(gt.alpha[:2], torch.full((2,), 0.5)) for gt in gates)
