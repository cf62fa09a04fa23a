"""The "reference" backend: the float64 oracle of rapkern.testing behind the backend interface.

O(L²) memory by design; never chosen by "auto".
"""

from __future__ import annotations

from .base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    devices = ("cpu", "cuda")
    dtypes = ("float16", "bfloat16", "float32", "float64")
    deterministic = True

    def attention_reasons(self, p):
        return []

    def attention(self, p):
        from ..testing import reference_attention

        return reference_attention(
            p.q, p.k, p.v, prior=p.prior, alpha=p.alpha, causal=p.causal,
            key_padding_mask=p.key_padding_mask, scale=p.scale, dropout_p=p.dropout_p, return_lse=True,
        )

    def route_reasons(self, p):
        return []

    def route(self, p, return_weights=False):
        from ..testing import reference_lda_route

        args = (p.q, p.centroids, p.answers)
        kw = dict(tau=p.tau, top_k=p.top_k, normalize=p.normalize, cluster_mask=p.cluster_mask)
        if not return_weights:
            return reference_lda_route(*args, **kw), None, None
        out, w = reference_lda_route(*args, **kw, return_weights=True)
        if p.top_k is None:
            return out, w, None
        return out, w[0], w[1]

    def stats_reasons(self, p):
        return []

    def attention_stats(self, p):
        from ..testing import reference_attention_stats

        st = reference_attention_stats(p.q, p.k, prior=p.prior, alpha=p.alpha, causal=p.causal,
                                       key_padding_mask=p.key_padding_mask, scale=p.scale)
        return st.entropy.to(p.out_dtype), st.key_mass.to(p.out_dtype)

    def kl_reasons(self, p):
        return []

    def attention_kl(self, p):
        from ..testing import reference_attention_kl

        t, s = p.teacher, p.student
        return reference_attention_kl(
            t.q, t.k, s.q, s.k, prior_t=t.prior, prior_s=s.prior, alpha_t=t.alpha, alpha_s=s.alpha,
            causal=s.causal, key_padding_mask=s.key_padding_mask, temperature=p.temperature, reduction="none",
            scale_t=t.scale, scale_s=s.scale,
        ).to(p.out_dtype)
