import subprocess
import sys

from rapkern import dispatch
from rapkern.info import report


def test_info_lists_every_backend_with_status():
    text = report()
    for b in dispatch.backends():
        assert f"  {b.name} " in text
    assert "torch    " in text and "triton   " in text


def test_info_runs_as_module():
    out = subprocess.run([sys.executable, "-m", "rapkern.info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "backends (priority order):" in out.stdout
