"""Placeholder: replaced by BiasedMultiheadAttention (issue 9)."""
import torch


class BiasedMultiheadAttention(torch.nn.Module):
    pass
