"""Domain errors, and the one place that says what each means to a client.

No web framework here: every front-end (the FastAPI routes, Ray Serve, the Open Inference Protocol
over REST and gRPC) asks ``describe(exc)`` for a ``Failure`` and writes it in its own terms (an HTTP
status, a gRPC code). Client mistakes are 4xx; overload and models that are not ready 503 with a
retry hint; passed deadlines 504. Anything else is a server fault: the client gets a generic
message (with the request id, added by the front-end) and the exception goes to the log.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.catalog import UnknownModelError
from app.engine.batcher import NoWorkerError, QueueFullError
from app.engine.pool import BatchFailedError, ModelUnavailableError, WorkerCrashedError
from app.imaging import ImageError, ImageTooLargeError


class UploadError(ValueError):
    """The request body is not a usable upload (HTTP 400, or ``status`` when given)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class UploadTooLargeError(ValueError):
    """The request body is over IMGCLS_MAX_UPLOAD_MB (HTTP 413)."""


class ModelNotServedError(LookupError):
    """The model is in the catalog but this service was not started with it (HTTP 404)."""


class ModelNotReadyError(RuntimeError):
    """The model is loading, restarting, failed, or has no weights (HTTP 503)."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidParameterError(ValueError):
    """A parameter is well-formed but not acceptable (HTTP 422)."""


class ExplainQueueFullError(RuntimeError):
    """Too many explanations running and waiting (IMGCLS_EXPLAIN_QUEUE): HTTP 503."""


class NotAvailableError(RuntimeError):
    """This front-end or backend does not offer the operation (HTTP 501)."""


class ElementError(Exception):
    """One element of a multi-image request failed; ``cause`` says how (its status is the
    cause's)."""

    def __init__(self, index: int, cause: BaseException) -> None:
        super().__init__(f"image {index}: {cause}")
        self.index = index
        self.cause = cause


@dataclass(frozen=True)
class Failure:
    status: int  # HTTP status; other protocols map it to their own codes
    message: str  # safe to show the client
    retry_after: int | None = None  # seconds, for 503
    internal: bool = False  # a server fault: log the exception, show only ``message``
    close: bool = False  # the connection should be closed (the body may not have been read)


INTERNAL_MESSAGE = "the server failed to process this request"


def describe(exc: BaseException) -> Failure:
    """What ``exc`` means to the client who caused it (or suffered it)."""
    if isinstance(exc, ElementError):
        inner = describe(exc.cause)
        if inner.internal:
            return inner
        return Failure(inner.status, f"image {exc.index}: {inner.message}", inner.retry_after)
    if isinstance(exc, ImageTooLargeError):
        return Failure(413, str(exc))
    if isinstance(exc, UploadTooLargeError):
        return Failure(413, str(exc), close=True)
    if isinstance(exc, ImageError):
        return Failure(400, str(exc))
    if isinstance(exc, UploadError):
        return Failure(exc.status, str(exc))
    if isinstance(exc, UnknownModelError | ModelNotServedError):
        return Failure(404, str(exc))
    if isinstance(exc, InvalidParameterError):
        return Failure(422, str(exc))
    if isinstance(exc, ModelNotReadyError):
        return Failure(503, str(exc), exc.retry_after)
    if isinstance(exc, ExplainQueueFullError):
        return Failure(503, str(exc), 2)
    if isinstance(exc, NotAvailableError):
        return Failure(501, str(exc))
    if isinstance(exc, QueueFullError):
        return Failure(503, str(exc), 1)
    if isinstance(exc, NoWorkerError):
        return Failure(503, str(exc), 2)
    if isinstance(exc, WorkerCrashedError):
        return Failure(503, f"{exc}; retry shortly", 2)
    if isinstance(exc, TimeoutError):
        return Failure(504, f"request deadline passed: {exc}" if str(exc) else "request timed out")
    if isinstance(exc, ModelUnavailableError):
        return Failure(503, str(exc))
    if isinstance(exc, BatchFailedError):
        return Failure(500, "inference failed on the server for this image's batch", internal=True)
    return Failure(500, INTERNAL_MESSAGE, internal=True)
