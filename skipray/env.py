"""Environment variables for the processes that run skipray engines (imports neither torch nor ray).

Contract: ``worker_env()`` -> the ``env_vars`` for the Ray ``runtime_env`` of the actors and replicas a
skipray entry point starts: each of ``DEFAULTS``, unless this process sets its own value (``=0`` opts out).
``apply()`` puts the same into this process's environment (``setdefault``) for entry points that run an
engine in-process; it must run before torch's first tensor allocation, as torch reads
``THP_MEM_ALLOC_ENABLE`` once.

* ``HF_HUB_OFFLINE=1``: models come from local files and the skipray cache, never from the Hub.
* ``THP_MEM_ALLOC_ENABLE=1``: PyTorch's CPU allocator (pytorch#115990, torch >= 2.2) puts buffers of
  2 MiB and more in transparent huge pages (``madvise``; a kernel set to ``never`` ignores it). A
  batch-1 decode step streams every weight once, so huge pages take most of its TLB misses away
  (measured in docs/benchmarks/performance.md). The cost: buffers are rounded up to 2 MiB.
"""

from __future__ import annotations

import os

DEFAULTS = {"HF_HUB_OFFLINE": "1", "THP_MEM_ALLOC_ENABLE": "1"}


def worker_env() -> dict[str, str]:
    """``DEFAULTS``, each overridden by this process's own value: Ray's ``runtime_env["env_vars"]``."""
    return {k: os.environ.get(k, v) for k, v in DEFAULTS.items()}


def apply() -> None:
    """``os.environ.setdefault`` for each of ``DEFAULTS`` (before torch allocates anything)."""
    for k, v in DEFAULTS.items():
        os.environ.setdefault(k, v)
