"""Text metrics of ``skipray eval`` over token ids or words (pure Python, no torch).

Contract: ``lcs_f1(a, b)`` is ROUGE-L F1 (Lin 2004) of two sequences; ``rouge_l`` the same over lower-cased
alphanumeric words (the rouge-score package's default tokenization); ``rep_n(ids, eos, n)`` the share of an
answer's n-gram positions whose n-gram of token ids occurred at an earlier position of the same answer (up
to the first EOS, EOS excluded; None without an n-gram); ``answered(text, answers)`` fact retention's rule.
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
