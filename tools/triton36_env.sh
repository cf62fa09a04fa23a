#!/usr/bin/env bash
# Build the side environment with torch 2.11 + triton 3.6 (what the lent GPU machines and many users run),
# used by the ahead-of-time compile gate (tests/side_env.py) and tools/gen_triton_configs.py.
#
#   tools/triton36_env.sh            -> creates <repo>/.venv-triton36 (idempotent: a stamp file records
#                                       the install line; a finished env is reused as is)
#   RAPKERN_TRITON36_ENV=/path ...   -> put it elsewhere
#
# The install line is the one in ../shared/reference/packages.md. numpy < 2.4 because triton 3.6's
# interpreter needs it. rapkern itself is not installed: callers put the repo root on PYTHONPATH.
# Exit status 0 = ready; non-zero = not built (pip's error is on stderr, the last lines repeated at the end).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
env_dir="${RAPKERN_TRITON36_ENV:-$root/.venv-triton36}"
python_bin="${RAPKERN_SIDE_PYTHON:-}"
packages=(torch==2.11.0 "triton==3.6.0" "numpy<2.4" pytest)
stamp="$env_dir/.rapkern-stamp"
want="${packages[*]}"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$env_dir/bin/python" ]]; then
    echo "triton36_env: ready at $env_dir ($want)"
    exit 0
fi

# Same interpreter as the main venv (Python 3.11 wheels), unless told otherwise.
if [[ -z "$python_bin" ]]; then
    if [[ -f "$root/.venv/pyvenv.cfg" ]]; then
        python_bin="$(sed -n 's/^executable = //p' "$root/.venv/pyvenv.cfg")"
    fi
    [[ -x "$python_bin" ]] || python_bin="$(command -v python3.11 || command -v python3)"
fi

# One builder at a time (pytest workers, parallel helpers): the others wait, then see the stamp.
# The lock lives outside the repo (the repo's .gitignore covers only the env folder).
mkdir -p "$(dirname "$env_dir")"
exec 9>"${TMPDIR:-/tmp}/rapkern-side-env-$(printf %s "$env_dir" | cksum | cut -d' ' -f1).lock"
flock 9
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$env_dir/bin/python" ]]; then
    echo "triton36_env: ready at $env_dir ($want)"
    exit 0
fi
# An env without the stamp is half-built (interrupted pip) or built from another line: start afresh.
rm -rf "$env_dir"
echo "triton36_env: building $env_dir with $python_bin: $want"
"$python_bin" -m venv "$env_dir"
log="$env_dir/pip.log"
if ! "$env_dir/bin/python" -m pip install --quiet --disable-pip-version-check "${packages[@]}" >"$log" 2>&1; then
    echo "triton36_env: pip could not install [$want]; last lines of $log:" >&2
    grep -v "^WARNING: Location" "$log" | tail -n 12 >&2
    exit 3
fi
"$env_dir/bin/python" - <<'EOF'
import numpy, torch, triton
assert triton.__version__.startswith("3.6"), triton.__version__
print(f"triton36_env: torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")
EOF
echo "$want" > "$stamp"
echo "triton36_env: ready at $env_dir"
