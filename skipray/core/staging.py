"""Host staging of a step's small inputs: token ids, slots, row indices, sampling parameters (torch only).

Contract: ``HostStaging(device)``; ``to_device(values, dtype)`` -> a tensor of ``values`` (a sequence or a CPU
tensor) on ``device``. On CUDA the values are written into preallocated pinned host memory and copied with
``non_blocking=True``: the copy is queued on the stream and the host goes on, where a copy from pageable memory
would wait for the device (vLLM's and nano-vllm's pinned input buffers). The memory is an arena per dtype, handed out
front to back during a step and taken back by ``new_step()``, which the engine calls at the start of each step.
There are two sets of arenas, used by alternate steps: a step's copies queued after its read of the device (row
moves) may still be in flight when the next step starts, but not two steps later, after another read; ``new_step``
also waits on an event recorded when the set was last used, so no copy in flight is ever overwritten (the wait
finds it complete). An arena too small for a step gets a larger one (the old one stays alive until the set is
reused). On other devices ``to_device`` is ``torch.as_tensor`` (a CPU tensor is the device's already).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MIN_ARENA = 4096  # elements per dtype to start with; doubled when a step needs more


class HostStaging:
    """Pinned arenas for a step's small host-to-device copies (module contract)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda"
        # per set: dtype -> [pinned tensor, next free element]; outgrown arenas (copies possibly in flight); event
        self._sets: list[tuple[dict[torch.dtype, list], list[torch.Tensor]]] = [({}, []), ({}, [])]
        self._events: list = [None, None]
        self._current = 0

    def new_step(self) -> None:
        """Switch to the other set of arenas and hand them out from the front (module contract)."""
        if not self.pinned:
            return
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        self._events[self._current] = done
        self._current = 1 - self._current
        if self._events[self._current] is not None:
            self._events[self._current].synchronize()  # two steps old: done where a read of the device came between
        arenas, retired = self._sets[self._current]
        retired.clear()
        for arena in arenas.values():
            arena[1] = 0

    def to_device(self, values: Sequence | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``values`` as a ``dtype`` tensor on the device (module contract); keeps the shape of a tensor."""
        host = torch.as_tensor(values, dtype=dtype)
        if not self.pinned:
            return host if self.device.type == "cpu" else host.to(self.device)
        n = host.numel()
        arenas, retired = self._sets[self._current]
        arena = arenas.get(dtype)
        if arena is None or arena[1] + n > arena[0].numel():
            size = max(MIN_ARENA, 2 * n, 2 * arena[0].numel() if arena else 0)
            if arena is not None:
                retired.append(arena[0])
            arena = arenas[dtype] = [torch.empty(size, dtype=dtype, pin_memory=True), 0]
        buf, at = arena
        view = buf[at : at + n]
        view.copy_(host.reshape(-1))
        arena[1] = at + n
        return view.to(self.device, non_blocking=True).view(host.shape)
