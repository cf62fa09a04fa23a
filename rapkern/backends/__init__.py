"""Backends, registered fastest first. Each declares what it supports and why it cannot serve an input."""

from __future__ import annotations

from .. import dispatch
from .reference import ReferenceBackend
from .torch_blocked import TorchBackend

dispatch.register(TorchBackend(), priority=0)
dispatch.register(ReferenceBackend(), priority=99)
