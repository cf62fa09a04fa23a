"""The Triton autotune tables: class selection, lookups, and the launches declined for lack of a
spill-free config (no GPU needed)."""

import pytest

pytest.importorskip("triton")

from rapkern.backends.triton_attention import configs as C  # noqa: E402


@pytest.mark.parametrize(
    "kernel, meta, want",
    [
        ("fwd", dict(PRIOR=1), "plain"),
        ("fwd", dict(PRIOR=1, DROPOUT=True), "dropout"),
        ("fwd", dict(PRIOR=3, IEEE=True), "fp32"),
        ("dq", dict(PRIOR=1, NEED_DPRIOR=True, NEED_DALPHA=False), "grad"),
        ("dq", dict(PRIOR=4, NEED_DPRIOR=False, NEED_DALPHA=True), "grad"),
        ("dq", dict(PRIOR=3, NEED_DPRIOR=True, NEED_DALPHA=True), "lowrank"),
        ("dkdv", dict(PRIOR=3, NEED_DPRIOR=True), "lowrank"),
        ("dkdv", dict(PRIOR=2, NEED_DPRIOR=True), "grad"),
        ("dkdv", dict(PRIOR=1, NEED_DPRIOR=False), "plain"),
    ],
)
def test_feature_class(kernel, meta, want):
    assert C.feature_class(kernel, meta) == want


def test_every_launch_key_of_a_supported_case_has_configs():
    for arch in (80, 90):
        for d in (16, 40, 64, 80, 128, 256):
            for kind, code in C.PRIOR_CODES.items():
                assert C.unsupported_reason(arch, d, False, False, kind, False, False) is None, (arch, d, kind)
                for kernel in ("fwd", "dq", "dkdv"):
                    assert C.configs_for(kernel, arch, C.pad_dim(d), "plain", code), (kernel, arch, d, kind)


def test_empty_keys_are_declined_with_a_reason():
    kinds = {v: k for k, v in C.PRIOR_CODES.items()}
    empty = [k for k, v in C._config_table.TABLE.items() if not v]
    assert empty, "expected some keys without a spill-free config (e.g. low-rank gradients at head dim 256)"
    for key in empty:
        kernel, cls, arch, d, prior = key.split("|")
        kind = kinds[int(prior)]
        grads = cls in ("grad", "lowrank")
        why = C.unsupported_reason(int(arch), int(d), cls == "fp32", cls == "dropout", kind, grads, grads)
        assert why and ("spill" in why or "no spill-free" in why), (key, why)


def test_fp32_and_dropout_with_gradients_are_declined():
    assert "fp32" in C.unsupported_reason(90, 128, True, False, "lag", False, False)
    assert "dropout" in C.unsupported_reason(90, 64, False, True, "lag", True, False)
    assert C.unsupported_reason(90, 64, True, False, "lag", False, False) is None


def test_length_bucket_is_coarse():
    assert C.length_bucket(1) == 64 and C.length_bucket(1000) == 1024 == C.length_bucket(1024)
    assert C.length_bucket(1025) == 2048
