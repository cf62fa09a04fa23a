"""Train a small attention model on (batch, window, features) series with a learnable lag prior on half the
heads and an annealed gate, logging each head's attention entropy; saves a plot of entropy over steps.

The data has a planted lag dependency: the target at step t is feature 0 of step t − LAG (plus a little
noise), so a head that learns to look LAG steps back solves the task. Heads 0..H/2−1 get the prior
α_h·table_h[i − j] (ALiBi-initialised, learnable); the gate anneals α from 1 to 0.5 with a cosine schedule,
so the prior guides early training and then loosens its hold (Q/K see learnable absolute positions, as in
seed 002). Heads H/2..H−1 stay free (α = 0). Entropy per head comes from the module's ``track_stats=True``
(``rapkern.attention_stats`` under the hood: no L×L weights are built).

    python examples/train_lag_prior.py                 # CPU, well under two minutes
    python examples/train_lag_prior.py --steps 20 --out /tmp/entropy.png
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

import rapkern.nn as rnn

LAG = 3  # the planted dependency
ALPHA_FLOOR = 0.5  # where the annealed gate ends
PRIOR_LR = 0.1  # the lag tables are a few numbers per head: they may move faster than the weights
HERE = Path(__file__).resolve().parent


def make_batch(batch: int, window: int, features: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x (batch, window, features) white noise; y[:, t] = x[:, t − LAG, 0] + noise (t ≥ LAG; earlier: 0)."""
    x = torch.randn(batch, window, features, generator=gen)
    y = torch.zeros(batch, window)
    y[:, LAG:] = x[:, :-LAG, 0] + 0.05 * torch.randn(batch, window - LAG, generator=gen)
    return x, y


class LagModel(nn.Module):
    """Input projection + learnable positions → one biased self-attention block → per-step regression."""

    def __init__(self, features: int, window: int, embed_dim: int, num_heads: int, max_lag: int, total_steps: int):
        super().__init__()
        self.inp = nn.Linear(features, embed_dim)
        self.pos = nn.Parameter(0.02 * torch.randn(window, embed_dim))  # learnable absolute positions (seed 002)
        self.attn = rnn.BiasedMultiheadAttention(
            embed_dim,
            num_heads,
            batch_first=True,
            prior=rnn.LagPrior(num_heads, max_lag, init="alibi"),
            gate=rnn.Gate(
                num_heads,
                init=1.0,
                mode="annealed",
                heads=range(num_heads // 2),
                schedule="cosine",
                total_steps=total_steps,
                floor=ALPHA_FLOOR,
            ),
            track_stats=True,  # keeps last_stats = (entropy (B, H, L), key_mass (B, H, L)), detached
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.ff = nn.Sequential(nn.Linear(embed_dim, 2 * embed_dim), nn.GELU(), nn.Linear(2 * embed_dim, embed_dim))
        self.out = nn.Linear(embed_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) + self.pos
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm(h + a)
        return self.out(h + self.ff(h)).squeeze(-1)


def train(steps: int, *, seed: int = 0, batch: int = 64, window: int = 32, features: int = 8, progress: bool = True):
    """Returns a dict of per-step losses, per-head entropies (steps, H), alphas (steps, H) and the model."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = LagModel(features, window, embed_dim=32, num_heads=4, max_lag=8, total_steps=steps)
    opt = torch.optim.Adam(
        [
            {"params": [p for n, p in model.named_parameters() if not n.startswith("attn.prior.")], "lr": 3e-3},
            {"params": model.attn.prior.parameters(), "lr": PRIOR_LR},
        ]
    )
    losses, entropies, alphas = [], [], []
    bar = range(steps)
    if progress:
        from tqdm import tqdm

        bar = tqdm(bar, desc="train", unit="step")
    for _ in bar:
        x, y = make_batch(batch, window, features, gen)
        pred = model(x)
        loss = nn.functional.mse_loss(pred[:, LAG:], y[:, LAG:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        alphas.append(model.attn.gate().detach().clone())
        model.attn.gate.step()  # advance the annealing schedule once per optimizer step
        losses.append(float(loss.detach()))
        entropies.append(model.attn.last_stats.entropy.mean(dim=(0, 2)))  # (H,): mean over batch and queries
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return {
        "loss": losses,
        "entropy": torch.stack(entropies),
        "alpha": torch.stack(alphas),
        "model": model,
        "window": window,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ent, alpha = result["entropy"], result["alpha"]
    heads = ent.shape[1]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    for h in range(heads):
        prior = bool(alpha[0, h] != 0)
        ax0.plot(ent[:, h], label=f"head {h} ({'lag prior' if prior else 'free'})", ls="-" if prior else "--")
    ax0.axhline(math.log(result["window"]), color="grey", lw=0.8, ls=":", label="uniform over the window")
    ax0.set(xlabel="step", ylabel="attention entropy (nats, mean over queries)", title="entropy per head")
    ax0.legend()
    ax1.plot(result["loss"], label="MSE loss")
    ax1.set(xlabel="step", ylabel="loss", yscale="log", title="training loss and gate α (prior heads)")
    ax2 = ax1.twinx()
    ax2.plot(alpha[:, 0], color="tab:red", label="α (heads with prior)")
    ax2.set_ylabel("α")
    lines = ax1.get_lines() + ax2.get_lines()
    ax1.legend(lines, [ln.get_label() for ln in lines], loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "train_lag_prior.png")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (tiny tensors: 1 is fastest)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    result = train(args.steps, seed=args.seed, progress=not args.no_progress)
    result["seconds"] = time.perf_counter() - t0
    plot(result, args.out)

    model, ent, loss = result["model"], result["entropy"], result["loss"]
    table = model.attn.prior.table.detach()
    w = model.attn.prior.max_lag
    k = max(1, min(10, len(loss) // 5))
    print(f"steps {args.steps}: loss {sum(loss[:k]) / k:.4f} (first {k}) -> {sum(loss[-k:]) / k:.4f} (last {k})")
    print(f"alpha of the prior heads: {float(result['alpha'][0, 0]):.3f} -> {float(result['alpha'][-1, 0]):.3f}")
    for h in range(ent.shape[1]):
        prior = bool(result["alpha"][0, h] != 0)
        line = f"head {h} ({'lag prior' if prior else 'free     '}): entropy {ent[0, h]:.3f} -> {ent[-1, h]:.3f}"
        if prior:
            line += f", learned table peaks at lag {int(table[h].argmax()) - w} (planted: {LAG})"
        print(line)
    print(f"trained in {result['seconds']:.1f} s; plot: {args.out}")
    return result


if __name__ == "__main__":
    main()
