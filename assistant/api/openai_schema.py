"""The request bodies of the OpenAI-compatible routes, described once as pydantic models: FastAPI validates
them, `/api/openapi.json` publishes them, and a wrong field is answered with a 400 that names the field
that was sent. Cross-field rules (e.g. `stream_options` needs `stream`) raise `AssistantError` naming the
field. Fields OpenAI defines that this server cannot honour are absent: an unknown field is refused, never
silently ignored. The informational fields clients send by default (`store`, `metadata`, `service_tier`,
`reasoning_effort`, ...) are accepted, each with a line in docs/API.md saying what happens to it. An
explicit null for an optional field reads as the field left out (its default)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from assistant.errors import AssistantError
from assistant.settings import MAX_MESSAGE_CHARS, MAX_MESSAGES, MAX_NEW_TOKENS_CAP

MAX_CHOICES = 8             # n: answers to one request (one prefill, n rows of the batch)
MAX_TOP_LOGPROBS = 20       # OpenAI's bound on top_logprobs (and the legacy `logprobs`: 5 there)
MAX_LEGACY_LOGPROBS = 5
MAX_STOP_STRINGS = 4
MAX_TOOLS = 64
MAX_PROMPTS = 16            # prompts in one POST /v1/completions
MAX_PROMPT_IDS = MAX_MESSAGE_CHARS   # a prompt sent as token ids: as long as the longest text prompt
MAX_TOP_K = 2 ** 31 - 1     # past any vocabulary (the same as off)
MAX_REPETITION_PENALTY = 100.0   # past it every id already read is as good as ruled out
MAX_METADATA_PAIRS = 16     # OpenAI's bounds on `metadata`
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_ID_CHARS = 256          # `user`, `safety_identifier`, `prompt_cache_key`

Int = Annotated[int, Field(strict=True)]
Seed = Annotated[int, Field(strict=True, ge=-2 ** 63, lt=2 ** 63)]   # OpenAI's bounds: a signed 64-bit integer
Text = Annotated[str, Field(strict=True, max_length=MAX_MESSAGE_CHARS)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Tokens = Annotated[int, Field(strict=True, ge=1, le=MAX_NEW_TOKENS_CAP)]
Penalty = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-2.0, le=2.0)]
Stop = Text | Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)]
Ident = Annotated[str, Field(strict=True, max_length=MAX_ID_CHARS)]
Metadata = Annotated[dict[Annotated[str, Field(max_length=MAX_METADATA_KEY_CHARS)],
                          Annotated[str, Field(strict=True, max_length=MAX_METADATA_VALUE_CHARS)]],
                     Field(max_length=MAX_METADATA_PAIRS)]
TokenIds = Annotated[list[Annotated[int, Field(strict=True, ge=0)]], Field(min_length=1, max_length=MAX_PROMPT_IDS)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


def nulls_as_defaults(model: type[BaseModel], data):
    """`data` less the explicit nulls of optional fields: `"n": null` reads as `n` left out (clients send
    null for whatever they did not set). A required field's null is still refused."""
    if not isinstance(data, dict):
        return data
    optional = {f.alias or name for name, f in model.model_fields.items() if not f.is_required()}
    return {k: v for k, v in data.items() if v is not None or k not in optional}


class Body(Strict):
    """The OpenAI routes' bodies and their parts: strict, and a null for an optional field is its default."""

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data):
        return nulls_as_defaults(cls, data)


class Open(BaseModel):
    """Parts of messages and tools: other fields OpenAI clients send there (e.g. `refusal`, `annotations`)
    are kept out of the prompt but do not fail the request."""
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data):
        return nulls_as_defaults(cls, data)


class ContentPart(Open):
    type: Literal["text"]
    text: Text


class FunctionCall(Open):
    name: Annotated[str, Field(strict=True, min_length=1, max_length=64)]
    arguments: Text


class ToolCall(Open):
    id: Annotated[str, Field(strict=True, max_length=128)]
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[ContentPart] | None = None
    name: Annotated[str, Field(strict=True, max_length=64)] | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None
    tool_call_id: Annotated[str, Field(strict=True, max_length=128)] | None = None
    function_call: FunctionCall | None = None     # the legacy form of one tool call (role "assistant")

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and not (self.role == "assistant" and (self.tool_calls or self.function_call)):
            raise ValueError("content is required (null only for an assistant message with tool_calls)")
        if (self.tool_calls or self.function_call) and self.role != "assistant":
            raise ValueError("tool_calls and function_call belong to assistant messages")
        if self.role == "function" and not self.name:
            raise ValueError("a function message names the function whose result it holds (name)")
        return self

    def plain(self) -> dict:
        """{role, content} as the chat template reads it ("developer" is "system", as OpenAI treats it), with
        tool_calls and tool_call_id kept when present. The legacy forms read as the current ones: a
        `function_call` as a tool call, a "function" message as a "tool" message answering it."""
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        role = {"developer": "system", "function": "tool"}.get(self.role, self.role)
        out: dict[str, Any] = {"role": role, "content": content}
        if self.tool_calls:
            out["tool_calls"] = [t.model_dump() for t in self.tool_calls]
        elif self.function_call:
            out["tool_calls"] = [{"id": legacy_call_id(self.function_call.name), "type": "function",
                                  "function": self.function_call.model_dump()}]
        if role == "tool":
            out["tool_call_id"] = self.tool_call_id if self.role == "tool" else legacy_call_id(self.name)
            if self.name:
                out["name"] = self.name
        return out


def legacy_call_id(name: str) -> str:
    """The tool call id a legacy function call and its result share (the legacy form has none)."""
    return f"call_{name}"


class StreamOptions(Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False    # vLLM's: with include_usage, every chunk carries the usage so far
    include_obfuscation: bool | None = None   # accepted; chunks are never padded here (docs/API.md)


class JsonSchema(Open):
    name: Annotated[str, Field(strict=True, max_length=64)] = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class TextFormat(Body):
    type: Literal["text"]


class JsonObjectFormat(Body):
    type: Literal["json_object"]


class JsonSchemaFormat(Body):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class FunctionDef(Open):
    name: Annotated[str, Field(strict=True, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(Open):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class Sampling(Body):
    """What chat and legacy completions share."""
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Tokens | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    n: Annotated[int, Field(strict=True, ge=1, le=MAX_CHOICES)] = 1
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[Number, Field(ge=-100, le=100)]] | None = None
    user: Ident | None = None
    ignore_eos: bool = False          # vLLM's extension: benchmarks generate max_tokens every time
    # vLLM's sampling extensions, per row of the batch
    top_k: Annotated[int, Field(strict=True, ge=-1, le=MAX_TOP_K)] | None = None
    min_p: Annotated[Number, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0, le=MAX_REPETITION_PENALTY)] | None = None
    min_tokens: Annotated[int, Field(strict=True, ge=0, le=MAX_NEW_TOKENS_CAP)] | None = None
    # Informational: docs/API.md says what happens to each
    store: bool | None = None
    metadata: Metadata | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    safety_identifier: Ident | None = None
    prompt_cache_key: Ident | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None

    @model_validator(mode="after")
    def _shared(self):
        if self.stream_options is not None and not self.stream:
            raise AssistantError("stream_options is only allowed with stream: true", param="stream_options")
        for key in self.logit_bias or {}:
            if not key.isdigit():
                raise AssistantError(f"logit_bias keys are token ids (as strings); {key[:20]!r} is not one",
                                     param="logit_bias")
        return self

    def sampling(self) -> dict:
        """The keyword arguments of `Serving.start_chat` these fields make."""
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed, "stop": self.stop,
                "frequency_penalty": self.frequency_penalty or 0.0,
                "presence_penalty": self.presence_penalty or 0.0,
                "logit_bias": {int(k): v for k, v in (self.logit_bias or {}).items()}, "n": self.n,
                "ignore_eos": self.ignore_eos, "top_k": self.top_k, "min_p": self.min_p,
                "repetition_penalty": self.repetition_penalty, "min_tokens": self.min_tokens}

    @property
    def end_user(self) -> str | None:
        """Who the request says it serves: `user`, or else `safety_identifier` (OpenAI's newer name for it)."""
        return self.user or self.safety_identifier

    @property
    def usage_options(self) -> tuple[bool, bool]:
        """(a stream ends with a usage chunk, every chunk carries the usage so far): vLLM reads
        `continuous_usage_stats` only with `include_usage`, and so does this server."""
        o = self.stream_options
        include = bool(o and o.include_usage)
        return include, include and bool(o.continuous_usage_stats)


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Tokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None   # false: at most one call per answer
    functions: Annotated[list[FunctionDef], Field(min_length=1, max_length=MAX_TOOLS)] | None = None   # legacy tools
    function_call: Literal["none", "auto"] | NamedFunction | None = None                               # legacy tool_choice

    @model_validator(mode="after")
    def _chat(self):
        self._legacy_functions()
        if self.top_logprobs and not self.logprobs:
            raise AssistantError("top_logprobs needs logprobs: true", param="top_logprobs")
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tool_choice.function.name not in {t.function.name for t in self.tools or []}:
                raise AssistantError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in "
                                     "tools", param="tool_choice")
        elif self.tool_choice == "required" and not self.tools:
            raise AssistantError("tool_choice 'required' needs tools", param="tool_choice")
        if self.tools and self.response_format is not None and self.response_format.type != "text" \
                and self.tool_choice not in (None, "none"):
            raise AssistantError("response_format and tools cannot both constrain one answer: send one",
                                 param="response_format")
        return self

    def _legacy_functions(self) -> None:
        """`functions` and `function_call` (the legacy form) read as `tools` and `tool_choice`."""
        if self.functions is None:
            if self.function_call is not None:
                raise AssistantError("function_call needs functions (or send tools and tool_choice)",
                                     param="function_call")
            return
        for name, value in (("tools", self.tools), ("tool_choice", self.tool_choice)):
            if value is not None:
                raise AssistantError(f"send functions (the legacy form) or {name}, not both", param="functions")
        names = {f.name for f in self.functions}
        if isinstance(self.function_call, NamedFunction) and self.function_call.name not in names:
            raise AssistantError(f"function_call names {self.function_call.name!r}, which is not in functions",
                                 param="function_call")
        self.tools = [Tool(type="function", function=f) for f in self.functions]
        self.tool_choice = (NamedToolChoice(type="function", function=self.function_call)
                            if isinstance(self.function_call, NamedFunction) else self.function_call)

    @property
    def legacy_functions(self) -> bool:
        """The request offered `functions`: its answer carries `function_call`, as OpenAI's legacy answers do."""
        return self.functions is not None

    @property
    def token_limit(self) -> tuple[int | None, str]:
        """(max tokens, the name of the field that set it)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


def prompt_form(v) -> str | None:
    """Which of OpenAI's four forms a completions `prompt` has (None: none of them)."""
    def ids(x):
        return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)
    if isinstance(v, str):
        return "text"
    if not isinstance(v, list):
        return None
    if not v or all(isinstance(x, str) for x in v):
        return "texts"
    if ids(v):
        return "ids"
    return "id_lists" if all(ids(x) for x in v) else None


Prompt = Annotated[Annotated[Text, Tag("text")]
                   | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS), Tag("texts")]
                   | Annotated[TokenIds, Tag("ids")]
                   | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS), Tag("id_lists")],
                   Discriminator(prompt_form, custom_error_type="prompt_form",
                                 custom_error_message="must be a string, a list of strings, a list of token ids "
                                                      "(integers) or a list of such lists")]


class CompletionRequest(Sampling):
    prompt: Prompt
    echo: bool = False
    logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_LEGACY_LOGPROBS)] | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(strict=True, ge=1, le=1)] | None = None

    @model_validator(mode="after")
    def _completion(self):
        if self.suffix:
            raise AssistantError("suffix (fill-in-the-middle) is not supported: this base is not trained for it",
                                 param="suffix")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a text or a list of token ids."""
        p = self.prompt
        return [p] if isinstance(p, str) or isinstance(p[0], int) else list(p)


# The REST API's bodies ---------------------------------------------------------------------------

class FeedbackRequest(Strict):
    response_id: Annotated[str, Field(strict=True, min_length=1, max_length=128)]
    rating: Literal["up", "down"]
    correction: Text | None = None
    reason: Text | None = None
    user: Annotated[str, Field(strict=True, max_length=256)] | None = None


class WithdrawRequest(Strict):
    response_id: Annotated[str, Field(strict=True, min_length=1, max_length=128)]
    user: Annotated[str, Field(strict=True, max_length=256)] | None = None


class DomainRequest(Strict):
    name: str
    system_prompt: Text | None = ""
    description: Text | None = ""
    trust_users: bool = False     # feedback from `user` accounts trains without review


class UserRequest(Strict):
    name: str
    password: str
    role: str = "user"
    domains: list[str] = []


class PasswordRequest(Strict):
    password: str


class KeyRequest(Strict):
    label: str = ""
    owner: str | None = None      # an admin may make a key for someone else


class ReviewRequest(Strict):
    keys: list[str]
    status: str | None            # "approved", "rejected", or null to clear


class ExamplesRequest(Strict):
    examples: list[dict[str, Any]]


class ActivateRequest(Strict):
    override: bool = False


class CanaryRequest(Strict):
    share: float | None = None    # of the domain's conversations; none: the server's --canary.share
