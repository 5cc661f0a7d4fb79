"""The benchmark scripts stay runnable: each imports and parses its own ``--help`` (none is run here;
they time the real model for minutes; see README "Benchmarks")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("bench_*.py")))
def test_bench_script_help(script):
    if script == "bench_linear.py":  # no flags: import it and check its entry point instead
        code = (
            f"import sys; sys.path.insert(0, {str(BENCH)!r}); import bench_linear; assert callable(bench_linear.main)"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
        return
    out = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout
