"""Attention statistics and attention distillation without an Lq×Lk buffer (issue 9).

Problem objects shared by the public functions and the backends (torch blocked, triton). The public
functions ``attention_stats`` and ``attention_kl`` validate, build these, and dispatch
(``dispatch.choose("attention_stats" | "attention_kl", problem, backend)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .priors import Prior


@dataclass
class StatsProblem:
    q: Tensor  # (B, Hq, Lq, D)
    k: Tensor  # (B, Hkv, Lk, D), Hq % Hkv == 0
    prior: Prior | None
    alpha: float | Tensor  # float, or tensor () / (Hq,)
    causal: bool
    key_padding_mask: Tensor | None  # bool (B, Lk), True = ignore
    scale: float

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype


@dataclass
class KLProblem:
    teacher: StatsProblem  # the teacher's q, k, prior, alpha, scale (no gradient flows to it)
    student: StatsProblem  # the student's; shares causal and key_padding_mask with the teacher
    temperature: float  # divides both logit sets
    reduction: str  # "none" | "sum" | "mean"

    @property
    def device(self) -> torch.device:
        return self.student.q.device

    @property
    def dtype(self) -> torch.dtype:
        return self.student.q.dtype
