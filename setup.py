"""Package metadata lives in pyproject.toml; this file builds the compiled kernels, and never fails the install.

``rapkern._C`` (csrc/ops.cpp, csrc/module.cpp, csrc/autograd.cpp, csrc/cpu/*.cpp): the op schemas, the C++
autograd kernel and the CPU kernels, built with torch's ``BuildExtension`` (ninja). torch must be importable at
build time, so install with ``pip install --no-build-isolation`` (the Makefile does). When the build cannot
run or fails, the package installs without it: the reason (the compiler's last lines) goes to
``rapkern/_C_build.txt``, which ``rapkern._ext`` reports as "rapkern._C not built: <reason>" and dispatch skips
the ``cpp`` backend.

Flags: ``-O3 -fopenmp`` (at::parallel_for is an OpenMP ``#pragma`` expanded in our own translation units: without
-fopenmp it runs on one thread; at link the module then needs libgomp.so.1, which resolves to the copy torch has
already loaded, so ``torch.set_num_threads`` governs our loops too). ``-march=native`` by default, because a
source build runs on the machine that will use it and the tile loops and ``at::vec`` fallbacks then get the
host's widest SIMD (AVX2/AVX-512) instead of x86-64's SSE2 baseline. Set ``RAPKERN_CPU_ARCH`` to build for
another machine (e.g. ``x86-64-v3`` for a wheel or container image shared across hosts: ``-march=native``
there can mean "illegal instruction"), or to ``none`` for the compiler's default.

``rapkern._C_cuda`` (issue 15; csrc/cuda/*.cu, CUDA kernels only, registered against the schemas of ``_C``):
a separate module so that a CUDA build failure never takes the CPU kernels down. ``RAPKERN_BUILD_CUDA``:
``1`` forces it, ``0`` skips it, unset builds it when csrc/cuda has sources, nvcc is found and torch is a CUDA
build. Its failures go to ``rapkern/_C_cuda_build.txt`` the same way.

``RAPKERN_SKIP_EXT=1`` installs without building either (the Makefile then builds them with
``setup.py build_ext --inplace``, whose ninja build directory persists, so later C++ edits rebuild incrementally).
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
import traceback

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
TAIL_LINES = 60  # of the compiler's output, kept in the note

try:
    import torch  # noqa: F401
    from torch.utils import cpp_extension

    TORCH_ERROR = None
    _Base = cpp_extension.BuildExtension
except Exception as exc:  # noqa: BLE001 - any failure to import torch means: no compiled kernels
    cpp_extension = None
    TORCH_ERROR = (
        f"torch was not importable when the package was built ({type(exc).__name__}: {exc}); install torch "
        "first, then `pip install --no-build-isolation -e .` (the Makefile does both)"
    )
    _Base = _setuptools_build_ext


def _put_ninja_on_path() -> None:
    """torch looks for ``ninja`` on PATH only; the one pip installed next to this Python may not be there."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja

        dirs.insert(0, ninja.BIN_DIR)
    except Exception:  # noqa: BLE001 - no ninja package: PATH as it is (torch falls back to a slower build)
        pass
    os.environ["PATH"] = os.pathsep.join(dirs + [os.environ.get("PATH", "")])


def _sources(*patterns) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for pat in patterns for p in glob.glob(os.path.join(HERE, pat)))


def _arch_flags() -> list[str]:
    arch = os.environ.get("RAPKERN_CPU_ARCH", "native").strip()
    return [] if arch.lower() in ("", "none") else [f"-march={arch}"]


def _cpu_extension():
    sources = _sources("csrc/*.cpp", "csrc/cpu/*.cpp")
    kwargs = dict(
        extra_compile_args={"cxx": ["-O3", "-g0", "-fopenmp", "-Wno-unknown-pragmas", *_arch_flags()]},
        extra_link_args=["-fopenmp"],
        include_dirs=[os.path.join(HERE, "csrc")],
    )
    if cpp_extension is None:  # only a placeholder: build_extension writes TORCH_ERROR as the reason
        return Extension("rapkern._C", sources=sources)
    return cpp_extension.CppExtension("rapkern._C", sources, **kwargs)


def _cuda_extension():
    """``rapkern._C_cuda`` (issue 15): None (not built) unless asked for or everything it needs is here.

    The toolkit folder must hold lib64/libcudart.so: torch guesses CUDA_HOME from nvcc's location, which is wrong
    where nvcc is a wrapper script (e.g. /usr/local/bin/nvcc -> CUDA_HOME=/usr/local), so the guess is checked
    and replaced by the first folder that has both bin/nvcc and lib64/libcudart.so. Architectures sm_80 and
    sm_90a (explicit -gencode flags, so torch adds none of its own); ``-Xptxas -v`` prints each kernel's
    registers, spills and shared memory into the build log.
    """
    mode = os.environ.get("RAPKERN_BUILD_CUDA", "").strip()
    sources = _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
    if mode == "0" or cpp_extension is None:
        return None

    def toolkit(d):  # a folder with bin/nvcc and lib64/libcudart.so
        return bool(d) and os.path.isfile(os.path.join(d, "bin", "nvcc")) and bool(
            glob.glob(os.path.join(d, "lib64", "libcudart.so*")))

    guesses = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
               "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    home = next((d for d in guesses if toolkit(d)), None)
    if mode != "1":
        if not sources or torch.version.cuda is None or home is None:
            return None
    if home is not None:
        cpp_extension.CUDA_HOME = home  # read by CUDAExtension (include/library paths) and by the nvcc build rule
        os.environ["CUDA_HOME"] = home
    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo", "-Xptxas", "-v",
                  "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]
    return cpp_extension.CUDAExtension(
        "rapkern._C_cuda",
        sources,
        extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": nvcc_flags},
        include_dirs=[os.path.join(HERE, "csrc")],
    )


def _tail(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[-TAIL_LINES:])


class TolerantBuildExt(_Base):
    """Builds each extension; a failure is written next to where the module would be and the install goes on."""

    def build_extension(self, ext):
        target = self.get_ext_fullpath(ext.name)
        note = os.path.join(os.path.dirname(target), ext.name.rsplit(".", 1)[-1] + "_build.txt")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if TORCH_ERROR is not None:
            return self._failed(ext, target, note, TORCH_ERROR)
        if os.environ.get("RAPKERN_SKIP_EXT") == "1":  # the Makefile builds it in the tree, incrementally, next
            return self._failed(ext, target, note, "skipped (RAPKERN_SKIP_EXT=1): build it with `make build`")
        if not ext.sources:
            return self._failed(ext, target, note, "no C++ sources found under csrc/")
        log = tempfile.TemporaryFile(mode="w+b")
        saved = [os.dup(1), os.dup(2)]
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)  # ninja writes the compiler output to fd 1
        error = None
        try:
            super().build_extension(ext)
        except BaseException as exc:  # noqa: BLE001 - a failed build must not fail the install
            if isinstance(exc, KeyboardInterrupt):
                raise
            error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
            log.seek(0)
            output = log.read().decode(errors="replace")
            log.close()
            sys.stdout.write(output)
            sys.stdout.flush()
        if error is not None:
            first = next((ln.strip() for ln in output.splitlines() if "error:" in ln), error.splitlines()[0])
            return self._failed(ext, target, note, f"the build failed: {first}\n"
                                                   f"compiler output (last lines):\n{_tail(output)}")
        if os.path.exists(note):
            os.remove(note)
        print(f"rapkern: built {ext.name} -> {os.path.relpath(target, HERE)}")

    def _failed(self, ext, target, note, reason: str) -> None:
        if os.path.exists(target):  # never leave a stale module that no longer matches the sources
            os.remove(target)
        with open(note, "w") as f:
            f.write(reason.rstrip() + "\n")
        print(f"rapkern: {ext.name} NOT built, the package installs without it (reason in {note}):\n{reason}",
              file=sys.stderr)

    def copy_extensions_to_source(self):
        # setuptools builds out of place, then copies each module into the tree (editable installs,
        # --inplace): copy what was built and drop any older copy of what failed, with its note either way.
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            name = ext.name.rsplit(".", 1)[-1] + "_build.txt"
            note, note_dest = (os.path.join(os.path.dirname(f), name) for f in (regular_file, inplace_file))
            if os.path.exists(regular_file):
                self.copy_file(regular_file, inplace_file, level=self.verbose)
            elif os.path.exists(inplace_file):
                os.remove(inplace_file)
            if os.path.exists(note):
                shutil.copyfile(note, note_dest)
            elif os.path.exists(note_dest):
                os.remove(note_dest)


_put_ninja_on_path()
ext_modules = [e for e in (_cpu_extension(), _cuda_extension()) if e is not None]
setup(ext_modules=ext_modules, cmdclass={"build_ext": TolerantBuildExt})
