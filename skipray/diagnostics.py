"""Diagnostics of a decode step: host syncs and dispatched ops, counted the same way on CPU and CUDA (torch only).

Contract: ``with HostSyncs() as h: engine.step()`` counts, per kind, the torch operations of the step that
make the host wait for the device or that a GPU decode step should not have:

* ``scalar``: reads of a tensor's values into Python (``.item()``, ``.tolist()``, ``bool(t)``,
  ``int(t)``, ``float(t)``, ``t.__index__``, ``.numpy()``), seen at the Python level by a
  ``TorchFunctionMode`` so that a CPU run counts the reads a CUDA run would sync on;
* ``data_dependent``: ops whose output shape depends on the data (``nonzero``, ``masked_select``,
  ``unique``), which must read the device's result before allocating;
* ``device_to_host``: copies from a CUDA tensor to the CPU;
* ``host_to_device_unpinned``: copies from pageable (not pinned) host memory to CUDA, ``torch.tensor`` /
  ``torch.as_tensor`` of Python data onto a device included (seen at the Python level: their copy bypasses the
  dispatch mode);
* ``ops``: every dispatched op, a proxy for kernel launches.

``HostSyncs.syncs`` is the sum of the first four. On a CPU the copy kinds stay 0 (there is no device), but
``scalar`` and ``data_dependent`` count the same calls a CUDA run would make (an upper bound: on a CPU every
tensor is the device's), so a CPU test can hold a GPU step to its sync budget. A copy made by a counted read
is not counted again. Counting slows the step; never leave it on in production.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_KINDS = ("scalar", "data_dependent", "device_to_host", "host_to_device_unpinned")
READS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"})


class _Reads(TorchFunctionMode):
    """The Python-level reads of tensor values (``scalar``)."""

    def __init__(self, owner: HostSyncs) -> None:
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("tensor", "as_tensor") and func in (torch.tensor, torch.as_tensor):
            device = (kwargs or {}).get("device")
            data = args[0] if args else None
            if device is not None and torch.device(device).type != "cpu" and not isinstance(data, torch.Tensor):
                self.owner.counts["host_to_device_unpinned"] += 1  # Python data: copied from pageable memory
            return func(*args, **(kwargs or {}))
        if name not in READS:
            return func(*args, **(kwargs or {}))
        self.owner.counts["scalar"] += 1
        self.owner.reading += 1
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.owner.reading -= 1


class HostSyncs(TorchDispatchMode):
    """Counts host syncs and ops dispatched inside its ``with`` block (module contract)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.reading = 0  # inside a counted read: its own copy to the host is not counted again
        self._reads = _Reads(self)
        aten = torch.ops.aten
        self._dynamic = {aten.nonzero, aten.masked_select, aten.unique_consecutive, aten._unique2, aten.unique_dim}
        self._copies = {aten._to_copy, aten.copy_}

    @property
    def syncs(self) -> int:
        return sum(self.counts[k] for k in SYNC_KINDS)

    def __enter__(self):
        self._reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._reads.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.counts["ops"] += 1
        packet = func.overloadpacket
        if packet in self._dynamic:
            self.counts["data_dependent"] += 1
        elif packet in self._copies and not self.reading:
            self._count_copy(func, args, kwargs)
        return func(*args, **kwargs)

    def _count_copy(self, func, args, kwargs) -> None:
        if func.overloadpacket is torch.ops.aten.copy_:
            dst, src = args[0], args[1]
            to = dst.device
        else:
            src = args[0]
            to = torch.device(kwargs["device"]) if kwargs.get("device") is not None else src.device
        if not isinstance(src, torch.Tensor):
            return
        if src.device.type == "cuda" and to.type == "cpu":
            self.counts["device_to_host"] += 1
        elif src.device.type == "cpu" and to.type == "cuda" and not src.is_pinned():
            self.counts["host_to_device_unpinned"] += 1


def decode_step_counts(engine, prompts: list[list[int]], params) -> Counter:
    """Counts of one decode-only step (no admission, no prompt chunk) with ``prompts`` live in ``engine``:
    admits them with one ``step``, then counts the next one. Leaves the requests running (``reset`` after)."""
    for p in prompts:
        engine.add_request(p, params)
    engine.step()  # admission and prefill
    if engine.num_waiting or not engine.num_running:
        raise RuntimeError("the requests did not all start decoding in one step; use fewer or shorter prompts")
    with HostSyncs() as h:
        engine.step()
    return h.counts
