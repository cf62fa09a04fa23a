"""One training run: a variant (prior source, α schedule, heads, warm start) on one data set and seed.

Training stops on a cut condition, not a step count: validation loss (checked every ``eval_every`` steps) has
not improved for ``patience`` checks after ``min_steps``, or ``max_steps`` is reached. The test split is scored
once, at the checkpoint with the lowest validation loss. Wall-clock counts training steps only (not evaluation).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import rx_metrics as M
import torch
import torch.nn.functional as F
from rx_model import EventTransformer

from rapkern.build import qk_prior_correlation, warm_start_qk


@dataclass(frozen=True)
class Variant:
    name: str
    prior: str | None = None  # key of the prior matrix (None: no bias)
    alpha: str = "fixed"  # fixed | learnable | annealed
    heads: str = "all"  # all | half (the other half stays free: α = 0)
    warm_start: bool = False  # mode B: W_Q/W_K from the prior, no additive bias


@dataclass
class RunConfig:
    d: int = 32
    heads: int = 4
    layers: int = 2
    ff: int = 64
    dropout: float = 0.1
    lr: float = 3e-3
    batch: int = 64
    alpha0: float = 1.0
    anneal_steps: int = 300
    warm_rank: int = 4
    eval_every: int = 10
    patience: int = 10
    min_steps: int = 150
    max_steps: int = 1000


def _alpha_vector(v: Variant, cfg: RunConfig) -> torch.Tensor:
    a = torch.full((cfg.heads,), cfg.alpha0)
    if v.heads == "half":
        a[cfg.heads // 2:] = 0.0
    return a


def _predict(model, X, prior, alpha, batch=512):
    model.eval()
    with torch.no_grad():
        z = torch.cat([model(X[i:i + batch], prior, alpha) for i in range(0, len(X), batch)])
    model.train()
    return z


def train_run(data: dict, priors: dict, v: Variant, cfg: RunConfig, seed: int) -> dict:
    """data: X/y for train, val, test (tensors); priors: name → (T, T) float32 prior matrix."""
    torch.manual_seed(seed)
    g = np.random.default_rng(seed)
    Xtr, ytr = data["train"]
    Xva, yva = data["val"]
    Xte, yte = data["test"]
    T, Fdim = Xtr.shape[1:]
    model = EventTransformer(Fdim, T, d=cfg.d, heads=cfg.heads, layers=cfg.layers, ff=cfg.ff, dropout=cfg.dropout)
    params = list(model.parameters())
    B = None if v.prior is None else priors[v.prior]
    info: dict = {}
    if v.warm_start:
        sub = Xtr[torch.as_tensor(g.permutation(len(Xtr))[:512])]
        info["qk_corr_random"] = qk_prior_correlation(model.blocks[0].attn, B, model.attention_inputs(Xva, 0))
        for layer, blk in enumerate(model.blocks):
            rep = warm_start_qk(blk.attn, B, cfg.warm_rank, model.attention_inputs(sub, layer), gain=cfg.alpha0)
            info.setdefault("warm_r2_q", []).append(float(np.mean(rep["r2_q"])))
        info["qk_corr_warm"] = qk_prior_correlation(model.blocks[0].attn, B, model.attention_inputs(Xva, 0))
        B = None  # mode B: the prior lives in W_Q/W_K only
    prior = None if B is None else _dense(B)
    alphas = None
    if prior is not None:
        base = _alpha_vector(v, cfg)
        if v.alpha == "learnable":
            alphas = [torch.nn.Parameter(base.clone()) for _ in model.blocks]
            params += alphas
        else:
            alphas = [base.clone() for _ in model.blocks]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    step, train_s, best_loss, best_state, bad = 0, 0.0, np.inf, None, 0
    curve = []
    done = False
    while not done:
        perm = torch.as_tensor(g.permutation(len(Xtr)))
        for i in range(0, len(Xtr), cfg.batch):
            t0 = time.perf_counter()
            if v.alpha == "annealed" and alphas is not None:
                f = max(0.0, 1.0 - step / cfg.anneal_steps)
                alphas = [_alpha_vector(v, cfg) * f for _ in model.blocks]
            idx = perm[i:i + cfg.batch]
            loss = F.binary_cross_entropy_with_logits(model(Xtr[idx], prior, alphas), ytr[idx].float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            train_s += time.perf_counter() - t0
            if step % cfg.eval_every == 0:
                z = _predict(model, Xva, prior, alphas)
                vloss = float(F.binary_cross_entropy_with_logits(z, yva.float()))
                curve.append((step, round(train_s, 4), M.auc(yva.numpy(), z.numpy()), vloss))
                if vloss < best_loss - 1e-4:
                    best_loss, bad = vloss, 0
                    best_state = (copy.deepcopy(model.state_dict()), [a.detach().clone() for a in alphas or []])
                else:
                    bad += 1
                if (step >= cfg.min_steps and bad >= cfg.patience) or step >= cfg.max_steps:
                    done = True
                    break
    model.load_state_dict(best_state[0])
    best_alphas = best_state[1] or None
    pva = torch.sigmoid(_predict(model, Xva, prior, best_alphas)).numpy()
    pte = torch.sigmoid(_predict(model, Xte, prior, best_alphas)).numpy()
    thr = M.youden_threshold(yva.numpy(), pva)
    return {
        "variant": v.name, "seed": seed, "steps": step, "train_s": train_s, "curve": curve,
        "test_auc": M.auc(yte.numpy(), pte), "test_f1": M.f1(yte.numpy(), pte >= thr),
        "test_brier": M.brier(yte.numpy(), pte), "val_auc_best": M.auc(yva.numpy(), pva),
        "alpha_final": [a.tolist() for a in best_alphas] if best_alphas and v.alpha == "learnable" else None,
        "test_prob": pte.tolist(), "y_test": yte.tolist(), **info,
    }


def warmup(data: dict, priors: dict, cfg: RunConfig, steps: int = 3) -> None:
    """Untimed steps through every attention path (no prior, fixed and learnable α) so that one-time costs
    (allocator, first calls) do not land on whichever run comes first."""
    X, y = data["train"]
    model = EventTransformer(X.shape[2], X.shape[1], d=cfg.d, heads=cfg.heads, layers=cfg.layers, ff=cfg.ff)
    B = _dense(next(iter(priors.values()))) if priors else None
    alpha = [torch.nn.Parameter(torch.ones(cfg.heads)) for _ in model.blocks]
    for prior, a in ((None, None), (B, [x.detach() for x in alpha]), (B, alpha)):
        if prior is None and a is not None:
            continue
        for _ in range(steps):
            F.binary_cross_entropy_with_logits(model(X[: cfg.batch], prior, a), y[: cfg.batch].float()).backward()


def _dense(B):
    import rapkern

    return rapkern.DensePrior(torch.as_tensor(B, dtype=torch.float32))
