"""Host-side tests of csrc/cuda/index.h, the index arithmetic the CUDA kernels run (issue 15).

The header's functions are ``__host__ __device__``; here they are compiled with plain g++ into a tiny shared
library (extern "C" wrappers, no torch headers: about a second, cached under /tmp by source hash) and called
through ctypes, then compared with rapkern/priors.py (the semantics: ``block``, ``visible``, ``key_range``,
``lead4``) and, for the block-skipping rule, with csrc/cpu/common.h's ``key_range`` itself (compiled against
torch's headers once, also cached). No GPU needed.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rapkern.priors import BandedPrior, RelativeLagPrior, lead4, sum_to

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "cuda" / "index.h"
CACHE = Path(os.environ.get("RAPKERN_TEST_BUILD_DIR", "/tmp/rapkern-test-builds"))

BINDING = r"""
#include "cuda/index.h"
using namespace rapkern::cuda;
extern "C" {
void rk_key_range(int causal, int band_masked, int64_t w, int64_t lk, int64_t i0, int64_t i1, int64_t* out) {
  key_range(causal, band_masked, w, lk, i0, i1, out, out + 1);
}
void rk_key_block_range(int causal, int band_masked, int64_t w, int64_t lk, int64_t i0, int64_t i1, int64_t bk,
                        int64_t* out) {
  key_block_range(causal, band_masked, w, lk, i0, i1, bk, out, out + 1);
}
int64_t rk_lag_index(int64_t W, int64_t i, int64_t j) { return lag_index(W, i, j); }
int64_t rk_lag_tile_const_index(int64_t W, int64_t i0, int64_t bq, int64_t j0, int64_t bk) {
  return lag_tile_const_index(W, i0, bq, j0, bk);
}
int64_t rk_band_offset(int64_t w, int64_t i, int64_t j) { return band_offset(w, i, j); }
int rk_band_inside(int64_t w, int64_t i, int64_t j) { return band_inside(w, i, j); }
int rk_band_tile_meets(int64_t w, int64_t i0, int64_t bq, int64_t j0, int64_t bk) {
  return band_tile_meets(w, i0, bq, j0, bk);
}
int64_t rk_bcast_stride(int64_t size, int64_t stride) { return bcast_stride(size, stride); }
int64_t rk_prior_offset(int64_t sb, int64_t sh, int64_t sr, int64_t sc, int64_t b, int64_t h, int64_t r, int64_t c) {
  PriorAddr a;
  a.sb = sb, a.sh = sh, a.sr = sr, a.sc = sc;
  return prior_offset(a, b, h, r, c);
}
int64_t rk_partial_slot(int64_t b, int64_t h, int64_t qb, int64_t Hq, int64_t nqb) {
  return partial_slot(b, h, qb, Hq, nqb);
}
int64_t rk_partial_terms(int64_t B, int64_t Hq, int64_t nqb, int64_t Bp, int64_t Hp) {
  return partial_terms(B, Hq, nqb, Bp, Hp);
}
int64_t rk_partial_term_slot(int64_t t, int64_t bp, int64_t hp, int64_t B, int64_t Hq, int64_t nqb, int64_t Bp,
                             int64_t Hp) {
  return partial_term_slot(t, bp, hp, B, Hq, nqb, Bp, Hp);
}
void rk_query_range(int causal, int band_masked, int64_t w, int64_t lq, int64_t j0, int64_t j1, int64_t* out) {
  query_range(causal, band_masked, w, lq, j0, j1, out, out + 1);
}
int64_t rk_work_items(int mode, int64_t B, int64_t Hq, int64_t Hkv, int64_t Bp, int64_t Hp) {
  return work_items(mode, B, Hq, Hkv, Bp, Hp);
}
void rk_work_pairs(int mode, int64_t o, int64_t B, int64_t Hq, int64_t Hkv, int64_t Bp, int64_t Hp, int64_t* out) {
  work_pairs(mode, o, B, Hq, Hkv, Bp, Hp, out, out + 1, out + 2, out + 3);
}
int64_t rk_slab_index(int64_t b, int64_t h, int64_t Bp, int64_t Hp) { return slab_index(b, h, Bp, Hp); }
int64_t rk_diag_count(int64_t bm, int64_t bn) { return diag_count(bm, bn); }
int64_t rk_diag_lag(int64_t t, int64_t i0, int64_t j0, int64_t bn) { return diag_lag(t, i0, j0, bn); }
void rk_diag_rows(int64_t t, int64_t bn, int64_t bm, int64_t* out) { diag_rows(t, bn, bm, out, out + 1); }
}
"""

I64 = ctypes.c_int64


def _build_binding() -> ctypes.CDLL:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++) on PATH to build the host binding of csrc/cuda/index.h")
    key = hashlib.sha256(HEADER.read_bytes() + BINDING.encode()).hexdigest()[:16]
    out = CACHE / f"cuda_index_{key}.so"
    if not out.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        src = CACHE / f"cuda_index_{key}.cpp"
        src.write_text(BINDING)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cxx, "-std=c++17", "-O1", "-Wall", "-Werror", "-shared", "-fPIC", f"-I{ROOT / 'csrc'}", str(src),
               "-o", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, f"index.h host binding failed to compile:\n{res.stderr}"
        os.replace(tmp, out)
    lib = ctypes.CDLL(str(out))
    for name in ("rk_lag_index", "rk_lag_tile_const_index", "rk_band_offset", "rk_bcast_stride", "rk_prior_offset",
                 "rk_partial_slot", "rk_partial_terms", "rk_partial_term_slot", "rk_work_items", "rk_slab_index",
                 "rk_diag_count", "rk_diag_lag"):
        getattr(lib, name).restype = I64
    return lib


@pytest.fixture(scope="module")
def lib():
    return _build_binding()


def _call(fn, *args):
    return fn(*(I64(int(a)) for a in args))


def _range(lib, causal, band_masked, w, lk, i0, i1):
    out = (I64 * 2)()
    lib.rk_key_range(int(causal), int(band_masked), I64(w), I64(lk), I64(i0), I64(i1), out)
    return out[0], out[1]


# ------------------------------------------------------------------------------------------- block skipping


def _visible_keys(causal, band_masked, w, lk, i0, i1):
    """Brute force from the semantics: keys some row of [i0, i1) may see (causal j <= i, band |j - i| <= w)."""
    keys = set()
    for i in range(i0, i1):
        for j in range(lk):
            if causal and j > i:
                continue
            if band_masked and abs(j - i) > w:
                continue
            keys.add(j)
    return keys


GRID = [(lq, lk, w) for lq, lk in [(1, 1), (5, 3), (3, 9), (17, 17), (40, 23), (23, 40)] for w in (0, 1, 4, 30)]


@pytest.mark.parametrize("lq,lk,w", GRID)
def test_key_range_covers_exactly_the_visible_keys(lib, lq, lk, w):
    for causal, band_masked in itertools.product((False, True), repeat=2):
        for bq in (1, 4, 16):
            for i0 in range(0, lq, bq):
                i1 = min(i0 + bq, lq)
                lo, hi = _range(lib, causal, band_masked, w, lk, i0, i1)
                keys = _visible_keys(causal, band_masked, w, lk, i0, i1)
                if not keys:
                    assert lo >= hi, (causal, band_masked, i0, i1, lo, hi)
                    continue
                # tight: the smallest and largest visible keys are the range's ends (only gaps inside remain)
                assert (lo, hi) == (min(keys), max(keys) + 1), (causal, band_masked, i0, i1)
                if band_masked and not causal:
                    prior = BandedPrior(torch.zeros(lq, 2 * w + 1), mask_outside=True)
                    assert (lo, hi) == prior.key_range(i0, i1, lk)


def test_key_block_range(lib):
    for lq, lk, w in GRID:
        for causal, band_masked in itertools.product((False, True), repeat=2):
            for bq, bk in ((4, 4), (16, 8), (8, 16)):
                for i0 in range(0, lq, bq):
                    i1 = min(i0 + bq, lq)
                    lo, hi = _range(lib, causal, band_masked, w, lk, i0, i1)
                    out = (I64 * 2)()
                    lib.rk_key_block_range(int(causal), int(band_masked), I64(w), I64(lk), I64(i0), I64(i1),
                                           I64(bk), out)
                    blocks = {j // bk for j in range(lo, hi)}
                    want = (min(blocks), max(blocks) + 1) if blocks else None
                    got = (out[0], out[1])
                    if want is None:
                        assert got[0] >= got[1]
                    else:
                        assert got == want, (lq, lk, w, causal, band_masked, bq, bk, i0)


CPU_KEY_RANGE = r"""
#include "cpu/common.h"
#include "cuda/index.h"
// Every (causal, masked band, w, Lq, Lk, bq) of a grid: rapkern::cpu::key_range vs rapkern::cuda::key_range.
int64_t mismatches() {
  int64_t bad = 0;
  for (int causal = 0; causal < 2; ++causal)
    for (int banded = 0; banded < 2; ++banded)
      for (int64_t w : {0, 1, 3, 16, 100})
        for (int64_t lq : {1, 7, 64, 65, 200})
          for (int64_t lk : {1, 7, 64, 65, 200})
            for (int64_t bq : {1, 16, 64}) {
              rapkern::cpu::Problem P;
              P.causal = causal, P.Lq = lq, P.Lk = lk, P.half = w, P.mask_outside = banded;
              P.kind = banded ? rapkern::cpu::kBanded : rapkern::cpu::kNone;
              for (int64_t i0 = 0; i0 < lq; i0 += bq) {
                const int64_t i1 = std::min(i0 + bq, lq);
                int64_t a_lo, a_hi, b_lo, b_hi;
                rapkern::cpu::key_range(P, i0, i1, &a_lo, &a_hi);
                rapkern::cuda::key_range(causal, banded, w, lk, i0, i1, &b_lo, &b_hi);
                bad += (a_lo != b_lo) || (a_hi != b_hi);
              }
            }
  return bad;
}
// dropout: the same uniform and element counter as the CPU kernels, on a spread of seeds and counters.
int64_t dropout_mismatches() {
  int64_t bad = 0;
  rapkern::cpu::Problem P;
  P.B = 3, P.Hq = 5, P.Lq = 77, P.Lk = 131;
  for (uint64_t seed : {0ULL, 1ULL, 12345ULL, (1ULL << 62) - 1})
    for (int64_t b = 0; b < P.B; ++b)
      for (int64_t h = 0; h < P.Hq; h += 2)
        for (int64_t i = 0; i < P.Lq; i += 7)
          for (int64_t j = 0; j < P.Lk; j += 3) {
            const uint64_t a = rapkern::cpu::dropout_index(P, b, h, i, j);
            const uint64_t c = rapkern::cuda::dropout_index(b, h, i, j, P.Hq, P.Lq, P.Lk);
            bad += a != c;
            bad += rapkern::cpu::dropout_uniform(seed, a) != rapkern::cuda::dropout_uniform(seed, c);
          }
  return bad;
}
TORCH_LIBRARY(rapkern_cuda_index_test, m) {
  m.def("mismatches", &mismatches);
  m.def("dropout_mismatches", &dropout_mismatches);
}
"""


def test_key_range_and_dropout_equal_cpu_kernels():
    """The block-skipping rule and dropout stream of the CUDA kernels are the CPU kernels' (csrc/cpu/common.h
    key_range, dropout_index, dropout_uniform), compiled together in one host translation unit."""
    from torch.utils import cpp_extension

    key = hashlib.sha256(HEADER.read_bytes() + (ROOT / "csrc/cpu/common.h").read_bytes()
                         + CPU_KEY_RANGE.encode()).hexdigest()[:12]
    build = CACHE / f"cuda_index_cpu_{key}"
    build.mkdir(parents=True, exist_ok=True)
    src = build / "key_range_check.cpp"
    if not src.exists():
        src.write_text(CPU_KEY_RANGE)
    if not hasattr(torch.ops.rapkern_cuda_index_test, "mismatches"):
        cpp_extension.load(name=f"rk_cuda_index_cpu_{key}", sources=[str(src)], build_directory=str(build),
                           extra_include_paths=[str(ROOT / "csrc")], extra_cflags=["-O0", "-g0"],
                           is_python_module=False, verbose=False)
    assert torch.ops.rapkern_cuda_index_test.mismatches() == 0
    # the CUDA kernels' dropout stream is the CPU kernels' (same hash, same element counter)
    assert torch.ops.rapkern_cuda_index_test.dropout_mismatches() == 0


# ------------------------------------------------------------------------------------------- lag and band


@pytest.mark.parametrize("W", [0, 1, 3, 8])
def test_lag_index_matches_relative_lag_prior(lib, W):
    lq, lk = 13, 21
    table = torch.arange(2 * W + 1, dtype=torch.float64)  # entry value = its index
    tile = RelativeLagPrior(table).block(0, lq, 0, lk, torch.float64)[0, 0]
    got = torch.tensor([[_call(lib.rk_lag_index, W, i, j) for j in range(lk)] for i in range(lq)],
                       dtype=torch.float64)
    torch.testing.assert_close(got, tile, rtol=0, atol=0)


@pytest.mark.parametrize("W", [0, 1, 3, 8])
def test_lag_tile_constant_detection(lib, W):
    """-1 unless every entry of the tile is one end entry (0 or 2W); never claims a constant falsely and finds
    every tile that is constant at an end because all its lags clamp."""
    table = torch.arange(2 * W + 1, dtype=torch.float64)
    prior = RelativeLagPrior(table)
    found = 0
    for bq, bk in ((1, 1), (4, 4), (8, 3), (3, 8)):
        for i0 in range(0, 40, 3):
            for j0 in range(0, 40, 5):
                tile = prior.block(i0, i0 + bq, j0, j0 + bk, torch.float64)[0, 0]
                got = _call(lib.rk_lag_tile_const_index, W, i0, bq, j0, bk)
                lags = [i - j for i in range(i0, i0 + bq) for j in range(j0, j0 + bk)]
                if got >= 0:
                    found += 1
                    assert got in (0, 2 * W)
                    assert bool((tile == got).all()), (W, i0, bq, j0, bk, got)
                else:  # not flagged: the lags do not all clamp onto one end
                    assert not (min(lags) >= W or max(lags) <= -W), (W, i0, bq, j0, bk)
    assert found > 0


@pytest.mark.parametrize("w", [0, 1, 4])
def test_band_maps_match_banded_prior(lib, w):
    lq, lk = 11, 17
    values = torch.arange(lq * (2 * w + 1), dtype=torch.float64).reshape(lq, 2 * w + 1) + 1.0
    prior = BandedPrior(values, mask_outside=True)
    tile = prior.block(0, lq, 0, lk, torch.float64)[0, 0]
    vis = prior.visible(0, lq, 0, lk)
    for i in range(lq):
        for j in range(lk):
            inside = bool(lib.rk_band_inside(I64(w), I64(i), I64(j)))
            assert inside == bool(vis[i, j]), (i, j)
            if inside:
                off = _call(lib.rk_band_offset, w, i, j)
                assert 0 <= off <= 2 * w and values[i, off] == tile[i, j], (i, j)
            else:
                assert tile[i, j] == 0
    for bq, bk in ((1, 1), (4, 4), (3, 8)):
        for i0 in range(0, lq, bq):
            for j0 in range(0, lk, bk):
                i1, j1 = min(i0 + bq, lq), min(j0 + bk, lk)
                meets = bool(lib.rk_band_tile_meets(I64(w), I64(i0), I64(i1 - i0), I64(j0), I64(j1 - j0)))
                assert meets == bool(vis[i0:i1, j0:j1].any()), (w, i0, j0)


# ------------------------------------------------------------------------------------------- prior addressing


@pytest.mark.parametrize("lead", [(), (1,), (3,), (1, 1), (2, 1), (1, 3), (2, 3)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "expanded"])
def test_prior_offset_through_broadcast_strides(lib, lead, layout):
    """Entry (b, h, r, c) of the (B, Hq) problem read through the view's strides equals lead4(t) broadcast to
    (B, Hq, rows, cols), for contiguous, transposed and expand()ed (stride 0) tensors."""
    B, Hq, rows, cols = 2, 3, 4, 5
    base = torch.arange(1, 1 + 2 * 3 * rows * cols, dtype=torch.float32)
    n_lead = len(lead)
    n = math.prod(lead)
    if layout == "contiguous":
        t = base[: n * rows * cols].reshape(*lead, rows, cols)
    elif layout == "transposed":
        t = base[: n * rows * cols].reshape(*lead, cols, rows).transpose(-1, -2)
    else:  # the trailing rows broadcast from one row: stride 0
        t = base[: n * cols].reshape(*lead, 1, cols).expand(*lead, rows, cols)
    v4 = lead4(t, 2)
    bp, hp = v4.shape[0], v4.shape[1]
    want = v4.expand(B, Hq, rows, cols)
    flat = t.as_strided((t.untyped_storage().nbytes() // 4,), (1,), 0)
    sb = lib.rk_bcast_stride(I64(bp), I64(v4.stride(0))) if n_lead == 2 else 0
    sh = lib.rk_bcast_stride(I64(hp), I64(v4.stride(1))) if n_lead >= 1 else 0
    off0 = t.storage_offset()
    for b in range(B):
        for h in range(Hq):
            for r in range(rows):
                for c in range(cols):
                    off = _call(lib.rk_prior_offset, sb, sh, v4.stride(2), v4.stride(3), b, h, r, c)
                    assert flat[off0 + off] == want[b, h, r, c], (lead, layout, b, h, r, c)


def test_bcast_stride(lib):
    assert _call(lib.rk_bcast_stride, 1, 77) == 0
    assert _call(lib.rk_bcast_stride, 4, 77) == 77


# ------------------------------------------------------------------------------------------- reduction order


@pytest.mark.parametrize("B,Hq,nqb", [(1, 1, 1), (2, 3, 4), (3, 1, 2)])
@pytest.mark.parametrize("Bp,Hp", [(1, 1), ("B", 1), (1, "H"), ("B", "H")])
def test_partial_reduction_order(lib, B, Hq, nqb, Bp, Hp):
    """Each (bp, hp) target sums its partials in ascending slot order (b, then h, then q block); the targets'
    terms partition the (B, Hq, nqb) partials; the sums equal priors.sum_to of the partials."""
    Bp = B if Bp == "B" else 1
    Hp = Hq if Hp == "H" else 1
    n = _call(lib.rk_partial_terms, B, Hq, nqb, Bp, Hp)
    partials = torch.randn(B, Hq, nqb, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    flat = partials.reshape(-1)
    seen = []
    got = torch.zeros(Bp, Hp, dtype=torch.float64)
    for bp in range(Bp):
        for hp in range(Hp):
            slots = [_call(lib.rk_partial_term_slot, t, bp, hp, B, Hq, nqb, Bp, Hp) for t in range(n)]
            assert slots == sorted(slots), "terms must be summed in ascending slot order"
            for s in slots:
                b, rest = divmod(s, Hq * nqb)
                h, qb = divmod(rest, nqb)
                assert _call(lib.rk_partial_slot, b, h, qb, Hq, nqb) == s
                assert (Bp == 1 or b == bp) and (Hp == 1 or h == hp)
            seen += slots
            acc = 0.0
            for s in slots:
                acc += float(flat[s])
            got[bp, hp] = acc
    assert sorted(seen) == list(range(B * Hq * nqb))
    want = sum_to(partials.sum(dim=2), (Bp, Hp))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------- backward work items


@pytest.mark.parametrize("lq,lk,w", GRID)
def test_query_range_covers_exactly_the_rows_that_see_a_key(lib, lq, lk, w):
    """The dk/dv kernel's row range for keys [j0, j1): every row that sees one of them is inside; the range is
    tight (its first and last rows see one) unless empty."""
    for causal, band in itertools.product((False, True), repeat=2):
        for j0 in range(0, lk, 4):
            j1 = min(j0 + 4, lk)
            out = (I64 * 2)()
            lib.rk_query_range(int(causal), int(band), I64(w), I64(lq), I64(j0), I64(j1), out)
            lo, hi = out[0], out[1]
            rows = {i for i in range(lq) for j in range(j0, j1)
                    if not (causal and j > i) and not (band and abs(j - i) > w)}
            assert rows <= set(range(lo, hi)), (causal, band, j0, lo, hi)
            if rows:
                assert lo == min(rows) and hi == max(rows) + 1, (causal, band, j0, lo, hi, rows)
            else:
                assert lo == hi


@pytest.mark.parametrize("B,Hq,Hkv", [(1, 1, 1), (2, 4, 2), (3, 6, 1), (2, 3, 3)])
@pytest.mark.parametrize("Bp,Hp", [(1, 1), ("B", 1), (1, "H"), ("B", "H")])
def test_work_items_partition_the_pairs(lib, B, Hq, Hkv, Bp, Hp):
    """Per mode, the items' (b, h) pairs partition all B x Hq pairs; per kv head an item's pairs share the kv
    head; per slab every pair of an item maps onto that slab (slab_index) and the items are the slabs."""
    Bp = B if Bp == "B" else 1
    Hp = Hq if Hp == "H" else 1
    g = Hq // Hkv
    for mode in (0, 1, 2):  # kPerHead, kPerKvHead, kPerSlab
        n = _call(lib.rk_work_items, mode, B, Hq, Hkv, Bp, Hp)
        assert n == (B * Hq, B * Hkv, Bp * Hp)[mode]
        pairs = []
        for o in range(n):
            out = (I64 * 4)()
            lib.rk_work_pairs(ctypes.c_int(mode), *(I64(x) for x in (o, B, Hq, Hkv, Bp, Hp)), out)
            b_lo, b_hi, h_lo, h_hi = out
            mine = [(b, h) for b in range(b_lo, b_hi) for h in range(h_lo, h_hi)]
            assert mine, (mode, o)
            if mode == 1:
                assert {h // g for _, h in mine} == {o % Hkv} and {b for b, _ in mine} == {o // Hkv}
            if mode == 2:
                assert {_call(lib.rk_slab_index, b, h, Bp, Hp) for b, h in mine} == {o}
            pairs += mine
        assert sorted(pairs) == [(b, h) for b in range(B) for h in range(Hq)], mode
    for b in range(B):
        for h in range(Hq):
            bb, hh = (b if Bp > 1 else 0), (h if Hp > 1 else 0)
            assert _call(lib.rk_slab_index, b, h, Bp, Hp) == bb * Hp + hh


@pytest.mark.parametrize("bm,bn", [(1, 1), (4, 3), (32, 16), (64, 32)])
def test_tile_diagonals_cover_the_tile_once_with_their_lag(lib, bm, bn):
    """The lag gradient's diagonal walk: every entry (r, c) of a bm x bn tile lies on exactly one diagonal t,
    whose lag diag_lag is i - j of that entry."""
    i0, j0 = 70, 13
    n = _call(lib.rk_diag_count, bm, bn)
    seen = []
    for t in range(n):
        out = (I64 * 2)()
        lib.rk_diag_rows(I64(t), I64(bn), I64(bm), out)
        lag = _call(lib.rk_diag_lag, t, i0, j0, bn)
        for r in range(out[0], out[1]):
            c = r - t + bn - 1
            assert 0 <= c < bn, (t, r, c)
            assert (i0 + r) - (j0 + c) == lag
            seen.append((r, c))
    assert sorted(seen) == [(r, c) for r in range(bm) for c in range(bn)]
