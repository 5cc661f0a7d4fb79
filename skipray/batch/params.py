"""A batch row's ``sampling_params``: vLLM's ``SamplingParams`` fields, checked per row (no Ray, no torch).

Contract:

* ``IMPLEMENTED``: fields that change the output and that skipray implements, with their defaults
  (vLLM's names and meanings; the logits controls are ``skipray.core.logits``). ``NO_OP``: fields that
  cannot change what a row's output holds here, accepted with any value (``detokenize``: the job always
  writes text and token ids; ``output_kind``: rows are always final) or only at the value that changes
  nothing (``n`` 1: one row per id, so a row with ``n`` > 1 is an error row; ``skip_special_tokens``
  true, ``spaces_between_special_tokens`` true). Any other field is refused by name (an error row).
  ``guided_decoding`` (Ray Data LLM's name) and ``structured_outputs`` (vLLM's) take ``json`` (a schema),
  ``regex``, ``choice``, ``grammar`` (Lark) or ``json_object: true`` (``skipray.structured``); vLLM's
  backend options in them are accepted without effect.
* ``logprobs`` (0-20) fills the row's ``logprobs`` column (``LOGPROBS_TYPE``): per generated token its id,
  its log-prob and the ``logprobs`` most likely tokens with theirs (the step's log-softmax, as vLLM returns
  it); rows without it hold null there. ``prompt_logprobs`` (0-20) fills the row's ``prompt_logprobs``
  column (``PROMPT_LOGPROBS_TYPE``, vLLM's: null for the first prompt token, then per prompt token its id,
  log-prob and rank and the ``prompt_logprobs`` most likely tokens with theirs, from one full-depth pass
  over the prompt); rows without it hold null there.
* ``resolve(row_params, defaults)`` merges a row's dict over the config's defaults (null = default) and
  checks every value (``ValueError`` naming the field): integers within their Arrow column's range,
  finite floats, the right types, and the ranges ``SamplingParams.validate`` enforces.
* ``PARAMS_TYPE`` is the Arrow struct the tokenizing step hands the actor; ``to_row`` / ``from_row``
  convert between a resolved dict (``bad_words`` already token ids) and that struct's values.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa

IMPLEMENTED: dict[str, Any] = {
    "max_tokens": 64,
    "temperature": 0.0,
    "top_p": 1.0,
    "top_k": 0,
    "seed": None,
    "stop": [],
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_p": 0.0,
    "min_tokens": 0,
    "stop_token_ids": [],
    "bad_words": [],
    "ignore_eos": False,
    "logit_bias": None,
    "include_stop_str_in_output": False,
    "guided_decoding": None,
    "structured_outputs": None,
    "logprobs": None,  # vLLM's: the sampled token's log-prob and the top-k's per token (the row's ``logprobs``)
    "prompt_logprobs": None,  # vLLM's: each prompt token's log-prob, rank and top-k (``prompt_logprobs``)
}
MAX_LOGPROBS = 20
STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")
STRUCTURED_OPTIONS = (
    "backend",
    "whitespace_pattern",
    "disable_fallback",
    "disable_any_whitespace",
    "disable_additional_properties",
)  # vLLM backend options: accepted, no effect here
NO_OP: dict[str, Any] = {  # field -> predicate of the values that change nothing
    "n": lambda v: v == 1,
    "best_of": lambda v: v in (1, None),
    "detokenize": lambda v: isinstance(v, bool),
    "output_kind": lambda v: True,
    "skip_special_tokens": lambda v: v is True,
    "spaces_between_special_tokens": lambda v: v is True,
}
INT_RANGES = {
    "max_tokens": (1, 2**31 - 1),
    "top_k": (-1, 2**31 - 1),
    "seed": (-(2**63), 2**63 - 1),
    "min_tokens": (0, 2**31 - 1),
    "logprobs": (0, MAX_LOGPROBS),
    "prompt_logprobs": (0, MAX_LOGPROBS),
}
FLOAT_RANGES = {
    "temperature": (0.0, math.inf),
    "top_p": (0.0, 1.0),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "repetition_penalty": (0.0, math.inf),
    "min_p": (0.0, 1.0),
}
PARAMS_TYPE = pa.struct(
    [
        ("max_tokens", pa.int32()),
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("top_k", pa.int32()),
        ("seed", pa.int64()),
        ("stop", pa.list_(pa.string())),
        ("skip", pa.string()),
        ("presence_penalty", pa.float64()),
        ("frequency_penalty", pa.float64()),
        ("repetition_penalty", pa.float64()),
        ("min_p", pa.float64()),
        ("min_tokens", pa.int32()),
        ("stop_token_ids", pa.list_(pa.int32())),
        ("bad_words_ids", pa.list_(pa.list_(pa.int32()))),
        ("ignore_eos", pa.bool_()),
        ("logit_bias_ids", pa.list_(pa.int32())),
        ("logit_bias_values", pa.list_(pa.float64())),
        ("include_stop", pa.bool_()),
        ("grammar", pa.string()),
        ("logprobs", pa.int32()),
        ("prompt_logprobs", pa.int32()),
    ]
)


_TOP = pa.struct([("token_id", pa.int32()), ("logprob", pa.float32())])
LOGPROBS_TYPE = pa.list_(
    pa.struct([("token_id", pa.int32()), ("logprob", pa.float32()), ("top_logprobs", pa.list_(_TOP))])
)
PROMPT_LOGPROBS_TYPE = pa.list_(
    pa.struct(
        [("token_id", pa.int32()), ("logprob", pa.float32()), ("rank", pa.int32()), ("top_logprobs", pa.list_(_TOP))]
    )
)


def logprobs_value(token_ids: list[int], logprobs: list, top: int | None) -> list[dict] | None:
    """A row's ``logprobs`` column value from a ``Completion``'s ``token_ids`` and ``logprobs``
    (``TopLogprobs`` per token); None when the row did not ask (``top`` None)."""
    if top is None:
        return None
    return [
        {
            "token_id": t,
            "logprob": lp.logprob,
            "top_logprobs": [{"token_id": i, "logprob": v} for i, v in zip(lp.top_ids[:top], lp.top_logprobs[:top])],
        }
        for t, lp in zip(token_ids, logprobs)
    ]


def prompt_logprobs_value(prompt: list[int], entries: list, top: int) -> list[dict | None]:
    """A row's ``prompt_logprobs`` column value from ``ModelRunner.prompt_logprobs`` (``TopLogprobs`` per
    prompt token, None for the first)."""
    return [
        None
        if lp is None
        else {
            "token_id": t,
            "logprob": lp.logprob,
            "rank": lp.rank,
            "top_logprobs": [{"token_id": i, "logprob": v} for i, v in zip(lp.top_ids[:top], lp.top_logprobs[:top])],
        }
        for t, lp in zip(prompt, entries)
    ]


def _int(name: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"sampling_params.{name} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise ValueError(f"sampling_params.{name} must be in [{lo}, {hi}], got {v}")
    return v


def _strings(name: str, v: Any) -> list[str]:
    v = [v] if isinstance(v, str) else v
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"sampling_params.{name} must be a string or a list of strings, got {v!r}")
    return list(v)


def checked(name: str, v: Any) -> Any:
    """One implemented field, type- and range-checked (``ValueError`` naming it)."""
    if name in INT_RANGES:
        return _int(name, v, *INT_RANGES[name])
    if name in FLOAT_RANGES:
        lo, hi = FLOAT_RANGES[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"sampling_params.{name} must be a finite number, got {v!r}")
        if not lo <= v <= hi:
            raise ValueError(f"sampling_params.{name} must be in [{lo}, {hi}], got {v}")
        return float(v)
    if name in ("stop", "bad_words"):
        return _strings(name, v)
    if name == "stop_token_ids":
        if not isinstance(v, (list, tuple)):
            raise ValueError(f"sampling_params.stop_token_ids must be a list of token ids, got {v!r}")
        return [_int(name, t, 0, 2**31 - 1) for t in v]
    if name in ("ignore_eos", "include_stop_str_in_output"):
        if not isinstance(v, bool):
            raise ValueError(f"sampling_params.{name} must be true or false, got {v!r}")
        return v
    if name in ("guided_decoding", "structured_outputs"):
        return structured_spec(name, v)
    if name == "logit_bias":
        items = v.items() if isinstance(v, dict) else v if isinstance(v, list) else None  # Arrow maps: pairs
        if items is None:
            raise ValueError(f"sampling_params.logit_bias must map token ids to biases, got {v!r}")
        out = {}
        for k, b in items:
            tok = _int("logit_bias", int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k, 0, 2**31 - 1)
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
                raise ValueError(f"sampling_params.logit_bias values must be numbers in [-100, 100], got {b!r}")
            out[tok] = float(b)
        return out
    return v


def structured_spec(name: str, v: Any) -> dict:
    """A row's ``guided_decoding`` / ``structured_outputs`` dict as a ``skipray.structured`` spec."""
    if not isinstance(v, dict):
        raise ValueError(f"sampling_params.{name} must be a dict with one of {list(STRUCTURED_KEYS)}")
    given = {k: x for k, x in v.items() if x is not None and x is not False}
    unknown = sorted(set(given) - set(STRUCTURED_KEYS) - set(STRUCTURED_OPTIONS))
    if unknown:
        raise ValueError(f"sampling_params.{name} has unknown keys {unknown}; known: {list(STRUCTURED_KEYS)}")
    spec = {k: x for k, x in given.items() if k in STRUCTURED_KEYS}
    if spec.pop("json_object", None):
        spec.setdefault("json", {"type": "object"})
    if len(spec) != 1:
        raise ValueError(f"sampling_params.{name} needs exactly one of {list(STRUCTURED_KEYS)}, got {sorted(spec)}")
    return spec


def resolve(row_params: Any, defaults: dict) -> dict:
    """The row's implemented fields over the defaults (module contract); ``ValueError`` naming a field."""
    if row_params is not None and not isinstance(row_params, dict):
        raise ValueError(f"sampling_params must be a dict, got {type(row_params).__name__}")
    given = {k: v for k, v in (row_params or {}).items() if v is not None}
    for k, v in given.items():
        if k in NO_OP and not NO_OP[k](v):
            why = (
                "n > 1 is not supported in batch rows: the job writes one row per id"
                if k == "n"
                else f"{k}={v!r} is not supported (it would change the output); omit it or use its default"
            )
            raise ValueError(why)
    unknown = sorted(k for k in given if k not in IMPLEMENTED and k not in NO_OP)
    if unknown:
        raise ValueError(
            f"unsupported sampling params {unknown}; supported: {sorted(IMPLEMENTED)} "
            f"(accepted without effect: {sorted(NO_OP)})"
        )
    base = dict(IMPLEMENTED)
    base.update({k: v for k, v in defaults.items() if v is not None and k in IMPLEMENTED})
    base.update({k: v for k, v in given.items() if k in IMPLEMENTED})
    out = {k: (None if v is None else checked(k, v)) for k, v in base.items()}
    if out["guided_decoding"] and out["structured_outputs"]:
        raise ValueError("sampling_params: give guided_decoding or structured_outputs, not both")
    if out["min_tokens"] > out["max_tokens"]:
        raise ValueError(f"sampling_params.min_tokens ({out['min_tokens']}) exceeds max_tokens ({out['max_tokens']})")
    return out


def to_row(
    p: dict, seed: int | None, skip: str | None, bad_words_ids: list[list[int]], grammar: str | None = None
) -> dict:
    """A resolved dict (``resolve``) as ``PARAMS_TYPE`` values."""
    bias = p["logit_bias"] or {}
    return {
        "max_tokens": p["max_tokens"],
        "temperature": p["temperature"],
        "top_p": p["top_p"],
        "top_k": max(p["top_k"], 0),
        "seed": seed,
        "stop": p["stop"],
        "skip": skip,
        "presence_penalty": p["presence_penalty"],
        "frequency_penalty": p["frequency_penalty"],
        "repetition_penalty": p["repetition_penalty"],
        "min_p": p["min_p"],
        "min_tokens": p["min_tokens"],
        "stop_token_ids": p["stop_token_ids"],
        "bad_words_ids": bad_words_ids,
        "ignore_eos": p["ignore_eos"],
        "logit_bias_ids": list(bias),
        "logit_bias_values": list(bias.values()),
        "include_stop": p["include_stop_str_in_output"],
        "grammar": grammar,  # the compiled structured output (skipray.structured), or None
        "logprobs": p["logprobs"],
        "prompt_logprobs": p["prompt_logprobs"],
    }


def sampling_params(row: dict):
    """The engine's ``SamplingParams`` of ``PARAMS_TYPE`` values."""
    from skipray.core.requests import SamplingParams

    bias = dict(zip(row["logit_bias_ids"] or [], row["logit_bias_values"] or []))
    return SamplingParams(
        max_tokens=row["max_tokens"],
        temperature=row["temperature"],
        top_p=row["top_p"],
        top_k=row["top_k"],
        seed=row["seed"],
        stop=tuple(row["stop"] or ()),
        presence_penalty=row["presence_penalty"],
        frequency_penalty=row["frequency_penalty"],
        repetition_penalty=row["repetition_penalty"],
        min_p=row["min_p"],
        min_tokens=row["min_tokens"],
        stop_token_ids=tuple(row["stop_token_ids"] or ()),
        bad_words_ids=tuple(tuple(w) for w in row["bad_words_ids"] or ()),
        ignore_eos=bool(row["ignore_eos"]),
        logit_bias=bias or None,
        logprobs=0 if row.get("logprobs") is None else max(row["logprobs"], 1),
    )
