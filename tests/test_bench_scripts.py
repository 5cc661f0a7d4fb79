"""The benchmark scripts stay runnable: each imports and parses its own ``--help`` (none is run here;
they time the real model for minutes; see README "Benchmarks"), and the shipped adapters record how
they were made in a form that runs from the project root."""

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


@pytest.mark.parametrize("package", ["smollm2-skip", "smollm2-skip-2x"])
def test_shipped_adapters_record_commands_relative_to_the_project(package):
    import json
    import shlex

    meta = json.loads((BENCH.parent / "skipray" / "assets" / package / "skipray.json").read_text())
    args = shlex.split(meta["command"])
    assert args[:2] == ["skipray", "train"], meta["command"]
    assert not [a for a in args if a.startswith("/")], meta["command"]
    assert meta["made_by"] == "scripts/train_default.sh"


def test_package_adapter_makes_commands_project_relative(tmp_path):
    sys.path.insert(0, str(BENCH.parent / "scripts"))
    try:
        from package_adapter import project_command
    finally:
        sys.path.pop(0)
    cmd = "/opt/x/.venv/bin/skipray train --data /elsewhere/runs/data/self128 --out /proj/runs/a --lr 2e-4"
    assert project_command(cmd, Path("/proj")) == "skipray train --data runs/data/self128 --out runs/a --lr 2e-4"
