"""The request bodies of the OpenAI-compatible routes, described once as pydantic models: FastAPI validates
them, `/api/openapi.json` publishes them, and a wrong field is answered with a 400 that names the field
that was sent. Cross-field rules (e.g. `stream_options` needs `stream`) raise `AssistantError` naming the
field. Fields OpenAI defines that this server cannot honour are absent: an unknown field is refused, never
silently ignored."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from assistant.errors import AssistantError
from assistant.settings import MAX_MESSAGE_CHARS, MAX_MESSAGES, MAX_NEW_TOKENS_CAP

MAX_CHOICES = 8             # n: answers to one request (one prefill, n rows of the batch)
MAX_TOP_LOGPROBS = 20       # OpenAI's bound on top_logprobs (and the legacy `logprobs`: 5 there)
MAX_LEGACY_LOGPROBS = 5
MAX_STOP_STRINGS = 4
MAX_TOOLS = 64
MAX_PROMPTS = 16            # prompts in one POST /v1/completions

Int = Annotated[int, Field(strict=True)]
Seed = Annotated[int, Field(strict=True, ge=-2 ** 63, lt=2 ** 64)]
Text = Annotated[str, Field(strict=True, max_length=MAX_MESSAGE_CHARS)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Tokens = Annotated[int, Field(strict=True, ge=1, le=MAX_NEW_TOKENS_CAP)]
Penalty = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-2.0, le=2.0)]
Stop = Text | Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class Open(BaseModel):
    """Parts of messages and tools: other fields OpenAI clients send there (e.g. `refusal`, `annotations`)
    are kept out of the prompt but do not fail the request."""
    model_config = ConfigDict(strict=True, extra="ignore")


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
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Annotated[str, Field(strict=True, max_length=64)] | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None
    tool_call_id: Annotated[str, Field(strict=True, max_length=128)] | None = None

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (null only for an assistant message with tool_calls)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls belong to assistant messages")
        return self

    def plain(self) -> dict:
        """{role, content} as the chat template reads it ("developer" is "system", as OpenAI treats it), with
        tool_calls and tool_call_id kept when present."""
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.tool_calls:
            out["tool_calls"] = [t.model_dump() for t in self.tool_calls]
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
            if self.name:
                out["name"] = self.name
        return out


class StreamOptions(Strict):
    include_usage: bool = False


class JsonSchema(Open):
    name: Annotated[str, Field(strict=True, max_length=64)] = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class TextFormat(Strict):
    type: Literal["text"]


class JsonObjectFormat(Strict):
    type: Literal["json_object"]


class JsonSchemaFormat(Strict):
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


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class Sampling(Strict):
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
    user: Annotated[str, Field(strict=True, max_length=256)] | None = None
    ignore_eos: bool = False          # vLLM's extension: benchmarks generate max_tokens every time

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
                "ignore_eos": self.ignore_eos}


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Tokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _chat(self):
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

    @property
    def token_limit(self) -> tuple[int | None, str]:
        """(max tokens, the name of the field that set it)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(Sampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
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
