"""One request's reply, apart from HTTP: engine events to text, log-probs and usage; the whole reply object.

Contract (no Ray, no torch): ``Reply(tokenizer, prompt, stop, top, include_stop)`` turns one choice's engine
events into text deltas (``skipray.text.TextStream``, so streamed and whole text are equal), log-prob entries
(``responses.TokenLogprob``, when ``top`` is not None) and the layers per token; it keeps the first event's
prompt log-probs. ``collect(reply, first, events)`` runs a choice to its end. ``whole_reply(...)`` builds the
non-streamed OpenAI object over every choice (``responses``), with vLLM's ``prompt_logprobs`` where computed
and, for a completions ``echo`` with ``logprobs``, the prompt's log-probs before the completion's.
``names(tokenizer, reply, entries)`` maps the prompt's token ids and their top alternatives to text.
"""

from __future__ import annotations

from skipray.serve import responses as R


class Reply:
    """One request's events turned into text deltas, log-prob entries and usage."""

    def __init__(
        self, tokenizer, prompt: list[int], stop: list[str], top: int | None, include_stop: bool = False
    ) -> None:
        from skipray.text import TextStream

        self.tokenizer, self.top = tokenizer, top  # top: top log-probs per token; None: no log-probs
        self.text = TextStream(tokenizer, prompt, stop, include_stop)
        self.prompt_len, self.prompt_ids, self.layers = len(prompt), list(prompt), []
        self.out = ""  # the text handed out so far
        self.finish: str | None = None
        self.prompt_logprobs: list | None = None  # the first event's (``prompt_logprobs`` / echo with logprobs)

    def add(self, ev) -> tuple[str, list[R.TokenLogprob]]:
        from skipray.text import token_bytes, token_strings

        self.layers.append(ev.layers)
        self.finish = ev.finish_reason
        if ev.prompt_logprobs is not None:
            self.prompt_logprobs = ev.prompt_logprobs
        delta = self.text.add(ev.token_id, final=ev.finish_reason is not None)
        self.out += delta
        if self.top is None or ev.logprobs is None:
            return delta, []
        lp = ev.logprobs
        ids = [ev.token_id, *lp.top_ids[: self.top]]
        names, raw = token_strings(self.tokenizer, ids), token_bytes(self.tokenizer, ids)
        top = list(zip(names[1:], lp.top_logprobs[: self.top], raw[1:]))
        return delta, [R.TokenLogprob(names[0], lp.logprob, top, raw[0])]


async def collect(reply: Reply, first, events) -> tuple[list[R.TokenLogprob], str]:
    """Run one choice to its end; -> (its log-prob entries, its finish reason)."""
    entries, ev = [], first
    while True:
        _, logprobs = reply.add(ev)
        entries += logprobs
        if ev.finish_reason is not None:
            return entries, ev.finish_reason
        ev = await anext(events)


def whole_reply(tokenizer, meta, chat: bool, echo: str, replies, out, top, tools) -> dict:
    """The non-streamed reply object over all choices; ``out``: per choice (log-prob entries, finish).
    A choice whose prompt log-probs were computed carries vLLM's ``prompt_logprobs``; a completions echo
    with ``logprobs`` puts the prompt's before the completion's."""
    entries, finishes = [e for e, _ in out], [f for _, f in out]
    use = R.usage(replies[0].prompt_len, [x for r in replies for x in r.layers])
    choices = []
    for i, (r, e, fin) in enumerate(zip(replies, entries, finishes)):
        known = names(tokenizer, r) if r.prompt_logprobs is not None else {}
        if chat:
            lp = R.chat_logprobs(e) if top is not None else None
            msg, fin = tools.message(r.out, fin) if tools else ({"role": "assistant", "content": echo + r.out}, fin)
            choice = R.chat_choice(i, msg, fin, lp)
        else:
            lp = R.completion_logprobs(e, len(echo)) if top is not None else None
            if lp is not None and echo and r.prompt_logprobs is not None:
                lp = R.echo_logprobs(r.prompt_logprobs, r.prompt_ids, known, lp)
            choice = R.completion_choice(i, echo + r.out, fin, lp)
        if r.prompt_logprobs is not None:
            choice["prompt_logprobs"] = R.prompt_logprobs(r.prompt_logprobs, r.prompt_ids, known)
        choices.append(choice)
    if chat:
        return R.chat_response(meta, choices, use)
    return R.completion_response(meta, choices, use)


def names(tokenizer, reply: Reply, entries: list | None = None) -> dict[int, str]:
    """Token id -> text for the prompt's tokens and their top alternatives (``entries``, default the
    reply's prompt log-probs)."""
    from skipray.text import token_strings

    ids = set(reply.prompt_ids)
    for e in (reply.prompt_logprobs if entries is None else entries) or ():
        if e is not None:
            ids.update(e.top_ids)
    ids = sorted(ids)
    return dict(zip(ids, token_strings(tokenizer, ids)))
