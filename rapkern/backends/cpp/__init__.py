"""The "cpp" backend: rapkern's C++ CPU kernels (rapkern._C, csrc/cpu/), called as torch.library ops."""

from __future__ import annotations

import torch

from ... import _ext
from ..base import Backend
from .attention import call_fwd, cpp_attention


class CppBackend(Backend):
    name = "cpp"
    devices = ("cpu",)
    dtypes = ("float16", "bfloat16", "float32")
    deterministic = True  # bitwise independent of the thread count (fixed-order reductions, no atomics)
    checks_prior_values = True  # csrc/cpu/common.h check_prior_values, same messages as rapkern/priors.py
    verdict_by_device_dtype = True  # (a shape-dependent speed rule in auto_reasons would have to turn this off)

    def availability(self):
        return _ext.load()

    def attention_reasons(self, p):
        reasons = []
        if p.device.type not in self.devices:
            reasons.append(f"device type {p.device.type!r} not in {self.devices}")
        if p.dtype == torch.float64:
            reasons.append("float64 is not served by the C++ kernels (they compute in float32); "
                           "use backend='torch' for float64")
        return reasons

    def auto_reasons(self, p) -> list[str]:
        """Reasons for "auto" not to pick this backend although it can serve ``p`` (measured speed rules);
        none: the seed-windows benchmark measured it fastest at every size (README's CPU table)."""
        return []

    def attention(self, p):
        return cpp_attention(p)

    # rapkern.attention's direct path: the op validates every argument itself (same conditions as
    # rapkern/validate.py, tested in tests/test_direct_path.py), so the Python checks run only to word an error.
    validates_in_kernel = True

    def attention_direct(self, q, k, v, prior, alpha, causal, key_padding_mask, scale, dropout_p):
        return call_fwd(q, k, v, prior, alpha, causal, key_padding_mask, scale, dropout_p)
