"""The "torch" backend: blocked, memory-efficient pure PyTorch that runs on any device."""

from __future__ import annotations

from ..base import Backend
from .attention import blocked_attention
from .routing import route
from .stats import blocked_kl, blocked_stats


class TorchBackend(Backend):
    name = "torch"
    devices = ("cpu", "cuda")
    dtypes = ("float16", "bfloat16", "float32", "float64")
    deterministic = True
    verdict_by_device_dtype = True

    def attention_reasons(self, p):
        if p.device.type not in self.devices:
            return [f"device type {p.device.type!r} not in {self.devices}"]
        return []

    def attention(self, p):
        return blocked_attention(p)

    def route_reasons(self, p):
        if p.device.type not in self.devices:
            return [f"device type {p.device.type!r} not in {self.devices}"]
        return []

    def route(self, p, return_weights=False):
        return route(p, return_weights)

    # attention_stats / attention_kl: blocked like attention, on the same devices (cpu and cuda)
    def stats_reasons(self, p):
        if p.device.type not in self.devices:
            return [f"device type {p.device.type!r} not in {self.devices}"]
        return []

    def attention_stats(self, p):
        return blocked_stats(p)

    def kl_reasons(self, p):
        if p.device.type not in self.devices:
            return [f"device type {p.device.type!r} not in {self.devices}"]
        return []

    def attention_kl(self, p):
        return blocked_kl(p)
