"""Chunked prefill: the iteration ``ContinuousEngine`` runs when ``max_num_batched_tokens`` is set.

Contract (``ChunkedPrefill`` is a mixin of ``skipray.scheduler.ContinuousEngine`` and works on its
state: ``live`` decoding rows in cache rows ``0..n-1``, ``prefilling`` rows after them, the waiting
queue, the cache):

* Every iteration is *one* forward pass (``skipray.model.forward_segments``) that carries the decode
  step of every decoding row (one token each, counted against the budget ``B =
  max_num_batched_tokens``) and prompt chunks that fill the rest of the budget (at most
  ``max_prefill_tokens`` of it).
* Prefilling requests are served first come, first served: the oldest partly prefilled prompt gets
  its next chunk first, then newcomers are admitted into free rows while budget is left.
* A chunk of request ``r`` is ``r``'s next ``c`` prompt tokens, at slots ``[s, s + c)`` of its row,
  at full depth and without the skip adapter (the prompt always sees the base model); it attends to
  the slots its earlier chunks wrote through the cache (``filled``/``valid``). ``r``'s first token
  is sampled from its last chunk's logits; from the next iteration on it decodes like any other row.
* So a long prompt is prefilled over several iterations while the decoding rows keep producing a
  token at every iteration, and a newcomer costs its tokens in the shared pass instead of a pass of
  its own (on a CPU a pass costs about one read of every weight, however few tokens it carries).
* ``B >= max_batch`` (checked by the engine), so every iteration steps every decoding row and still
  prefills at least one token. The budget counts real tokens; chunks carry no padding, so that is
  the compute too.
* Faults: when the shared pass raises, each of its parts is rerun alone (the decode step, each
  chunk; cache writes are idempotent: the same values into the same slots), so a failing chunk ends
  only its request and a failing decode step ends only the decoding rows.

Greedy output equals unchunked prefill's and ``Engine.generate``'s token for token (tested).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from skipray.model import Segment, forward_segments, full_plan

if TYPE_CHECKING:
    from skipray.scheduler import Event, _Request

logger = logging.getLogger(__name__)


class ChunkedPrefill:
    """The chunked-prefill iteration of ``ContinuousEngine`` (module docstring)."""

    def _plan_chunks(self) -> list[tuple[_Request, int, int]]:
        """This iteration's prompt chunks ``(request, first slot, tokens)`` within the budget: partly
        prefilled requests first (oldest first), then newcomers admitted into free rows."""
        left = min(self.max_num_batched_tokens - len(self.live), self.max_prefill_tokens)
        chunks = []
        for r in self.prefilling:
            if left <= 0:
                break
            n = min(len(r.prompt) - r.prefilled, left)
            chunks.append((r, r.prefilled, n))
            left -= n
        new: list[_Request] = []
        with self._lock:
            while left > 0 and len(self.live) + len(self.prefilling) + len(new) < self.max_batch:
                queue = self._next_queue(sum(r.offline for r in new))
                if queue is None:
                    break
                r = queue.popleft()
                n = min(len(r.prompt), left)
                new.append(r)
                chunks.append((r, 0, n))
                left -= n
        if new:
            for r in new:
                r.seq = next(self._seq)
            self._arrange(self.live, self.prefilling + new)
            first = len(self.live) + len(self.prefilling) - len(new)
            self.cache.reset_rows(slice(first, first + len(new)))
        return chunks

    def _chunk_segment(self, req: _Request, start: int, n: int) -> Segment:
        """Prompt tokens ``[start, start + n)`` of ``req`` at full depth into its row; the logits of its
        last prompt token when this is the last chunk (else none)."""
        row = len(self.live) + self.prefilling.index(req)
        tokens = torch.tensor([req.prompt[start : start + n]], device=self.device)
        positions = torch.arange(start, start + n, device=self.device)[None]
        last = start + n == len(req.prompt)
        return Segment(tokens, positions, full_plan(self.model.num_layers), torch.ones_like(tokens, dtype=torch.bool),
                       slice(row, row + 1), start, slice(n - 1, n) if last else slice(0, 0), None)

    def _run(self, segments: list[Segment]) -> list[torch.Tensor]:
        """One forward pass over ``segments``; -> each segment's logits."""
        return forward_segments(self.model, segments, self.cache)

    def _run_isolated(self, segments: list[Segment]) -> list[torch.Tensor | BaseException]:
        """``_run``; when the shared pass fails, each segment alone, so a failure lands on its own part."""
        try:
            return self._run(segments)
        except Exception as e:
            if len(segments) == 1:
                return [e]
            logger.warning("shared pass of %d parts failed (%r); running them one by one", len(segments), e)
        outs: list[torch.Tensor | BaseException] = []
        for seg in segments:
            try:
                outs.append(self._run([seg])[0])
            except Exception as e:
                outs.append(e)
        return outs

    def _chunked_iteration(self, events: list[Event]) -> None:
        """One pass: the decode step of every decoding row plus this iteration's prompt chunks."""
        chunks = self._plan_chunks()
        segments, layers = [], []
        if self.live:
            seg, layers = self._decode_segment()
            segments.append(seg)
        segments += [self._chunk_segment(*c) for c in chunks]
        if not segments:
            return
        outs = self._run_isolated(segments)
        gone: list[_Request] = []
        if self.live:
            out, outs = outs[0], outs[1:]
            if isinstance(out, BaseException):
                logger.error("decode step failed; ending %d decoding requests", len(self.live), exc_info=out)
                gone += self._fail(self.live, out, events)
            else:
                gone += self._emit(self.live, out[:, 0].float(), layers, events)
                self.steps += 1
        ready, logits = [], []
        for (req, start, n), out in zip(chunks, outs):
            if isinstance(out, BaseException):
                logger.error("prefill chunk of request %s failed", req.rid, exc_info=out)
                gone += self._fail([req], out, events)
                continue
            req.prefilled = start + n
            if req.prefilled == len(req.prompt):
                ready.append(req)
                logits.append(out[:, 0].float())
        if ready:
            gone += self._emit(ready, torch.cat(logits), [self.model.num_layers] * len(ready), events)
        out_ids = {id(r) for r in gone}
        self._arrange([r for r in self.live + ready if id(r) not in out_ids],
                      [r for r in self.prefilling if id(r) not in out_ids and r.prefilled < len(r.prompt)])
