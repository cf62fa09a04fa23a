"""Generate the Triton attention config table for the running Triton version: per launch key, the configs
that compile spill-free (ahead of time, no GPU) for sm_80 and sm_90, the resources each used, and the
fingerprint of the kernel sources it was compiled from.

    TRITON_INTERPRET=0 .venv/bin/python tools/gen_triton_configs.py             # triton 3.8 (dev env)
    tools/triton36_env.sh && .venv-triton36/bin/python tools/gen_triton_configs.py   # triton 3.6

writes rapkern/backends/triton_attention/_config_tables/triton_<major>_<minor>.py. A key is (kernel, feature
class, arch, head-dim bucket, prior kind); see configs.py. Per key the largest spill-free candidate (no local
memory / stack, shared memory within the architecture's limit) is kept, found by stepping down the
candidate list from the top (``Search``: registers are not monotonic in the tile, so no shortcut from a
hint); with ``--keep 2`` also the next spill-free one with a smaller BLOCK_M (a choice for short sequences).

Incremental: keys whose recorded fingerprint matches the current kernel sources are kept as they are (unless
``--force``), and every compile result is cached in ``--cache`` (per Triton version and kernel fingerprint),
so a rerun after editing one kernel recompiles only that kernel's keys. ``--deadline HH:MM`` stops
submitting work at that wall-clock time and writes what is done (unfinished keys keep their previous,
now stale, entries: configs.py then treats them as unverified; tests/test_triton_compile.py lists them).
Keys are searched in priority order: head dims 64/128 before 256, the plain class before the others.

``--verify`` (the cheap way to refresh stale keys after a kernel edit): a key whose entry (its own, or
another version's table's for a key this version lacks) is known starts AT that entry and never steps up:
one compile when the entry still compiles spill-free, a step down the candidates per failure otherwise.
Keys without any entry get the full search.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import pprint
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
os.environ["TRITON_INTERPRET"] = "0"  # @triton.jit reads it at import

TABLES = ROOT / "rapkern/backends/triton_attention/_config_tables"

# Candidates per kernel, large to small (BLOCK_M, BLOCK_N, num_warps, num_stages).
CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2),
            (32, 32, 4, 1), (16, 32, 4, 1), (16, 16, 4, 1)],
    "dq": [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 1), (32, 32, 8, 1),
           (16, 32, 4, 1), (16, 16, 4, 1)],
    "dkdv": [(32, 128, 8, 2), (64, 64, 4, 2), (32, 64, 8, 2), (32, 64, 4, 2), (32, 64, 8, 1), (32, 32, 4, 1),
             (32, 32, 8, 1), (16, 64, 4, 1), (16, 32, 4, 1), (16, 16, 4, 1)],
    "laggrad": [(64, 64, 8, 2), (64, 64, 4, 2), (32, 32, 8, 1), (32, 32, 4, 1), (16, 16, 4, 1)],
}
CLASS_ORDER = ("plain", "grad", "laggrad", "lowrank", "dropout", "fp32")


def all_keys() -> list[tuple]:
    from rapkern.backends.triton_attention import configs as C

    keys = C.launch_keys()
    # priority: what the benchmarks run first (head dims 64/128, plain class, forward)
    return sorted(keys, key=lambda k: (k[3] == 256, CLASS_ORDER.index(k[1]), ("fwd", "dq", "dkdv").index(k[0]),
                                       k[3], k[4], k[2]))


def key_str(key) -> str:
    return "|".join(map(str, key))


def _compile(job) -> dict:
    """One compile in a worker: (key, cfg) -> resources dict (or an error)."""
    from rapkern.backends.triton_attention import _aot

    (kernel, cls, arch, d, prior), cfg = job
    bm, bn, w, s = cfg
    dtype = "fp32" if cls == "fp32" else "fp16"
    t = time.time()
    try:
        r = _aot.case_resources((arch, kernel, dtype, _aot.features(kernel, cls, prior, d, bm, bn), w, s))
        out = {k: r[k] for k in ("regs", "stack", "local", "smem")}
        out["ok"] = _aot.spill_free(r)
    except Exception as e:  # a config that does not compile is not spill-free
        out = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    out["seconds"] = round(time.time() - t, 1)
    return out


class Search:
    """Per key, over the candidates (large to small): start at the top (``verify``: at the hint, the key's
    entry in the previous table, never stepping up) and step down until one passes, which is kept; with
    keep = 2 also the next spill-free candidate below it with a smaller BLOCK_M (for short sequences)."""

    def __init__(self, key, keep, hint=None, verify=False):
        self.key, self.keep = key, keep
        self.cands = CANDIDATES["laggrad" if key[1] == "laggrad" else key[0]]
        known = bool(hint) and tuple(hint) in self.cands
        h = self.cands.index(tuple(hint)) if known else 0
        self.verify = verify and known  # start at the hint, never step up (see --verify)
        # a full search runs top-down (registers are not monotonic in the tile: (64, 64, 4, 2) may spill where
        # (128, 64, 8, 2) does not); --verify starts at the known entry
        self.i = h if self.verify else 0
        self.dir = 0  # 0: first compile, -1: stepping up, +1: stepping down, 2: second config
        self.best, self.second = None, None
        self.res = {}

    def next_cfg(self):
        if self.dir == 2:
            while self.i < len(self.cands) and self.cands[self.i][0] >= self.cands[self.best][0]:
                self.i += 1
        if 0 <= self.i < len(self.cands) and (self.dir != 2 or self.second is None):
            return self.cands[self.i]
        return None

    def feed(self, cfg, r):
        ok = bool(r.get("ok"))
        if ok:
            self.res[cfg] = [r["regs"], r["smem"]]
        if self.dir == 2:
            if ok:
                self.second = self.i
                self.i = len(self.cands)
            else:
                self.i += 1
            return
        if ok:
            self.best = self.i
            if self.dir in (0, -1) and self.i > 0 and not self.verify:
                self.dir, self.i = -1, self.i - 1
                return
        elif self.dir == 0 or self.dir == 1:
            self.dir, self.i = 1, self.i + 1
            return
        # done with the largest (a pass with nothing above, a pass going down, or a failure going up)
        if self.best is not None and self.keep > 1:
            self.dir, self.i = 2, self.best + 1
        else:
            self.i = len(self.cands)

    @property
    def found(self):
        picks = [i for i in (self.best, self.second) if i is not None]
        return [self.cands[i] for i in picks]

    @property
    def found_res(self):
        return [self.res[c] for c in self.found]


def load_existing(path: Path) -> dict:
    if not path.exists():
        return {}
    ns: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), ns)
    return ns


def stale_note(table: dict, meta: dict, fps: dict) -> str:
    """The table's NOTE: how many launch keys (of every kernel, not only this run's) are stale or missing."""
    stale = [k for k in all_keys() if key_str(k) not in table or meta.get(key_str(k), (None,))[0] != fps[k[0]]]
    return (f"{len(stale)} keys not searched for the current kernels: they keep older entries" if stale
            else "complete")


def write_module(path: Path, version: str, table: dict, meta: dict, fps: dict, note: str):
    import torch

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    path.write_text(
        f'"""Spill-free Triton attention configs for triton {version}, generated by tools/gen_triton_configs.py\n'
        f"({stamp}, torch {torch.__version__}). Do not edit by hand: rerun the generator under this Triton.\n\n"
        "TABLE: 'kernel|feature class|arch|head-dim bucket|prior kind' -> [(BLOCK_M, BLOCK_N, warps, stages)],\n"
        "large to small; [] = no spill-free config (the backend declines such launches on CUDA).\n"
        "META: key -> (fingerprint of the kernel sources the entry was compiled from, [[registers, shared\n"
        'memory bytes] per entry]). FINGERPRINTS: the kernel sources when this module was written."""\n\n'
        f"TRITON = {version!r}\n"
        f"NOTE = {note!r}\n"
        f"FINGERPRINTS = {fps!r}\n"
        f"TABLE = {pprint.pformat(table, width=110, sort_dicts=True)}\n"
        f"META = {pprint.pformat(meta, width=110, sort_dicts=True)}\n"
    )


def markdown(version: str, mod: dict, fps: dict) -> str:
    """The table as markdown: per launch key the chosen configs with their registers and shared memory."""
    lines = [f"# Triton {version}: spill-free attention configs per launch key", "",
             "Generated by tools/gen_triton_configs.py (ahead-of-time compiles, heaviest variant of each key: causal "
             "+ key padding + the class's switches). Registers per thread / shared memory bytes per block; "
             "'stale' = compiled from older kernel sources.", "",
             "| kernel | class | arch | head dim | prior | configs (BLOCK_M, BLOCK_N, warps, stages): regs / smem | |",
             "|---|---|---|---|---|---|---|"]
    kinds = {0: "none", 1: "lag", 2: "banded", 3: "lowrank", 4: "dense"}
    for key in sorted(mod["TABLE"], key=lambda k: (k.split("|")[0], k.split("|")[1], int(k.split("|")[3]),
                                                     int(k.split("|")[4]), k.split("|")[2])):
        kernel, cls, arch, d, prior = key.split("|")
        fp, res = mod["META"].get(key, (None, []))
        res = res or [["?", "?"]] * len(mod["TABLE"][key])
        cells = [f"{tuple(c)}: {r[0]} / {r[1]}" for c, r in zip(mod["TABLE"][key], res)] or ["none"]
        lines.append(f"| {kernel} | {cls} | sm_{arch} | {d} | {kinds[int(prior)]} | {'; '.join(cells)} | "
                     f"{'' if fp == fps.get(kernel) else 'stale'} |")
    return "\n".join(lines) + "\n"


def main():
    import triton

    from rapkern.backends.triton_attention import _config_tables as tables
    from rapkern.backends.triton_attention import configs as C

    major, minor = tables.parse_version(triton.__version__)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(TABLES / f"triton_{major}_{minor}.py"))
    ap.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    ap.add_argument("--keep", type=int, default=1, help="configs per key (2: also a smaller BLOCK_M)")
    ap.add_argument("--kernels", default="fwd,dq,dkdv")
    ap.add_argument("--markdown", help="write the table (no compiling) as markdown to this path and exit")
    ap.add_argument("--only", help="comma-separated key prefixes, e.g. 'fwd|plain|90|128'")
    ap.add_argument("--force", action="store_true", help="search every key, even those up to date")
    ap.add_argument("--verify", action="store_true",
                    help="start at each key's known entry and never step up (one compile per still-valid entry)")
    ap.add_argument("--deadline", help="HH:MM (local wall clock): submit no compile after it")
    ap.add_argument("--cache", default=str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                                           / "rapkern" / f"aot-triton-{triton.__version__}.json"))
    args = ap.parse_args()

    if args.markdown:
        Path(args.markdown).write_text(markdown(triton.__version__, load_existing(Path(args.out)),
                                                C.kernel_fingerprints()))
        print("wrote", args.markdown)
        return
    t0 = time.time()
    deadline = None
    if args.deadline:
        hh, mm = map(int, args.deadline.split(":"))
        now = datetime.datetime.now()
        deadline = now.replace(hour=hh, minute=mm, second=0).timestamp()
    out = Path(args.out)
    old = load_existing(out)
    table, meta = dict(old.get("TABLE", {})), dict(old.get("META", {}))
    fps = C.kernel_fingerprints()
    kernels = args.kernels.split(",")
    todo = [k for k in all_keys() if k[0] in kernels
            and (args.force or meta.get(key_str(k), (None,))[0] != fps[k[0]] or key_str(k) not in table)]
    if args.only:
        todo = [k for k in todo if any(key_str(k).startswith(p) for p in args.only.split(","))]
    cache_path = Path(args.cache)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    print(f"triton {triton.__version__}: {len(todo)} keys to search ({len(all_keys())} in all), "
          f"{args.workers} workers, cache {cache_path} ({len(cache)} results)", flush=True)

    hints = dict(table)
    for other in sorted(TABLES.glob("triton_*.py")):  # keys this version has no entry for: another version's
        for k, v in load_existing(other).get("TABLE", {}).items():
            hints.setdefault(k, v)
    searches = {k: Search(k, args.keep, (hints.get(key_str(k)) or [None])[0], args.verify) for k in todo}
    pending_keys = list(todo)
    running: dict = {}
    done_keys: list = []
    n_compiles = n_cached = 0
    ctx = multiprocessing.get_context("spawn")

    def cache_id(key, cfg):
        return f"{fps[key[0]]}|{key_str(key)}|{cfg}"

    def advance(key):
        """Feed cached results; return the next cfg that needs compiling, or None when the key is done."""
        nonlocal n_cached
        s = searches[key]
        while (cfg := s.next_cfg()) is not None:
            hit = cache.get(cache_id(key, cfg))
            if hit is None:
                return cfg
            n_cached += 1
            s.feed(cfg, hit)
        return None

    def finish(key):
        s = searches[key]
        table[key_str(key)] = s.found
        meta[key_str(key)] = (fps[key[0]], s.found_res)
        done_keys.append(key)
        # written as it goes: an interrupted run keeps what it found
        write_module(out, triton.__version__, table, meta, fps, stale_note(table, meta, fps))
        print(f"[{len(done_keys)}/{len(todo)}] {key_str(key)}: {s.found} {s.found_res} ({time.time() - t0:.0f}s)",
              flush=True)

    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        while pending_keys or running:
            while pending_keys and len(running) < args.workers and (deadline is None or time.time() < deadline):
                key = pending_keys.pop(0)
                cfg = advance(key)
                if cfg is None:
                    finish(key)
                else:
                    running[pool.submit(_compile, (key, cfg))] = (key, cfg)
            if not running:
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                key, cfg = running.pop(fut)
                r = fut.result()
                n_compiles += 1
                cache[cache_id(key, cfg)] = r
                searches[key].feed(cfg, r)
                if not r.get("ok"):
                    why = r.get("error") or f"regs {r['regs']} local {r['local']} stack {r['stack']} smem {r['smem']}"
                    print(f"    {key_str(key)} {cfg}: rejected ({why}, {r['seconds']}s)", flush=True)
                if deadline is not None and time.time() >= deadline:
                    if searches[key].found:  # keep what was found; a key with nothing yet stays unfinished
                        finish(key)
                elif (nxt := advance(key)) is None:
                    finish(key)
                else:
                    running[pool.submit(_compile, (key, nxt))] = (key, nxt)
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache))

    left = [k for k in todo if k not in done_keys]
    write_module(out, triton.__version__, table, meta, fps, stale_note(table, meta, fps))
    print(f"wrote {out}: {len(done_keys)} keys searched, {n_compiles} compiles, {n_cached} cached results, "
          f"{len(left)} left, {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
