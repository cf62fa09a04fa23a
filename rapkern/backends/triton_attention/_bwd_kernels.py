"""Compatibility re-exports: the backward kernels live in _dq_kernel.py and _dkdv_kernel.py (one kernel per
module, so each kernel's config-table fingerprint covers only its own source), the lag-table diagonal sums
in _lag_diag.py. Not part of any fingerprint."""

from ._dkdv_kernel import _attn_bwd_dkdv_kernel
from ._dq_kernel import _attn_bwd_dq_kernel
from ._lag_diag import _lag_diag_sums

__all__ = ["_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_lag_diag_sums"]
