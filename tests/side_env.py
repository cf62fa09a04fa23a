"""The Python environments the ahead-of-time compile gates run under.

"default" is the interpreter running the tests (triton 3.8 with torch 2.14 here); "triton-3.6" is the side
environment tools/triton36_env.sh builds (torch 2.11 + triton 3.6, what the lent GPU machines and many users
run), at <repo>/.venv-triton36 or $RAPKERN_TRITON36_ENV. A missing side environment is built on first use
(about two to five minutes; later sessions reuse it). If it cannot be built the gate fails with pip's reason;
only RAPKERN_SKIP_SIDE_ENV=1 turns that into a skip (say why where you set it).

A gate runs as ``<python> <script> ...`` in a subprocess with the repo and tests/ on PYTHONPATH and
TRITON_INTERPRET=0, so both environments run the same code the same way.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENVS = ("default", "triton-3.6")
SKIP_VAR = "RAPKERN_SKIP_SIDE_ENV"


@dataclass(frozen=True)
class Env:
    name: str
    python: str
    triton: str  # triton.__version__ in that environment

    def run(self, args: list[str], timeout: float = 1800) -> subprocess.CompletedProcess:
        env = {**os.environ, "TRITON_INTERPRET": "0",
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
        return subprocess.run([self.python, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)


def aot_workers(cap: int = 8) -> int:
    """Compile processes for an ahead-of-time gate: $RAPKERN_AOT_WORKERS if set (e.g. 1 on a shared machine),
    else one per CPU up to ``cap``."""
    env = os.environ.get("RAPKERN_AOT_WORKERS")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"RAPKERN_AOT_WORKERS must be a positive integer, got {env!r}")
        return int(env)
    return max(1, min(cap, os.cpu_count() or 1))


def side_dir() -> Path:
    return Path(os.environ.get("RAPKERN_TRITON36_ENV") or ROOT / ".venv-triton36")


def _triton_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import triton; print(triton.__version__)"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "0"})
    if out.returncode:
        raise RuntimeError(f"{python} cannot import triton: {out.stderr.strip()[-500:]}")
    return out.stdout.strip()


@functools.lru_cache(maxsize=None)
def _ensure(name: str) -> tuple[Env | None, str]:
    """(Env, "") or (None, why not)."""
    if name == "default":
        return Env(name, sys.executable, _triton_version(sys.executable)), ""
    if name != "triton-3.6":
        raise ValueError(f"env must be one of {ENVS}, got {name!r}")
    python = side_dir() / "bin" / "python"
    build = subprocess.run(["bash", str(ROOT / "tools" / "triton36_env.sh")], cwd=ROOT, capture_output=True,
                           text=True, timeout=3600)
    if build.returncode or not python.exists():
        tail = "\n".join((build.stderr or build.stdout).strip().splitlines()[-14:])
        return None, f"tools/triton36_env.sh could not build {side_dir()} (exit {build.returncode}):\n{tail}"
    return Env(name, str(python), _triton_version(str(python))), ""


def ensure(name: str) -> Env:
    """The environment ``name`` (built if missing); fails the test, or skips it under RAPKERN_SKIP_SIDE_ENV=1,
    when it cannot be built."""
    env, why = _ensure(name)
    if env is None:
        if os.environ.get(SKIP_VAR) == "1":
            pytest.skip(f"{SKIP_VAR}=1 and the side environment is unavailable: {why}")
        pytest.fail(f"{why}\n(set {SKIP_VAR}=1 to skip the gates that need it)", pytrace=False)
    return env


def run_json(env: Env, args: list[str], timeout: float = 1800) -> dict:
    """Run a gate script that writes its JSON report to the path passed after --json; returns the report."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "report.json"
        proc = env.run([*args, "--json", str(out)], timeout=timeout)
        if not out.exists():
            raise AssertionError(f"gate under {env.name} ({env.python}, triton {env.triton}) wrote no report "
                                 f"(exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        report = json.loads(out.read_text())
    report["stdout"] = proc.stdout
    return report
