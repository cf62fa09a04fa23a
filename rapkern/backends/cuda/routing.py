"""``lda_route`` through ``rapkern::route_fwd`` (csrc/cuda/route_*.cu/.cuh, issue 15): dense and top-k forward.

UNVERIFIED ON A GPU: the kernels compile without spills and their code matches reference_lda_route under the
host emulation (tests/test_cuda_routing.py); no GPU has run them. No backward yet: inputs that need gradients
are declined with that reason.
"""

from __future__ import annotations

import torch

MAX_TOP_K = 64  # csrc/cuda/route_params.h kRouteMaxTopK: the top-k kernel keeps the winners in shared memory
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def route_reasons(p) -> list[str]:
    why = []
    if p.device.type != "cuda":
        why.append(f"device type {p.device.type!r} not in ('cuda',)")
    if p.dtype not in _DTYPES:
        why.append(f"dtype {p.dtype} not supported by the CUDA routing kernels (float16, bfloat16, float32)")
    n = p.centroids.shape[1]
    if p.top_k is not None and MAX_TOP_K < p.top_k < n:
        why.append(f"top_k = {p.top_k} > {MAX_TOP_K} (the CUDA top-k kernel's limit; triton_routing has the same)")
    if torch.is_grad_enabled() and (any(t.requires_grad for t in (p.q, p.centroids, p.answers))
                                    or p.needs_tau_grad):
        why.append("the CUDA routing backward is not implemented yet (issue 15): inputs require grad; use "
                   "backend='triton_routing', or torch.no_grad() for inference")
    return why


def cuda_route(p, return_weights: bool):
    """(out, weights, indices) with a leading group dim, as ``Backend.route`` returns them."""
    if return_weights:  # the caller asked for the N x n (or N x k) weights: the torch backend's plain path
        from ..torch_blocked.routing import route

        return route(p, True)
    n = p.centroids.shape[1]
    top_k = p.top_k if p.top_k is not None and p.top_k < n else 0  # top_k = n: every cluster, the dense kernel
    out, _, _, _ = torch.ops.rapkern.route_fwd(p.q, p.centroids, p.answers, p.cluster_mask, p.tau_value,
                                               p.normalize, top_k)
    return out, None, None
