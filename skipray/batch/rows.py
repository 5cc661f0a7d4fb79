"""Rows of the skip-decoding processor: its config and its tokenizing step (no Ray here).

Contract:

* ``SkipDecodeProcessorConfig`` (``skipray.batch.config``, re-exported here) is the processor's config,
  Ray Data LLM's ``vLLMEngineProcessorConfig`` fields plus skipray's own.
* Input rows carry ``prompt`` (a string) or ``messages`` (OpenAI chat messages: ``role`` and
  ``content``, a string or a list of ``{"type": "text", "text"}`` parts; rendered by the model's chat
  template, or the config's ``chat_template``, with its ``chat_template_kwargs``, ready for the reply;
  an error row when the config disables the chat template). A row may carry ``sampling_params``, a
  dict of vLLM's ``SamplingParams`` fields (``skipray.batch.params``: the implemented ones, the ones accepted without
  effect, the rest an error row naming them; null or missing fields take the config's
  ``sampling_params``), and ``skip``, a dict of skip-schedule flags as in the Serve app's ``skip`` field
  (``{"full": true}``, ``max_layers``, ``min_layers``, ...; null: the config's schedule).
* ``prepare_rows(block, ctx)`` runs as a Ray Data task per block. It renames input columns whose names
  the processor writes (``input_<name>``; if that is taken too, ``input_<name>_2``, ``_3``, ...), then
  per row tokenizes, resolves the sampling params and the schedule flags, and checks the length
  against the context (``skipray.core.config.check_length``, as the engine and the server do). It adds
  ``num_input_tokens``, ``error`` (null for a good row, else why the row is not generated) and the
  internal columns ``TOKENS`` and ``PARAMS`` that the actor reads. A row whose internal ``PRE_ERROR``
  column is set (the file job's own checks) becomes an error row as is.
* Seeds: a row with its own ``sampling_params.seed`` uses it. Otherwise, when the config has a seed,
  the row's seed is derived from (that seed, the row's key): the row's ``id_column`` value when it has
  one, else its text and its rank among identical texts in its block. So a row's sample depends on
  neither its batch-mates nor the number of actors, and two rows with the same prompt but different
  ids get different samples. Without any seed, sampling is not reproducible.
* The tokenizer is loaded in the driver and shipped as bytes (``ShippedTokenizer``): a tokenizing task
  never resolves the model, so it never converts a ``.gguf`` file, and unpickles the tokenizer once per
  worker process.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from skipray.batch.config import ActorPool, SkipDecodeProcessorConfig  # noqa: F401 (re-exported)
from skipray.batch.params import PARAMS_TYPE, resolve, sampling_params, to_row
from skipray.core.config import check_length

# columns the processor adds (Ray Data LLM's names, plus skip decoding's and the error column)
ERROR_KIND = "error_kind"  # why a row has an error: "input" (permanent) or "engine" (a re-run retries it)
GENERATED_COLUMNS = (
    "num_input_tokens",
    "generated_text",
    "generated_tokens",
    "num_generated_tokens",
    "avg_layers",
    "logprobs",
    "prompt_logprobs",
    "finish_reason",
    "error",
    ERROR_KIND,
)
TOKENS = "__skipray_token_ids"  # internal: the prompt's token ids
PARAMS = "__skipray_params"  # internal: the row's resolved sampling params and schedule flags
PRE_ERROR = "__skipray_error"  # internal: an error found before tokenizing (the file job's id checks)
INTERNAL_COLUMNS = (TOKENS, PARAMS, PRE_ERROR)


# -- shipping the tokenizer ------------------------------------------------------------------------------
_TOKENIZERS: dict[str, Any] = {}


class ShippedTokenizer:
    """A tokenizer pickled once in the driver; ``get()`` unpickles it once per process (cached by digest)."""

    def __init__(self, tokenizer) -> None:
        self.data = pickle.dumps(tokenizer)
        self.key = hashlib.sha1(self.data).hexdigest()

    def get(self):
        tok = _TOKENIZERS.get(self.key)
        if tok is None:
            tok = _TOKENIZERS[self.key] = pickle.loads(self.data)
        return tok


@dataclass
class RowContext:
    """What a tokenizing task needs, resolved in the driver (small, apart from the tokenizer's bytes)."""

    tokenizer: ShippedTokenizer
    max_model_len: int  # the context (skipray.core.config.context_length)
    num_layers: int
    trained: dict | None  # the model's trained schedule (to_dict), for per-row ``skip`` flags
    apply_chat_template: bool = False
    chat_enabled: bool = True  # False: ``messages`` rows are error rows (chat_template_stage disabled)
    template_kwargs: dict = field(default_factory=dict)  # the chat template's variables (chat_template_kwargs)
    defaults: dict = field(default_factory=dict)  # the config's sampling_params
    id_column: str | None = "id"
    vocab_size: int | None = None  # the model's logits width (structured output masks), None: the tokenizer's
    eos_token_ids: tuple[int, ...] = ()


# -- names and seeds -------------------------------------------------------------------------------------
def unique_renames(names: list[str], reserved: set[str] | frozenset[str], prefix: str = "input_") -> dict[str, str]:
    """``{old: new}`` for the ``names`` in ``reserved``: ``prefix + name``, or ``prefix + name + "_2"``,
    ``"_3"``, ... when that is taken too, so no two columns ever share a name."""
    taken = set(names) | set(reserved)
    out = {}
    for c in names:
        if c in reserved:
            new, i = f"{prefix}{c}", 2
            while new in taken:
                new, i = f"{prefix}{c}_{i}", i + 1
            taken.add(new)
            out[c] = new
    return out


def row_seed(seed: int, key: Any) -> int:
    """A 63-bit seed from the job's ``seed`` and a row's ``key`` (``repr`` distinguishes ``1`` from ``"1"``)."""
    digest = hashlib.blake2b(f"{int(seed)}\x1f{key!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _text_keys(texts: list[str | None]) -> list[tuple[str, int]]:
    """Per row: (digest of its text, its rank among identical texts before it in the block)."""
    seen: dict[str, int] = {}
    out = []
    for t in texts:
        h = hashlib.blake2b((t or "").encode(), digest_size=12).hexdigest()
        seen[h] = seen.get(h, -1) + 1
        out.append((h, seen[h]))
    return out


# -- per-row inputs ----------------------------------------------------------------------------------------
def _messages(value: Any) -> list[dict[str, str]]:
    """Chat messages from a row (Arrow structs come with null fields): ``role`` + text ``content``."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError("messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] has no role")
        content = m.get("content")
        if isinstance(content, (list, tuple)):
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise ValueError(f"messages[{i}].content: this model takes text only (parts of type 'text')")
            content = "\n".join(texts)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or text parts")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _skip_flags(value: Any, ctx: RowContext) -> str | None:
    """Validated skip flags as canonical JSON (None: the config's schedule); ``ValueError`` if invalid."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"skip must be a dict of schedule flags, got {type(value).__name__}")
    flags = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in value.items() if v is not None}
    schedule_for(json.dumps(flags, sort_keys=True), ctx.num_layers, ctx.trained)
    return json.dumps(flags, sort_keys=True)


def schedule_for(flags_json: str, num_layers: int, trained: dict | None):
    """The ``SkipSchedule`` of a row's ``skip`` flags (JSON); raises ``ValueError`` for invalid flags."""
    from skipray.core.schedule import SkipSchedule, resolve_schedule

    flags = json.loads(flags_json)
    if not isinstance(flags, dict):
        raise ValueError(f"skip must be an object of skip flags, got {type(flags).__name__}")
    return resolve_schedule(flags, num_layers, SkipSchedule.from_dict(trained) if trained else None).schedule


_CONSTRAINTS: dict[str, Any] = {}  # tokenizer digest -> skipray.structured.Constraints, one per process


def _grammar(p: dict, ctx: RowContext) -> str | None:
    """The row's structured output compiled and checked against the tokenizer (``ValueError``), or None."""
    spec = p["structured_outputs"] or p["guided_decoding"]
    if spec is None:
        return None
    from skipray.structured import Constraints, grammar_for

    key = ctx.tokenizer.key
    if key not in _CONSTRAINTS:
        _CONSTRAINTS[key] = Constraints(
            ctx.tokenizer.get(), ctx.vocab_size or len(ctx.tokenizer.get()), ctx.eos_token_ids
        )
    return _CONSTRAINTS[key].checked(grammar_for(spec))


# -- the tokenizing step -----------------------------------------------------------------------------------
def prepare_rows(block: pa.Table, ctx: RowContext) -> pa.Table:
    """Rename clashing columns, tokenize, resolve params and mark bad rows (module contract)."""
    from skipray.text import bad_words_ids, encode_messages, encode_prompt

    reserved = set(GENERATED_COLUMNS) | {TOKENS, PARAMS}
    renames = unique_renames(block.column_names, reserved)
    if renames:
        block = block.rename_columns([renames.get(c, c) for c in block.column_names])
    n = block.num_rows
    col = lambda name: block.column(name).to_pylist() if name in block.column_names else [None] * n  # noqa: E731
    prompts, messages, pre = col("prompt"), col("messages"), col(PRE_ERROR)
    row_params, skips = col("sampling_params"), col("skip")
    ids = col(ctx.id_column) if ctx.id_column else [None] * n
    tok = ctx.tokenizer.get()
    texts = [json.dumps(m, sort_keys=True, default=str) if m is not None else p for p, m in zip(prompts, messages)]
    text_keys = _text_keys([t if isinstance(t, str) else None for t in texts])
    token_ids, lengths, errors, params = [], [], [], []
    for i in range(n):
        ids_i, err, prm = [], pre[i], None
        if err is None:
            try:
                p = resolve(row_params[i], ctx.defaults)
                banned = bad_words_ids(tok, p["bad_words"]) if p["bad_words"] else []
                sampling_params(to_row(p, None, None, banned)).validate()
                grammar = _grammar(p, ctx)
            except Exception as e:  # noqa: BLE001 - any value a row holds is that row's error, never the job's
                err = f"invalid sampling_params: {e}"
        if err is None:
            try:
                skip = _skip_flags(skips[i], ctx)
            except Exception as e:  # noqa: BLE001
                err = f"invalid skip: {e}"
        if err is None:
            if p["seed"] is not None and row_params[i] and row_params[i].get("seed") is not None:
                seed = int(p["seed"])  # the row's own seed
            elif p["seed"] is not None:
                key = ids[i] if ids[i] is not None else text_keys[i]
                seed = row_seed(int(p["seed"]), key)
            else:
                seed = None
            prm = to_row(p, seed, skip, banned, grammar)
            ids_i, err = _encode(tok, prompts[i], messages[i], ctx, encode_prompt, encode_messages)
            if err is None:
                try:
                    check_length(len(ids_i), p["max_tokens"], ctx.max_model_len)
                except ValueError as e:
                    err = f"prompt too long: {e}"
        token_ids.append([] if err else ids_i)
        lengths.append(len(ids_i) if ids_i else 0)
        errors.append(err)
        params.append(None if err else prm)
    if "prompt" in block.column_names:
        ptype = block.column("prompt").type
        if not (pa.types.is_string(ptype) or pa.types.is_large_string(ptype)):
            block = block.set_column(
                block.column_names.index("prompt"),
                "prompt",
                pa.array([p if isinstance(p, str) else None for p in prompts], pa.string()),
            )
    if PRE_ERROR in block.column_names:
        block = block.drop_columns([PRE_ERROR])
    return (
        block.append_column("num_input_tokens", pa.array(lengths, pa.int32()))
        .append_column("error", pa.array(errors, pa.string()))
        .append_column(TOKENS, pa.array(token_ids, pa.list_(pa.int32())))
        .append_column(PARAMS, pa.array(params, PARAMS_TYPE))
    )


def _encode(
    tok, prompt: Any, messages: Any, ctx: RowContext, encode_prompt, encode_messages
) -> tuple[list[int], str | None]:
    """-> (token ids, None) or ([], why the row cannot be generated)."""
    kw = ctx.template_kwargs
    try:
        if messages is not None:
            if not ctx.chat_enabled:
                return [], "messages need the chat template, and chat_template_stage is disabled: give a prompt"
            try:
                msgs = _messages(messages)
            except ValueError as e:
                return [], f"invalid messages: {e}"
            ids = encode_messages(tok, msgs, template_kwargs=kw)
        elif prompt is None:
            return [], "prompt is null"
        elif not isinstance(prompt, str):
            return [], f"prompt is not a string (got {type(prompt).__name__})"
        elif not prompt.strip():
            return [], "prompt is empty"
        elif ctx.apply_chat_template:
            ids = encode_messages(tok, [{"role": "user", "content": prompt}], template_kwargs=kw)
        else:
            ids = encode_prompt(tok, prompt)
    except Exception as e:  # noqa: BLE001 - a row the tokenizer or chat template rejects is a bad row
        return [], f"cannot tokenize prompt: {e}"
    return (ids, None) if ids else ([], "the prompt encodes to no tokens")
