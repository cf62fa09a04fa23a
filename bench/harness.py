"""The shared benchmark harness: timing, peak memory, FLOP model, machine metadata, isolation, output.

Every op script (attention.py, routing.py, memory.py, ...) describes *jobs* (one provider on one config)
and hands them to :func:`run_jobs`, which measures each and returns one result row per job. A row is a
flat dict; every row carries the machine and library versions, so a CSV line is self-describing.

* GPU: jobs run in-process; time with ``triton.testing.do_bench`` (median and 20/80 % quantiles), peak
  memory is ``torch.cuda.max_memory_allocated`` above what was allocated before the timed call.
* CPU: every job runs in a fresh child process (forked from a forkserver that preloaded torch) under an
  address-space cap (RLIMIT_AS), so a provider that materializes L x L fails with an allocation error
  (recorded as ``oom``) instead of taking the shared machine down. Time is repeated wall clock (median,
  quantiles); peak memory is the child's peak RSS (VmHWM, reset through /proc/self/clear_refs after
  warm-up) above its RSS before the timed calls: the *peak extra memory* of the op.

A job that fails is recorded with ``status`` (error, oom, unavailable, skipped, crashed, timeout) and the
error text, never as a silent NaN.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUANTILES = (0.5, 0.2, 0.8)

STATUS_OK = "ok"


class Unavailable(Exception):
    """A provider that cannot run this config (recorded with its reason, not as an error)."""


class Skipped(Exception):
    """A job deliberately not run (predicted memory over the cap, time budget spent, ...)."""


# ----------------------------------------------------------------------------------------------------
# Machine description


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def ram_gb() -> float:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return float("nan")


def mem_available_bytes() -> int:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return ""


def _driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info(device: str) -> dict:
    """Everything a result row must carry about where and with what it was measured."""
    import torch

    try:
        import triton

        triton_v = triton.__version__
    except Exception as e:  # noqa: BLE001  (triton is optional on CPU-only machines)
        triton_v = f"unavailable ({type(e).__name__})"
    try:
        import rapkern

        rapkern_v = rapkern.__version__
    except Exception as e:  # noqa: BLE001
        rapkern_v = f"unavailable ({e})"
    git = ""
    try:
        root = Path(__file__).resolve().parent.parent
        run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, timeout=10, cwd=root)  # noqa: E731
        git = run("rev-parse", "--short", "HEAD").stdout.strip()
        if git and run("status", "--porcelain", "--", "rapkern").stdout.strip():
            git += "+dirty"  # the measured rapkern differs from the commit
    except (OSError, subprocess.SubprocessError):
        pass
    info = {
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": ram_gb(),
        "driver": _driver_version() if device == "cuda" else "",
        "torch": torch.__version__,
        "triton": triton_v,
        "rapkern": rapkern_v,
        "git": git,
        "python": platform.python_version(),
        "host": platform.node(),
        "load_avg_start": load_avg(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info["gpu_mem_gb"] = round(p.total_memory / 2**30, 1)
        info["sm_count"] = p.multi_processor_count
    return info


def detect_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------------
# FLOP model


def visible_pairs(lq: int, lk: int, causal: bool = False, band: int | None = None) -> int:
    """Exact number of (query, key) pairs a kernel must compute.

    ``causal``: key j <= query i. ``band``: |j - i| <= band (a banded prior with mask_outside: only the
    band counts). Without either this is Lq·Lk; causal alone gives ~½ of it.
    """
    total = 0
    for i in range(lq):
        lo = 0 if band is None else max(0, i - band)
        hi = lk - 1 if band is None else min(lk - 1, i + band)
        if causal:
            hi = min(hi, i)
        total += max(0, hi - lo + 1)
    return total


_PAIRS_CACHE: dict = {}


def attention_flops(b, h, lq, lk, d, dv=None, *, causal=False, band=None, mode="fwd") -> float:
    """Forward 4·B·H·Lq·Lk·D (2·(D + Dv) in general), causal ½, banded only the band; backward 2.5x."""
    dv = d if dv is None else dv
    key = (lq, lk, causal, band)
    if key not in _PAIRS_CACHE:
        _PAIRS_CACHE[key] = visible_pairs(lq, lk, causal, band)
    fwd = 2.0 * b * h * _PAIRS_CACHE[key] * (d + dv)
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def route_flops(g, n_queries, n_clusters, d, e, *, top_k=None, mode="fwd") -> float:
    """Scores 2·G·N·n·d plus the mix 2·G·N·k·e (k = n when dense); backward 2x (two matmuls each)."""
    k = n_clusters if top_k is None else top_k
    fwd = 2.0 * g * n_queries * (n_clusters * d + k * e)
    return fwd * {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}[mode]


# ----------------------------------------------------------------------------------------------------
# Timing and memory inside one process


def _proc_status() -> dict:
    out = {}
    for line in _read("/proc/self/status").splitlines():
        if line.startswith(("VmHWM", "VmRSS", "VmSize")):
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
    return out


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so warm-up allocations do not hide the next peak."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Measurement:
    times_ms: list = field(default_factory=list)
    median_ms: float = float("nan")
    p20_ms: float = float("nan")
    p80_ms: float = float("nan")
    peak_mem_mb: float = float("nan")
    warmup_s: float = float("nan")


def _quantile(xs, q):
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def measure(fn: Callable, device: str, *, grad_to_none=None, cpu_min_reps=3, cpu_max_reps=20,
            cpu_min_time_s=1.0, gpu_warmup_ms=25, gpu_rep_ms=100, gpu_slow_ms=250.0,
            memory_only=False) -> Measurement:
    """Warm up ``fn`` (compile time goes to ``warmup_s``), then peak memory of one call, then timing.

    ``memory_only``: one measured call, its wall time (synchronized) as the only sample.
    """
    import torch

    m = Measurement()

    def clear_grads():
        for t in grad_to_none or ():
            t.grad = None

    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    m.warmup_s = time.perf_counter() - t0
    clear_grads()

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        m.peak_mem_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        clear_grads()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        one_ms = (time.perf_counter() - t0) * 1e3
        clear_grads()
        if memory_only:
            m.times_ms = [one_ms]
            m.median_ms = m.p20_ms = m.p80_ms = one_ms
            return m
        if one_ms > gpu_slow_ms:  # do_bench would spend >= 7 calls estimating; 3 event-timed calls do
            for _ in range(3):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                clear_grads()
                m.times_ms.append(start.elapsed_time(end))
            m.median_ms = statistics.median(m.times_ms)
            m.p20_ms, m.p80_ms = _quantile(m.times_ms, 0.2), _quantile(m.times_ms, 0.8)
            return m
        import triton.testing

        qs = triton.testing.do_bench(
            fn, warmup=gpu_warmup_ms, rep=gpu_rep_ms, grad_to_none=grad_to_none, quantiles=list(QUANTILES)
        )
        m.median_ms, m.p20_ms, m.p80_ms = (float(x) for x in qs)
        return m

    reset_ok = _reset_peak_rss()
    base = _proc_status().get("VmRSS", 0)
    elapsed = 0.0
    if memory_only:
        cpu_min_reps, cpu_max_reps, cpu_min_time_s = 1, 1, 0.0
    while len(m.times_ms) < cpu_max_reps and (len(m.times_ms) < cpu_min_reps or elapsed < cpu_min_time_s):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        clear_grads()
        m.times_ms.append(dt * 1e3)
        elapsed += dt
    peak = _proc_status().get("VmHWM", 0)
    # Without clear_refs the high-water mark still holds the warm-up (compile) peak: an upper bound.
    m.peak_mem_mb = max(peak - base, 0) / 2**20 if reset_ok else float("nan")
    m.median_ms = statistics.median(m.times_ms)
    m.p20_ms, m.p80_ms = _quantile(m.times_ms, 0.2), _quantile(m.times_ms, 0.8)
    return m


def is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    try:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
    except Exception:  # noqa: BLE001
        pass
    msg = str(e).lower()
    return any(s in msg for s in ("out of memory", "can't allocate memory", "cannot allocate memory",
                                  "failed to allocate", "std::bad_alloc"))


def short_error(e: BaseException, limit: int = 400) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " | ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------
# Running jobs


@dataclass
class Job:
    """One provider on one config. ``runner`` is ``module:function`` taking (job_dict, opts) -> row dict."""

    runner: str
    params: dict
    timeout_s: float = 900.0


def _resolve(runner: str) -> Callable:
    mod, fn = runner.split(":")
    import importlib

    return getattr(importlib.import_module(mod), fn)


def run_one(job: Job, opts: dict) -> dict:
    """Run a job in this process, turning every failure into a recorded status."""
    try:
        row = _resolve(job.runner)(dict(job.params), dict(opts))
        row.setdefault("status", STATUS_OK)
        return row
    except Unavailable as e:
        return {"status": "unavailable", "error": str(e)}
    except Skipped as e:
        return {"status": "skipped", "error": str(e)}
    except NotImplementedError as e:  # valid input the provider does not support (e.g. Flex backward on CPU)
        return {"status": "unavailable", "error": short_error(e)}
    except BaseException as e:  # noqa: BLE001  (a provider's failure is data, not a crash of the suite)
        if isinstance(e, KeyboardInterrupt):
            raise
        status = "oom" if is_oom(e) else "error"
        if opts.get("verbose"):
            traceback.print_exc()
        return {"status": status, "error": short_error(e)}
    finally:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass


def _child(conn, job: Job, opts: dict, cap_bytes: int | None, threads: int | None) -> None:
    # Everything the child needs before the cap: imports and the address space they map.
    import resource

    import torch

    import rapkern  # noqa: F401

    if threads:
        torch.set_num_threads(threads)
    if cap_bytes:
        vm = _proc_status().get("VmSize", 0)
        limit = vm + cap_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    row = run_one(job, opts)
    row["threads"] = torch.get_num_threads()
    conn.send(row)
    conn.close()


_CTX = None


def _context():
    """A forkserver that has imported torch and rapkern once: each job's child starts in milliseconds
    instead of re-importing (seconds), and still starts clean (no parent threads, no parent tensors)."""
    global _CTX
    if _CTX is None:
        try:
            _CTX = mp.get_context("forkserver")
            _CTX.set_forkserver_preload(["torch", "rapkern", "bench.harness", "bench.providers"])
        except ValueError:  # no forkserver on this platform
            _CTX = mp.get_context("spawn")
    return _CTX


def run_isolated(job: Job, opts: dict, cap_bytes: int | None, threads: int | None = None) -> dict:
    """Run a job in a fresh child process under an address-space cap; a dead child is recorded too."""
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(send, job, opts, cap_bytes, threads), daemon=True)
    p.start()
    send.close()
    row = None
    if recv.poll(job.timeout_s):
        try:
            row = recv.recv()
        except EOFError:
            row = None
    p.join(10 if row is not None else 0.1)
    if p.is_alive():
        p.kill()
        p.join()
        if row is None:
            return {"status": "timeout", "error": f"no result within {job.timeout_s:.0f} s (child killed)"}
    if row is None:
        code = p.exitcode
        why = "killed by signal %d%s" % (-code, " (likely out of memory)" if code == -9 else "") if code and code < 0 \
            else f"exit code {code}"
        return {"status": "oom" if code == -9 else "crashed", "error": f"child process died: {why}"}
    return row


def default_cap_bytes() -> int:
    """Address-space cap for one CPU job: $RAPKERN_BENCH_CAP_GB, else min(12 GB, 60% of available RAM)."""
    env = os.environ.get("RAPKERN_BENCH_CAP_GB")
    if env:
        return int(float(env) * 2**30)
    return int(min(12 * 2**30, 0.6 * mem_available_bytes() or 12 * 2**30))


def run_jobs(jobs: list[Job], opts: dict, *, device: str, isolate: bool | None = None, cap_bytes=None,
             csv_path: Path | None = None, meta: dict | None = None, desc: str = "bench",
             deadline: float | None = None, stop_after_oom_key: Callable | None = None,
             precheck: Callable | None = None) -> list[dict]:
    """Measure every job, with a progress bar; rows are appended to ``csv_path`` as they come.

    ``deadline`` (time.monotonic() value): jobs not started by then are recorded as skipped.
    ``stop_after_oom_key(params)``: jobs sharing a key with an earlier OOM are skipped (memory sweeps).
    ``precheck(params, device)``: a reason string records the job as unavailable without starting a child.
    """
    isolate = (device == "cpu") if isolate is None else isolate
    if isolate and cap_bytes is None:
        cap_bytes = default_cap_bytes()
    opts = dict(opts, device=device, cap_bytes=cap_bytes)
    rows = []
    oomed: dict = {}
    poisoned = None  # in-process CUDA: after an illegal access / device assert the context is unusable
    bar = _progress(len(jobs), desc)
    for job in jobs:
        bar.set_postfix_str(_label(job.params), refresh=True)
        key = stop_after_oom_key(job.params) if stop_after_oom_key else None
        why = precheck(job.params, device) if precheck else None
        if why:
            res = {"status": "unavailable", "error": why}
        elif poisoned:
            res = {"status": "skipped", "error": poisoned}
        elif deadline is not None and time.monotonic() > deadline:
            res = {"status": "skipped", "error": "time budget spent before this job started"}
        elif key is not None and key in oomed:
            res = {"status": "skipped", "error": f"skipped after out of memory at {oomed[key]}"}
        elif isolate:
            res = run_isolated(job, opts, cap_bytes, opts.get("threads"))
        else:
            res = run_one(job, opts)
        if not isolate and device == "cuda" and _sticky_cuda_error(res.get("error", "")):
            poisoned = f"CUDA context unusable after {job.params.get('provider')} failed: {res['error'][:120]}"
        if key is not None and res.get("status") == "oom" and key not in oomed:
            oomed[key] = f"L={job.params.get('L', '?')}"
        row = {**(meta or {}), **job.params, **res, "load_avg": load_avg()}
        if isolate and cap_bytes:
            row["mem_cap_gb"] = round(cap_bytes / 2**30, 1)
        rows.append(row)
        if csv_path is not None:
            append_csv(csv_path, row)
        bar.update(1)
    bar.close()
    return rows


def _sticky_cuda_error(err: str) -> bool:
    e = str(err).lower()
    return any(s in e for s in ("illegal memory access", "illegal instruction", "device-side assert",
                                "unspecified launch failure", "misaligned address"))


def _label(params: dict) -> str:
    keys = ("provider", "prior", "mode", "L", "N")
    return " ".join(f"{params[k]}" for k in keys if k in params)


class _NoBar:
    def __init__(self, total, desc):
        self.n, self.total, self.desc = 0, total, desc

    def set_postfix_str(self, s, refresh=True):
        self.s = s

    def update(self, k):
        self.n += k
        print(f"[{self.desc}] {self.n}/{self.total} {getattr(self, 's', '')}", file=sys.stderr, flush=True)

    def close(self):
        pass


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True,
                    mininterval=0.5, disable=None if sys.stderr.isatty() else False)
    except ImportError:
        return _NoBar(total, desc)


# ----------------------------------------------------------------------------------------------------
# Output: CSV, markdown table, plots


def results_path(name: str, out_dir: Path | None = None, ext: str = "csv") -> Path:
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / f"{name}.{ext}"


def stamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def append_csv(path: Path, row: dict) -> None:
    """Append one row; the header is the union of keys seen so far (rewritten if a new key appears)."""
    path = Path(path)
    rows, fields = [], []
    if path.exists():
        with open(path, newline="") as f:
            r = csv.DictReader(f)
            fields = list(r.fieldnames or [])
            rows = list(r)
    new = [k for k in row if k not in fields]
    if new or not path.exists():
        fields += new
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
            w.writerow(_fmt_row(row))
    else:
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writerow(_fmt_row(row))


def _fmt_row(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, float):
            out[k] = "" if math.isnan(v) else f"{v:.6g}"
        elif isinstance(v, (list, tuple, dict)):
            out[k] = json.dumps(v)
        else:
            out[k] = v
    return out


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k, v in list(r.items()):
            if v is None:
                continue
            try:
                r[k] = int(v) if v.lstrip("-").isdigit() else float(v) if _is_float(v) else v
            except ValueError:
                pass
    return rows


def _is_float(v: str) -> bool:
    try:
        float(v)
        return v.strip().lower() not in ("nan", "inf", "-inf", "")
    except ValueError:
        return False


def write_meta(path: Path, meta: dict, config: dict) -> None:
    Path(path).write_text(json.dumps({"machine": meta, "config": config}, indent=2, default=str) + "\n")


def cell(row: dict) -> str:
    """One table cell: 'time ms · TFLOP/s · MB', or the failure status and a short reason."""
    if row.get("status") != STATUS_OK:
        err = str(row.get("error", ""))
        return f"{row.get('status')}: {err[:60]}" if err else str(row.get("status"))
    parts = [f"{_num(row.get('time_ms'))} ms"]
    tf = row.get("tflops")
    if isinstance(tf, (int, float)) and not math.isnan(tf):
        parts.append(f"{tf:.3g} TF/s" if tf >= 0.01 else f"{tf * 1e3:.3g} GF/s")
    mem = row.get("peak_mem_mb")
    if isinstance(mem, (int, float)) and not math.isnan(mem):
        parts.append(f"{_num(mem)} MB")
    return " · ".join(parts)


def _num(x) -> str:
    if not isinstance(x, (int, float)) or math.isnan(x):
        return "?"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def markdown_table(rows: list[dict], config_keys: list[str], column_key: str = "provider") -> str:
    """Pivot: one line per config (``config_keys``), one column per provider."""
    columns: list[str] = []
    lines: dict = {}
    for r in rows:
        col = str(r.get(column_key))
        if col not in columns:
            columns.append(col)
        key = tuple(str(r.get(k, "")) for k in config_keys)
        lines.setdefault(key, {})[col] = cell(r)
    head = "| " + " | ".join(config_keys + columns) + " |"
    sep = "|" + "---|" * (len(config_keys) + len(columns))
    body = ["| " + " | ".join(list(k) + [v.get(c, "") for c in columns]) + " |" for k, v in lines.items()]
    return "\n".join([head, sep] + body)


_COLOR_ORDER = ["rapkern-triton", "rapkern-torch", "flex", "sdpa_nobias", "sdpa_dense", "eager",
                "sdpa_lowrank_concat"]


def color(provider: str) -> str:
    """The same colour for a provider in every plot."""
    if provider not in _COLOR_ORDER:
        _COLOR_ORDER.append(provider)
    return f"C{_COLOR_ORDER.index(provider) % 10}"


def plot_vs_length(rows: list[dict], group_keys: list[str], out_prefix: Path, *, x="L",
                   title: str = "") -> list[Path]:
    """Per config group: time and TFLOP/s vs L, and peak memory vs L (log-log), one line per provider."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"plots skipped: matplotlib unavailable ({e})", file=sys.stderr)
        return []
    groups: dict = {}
    for r in rows:
        groups.setdefault(tuple(str(r.get(k, "")) for k in group_keys), []).append(r)
    paths = []
    for gkey, grows in groups.items():
        ok = [r for r in grows if r.get("status") == STATUS_OK and isinstance(r.get(x), (int, float))]
        if not ok:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
        for prov in dict.fromkeys(str(r["provider"]) for r in ok):
            pr = sorted((r for r in ok if str(r["provider"]) == prov), key=lambda r: r[x])
            xs = [r[x] for r in pr]
            for ax, key in zip(axes, ("time_ms", "tflops", "peak_mem_mb")):
                pts = [(a, r.get(key)) for a, r in zip(xs, pr) if isinstance(r.get(key), (int, float))
                       and not math.isnan(r.get(key)) and r.get(key) > 0]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=prov, color=color(prov))
        panels = (("time (ms)", True), ("TFLOP/s", False), ("peak extra memory (MB)", True))
        for ax, (ylabel, logy) in zip(axes, panels):
            ax.set_xscale("log", base=2)
            if logy:
                ax.set_yscale("log")
            ax.set_xlabel(x)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle((title + " " if title else "") + ", ".join(f"{k}={v}" for k, v in zip(group_keys, gkey)),
                     fontsize=9)
        fig.tight_layout()
        name = "_".join(str(v).replace("/", "-").replace(" ", "") for v in gkey)
        path = Path(f"{out_prefix}_{name}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def fit_exponent(ls: list[float], mems: list[float]) -> float:
    """Slope of log(mem) vs log(L) by least squares: ~1 for O(L), ~2 for O(L²)."""
    pts = [(math.log(a), math.log(b)) for a, b in zip(ls, mems) if a > 0 and b > 0]
    if len(pts) < 2:
        return float("nan")
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else float("nan")


def describe_machine(meta: dict) -> str:
    keys = ("device_name", "cores", "ram_gb", "gpu_mem_gb", "driver", "torch", "triton", "rapkern", "git",
            "python", "load_avg_start", "timestamp")
    return ", ".join(f"{k}={meta[k]}" for k in keys if meta.get(k) not in (None, ""))


def finish(rows: list[dict], meta: dict, csv_path: Path, table_keys: list[str], plot_keys: list[str],
           plot_prefix: Path | None, title: str, x: str = "L") -> str:
    """Print the markdown table, make the plots and say where everything is. Returns the table."""
    table = markdown_table(rows, table_keys)
    plots = plot_vs_length(rows, plot_keys, plot_prefix, title=title, x=x) if plot_prefix else []
    print(f"\n## {title}\n\nMachine: {describe_machine(meta)}\n")
    print(table)
    print(f"\nCSV: {csv_path}")
    for p in plots:
        print(f"plot: {p}")
    return table


def run_suite(jobs: list[Job], *, device: str, name: str, table_keys: list[str], plot_keys: list[str],
              title: str, out_dir=None, opts=None, budget_s=None, isolate=None, plots=True, x="L",
              precheck=None, config=None) -> tuple[list[dict], Path]:
    """Run jobs, write ``<name>-<stamp>.csv`` + ``.json`` (machine, config), print the table, plot."""
    meta = machine_info(device)
    csv_path = results_path(f"{name}-{stamp()}", out_dir)
    opts = dict(opts or {})
    write_meta(csv_path.with_suffix(".json"), meta, {"jobs": [j.params for j in jobs], "opts": opts,
                                                     **(config or {})})
    deadline = time.monotonic() + budget_s if budget_s else None
    rows = run_jobs(jobs, opts, device=device, isolate=isolate, csv_path=csv_path, meta=meta, desc=title,
                    deadline=deadline, precheck=precheck)
    finish(rows, meta, csv_path, table_keys, plot_keys, csv_path.with_suffix("") if plots else None, title, x=x)
    return rows, csv_path
