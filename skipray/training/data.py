"""Training data: read examples, batch them by length, lay a batch out for the training forward.

Contract:

* ``load_examples(path, tokenizer, chat, max_len)`` reads Parquet (a file or a directory of
  ``distill-data`` shards) with ``prompt_ids``/``response_ids`` (optionally ``teacher_top_ids``/
  ``teacher_top_logprobs``: the full-depth teacher's top-k per response token), or ``prompt`` +
  ``response`` text, or ``text`` (the first token is the prompt) -> a list of ``Example`` s
  (``prompt_ids``, ``response_ids`` and, with the teacher columns, ``teacher_ids`` / ``teacher_logprobs``),
  the response cut so prompt + response fit ``max_len``. Raises ``ValueError`` for other columns or no
  usable example.
* ``batches(examples, batch_size, seed)``: an endless, seeded stream of length-bucketed batches.
* ``collate(examples, pad_id)``: the training layout (prompts left-padded to a shared length ``P``,
  column ``P + i`` holding response token ``i``) as a ``TrainBatch``: ``tokens``, ``real``, ``positions``
  ``(B, P + R)``, ``loss_mask`` ``(B, P + R - 1)``, ``prompt_len`` ``P``, and when the examples carry the
  teacher's top-k, ``teacher_ids`` / ``teacher_logprobs`` ``(B, R, k)`` (else ``None``).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch


class Example(NamedTuple):
    """One training sequence: prompt and response token ids, and optionally the full-depth teacher's top-k
    (ids and log-probs, ``k`` each) predicting each response token."""

    prompt_ids: list[int]
    response_ids: list[int]
    teacher_ids: list[list[int]] | None = None
    teacher_logprobs: list[list[float]] | None = None


@dataclasses.dataclass(frozen=True)
class TrainBatch:
    """A batch in the training layout (``collate``)."""

    tokens: torch.Tensor  # (B, P + R) ids: prompts left-padded to P, column P + i holds response token i
    real: torch.Tensor  # (B, P + R) bool: not padding
    positions: torch.Tensor  # (B, P + R) model positions
    loss_mask: torch.Tensor  # (B, P + R - 1) bool: column c predicts token c + 1, a response token
    prompt_len: int  # P
    teacher_ids: torch.Tensor | None = None  # (B, R, k): the teacher's top-k predicting response token i at i
    teacher_logprobs: torch.Tensor | None = None  # (B, R, k)

    def to(self, device: torch.device | str) -> TrainBatch:
        """The same batch with its tensors on ``device``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: v.to(device) for k, v in fields.items() if torch.is_tensor(v)})


def load_examples(path: str, tokenizer, chat: bool = True, max_len: int = 256) -> list[Example]:
    """``Example`` s (the teacher's top-k from ``teacher_top_ids`` / ``teacher_top_logprobs``); for ``text``
    rows the prompt is the first token. ``path``: a Parquet file or a directory of them (``distill-data`` shards).
    The teacher columns, when the data has them, hold the full-depth model's top-k log-probs per
    response token, so training need not rerun the teacher."""
    from skipray.io import read_table
    from skipray.text import encode_prompt

    t = read_table(path)
    cols = t.column_names
    if "teacher_top_ids" in cols:
        quads = zip(
            t.column("prompt_ids").to_pylist(),
            t.column("response_ids").to_pylist(),
            t.column("teacher_top_ids").to_pylist(),
            t.column("teacher_top_logprobs").to_pylist(),
        )
        out = [
            Example(list(p), list(r)[: max_len - len(p)], ti[: max_len - len(p)], tl[: max_len - len(p)])
            for p, r, ti, tl in quads
            if p and r and len(p) < max_len - 1
        ]
        if not out:
            raise ValueError(f"{path}: no usable training examples")
        return out
    if "prompt_ids" in cols and "response_ids" in cols:
        pairs = zip(t.column("prompt_ids").to_pylist(), t.column("response_ids").to_pylist())
    elif "prompt" in cols and "response" in cols:
        pairs = (
            (encode_prompt(tokenizer, p, chat=chat), tokenizer(r, add_special_tokens=False)["input_ids"])
            for p, r in zip(t.column("prompt").to_pylist(), t.column("response").to_pylist())
        )
    elif "text" in cols:
        pairs = ((ids[:1], ids[1:]) for ids in (tokenizer(x)["input_ids"] for x in t.column("text").to_pylist()))
    else:
        raise ValueError(f"{path}: need prompt_ids+response_ids, prompt+response, or text columns; got {cols}")
    out = [Example(list(p), list(r)[: max_len - len(p)]) for p, r in pairs if p and r and len(p) < max_len - 1]
    if not out:
        raise ValueError(f"{path}: no usable training examples")
    return out


def collate(examples: Sequence[Example], pad_id: int) -> TrainBatch:
    """Left-pad prompts to a shared length P, right-pad responses; column P+i holds response token i.
    When the examples carry the teacher's top-k, ``teacher_ids``/``teacher_logprobs`` are (B, R, k): the
    teacher's top-k for predicting response token i sit at index i."""
    P = max(len(ex.prompt_ids) for ex in examples)
    R = max(len(ex.response_ids) for ex in examples)
    B = len(examples)
    tokens = torch.full((B, P + R), pad_id, dtype=torch.long)
    real = torch.zeros(B, P + R, dtype=torch.bool)
    loss_mask = torch.zeros(B, P + R - 1, dtype=torch.bool)  # column c predicts token c+1
    for b, ex in enumerate(examples):
        p, r = ex.prompt_ids, ex.response_ids
        tokens[b, P - len(p) : P] = torch.tensor(p)
        tokens[b, P : P + len(r)] = torch.tensor(r)
        real[b, P - len(p) : P + len(r)] = True
        loss_mask[b, P - 1 : P + len(r) - 1] = True
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    if examples[0].teacher_ids is None:
        return TrainBatch(tokens, real, positions, loss_mask, P)
    k = len(examples[0].teacher_ids[0])
    ids = torch.zeros(B, R, k, dtype=torch.long)
    lps = torch.full((B, R, k), -1e4)  # padding: no mass (masked out of the loss anyway)
    for b, ex in enumerate(examples):
        n = len(ex.response_ids)
        ids[b, :n] = torch.tensor(ex.teacher_ids, dtype=torch.long)
        lps[b, :n] = torch.tensor(ex.teacher_logprobs, dtype=torch.float32)
    return TrainBatch(tokens, real, positions, loss_mask, P, ids, lps)


def batches(examples: Sequence[Example], batch_size: int, seed: int) -> Iterator[list[Example]]:
    """Endless length-bucketed batches: shuffle, sort windows of 32 batches by length, shuffle batches."""
    rng = random.Random(seed)
    while True:
        idx = list(range(len(examples)))
        rng.shuffle(idx)
        window = batch_size * 32
        chunks = []
        for s in range(0, len(idx), window):
            w = sorted(idx[s : s + window], key=lambda i: len(examples[i].prompt_ids) + len(examples[i].response_ids))
            chunks += [w[j : j + batch_size] for j in range(0, len(w), batch_size)]
        rng.shuffle(chunks)
        yield from ([examples[i] for i in c] for c in chunks)
