"""Placeholder: replaced by the prior modules (issue 9)."""
import torch


class PriorModule(torch.nn.Module):
    pass


class LagPrior(PriorModule):
    pass


class BandPrior(PriorModule):
    pass


class FactorPrior(PriorModule):
    pass


class FixedPrior(PriorModule):
    pass
