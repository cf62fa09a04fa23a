"""Backends, registered fastest first. Each declares what it supports and why it cannot serve an input."""

from __future__ import annotations

from .. import dispatch
from .cpp import CppBackend
from .cuda import CudaBackend
from .reference import ReferenceBackend
from .torch_blocked import TorchBackend
from .triton_attention import TritonBackend
from .triton_routing import TritonRoutingBackend

dispatch.register(TorchBackend(), priority=0)
dispatch.register(TritonBackend(), priority=0)
dispatch.register(TritonRoutingBackend(), priority=0)
dispatch.register(ReferenceBackend(), priority=99)
# the C++ CPU kernels ahead of the pure-PyTorch tile loop ("auto" falls back to torch when _C is not built)
dispatch.register(CppBackend(), priority=0)
# the CUDA kernels (rapkern._C_cuda): explicit only (auto_devices=()) until a GPU run has checked them (issue 15)
dispatch.register(CudaBackend(), priority=0)
