"""Domain errors: what can go wrong with a request or a configuration, independent of gRPC.

The server maps each class to one gRPC status code (loraserve.server.status); the CLI maps ConfigError to exit code 2.
"""

from __future__ import annotations


class LoraserveError(Exception):
    """Base class of every error that is part of loraserve's contract."""


class InvalidRequest(LoraserveError):
    """A request field is missing, out of range or inconsistent. `field` names it, e.g. "sampling.top_p"."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class AdapterNotFound(LoraserveError):
    """The request names an adapter that is not loaded."""

    def __init__(self, adapter_id: str, loaded: list[str]) -> None:
        names = ", ".join(sorted(loaded)) or "none"
        super().__init__(f"adapter_id: no adapter {adapter_id!r} is loaded (loaded: {names})")
        self.adapter_id = adapter_id


class NotFound(LoraserveError):
    """The request names something that does not exist (a collection)."""


class ModelNotFound(NotFound):
    """An OpenAI-API request names a model that is neither the served model nor a loaded adapter."""


class FailedPrecondition(LoraserveError):
    """The request is valid, but the state it needs is not there (a collection embedded with another model)."""


class AlreadyExists(LoraserveError):
    """The thing to create exists already (an adapter id that is loaded)."""


class PermissionDenied(LoraserveError):
    """The request is understood but not allowed (a path outside the adapter root, a bucket not allowed)."""


class QueueFull(LoraserveError):
    """The engine's waiting queue is at its limit; the client should retry later."""


class Unavailable(LoraserveError):
    """The server cannot take requests now: it is loading, draining, or its engine stopped."""


class DeadlineExceeded(LoraserveError):
    """The client's deadline passed before the request finished; the engine dropped it."""


class Cancelled(LoraserveError):
    """The server cancelled the request: it shut down before the request finished."""


class ModelFailure(LoraserveError):
    """The model (or an adapter) failed on this request: NaN scores, a failed step. The request ends with INTERNAL
    and this message; the server keeps serving the others."""


class ConfigError(LoraserveError):
    """A configuration value (flag, environment variable or file) is wrong; the message names the option."""
