"""The body of `POST /v1/responses` (OpenAI's Responses API), and its input turned into chat turns.

The Responses API is another way to ask for a chat answer: `input` (a string, or a list of messages and
items) and `instructions` become the messages, function tools become chat tools, `text.format` becomes
`response_format`. What a model of this kind cannot honour is refused with a 400 that names it: built-in
tools (web search, file search, computer use, ...), images and files in the input, background runs. The
informational fields clients send by default are accepted; docs/API.md says what each one does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from assistant.api.openai_schema import MAX_TOOLS, MAX_TOP_LOGPROBS, Number, Seed, Strict, Text, Tokens
from assistant.errors import AssistantError
from assistant.settings import MAX_MESSAGES

MAX_METADATA_PAIRS = 16       # OpenAI's bounds on `metadata`
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_ID_CHARS = 128
TEXT_PARTS = ("input_text", "output_text", "text")
PART_NOT_TEXT = ("input_image", "input_file", "input_audio")
BUILT_IN_TOOLS = ("web_search", "web_search_preview", "web_search_preview_2025_03_11", "file_search",
                  "computer_use_preview", "computer_use", "code_interpreter", "image_generation", "mcp",
                  "local_shell", "shell", "apply_patch", "custom")
# Fields of `include` that name outputs this server never produces; accepted, since they ask for nothing.
IGNORED_INCLUDES = ("reasoning.encrypted_content", "file_search_call.results", "web_search_call.results",
                    "web_search_call.action.sources", "message.input_image.image_url",
                    "computer_call_output.output.image_url", "code_interpreter_call.outputs")
LOGPROBS_INCLUDE = "message.output_text.logprobs"

Id = Annotated[str, Field(strict=True, min_length=1, max_length=MAX_ID_CHARS)]


class FormatSpec(Strict):
    """`text.format`: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "name", "schema"}."""
    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Field(strict=True, max_length=64)] | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema(self):
        if self.type == "json_schema" and self.schema_ is None:
            raise AssistantError("text.format of type json_schema needs a schema", param="text.format.schema")
        return self

    def response_format(self) -> dict | None:
        """The chat `response_format` this format is."""
        if self.type == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": self.name or "response", "schema": self.schema_}}
        return {"type": self.type}


class TextOptions(Strict):
    format: FormatSpec | None = None
    verbosity: Literal["low", "medium", "high"] | None = None    # accepted; no effect (docs/API.md)


class Reasoning(Strict):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None   # no effect: no reasoning
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponseStreamOptions(Strict):
    include_obfuscation: bool | None = None     # no effect: events carry no obfuscation padding


class ResponsesRequest(Strict):
    model: str
    input: Text | Annotated[list[dict[str, Any]], Field(min_length=1, max_length=MAX_MESSAGES * 2)]
    instructions: Text | None = None
    max_output_tokens: Tokens | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    seed: Seed | None = None
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: Annotated[int, Field(strict=True, ge=1)] | None = None
    text: TextOptions | None = None
    stream: bool | None = None
    stream_options: ResponseStreamOptions | None = None
    store: bool | None = None
    previous_response_id: Id | None = None
    metadata: dict[str, Annotated[str, Field(strict=True, max_length=MAX_METADATA_VALUE)]] | None = None
    user: Annotated[str, Field(strict=True, max_length=256)] | None = None
    safety_identifier: Annotated[str, Field(strict=True, max_length=256)] | None = None
    prompt_cache_key: Annotated[str, Field(strict=True, max_length=256)] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    reasoning: Reasoning | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None

    @model_validator(mode="after")
    def _check(self):
        if self.background:
            raise AssistantError("background responses are not supported: send the request without background, "
                                 "or stream it", param="background")
        if self.conversation is not None:
            raise AssistantError("conversation objects are not supported: continue a conversation with "
                                 "previous_response_id", param="conversation")
        if self.prompt is not None:
            raise AssistantError("stored prompt templates are not supported: send instructions and input",
                                 param="prompt")
        if self.stream_options is not None and not self.stream:
            raise AssistantError("stream_options is only allowed with stream: true", param="stream_options")
        if self.metadata is not None:
            if len(self.metadata) > MAX_METADATA_PAIRS:
                raise AssistantError(f"metadata holds at most {MAX_METADATA_PAIRS} pairs", param="metadata")
            if any(len(k) > MAX_METADATA_KEY for k in self.metadata):
                raise AssistantError(f"metadata keys are at most {MAX_METADATA_KEY} characters", param="metadata")
        for name in self.include or []:
            if name != LOGPROBS_INCLUDE and name not in IGNORED_INCLUDES:
                raise AssistantError(f"include {name[:60]!r} is not one of {LOGPROBS_INCLUDE}, "
                                     f"{', '.join(IGNORED_INCLUDES)}", param="include")
        self.chat_tools()
        self.chat_tool_choice()
        return self

    # The chat request this is -------------------------------------------------------------------
    def chat_tools(self) -> list[dict] | None:
        """Function tools in chat's shape; built-in tools refused by name."""
        if not self.tools:
            return None
        out = []
        for i, t in enumerate(self.tools):
            kind = t.get("type")
            if kind in BUILT_IN_TOOLS or (isinstance(kind, str) and kind.startswith(("web_search", "computer_use"))):
                raise AssistantError(f"tools[{i}] is the built-in tool {kind!r}, which this server does not have: "
                                     "offer function tools only", param=f"tools[{i}].type")
            if kind != "function":
                raise AssistantError(f"tools[{i}].type must be 'function'", param=f"tools[{i}].type")
            name = t.get("name")
            if not isinstance(name, str) or not name:
                raise AssistantError(f"tools[{i}].name is required", param=f"tools[{i}].name")
            fn = {"name": name, "parameters": t.get("parameters") or {"type": "object", "properties": {}}}
            if t.get("description"):
                fn["description"] = t["description"]
            out.append({"type": "function", "function": fn})
        from assistant.api.openai_schema import Tool
        try:
            return [Tool.model_validate(t).model_dump() for t in out]
        except ValueError as e:
            raise AssistantError(f"tools: {_first_error(e)}", param="tools") from None

    def chat_tool_choice(self):
        """tool_choice in chat's shape ("none", "auto", "required" or {"type": "function", "function": {name}})."""
        choice = self.tool_choice
        if choice is None or isinstance(choice, str):
            if choice == "required" and not self.tools:
                raise AssistantError("tool_choice 'required' needs tools", param="tool_choice")
            return choice
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise AssistantError("tool_choice must be none, auto, required or {\"type\": \"function\", \"name\": ...}",
                                 param="tool_choice")
        if choice["name"] not in {t.get("name") for t in self.tools or []}:
            raise AssistantError(f"tool_choice names {choice['name']!r}, which is not in tools", param="tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}

    def response_format(self) -> dict | None:
        fmt = self.text.format if self.text else None
        return fmt.response_format() if fmt else None

    @property
    def logprobs(self) -> int | None:
        """Top logprobs per token when `include` asks for them, else None."""
        return (self.top_logprobs or 0) if LOGPROBS_INCLUDE in (self.include or []) else None

    def sampling(self) -> dict:
        """The keyword arguments of `Serving.start_choices` these fields make (as chat's `Sampling.sampling`)."""
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "n": 1}

    @property
    def end_user(self) -> str | None:
        return self.user or self.safety_identifier


def input_turns(items) -> list[dict]:
    """The request's `input` as chat turns: messages, function calls (joined into the assistant turn before
    them) and their outputs (tool turns). Reasoning items are dropped: this server never makes them."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    turns: list[dict] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        where = f"input[{i}]"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise AssistantError(f"{where}.role must be user, system, developer or assistant", param=f"{where}.role")
            turns.append({"role": "system" if role == "developer" else role,
                          "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": _field(item, "call_id", where), "type": "function",
                    "function": {"name": _field(item, "name", where), "arguments": _field(item, "arguments", where)}}
            last = turns[-1] if turns else None
            if last is not None and last["role"] == "assistant" and (last.get("tool_calls") or not last["content"]):
                last.setdefault("tool_calls", []).append(call)
            else:
                turns.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            turns.append({"role": "tool", "tool_call_id": _field(item, "call_id", where),
                          "content": _text(output, f"{where}.output")})
        elif kind == "reasoning":
            continue
        else:
            raise AssistantError(f"{where}.type {str(kind)[:40]!r} is not supported here: send messages, "
                                 "function_call and function_call_output items", param=f"{where}.type")
    if not turns:
        raise AssistantError("input holds no message", param="input")
    return turns


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise AssistantError(f"{where} must be a string or a list of text parts", param=where)
    out = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS:
            out.append(str(part.get("text", "")))
        elif kind == "refusal":
            out.append(str(part.get("refusal", "")))
        elif kind in PART_NOT_TEXT:
            raise AssistantError(f"{where}[{k}] is {kind}: this model reads text only", param=f"{where}[{k}].type")
        else:
            raise AssistantError(f"{where}[{k}].type must be input_text or output_text", param=f"{where}[{k}].type")
    return "".join(out)


def _field(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or (key != "arguments" and not value):
        raise AssistantError(f"{where}.{key} is required (a string)", param=f"{where}.{key}")
    return value


def _first_error(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(str(x) for x in first.get('loc', ()))}: {first.get('msg', '')}"
    return str(e)
