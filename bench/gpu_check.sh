#!/usr/bin/env bash
# The GPU check: on a bare GPU machine (torch 2.11 / triton 3.6 in an existing Python, no network), in
# about 9 minutes: build any compiled extension, run `pytest -m gpu`, a short benchmark of every provider
# (bench/gpu_check.py), and print a short summary last.
#
#   bench/gpu_check.sh OUTDIR [TOTAL_BUDGET_S=540]
#
# OUTDIR receives at most 7 files: log.txt (everything, pytest included), results.csv, summary.md,
# env.json, lag_fwd.png, lag_fwdbwd.png, memory.png. PYTHON=... picks the interpreter (default python3).
set -uo pipefail
OUT=${1:?usage: bench/gpu_check.sh OUTDIR [TOTAL_BUDGET_S]}
BUDGET=${2:-540}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export MPLBACKEND=Agg TQDM_MININTERVAL=5
LOG=$OUT/log.txt
: >"$LOG"
T0=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - T0))); }
say() { echo "[gpu_check +$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }

say "environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
  "$PY" - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton unavailable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(torch.cuda.get_device_name(), "SMs", p.multi_processor_count, "mem GiB", round(p.total_memory / 2**30, 1))
import rapkern, rapkern.dispatch as d
for b in d.backends():
    print("backend", b.name, "availability:", b.availability() or "ok")
EOF
} >>"$LOG"

# 1. Build any compiled extension the project has (none yet: rapkern is pure Python + Triton).
if [ -d csrc ] || grep -qE "ext_modules|CUDAExtension|CppExtension" setup.py 2>/dev/null; then
  say "building the extension in place (at most 240 s)"
  timeout 240 "$PY" setup.py build_ext --inplace >>"$LOG" 2>&1 && say "build ok" || say "BUILD FAILED (see log.txt)"
else
  say "no compiled extension to build"
fi

# 2. GPU tests, capped so the benchmark keeps at least ~4.5 minutes.
PT=$(( $(left) - 290 )); [ "$PT" -gt 200 ] && PT=200
if [ "$PT" -ge 20 ]; then
  say "pytest -m gpu (at most ${PT} s)"
  PTLOG=$(mktemp)
  timeout "$PT" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests >"$PTLOG" 2>&1
  rc=$?
  cat "$PTLOG" >>"$LOG"
  PYTEST_LINE=$(grep -E "passed|failed|error|no tests ran|deselected" "$PTLOG" | tail -1)
  rm -f "$PTLOG"
  [ $rc -eq 124 ] && PYTEST_LINE="TIMED OUT after ${PT} s: $PYTEST_LINE"
  say "pytest exit $rc: $PYTEST_LINE"
else
  PYTEST_LINE="not run (no time left)"
  say "pytest skipped: no time left"
fi

# 2b. compute-sanitizer memcheck and racecheck on the CUDA extension's GPU tests (issue 15), with the caching
#     allocator off so out-of-bounds accesses land outside any allocation; 60 s each at most.
if command -v compute-sanitizer >/dev/null && [ -f rapkern/_C_cuda*.so ] 2>/dev/null && [ "$(left)" -gt 330 ]; then
  for tool in memcheck racecheck; do
    say "compute-sanitizer --tool $tool on the CUDA attention forward/backward GPU tests (at most 60 s)"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 60 compute-sanitizer --tool "$tool" --error-exitcode 99 \
      "$PY" -m pytest -m gpu -q -x -p no:cacheprovider tests/test_cuda_ext.py tests/test_cuda_bwd.py \
      -k "matches_reference and 64 and fp16" \
      >>"$LOG" 2>&1
    say "compute-sanitizer $tool exit $? (0 clean, 99 errors found, 124 timed out)"
  done
fi

# 3. The benchmark, one process per section (a kernel that breaks the CUDA context costs one section),
#    with a soft deadline inside (jobs not started by then are recorded as skipped) and a hard one outside.
rm -f "$OUT/results.csv" "$OUT/env.json"
EXTRA=""
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || { EXTRA="--device cpu --tiny"; say "NO CUDA DEVICE: running the benchmark's plumbing at tiny sizes on the CPU"; }
END=$((T0 + BUDGET - 25))          # leave time for plots + summary
UNTIL=$((END - 40))                # no new job after this
# Each section may start jobs only within its share of the time left, so later targets still run.
for spec in lag_fwd:40 lag_fwdbwd:45 band32k:55 routing:40 other_priors:100; do
  sec=${spec%%:*}; share=${spec##*:}
  now=$(date +%s); rem=$((END - now))
  if [ "$rem" -lt 15 ]; then say "section $sec: no time left"; continue; fi
  soft=$((now + (UNTIL - now) * share / 100))
  say "section $sec (new jobs until +$((soft - now)) s, hard limit ${rem} s)"
  timeout -k 10 "$rem" "$PY" -m bench.gpu_check --out "$OUT" --sections "$sec" --until "$soft" $EXTRA >>"$LOG" 2>&1
  rc=$?
  [ $rc -ne 0 ] && say "section $sec exit $rc (124 = hard timeout; its rows so far are kept)"
done

# The Hugging Face row: a randomly initialized BERT of MiniLM's config (the weights do not travel here).
if [ $(( $(date +%s) - T0 )) -lt 420 ]; then
  timeout -k 10 150 "$PY" -m bench.transformers_bench --device cuda --weights random --out "$(mktemp -d)" >>"$LOG" 2>&1 \
    || say "transformers bench failed (see log.txt)"
fi

# 4. Plots and summary, printed last.
"$PY" -m bench.gpu_check --out "$OUT" --finish >/dev/null 2>>"$LOG" || say "summary failed"
say "done in $(($(date +%s) - T0)) s; files: $(cd "$OUT" && ls | tr '\n' ' ')"
echo
echo "pytest -m gpu: $PYTEST_LINE"
[ -f "$OUT/summary.md" ] && cat "$OUT/summary.md" || { echo "no summary; last log lines:"; tail -40 "$LOG"; }
