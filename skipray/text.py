"""The tokenizer edge: prompts and chat messages to token ids, token ids back to text, stop strings.

Contract: everything that touches a tokenizer lives here, so the engine speaks token ids only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


def encode_prompt(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of a plain prompt, or of a one-turn chat (user message + assistant header)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    if chat:
        return encode_messages(tokenizer, [{"role": "user", "content": prompt}])
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_messages(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of a chat conversation through the model's chat template, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decode(tokenizer, token_ids: Sequence[int], stop: Sequence[str] = ()) -> str:
    """Text of generated ids without special tokens, cut before the first stop string."""
    text = tokenizer.decode(list(token_ids), skip_special_tokens=True)
    return truncate_at_stop(text, stop)


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def stop_checker(tokenizer, stop: Sequence[str]) -> Callable[[list[int]], bool] | None:
    """A ``stop_fn`` for the engine: true once the decoded tail contains any stop string."""
    stops = [s for s in stop if s]
    if not stops:
        return None
    window = max(len(s) for s in stops) + 8  # tokens are >= 1 char; a few spare for merges

    def check(ids: list[int]) -> bool:
        tail = tokenizer.decode(ids[-window:], skip_special_tokens=True)
        return any(s in tail for s in stops)

    return check
