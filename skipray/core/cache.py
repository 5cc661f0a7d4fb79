"""The KV cache: preallocated per-layer buffers written by slot, with an explicit record of what each layer holds.

Contract:

* Layer ``l`` has its own ``k[l]``/``v[l]`` of shape ``(max_batch, kv_heads, layer_lens[l], head_dim)``,
  allocated once (zeros: slots nothing wrote stay finite, so masked attention never meets a NaN).
  Row ``b`` of the cache is one sequence; slot ``s`` is its ``s``-th token (left padding included).
  ``max_len`` is the longest layer (and the width of ``valid``). By default every layer has ``max_len``
  slots; a skip schedule lets a layer that stops running after ``k_l`` generation steps hold only
  ``prompt + k_l`` slots (``skipray.core.memory.layer_slots`` computes the lengths): the engines size the
  cache from the schedule, so it shrinks with the schedule.
* A write past a layer's length raises ``IndexError``: the schedule that sized the cache never runs the
  layer there, so such a write is a bug (or a request the cache was not sized for), never silently
  dropped. Reads (``keys``) of slots past a layer's length return only the slots it has.
* ``filled[l, b]`` is how many leading slots of row ``b`` layer ``l`` has written. Because skip
  schedules are monotone, a layer always holds a prefix of its row's slots, so a length suffices.
  A skipped layer neither writes its buffers nor advances ``filled``; ``keys`` gives the slots
  ``< filled[l, b]`` that are ``valid`` (hold a real token, not padding) as readable. (A cached pass
  masks by ``valid`` and causality alone: a layer that runs a row has just written it through the
  pass's slots, so there ``filled`` adds nothing; ``buffers`` gives the buffers without the mask.)
* ``valid[b, s]`` marks slots that hold real tokens. ``reset_rows`` clears rows for reuse.
"""

from __future__ import annotations

from collections.abc import Sequence

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
        layer_lens: Sequence[int] | None = None,
    ) -> None:
        """``layer_lens``: slots per layer (default: ``max_len`` for every layer); each in ``[0, max_len]``.

        Raises ``ValueError`` when ``layer_lens`` has the wrong number of entries or an entry outside
        ``[0, max_len]``."""
        lens = [max_len] * num_layers if layer_lens is None else [int(n) for n in layer_lens]
        if len(lens) != num_layers:
            raise ValueError(f"layer_lens has {len(lens)} entries for {num_layers} layers")
        if any(not 0 <= n <= max_len for n in lens):
            raise ValueError(f"layer_lens must lie in [0, {max_len}], got {lens}")
        self.k = [torch.zeros(max_batch, kv_heads, n, head_dim, dtype=dtype, device=device) for n in lens]
        self.v = [torch.zeros(max_batch, kv_heads, n, head_dim, dtype=dtype, device=device) for n in lens]
        self.filled = torch.zeros(num_layers, max_batch, dtype=torch.long, device=device)
        self.valid = torch.zeros(max_batch, max_len, dtype=torch.bool, device=device)
        self.num_layers, self.max_batch, self.max_len = num_layers, max_batch, max_len
        self.layer_lens = lens

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache (every layer's two buffers plus bookkeeping)."""
        bufs = sum(t.numel() * t.element_size() for t in self.k + self.v)
        return bufs + sum(t.numel() * t.element_size() for t in (self.filled, self.valid))

    def fits(self, rows: int, layer_lens: Sequence[int]) -> bool:
        """Whether ``rows`` rows with ``layer_lens[l]`` slots at layer ``l`` fit this cache."""
        return rows <= self.max_batch and all(n <= have for n, have in zip(layer_lens, self.layer_lens))

    def reset_rows(self, rows: slice | torch.Tensor) -> None:
        """Forget rows (their buffers are left as they are; nothing reads past ``filled``)."""
        self.filled[:, rows] = 0
        self.valid[rows] = False

    def write(
        self,
        layer: int,
        rows: slice | torch.Tensor,
        start: int | torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        end: int | None = None,
    ) -> None:
        """Write ``k``/``v`` of shape ``(b, heads, t, head_dim)`` into cache ``rows``.

        ``start`` is the first slot: an int shared by all rows (prefill, static batches), or a
        tensor of one slot per row when ``t == 1`` (rows at different lengths). ``end``: an upper bound
        on the last slot written plus one, when the caller knows it (spares reading ``start`` back per
        layer). Raises ``IndexError`` when a slot lies past the layer's length (``layer_lens[layer]``).
        """
        t = k.shape[2]
        cap = self.layer_lens[layer]
        if end is not None:
            last = end
        else:
            last = start + t if isinstance(start, int) else int(start.max()) + 1 if start.numel() else 0
        if last > cap:
            raise IndexError(
                f"layer {layer} holds {cap} slots per row but a write reaches slot {last - 1}: this cache "
                f"was sized for a schedule that never runs layer {layer} there (see skipray.core.memory.layer_slots)"
            )
        if isinstance(start, int):
            self.k[layer][rows, :, start : start + t] = k
            self.v[layer][rows, :, start : start + t] = v
            self.filled[layer, rows] = start + t
        else:
            if t != 1:
                raise ValueError("per-row start slots need exactly one new token per row")
            r = torch.arange(self.max_batch, device=k.device)[rows]
            self.k[layer][r, :, start] = k[:, :, 0]
            self.v[layer][r, :, start] = v[:, :, 0]
            self.filled[layer, rows] = start + 1

    def mark_valid(self, rows: slice | torch.Tensor, start: int | torch.Tensor, real: torch.Tensor) -> None:
        """Record which of the new slots (``real``: bool ``(b, t)``) hold real tokens."""
        if isinstance(start, int):
            self.valid[rows, start : start + real.shape[1]] = real
        else:
            r = torch.arange(self.max_batch, device=real.device)[rows]
            self.valid[r, start] = real[:, 0]

    def buffers(self, layer: int, rows: slice | torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``rows`` over slots ``[0, n)``, ``n = min(length, layer_lens[layer])``, each
        ``(b, kv_heads, n, head_dim)``. Slots past the layer's length were never written, so they are
        simply not returned (callers cut their masks to ``n`` columns)."""
        n = min(length, self.layer_lens[layer])
        return self.k[layer][rows, :, :n], self.v[layer][rows, :, :n]

    def keys(
        self, layer: int, rows: slice | torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``buffers`` and the ``(b, n)`` mask of the slots layer ``layer`` may read (``valid`` and
        below ``filled``)."""
        k, v = self.buffers(layer, rows, length)
        n = k.shape[2]
        span = torch.arange(n, device=self.valid.device)
        readable = self.valid[rows, :n] & (span[None, :] < self.filled[layer, rows][:, None])
        return k, v, readable

    def move_rows(self, src: torch.Tensor, dst: torch.Tensor, upto: int | None = None) -> None:
        """Copy rows ``src`` to rows ``dst`` (compaction when rows finish or are retired).

        Only rows that actually move are copied, and only slots ``[0, upto)`` when given.
        """
        moved = src != dst
        if not bool(moved.any()):
            return
        src, dst = src[moved], dst[moved]
        end = self.max_len if upto is None else upto
        for k, v, n in zip(self.k, self.v, self.layer_lens):
            e = min(end, n)
            if e > 0:
                k[dst, :, :e] = k[src, :, :e]
                v[dst, :, :e] = v[src, :, :e]
        self.filled[:, dst] = self.filled[:, src]
        self.valid[dst] = self.valid[src]
