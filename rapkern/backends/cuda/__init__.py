"""The "cuda" backend: rapkern's hand-written CUDA kernels (rapkern._C_cuda, csrc/cuda/, issue 15), called as the
same torch.library ops as the C++ CPU kernels (the dispatcher picks the CUDA implementation for CUDA tensors).

Attention forward and backward, LDA routing forward and backward; see ``CudaBackend``.
"""

from __future__ import annotations

import torch

from ..base import Backend
from ..cpp.attention import cpp_attention
from . import _load
from .routing import cuda_route, route_reasons

HEAD_DIMS = (64, 128)  # compiled kernels: D == Dv in HEAD_DIMS (csrc/cuda/fwd_params.h fwd_head_dim_supported)


class CudaBackend(Backend):
    """CUDA C++ kernels: attention forward (tensor cores for fp16/bf16, SIMT for fp32) and a SIMT backward (every
    prior kind, per-head alpha, causal, key padding, GQA, dropout, head dims 64 and 128; gradients of q, k, v, the
    prior tensors and alpha, bitwise deterministic: fixed-order partial reductions, no float atomics).

    UNVERIFIED ON A GPU: no GPU run has executed these kernels yet (issue 15). On a CPU they compile and link for
    sm_80/sm_90a without spills, their index arithmetic is unit-tested (tests/test_cuda_index.py) and the
    kernels' code runs under a host emulation of CUDA threads against the float64 reference
    (tests/test_cuda_ext.py, test_cuda_bwd.py). Until the GPU check (tests marked ``gpu`` there, plus
    compute-sanitizer) has passed, "auto" never picks this backend (``auto_devices = ()``): it runs only when
    asked for by name.
    """

    name = "cuda"
    devices = ("cuda",)
    auto_devices = ()  # explicit only until a GPU run has checked the kernels (issue 15)
    dtypes = ("float16", "bfloat16", "float32")
    supports_prior_grad = True
    deterministic = True  # each output element has one writer; partials reduced in a fixed order
    checks_prior_values = True  # csrc/cuda/attention_fwd_host.cpp check_values, same messages as priors.py
    verified_on_gpu = False
    status = "unverified: no GPU run has checked these kernels yet (issue 15); explicit backend='cuda' only"

    def availability(self):
        return _load.load()

    def attention_reasons(self, p):
        reasons = []
        if p.device.type not in self.devices:
            reasons.append(f"device type {p.device.type!r} not in {self.devices}")
        if p.dtype == torch.float64:
            reasons.append("float64 is not served by the CUDA kernels (they compute in float32); "
                           "use backend='torch' for float64")
        d, dv = p.q.shape[3], p.v.shape[3]
        if d != dv or d not in HEAD_DIMS:
            reasons.append(f"head dims D = {d}, Dv = {dv}: the CUDA kernels serve D == Dv in {HEAD_DIMS} "
                           "(backend='triton' serves others)")
        return reasons

    def attention(self, p):
        return cpp_attention(p)  # the same op call as the cpp backend; the dispatcher picks the CUDA kernel

    # lda_route: dense and top-k, forward and backward (rapkern::route_fwd / route_bwd; routing.py)
    def route_reasons(self, p):
        return route_reasons(p)

    def route(self, p, return_weights=False):
        return cuda_route(p, return_weights)

