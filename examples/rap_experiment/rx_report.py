"""Tables, plot and result files of the RAP experiment (CSV per run, JSON with everything, MD summary, PNG).

Go/no-go quantities (the seed's): steps and training wall-clock until the validation AUC first reaches a target,
final test AUC (with a 95 % bootstrap interval over test windows of the seed-averaged AUC), F1 at the Youden's-J
threshold chosen on validation, Brier score, and the seed standard deviation of the test AUC. The target of a
data set is 95 % of the median best validation AUC of the no-prior baseline, so the baseline itself reaches it.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path

import numpy as np
import rx_metrics as M

TARGET_FRACTION = 0.95


def progress(total: int, disable: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, disable=disable, desc="runs", smoothing=0.1)
    except ImportError:  # no progress bar without the bench extra

        class _Bar:
            def __init__(self):
                self.n = 0

            def update(self, k):
                self.n += k
                if not disable:
                    print(f"run {self.n}/{total}", flush=True)

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass

        return _Bar()


def _to_target(curve, target):
    for step, secs, auc, _ in curve:
        if auc >= target:
            return step, secs
    return None, None


def _machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = None
    from importlib.metadata import PackageNotFoundError, version

    def ver(p):
        try:
            return version(p)
        except PackageNotFoundError:
            return None

    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg": list(os.getloadavg()), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "numpy": np.__version__,
            "cutlass": ver("cutlass"), "aeon": ver("aeon"), "rapkern": ver("rapkern"), "git": rev}


def summarize(results: list[dict]) -> tuple[list[dict], dict]:
    """Per (data set, variant) rows, and the target per data set; adds steps/time to target to each run."""
    targets = {}
    for ds in dict.fromkeys(r["dataset"] for r in results):
        base = [max(c[2] for c in r["curve"]) for r in results if r["dataset"] == ds and r["variant"] == "none"]
        targets[ds] = TARGET_FRACTION * float(np.median(base)) if base else float("nan")
    for r in results:
        r["steps_to_target"], r["time_to_target"] = _to_target(r["curve"], targets[r["dataset"]])
    rows = []
    for ds in targets:
        yte = None
        for vname in dict.fromkeys(r["variant"] for r in results if r["dataset"] == ds):
            rs = [r for r in results if r["dataset"] == ds and r["variant"] == vname]
            reached = [r for r in rs if r["steps_to_target"] is not None]
            aucs = np.array([r["test_auc"] for r in rs])
            yte = np.asarray(rs[0]["y_test"])
            lo, hi = M.bootstrap_mean_auc(yte, [np.asarray(r["test_prob"]) for r in rs]) if len(rs) else (None, None)
            med = lambda k, rr=reached: float(np.median([r[k] for r in rr])) if rr else None  # noqa: E731
            rows.append({
                "dataset": ds, "variant": vname, "seeds": len(rs), "target_val_auc": round(targets[ds], 4),
                "reached": f"{len(reached)}/{len(rs)}", "steps_to_target": med("steps_to_target"),
                "time_to_target_s": med("time_to_target"), "steps_run": float(np.median([r["steps"] for r in rs])),
                "test_auc": float(aucs.mean()), "test_auc_ci95": [lo, hi], "test_auc_sd": float(aucs.std(ddof=1))
                if len(rs) > 1 else 0.0, "test_f1": float(np.mean([r["test_f1"] for r in rs])),
                "test_brier": float(np.mean([r["test_brier"] for r in rs])),
                "qk_corr_random": _mean_of(rs, "qk_corr_random"), "qk_corr_warm": _mean_of(rs, "qk_corr_warm"),
            })
    for ds in targets:  # relative to the baseline, the seed's "10-20 % less wall-clock" criterion
        base = next((r for r in rows if r["dataset"] == ds and r["variant"] == "none"), None)
        for r in rows:
            if r["dataset"] != ds:
                continue
            ok = base and base["time_to_target_s"] and r["time_to_target_s"] is not None
            r["time_vs_none"] = r["time_to_target_s"] / base["time_to_target_s"] if ok else None
            ok = base and base["steps_to_target"] and r["steps_to_target"] is not None
            r["steps_vs_none"] = r["steps_to_target"] / base["steps_to_target"] if ok else None
    return rows, targets


def _mean_of(rs, key):
    vals = [np.mean(r[key]) for r in rs if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def _fmt(x, nd=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def markdown(rows, meta, builds, shapes) -> str:
    out = [f"# RAP experiment ({meta['date']})", "",
           f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, {meta['machine']['threads']} torch "
           f"thread(s), load average at the end {meta['machine']['load_avg']}; torch {meta['machine']['torch']}, "
           f"cutlass {meta['machine']['cutlass']}, aeon {meta['machine']['aeon']}, git {meta['machine']['git']}. "
           f"Wall time {meta['elapsed_s'] / 60:.1f} min. Config: {meta['config']}.", ""]
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        sub = [r for r in rows if r["dataset"] == ds]
        sh = shapes[ds]
        out += [f"## {ds}", "",
                f"train/val/test windows (n, T, features, events): {sh['train']} / {sh['val']} / {sh['test']}; "
                f"validation every {sh.get('eval_every', '?')} steps; target val AUC "
                f"{sub[0]['target_val_auc']:.3f} (95 % of the no-prior median best).", "",
                "| variant | reached | steps to target | × none | train s to target | × none | test AUC (95 % CI) "
                "| seed sd | F1 @ J | Brier |", "|" + " --- |" * 10]
        for r in sub:
            lo, hi = r["test_auc_ci95"]
            out.append(f"| {r['variant']} | {r['reached']} | {_fmt(r['steps_to_target'], 0)} | "
                       f"{_fmt(r['steps_vs_none'], 2)} | {_fmt(r['time_to_target_s'], 1)} | "
                       f"{_fmt(r['time_vs_none'], 2)} | "
                       f"{r['test_auc']:.3f} ({_fmt(lo)}–{_fmt(hi)}) | {r['test_auc_sd']:.3f} | {r['test_f1']:.3f} | "
                       f"{r['test_brier']:.3f} |")
        mb = next((r for r in sub if r["variant"] == "mode_b"), None)
        if mb and mb["qk_corr_warm"] is not None:
            out += ["", f"Mode B: correlation of the first layer's initial logits with the prior on validation windows "
                        f"{mb['qk_corr_warm']:.3f} after the warm start vs {mb['qk_corr_random']:.3f} at random init."]
        b = builds[ds]
        out += ["", "Priors (T × T, top 25 % of entries unless noted): " + "; ".join(
            f"{k}: strongest off-diagonal pair {v['top_pair']}, lag-prior peak (≠ 0) {v['top_nonzero_lag']}, "
            f"built in {v['build_s']:.2f} s" for k, v in b.items()), ""]
    return "\n".join(out) + "\n"


def plot(results, rows, targets, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    dss = list(targets)
    fig, axes = plt.subplots(2, len(dss), figsize=(5 * len(dss), 8), squeeze=False)
    for c, ds in enumerate(dss):
        ax = axes[0, c]
        for vname in dict.fromkeys(r["variant"] for r in results if r["dataset"] == ds):
            curves = [np.array(r["curve"]) for r in results if r["dataset"] == ds and r["variant"] == vname]
            n = min(len(cv) for cv in curves)
            mean = np.mean([cv[:n, 2] for cv in curves], axis=0)
            ax.plot(curves[0][:n, 0], mean, label=vname, lw=2.2 if vname in ("none", "rap") else 1.0,
                    ls="-" if vname.startswith(("rap", "none")) else "--")
        ax.axhline(targets[ds], color="k", lw=0.6, ls=":")
        ax.set_title(f"{ds}: validation AUC (mean of seeds)")
        ax.set_xlabel("step")
        ax.set_ylim(max(0.4, min(ax.get_ylim()[0], targets[ds] - 0.15)), 1.0)
        if c == 0:
            ax.legend(fontsize=7)
        ax = axes[1, c]
        sub = [r for r in rows if r["dataset"] == ds]
        for i, r in enumerate(sub):
            pts = [x["test_auc"] for x in results if x["dataset"] == ds and x["variant"] == r["variant"]]
            ax.scatter([i] * len(pts), pts, s=12, color="gray")
            lo, hi = r["test_auc_ci95"]
            ax.errorbar([i], [r["test_auc"]], yerr=[[r["test_auc"] - lo], [hi - r["test_auc"]]], fmt="o", color="C0")
        ax.set_xticks(range(len(sub)), [r["variant"] for r in sub], rotation=60, fontsize=7)
        ax.set_title("test AUC: seeds (gray), mean and 95 % bootstrap CI")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return _clean(x.item())
    return x


def write(results, builds, shapes, cfg, args, out: Path, elapsed: float) -> list[Path]:
    rows, targets = summarize(results)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = out / f"rap_experiment-{'quick-' if args.quick else ''}{stamp}"
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": _machine(), "config": asdict(cfg),
            "args": vars(args), "elapsed_s": round(elapsed, 1), "target_fraction": TARGET_FRACTION}
    run_keys = ["dataset", "variant", "seed", "steps", "train_s", "steps_to_target", "time_to_target", "test_auc",
                "test_f1", "test_brier", "val_auc_best"]
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(run_keys)
        for r in results:
            w.writerow([_fmt(r[k], 4) if isinstance(r[k], float) else r[k] for k in run_keys])
    slim = [{k: v for k, v in r.items() if k not in ("test_prob", "y_test")} for r in results]
    payload = {"meta": meta, "summary": rows, "targets": targets, "data": shapes, "priors": builds, "runs": slim}
    Path(f"{stem}.json").write_text(json.dumps(_clean(payload), indent=1))
    Path(f"{stem}.md").write_text(markdown(rows, meta, builds, shapes))
    paths = [Path(f"{stem}.{e}") for e in ("csv", "json", "md")]
    if plot(results, rows, targets, Path(f"{stem}.png")):
        paths.append(Path(f"{stem}.png"))
    return paths
