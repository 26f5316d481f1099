"""Tool calls, between OpenAI's messages and a chat template.

Rendering: a template that knows tools (it reads `tools`, as Qwen's, Llama 3.1's or Hermes' do) gets them
through `apply_chat_template(tools=...)`, with assistant `tool_calls` and `tool` messages as it expects
them. A template that does not (SmolLM2's) gets the Hermes convention as plain text, which this module
documents and parses back:
- the tools are described in the system message, after its own text: "You may call functions ... inside
  <tools></tools> ... return <tool_call>{"name": ..., "arguments": {...}}</tool_call>";
- an assistant message's tool calls become `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`
  lines after its content;
- a `tool` message becomes a user message `<tool_response>\n{content}\n</tool_response>`.

Parsing: an answer under tool_choice "auto" is searched for `<tool_call>{json}</tool_call>` blocks (or is a
bare `{"name", "arguments"}` object); under "required" or a named function the answer is constrained to
one call's JSON object (`call_schema`), which `parse_constrained` reads."""

from __future__ import annotations

import json
import re
import uuid

TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
SYSTEM_TOOLS = ("You may call one or more functions to assist with the user query. The function signatures are "
                "inside <tools></tools>:\n<tools>\n{tools}\n</tools>\nTo call a function, return its name and "
                "arguments as a JSON object inside <tool_call></tool_call> tags:\n<tool_call>\n"
                '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def template_knows_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return isinstance(template, str) and "tools" in template and "tool_calls" in template


def _call_text(call: dict) -> str:
    fn = call.get("function", {})
    try:
        args = json.loads(fn.get("arguments") or "{}")
    except ValueError:
        args = fn.get("arguments")
    return "<tool_call>\n" + json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False) + \
        "\n</tool_call>"


def for_template(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> tuple[list[dict], dict]:
    """(messages, extra keyword arguments of apply_chat_template) for this tokenizer's template."""
    has_turns = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if not tools and not has_turns:
        return messages, {}
    if template_knows_tools(tokenizer):
        out = []
        for m in messages:
            m = dict(m)
            if m.get("content") is None:
                m["content"] = ""
            if m.get("tool_calls"):   # templates read arguments as a mapping
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _json_or_text(
                    c["function"].get("arguments"))}} for c in m["tool_calls"]]
            out.append(m)
        return out, ({"tools": tools} if tools else {})
    return plain(messages, tools), {}


def _json_or_text(value):
    try:
        return json.loads(value) if isinstance(value, str) else value
    except ValueError:
        return value


def plain(messages: list[dict], tools: list[dict] | None = None) -> list[dict]:
    """The conversation as {role, content} text only, in the Hermes convention (see the module docstring)."""
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"})
        elif m.get("tool_calls"):
            parts = [m.get("content") or ""] + [_call_text(c) for c in m["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(p for p in parts if p)})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if tools:
        described = SYSTEM_TOOLS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + described}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def call_schema(tools: list[dict], name: str | None = None) -> dict:
    """The JSON schema of one call: {"name": one of the functions (or `name`), "arguments": its parameters}."""
    options = []
    for t in tools:
        fn = t["function"]
        if name is None or fn["name"] == name:
            options.append({"type": "object", "properties": {
                "name": {"const": fn["name"]},
                "arguments": fn.get("parameters") or {"type": "object", "properties": {}}},
                "required": ["name", "arguments"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def _call(obj: dict) -> dict:
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": str(obj.get("name")),
                         "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}}


def parse_constrained(text: str) -> list[dict]:
    """The call of an answer constrained by `call_schema` ([] when it was cut before it was whole)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return []
    return [_call(obj)] if isinstance(obj, dict) and "name" in obj else []


def parse_auto(text: str, names: set[str]) -> tuple[str | None, list[dict]]:
    """(content left, calls) of a free answer: <tool_call> blocks, or a bare call object, naming a known tool."""
    calls = []
    for block in TOOL_CALL.findall(text):
        try:
            obj = json.loads(block)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("name") in names:
            calls.append(_call(obj))
    if calls:
        rest = TOOL_CALL.sub("", text).strip()
        return (rest or None), calls
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and obj.get("name") in names and ("arguments" in obj or "parameters" in obj):
            return None, [_call(obj)]
    return text, []
