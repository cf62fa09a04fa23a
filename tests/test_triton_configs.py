"""The Triton autotune tables: per-version selection, class selection, lookups, the safe path under a Triton
version without a verified table (first-use pruning by the loaded kernel's spills), and the launches declined
for lack of a spill-free config (no GPU needed)."""

import importlib.util

import pytest

pytest.importorskip("triton")

from rapkern.backends.triton_attention import _aot  # noqa: E402
from rapkern.backends.triton_attention import _config_tables as T  # noqa: E402
from rapkern.backends.triton_attention import configs as C  # noqa: E402


def _configs_under(monkeypatch, version):
    """A separate instance of configs.py as it loads when triton ``version`` is installed."""
    monkeypatch.setattr(T, "installed_triton", lambda: version)
    spec = importlib.util.spec_from_file_location(f"{C.__package__}._configs_probe", C.__file__)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def fake_tables(tmp_path, monkeypatch):
    """A package with tables for triton 3.6 and 3.8."""
    pkg = tmp_path / "faketables"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for v in ("3_6", "3_8"):
        (pkg / f"triton_{v}.py").write_text(f"TRITON = '{v.replace('_', '.')}.0'\nTABLE = {{}}\nMETA = {{}}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "faketables"


@pytest.mark.parametrize("installed, table, exact", [
    ("3.6.0", (3, 6), True), ("3.8.1", (3, 8), True), ("3.7.2", (3, 6), False), ("3.9.0+git1234", (3, 8), False),
    ("4.0.0", (3, 8), False), ("3.2.0", (3, 6), False),  # below every known version: the lowest known
])
def test_select_table_by_version(fake_tables, installed, table, exact):
    sel = T.select(fake_tables, installed)
    assert (sel.table_version, sel.exact) == (table, exact)


def test_parse_version_names_the_argument():
    assert T.parse_version("3.6.0") == (3, 6)
    with pytest.raises(ValueError, match="triton version must look like 'MAJOR.MINOR"):
        T.parse_version("nightly")


def test_unknown_version_is_unverified_and_says_so(monkeypatch):
    probe = _configs_under(monkeypatch, "3.99.1")
    assert not probe.SELECTION.exact and not probe.VERIFIED
    assert probe.SELECTION.table_version == max(T.known_versions(T.__name__))  # the nearest lower known
    text = probe.describe_table()
    assert "3.99.1 has no generated table" in text and "nearest lower" in text and "UNVERIFIED" in text
    assert "dropped" in text
    # candidates: the table's configs, then smaller fallbacks (first-use pruning may need them)
    key = "fwd|plain|90|128|1"
    cands = probe._candidates(key)
    assert cands[: len(probe.TABLE[key])] == [tuple(c) for c in probe.TABLE[key]]
    assert (16, 16, 4, 1) in cands
    assert all(c in probe.all_configs("fwd") for c in cands)


def test_unknown_version_prunes_spilling_configs_at_first_use(monkeypatch):
    probe = _configs_under(monkeypatch, "3.99.1")
    calls = []

    def loaded(kernel, cls, prior, d_pad, cfg, dtype="fp16"):  # stands in for compile + load on a GPU
        calls.append((kernel, cfg))
        return (255, 0) if cfg[0] * cfg[1] <= 32 * 32 else (255, 48)

    monkeypatch.setattr(_aot, "loaded_spills", loaded)
    monkeypatch.setattr(probe, "_gpu_checks", lambda: True)
    got = probe.configs_for("fwd", 90, 128, "plain", 1)
    assert got and all(c[0] * c[1] <= 32 * 32 for c in got)
    n = len(calls)
    assert probe.configs_for("fwd", 90, 128, "plain", 1) == got and len(calls) == n  # checked once per key
    assert "1 keys checked" in probe.describe_table()


def test_unknown_version_declines_when_every_candidate_spills(monkeypatch):
    probe = _configs_under(monkeypatch, "3.99.1")
    monkeypatch.setattr(_aot, "loaded_spills", lambda *a, **k: (255, 16))
    monkeypatch.setattr(probe, "_gpu_checks", lambda: True)
    why = probe.unsupported_reason(90, 128, False, False, "lag", False, False)
    assert why and "no spill-free fwd kernel config on sm_90" in why and "16 spills" in why
    assert "unverified" in why


def test_verified_table_lists_its_entries_without_compiling(monkeypatch):
    if not C.SELECTION.exact:
        pytest.skip(f"no table generated for the installed triton {C.SELECTION.installed}")
    monkeypatch.setattr(_aot, "loaded_spills", lambda *a, **k: pytest.fail("a verified key must not compile"))
    monkeypatch.setattr(C, "_gpu_checks", lambda: True)
    fresh = [k for k in C.TABLE if k not in set(C.STALE_KEYS)]
    for key in fresh[:20]:
        kernel, cls, arch, d, prior = key.split("|")
        assert C.configs_for(kernel, int(arch), int(d), cls, int(prior)) == [tuple(c) for c in C.TABLE[key]]


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


def test_lag_grad_tile_is_square():
    for arch in (80, 90):
        for d in (64, 128, 256):
            cfg = C.lag_grad_config(arch, d)
            if cfg is not None:
                assert cfg[0] == cfg[1], (arch, d, cfg)


def test_empty_keys_are_declined_with_a_reason():
    kinds = {v: k for k, v in C.PRIOR_CODES.items()}
    empty = [k for k, v in C.TABLE.items() if not C._candidates(k)]
    for key in empty:
        kernel, cls, arch, d, prior = key.split("|")
        kind = kinds[int(prior)]
        grads = cls in ("grad", "lowrank", "laggrad")
        why = C.unsupported_reason(int(arch), int(d), cls == "fp32", cls == "dropout", kind, grads, grads)
        assert why and "no spill-free" in why, (key, why)


def test_fp32_and_dropout_with_gradients_are_declined():
    assert "fp32" in C.unsupported_reason(90, 128, True, False, "lag", False, False)
    assert "dropout" in C.unsupported_reason(90, 64, False, True, "lag", True, False)
    assert C.unsupported_reason(90, 64, True, False, "lag", False, False) is None


def test_length_bucket_is_coarse():
    assert C.length_bucket(1) == 64 and C.length_bucket(1000) == 1024 == C.length_bucket(1024)
    assert C.length_bucket(1025) == 2048


def test_required_keys_are_verified_and_served():
    """The plain class of every kernel at head dims 64 and 128 (the benchmarked cases) is verified in the
    installed Triton's table: compiled spill-free from the current kernel sources, with a config."""
    if not C.SELECTION.exact:
        pytest.skip(f"no table generated for the installed triton {C.SELECTION.installed}")
    req = C.required_keys()
    assert len(req) == 3 * 2 * 2 * 5
    stale = sorted(set(req) & set(C.STALE_KEYS))
    assert not stale, f"required keys stale or missing (tools/gen_triton_configs.py --verify): {stale}"
    assert all(C.TABLE[k] for k in req), [k for k in req if not C.TABLE[k]]


def test_stale_key_of_the_installed_table_is_pruned_at_first_use(monkeypatch):
    """A key whose entry was compiled from other kernel sources (or is missing) is never picked unchecked: on
    a GPU its candidates are compiled and loaded first and the spilling ones dropped."""
    probe = _configs_under(monkeypatch, C.SELECTION.installed)
    key = "fwd|plain|90|128|1"
    probe._STALE_SET.add(key)
    monkeypatch.setattr(probe, "_gpu_checks", lambda: True)
    seen = []

    def loaded(kernel, cls, prior, d_pad, cfg, dtype="fp16"):
        seen.append(cfg)
        return (200, 0) if cfg[0] <= 32 else (255, 24)

    monkeypatch.setattr(_aot, "loaded_spills", loaded)
    got = probe.configs_for("fwd", 90, 128, "plain", 1)
    assert seen and got and all(c[0] <= 32 for c in got)
