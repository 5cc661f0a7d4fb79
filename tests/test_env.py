"""skipray.env: the environment of engine processes; THP_MEM_ALLOC_ENABLE really puts torch's large
buffers in huge pages when set before torch allocates (on kernels whose THP mode allows it)."""

import subprocess
import sys
from pathlib import Path

import pytest

from skipray import env

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import sys
if sys.argv[1] == "apply":
    from skipray.env import apply
    apply()
import torch
x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, written
print([int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("AnonHugePages")][0])
"""


def test_worker_env_defaults_and_overrides(monkeypatch):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert env.worker_env() == {"HF_HUB_OFFLINE": "0", "THP_MEM_ALLOC_ENABLE": "1"}
    env.apply()
    import os

    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "0"  # setdefault


def thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text[text.index("[") + 1 : text.index("]")]


@pytest.mark.skipif(
    thp_mode() not in ("always", "madvise") or not Path("/proc/self/smaps_rollup").exists(),
    reason="needs Linux transparent huge pages in 'always' or 'madvise' mode",
)
def test_apply_before_torch_puts_large_buffers_in_huge_pages():
    def huge_kib(mode: str) -> int:
        clean = {k: v for k, v in __import__("os").environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        r = subprocess.run(
            [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=ROOT, env=clean, timeout=120
        )
        assert r.returncode == 0, r.stderr[-2000:]
        return int(r.stdout.split()[-1])

    assert huge_kib("apply") >= 32 << 10  # most of the 64 MiB
    if thp_mode() == "madvise":
        assert huge_kib("plain") < 32 << 10  # without it, torch does not ask for huge pages
