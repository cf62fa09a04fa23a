"""`python -m rapkern.info`: versions, devices, and every backend with why it is or is not available."""

from __future__ import annotations

import platform
import sys

import torch

from . import __version__, _ext, dispatch
from .validate import check_attention, check_route


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception as exc:  # noqa: BLE001 - we report, not raise
        return f"not importable ({type(exc).__name__}: {exc})"


def _probe(device: str):
    """A tiny representative problem per op on ``device`` to ask each backend for its reasons."""
    dt = torch.float16 if device == "cuda" else torch.float32
    q = torch.zeros(1, 2, 8, 16, device=device, dtype=dt)
    attn = check_attention(q, q, q, prior=None, alpha=1.0, causal=False, key_padding_mask=None,
                           scale=None, dropout_p=0.0)
    x = torch.zeros(4, 16, device=device, dtype=dt)
    route = check_route(x, x, x, tau=0.1, top_k=None, normalize=True)
    return attn, route


def _extension_lines(max_lines: int = 25) -> list[str]:
    """Whether rapkern._C (the C++ kernels) is built and loads, and if not why (the build's compiler output)."""
    why = _ext.details()
    if why is None:
        import rapkern._C as mod

        return [f"_C       built ({mod.__file__})"]
    reason = why.splitlines()
    more = [f"         ... ({len(reason) - max_lines} more lines)"] if len(reason) > max_lines else []
    return [f"_C       {reason[0]}"] + [f"         {ln}" for ln in reason[1:max_lines]] + more


def report() -> str:
    lines = [
        f"rapkern  {__version__}",
        f"python   {sys.version.split()[0]} ({platform.platform()})",
        f"torch    {torch.__version__} (CUDA build {torch.version.cuda})",
        f"triton   {_version('triton')}",
        f"numpy    {_version('numpy')}",
    ]
    lines += _extension_lines()
    cuda = torch.cuda.is_available()
    if cuda:
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            lines.append(f"device   cuda:{i} {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    lines.append(f"device   cpu ({torch.get_num_threads()} threads)")
    lines.append("")
    lines.append("backends (priority order):")
    probes = {"cpu": _probe("cpu")}
    if cuda:
        probes["cuda"] = _probe("cuda")
    for b in dispatch.backends():
        why = b.availability()
        caps = f"devices={','.join(b.devices)} dtypes={','.join(b.dtypes)} deterministic={b.deterministic}"
        lines.append(f"  {b.name:<10} {'unavailable: ' + why if why else 'available'}  [{caps}]")
        if getattr(b, "status", None):  # e.g. kernels no GPU run has checked yet
            lines.append(f"      status: {b.status}")
        if why:
            continue
        for dev, (attn, route) in probes.items():
            auto = b.devices if b.auto_devices is None else b.auto_devices
            r_attn, r_route = b.attention_reasons(attn), b.route_reasons(route)
            tag = "" if dev in auto else " (explicit only)"
            lines.append(f"      {dev}{tag}: attention {'ok' if not r_attn else '; '.join(r_attn)}"
                         f" | lda_route {'ok' if not r_route else '; '.join(r_route)}")
    lines += _triton_config_lines()
    return "\n".join(lines)


def _triton_config_lines() -> list[str]:
    """Which spill-free config tables the Triton kernels use under the installed Triton, and whether they were
    verified for it (an unknown version gets a safe, unverified choice, said here)."""
    try:
        from .backends.triton_attention import configs as attn
        from .backends.triton_attention import stats
        from .backends.triton_routing import configs as routing
    except Exception as e:  # triton missing or broken: the backends' lines above say why
        return ["", f"triton configs: unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"]
    return ["", "triton configs:", f"  attention  {attn.describe_table()}", f"  stats      {stats.describe_table()}",
            f"  routing    {routing.describe_table()}"]


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
