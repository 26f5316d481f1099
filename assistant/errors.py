"""The few domain errors of the app. Each carries the HTTP status it maps to at the edge and a message
that says what happened and what to do next; the API, UI and CLI only translate them."""

from __future__ import annotations


class AssistantError(Exception):
    """Base class: `status` is the HTTP status, `code` a short machine-readable kind."""

    status = 400
    code = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidName(AssistantError):
    status = 422
    code = "invalid_name"


class NotFound(AssistantError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(AssistantError):
    status = 409
    code = "conflict"


class InvalidAdapter(AssistantError):
    status = 422
    code = "invalid_adapter"


class AdapterRefused(InvalidAdapter):
    """The serving engine (a vLLM server) refused to load an adapter version; the message has its reason."""
    code = "adapter_refused"


class EngineLimit(AssistantError):
    """An adapter (to train or to import) is past what the serving engine accepts: the message names the
    limit and the flag that raises it."""
    status = 422
    code = "engine_limit"


class ContextTooLong(AssistantError):
    status = 400
    code = "context_length_exceeded"


class DatasetTooSmall(AssistantError):
    status = 422
    code = "dataset_too_small"


class Busy(AssistantError):
    status = 503
    code = "server_busy"


class ModelLoadError(AssistantError):
    status = 500
    code = "model_load_error"


class DomainBroken(AssistantError):
    """The domain exists but cannot serve: its active version is missing, or its settings are unreadable."""
    status = 503
    code = "domain_broken"


class GenerationFailed(AssistantError):
    """The model failed on the server; the traceback is in the server log, never in the client's message."""
    status = 500
    code = "generation_failed"


class TooLarge(AssistantError):
    status = 413
    code = "request_too_large"


class SlotsBusy(Busy):
    """Every adapter slot is pinned by requests in flight: a new adapter has nowhere to load yet."""


class SamplingError(RuntimeError):
    """A row's logits have no finite value to choose from (a numerical failure of the model, not the request's
    fault): that request alone fails."""


class InvalidSetting(AssistantError, ValueError):
    """A setting with a wrong type or value; `param` names the field (`epochs`, `learning_rate`, ...)."""


class InsufficientMemory(AssistantError):
    """A training job would not fit in the device's memory; the message names the numbers and what to lower."""
    status = 422
    code = "insufficient_memory"


class TrainingStopped(Exception):
    """`should_stop()` returned True during training: nothing was saved (a cancelled job)."""


class VllmStartError(ModelLoadError):
    """The vLLM server exited or did not become healthy in time; the message has its log's tail."""
    code = "engine_start_failed"


class VllmError(AssistantError):
    """vLLM refused or failed a request. `url` is the server, `http_status` and `vllm_type` what vLLM said
    (None when it said nothing), `vllm_message` its message."""

    status = 502
    code = "engine_error"

    def __init__(self, url: str, what: str, vllm_message: str = "", *, http_status: int | None = None,
                 vllm_type: str | None = None):
        msg = f"vLLM server {url}: {what}" + (f": {vllm_message}" if vllm_message else "")
        super().__init__(msg)
        self.url = url
        self.http_status = http_status
        self.vllm_type = vllm_type
        self.vllm_message = vllm_message


class VllmUnavailable(VllmError):
    """The server cannot be reached, timed out, or closed the connection mid-answer."""

    status = 503
    code = "engine_unavailable"


class RankFailed(RuntimeError):
    """A data-parallel training process ended badly; the others were stopped (the job fails with this)."""


class ServerRefused(AssistantError):
    """The running server answered another process's request (an activation, an import, a training job)
    with an error: its message and HTTP status, passed on unchanged."""
    code = "server_refused"

    def __init__(self, message: str, *, status: int = 502, param: str | None = None):
        super().__init__(message, param=param)
        self.status = status


class UnsupportedMediaType(AssistantError):
    """A JSON route sent another content type (a cross-site form posts text/plain)."""
    status = 415
    code = "unsupported_media_type"


class MethodNotAllowed(AssistantError):
    status = 405
    code = "method_not_allowed"


class PermissionDenied(AssistantError):
    """Signed in, but the role does not allow this; the message names the role it needs."""
    status = 403
    code = "permission_denied"


class RateLimited(AssistantError):
    """Over a per-person quota (requests per minute, tokens per day) or too many failed sign-ins;
    `retry_after` is the seconds to wait."""
    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: int = 60, **kw):
        super().__init__(message, **kw)
        self.retry_after = max(1, int(retry_after))
