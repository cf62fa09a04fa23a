"""Does a Rectified Attention Prior help? The seed's feasibility experiment, on a CPU.

    python examples/rap_experiment.py            # full run (about twenty minutes on an idle 2-core CPU)
    python examples/rap_experiment.py --quick    # seconds: tiny sizes, a smoke test of the whole pipeline

A small transformer (rapkern.attention in every block) is trained with no prior, the raw-correlation prior, the
RAP prior (fixed, learnable and annealed α; all heads and half of them; class-conditional vs unconditional score;
two sparsity levels), the full-cycle prior B_R and mode B (Q/K warm start), three seeds each, on a synthetic
threshold-and-lag task with collinear distractors, a control with no threshold structure, and two real data sets
bundled with aeon (JapaneseVowels, BasicMotions; one class against the rest). Priors are built on the training
split only (the builder's leakage guard holds the validation and test windows). Results (CSV, JSON, MD, PNG with
machine, versions, date and config) go to bench/results/rap_experiment-<date>.*; see rap_experiment/rx_*.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).with_suffix("")))  # the rx_* helper modules

import numpy as np  # noqa: E402
import rx_data  # noqa: E402
import rx_report  # noqa: E402
import torch  # noqa: E402
from rx_priors import build_priors  # noqa: E402
from rx_train import RunConfig, Variant, train_run, warmup  # noqa: E402

V = Variant
ALL_VARIANTS = [
    V("none"), V("raw_corr", "raw_corr"), V("rap", "rap"), V("rap_learnable", "rap", alpha="learnable"),
    V("rap_annealed", "rap", alpha="annealed"), V("rap_half_heads", "rap", heads="half"),
    V("rap_uncond", "rap_uncond"), V("rap_sparse", "rap_sparse"), V("full_cycle", "full_cycle"),
    V("mode_b", "rap", warm_start=True),
]
EVAL_EVERY = {"japanese_vowels": 5, "basic_motions": 5}  # small data sets converge in tens of steps
CORE = ["none", "raw_corr", "rap", "rap_learnable", "full_cycle", "mode_b"]
PLAN = {  # data set → variants (the ablations run where the seed expects an effect)
    "threshold_lag": [v.name for v in ALL_VARIANTS],
    "control": CORE,
    "japanese_vowels": CORE,
    "basic_motions": CORE,
}


def load(name: str, quick: bool, split_seed: int = 0) -> dict:
    """name → splits {train, val, test: (X, y, row ids)} as numpy, plus feature names."""
    if name in ("threshold_lag", "control"):
        n_tr, n_va, n_te = (160, 80, 80) if quick else (1200, 400, 1000)
        gen = rx_data.threshold_lag if name == "threshold_lag" else rx_data.control
        X, y, _ = gen(n_tr + n_va + n_te, T=12 if quick else 24, seed=123)
        cut = [0, n_tr, n_tr + n_va, n_tr + n_va + n_te]
        parts = {s: np.arange(cut[i], cut[i + 1]) for i, s in enumerate(("train", "val", "test"))}
        return {"splits": {s: (X[ix], y[ix], ix) for s, ix in parts.items()}, "features": rx_data.FEATURES}
    if name == "japanese_vowels":  # official split; validation = 25 % of the training file, stratified
        Xtr, ytr, Xte, yte = rx_data.aeon_one_vs_rest("JapaneseVowels", "1", T=20)
        feats = [f"lpc{i}" for i in range(Xtr.shape[2])]
        tr, va = rx_data.stratified_split(ytr, 0.25, split_seed)
        splits = {"train": (Xtr[tr], ytr[tr], tr), "val": (Xtr[va], ytr[va], va),
                  "test": (Xte, yte, np.arange(len(Xte)) + 10_000)}  # ids distinct from the train file's
        return {"splits": splits, "features": feats}
    # BasicMotions: 40 + 40 cases merged and split 50/25/25 stratified (the official 40-case test file would leave
    # 10 validation cases with 2 events); 100 steps mean-pooled by 4 to T = 25 to fit the CPU budget.
    Xa, ya, Xb, yb = rx_data.aeon_one_vs_rest("BasicMotions", "walking")
    X = np.concatenate([Xa, Xb]).reshape(len(Xa) + len(Xb), 25, 4, Xa.shape[2]).mean(2)
    y = np.concatenate([ya, yb])
    rest, te = rx_data.stratified_split(y, 0.25, split_seed)
    tr, va = rx_data.stratified_split(y[rest], 1 / 3, split_seed)
    tr, va = rest[tr], rest[va]
    splits = {s: (X[ix], y[ix], ix) for s, ix in (("train", tr), ("val", va), ("test", te))}
    return {"splits": splits, "features": ["accx", "accy", "accz", "gyrx", "gyry", "gyrz"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one seed, synthetic only (smoke test)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 3; 1 with --quick)")
    ap.add_argument("--datasets", default=None, help=f"comma-separated subset of {','.join(PLAN)}")
    ap.add_argument("--out", default="bench/results", help="folder for the result files")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the CPU is shared)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = args.seeds or (1 if args.quick else 3)
    names = args.datasets.split(",") if args.datasets else (["threshold_lag"] if args.quick else list(PLAN))
    bad = [n for n in names if n not in PLAN]
    if bad:
        ap.error(f"unknown data sets {bad}; choose from {list(PLAN)}")
    quick = dict(d=16, heads=2, ff=32, max_steps=6, min_steps=3, eval_every=3, patience=1, anneal_steps=6, warm_rank=2)
    cfg = RunConfig(**quick) if args.quick else RunConfig()
    variants = {v.name: v for v in ALL_VARIANTS}
    plan = {n: (["none", "rap_learnable", "mode_b"] if args.quick else PLAN[n]) for n in names}
    total = sum(len(v) for v in plan.values()) * seeds
    results, builds, shapes = [], {}, {}
    started = time.time()
    bar = rx_report.progress(total, disable=args.quick)
    for name in names:
        ds = load(name, args.quick)
        sp = ds["splits"]
        shapes[name] = {s: list(sp[s][0].shape) + [int(sp[s][1].sum())] for s in sp}
        needed = {variants[v].prior for v in plan[name] if variants[v].prior}
        priors, builds[name] = build_priors(sp, needed, ds["features"])
        data = {s: (torch.as_tensor(sp[s][0]), torch.as_tensor(sp[s][1])) for s in sp}
        dcfg = cfg if args.quick else replace(cfg, eval_every=EVAL_EVERY.get(name, cfg.eval_every))
        shapes[name]["eval_every"] = dcfg.eval_every
        warmup(data, priors, dcfg)
        for seed in range(seeds):  # seeds outside: a change in the machine's load hits every variant alike
            for vname in plan[name]:
                bar.set_postfix_str(f"{name}/{vname}/{seed}")
                r = train_run(data, priors, variants[vname], dcfg, seed)
                r["dataset"] = name
                results.append(r)
                bar.update(1)
    bar.close()
    paths = rx_report.write(results, builds, shapes, cfg, args, Path(args.out), time.time() - started)
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
