"""Adapters to other libraries' models. Each submodule imports its library lazily (only when used), so
``import rapkern`` never pulls in an optional dependency.

* ``rapkern.integrations.transformers``: rapkern as a Hugging Face transformers attention implementation
  (``enable(model, prior=..., gate=..., stats=...)``), extra ``rapkern[hf]``.
"""
