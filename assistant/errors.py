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
