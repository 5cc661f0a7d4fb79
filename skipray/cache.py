"""The KV cache: preallocated buffers written by slot, with an explicit record of what each layer holds.

Contract:

* ``k``/``v`` have shape ``(layers, max_batch, kv_heads, max_len, head_dim)`` and are allocated once.
  Row ``b`` of the cache is one sequence; slot ``s`` is its ``s``-th token (left padding included).
* ``filled[l, b]`` is how many leading slots of row ``b`` layer ``l`` has written. Because skip
  schedules are monotone, a layer always holds a prefix of its row's slots, so a length suffices.
  A skipped layer neither writes its buffers nor advances ``filled``; attention at layer ``l`` reads
  only slots ``< filled[l, b]`` that are ``valid`` (hold a real token, not padding).
* ``valid[b, s]`` marks slots that hold real tokens. ``reset_rows`` clears rows for reuse.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        max_batch: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, max_batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.filled = torch.zeros(num_layers, max_batch, dtype=torch.long, device=device)
        self.valid = torch.zeros(max_batch, max_len, dtype=torch.bool, device=device)
        self.num_layers, self.max_batch, self.max_len = num_layers, max_batch, max_len

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache (both buffers plus bookkeeping)."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.filled, self.valid))

    def reset_rows(self, rows: slice | torch.Tensor) -> None:
        """Forget rows (their buffers are left as they are; nothing reads past ``filled``)."""
        self.filled[:, rows] = 0
        self.valid[rows] = False

    def write(self, layer: int, rows: slice | torch.Tensor, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``/``v`` of shape ``(b, heads, t, head_dim)`` into cache ``rows``.

        ``start`` is the first slot: an int shared by all rows (prefill, static batches), or a
        tensor of one slot per row when ``t == 1`` (rows at different lengths).
        """
        t = k.shape[2]
        if isinstance(start, int):
            self.k[layer, rows, :, start : start + t] = k
            self.v[layer, rows, :, start : start + t] = v
            self.filled[layer, rows] = start + t
        else:
            if t != 1:
                raise ValueError("per-row start slots need exactly one new token per row")
            r = torch.arange(self.max_batch, device=k.device)[rows]
            self.k[layer, r, :, start] = k[:, :, 0]
            self.v[layer, r, :, start] = v[:, :, 0]
            self.filled[layer, rows] = start + 1

    def mark_valid(self, rows: slice | torch.Tensor, start: int | torch.Tensor, real: torch.Tensor) -> None:
        """Record which of the new slots (``real``: bool ``(b, t)``) hold real tokens."""
        if isinstance(start, int):
            self.valid[rows, start : start + real.shape[1]] = real
        else:
            r = torch.arange(self.max_batch, device=real.device)[rows]
            self.valid[r, start] = real[:, 0]

    def keys(self, layer: int, rows: slice | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Buffers of ``rows`` over slots ``[0, length)`` and the mask of slots layer ``layer`` may read."""
        span = torch.arange(length, device=self.valid.device)
        readable = self.valid[rows, :length] & (span[None, :] < self.filled[layer, rows][:, None])
        return self.k[layer, rows, :, :length], self.v[layer, rows, :, :length], readable

    def move_rows(self, src: torch.Tensor, dst: torch.Tensor, upto: int | None = None) -> None:
        """Copy rows ``src`` to rows ``dst`` (compaction when rows finish or are retired).

        Only rows that actually move are copied, and only slots ``[0, upto)`` when given.
        """
        moved = src != dst
        if not bool(moved.any()):
            return
        src, dst = src[moved], dst[moved]
        end = self.max_len if upto is None else upto
        self.k[:, dst, :, :end] = self.k[:, src, :, :end]
        self.v[:, dst, :, :end] = self.v[:, src, :, :end]
        self.filled[:, dst] = self.filled[:, src]
        self.valid[dst] = self.valid[src]
