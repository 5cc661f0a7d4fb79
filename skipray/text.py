"""The tokenizer edge: prompts and chat messages to token ids, token ids back to text, stop strings.

Contract: everything that touches a tokenizer lives here, so the engine speaks token ids only.
``TextStream`` turns generated ids into text incrementally (prefix/read offsets, as vLLM's and TGI's
incremental detokenizers do): each new token is decoded together with a few tokens before it, so a
tokenizer whose ``decode`` cleans up spaces or merges bytes gives the same text piece by piece as
the server sends it whole; the streamed deltas always add up to ``TextStream.text``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

CONTEXT_TOKENS = 5  # prompt tokens decoded before the first generated one (vLLM's initial offset)


def encode_prompt(tokenizer, prompt: str, chat: bool = False, add_special_tokens: bool = True) -> list[int]:
    """Token ids of a plain prompt, or of a one-turn chat (user message + assistant header)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    if chat:
        return encode_messages(tokenizer, [{"role": "user", "content": prompt}])
    return list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])


def encode_messages(
    tokenizer,
    messages: Sequence[dict],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    add_special_tokens: bool = False,
    template_kwargs: dict | None = None,
) -> list[int]:
    """Token ids of a chat conversation through the model's chat template, by default ready for the reply
    (``add_generation_prompt``); ``continue_final_message`` leaves the last message open instead;
    ``template_kwargs`` are the template's own variables (vLLM's ``chat_template_kwargs``, e.g. Qwen3's
    ``enable_thinking``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template")
    text = tokenizer.apply_chat_template(
        list(messages),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        **(template_kwargs or {}),
    )
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def decode(tokenizer, token_ids: Sequence[int], stop: Sequence[str] = (), include_stop: bool = False) -> str:
    """Text of generated ids without special tokens, cut before the first stop string (after it with
    ``include_stop``, vLLM's ``include_stop_str_in_output``)."""
    text = tokenizer.decode(list(token_ids), skip_special_tokens=True)
    return truncate_at_stop(text, stop, include_stop)


def bad_words_ids(tokenizer, words: Sequence[str]) -> list[list[int]]:
    """Token-id sequences of vLLM's ``bad_words``: each word as encoded alone and after a space (its two
    usual spellings in generated text), without special tokens; empty encodings dropped."""
    out: list[list[int]] = []
    for w in words:
        for text in (w, " " + w.lstrip()):
            ids = list(tokenizer.encode(text, add_special_tokens=False))
            if ids and ids not in out:
                out.append(ids)
    return out


def token_strings(tokenizer, token_ids: Sequence[int]) -> list[str]:
    """Each id decoded alone, special tokens kept (the ``token`` of an OpenAI log-prob entry)."""
    return tokenizer.batch_decode([[int(t)] for t in token_ids], skip_special_tokens=False)


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: the character a byte-level BPE vocabulary uses -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ == "ByteLevel" or "ByteLevel" in repr(decoder)


def token_bytes(tokenizer, token_ids: Sequence[int]) -> list[bytes]:
    """Each token's own bytes (OpenAI's log-prob ``bytes``), also for a token that holds only part of a
    UTF-8 character, where decoding it alone gives U+FFFD. Byte-level BPE vocabularies (GPT-2, Llama 3,
    SmolLM2, Qwen) map each character back to its byte; SentencePiece byte tokens (``<0xE2>``) are that
    byte and ``▁`` is a space; special tokens are their text."""
    pieces = tokenizer.convert_ids_to_tokens([int(t) for t in token_ids])
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    byte_level = _is_byte_level(tokenizer)
    table = _byte_decoder()
    out = []
    for piece in pieces:
        if piece is None:
            out.append(b"")
        elif piece in special:
            out.append(piece.encode())
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            out.append(bytes([int(piece[3:5], 16)]))
        elif byte_level and all(c in table for c in piece):
            out.append(bytes(table[c] for c in piece))
        else:
            out.append(piece.replace("\u2581", " ").encode())
    return out


def truncate_at_stop(text: str, stop: Sequence[str], include: bool = False) -> str:
    """``text`` cut before the first stop string in it (after it with ``include``)."""
    hits = [(i, len(s)) for s in stop if s and (i := text.find(s)) >= 0]
    if not hits:
        return text
    cut, n = min(hits)
    return text[: cut + n] if include else text[:cut]


def detokenizer(tokenizer) -> Callable[[list[int]], str]:
    """The engine's detokenizer hook (``Engine(detokenize=...)``, for stop strings): ids -> text without
    special tokens."""
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True)


class TextStream:
    """Incremental detokenization of one reply: text deltas that are safe to send.

    ``add(token_id, final)`` returns the new text that may be sent: never half a character (an
    unfinished byte sequence waits for its next token), never the head of a stop string (the last
    ``len(longest stop) - 1`` characters wait until the reply is final), and on the final token the
    text is cut before the first stop string (after it with ``include_stop``). ``prompt`` (its last few
    ids) is decoding context only:
    the first generated token gets the leading space it has after the prompt.
    """

    def __init__(
        self, tokenizer, prompt: Sequence[int] = (), stop: Sequence[str] = (), include_stop: bool = False
    ) -> None:
        self.tokenizer, self.stop, self.include_stop = tokenizer, [s for s in stop if s], include_stop
        self.ids = list(prompt[-CONTEXT_TOKENS:])
        self.prefix, self.read = 0, len(self.ids)  # ids[prefix:read] decode to text already emitted
        self.text = ""  # the reply decoded so far (after the final token: cut at the stop string)
        self.sent = 0  # characters of ``text`` handed out
        self.hold = max((len(s) for s in self.stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int, final: bool = False) -> str:
        """Append one generated token; -> the text that may be sent now."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        if final:
            self.text = truncate_at_stop(self.text, self.stop, self.include_stop)
            end = len(self.text)
        else:
            end = len(self.text) - self.hold
        delta = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta
