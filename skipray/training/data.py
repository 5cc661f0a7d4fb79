"""Training data: read examples, batch them by length, lay a batch out for the training forward.

Contract:

* ``load_examples(path, tokenizer, chat, max_len)`` reads Parquet (a file or a directory of
  ``distill-data`` shards) with ``prompt_ids``/``response_ids`` (optionally ``teacher_top_ids``/
  ``teacher_top_logprobs``: the full-depth teacher's top-k per response token), or ``prompt`` +
  ``response`` text, or ``text`` (the first token is the prompt) -> a list of
  ``(prompt_ids, response_ids[, teacher_top_ids, teacher_top_logprobs])`` tuples, the response cut so
  prompt + response fit ``max_len``. Raises ``ValueError`` for other columns or no usable example.
* ``batches(examples, batch_size, seed)``: an endless, seeded stream of length-bucketed batches.
* ``collate(batch, pad_id)``: the training layout (prompts left-padded to a shared length ``P``,
  column ``P + i`` holding response token ``i``) as tensors: ``tokens``, ``real``, ``positions``
  ``(B, P + R)``, ``loss_mask`` ``(B, P + R - 1)``, ``prompt_len`` ``P``, and with teacher columns
  ``teacher_ids``/``teacher_logprobs`` ``(B, R, k)``.
"""

from __future__ import annotations

import random

import torch


def load_examples(path: str, tokenizer, chat: bool = True, max_len: int = 256) -> list[tuple]:
    """(prompt_ids, response_ids[, teacher_top_ids, teacher_top_logprobs]) tuples; for ``text`` rows the
    prompt is the first token. ``path``: a Parquet file or a directory of them (``distill-data`` shards).
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
            (list(p), list(r)[: max_len - len(p)], ti[: max_len - len(p)], tl[: max_len - len(p)])
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
    out = [(list(p), list(r)[: max_len - len(p)]) for p, r in pairs if p and r and len(p) < max_len - 1]
    if not out:
        raise ValueError(f"{path}: no usable training examples")
    return out


def collate(batch: list[tuple], pad_id: int) -> dict:
    """Left-pad prompts to a shared length P, right-pad responses; column P+i holds response token i.
    With teacher columns, ``teacher_ids``/``teacher_logprobs`` are (B, R, k): the teacher's top-k for
    predicting response token i sit at index i."""
    P = max(len(ex[0]) for ex in batch)
    R = max(len(ex[1]) for ex in batch)
    B = len(batch)
    tokens = torch.full((B, P + R), pad_id, dtype=torch.long)
    real = torch.zeros(B, P + R, dtype=torch.bool)
    loss_mask = torch.zeros(B, P + R - 1, dtype=torch.bool)  # column c predicts token c+1
    for b, (p, r, *_) in enumerate(batch):
        tokens[b, P - len(p) : P] = torch.tensor(p)
        tokens[b, P : P + len(r)] = torch.tensor(r)
        real[b, P - len(p) : P + len(r)] = True
        loss_mask[b, P - 1 : P + len(r) - 1] = True
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    out = {"tokens": tokens, "real": real, "positions": positions, "prompt_len": P, "loss_mask": loss_mask}
    if len(batch[0]) == 4:
        k = len(batch[0][2][0])
        ids = torch.zeros(B, R, k, dtype=torch.long)
        lps = torch.full((B, R, k), -1e4)  # padding: no mass (masked out of the loss anyway)
        for b, (_, r, ti, tl) in enumerate(batch):
            ids[b, : len(r)] = torch.tensor(ti, dtype=torch.long)
            lps[b, : len(r)] = torch.tensor(tl, dtype=torch.float32)
        out.update(teacher_ids=ids, teacher_logprobs=lps)
    return out


def batches(examples: list, batch_size: int, seed: int):
    """Endless length-bucketed batches: shuffle, sort windows of 32 batches by length, shuffle batches."""
    rng = random.Random(seed)
    while True:
        idx = list(range(len(examples)))
        rng.shuffle(idx)
        window = batch_size * 32
        chunks = []
        for s in range(0, len(idx), window):
            w = sorted(idx[s : s + window], key=lambda i: len(examples[i][0]) + len(examples[i][1]))
            chunks += [w[j : j + batch_size] for j in range(0, len(w), batch_size)]
        rng.shuffle(chunks)
        yield from ([examples[i] for i in c] for c in chunks)
