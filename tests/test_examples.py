"""Smoke tests of the scripts in examples/: each runs with a tiny step count and produces its output."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_lag_prior(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    ex = _load("train_lag_prior")
    out = tmp_path / "entropy.png"
    steps = 12
    result = ex.main(["--steps", str(steps), "--out", str(out)])

    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    loss = result["loss"]
    assert len(loss) == steps and sum(loss[-3:]) / 3 < 0.9 * sum(loss[:3]) / 3
    assert result["entropy"].shape == (steps, 4)
    alpha = result["alpha"]
    assert alpha[0].tolist() == [1.0, 1.0, 0.0, 0.0]  # annealed gate on the first half of the heads
    assert 0.5 < float(alpha[-1, 0]) < 1.0 and alpha[-1, 0] < alpha[0, 0]
    table = result["model"].attn.prior.table.detach()
    init = ex.rnn.LagPrior(4, 8, init="alibi").table.detach()
    assert float((table[:2] - init[:2]).abs().max()) > 0.1  # the prior heads' tables trained
    assert table[2:].equal(init[2:])  # the free heads' rows got exactly zero gradient, so Adam left them alone
    assert "loss" in capsys.readouterr().out
