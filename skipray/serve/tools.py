"""Tool calling for the chat route: OpenAI's ``tools`` / ``tool_choice``, answered through structured output.

Contract (no Ray, no torch):

* ``tool_plan(tools, tool_choice, template_renders_tools)`` validates the request's ``tools`` (OpenAI's
  ``[{"type": "function", "function": {"name", "description", "parameters"}}]``) and ``tool_choice``
  and returns a ``ToolPlan``, or None when no tool can be called (no tools, or ``"none"``). As vLLM does:
  a named function (``{"type": "function", "function": {"name": ...}}``) constrains the answer to that
  function's ``parameters`` schema; ``"required"`` to a JSON array of at least one
  ``{"name", "parameters"}`` object, one per call, each validated against its function; ``"auto"`` (the
  default when tools are given) lets the model choose and parses Hermes-style
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (the format of Qwen2.5, Hermes and
  other chat templates that render ``tools``), and is a 400 for a model whose chat template does not
  render tools. ``RequestError`` (400, ``param`` the field) for malformed tools or a choice naming no tool.
* ``ToolPlan.spec`` is the ``skipray.structured`` spec to constrain the answer with (None for ``auto``);
  ``ToolPlan.template_tools`` is what the chat template's ``tools`` variable receives.
* ``ToolPlan.message(text, finish_reason)`` -> (the assistant message, the finish reason): with tool
  calls, ``content`` is null (``auto``: the text outside the calls, or null) and ``tool_calls`` holds
  ``{"id", "type": "function", "function": {"name", "arguments"}}`` with ``arguments`` a JSON string;
  ``auto`` answers that call a tool finish with ``"tool_calls"``. An answer cut short (``"length"``) or
  one that does not parse keeps its text as ``content`` and no ``tool_calls``.
* Earlier turns of a tool conversation (assistant ``tool_calls``, ``role: "tool"`` answers) reach the
  chat template through ``skipray.serve.protocol.render_messages``.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from skipray.serve.protocol import RequestError

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def renders_tools(tokenizer) -> bool:
    """Whether the model's chat template uses a ``tools`` variable."""
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


@dataclass(frozen=True)
class ToolPlan:
    mode: str  # "named", "required" or "auto"
    functions: dict[str, dict]  # name -> {"name", "description", "parameters"}
    template_tools: list[dict]
    spec: dict | None

    def message(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The assistant message for ``text`` and the reply's finish reason (see the module contract)."""
        plain = {"role": "assistant", "content": text}
        if finish_reason == "length":
            return plain, finish_reason
        try:
            calls, content = self._calls(text)
        except (ValueError, TypeError, KeyError):  # not the JSON the grammar asked for: keep the text
            return plain, finish_reason
        if not calls:
            return plain, finish_reason
        msg = {
            "role": "assistant",
            "content": content,
            "tool_calls": [
                {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {"name": name, "arguments": args},
                }
                for name, args in calls
            ],
        }
        return msg, "tool_calls" if self.mode == "auto" else finish_reason

    def _calls(self, text: str) -> tuple[list[tuple[str, str]], str | None]:
        if self.mode == "named":
            json.loads(text)  # the grammar made it; a failure here means the answer was not finished
            return [(next(iter(self.functions)), text)], None
        if self.mode == "required":
            calls = json.loads(text)
            return [(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in calls], None
        calls = []
        for block in HERMES_CALL.findall(text):
            obj = json.loads(block)
            if obj.get("name") not in self.functions:
                raise ValueError(f"unknown function {obj.get('name')!r}")
            args = obj.get("arguments", obj.get("parameters", {}))
            calls.append((obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)))
        content = HERMES_CALL.sub("", text).strip() or None
        return calls, content


def _functions(tools: Any) -> dict[str, dict]:
    if not isinstance(tools, list):
        raise RequestError("tools must be a list of function tools", "tools")
    out: dict[str, dict] = {}
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if (
            not isinstance(t, dict)
            or t.get("type", "function") != "function"
            or not isinstance(t.get("function"), dict)
        ):
            raise RequestError(f'{where} must be {{"type": "function", "function": {{...}}}}', where)
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise RequestError(f"{where}.function.name must match {NAME.pattern}", f"{where}.function.name")
        if name in out:
            raise RequestError(f"{where}: function {name!r} is given twice", f"{where}.function.name")
        params = f.get("parameters")
        if params is None:
            params = EMPTY_PARAMETERS
        if not isinstance(params, dict):
            raise RequestError(f"{where}.function.parameters must be a JSON schema object", f"{where}.function")
        out[name] = {"name": name, "description": f.get("description") or "", "parameters": params}
    return out


def tool_plan(tools: Any, tool_choice: Any, template_renders_tools: bool, parallel: bool = True) -> ToolPlan | None:
    """See the module contract. ``tools`` / ``tool_choice`` as the request sent them (None: absent);
    ``parallel``: OpenAI's ``parallel_tool_calls`` (False: ``"required"`` makes exactly one call)."""
    if tool_choice is not None and not isinstance(tool_choice, (str, dict)):
        raise RequestError("tool_choice must be 'none', 'auto', 'required' or a named function", "tool_choice")
    if isinstance(tool_choice, str) and tool_choice not in ("none", "auto", "required"):
        raise RequestError(f"tool_choice must be 'none', 'auto' or 'required', got {tool_choice!r}", "tool_choice")
    functions = _functions(tools) if tools is not None else {}
    if not functions:
        if tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice names a tool, but the request gives no tools", "tool_choice")
        return None
    if tool_choice == "none":
        return None
    template_tools = [{"type": "function", "function": f} for f in functions.values()]
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") if tool_choice.get("type") == "function" else None
        if name not in functions:
            raise RequestError(f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
        return ToolPlan("named", {name: functions[name]}, template_tools, {"json": functions[name]["parameters"]})
    if tool_choice == "required":
        schema = {
            "type": "array",
            "minItems": 1,
            **({} if parallel else {"maxItems": 1}),
            "items": {
                "anyOf": [
                    {
                        "type": "object",
                        "properties": {"name": {"const": n}, "parameters": f["parameters"]},
                        "required": ["name", "parameters"],
                        "additionalProperties": False,
                    }
                    for n, f in functions.items()
                ]
            },
        }
        return ToolPlan("required", functions, template_tools, {"json": schema})
    if not template_renders_tools:
        raise RequestError(
            "tool_choice 'auto' needs a chat template that renders tools, and this model's does not; send "
            "tool_choice 'required' or a named function (the answer is then constrained to the tools' schemas)",
            "tool_choice" if tool_choice is not None else "tools",
            "unsupported_parameter",
        )
    return ToolPlan("auto", functions, template_tools, None)
