"""Text metrics of ``skipray eval`` over token ids or words (pure Python, no torch).

Contract: ``lcs_f1(a, b)`` is ROUGE-L F1 (Lin 2004) of two sequences; ``rouge_l`` the same over lower-cased
alphanumeric words (the rouge-score package's default tokenization); ``rep_n(ids, eos, n)`` the share of an
answer's n-gram positions whose n-gram of token ids occurred at an earlier position of the same answer (up
to the first EOS, EOS excluded; None without an n-gram); ``answered(text, answers)`` fact retention's rule;
``answer_position(ids, answers, decode)`` how many generated tokens it takes for an answer to appear.
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs_f1(a: Sequence, b: Sequence) -> float:
    """ROUGE-L F1 (Lin 2004) of two token sequences: the longest common subsequence's precision and recall."""
    if not a or not b:
        return float(len(a) == len(b))
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased alphanumeric words (the rouge-score package's default tokenization)."""
    return lcs_f1(_words(candidate), _words(reference))


def rep_n(ids: Sequence[int], eos_token_ids: Sequence[int] = (), n: int = 3) -> float | None:
    """The share of ``ids``' n-gram positions whose n-gram occurred at an earlier position (up to the first
    EOS, EOS excluded); None for an answer with no n-gram."""
    end = next((i for i, t in enumerate(ids) if t in eos_token_ids), len(ids))
    seen, repeats, positions = set(), 0, max(end - n + 1, 0)
    for j in range(positions):
        gram = tuple(ids[j : j + n])
        repeats += gram in seen
        seen.add(gram)
    return repeats / positions if positions else None


def answered(text: str, answers: Sequence[str]) -> bool:
    """Fact retention's rule: an accepted answer appears, lower-cased, in the generated text."""
    low = text.lower()
    return any(a.lower() in low for a in answers)


def answer_position(ids: Sequence[int], answers: Sequence[str], decode) -> int | None:
    """The number of generated tokens after which an accepted answer first appears (``answered`` on
    ``decode(ids[:k])``, 1-based: the answer's last token is ``ids[k - 1]``, made by schedule entry ``k - 1``);
    None when it never does. ``decode``: token ids to text."""
    for k in range(1, len(ids) + 1):
        if answered(decode(ids[:k]), answers):
            return k
    return None


POSITION_BUCKETS = ((1, 6), (7, 8), (9, 12), (13, None))  # generated tokens until the answer is complete


def by_position(positions: Sequence[int], kept: Sequence[bool]) -> dict[str, dict]:
    """Fact retention split by where the full model's answer completes: ``{"1-6": {"questions": n,
    "retained": share}, ...}`` over ``POSITION_BUCKETS`` (empty buckets left out). ``positions[i]``:
    ``answer_position`` of question i at full depth; ``kept[i]``: whether the schedule still answers it."""
    out = {}
    for lo, hi in POSITION_BUCKETS:
        hits = [k for p, k in zip(positions, kept) if p >= lo and (hi is None or p <= hi)]
        if hits:
            out[f"{lo}-{hi}" if hi else f"{lo}+"] = {"questions": len(hits), "retained": sum(hits) / len(hits)}
    return out
