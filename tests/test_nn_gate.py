"""rapkern.nn.Gate: modes, head subsets (exact zeros, zero gradient), annealing schedules against their closed
forms, the step counter, the L2 penalty, bad arguments, and the nn.Module plumbing."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import rapkern
from rapkern.nn import Gate, LagPrior

F64 = torch.float64


def test_fixed_is_a_buffer():
    g = Gate(4, init=0.3)
    assert list(g.parameters()) == [] and "alpha" in dict(g.named_buffers())
    a = g()
    assert a.shape == (4,) and torch.equal(a, torch.full((4,), 0.3)) and not a.requires_grad


def test_learnable_is_a_parameter():
    g = Gate(4, init=0.3, mode="learnable")
    assert [n for n, _ in g.named_parameters()] == ["alpha"]
    assert g().requires_grad


def test_tensor_init_per_head():
    init = torch.tensor([0.1, -0.2, 0.3, 0.4], dtype=F64)
    g = Gate(4, init=init, mode="learnable")
    assert g.alpha.dtype == F64 and torch.equal(g().detach(), init)
    assert g.alpha.data_ptr() != init.data_ptr()


@pytest.mark.parametrize("mode", ["fixed", "learnable", "annealed"])
def test_heads_subset_exact_zeros(mode):
    kw = {"total_steps": 10} if mode == "annealed" else {}
    g = Gate(6, init=torch.arange(1.0, 7.0), mode=mode, heads=[1, 4], **kw)
    a = g()
    assert torch.equal(a, torch.tensor([0.0, 2.0, 0.0, 0.0, 5.0, 0.0]))
    assert "heads=[1, 4]" in repr(g)


def test_heads_subset_zero_gradient_through_attention():
    torch.manual_seed(0)
    g = Gate(4, init=0.5, mode="learnable", heads=(0, 2))
    prior = LagPrior(4, 3, init="alibi")
    q = torch.randn(2, 4, 9, 8)
    out = rapkern.attention(q, q, q, prior=prior(9, 9), alpha=g())
    out.square().sum().backward()
    grad = g.alpha.grad
    assert grad[1] == 0 and grad[3] == 0  # exactly
    assert grad[0] != 0 and grad[2] != 0


def test_unselected_heads_zero_gradient_even_with_nonfinite_upstream():
    g = Gate(3, init=1.0, mode="learnable", heads=[1])
    (g() * torch.tensor([float("inf"), 1.0, float("nan")])).sum().backward()
    assert g.alpha.grad.tolist() == [0.0, 1.0, 0.0]


def test_alpha_gets_gradient_with_subset_feeds_attention_per_head():
    """A gate with a subset behaves like rapkern.attention with alpha 0 on the other heads."""
    torch.manual_seed(1)
    g = Gate(4, init=0.7, heads=[3])
    prior = LagPrior(4, 2, init="alibi")(6, 6)
    q = torch.randn(1, 4, 6, 8)
    got = rapkern.attention(q, q, q, prior=prior, alpha=g())
    want = rapkern.attention(q, q, q, prior=prior, alpha=torch.tensor([0.0, 0.0, 0.0, 0.7]))
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------- schedules


def _closed_form(schedule, a, f, step, total, rate=5.0):
    t = min(step / total, 1.0)
    if schedule == "linear":
        s = 1.0 - t
    elif schedule == "cosine":
        s = 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        s = (math.exp(-rate * t) - math.exp(-rate)) / (1.0 - math.exp(-rate))
    return f + (a - f) * s


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exponential"])
@pytest.mark.parametrize("floor", [0.0, 0.05])
def test_schedule_values(schedule, floor):
    init = torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    total = 40
    g = Gate(3, init=init, mode="annealed", schedule=schedule, total_steps=total, floor=floor)
    for step in [0, 1, 7, 10, 20, 33, 39, 40, 41, 1000]:
        g.set_step(step)
        want = torch.tensor([_closed_form(schedule, float(a), floor, step, total) for a in init], dtype=F64)
        assert torch.allclose(g(), want, rtol=1e-14, atol=1e-15), (step, g(), want)
    g.set_step(0)
    assert torch.allclose(g(), init, rtol=1e-15, atol=0)
    g.set_step(total)
    assert torch.allclose(g(), torch.full((3,), floor, dtype=F64), rtol=0, atol=1e-15)


def test_schedule_landmarks():
    """Independent landmarks: halfway linear and cosine are both the midpoint; cosine is flatter at the ends."""
    kw = {"mode": "annealed", "total_steps": 100, "floor": 0.2, "dtype": F64}
    lin, cos = Gate(1, 1.0, schedule="linear", **kw), Gate(1, 1.0, schedule="cosine", **kw)
    exp = Gate(1, 1.0, schedule="exponential", rate=3.0, **kw)
    for g in (lin, cos, exp):
        g.set_step(50)
    assert float(lin()) == pytest.approx(0.6, abs=1e-15) and float(cos()) == pytest.approx(0.6, abs=1e-15)
    assert float(exp()) == pytest.approx(0.2 + 0.8 * (math.exp(-1.5) - math.exp(-3)) / (1 - math.exp(-3)), abs=1e-15)
    for g in (lin, cos):
        g.set_step(10)
    assert float(cos()) > float(lin())


def test_exponential_rate_changes_shape():
    a = Gate(1, 1.0, "annealed", schedule="exponential", total_steps=10, rate=1.0, dtype=F64)
    b = Gate(1, 1.0, "annealed", schedule="exponential", total_steps=10, rate=8.0, dtype=F64)
    a.set_step(3)
    b.set_step(3)
    assert float(b()) < float(a())
    assert "rate=8.0" in repr(b)


def test_floor_above_init_warms_up():
    g = Gate(2, 0.0, "annealed", schedule="linear", total_steps=4, floor=1.0, dtype=F64)
    values = []
    for _ in range(6):
        values.append(float(g()[0]))
        g.step()
    assert values == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_annealed_float32_and_bfloat16():
    g = Gate(2, 0.8, "annealed", schedule="cosine", total_steps=3)
    g.set_step(1)
    assert g().dtype == torch.float32
    assert torch.allclose(g(), torch.full((2,), 0.8 * 0.75), rtol=1e-6)  # cos(π/3) = 1/2
    gb = copy.deepcopy(g).to(torch.bfloat16)
    assert gb().dtype == torch.bfloat16 and torch.allclose(gb().float(), g(), rtol=1e-2)


# ---------------------------------------------------------------------------------------------- steps


def test_step_counter():
    g = Gate(2, 1.0, "annealed", total_steps=10)
    assert g.current_step == 0
    assert g.step() == 1 and g.step() == 2 and g.current_step == 2
    assert g.step(7) == 7 and g.current_step == 7
    assert g.set_step(0) == 0 and g.current_step == 0
    assert g.step_count.dtype == torch.long
    assert "step=0" in repr(g)


def test_step_in_every_mode_only_annealed_depends_on_it():
    for mode in ("fixed", "learnable"):
        g = Gate(2, 0.4, mode)
        before = g().detach().clone()
        g.step(100)
        assert g.current_step == 100 and torch.equal(g().detach(), before)


def test_bad_steps():
    g = Gate(2, 1.0, "annealed", total_steps=10)
    with pytest.raises(ValueError, match=r"step must be >= 0, got -1"):
        g.set_step(-1)
    with pytest.raises(ValueError, match=r"step must be >= 0, got -3"):
        g.step(-3)
    with pytest.raises(TypeError, match=r"step must be an int, got float"):
        g.step(2.0)
    assert g.current_step == 0


# ---------------------------------------------------------------------------------------------- penalty


def test_penalty_value_and_grad():
    init = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=F64)
    g = Gate(4, init=init, mode="learnable", heads=[0, 1, 2])
    p = g.penalty()
    assert float(p.detach()) == pytest.approx(0.25 + 1.0 + 4.0, abs=1e-15)
    p.backward()
    assert torch.equal(g.alpha.grad, torch.tensor([1.0, -2.0, 4.0, 0.0], dtype=F64))


def test_penalty_annealed_follows_schedule_without_grad():
    g = Gate(2, 1.0, "annealed", total_steps=4, dtype=F64)
    g.set_step(2)
    p = g.penalty()
    assert float(p) == pytest.approx(2 * 0.25, abs=1e-15) and not p.requires_grad


# ---------------------------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"num_heads": 0}, ValueError, r"num_heads must be >= 1, got 0"),
        ({"num_heads": 2.0}, TypeError, r"num_heads must be an int, got float"),
        ({"mode": "decay"}, ValueError, r"mode must be one of \('fixed', 'learnable', 'annealed'\), got 'decay'"),
        ({"schedule": "step"}, ValueError, r"schedule must be one of .*got 'step'"),
        ({"heads": [0, 4]}, ValueError, r"heads entries must be in \[0, num_heads\) = \[0, 4\), got 4"),
        ({"heads": [-1]}, ValueError, r"heads entries must be in \[0, num_heads\) = \[0, 4\), got -1"),
        ({"heads": [1, 1]}, ValueError, r"heads must not repeat an index, got \[1, 1\]"),
        ({"heads": [0.0]}, TypeError, r"heads must hold ints, got float"),
        ({"heads": 3}, TypeError, r"heads must be None or an iterable of head indices, got int"),
        ({"mode": "annealed"}, ValueError, r"total_steps is required with mode='annealed'"),
        ({"mode": "annealed", "total_steps": 0}, ValueError, r"total_steps must be >= 1, got 0"),
        ({"total_steps": 10}, ValueError, r"total_steps only applies to mode='annealed', got mode='fixed'"),
        ({"init": float("nan")}, ValueError, r"init must be finite, got nan"),
        ({"init": "0.1"}, TypeError, r"init must be a float, got str"),
        ({"init": torch.zeros(3)}, ValueError, r"init tensor must have shape \(num_heads,\) = \(4,\), got \(3,\)"),
        ({"init": torch.zeros(4, dtype=torch.long)}, TypeError, r"init tensor must be floating point"),
        ({"init": torch.tensor([0.0, 0.0, float("inf"), 0.0])}, ValueError, r"init tensor must be finite"),
        ({"floor": float("inf")}, ValueError, r"floor must be finite"),
        ({"rate": 0.0}, ValueError, r"rate must be > 0, got 0.0"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_arguments(kwargs, exc, match):
    kwargs = {"num_heads": 4, **kwargs}
    with pytest.raises(exc, match=match):
        Gate(**kwargs)


def test_boundary_arguments_pass():
    assert torch.equal(Gate(4, heads=[]).forward(), torch.zeros(4))
    assert torch.equal(Gate(4, 1.0, heads=torch.tensor([0, 3])).forward(), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    Gate(4, heads=range(4), mode="annealed", total_steps=1)


# ---------------------------------------------------------------------------------------------- plumbing


@pytest.mark.parametrize("mode", ["fixed", "learnable", "annealed"])
def test_state_dict_deepcopy_and_to(mode):
    kw = {"total_steps": 50, "schedule": "cosine"} if mode == "annealed" else {}
    g = Gate(4, init=torch.tensor([0.1, 0.2, 0.3, 0.4]), mode=mode, heads=[0, 2], **kw)
    g.set_step(17)
    fresh = Gate(4, init=0.9, mode=mode, **kw)
    fresh.load_state_dict(g.state_dict())
    assert fresh.current_step == 17 and torch.equal(fresh(), g())
    assert set(g.state_dict()) == {"alpha", "head_mask", "step_count"}

    clone = copy.deepcopy(g)
    clone.step()
    assert clone.current_step == 18 and g.current_step == 17

    g64 = copy.deepcopy(g).to(F64)
    assert g64().dtype == F64 and g64.step_count.dtype == torch.long and g64.head_mask.dtype == torch.bool
    assert torch.allclose(g64(), g().double(), rtol=1e-6)


def test_feeds_attention_as_alpha():
    g = Gate(4, 0.5, "annealed", heads=[0, 1], total_steps=8)
    q = torch.randn(2, 4, 10, 16)
    out = rapkern.attention(q, q, q, prior=LagPrior(4, 4, init="alibi")(10, 10), alpha=g())
    assert out.shape == q.shape
