"""Layout fuzzer (issue 8): every public op, on every backend that runs here, fed the same values in many
memory layouts, checked against the float64 reference under the 2x rule of the other tests.

Ops: ``attention``, ``attention_stats`` and ``attention_kl`` (where the tree has them) and ``lda_route``, each
on every registered backend that implements it (the torch backend's attention on both its CPU paths). Each
tensor an op reads (q, k, v, every prior tensor, alpha, the key padding mask; lda_route's q, centroids,
answers, tensor tau and cluster_mask; the incoming gradients) gets its own ``Layout``: contiguous; last two
dims transposed; channels-last; stored permuted and viewed back; cut out of a NaN-filled buffer at a storage
offset with strides > 1 (a stray read shows up as NaN, or as True in a mask); and stride-0 ``expand``\\ ed
dims on top of any of these. The values are the same in every layout, so no result may depend on it.
Gradients are read from the leaves a user owns (the padded or permuted buffer, the size-1 tensor behind an
``expand``): they must have the leaf's shape, dtype and strides, be finite, and match the reference, which
sees the same leaves through ``.contiguous()``. A case a backend declines for plain inputs (dtype, shapes) is
skipped; the layout must never change that decision.

``RAPKERN_LAYOUT_EXAMPLES`` (default 60) examples per torch path and op; fewer for the reference backend and
the Triton interpreter. Derandomized (reproducible in CI) unless ``RAPKERN_LAYOUT_RANDOM=1``.
``RAPKERN_LAYOUT_REPORT=path`` writes a JSON tally of what passed (examples, layouts per role, cases).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from unittest import mock

import helpers
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, reject, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

import rapkern
from rapkern import BandedPrior, DensePrior, LowRankPrior, RelativeLagPrior, dispatch
from rapkern.backends.base import Backend
from rapkern.testing import assert_close_to_reference, reference_attention, reference_lda_route

N_EXAMPLES = int(os.environ.get("RAPKERN_LAYOUT_EXAMPLES", "60"))
RANDOM = os.environ.get("RAPKERN_LAYOUT_RANDOM", "0") == "1"

# Rounding floors relative to max|reference| (at least 1), as in test_attention_torch.py,
# test_triton_attention.py and test_routing_torch.py; not loosened.
FLOOR = {torch.float64: 1e-11, torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}
LSE_FLOOR = {torch.float64: 2e-6, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
TRITON_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3}
TRITON_LSE_FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3}

PRIOR_KINDS = ["none", "lag", "banded", "banded_masked", "lowrank", "dense"]
F64 = torch.float64
TALLY: Counter = Counter()


def fuzz(n):
    return settings(max_examples=max(1, n), deadline=None, derandomize=not RANDOM, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = os.environ.get("RAPKERN_LAYOUT_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(dict(sorted(TALLY.items())), f, indent=1)


def _implements(method):
    """Registered backends that override ``Backend.<method>`` and can run on this machine."""
    return [b.name for b in dispatch.backends()
            if getattr(type(b), method) is not getattr(Backend, method) and b.availability() is None]


# ----------------------------------------------------------------------------------------------------------
# Layouts: how one logical tensor is stored, and the view an op is given.


class Layout:
    """``storage``: contiguous | transposed (last two dims) | channels_last | permuted (the leaf holds
    x.permute(perm)) | padded (x at offsets ``pad[i][0]``, strides times ``step``, in a buffer of NaN, or of
    True for a bool mask). ``expand``: dims broadcast with stride 0 from a size-1 leaf."""

    def __init__(self, storage="contiguous", expand=(), perm=(), pad=(), step=()):
        self.storage, self.expand, self.perm, self.pad, self.step = storage, expand, perm, pad, step

    def __repr__(self):
        s = self.storage + (f"{self.perm}" if self.perm else "")
        s += f"(pad={self.pad}, step={self.step})" if self.storage == "padded" else ""
        return s + (f"+expand{self.expand}" if self.expand else "")

    def signature(self, role):
        return f"{role}:{self.storage}" + ("+expand" if self.expand else "")

    def build(self, x, dtype, requires_grad=False, device="cpu"):
        """(leaf, view): the tensor a user owns (it gets .grad) and the view of x's shape handed to the op.
        x's values along the expanded dims are replaced by its first slice."""
        small = x
        for d in self.expand:
            small = small.narrow(d, 0, 1)
        small = small.to(device=device, dtype=dtype)
        view = lambda t: t  # noqa: E731
        if self.storage == "contiguous":
            leaf = small.clone(memory_format=torch.contiguous_format)
        elif self.storage == "transposed":
            leaf = small.transpose(-1, -2).clone(memory_format=torch.contiguous_format).transpose(-1, -2)
        elif self.storage == "channels_last":
            leaf = small.clone(memory_format=torch.channels_last)
        elif self.storage == "permuted":
            leaf = small.permute(self.perm).clone(memory_format=torch.contiguous_format)
            inv = tuple(sorted(range(len(self.perm)), key=self.perm.__getitem__))
            view = lambda t: t.permute(inv)  # noqa: E731
        elif self.storage == "padded":
            fill = True if dtype == torch.bool else float("nan")
            if small.dim() == 0:  # a 0-d view at a storage offset
                leaf = torch.full((4,), fill, dtype=dtype, device=device)
                leaf[2] = small
                view = lambda t: t[2]  # noqa: E731
            else:
                sl = tuple(slice(a, a + (n - 1) * s + 1, s) for n, (a, _), s in zip(small.shape, self.pad, self.step))
                big = tuple(a + (n - 1) * s + 1 + b for n, (a, b), s in zip(small.shape, self.pad, self.step))
                leaf = torch.full(big, fill, dtype=dtype, device=device)
                leaf[sl] = small
                view = lambda t: t[sl]  # noqa: E731
        else:
            raise AssertionError(self.storage)
        leaf.requires_grad_(requires_grad)
        v = view(leaf)
        if self.expand:
            v = v.expand(x.shape)
        assert v.shape == x.shape and torch.equal(v.detach(), small.expand(x.shape)), "layout changed the values"
        return leaf, v


@st.composite
def layouts(draw, rank, expandable=()):
    kinds = ["contiguous", "padded"] + (["transposed", "permuted"] if rank >= 2 else [])
    kinds += ["channels_last"] if rank == 4 else []
    storage = draw(st.sampled_from(kinds))
    expand = ()
    if expandable and draw(st.integers(0, 3)) == 0:
        expand = tuple(d for d in expandable if draw(st.booleans())) or (expandable[0],)
    perm = tuple(draw(st.permutations(range(rank)))) if storage == "permuted" else ()
    pad = step = ()
    if storage == "padded":
        pad = tuple(draw(st.tuples(st.integers(0, 3), st.integers(0, 2))) for _ in range(rank))
        step = tuple(draw(st.sampled_from([1, 1, 2])) for _ in range(rank))
    return Layout(storage, expand, perm, pad, step)


def _leaves(lays, vals, roles, dtype, needs_grad, oracle, device):
    """Build each role's (leaf, input); ``oracle``: the input is the view made contiguous."""
    leaves, ins = {}, {}
    for role in roles:
        if role in vals:
            dt = torch.bool if vals[role].dtype == torch.bool else dtype
            leaf, v = lays.get(role, Layout()).build(vals[role], dt, needs_grad(role) and dt != torch.bool, device)
            leaves[role], ins[role] = leaf, (v.contiguous() if oracle else v)
    return leaves, ins


def _backward(lays, vals, outputs, oracle, device):
    """Backpropagate ``{grad role: output}``, each incoming gradient in its own layout (a scalar gets 1)."""
    outs, gs = [], []
    for role, t in outputs.items():
        if t.dim() == 0:
            g = torch.ones((), dtype=t.dtype, device=device)
        else:
            _, g = lays[role].build(vals[role], t.dtype, device=device)
        outs.append(t)
        gs.append(g.contiguous() if oracle else g)
    torch.autograd.backward(outs, gs)


def _check_grad_layout(role, g, leaf):
    assert g.shape == leaf.shape, f"grad of {role}: shape {tuple(g.shape)} != leaf {tuple(leaf.shape)}"
    assert g.dtype == leaf.dtype, f"grad of {role}: dtype {g.dtype} != leaf {leaf.dtype}"
    strides = lambda t: [s for s, n in zip(t.stride(), t.shape) if n > 1]  # noqa: E731
    assert strides(g) == strides(leaf), f"grad of {role}: strides {g.stride()} != leaf {leaf.stride()}"
    assert torch.isfinite(g).all(), f"grad of {role} is not finite"


def _assert_matches(got, ref, low, dtype, floors, reduce_len, grad_table=FLOOR):
    """``got``/``ref``/``low`` = (outputs {name: tensor}, grads {role: grad or None}, leaves {role: leaf}).
    Outputs under the 2x rule with ``floors[name] = (table, reduce length)``; every leaf's grad too."""
    for name, x in got[0].items():
        table, n = floors[name]
        floor = helpers.scaled_floor(table, dtype, ref[0][name], n)
        assert_close_to_reference(name, x, ref[0][name], low[0][name], floor)
    for role, leaf in got[2].items():
        if not leaf.requires_grad:
            continue
        # no gradient at all: fine only where the reference's is 0
        g, r, lo = (torch.zeros_like(run[2][role]) if run[1][role] is None else run[1][role] for run in (got, ref, low))
        _check_grad_layout(role, g, leaf)
        assert_close_to_reference(f"d{role}", g, r, lo, helpers.scaled_floor(grad_table, dtype, r, reduce_len))


def _tally(op, backend, lays, used, case_sig):
    """Count a passing example: its backend, its case signature, and the layout of every role it read."""
    lays = {r: lay for r, lay in lays.items() if r in used}
    TALLY[f"examples/{op}/{backend}"] += 1
    TALLY[f"cases/{op}/{case_sig}"] += 1
    for role, lay in lays.items():
        TALLY[f"layouts/{op}/{lay.signature(role)}"] += 1
        if currently_in_test_context():
            event(lay.signature(role))
    TALLY[f"distinct-layout-tuples/{op}/{hash(tuple(sorted((r, repr(x)) for r, x in lays.items())))}"] = 1


# ----------------------------------------------------------------------------------------------------------
# Attention problems (also the inputs of attention_stats and attention_kl).


@dataclass(frozen=True)
class AttnCase:
    b: int
    hq: int
    hkv: int
    lq: int
    lk: int
    d: int
    dv: int
    kind: str
    lead: tuple
    w: int
    r: int
    causal: bool
    padding: bool
    alpha_form: str  # float | scalar | per_head
    prior_grad: bool
    alpha_grad: bool
    lse_grad: bool
    dtype: torch.dtype
    many_blocks: bool
    seed: int
    student: bool = False  # attention_kl: a second (student) set of q, k, prior, alpha
    reduction: str = "none"
    layouts: dict = field(default_factory=dict, hash=False)


def prior_roles(kind, sfx=""):
    return [r + sfx for r in {"none": [], "lowrank": ["u", "v_r"]}.get(kind, ["prior"])]


def _side_roles(kind, sfx=""):
    return ["q" + sfx, "k" + sfx, *prior_roles(kind, sfx), "alpha" + sfx]


def attention_values(c: AttnCase) -> dict:
    """Canonical float64 values per role, already rounded to the case's dtype."""
    gen = helpers.gen(c.seed)

    def rnd(*s):
        return torch.randn(s, generator=gen, dtype=F64).to(c.dtype).to(F64)

    def side(sfx):
        vals = {"q" + sfx: rnd(c.b, c.hq, c.lq, c.d), "k" + sfx: rnd(c.b, c.hkv, c.lk, c.d)}
        w = 2 * c.w + 1
        shapes = {"lag": [(w,)], "banded": [(c.lq, w)], "banded_masked": [(c.lq, w)],
                  "lowrank": [(c.lq, c.r), (c.lk, c.r)], "dense": [(c.lq, c.lk)], "none": []}[c.kind]
        for role, s in zip(prior_roles(c.kind, sfx), shapes):
            vals[role] = rnd(*c.lead, *s)
        if c.alpha_form == "scalar":
            vals["alpha" + sfx] = rnd()
        elif c.alpha_form == "per_head":
            a = rnd(c.hq)
            if c.hq > 1:
                a[c.seed % c.hq] = 0.0  # a head that sees no prior
            vals["alpha" + sfx] = a
        return vals

    vals = side("")
    vals["v"] = rnd(c.b, c.hkv, c.lk, c.dv)
    if c.padding:
        vals["kpm"] = torch.rand(c.b, c.lk, generator=gen) < 0.3
    vals["gout"] = rnd(c.b, c.hq, c.lq, c.dv)
    vals["glse"] = rnd(c.b, c.hq, c.lq)  # also the gradient of entropy and of the per-row KL
    vals["gmass"] = rnd(c.b, c.hq, c.lk)
    if c.student:
        vals.update(side("_s"))
    return vals


def leads(b, hq):
    return [(), (1,), (hq,), (1, 1), (b, 1), (1, hq), (b, hq)]


@st.composite
def attention_cases(draw, dtypes, lengths, dims, student=False):
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.sampled_from([1, 2]))
    b = draw(st.integers(1, 2))
    d = draw(st.sampled_from(dims))
    kind = draw(st.sampled_from(PRIOR_KINDS))
    lead = draw(st.sampled_from(leads(b, hq)))
    alpha_form = draw(st.sampled_from(["float", "scalar", "per_head"]))
    c = AttnCase(
        b=b, hq=hq, hkv=hkv, lq=draw(st.sampled_from(lengths)), lk=draw(st.sampled_from(lengths)), d=d,
        dv=draw(st.sampled_from([d, d, d, 5])), kind=kind, lead=lead, w=draw(st.integers(0, 3)),
        r=draw(st.integers(1, 3)), causal=draw(st.booleans()), padding=draw(st.booleans()), alpha_form=alpha_form,
        prior_grad=kind != "none" and draw(st.booleans()), alpha_grad=alpha_form != "float" and draw(st.booleans()),
        lse_grad=draw(st.booleans()), dtype=draw(st.sampled_from(dtypes)), many_blocks=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)), student=student,
        reduction=draw(st.sampled_from(["none", "none", "sum", "mean"])) if student else "none",
    )
    nlead, trailing = len(lead), (1 if kind == "lag" else 2)
    lays = {"v": draw(layouts(4, (0, 1)))}
    for sfx in ("", "_s") if student else ("",):
        lays["q" + sfx], lays["k" + sfx] = draw(layouts(4, (0, 1))), draw(layouts(4, (0, 1)))
        for role in prior_roles(kind, sfx):
            # stride 0 on the leading dims; for 2-D priors also on the row dim (one bias row for all queries)
            lays[role] = draw(layouts(nlead + trailing, tuple(range(nlead)) + ((nlead,) if trailing == 2 else ())))
        if alpha_form != "float":
            lays["alpha" + sfx] = draw(layouts(int(alpha_form == "per_head"), (0,) if alpha_form == "per_head" else ()))
    if c.padding:
        lays["kpm"] = draw(layouts(2, (0,)))
    lays["gout"] = draw(layouts(4, (0, 1, 2, 3)))  # e.g. out.sum().backward(): stride 0 everywhere
    lays["glse"] = draw(layouts(3, (0, 1, 2)))
    lays["gmass"] = draw(layouts(3, (0, 1, 2)))
    return replace(c, layouts=lays)


def _needs_grad(c: AttnCase):
    def needs(role):
        base = role.removesuffix("_s")
        if base in ("q", "k", "v"):
            return True
        if base == "alpha":
            return c.alpha_grad
        return base in prior_roles(c.kind) and c.prior_grad

    return needs


def _prior(kind, ins, sfx=""):
    if kind == "lag":
        return RelativeLagPrior(ins["prior" + sfx])
    if kind in ("banded", "banded_masked"):
        return BandedPrior(ins["prior" + sfx], mask_outside=kind == "banded_masked")
    if kind == "lowrank":
        return LowRankPrior(ins["u" + sfx], ins["v_r" + sfx])
    if kind == "dense":
        return DensePrior(ins["prior" + sfx])
    return None


@contextlib.contextmanager
def torch_path(path, many_blocks):
    """``fused``: the CPU fast path where it applies; ``blocked``: force the tile loop (the CUDA path)."""
    from rapkern.backends.torch_blocked import cpu_flash

    env = {"RAPKERN_TORCH_TILE_MB": "0.001", "RAPKERN_TORCH_FUSED_ROWS": "16"} if many_blocks else {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, env))
        if path == "blocked":
            stack.enter_context(mock.patch.object(cpu_flash, "usable", lambda plan: False))
        yield


def _case_sig(c: AttnCase):
    return f"{c.kind}|causal={c.causal}|pad={c.padding}|gqa={c.hq != c.hkv}|lq!=lk={c.lq != c.lk}|{c.alpha_form}"


# ----------------------------------------------------------------------------------------------------------
# rapkern.attention


def _run_attention(c: AttnCase, vals, fn, dtype, oracle, device="cpu", **kw):
    leaves, ins = _leaves(c.layouts, vals, _side_roles(c.kind) + ["v", "kpm"], dtype, _needs_grad(c), oracle, device)
    out, lse = fn(ins["q"], ins["k"], ins["v"], prior=_prior(c.kind, ins), alpha=ins.get("alpha", 0.75),
                  causal=c.causal, key_padding_mask=ins.get("kpm"), return_lse=True, **kw)
    _backward(c.layouts, vals, {"gout": out, **({"glse": lse} if c.lse_grad else {})}, oracle, device)
    return {"out": out.detach(), "lse": lse.detach()}, {r: t.grad for r, t in leaves.items()}, leaves


def check_attention(c: AttnCase, backend: str, path: str = "fused", device: str = "cpu"):
    """Kernel vs float64 reference vs the same eager math in the input dtype: out, lse, every leaf's grad."""
    vals = attention_values(c)
    with torch_path(path, c.many_blocks):
        got = _run_attention(c, vals, rapkern.attention, c.dtype, False, device, backend=backend)
    ref = _run_attention(c, vals, reference_attention, F64, True, device)
    low = _run_attention(c, vals, reference_attention, c.dtype, True, device, compute_dtype=c.dtype)
    out, lse = got[0]["out"], got[0]["lse"]
    assert out.dtype == c.dtype and out.shape == (c.b, c.hq, c.lq, c.dv)
    assert lse.dtype == torch.float32 and lse.shape == (c.b, c.hq, c.lq)
    floor, lse_floor = (TRITON_FLOOR, TRITON_LSE_FLOOR) if backend == "triton" else (FLOOR, LSE_FLOOR)
    _assert_matches(got, ref, low, c.dtype, {"out": (floor, 1), "lse": (lse_floor, 1)}, max(c.lq, c.lk), floor)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref[0]["lse"])), "lse -inf rows differ from the reference"
    used = _side_roles(c.kind) + ["v", "kpm", "gout"] + (["glse"] if c.lse_grad else [])
    _tally("attention", f"{backend}-{path}" if backend == "torch" else backend, c.layouts, used, _case_sig(c))


def issue8_case(kind, dtype=torch.float32):
    """Issue 8: q, k, v given as ``x.transpose(-1, -2)`` of a (B, H, D, L) tensor; everything else plain."""
    t = Layout("transposed")
    return AttnCase(b=2, hq=4, hkv=2, lq=33, lk=17, d=16, dv=16, kind=kind, lead=(4,), w=3, r=2, causal=True,
                    padding=True, alpha_form="per_head", prior_grad=kind != "none", alpha_grad=True, lse_grad=False,
                    dtype=dtype, many_blocks=False, seed=8,
                    layouts={"q": t, "k": t, "v": t, "gout": Layout(), "glse": Layout(), "gmass": Layout()})


TORCH_DTYPES = (torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16)
TORCH_LENGTHS = (1, 5, 17, 33)
DIMS = (1, 8, 16)
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _profile(backend, share=1.0):
    """(max examples, case strategy kwargs, device) per backend: the Triton interpreter runs one program at a
    time (few, small cases); the float64 reference backend needs few."""
    if backend == "triton":
        return int(N_EXAMPLES * share) // 12, dict(dtypes=(torch.float32, torch.float16), lengths=(1, 17, 40),
                                                  dims=(8, 16)), TRITON_DEVICE
    if backend == "reference":
        return int(N_EXAMPLES * share) // 4, dict(dtypes=(torch.float32, torch.float64), lengths=TORCH_LENGTHS,
                                                  dims=DIMS), "cpu"
    return int(N_EXAMPLES * share), dict(dtypes=TORCH_DTYPES, lengths=TORCH_LENGTHS, dims=DIMS), "cpu"


def _params(method):
    """pytest params for every backend implementing ``method``; the torch backend's attention twice (paths)."""
    out = []
    for b in _implements(method):
        marks = [pytest.mark.interpreter] if b == "triton" else []
        paths = ["fused", "blocked"] if (b, method) == ("torch", "attention_reasons") else ["fused"]
        out += [pytest.param(b, p, id=b if len(paths) == 1 else f"{b}-{p}", marks=marks) for p in paths]
    return out


def _skip_unavailable(backend):
    if backend.startswith("triton") and TRITON_DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    if "cpu" not in dispatch.get(backend).devices:  # the fuzzer's inputs are CPU tensors
        pytest.skip(f"backend {backend!r} serves no CPU tensors (its GPU tests are marked gpu)")


def _declined(c: AttnCase, op, backend, device) -> bool:
    """Whether ``backend`` declines this case given plainly (dtype, shapes, grads, the GPU's verified configs):
    such cases are rejected. Reasons never depend on layout, so the fuzzed call itself must not be declined."""
    from rapkern import stats, validate

    vals = attention_values(c)
    _, ins = _leaves({}, vals, _side_roles(c.kind) + _side_roles(c.kind, "_s") + ["v", "kpm"], c.dtype,
                     _needs_grad(c), True, device)
    side = dict(prior=_prior(c.kind, ins), alpha=ins.get("alpha", 0.75), causal=c.causal,
                key_padding_mask=ins.get("kpm"), scale=None)
    b = dispatch.get(backend)
    if op == "attention":
        return bool(b.attention_reasons(validate.check_attention(ins["q"], ins["k"], ins["v"], dropout_p=0.0, **side)))
    if op == "attention_stats":
        return bool(b.stats_reasons(stats.check_stats(ins["q"], ins["k"], **side)))
    p = stats.check_kl(ins["q"], ins["k"], ins["q_s"], ins["k_s"], prior_t=side["prior"],
                       prior_s=_prior(c.kind, ins, "_s"), alpha_t=side["alpha"], alpha_s=ins.get("alpha_s", 0.75),
                       causal=c.causal, key_padding_mask=side["key_padding_mask"], temperature=1.5,
                       reduction=c.reduction, scale_t=None, scale_s=None)
    return bool(b.kl_reasons(p))


@pytest.mark.parametrize("backend,path", _params("attention_reasons"))
def test_attention(backend, path):
    """rapkern.attention on every backend; the torch backend both as it runs on CPU (the fused flash op: fwd,
    and bwd when no prior/alpha/lse grad is needed) and through its blocked tile loop (its CUDA path)."""
    _skip_unavailable(backend)
    n, kw, device = _profile(backend)

    @fuzz(n)
    @given(c=attention_cases(**kw))
    def run(c):
        if _declined(c, "attention", backend, device):
            reject()
        check_attention(c, backend, path, device)

    if backend in ("torch", "triton", "cpp"):  # issue 8's layout, always
        for kind in PRIOR_KINDS if backend in ("torch", "cpp") else ["lag"]:
            run = example(c=issue8_case(kind))(run)
    run()


def test_fuzzer_catches_issue_8(monkeypatch):
    """The check is sharp: with the fused CPU op fed operands whose last stride is not 1 (issue 8's bug,
    re-created by removing the call-site copy), the issue-8 case fails."""
    from rapkern.backends.torch_blocked import cpu_flash

    c = issue8_case("lag")
    check_attention(c, "torch", "fused")
    monkeypatch.setattr(cpu_flash, "_unit_last", lambda t: t)
    with pytest.raises(AssertionError):
        check_attention(c, "torch", "fused")


# ----------------------------------------------------------------------------------------------------------
# rapkern.attention_stats and rapkern.attention_kl (issue 9), where this tree has them.

HAS_STATS = hasattr(rapkern, "attention_stats") and hasattr(rapkern.testing, "reference_attention_stats")
HAS_KL = hasattr(rapkern, "attention_kl") and hasattr(rapkern.testing, "reference_attention_kl")


def _run_stats(c: AttnCase, vals, fn, dtype, oracle, device, **kw):
    leaves, ins = _leaves(c.layouts, vals, _side_roles(c.kind) + ["kpm"], dtype, _needs_grad(c), oracle, device)
    ent, mass = fn(ins["q"], ins["k"], prior=_prior(c.kind, ins), alpha=ins.get("alpha", 0.75), causal=c.causal,
                   key_padding_mask=ins.get("kpm"), **kw)
    _backward(c.layouts, vals, {"glse": ent, "gmass": mass}, oracle, device)
    return {"entropy": ent.detach(), "key_mass": mass.detach()}, {r: t.grad for r, t in leaves.items()}, leaves


def check_stats(c: AttnCase, backend: str, device: str = "cpu"):
    vals = attention_values(c)
    with torch_path("fused", c.many_blocks):
        got = _run_stats(c, vals, rapkern.attention_stats, c.dtype, False, device, backend=backend)
    ref = _run_stats(c, vals, rapkern.testing.reference_attention_stats, F64, True, device)
    low = _run_stats(c, vals, rapkern.testing.reference_attention_stats, c.dtype, True, device, compute_dtype=c.dtype)
    n = max(c.lq, c.lk)  # both are sums over a sequence
    _assert_matches(got, ref, low, c.dtype, {"entropy": (FLOOR, n), "key_mass": (FLOOR, n)}, n)
    _tally("attention_stats", backend, c.layouts, _side_roles(c.kind) + ["kpm", "glse", "gmass"], _case_sig(c))


def _run_kl(c: AttnCase, vals, fn, dtype, oracle, device, **kw):
    roles = _side_roles(c.kind) + _side_roles(c.kind, "_s") + ["kpm"]
    leaves, ins = _leaves(c.layouts, vals, roles, dtype, _needs_grad(c), oracle, device)
    kl = fn(ins["q"], ins["k"], ins["q_s"], ins["k_s"], prior_t=_prior(c.kind, ins), prior_s=_prior(c.kind, ins, "_s"),
            alpha_t=ins.get("alpha", 0.75), alpha_s=ins.get("alpha_s", 0.75), causal=c.causal,
            key_padding_mask=ins.get("kpm"), temperature=1.5, reduction=c.reduction, **kw)
    _backward(c.layouts, vals, {"glse": kl}, oracle, device)  # the teacher's leaves must get no gradient
    return {"kl": kl.detach()}, {r: t.grad for r, t in leaves.items()}, leaves


def check_kl(c: AttnCase, backend: str, device: str = "cpu"):
    vals = attention_values(c)
    with torch_path("fused", c.many_blocks):
        got = _run_kl(c, vals, rapkern.attention_kl, c.dtype, False, device, backend=backend)
    ref = _run_kl(c, vals, rapkern.testing.reference_attention_kl, F64, True, device)
    low = _run_kl(c, vals, rapkern.testing.reference_attention_kl, c.dtype, True, device, compute_dtype=c.dtype)
    n = max(c.lq, c.lk)
    _assert_matches(got, ref, low, c.dtype, {"kl": (FLOOR, n)}, n)
    used = _side_roles(c.kind) + _side_roles(c.kind, "_s") + ["kpm"] + (["glse"] if c.reduction == "none" else [])
    _tally("attention_kl", backend, c.layouts, used, _case_sig(c) + f"|{c.reduction}")


@pytest.mark.skipif(not HAS_STATS, reason="rapkern.attention_stats not in this tree")
@pytest.mark.parametrize("backend,path", _params("stats_reasons") if HAS_STATS else [])
def test_attention_stats(backend, path):
    _skip_unavailable(backend)
    n, kw, device = _profile(backend, share=0.4)

    @fuzz(n)
    @given(c=attention_cases(**kw))
    def run(c):
        if _declined(c, "attention_stats", backend, device):
            reject()
        check_stats(c, backend, device)

    run()


@pytest.mark.skipif(not HAS_KL, reason="rapkern.attention_kl not in this tree")
@pytest.mark.parametrize("backend,path", _params("kl_reasons") if HAS_KL else [])
def test_attention_kl(backend, path):
    _skip_unavailable(backend)
    n, kw, device = _profile(backend, share=0.4)

    @fuzz(n)
    @given(c=attention_cases(**kw, student=True))
    def run(c):
        if _declined(c, "attention_kl", backend, device):
            reject()
        check_kl(c, backend, device)

    run()


# ----------------------------------------------------------------------------------------------------------
# rapkern.lda_route


def _probe_shared_table():
    """Whether lda_route takes 2-D centroids/answers shared by every group of a 3-D q (newer API)."""
    from rapkern.validate import check_route

    try:
        check_route(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(5, 2), tau=0.1, top_k=None, normalize=True)
    except ValueError:
        return False
    return True


HAS_CLUSTER_MASK = "cluster_mask" in inspect.signature(rapkern.lda_route).parameters
HAS_SHARED_TABLE = _probe_shared_table()


@dataclass(frozen=True)
class RouteCase:
    g: int | None
    n_q: int
    n: int
    d: int
    e: int
    tau: float
    tau_tensor: bool  # a 0-d tensor tau (it gets a gradient where the API differentiates it)
    top_k: int | None
    normalize: bool
    return_weights: bool
    mask: str  # cluster_mask: none | shared (n,) | per_group (G, n)
    shared_table: bool  # 2-D centroids/answers with a 3-D q
    dtype: torch.dtype
    many_blocks: bool
    seed: int
    layouts: dict = field(default_factory=dict, hash=False)


@st.composite
def route_cases(draw, dtypes, n_qs=(1, 5, 17, 33)):
    g = draw(st.sampled_from([None, 1, 2, 3]))
    n = draw(st.sampled_from([1, 3, 9, 13]))
    normalize = draw(st.booleans())
    masks = ["none"] + (["shared", "per_group"] if HAS_CLUSTER_MASK else [])
    mask = draw(st.sampled_from(masks if g is not None else masks[:2]))
    c = RouteCase(
        g=g, n_q=draw(st.sampled_from(n_qs)), n=n, d=draw(st.sampled_from([3, 8, 16])),
        e=draw(st.sampled_from([1, 4])), tau=0.1 if normalize else 1.0, tau_tensor=draw(st.booleans()),
        top_k=draw(st.sampled_from([None, 1, min(3, n), n])), normalize=normalize,
        return_weights=draw(st.booleans()), mask=mask,
        shared_table=g is not None and HAS_SHARED_TABLE and draw(st.booleans()), dtype=draw(st.sampled_from(dtypes)),
        many_blocks=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )
    rank = 2 if g is None else 3
    grp = () if g is None else (0,)
    trank, tgrp = (2, ()) if c.shared_table else (rank, grp)
    # no stride 0 along the clusters of centroids: duplicated centroids may tie one rounding step apart (README)
    lays = {"q": draw(layouts(rank, grp + (rank - 2,))), "centroids": draw(layouts(trank, tgrp)),
            "answers": draw(layouts(trank, tgrp + (trank - 2,))), "gout": draw(layouts(rank, tuple(range(rank)))),
            "gw": draw(layouts(rank, tuple(range(rank)))), "tau": draw(layouts(0))}
    if mask != "none":
        mrank = 1 if mask == "shared" else 2
        lays["cmask"] = draw(layouts(mrank, (0,) if mrank == 2 else ()))
    return replace(c, layouts=lays)


def route_values(c: RouteCase) -> dict:
    gen = helpers.gen(c.seed)
    lead = () if c.g is None else (c.g,)
    tlead = () if c.shared_table else lead

    def rnd(*s):
        return torch.randn(s, generator=gen, dtype=F64).to(c.dtype).to(F64)

    vals = {"q": rnd(*lead, c.n_q, c.d), "centroids": rnd(*tlead, c.n, c.d), "answers": rnd(*tlead, c.n, c.e),
            "gout": rnd(*lead, c.n_q, c.e), "gw": rnd(*lead, c.n_q, c.n if c.top_k is None else c.top_k)}
    if c.tau_tensor:
        vals["tau"] = torch.tensor(c.tau, dtype=F64).to(c.dtype).to(F64)
    if c.mask != "none":
        m = torch.rand(*(() if c.mask == "shared" else lead), c.n, generator=gen) < 0.3
        if c.seed % 5 == 0:
            m.view(-1, c.n)[0] = True  # a group (or the shared table) with no present cluster
        vals["cmask"] = m
    return vals


def _run_route(c: RouteCase, vals, fn, dtype, oracle, device, **kw):
    roles = ("q", "centroids", "answers", "tau", "cmask")
    leaves, ins = _leaves(c.layouts, vals, roles, dtype, lambda r: True, oracle, device)
    extra = {"cluster_mask": ins["cmask"]} if "cmask" in ins else {}
    res = fn(ins["q"], ins["centroids"], ins["answers"], tau=ins.get("tau", c.tau), top_k=c.top_k,
             normalize=c.normalize, return_weights=c.return_weights, **extra, **kw)
    outs = {"out": res}
    if c.return_weights:
        outs = {"out": res[0], "weights": res[1] if c.top_k is None else res[1][0]}
    _backward(c.layouts, vals, {"gout": outs["out"], **({"gw": outs["weights"]} if c.return_weights else {})},
              oracle, device)
    if c.return_weights and c.top_k is not None:
        outs["indices"] = res[1][1]
    return {k: v.detach() for k, v in outs.items()}, {r: t.grad for r, t in leaves.items()}, leaves


def _route_profile(backend):
    """(max examples, dtypes, device): Triton backends run through the interpreter on CPU (few examples)."""
    if backend.startswith("triton"):
        return N_EXAMPLES // 12, (torch.float32, torch.float16), TRITON_DEVICE
    return (N_EXAMPLES // 4 if backend == "reference" else N_EXAMPLES), TORCH_DTYPES, "cpu"


def _route_declined(c: RouteCase, backend, device) -> bool:
    from rapkern.validate import check_route

    _, ins = _leaves({}, route_values(c), ("q", "centroids", "answers", "tau", "cmask"), c.dtype, lambda r: True,
                     True, device)
    extra = {"cluster_mask": ins["cmask"]} if "cmask" in ins else {}
    p = check_route(ins["q"], ins["centroids"], ins["answers"], tau=ins.get("tau", c.tau), top_k=c.top_k,
                    normalize=c.normalize, **extra)
    return bool(dispatch.get(backend).route_reasons(p))


def check_route(c: RouteCase, backend: str, device: str = "cpu"):
    vals = route_values(c)
    env = {"RAPKERN_TORCH_TILE_MB": "0.000001", "RAPKERN_ROUTE_CLUSTER_BLOCK": "2"} if c.many_blocks else {}
    with mock.patch.dict(os.environ, env):
        got = _run_route(c, vals, rapkern.lda_route, c.dtype, False, device, backend=backend)
    ref = _run_route(c, vals, reference_lda_route, F64, True, device)
    low = _run_route(c, vals, reference_lda_route, c.dtype, True, device, compute_dtype=c.dtype)
    assert got[0]["out"].dtype == c.dtype and got[0]["out"].shape == ((c.g,) if c.g else ()) + (c.n_q, c.e)
    if "indices" in got[0]:
        assert torch.equal(got[0].pop("indices"), ref[0]["indices"]), "top-k indices differ from the reference"
    _assert_matches(got, ref, low, c.dtype, {"out": (FLOOR, 1), "weights": (FLOOR, 1)}, max(c.n_q, c.n))
    used = ["q", "centroids", "answers", "gout"] + (["gw"] if c.return_weights else []) + (
        ["tau"] if c.tau_tensor else []) + (["cmask"] if c.mask != "none" else [])
    sig = (f"G={c.g is not None}|shared_table={c.shared_table}|top_k={c.top_k is not None}|norm={c.normalize}"
           f"|weights={c.return_weights}|mask={c.mask}|tau_tensor={c.tau_tensor}")
    _tally("lda_route", backend, c.layouts, used, sig)


@pytest.mark.parametrize("backend", [
    pytest.param(b, marks=[pytest.mark.interpreter] if b.startswith("triton") else [])
    for b in _implements("route_reasons")])
def test_lda_route(backend):
    _skip_unavailable(backend)
    n, dtypes, device = _route_profile(backend)

    @fuzz(n)
    @given(c=route_cases(dtypes, n_qs=(1, 17, 40) if backend.startswith("triton") else (1, 5, 17, 33)))
    def run(c):
        if _route_declined(c, backend, device):
            reject()
        check_route(c, backend, device)

    run()


# ----------------------------------------------------------------------------------------------------------
# What this file must keep up with.

FUZZED_OPS = {"attention", "lda_route"} | ({"attention_stats"} if HAS_STATS else set()) | (
    {"attention_kl"} if HAS_KL else set())


def test_every_public_op_is_fuzzed():
    """Issue 8 asks for every public op, and each one added later: a new public function must get a fuzz test
    here (every backend implementing a fuzzed op is picked up through ``_implements``)."""
    ops = {n for n in rapkern.__all__ if inspect.isfunction(getattr(rapkern, n))}
    assert ops <= FUZZED_OPS, f"public ops not layout-fuzzed in tests/test_layouts.py: {sorted(ops - FUZZED_OPS)}"
